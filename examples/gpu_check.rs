//! Correctness checks of the GPU fast paths, meant to run on the device next to the
//! benchmark (it needs a GPU; CI has none and runs the CPU tests instead).
//!
//! `--kernels`: each fast path against the plain candle path on the same device, on
//! fresh random (or real audio) inputs: device log-mel vs the CPU frontend (and both vs
//! an f64 DFT), flash attention vs f32 attention on upcast inputs (encoder shape with a
//! padding mask, odd sizes, GQA prefill with a causal offset over a cache view), the
//! batched step's and prefill's attention kernels (tiled, tensor-core tiles, grouped and
//! per row) vs f32 attention, and the fused decode step (graph and direct launches) vs
//! candle ops on a real-width LLM, teacher-forced so every step compares the same inputs.
//!
//! `--parity --ckpt DIR --reference FILE`: issue 5's full-shape check. DIR and FILE come
//! from `scripts/reference/step_audio2_gpu_parity.py` (random weights at the real
//! config, PyTorch reference outputs in bf16 on the same GPU). Compares mel, encoder,
//! adapter, prompt ids, prefill logits and the logits of every teacher-forced decode
//! step (fused step and candle step), and the greedy tokens.
//!
//! Prints PASS/FAIL lines and a summary; `--json FILE` writes the numbers.

use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, IndexOp, Tensor};
use clap::Parser;
use serde_json::json;
use std::path::PathBuf;
use stepaudio_live::cli::DeviceArg;
use stepaudio_live::device::select_device;
use stepaudio_live::frontend::{
    mel_filterbank, LogMel, MelExtractor, HOP_LENGTH, N_FFT, N_FREQ, SAMPLE_RATE,
    STEP_AUDIO_TAIL_PADDING,
};
use stepaudio_live::model::step_audio2::config::StepAudio2Config;
use stepaudio_live::model::step_audio2::llm::{argmax, LlmState, Qwen2Llm};
use stepaudio_live::model::step_audio2::load::{load_step_audio2, random_weights};
use stepaudio_live::model::step_audio2::prompt::SystemPrompt;
use stepaudio_live::ops::fast::{self, FastPaths, FusedBatchDecoder, FusedDecoder, RowsKernel};

#[derive(Parser, Debug)]
struct Args {
    #[arg(long)]
    kernels: bool,
    #[arg(long)]
    parity: bool,
    #[arg(long)]
    ckpt: Option<PathBuf>,
    #[arg(long)]
    reference: Option<PathBuf>,
    /// Real audio for the mel check.
    #[arg(long = "wav")]
    wavs: Vec<PathBuf>,
    /// LLM layers of the real-width model of the decode check.
    #[arg(long, default_value_t = 4)]
    decode_layers: usize,
    #[arg(long, default_value_t = 16)]
    steps: usize,
    #[arg(long, value_enum, default_value_t = DeviceArg::Cuda)]
    device: DeviceArg,
    #[arg(long)]
    json: Option<PathBuf>,
}

struct Report {
    lines: Vec<(String, bool, String)>,
    json: serde_json::Map<String, serde_json::Value>,
}

impl Report {
    fn check(&mut self, name: &str, ok: bool, detail: String) {
        println!("{} {name}: {detail}", if ok { "PASS" } else { "FAIL" });
        self.lines.push((name.to_string(), ok, detail));
    }
}

/// ‖a − b‖ / ‖b‖ and max |a − b| (f32, any shape); NaN anywhere gives NaN.
fn rel_err(a: &Tensor, b: &Tensor) -> Result<(f64, f64)> {
    let a = a.to_dtype(DType::F32)?.flatten_all()?;
    let b = b.to_dtype(DType::F32)?.flatten_all()?;
    let d = (&a - &b)?;
    let num = d.sqr()?.sum_all()?.to_scalar::<f32>()? as f64;
    let den = b.sqr()?.sum_all()?.to_scalar::<f32>()? as f64;
    let max = d.abs()?.max(0)?.to_scalar::<f32>()? as f64;
    let nan = a
        .ne(&a)?
        .to_dtype(DType::F32)?
        .sum_all()?
        .to_scalar::<f32>()?;
    if nan > 0.0 {
        return Ok((f64::NAN, f64::NAN));
    }
    Ok(((num / den.max(1e-30)).sqrt(), max))
}

fn main() -> Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_writer(std::io::stderr)
        .init();
    let args = Args::parse();
    let device = select_device(args.device.into())?;
    if !fast::available(&device) {
        bail!("no GPU fast paths on {device:?} in this build");
    }
    let mut rep = Report {
        lines: vec![],
        json: serde_json::Map::new(),
    };
    if args.kernels {
        check_mel(&args, &device, &mut rep)?;
        check_attention(&device, &mut rep)?;
        check_decode(&args, &device, &mut rep)?;
    }
    if args.parity {
        parity(&args, &device, &mut rep)?;
    }
    let failed = rep.lines.iter().filter(|l| !l.1).count();
    println!(
        "\n{} checks, {} failed{}",
        rep.lines.len(),
        failed,
        if failed == 0 {
            ""
        } else {
            " ← see FAIL lines"
        }
    );
    if let Some(p) = &args.json {
        let checks: Vec<_> = rep
            .lines
            .iter()
            .map(|(n, ok, d)| json!({"name": n, "pass": ok, "detail": d}))
            .collect();
        rep.json.insert("checks".into(), json!(checks));
        std::fs::write(p, serde_json::to_string_pretty(&rep.json)?)?;
    }
    Ok(())
}

// ------------------------------------------------------------------------------------
// log-mel
// ------------------------------------------------------------------------------------

/// Step-Audio log-mel in f64 by a direct DFT (an independent reference for both).
fn mel_f64(audio: &[f32], n_mels: usize) -> Vec<f64> {
    let mut x: Vec<f64> = audio.iter().map(|&v| v as f64).collect();
    x.extend(std::iter::repeat_n(0.0, STEP_AUDIO_TAIL_PADDING));
    let len = x.len() as isize;
    let n_frames = x.len() / HOP_LENGTH;
    let fb = mel_filterbank(n_mels);
    let win: Vec<f64> = (0..N_FFT)
        .map(|n| 0.5 - 0.5 * (2.0 * std::f64::consts::PI * n as f64 / N_FFT as f64).cos())
        .collect();
    let mut out = vec![0f64; n_mels * n_frames];
    let mut power = vec![0f64; N_FREQ];
    for t in 0..n_frames {
        let start = (t * HOP_LENGTH) as isize - (N_FFT / 2) as isize;
        let frame: Vec<f64> = (0..N_FFT)
            .map(|i| {
                let mut j = start + i as isize;
                let period = 2 * (len - 1);
                j = j.rem_euclid(period);
                if j >= len {
                    j = period - j;
                }
                x[j as usize] * win[i]
            })
            .collect();
        for (k, p) in power.iter_mut().enumerate() {
            let (mut re, mut im) = (0.0, 0.0);
            for (n, &v) in frame.iter().enumerate() {
                let ph = 2.0 * std::f64::consts::PI * ((k * n) % N_FFT) as f64 / N_FFT as f64;
                re += v * ph.cos();
                im -= v * ph.sin();
            }
            *p = re * re + im * im;
        }
        for m in 0..n_mels {
            let s: f64 = (0..N_FREQ)
                .map(|k| fb[m * N_FREQ + k] as f64 * power[k])
                .sum();
            out[m * n_frames + t] = s.max(1e-10).log10();
        }
    }
    let max = out.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    out.iter()
        .map(|&v| (v.max(max - 8.0) + 4.0) / 4.0)
        .collect()
}

fn check_mel(args: &Args, device: &Device, rep: &mut Report) -> Result<()> {
    let n_mels = 128;
    let dm = fast::DeviceMel::new(
        &stepaudio_live::frontend::mel_filterbank(n_mels),
        n_mels,
        device,
    )?
    .context("no device mel")?;
    let cpu = MelExtractor::new(n_mels);
    let mut inputs: Vec<(String, Vec<f32>)> = Vec::new();
    for w in &args.wavs {
        let a = stepaudio_live::audio::wav::read_wav_16k_mono(w)?;
        inputs.push((
            w.file_name().unwrap_or_default().to_string_lossy().into(),
            a,
        ));
    }
    // 15 s of noise plus a tone, fresh each run (never zeros)
    let seed = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)?
        .as_nanos() as u64;
    let mut s = seed | 1;
    let noise: Vec<f32> = (0..15 * SAMPLE_RATE)
        .map(|i| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            let u = (s >> 40) as f32 / (1u64 << 24) as f32 - 0.5;
            0.1 * u + 0.3 * (i as f32 * 0.05).sin()
        })
        .collect();
    inputs.push(("random 15 s".into(), noise));
    let mut worst: f64 = 0.0;
    for (i, (name, audio)) in inputs.iter().enumerate() {
        let g = dm.compute(audio, STEP_AUDIO_TAIL_PADDING)?;
        let c: LogMel = cpu.step_audio(audio);
        let ct = Tensor::from_vec(c.data.clone(), (c.n_mels, c.n_frames), device)?;
        if g.dims() != ct.dims() {
            rep.check(
                &format!("mel {name} shape"),
                false,
                format!("{:?} vs {:?}", g.dims(), ct.dims()),
            );
            continue;
        }
        let (_, max_gc) = rel_err(&g, &ct)?;
        let mut detail = format!("max |gpu − cpu| = {max_gc:.2e} over {} frames", c.n_frames);
        if i == 0 {
            let r = mel_f64(audio, n_mels);
            let r = Tensor::from_vec(
                r.iter().map(|&v| v as f32).collect::<Vec<_>>(),
                (c.n_mels, c.n_frames),
                device,
            )?;
            let (_, max_gr) = rel_err(&g, &r)?;
            let (_, max_cr) = rel_err(&ct, &r)?;
            detail += &format!("; vs f64 DFT: gpu {max_gr:.2e}, cpu {max_cr:.2e}");
            rep.json
                .insert(format!("mel_{name}_gpu_vs_f64"), json!(max_gr));
            rep.json
                .insert(format!("mel_{name}_cpu_vs_f64"), json!(max_cr));
        }
        rep.json
            .insert(format!("mel_{name}_gpu_vs_cpu"), json!(max_gc));
        worst = worst.max(max_gc);
        rep.check(&format!("mel {name}"), max_gc <= 1e-4, detail);
    }
    rep.json.insert("mel_worst_gpu_vs_cpu".into(), json!(worst));
    Ok(())
}

// ------------------------------------------------------------------------------------
// flash attention
// ------------------------------------------------------------------------------------

fn attention_ref(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    scale: f64,
    causal: bool,
    bias: Option<&Tensor>,
) -> Result<Tensor> {
    let (b, h, nq, hd) = q.dims4()?;
    let (_, hkv, nk, _) = k.dims4()?;
    let rep = h / hkv;
    let up = |t: &Tensor| -> Result<Tensor> {
        Ok(t.to_dtype(DType::F32)?
            .unsqueeze(2)?
            .expand((b, hkv, rep, nk, hd))?
            .reshape((b, h, nk, hd))?)
    };
    let q = q.to_dtype(DType::F32)?.contiguous()?;
    let (k, v) = (up(k)?, up(v)?);
    let mut s = (q.matmul(&k.t()?)? * scale)?;
    if causal {
        let off = nk - nq;
        let m: Vec<f32> = (0..nq)
            .flat_map(|i| (0..nk).map(move |j| if j > i + off { f32::NEG_INFINITY } else { 0.0 }))
            .collect();
        s = s.broadcast_add(&Tensor::from_vec(m, (nq, nk), q.device())?)?;
    }
    if let Some(bias) = bias {
        s = s.broadcast_add(&bias.reshape((b, 1, 1, nk))?)?;
    }
    let p = candle_nn::ops::softmax_last_dim(&s)?;
    Ok(p.matmul(&v)?.transpose(1, 2)?.contiguous()?)
}

fn check_attention(device: &Device, rep: &mut Report) -> Result<()> {
    fast::set_tf32(false);
    fast::set_fast_paths(FastPaths::ALL);
    let rnd = |shape: &[usize]| -> Result<Tensor> {
        Ok(Tensor::randn(0f32, 1.0, shape, device)?.to_dtype(DType::BF16)?)
    };
    // (name, b, h, hkv, nq, nk, hd, causal, masked tail keys per batch entry, as views of a fused qkv)
    type Case<'a> = (
        &'a str,
        usize,
        usize,
        usize,
        usize,
        usize,
        usize,
        bool,
        &'a [usize],
        bool,
    );
    let cases: &[Case] = &[
        (
            "encoder 30 s (2×20 heads, 1500, hd 64, key mask)",
            2,
            20,
            20,
            1500,
            1500,
            64,
            false,
            &[1, 100],
            true,
        ),
        (
            "odd sizes (77 × 77, hd 64)",
            1,
            4,
            4,
            77,
            77,
            64,
            false,
            &[1],
            true,
        ),
        (
            "GQA prefill (28/4 heads, 130 new after 20 cached, hd 128, causal)",
            1,
            28,
            4,
            130,
            150,
            128,
            true,
            &[],
            false,
        ),
        (
            "GQA prefill, 1 batch 3 (28/4, 64 after 0, causal)",
            3,
            28,
            4,
            64,
            64,
            128,
            true,
            &[],
            false,
        ),
    ];
    for variant in ["2stage", "1stage", "w8"] {
        fast::set_flash_variant(variant)?;
        for &(name, b, h, hkv, nq, nk, hd, causal, masked, fused_qkv) in cases {
            if variant != "2stage" && hd != 64 {
                continue;
            }
            let name = &format!("{name} [{variant}]");
            let (q, k, v) = if fused_qkv {
                let qkv = rnd(&[b, nq, 3, h, hd])?;
                let view = |i: usize| -> Result<Tensor> {
                    Ok(qkv.narrow(2, i, 1)?.squeeze(2)?.transpose(1, 2)?)
                };
                (view(0)?, view(1)?, view(2)?)
            } else {
                let q = rnd(&[b, h, nq, hd])?;
                // k/v: views of a larger cache buffer, as the LLM passes them
                let kc = rnd(&[b, hkv, nk + 37, hd])?;
                let vc = rnd(&[b, hkv, nk + 37, hd])?;
                (q, kc.narrow(2, 0, nk)?, vc.narrow(2, 0, nk)?)
            };
            let bias = if masked.is_empty() {
                None
            } else {
                let data: Vec<f32> = (0..b)
                    .flat_map(|i| {
                        (0..nk).map(move |j| {
                            if j + masked[i % masked.len()] >= nk {
                                -1e10
                            } else {
                                0.0
                            }
                        })
                    })
                    .collect();
                Some(Tensor::from_vec(data, (b, nk), device)?)
            };
            let scale = (hd as f64).powf(-0.5);
            let out = fast::attention(&q, &k, &v, scale as f32, causal, bias.as_ref())?
                .context("flash attention did not apply")?;
            let r = attention_ref(&q, &k, &v, scale, causal, bias.as_ref())?;
            let (rel, max) = rel_err(&out, &r)?;
            rep.json
                .insert(format!("flash {name}"), json!({"rel": rel, "max_abs": max}));
            rep.check(
                &format!("flash {name}"),
                rel < 1e-2,
                format!("rel {rel:.2e}, max abs {max:.2e}"),
            );
        }
    }
    fast::set_flash_variant("default")?;
    check_rows_attention(device, rep)?;
    check_linear(device, rep)
}

/// The batched decode step's and prefill's attention kernels (tiled on f32 lanes or on
/// tensor cores, grouped by kv head, and one block per query head and row) against
/// attention in f32 (candle ops over the same bf16 keys, values and queries), row by
/// row: streams whose rows are a prefill's (many consecutive positions, causal within
/// the stream) or a step's (one row at a long position), 28 query heads over 4 kv heads
/// of 128 dims. Bound 5e-3 (the output is rounded once to bf16, 2^-9 relative).
fn check_rows_attention(device: &Device, rep: &mut Report) -> Result<()> {
    let (nh, nkv, hd) = (28usize, 4usize, 128usize);
    // (cached positions before, rows)
    let streams = [(200usize, 40usize), (700, 1), (0, 13), (37, 1), (63, 70)];
    let rnd = |shape: &[usize]| -> Result<Tensor> {
        Ok(Tensor::randn(0f32, 1.0, shape, device)?.to_dtype(DType::BF16)?)
    };
    let mut caches = Vec::new();
    let mut rows = Vec::new();
    for (i, &(past, n)) in streams.iter().enumerate() {
        let cap = past + n + 5;
        caches.push((rnd(&[nkv, cap, hd])?, rnd(&[nkv, cap, hd])?));
        rows.extend((past..past + n).map(|p| (i, p)));
    }
    let q = rnd(&[rows.len(), nh, hd])?;
    let scale = (hd as f64).powf(-0.5);
    let mut want = Vec::with_capacity(rows.len());
    for (r, &(i, pos)) in rows.iter().enumerate() {
        let (k, v) = &caches[i];
        let upto = |t: &Tensor| -> Result<Tensor> { Ok(t.narrow(1, 0, pos + 1)?.unsqueeze(0)?) };
        let qr = q.i(r)?.reshape((1, nh, 1, hd))?;
        want.push(attention_ref(&qr, &upto(k)?, &upto(v)?, scale, false, None)?.reshape(nh * hd)?);
    }
    let want = Tensor::stack(&want, 0)?;
    for (label, kernel) in [
        ("tiled", RowsKernel::Tiled),
        ("per row", RowsKernel::PerRow),
        ("grouped", RowsKernel::Grouped),
        ("tensor cores", RowsKernel::Mma),
    ] {
        let got = fast::rows_attention(&q, &rows, &caches, kernel)?
            .context("no batched attention on this device")?;
        let (rel, max) = rel_err(&got, &want)?;
        rep.json.insert(
            format!("batched attention {label}"),
            json!({"rel": rel, "max_abs": max, "rows": rows.len(), "streams": streams}),
        );
        rep.check(
            &format!(
                "batched attention, {label}, vs f32 ({} rows of {} streams, 28/4 heads, hd 128)",
                rows.len(),
                streams.len()
            ),
            rel < 5e-3 && rel.is_finite(),
            format!("rel {rel:.2e}, max abs {max:.2e}"),
        );
    }
    Ok(())
}

/// The encoder's GEMM through cuBLAS and its fused epilogues against candle ops, and a
/// whole real-width 2-block encoder with every fast path against none.
fn check_linear(device: &Device, rep: &mut Report) -> Result<()> {
    let rnd = |shape: &[usize], s: f32| -> Result<Tensor> {
        Ok((Tensor::randn(0f32, 1.0, shape, device)? * s as f64)?.to_dtype(DType::BF16)?)
    };
    let x = rnd(&[1, 1500, 1280], 1.0)?;
    let w = rnd(&[5120, 1280], 0.03)?;
    let bias = rnd(&[5120], 0.1)?;
    let want = x.broadcast_matmul(&w.t()?)?;
    let got = fast::matmul_t(&x, &w)?.context("direct GEMM did not apply")?;
    let (rel, _) = rel_err(&got, &want)?;
    rep.check(
        "cuBLAS GEMM (1500×1280 · 1280×5120) vs candle matmul",
        rel < 1e-2,
        format!("rel {rel:.2e}"),
    );
    let want_g = want.broadcast_add(&bias)?.gelu_erf()?;
    let got_g = fast::bias_gelu(&want.copy()?, &bias)?.context("bias_gelu did not apply")?;
    let (rel, max) = rel_err(&got_g, &want_g)?;
    rep.check(
        "bias + GELU kernel vs candle ops",
        rel < 1e-2,
        format!("rel {rel:.2e}, max abs {max:.2e}"),
    );
    let want_b = want.broadcast_add(&bias)?;
    let got_b = fast::bias_add(&want.copy()?, &bias)?.context("bias_add did not apply")?;
    let (rel, max) = rel_err(&got_b, &want_b)?;
    rep.check(
        "bias add kernel vs candle broadcast_add",
        rel == 0.0,
        format!("rel {rel:.2e}, max abs {max:.2e}"),
    );
    let resid = rnd(&[1, 1500, 5120], 1.0)?;
    let want_r = (&resid + want.broadcast_add(&bias)?)?;
    let got_r =
        fast::bias_residual(&want, &bias, &resid)?.context("bias_residual did not apply")?;
    let (rel, max) = rel_err(&got_r, &want_r)?;
    rep.check(
        "bias + residual kernel vs candle ops",
        rel < 1e-2 && max <= 0.0625,
        format!("rel {rel:.2e}, max abs {max:.2e}"),
    );
    let xs = rnd(&[1, 1500, 1280], 1.0)?;
    let g = (rnd(&[1280], 0.1)?.to_dtype(DType::F32)? + 1.0)?.to_dtype(DType::BF16)?;
    let be = rnd(&[1280], 0.1)?;
    let want_ln = candle_nn::ops::layer_norm(&xs, &g, &be, 1e-5)?;
    let got_ln = fast::layer_norm(&xs, &g, &be, 1e-5)?.context("layer_norm did not apply")?;
    let (rel, max) = rel_err(&got_ln, &want_ln)?;
    rep.check(
        "LayerNorm kernel vs candle layer_norm",
        rel < 1e-2,
        format!("rel {rel:.2e}, max abs {max:.2e}"),
    );
    let y = rnd(&[1, 1500, 1280], 1.0)?;
    let b1 = rnd(&[1280], 0.1)?;
    let want_x = (&xs + y.broadcast_add(&b1)?)?;
    let want_h = candle_nn::ops::layer_norm(&want_x, &g, &be, 1e-5)?;
    let (got_x, got_h) = fast::bias_residual_layer_norm(&y, &b1, &xs, &g, &be, 1e-5)?
        .context("fused LN did not apply")?;
    let (rx, _) = rel_err(&got_x, &want_x)?;
    let (rh, mh) = rel_err(&got_h, &want_h)?;
    rep.check(
        "bias + residual + LayerNorm kernel vs candle ops",
        rx == 0.0 && rh < 1e-2,
        format!("residual rel {rx:.2e}, normed rel {rh:.2e} (max abs {mh:.2e})"),
    );
    // whole encoder, 2 blocks at the real width, all fast paths vs none
    let mut cfg = StepAudio2Config::mini();
    cfg.encoder.n_layer = 2;
    cfg.text.num_layers = 1;
    cfg.text.vocab_size = 1024;
    let model = random_weights(&cfg, device, DType::BF16, 11)?;
    let mel = (Tensor::randn(0f32, 0.5, (1, 128, 1001), device)?).to_dtype(DType::BF16)?;
    fast::set_fast_paths(FastPaths::NONE);
    let a = model.encoder.forward(&mel, &[1001])?.out;
    fast::set_fast_paths(FastPaths::ALL);
    let b = model.encoder.forward(&mel, &[1001])?.out;
    let (rel, _) = rel_err(&b, &a)?;
    rep.check(
        "encoder (2 real-width blocks, odd length 1001): fast paths vs candle ops",
        rel < 1e-2,
        format!("rel {rel:.2e}"),
    );
    Ok(())
}

// ------------------------------------------------------------------------------------
// fused decode step
// ------------------------------------------------------------------------------------

/// Teacher-forced steps: `tokens[s]` goes in at step s; returns each step's logits.
fn forced_steps(
    llm: &Qwen2Llm,
    prompt: &Tensor,
    tokens: &[u32],
    mode: FastPaths,
) -> Result<(Vec<Tensor>, Vec<u32>)> {
    fast::set_fast_paths(mode);
    let mut state: LlmState = llm.new_state(prompt.dim(1)? + tokens.len() + 8);
    let h = llm.forward(prompt, &mut state)?;
    let mut logits = vec![llm.logits_last(&h)?.to_dtype(DType::F32)?];
    let mut argmaxes = vec![argmax(&logits[0])?];
    let mut fd = FusedDecoder::default();
    let mut fused = fd.prepare(&llm.decode_weights())?;
    if mode.decode && fused.is_none() {
        bail!("fused decode did not apply");
    }
    for &t in tokens {
        match fused.as_mut() {
            Some(f) => {
                f.start(t, state.len())?;
                let next = f.step(&mut state)?;
                logits.push(f.logits()?);
                argmaxes.push(next);
            }
            None => {
                let h = llm.forward(&llm.embed(&[t])?.unsqueeze(0)?, &mut state)?;
                let l = llm.logits_last(&h)?.to_dtype(DType::F32)?;
                argmaxes.push(argmax(&l)?);
                logits.push(l);
            }
        }
    }
    Ok((logits, argmaxes))
}

fn check_decode(args: &Args, device: &Device, rep: &mut Report) -> Result<()> {
    let mut cfg = StepAudio2Config::mini();
    cfg.text.num_layers = args.decode_layers;
    cfg.encoder.n_layer = 1;
    let model = random_weights(&cfg, device, DType::BF16, 7)?;
    let llm = &model.llm;
    let n_prompt = 57;
    let ids: Vec<u32> = (0..n_prompt)
        .map(|i| (i * 2654435761u64 % 150000) as u32)
        .collect();
    let prompt = llm.embed(&ids)?.unsqueeze(0)?;
    let tokens: Vec<u32> = (0..args.steps)
        .map(|i| (i as u64 * 40503 % 150000) as u32 + 7)
        .collect();
    let (ref_l, ref_a) = forced_steps(
        llm,
        &prompt,
        &tokens,
        FastPaths {
            decode: false,
            graph: false,
            ..FastPaths::ALL
        },
    )?;
    for (label, mode) in [
        (
            "fused decode, direct launches",
            FastPaths {
                graph: false,
                ..FastPaths::ALL
            },
        ),
        ("fused decode, CUDA graph", FastPaths::ALL),
    ] {
        let (l, a) = forced_steps(llm, &prompt, &tokens, mode)?;
        let mut worst: f64 = 0.0;
        for s in 1..l.len() {
            worst = worst.max(rel_err(&l[s], &ref_l[s])?.0);
        }
        let same = a.iter().zip(&ref_a).filter(|(x, y)| x == y).count();
        rep.json.insert(
            format!("decode {label}"),
            json!({"worst_rel": worst, "same_argmax": same, "steps": a.len()}),
        );
        rep.check(
            &format!(
                "{label} vs candle ops ({} layers, real widths, {} steps)",
                args.decode_layers,
                tokens.len()
            ),
            worst < 1e-2 && worst.is_finite(),
            format!(
                "worst logits rel {worst:.2e}; argmax equal at {same}/{} steps",
                a.len()
            ),
        );
    }
    // graph and direct launches run the same kernels: their logits must be identical
    let (l1, _) = forced_steps(
        llm,
        &prompt,
        &tokens,
        FastPaths {
            graph: false,
            ..FastPaths::ALL
        },
    )?;
    let (l2, _) = forced_steps(llm, &prompt, &tokens, FastPaths::ALL)?;
    let max = (1..l1.len())
        .map(|s| rel_err(&l1[s], &l2[s]).map(|e| e.1))
        .collect::<Result<Vec<_>>>()?;
    let m = max.iter().copied().fold(0.0, f64::max);
    rep.check(
        "graph replay = direct launches",
        m == 0.0,
        format!("max abs diff {m:e}"),
    );
    fast::set_fast_paths(FastPaths::ALL);
    check_decode_batch(args, llm, rep)?;
    check_prefill_batch(args, llm, rep)?;
    let sa = loop_model(args, device)?;
    check_turn_loop(args, &sa, rep)?;
    check_partial_reuse(args, &sa, rep)?;
    check_held_turn(args, &sa, rep)?;
    check_system_prompt_copy(&sa, rep)?;
    check_kv_pool(args, &sa, rep)
}

/// The batched fused prefill (every stream's new rows through the decode kernels as
/// one batch of rows): streams with different cached lengths, new rows from 1 to past
/// one slice (512 rows). Against the same tokens fed one step at a time through the
/// batched fused step (the same kernels but for the projections: cuBLAS GEMMs over all
/// rows instead of the batch-1 GEMV, so a bf16 rounding may differ by an ulp, 2^-8
/// relative): the logits of every row and the cached keys and values afterwards
/// (bound 1e-2). And against candle's `forward_batch` (bf16 ops rounded at other
/// places; bound 2e-2, 1.5e-2 seen with small random inputs).
fn check_prefill_batch(args: &Args, llm: &Qwen2Llm, rep: &mut Report) -> Result<()> {
    // (cached positions before, new rows)
    let shapes = [
        (31usize, 1usize),
        (90, 57),
        (7, 300),
        (200, 2),
        (60, 700),
        (500, 64),
    ];
    let ids = |i: usize, n: usize, salt: usize| -> Vec<u32> {
        (0..n)
            .map(|j| ((i * 977 + j + salt) as u64 * 2654435761 % 150000) as u32)
            .collect()
    };
    let prepare = || -> Result<Vec<LlmState>> {
        let mut states = Vec::new();
        for (i, &(past, n)) in shapes.iter().enumerate() {
            let mut st = llm.new_state(past + n + 8);
            llm.forward(&llm.embed(&ids(i, past, 0))?.unsqueeze(0)?, &mut st)?;
            states.push(st);
        }
        Ok(states)
    };
    let new_ids: Vec<Vec<u32>> = shapes
        .iter()
        .enumerate()
        .map(|(i, &(_, n))| ids(i, n, 50_000))
        .collect();
    let inputs = new_ids
        .iter()
        .map(|t| Ok(llm.embed(t)?.unsqueeze(0)?))
        .collect::<Result<Vec<_>>>()?;
    let mut bd = FusedBatchDecoder::default();
    let weights = llm.decode_weights();
    // the prefill
    let mut states = prepare()?;
    let got = bd
        .prepare(&weights)?
        .context("no batched fused decoder on this device")?
        .prefill(&inputs, &mut states.iter_mut().collect::<Vec<_>>())?
        .context("the prefill fast path is off")?;
    // the same prefill with other attention kernels: the f32 tiles (`mma` off), and
    // per row (`tiled` off too); the worst hidden-state error against the default
    let other = |paths: FastPaths| -> Result<f64> {
        fast::set_fast_paths(paths);
        let mut other_states = prepare()?;
        let other = FusedBatchDecoder::default()
            .prepare(&weights)?
            .context("no batched fused decoder on this device")?
            .prefill(&inputs, &mut other_states.iter_mut().collect::<Vec<_>>())?
            .context("the prefill fast path is off");
        fast::set_fast_paths(FastPaths::ALL);
        let mut worst = 0f64;
        for (a, b) in got.iter().zip(&other?) {
            worst = worst.max(rel_err(a, b)?.0);
        }
        Ok(worst)
    };
    let vs_lanes = other(FastPaths {
        mma: false,
        ..FastPaths::ALL
    })?;
    let vs_per_row = other(FastPaths {
        mma: false,
        tiled: false,
        ..FastPaths::ALL
    })?;
    // the same tokens one step at a time, each stream alone
    let mut stepped = prepare()?;
    let (mut vs_steps, mut vs_steps_kv, mut same, mut rows) = (0f64, 0f64, 0usize, 0usize);
    for (i, st) in stepped.iter_mut().enumerate() {
        let logits = llm.logits(&got[i])?.i(0)?.to_dtype(DType::F32)?;
        let mut f = bd.prepare(&weights)?.context("no batched fused decoder")?;
        for (j, &t) in new_ids[i].iter().enumerate() {
            let (next, _) = f.step(&[t], &mut [&mut *st])?[0];
            let want = f.logits()?.i(0)?;
            vs_steps = vs_steps.max(rel_err(&logits.i(j)?, &want)?.0);
            same += usize::from(argmax(&logits.i(j)?)? == next);
            rows += 1;
        }
    }
    // candle ops
    let mut ref_states = prepare()?;
    let want = llm.forward_batch(&inputs, &mut ref_states.iter_mut().collect::<Vec<_>>())?;
    let (mut vs_candle, mut vs_candle_kv) = (0f64, 0f64);
    let mut lengths_ok = true;
    for i in 0..shapes.len() {
        vs_candle = vs_candle.max(rel_err(&got[i], &want[i])?.0);
        lengths_ok &= states[i].len() == ref_states[i].len() && states[i].len() == stepped[i].len();
        for l in 0..llm.layers.len() {
            let (k, v) = states[i].layer(l)?.context("no cache")?;
            let (rk, rv) = ref_states[i].layer(l)?.context("no cache")?;
            let (sk, sv) = stepped[i].layer(l)?.context("no cache")?;
            vs_candle_kv = vs_candle_kv
                .max(rel_err(&k, &rk)?.0)
                .max(rel_err(&v, &rv)?.0);
            vs_steps_kv = vs_steps_kv
                .max(rel_err(&k, &sk)?.0)
                .max(rel_err(&v, &sv)?.0);
        }
    }
    rep.json.insert(
        "batched prefill".into(),
        json!({"shapes": shapes, "worst_rel_logits_vs_steps": vs_steps,
               "worst_rel_kv_vs_steps": vs_steps_kv, "same_argmax_as_steps": same, "rows": rows,
               "worst_rel_hidden_vs_candle": vs_candle, "worst_rel_kv_vs_candle": vs_candle_kv,
               "worst_rel_hidden_vs_per_row": vs_per_row,
               "worst_rel_hidden_vs_f32_tiles": vs_lanes}),
    );
    let label = format!(
        "({} layers, {} streams, 1..700 rows)",
        args.decode_layers,
        shapes.len()
    );
    rep.check(
        &format!("batched fused prefill vs the same tokens stepped one by one {label}"),
        lengths_ok && vs_steps < 1e-2 && vs_steps_kv < 1e-2 && vs_steps.is_finite(),
        format!(
            "worst logits rel {vs_steps:.2e}, cached K/V rel {vs_steps_kv:.2e}; argmax equal at \
             {same}/{rows} rows; lengths equal: {lengths_ok}"
        ),
    );
    rep.check(
        &format!("batched fused prefill, tensor-core tiles vs per row and vs f32 tiles {label}"),
        vs_per_row < 1e-2 && vs_lanes < 1e-2 && vs_per_row.is_finite() && vs_lanes.is_finite(),
        format!("worst hidden rel {vs_per_row:.2e} / {vs_lanes:.2e}"),
    );
    rep.check(
        &format!("batched fused prefill vs candle forward_batch {label}"),
        vs_candle < 2e-2 && vs_candle_kv < 2e-2 && vs_candle.is_finite(),
        format!("worst hidden rel {vs_candle:.2e}, cached K/V rel {vs_candle_kv:.2e} (bf16 paths)"),
    );
    Ok(())
}

/// The continuous batch on the device: turns of six sessions joining a running
/// [`TurnLoop`] between its steps (and one session's next turn after its
/// first is back; with switch `fold` the running turns' steps at those
/// admissions run inside their prefills) against the same turns decoded alone
/// (batch-1 fused step),
/// on a real-width random model with the fixture tokenizer. The logits of
/// every step up to the first differing id are compared (bf16: a near-tie may
/// flip an id, after which the turns decode different text).
/// Step-Audio 2 mini's shape with `--decode-layers` LLM layers and one encoder layer,
/// random bf16 weights, the tiny checkpoint's tokenizer.
fn loop_model(
    args: &Args,
    device: &Device,
) -> Result<stepaudio_live::model::step_audio2::StepAudio2> {
    use stepaudio_live::model::step_audio2::prompt::StepTokenizer;
    let mut cfg = StepAudio2Config::mini();
    cfg.text.num_layers = args.decode_layers;
    cfg.encoder.n_layer = 1;
    let model = random_weights(&cfg, device, DType::BF16, 13)?;
    let rel = "tests/fixtures/step_audio2/tiny_ckpt/tokenizer.json";
    let built = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(rel);
    let tokenizer = StepTokenizer::load(if built.exists() {
        &built
    } else {
        std::path::Path::new(rel)
    })?;
    Ok(stepaudio_live::model::step_audio2::StepAudio2::new(
        model, tokenizer,
    )?)
}

/// Ids equal up to the first difference, and the worst logits relative error up to
/// and including the step that chose it.
fn agreement(
    out: &stepaudio_live::model::step_audio2::TurnOutput,
    reference: &stepaudio_live::model::step_audio2::TurnOutput,
) -> Result<(usize, f64)> {
    let same = out
        .generated
        .iter()
        .zip(&reference.generated)
        .take_while(|(a, b)| a == b)
        .count();
    let mut worst = 0f64;
    for (a, b) in out
        .step_logits
        .iter()
        .zip(&reference.step_logits)
        .take(same + 1)
    {
        worst = worst.max(rel_err(a, b)?.0);
    }
    Ok((same, worst))
}

fn check_turn_loop(
    args: &Args,
    sa: &stepaudio_live::model::step_audio2::StepAudio2,
    rep: &mut Report,
) -> Result<()> {
    use stepaudio_live::model::step_audio2::{
        Session, SessionOptions, TurnLoop, TurnOptions, TurnOutput, TurnRequest,
    };
    let sessions = || -> Result<Vec<Session>> {
        (0..6)
            .map(|_| Ok(sa.session(SessionOptions::default())?))
            .collect()
    };
    let (mut looped, mut alone) = (sessions()?, sessions()?);
    // (session, audio rows, commit, budget, the step it joins at)
    let plan = [
        (0, 40, true, 20, 0),
        (1, 75, false, 32, 0),
        (2, 12, true, 16, 2),
        (3, 60, false, 24, 5),
        (4, 30, true, 28, 5),
        (5, 90, false, 12, 9),
        (0, 50, false, 20, 21),
    ];
    let audio: Vec<[Tensor; 1]> = plan
        .iter()
        .map(|p| Ok([random_audio_rows(sa, p.1)?]))
        .collect::<Result<_>>()?;
    let turn_opts: Vec<TurnOptions> = plan
        .iter()
        .map(|p| TurnOptions {
            record_logits: true,
            ..TurnOptions::new(p.3)
        })
        .collect();
    let mut outs: Vec<Option<TurnOutput>> = plan.iter().map(|_| None).collect();
    let mut batch = TurnLoop::new(sa);
    let (mut step, mut joined) = (0, 0);
    while joined < plan.len() || !batch.is_idle() {
        let mut keys = Vec::new();
        let mut requests = Vec::new();
        let mut free: Vec<Option<&mut Session>> = looped.iter_mut().map(Some).collect();
        while joined < plan.len() && plan[joined].4 <= step {
            let p = plan[joined];
            let busy = (0..joined).any(|k| plan[k].0 == p.0 && outs[k].is_none());
            let Some(session) = free[p.0].take().filter(|_| !busy) else {
                break;
            };
            keys.push(joined as u64);
            requests.push(TurnRequest {
                session,
                audio: &audio[joined],
                prefix: &[],
                commit: p.2,
                opts: &turn_opts[joined],
            });
            joined += 1;
        }
        drop(free);
        for r in batch.admit(sa, &keys, &mut requests) {
            r?;
        }
        drop(requests);
        for key in batch.step(sa) {
            let k = key as usize;
            let out = batch
                .finish(key, &mut looped[plan[k].0])
                .context("ended turn")??;
            outs[k] = Some(out);
        }
        step += 1;
        if step > 10_000 {
            bail!("the turn loop never ended");
        }
    }
    let folded = batch.steps_in_admissions();
    let fold = stepaudio_live::ops::fast::fast_paths().fold;
    let (mut worst, mut agreed, mut total, mut identical, mut peak) = (0f64, 0, 0, 0, 0);
    for (k, p) in plan.iter().enumerate() {
        let s = &mut alone[p.0];
        let reference = if p.2 {
            s.decode_final(sa, &audio[k], &[], &turn_opts[k])?
        } else {
            s.decode_partial(sa, &audio[k], &[], &turn_opts[k])?
        };
        let out = outs[k].as_ref().context("every turn ended")?;
        peak = peak.max(out.peak_batch);
        let (same, rel) = agreement(out, &reference)?;
        identical += usize::from(out.generated == reference.generated);
        agreed += same;
        total += reference.generated.len().max(1);
        worst = worst.max(rel);
    }
    rep.json.insert(
        "turn loop".into(),
        json!({"worst_rel_logits": worst, "ids_agreeing": agreed, "ids": total,
               "turns_identical": identical, "turns": plan.len(), "widest_step": peak,
               "steps_in_admissions": folded}),
    );
    rep.check(
        &format!(
            "continuous batch (turns joining a running loop) vs each turn alone ({} layers, real widths)",
            args.decode_layers
        ),
        worst < 1e-2 && worst.is_finite() && peak >= 4 && (folded > 0 || !fold),
        format!(
            "worst logits rel {worst:.2e}; {identical}/{} turns identical, ids equal up to the \
             first difference {agreed}/{total}; widest step {peak} turns; {folded} steps inside \
             admissions",
            plan.len()
        ),
    );
    Ok(())
}

/// `n` random adapter rows at the LLM's width (bf16), as one audio piece's.
fn random_audio_rows(
    sa: &stepaudio_live::model::step_audio2::StepAudio2,
    n: usize,
) -> Result<Tensor> {
    let (device, hidden) = (&sa.model.device, sa.model.config.text.hidden_size);
    Ok(Tensor::randn(0f32, 0.02, (n, hidden), device)?.to_dtype(DType::BF16)?)
}

/// A partial that reuses the start of its prompt as the partial before it left it in
/// the cache (`TurnOptions::keep` / `reuse`: the fused prefill then starts at the kept
/// position) against the same turn prefilled whole in a fresh session.
fn check_partial_reuse(
    args: &Args,
    sa: &stepaudio_live::model::step_audio2::StepAudio2,
    rep: &mut Report,
) -> Result<()> {
    use stepaudio_live::model::step_audio2::{SessionOptions, TurnOptions};
    let rows = |n: usize| random_audio_rows(sa, n);
    let (first, kept) = (rows(60)?, 48);
    let second = Tensor::cat(&[first.narrow(0, 0, kept)?, rows(30)?], 0)?;
    let patch_start = sa.tokenizer.human_audio_turn(&[0]).patch_runs[0].0;
    let opts = |keep, reuse| TurnOptions {
        record_logits: true,
        keep,
        reuse,
        ..TurnOptions::new(16)
    };
    let mut reusing = sa.session(SessionOptions::default())?;
    let mut whole = sa.session(SessionOptions::default())?;
    reusing.decode_partial(sa, &[first], &[], &opts(patch_start + kept, 0))?;
    let a = reusing.decode_partial(
        sa,
        std::slice::from_ref(&second),
        &[],
        &opts(0, patch_start + kept),
    )?;
    let b = whole.decode_partial(sa, &[second], &[], &opts(0, 0))?;
    let (same, worst) = agreement(&a, &b)?;
    rep.json.insert(
        "partial reuse".into(),
        json!({"reused": a.reused, "worst_rel_logits": worst, "ids_agreeing": same,
               "ids": b.generated.len()}),
    );
    rep.check(
        &format!(
            "a partial reusing its cached prompt start vs prefilled whole ({} layers, real widths)",
            args.decode_layers
        ),
        a.reused == patch_start + kept && worst < 1e-2 && worst.is_finite(),
        format!(
            "{} prompt tokens reused; worst logits rel {worst:.2e}; ids equal up to the first \
             difference {same}/{}",
            a.reused,
            b.generated.len()
        ),
    );
    Ok(())
}

/// A pause decode held in the cache and then committed as it is
/// ([`TurnOptions::hold`], [`Session::commit_held`]) against the same turn
/// decoded as a final: the next turn over either committed context must
/// choose the same ids from the same logits (the same kernels ran).
fn check_held_turn(
    args: &Args,
    sa: &stepaudio_live::model::step_audio2::StepAudio2,
    rep: &mut Report,
) -> Result<()> {
    use stepaudio_live::model::step_audio2::{SessionOptions, TurnOptions};
    let rows = |n: usize| random_audio_rows(sa, n);
    let (segment, next) = (rows(60)?, rows(30)?);
    let plain = TurnOptions {
        record_logits: true,
        ..TurnOptions::new(16)
    };
    let hold = TurnOptions {
        hold: true,
        ..plain.clone()
    };
    let mut held = sa.session(SessionOptions::default())?;
    let mut decoded = sa.session(SessionOptions::default())?;
    held.decode_partial(sa, std::slice::from_ref(&segment), &[], &hold)?;
    let committed = held.commit_held();
    decoded.decode_final(sa, &[segment], &[], &plain)?;
    let a = held.decode_partial(sa, std::slice::from_ref(&next), &[], &plain)?;
    let b = decoded.decode_partial(sa, &[next], &[], &plain)?;
    let (same, worst) = agreement(&a, &b)?;
    let lengths = (held.committed_len(), decoded.committed_len());
    rep.json.insert(
        "held pause decode".into(),
        json!({"committed": committed, "committed_lengths": [lengths.0, lengths.1],
               "worst_rel_logits": worst, "ids_agreeing": same, "ids": b.generated.len()}),
    );
    rep.check(
        &format!(
            "a pause decode held, then committed vs decoded as the final ({} layers, real widths)",
            args.decode_layers
        ),
        committed && lengths.0 == lengths.1 && worst < 1e-2 && worst.is_finite(),
        format!(
            "committed context {} vs {} tokens; next turn: worst logits rel {worst:.2e}, ids \
             equal up to the first difference {same}/{}",
            lengths.0,
            lengths.1,
            b.generated.len()
        ),
    );
    Ok(())
}

/// A session opened with a system prompt an earlier session prefilled copies that
/// session's cache instead: its keys and values must be the prefilled ones bit for bit.
fn check_system_prompt_copy(
    sa: &stepaudio_live::model::step_audio2::StepAudio2,
    rep: &mut Report,
) -> Result<()> {
    use stepaudio_live::model::step_audio2::SessionOptions;
    let opts = SessionOptions {
        system_prompt: SystemPrompt::Custom("Transcribe the speech, checked on the GPU.".into()),
        ..Default::default()
    };
    let before = sa.system_prompt_copies();
    let prefilled = sa.session(opts.clone())?;
    let copied = sa.session(opts)?;
    let copies = sa.system_prompt_copies() - before;
    let mut worst = 0f32;
    for l in 0..prefilled.state().num_layers() {
        let (pk, pv) = prefilled.state().layer(l)?.context("prefilled layer")?;
        let (ck, cv) = copied.state().layer(l)?.context("copied layer")?;
        for (x, y) in [(&pk, &ck), (&pv, &cv)] {
            let d = (x.to_dtype(DType::F32)? - y.to_dtype(DType::F32)?)?
                .abs()?
                .max_all()?
                .to_scalar::<f32>()?;
            worst = worst.max(d);
        }
    }
    let len = prefilled.state().len();
    rep.check(
        "a session copying a cached system prompt vs one prefilling it",
        copies == 1 && worst == 0.0 && copied.state().len() == len,
        format!("{copies} copy, {len} positions, max abs diff {worst:e}"),
    );
    Ok(())
}

/// Sessions whose KV caches are slots of one pool against sessions with buffers of
/// their own: the same turns batched (partials, finals, then partials over the committed
/// context) through the batched fused prefill and step. The kernels read both through
/// the same per-row pointers, so logits and ids must be bit-identical.
fn check_kv_pool(
    args: &Args,
    sa: &stepaudio_live::model::step_audio2::StepAudio2,
    rep: &mut Report,
) -> Result<()> {
    use stepaudio_live::model::step_audio2::{Session, SessionOptions, TurnOptions, TurnRequest};
    let streams = 6;
    let make = || -> Result<Vec<Session>> {
        (0..streams)
            .map(|_| Ok(sa.session(SessionOptions::default())?))
            .collect()
    };
    sa.plan_kv_slots(streams);
    let mut pooled = make()?;
    sa.plan_kv_slots(0);
    let mut own = make()?;
    let in_slots = pooled
        .iter()
        .filter(|s| s.state().fixed_positions().is_some())
        .count();
    let own_bufs = own
        .iter()
        .filter(|s| s.state().fixed_positions().is_none())
        .count();
    let opts: Vec<TurnOptions> = (0..streams)
        .map(|i| TurnOptions {
            record_logits: true,
            ..TurnOptions::new(8 + 4 * i)
        })
        .collect();
    let (mut worst, mut turns, mut identical) = (0f64, 0, 0);
    for (round, commit) in [false, true, false].into_iter().enumerate() {
        let audio: Vec<[Tensor; 1]> = (0..streams)
            .map(|i| {
                let n = 20 + 17 * i + 5 * round;
                Ok([random_audio_rows(sa, n)?])
            })
            .collect::<Result<_>>()?;
        let run = |sessions: &mut [Session]| {
            let mut requests: Vec<TurnRequest<'_>> = sessions
                .iter_mut()
                .zip(&audio)
                .zip(&opts)
                .map(|((session, audio), opts)| TurnRequest {
                    session,
                    audio,
                    prefix: &[],
                    commit,
                    opts,
                })
                .collect();
            Session::run_turns(sa, &mut requests)
        };
        for (a, b) in run(&mut pooled).into_iter().zip(run(&mut own)) {
            let (a, b) = (a?, b?);
            let (_, rel) = agreement(&a, &b)?;
            worst = worst.max(rel);
            identical += usize::from(a.generated == b.generated);
            turns += 1;
        }
    }
    let pool = sa.kv_pool().context("the pooled sessions made a pool")?;
    let (slots, free_before) = (pool.slots(), pool.free_slots());
    drop(pooled);
    let free_after = pool.free_slots();
    rep.json.insert(
        "kv pool".into(),
        json!({"sessions_in_slots": in_slots, "own_buffers": own_bufs, "turns": turns,
               "turns_identical": identical, "worst_rel_logits": worst,
               "slot_positions": pool.shape().positions, "pool_mib": pool.bytes() >> 20,
               "free_slots_before_after_close": [free_before, free_after]}),
    );
    rep.check(
        &format!(
            "sessions in KV pool slots vs own buffers, batched ({} layers, real widths)",
            args.decode_layers
        ),
        in_slots == streams
            && own_bufs == streams
            && worst == 0.0
            && identical == turns
            && free_after == slots,
        format!(
            "{in_slots} sessions in slots of {} positions; {identical}/{turns} turns identical, \
             worst logits rel {worst:e}; free slots {free_before} -> {free_after} of {slots} \
             after closing",
            pool.shape().positions
        ),
    );
    Ok(())
}

/// Per stream, per step: logits, and the fused steps' argmaxes.
type StreamSteps = (Vec<Vec<Tensor>>, Vec<Vec<u32>>);

/// How a stream's teacher-forced steps are run in [`forced_streams`].
#[derive(Clone, Copy, PartialEq)]
enum StepMode {
    /// Each stream alone through candle ops.
    Candle,
    /// Each stream alone through the batch-1 fused step.
    Fused1,
    /// All streams together through the batched fused step (its attention tiled or
    /// per row).
    Batched { graph: bool, tiled: bool },
}

/// Streams with their own prompts (prefilled alone, the same way in every mode) and
/// their own forced tokens (`tokens[i][s]` goes in at stream i's step s; streams with
/// fewer tokens leave the batch early). Returns each stream's per-step logits and the
/// fused steps' argmaxes (empty for candle ops).
fn forced_streams(
    llm: &Qwen2Llm,
    prompts: &[Tensor],
    tokens: &[Vec<u32>],
    mode: StepMode,
) -> Result<StreamSteps> {
    fast::set_fast_paths(FastPaths::ALL);
    let mut states = Vec::new();
    for (p, t) in prompts.iter().zip(tokens) {
        let mut st: LlmState = llm.new_state(p.dim(1)? + t.len() + 8);
        llm.forward(p, &mut st)?;
        states.push(st);
    }
    let n = prompts.len();
    let mut logits: Vec<Vec<Tensor>> = vec![vec![]; n];
    let mut picks: Vec<Vec<u32>> = vec![vec![]; n];
    match mode {
        StepMode::Candle | StepMode::Fused1 => {
            fast::set_fast_paths(FastPaths {
                decode: mode == StepMode::Fused1,
                ..FastPaths::ALL
            });
            for i in 0..n {
                let mut fd = FusedDecoder::default();
                let mut fused = fd.prepare(&llm.decode_weights())?;
                for &t in &tokens[i] {
                    match fused.as_mut() {
                        Some(f) => {
                            f.start(t, states[i].len())?;
                            picks[i].push(f.step(&mut states[i])?);
                            logits[i].push(f.logits()?);
                        }
                        None => {
                            let h = llm.forward(&llm.embed(&[t])?.unsqueeze(0)?, &mut states[i])?;
                            logits[i].push(llm.logits_last(&h)?.to_dtype(DType::F32)?);
                        }
                    }
                }
            }
        }
        StepMode::Batched { graph, tiled } => {
            fast::set_fast_paths(FastPaths {
                graph,
                tiled,
                grouped: tiled,
                ..FastPaths::ALL
            });
            let mut bd = FusedBatchDecoder::default();
            let mut f = bd
                .prepare(&llm.decode_weights())?
                .context("batched fused decode did not apply")?;
            let steps = tokens.iter().map(Vec::len).max().unwrap_or(0);
            for s in 0..steps {
                let rows: Vec<usize> = (0..n).filter(|&i| tokens[i].len() > s).collect();
                let ids: Vec<u32> = rows.iter().map(|&i| tokens[i][s]).collect();
                let mut st: Vec<&mut LlmState> = states
                    .iter_mut()
                    .enumerate()
                    .filter(|(i, _)| tokens[*i].len() > s)
                    .map(|(_, st)| st)
                    .collect();
                let out = f.step(&ids, &mut st)?;
                let l = f.logits()?;
                for (row, (&i, (next, _))) in rows.iter().zip(out).enumerate() {
                    picks[i].push(next);
                    logits[i].push(l.get(row)?);
                }
            }
        }
    }
    fast::set_fast_paths(FastPaths::ALL);
    Ok((logits, picks))
}

/// The batched fused step against each stream alone (candle ops, and the batch-1 fused
/// step), for batches of 1, 5 and 33 streams (one, a cuBLAS GEMM with padding rows,
/// several buckets as streams leave), with different prompt lengths and forced tokens.
fn check_decode_batch(args: &Args, llm: &Qwen2Llm, rep: &mut Report) -> Result<()> {
    for streams in [1usize, 5, 33] {
        let mut prompts = Vec::new();
        let mut tokens = Vec::new();
        for i in 0..streams {
            let n_prompt = 9 + (i * 37) % 300;
            let ids: Vec<u32> = (0..n_prompt)
                .map(|j| ((i * 1000 + j) as u64 * 2654435761 % 150000) as u32)
                .collect();
            prompts.push(llm.embed(&ids)?.unsqueeze(0)?);
            // streams leave at different steps: the batch shrinks through the buckets
            let steps = args.steps - (i % 4) * args.steps / 5;
            tokens.push(
                (0..steps)
                    .map(|s| ((i * 7919 + s) as u64 * 40503 % 150000) as u32 + 7)
                    .collect::<Vec<u32>>(),
            );
        }
        let (cand, _) = forced_streams(llm, &prompts, &tokens, StepMode::Candle)?;
        let (one, one_a) = forced_streams(llm, &prompts, &tokens, StepMode::Fused1)?;
        let batched = |graph, tiled| {
            forced_streams(llm, &prompts, &tokens, StepMode::Batched { graph, tiled })
        };
        let (bat, bat_a) = batched(true, true)?;
        let (dir, _) = batched(false, true)?;
        // The step's attention grouped by kv head, against the per-row kernel.
        let (per_row, _) = batched(true, false)?;
        let (mut vs_candle, mut vs_one, mut vs_direct, mut vs_per_row) = (0f64, 0f64, 0f64, 0f64);
        let (mut same, mut total) = (0usize, 0usize);
        for i in 0..streams {
            for s in 0..tokens[i].len() {
                vs_candle = vs_candle.max(rel_err(&bat[i][s], &cand[i][s])?.0);
                vs_one = vs_one.max(rel_err(&bat[i][s], &one[i][s])?.0);
                vs_direct = vs_direct.max(rel_err(&bat[i][s], &dir[i][s])?.1);
                vs_per_row = vs_per_row.max(rel_err(&bat[i][s], &per_row[i][s])?.0);
                same += usize::from(bat_a[i][s] == one_a[i][s]);
                total += 1;
            }
        }
        rep.json.insert(
            format!("batched decode {streams} streams"),
            json!({"worst_rel_vs_candle": vs_candle, "worst_rel_vs_fused1": vs_one,
                   "graph_vs_direct_max_abs": vs_direct, "same_argmax_as_fused1": same,
                   "worst_rel_grouped_vs_per_row": vs_per_row, "steps": total}),
        );
        // The same kernels but for the attention's f32 sums in another order, each
        // head's output rounded once to bf16 in both (grouped from a bucket of 8 rows).
        if streams > 4 {
            rep.check(
                &format!("batched step, grouped attention vs per row ({streams} streams)"),
                vs_per_row < 1e-2 && vs_per_row.is_finite(),
                format!("worst logits rel {vs_per_row:.2e}"),
            );
        }
        rep.check(
            &format!(
                "batched fused decode, {streams} streams, vs each alone ({} layers, real widths)",
                args.decode_layers
            ),
            vs_candle < 1e-2 && vs_one < 1e-2 && vs_candle.is_finite() && vs_one.is_finite(),
            format!(
                "worst logits rel vs candle ops {vs_candle:.2e}, vs batch-1 fused {vs_one:.2e}; \
                 argmax = batch-1 fused at {same}/{total} steps"
            ),
        );
        rep.check(
            &format!("batched graph replay = direct launches ({streams} streams)"),
            vs_direct == 0.0,
            format!("max abs diff {vs_direct:e}"),
        );
    }
    Ok(())
}

// ------------------------------------------------------------------------------------
// issue 5: parity with the PyTorch reference at the real shape
// ------------------------------------------------------------------------------------

fn parity(args: &Args, device: &Device, rep: &mut Report) -> Result<()> {
    let ckpt = args.ckpt.as_ref().context("--parity needs --ckpt")?;
    let refp = args
        .reference
        .as_ref()
        .context("--parity needs --reference")?;
    fast::set_fast_paths(FastPaths::ALL);
    let t = std::time::Instant::now();
    let sa = load_step_audio2(ckpt, device, DType::BF16)?;
    device.synchronize()?;
    println!(
        "loaded {} in {:.1} s",
        ckpt.display(),
        t.elapsed().as_secs_f64()
    );
    let r = candle_core::safetensors::load(refp, &Device::Cpu)?;
    let llm = &sa.model.llm;
    let mut ci = 0;
    while let Some(audio) = r.get(&format!("clip{ci}_audio")) {
        let p = |n: &str| -> Result<Tensor> {
            r.get(&format!("clip{ci}_{n}"))
                .cloned()
                .with_context(|| format!("clip{ci}_{n} missing"))
        };
        let audio: Vec<f32> = audio.to_vec1()?;
        let ref_mel = p("mel")?;
        // mel: CPU frontend and device kernel vs torch.stft
        let cpu_mel = sa.mel.step_audio(&audio);
        let cpu_t = Tensor::from_vec(
            cpu_mel.data.clone(),
            (cpu_mel.n_mels, cpu_mel.n_frames),
            &Device::Cpu,
        )?;
        let (_, m1) = rel_err(&cpu_t, &ref_mel)?;
        let dm = sa.device_mel.as_ref().context("no device mel")?;
        let gpu_mel = dm.compute(&audio, STEP_AUDIO_TAIL_PADDING)?;
        let (_, m2) = rel_err(&gpu_mel.to_device(&Device::Cpu)?, &ref_mel)?;
        rep.check(
            &format!("parity clip{ci} mel"),
            m1 <= 1e-4 && m2 <= 1e-4,
            format!("max |cpu − torch| {m1:.2e}, max |gpu − torch| {m2:.2e}"),
        );
        // encoder + adapter on the reference mel (bf16 like the reference's input)
        let f32_or = |n: &str| r.get(&format!("clip{ci}_f32_{n}")).cloned();
        let x = ref_mel
            .to_device(device)?
            .to_dtype(DType::BF16)?
            .unsqueeze(0)?;
        let enc = sa.model.encoder.forward(&x, &[ref_mel.dim(1)?])?;
        let (rows, _) = sa.model.adapter.kept_rows(&enc)?;
        for (what, mine) in [
            ("encoder_out", enc.out.i(0)?),
            ("adapter_out", rows[0].clone()),
        ] {
            let (rel_t, _) = rel_err(&mine, &p(what)?.to_device(device)?)?;
            let mut detail = format!("rel vs torch bf16 {rel_t:.2e}");
            let mut ok = rel_t <= 1e-2;
            if let Some(f) = f32_or(what) {
                let f = f.to_device(device)?;
                let (rel_f, _) = rel_err(&mine, &f)?;
                let (rel_tf, _) = rel_err(&p(what)?.to_device(device)?, &f)?;
                detail += &format!("; vs f32: Rust bf16 {rel_f:.2e}, torch bf16 {rel_tf:.2e}");
                ok = ok || rel_f <= 1.25 * rel_tf;
                rep.json.insert(format!("parity clip{ci} {what}"), json!({"rel_torch_bf16": rel_t, "rel_f32": rel_f, "torch_bf16_rel_f32": rel_tf}));
            }
            rep.check(&format!("parity clip{ci} {what}"), ok, detail);
        }
        // prompt ids
        let prompt = sa
            .tokenizer
            .asr_prompt(SystemPrompt::Chinese.text(), &[rows[0].dim(0)?])?;
        let ref_ids: Vec<u32> = p("prompt_ids")?
            .to_vec1::<i64>()?
            .iter()
            .map(|&x| x as u32)
            .collect();
        rep.check(
            &format!("parity clip{ci} prompt ids"),
            prompt.ids == ref_ids,
            format!("{} ids", ref_ids.len()),
        );
        // LLM: prefill + teacher-forced steps with the reference's greedy tokens, (a) on
        // the reference's own adapter rows (the LLM alone), (b) on ours (whole pipeline)
        let ref_tokens: Vec<u32> = p("greedy_tokens")?
            .to_vec1::<i64>()?
            .iter()
            .map(|&x| x as u32)
            .collect();
        let ref_logits = p("step_logits")?.to_device(device)?;
        let f32_logits = f32_or("step_logits")
            .map(|t| t.to_device(device))
            .transpose()?;
        let gaps: Vec<f32> = p("rel_gaps")?.to_vec1()?;
        let ref_rows = p("adapter_out")?.to_device(device)?.to_dtype(DType::BF16)?;
        let torch_vs_f32 = match &f32_logits {
            Some(f) => (0..ref_tokens.len())
                .map(|s| rel_err(&ref_logits.i(s)?, &f.i(s)?).map(|e| e.0))
                .collect::<Result<Vec<_>>>()?,
            None => vec![],
        };
        let forced = &ref_tokens[..ref_tokens.len() - 1];
        for (label, mode) in [
            ("fused decode", FastPaths::ALL),
            ("candle ops", FastPaths::NONE),
        ] {
            for (input, rows_in) in [("LLM alone", &ref_rows), ("whole pipeline", &rows[0])] {
                let embeds = sa
                    .model
                    .embed_prompt(&prompt, std::slice::from_ref(rows_in))?
                    .unsqueeze(0)?;
                let (logits, am) = forced_steps(llm, &embeds, forced, mode)?;
                let mut rels = Vec::new();
                let mut rels_f32 = Vec::new();
                for (s, l) in logits.iter().enumerate() {
                    rels.push(rel_err(l, &ref_logits.i(s)?)?.0);
                    if let Some(f) = &f32_logits {
                        rels_f32.push(rel_err(l, &f.i(s)?)?.0);
                    }
                }
                let worst = rels.iter().copied().fold(0.0, f64::max);
                let worst_f = rels_f32.iter().copied().fold(0.0, f64::max);
                let worst_tf = torch_vs_f32.iter().copied().fold(0.0, f64::max);
                let same = am
                    .iter()
                    .zip(&ref_tokens)
                    .take_while(|(a, b)| a == b)
                    .count();
                let all_same = am.iter().zip(&ref_tokens).filter(|(a, b)| a == b).count();
                rep.json.insert(format!("parity clip{ci} {label} {input}"), json!({
                    "logits_rel_torch_bf16": rels, "logits_rel_f32": rels_f32, "torch_bf16_rel_f32": torch_vs_f32,
                    "argmax": am, "reference_tokens": ref_tokens, "reference_rel_gaps": gaps,
                    "same_prefix": same, "same_total": all_same}));
                let mut detail = format!(
                    "worst rel vs torch bf16 over prefill + {} steps {worst:.2e}",
                    forced.len()
                );
                if !rels_f32.is_empty() {
                    detail += &format!(
                        "; vs f32 reference: Rust {worst_f:.2e}, torch bf16 {worst_tf:.2e}"
                    );
                }
                rep.check(
                    &format!("parity clip{ci} logits, {input} ({label})"),
                    worst <= 1e-2,
                    detail,
                );
                if !rels_f32.is_empty() {
                    rep.check(&format!("parity clip{ci} logits vs f32, {input} ({label}): Rust bf16 within 1.25x of torch bf16"),
                              worst_f <= 1.25 * worst_tf, format!("{worst_f:.2e} vs {worst_tf:.2e}"));
                }
                rep.check(
                    &format!("parity clip{ci} greedy tokens, {input} ({label})"),
                    same >= 4.min(ref_tokens.len()),
                    format!("first {same} of {} equal ({all_same} in all); reference top1−top2 gaps/std {:?}",
                            ref_tokens.len(), gaps.iter().map(|g| (g * 1000.0).round() / 1000.0).collect::<Vec<_>>()),
                );
            }
        }
        // free decoding through the session API (what the daemon runs)
        let mut session = sa.session(stepaudio_live::model::step_audio2::SessionOptions {
            system_prompt: SystemPrompt::Chinese,
            max_new_tokens: ref_tokens.len(),
            ..Default::default()
        })?;
        let out = session.decode_partial(
            &sa,
            &rows,
            &[],
            &stepaudio_live::model::step_audio2::TurnOptions {
                stop_at_eot: false,
                ..stepaudio_live::model::step_audio2::TurnOptions::new(ref_tokens.len())
            },
        )?;
        let same = out
            .generated
            .iter()
            .zip(&ref_tokens)
            .take_while(|(a, b)| a == b)
            .count();
        rep.check(
            &format!("parity clip{ci} session greedy"),
            same >= 4.min(ref_tokens.len()),
            format!("{:?} vs reference {:?}", out.generated, ref_tokens),
        );
        ci += 1;
    }
    if ci == 0 {
        bail!("{}: no clips", refp.display());
    }
    Ok(())
}
