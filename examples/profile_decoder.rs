use candle_core::{DType, Device, Tensor};
use std::time::Instant;
fn main() -> anyhow::Result<()> {
    let dir = stepaudio_live::fetch::resolve("tiny.en")?;
    let m = stepaudio_live::model::whisper::load::load_whisper(&dir, &Device::Cpu, DType::F32)?;
    let enc = Tensor::randn(0f32, 1., (1, 1500, 384), &Device::Cpu)?;
    let cross = m.cross_attention(&enc)?;
    let prompt = [50257u32, 50362];
    let mut state = m.decoder.new_state();
    let h = m.decoder.forward_hidden(&prompt, &mut state, &cross)?;
    let n = 50;
    let t = Instant::now();
    let mut hs = h.clone();
    for i in 0..n {
        hs = m.decoder.forward_hidden(&[400 + i], &mut state, &cross)?;
    }
    let step = t.elapsed() / n;
    let t = Instant::now();
    for _ in 0..n {
        let _ = m
            .decoder
            .logits(&hs, &[0])?
            .flatten_all()?
            .to_vec1::<f32>()?;
    }
    let logits = t.elapsed() / n;
    let row = m
        .decoder
        .logits(&hs, &[0])?
        .flatten_all()?
        .to_vec1::<f32>()?;
    let t = Instant::now();
    for _ in 0..n {
        let mut r = row.clone();
        m.apply_logit_rules(
            &mut r,
            &[],
            &stepaudio_live::model::whisper::decoding::DecodingOptions {
                timestamps: true,
                ..Default::default()
            },
        );
    }
    let rules = t.elapsed() / n;
    let emb_t = m.decoder.token_embedding.t()?.contiguous()?;
    let h2 = hs.squeeze(0)?;
    let t = Instant::now();
    for _ in 0..n {
        let _ = h2.matmul(&emb_t)?;
    }
    let contig = t.elapsed() / n;
    println!("decoder step (hidden) {step:?}, logits {logits:?} (with contiguous Eᵀ {contig:?}), logit rules {rules:?}");
    Ok(())
}
