use candle_core::{DType, Device, Tensor};
use std::time::Instant;
fn main() -> anyhow::Result<()> {
    let dir = stepaudio_live::model::hub::resolve_model("tiny.en")?;
    let m = stepaudio_live::model::whisper::load::load_whisper(&dir, &Device::Cpu, DType::F32)?;
    let mel = Tensor::randn(0f32, 1., (1, 80, 3000), &Device::Cpu)?;
    for _ in 0..3 {
        let t = Instant::now();
        let x = m.encoder.conv1.forward(&mel)?.gelu_erf()?;
        let t1 = t.elapsed();
        let x = m.encoder.conv2.forward(&x)?.gelu_erf()?;
        let t2 = t.elapsed();
        let x = x.transpose(1, 2)?.broadcast_add(&m.encoder.positions)?;
        let b = &m.encoder.blocks[0];
        let t3 = Instant::now();
        let h = b.attn_ln.forward(&x)?;
        let t4 = t3.elapsed();
        let qkv = b.qkv.forward(&h)?;
        let t5 = t3.elapsed();
        let d = 384;
        let q =
            stepaudio_live::model::layers::split_heads(&qkv.narrow(2, 0, d)?, 6)?.contiguous()?;
        let k =
            stepaudio_live::model::layers::split_heads(&qkv.narrow(2, d, d)?, 6)?.contiguous()?;
        let v = stepaudio_live::model::layers::split_heads(&qkv.narrow(2, 2 * d, d)?, 6)?;
        let t6 = t3.elapsed();
        let s = q.matmul(&k.t()?)?;
        let t7 = t3.elapsed();
        let p = candle_nn::ops::softmax_last_dim(&s)?;
        let t8 = t3.elapsed();
        let tf = Instant::now();
        let _p2 = stepaudio_live::model::cpu_ops::softmax_last_dim(&s)?;
        let fast_softmax = tf.elapsed();
        let tf = Instant::now();
        let _g1 = s.gelu_erf()?;
        let slow_gelu = tf.elapsed();
        let tf = Instant::now();
        let _g2 = stepaudio_live::model::cpu_ops::gelu_erf(&s)?;
        let fast_gelu = tf.elapsed();
        let kt = k.t()?.contiguous()?;
        let tf = Instant::now();
        let _s2 = q.matmul(&kt)?;
        let qk_contig = tf.elapsed();
        println!("fast softmax {fast_softmax:?}, gelu candle {slow_gelu:?} fast {fast_gelu:?} (on 13.5M), qk with contiguous kT {qk_contig:?}");
        let a = p.matmul(&v.contiguous()?)?;
        let t9 = t3.elapsed();
        let f = b.fc1.forward(&h)?.gelu_erf()?;
        let t10 = t3.elapsed();
        let _ = b.fc2.forward(&f)?;
        let t11 = t3.elapsed();
        println!("conv1 {:?} conv2 {:?} ln {:?} qkv {:?} split {:?} qk {:?} softmax {:?} pv {:?} fc1+gelu {:?} fc2 {:?}", t1, t2 - t1, t4, t5 - t4, t6 - t5, t7 - t6, t8 - t7, t9 - t8, t10 - t9, t11 - t10);
        let _ = a;
    }
    Ok(())
}
