//! A/B timings of encoder building blocks, interleaved in one process so the
//! comparison survives a busy machine (min over repetitions).
use candle_core::{DType, Device, Tensor};
use std::time::{Duration, Instant};

fn best(reps: usize, mut f: impl FnMut() -> candle_core::Result<Tensor>) -> Duration {
    (0..reps)
        .map(|_| {
            let t = Instant::now();
            let _ = f().unwrap();
            t.elapsed()
        })
        .min()
        .unwrap()
}

fn main() -> anyhow::Result<()> {
    let dir = stepaudio_live::fetch::resolve("tiny.en")?;
    let m = stepaudio_live::model::whisper::load::load_whisper(&dir, &Device::Cpu, DType::F32)?;
    let mel = Tensor::randn(0f32, 1., (1, 80, 3000), &Device::Cpu)?;
    let reps = 7;
    let mel_t = mel.transpose(1, 2)?.contiguous()?;
    let c1 = m.encoder.conv1.forward(&mel)?;
    let c1_t = c1.transpose(1, 2)?.contiguous()?;
    println!(
        "conv1: candle {:?}, im2col {:?}",
        best(reps, || m.encoder.conv1.forward(&mel)),
        best(reps, || m.encoder.conv1.forward_time_major(&mel_t))
    );
    println!(
        "conv2: candle {:?}, im2col {:?}",
        best(reps, || m.encoder.conv2.forward(&c1)),
        best(reps, || m.encoder.conv2.forward_time_major(&c1_t))
    );
    let q = Tensor::randn(0f32, 1., (1, 6, 1500, 64), &Device::Cpu)?;
    let k = Tensor::randn(0f32, 1., (1, 6, 1500, 64), &Device::Cpu)?;
    let v = Tensor::randn(0f32, 1., (1, 6, 1500, 64), &Device::Cpu)?;
    let unfused = || -> candle_core::Result<Tensor> {
        let s = (q.matmul(&k.t()?)? * 0.125)?;
        candle_nn::ops::softmax_last_dim(&s)?.matmul(&v)
    };
    let fused = || stepaudio_live::ops::cpu::fused_attention(&q, &k, &v, 0.125).map(|o| o.unwrap());
    println!(
        "attention 6×1500²×64: unfused {:?}, fused {:?}",
        best(reps, unfused),
        best(reps, fused)
    );
    let x = Tensor::randn(0f32, 1., (1, 1500, 1536), &Device::Cpu)?;
    println!(
        "gelu 1500×1536: candle {:?}, fast {:?}",
        best(reps, || x.gelu_erf()),
        best(reps, || stepaudio_live::ops::cpu::gelu_erf(&x))
    );
    let h = Tensor::randn(0f32, 1., (1, 1500, 384), &Device::Cpu)?;
    let b = &m.encoder.blocks[0];
    println!(
        "fc1 1500×384→1536 {:?}, qkv 1500×384→1152 {:?}",
        best(reps, || b.fc1.forward(&h)),
        best(reps, || b.qkv.forward(&h))
    );
    let wt = b.fc1.weight.t()?.contiguous()?;
    println!(
        "fc1 with contiguous Wᵀ {:?}, with Wᵀ view {:?}",
        best(reps, || h.broadcast_matmul(&wt)),
        best(reps, || h.broadcast_matmul(&b.fc1.weight.t()?))
    );
    let h2 = h.squeeze(0)?;
    println!(
        "fc1 2-D, Wᵀ view {:?}, contiguous {:?}",
        best(reps, || h2.matmul(&b.fc1.weight.t()?)),
        best(reps, || h2.matmul(&wt))
    );
    let mel_l = stepaudio_live::frontend::LogMel {
        n_mels: 80,
        n_frames: 3000,
        data: mel.flatten_all()?.to_vec1()?,
    };
    println!("whole encoder {:?}", best(3, || m.encode(&mel_l)));
    Ok(())
}
