//! End-to-end offline benchmark.
//!
//! Whisper (real weights): model load, log-mel, encoder, decoder and real-time factor
//! for one WAV, repeated; prints min/median/max.
//!
//! ```text
//! cargo run --release --example benchmark_e2e -- [--model tiny.en] [--runs 5] [--device cuda] FILE.wav
//! ```
//!
//! Step-Audio 2 mini (`--arch step-audio-2-mini --random-weights`): the real shape with
//! random weights (no checkpoint is needed to time it), a breakdown per clip — log-mel,
//! encoder, adapter, prefill, ms per decoded token, end to end and RTF — plus the
//! 30 s encoder, the 15 s log-mel and peak device memory. With `--fast compare` the
//! plain candle path and the fused GPU paths run one after the other on the same warm
//! device, so the before/after numbers share a card.
//!
//! ```text
//! cargo run --release --features cuda --example benchmark_e2e -- \
//!     --arch step-audio-2-mini --random-weights --device cuda --fast compare
//! ```
//! Clips: `--wav A.wav` (repeatable); `A.wav+B.wav` concatenates, `@5.62` cuts to
//! that many seconds. Default: the 7.1 s English LibriVox clip and the 4.2 s AISHELL-1
//! clip twice, cut to 5.62 s (`assets/` has no single 5.62 s Chinese clip). Relative
//! paths are looked up in `STEPAUDIO_LIVE_SPEECH_DIR` (default `assets/`).

use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, Tensor};
use clap::Parser;
use serde_json::json;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};
use stepaudio_live::audio::wav::read_wav_16k_mono;
use stepaudio_live::cli::{ComputeDType, DeviceArg};
use stepaudio_live::device::{default_dtype, select_device};
use stepaudio_live::fetch::resolve as resolve_model;
use stepaudio_live::frontend::{LogMel, MelExtractor, SAMPLE_RATE, STEP_AUDIO_TAIL_PADDING};
use stepaudio_live::model::step_audio2::config::StepAudio2Config;
use stepaudio_live::model::step_audio2::load::random_weights;
use stepaudio_live::model::step_audio2::prompt::{StepTokenizer, SystemPrompt};
use stepaudio_live::model::step_audio2::{SessionOptions, StepAudio2, TurnOptions};
use stepaudio_live::model::whisper::load::load_whisper_for_inference;
use stepaudio_live::model::whisper::DecoderWeights;
use stepaudio_live::ops::fast::{self, FastPaths};
use stepaudio_live::transcribe::{transcribe_whisper, TranscribeOptions};

#[derive(Parser, Debug)]
#[command(about = "End-to-end ASR benchmark (Whisper with real weights, Step-Audio 2 mini)")]
struct Args {
    /// `whisper` or `step-audio-2-mini`.
    #[arg(long, default_value = "whisper")]
    arch: String,
    /// Whisper model name or directory.
    #[arg(long, default_value = "tiny.en")]
    model: String,
    /// Step-Audio 2: random weights at the real configuration.
    #[arg(long)]
    random_weights: bool,
    /// Step-Audio 2: fewer LLM / encoder layers (smoke tests on small devices).
    #[arg(long)]
    llm_layers: Option<usize>,
    #[arg(long)]
    encoder_layers: Option<usize>,
    #[arg(long)]
    vocab_size: Option<usize>,
    /// Timed runs per measurement (after one warm-up).
    #[arg(long, default_value_t = 5)]
    runs: usize,
    #[arg(long, value_enum, default_value_t = DeviceArg::Auto)]
    device: DeviceArg,
    /// f32, f16 or bf16 (Step-Audio 2; default bf16 on a GPU, f32 on the CPU).
    #[arg(long, value_enum)]
    dtype: Option<ComputeDType>,
    /// Greedy steps per clip (Step-Audio 2; EOT does not stop them: random weights).
    #[arg(long, default_value_t = 32)]
    tokens: usize,
    /// Fast paths: `all`, `none`, a list (`mel,attention,decode,graph`), or `compare`
    /// (none, then all, on the same device).
    #[arg(long, default_value = "all")]
    fast: String,
    /// Allow TF32 for f32 matrix products on CUDA.
    #[arg(long)]
    tf32: bool,
    /// Write every number as JSON here.
    #[arg(long)]
    json: Option<PathBuf>,
    /// Clips (see the module docs); Whisper takes the first.
    #[arg(long = "wav")]
    wavs: Vec<String>,
    /// Whisper: the clip as a positional argument, as before.
    file: Option<String>,
}

fn speech_dir() -> PathBuf {
    std::env::var_os("STEPAUDIO_LIVE_SPEECH_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("assets"))
}

/// `a.wav+b.wav@5.62`: concatenated, cut to 5.62 s.
fn load_clip(spec: &str) -> Result<(String, Vec<f32>)> {
    let (files, cut) = match spec.rsplit_once('@') {
        Some((f, s)) => (f, Some(s.parse::<f64>().context("clip length after @")?)),
        None => (spec, None),
    };
    let mut audio = Vec::new();
    for f in files.split('+') {
        let p = Path::new(f);
        let p = if p.exists() {
            p.to_path_buf()
        } else {
            speech_dir().join(f)
        };
        audio.extend(read_wav_16k_mono(&p).with_context(|| format!("reading {}", p.display()))?);
    }
    if let Some(s) = cut {
        audio.truncate((s * SAMPLE_RATE as f64).round() as usize);
    }
    Ok((spec.to_string(), audio))
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn stats(mut v: Vec<f64>) -> (f64, f64, f64) {
    v.sort_by(f64::total_cmp);
    (v[0], v[v.len() / 2], v[v.len() - 1])
}

/// Median wall time of `f` over `runs` (after one warm-up), device synchronised.
fn time_it(device: &Device, runs: usize, mut f: impl FnMut() -> Result<()>) -> Result<f64> {
    f()?;
    device.synchronize()?;
    let mut v = Vec::with_capacity(runs);
    for _ in 0..runs {
        let t = Instant::now();
        f()?;
        device.synchronize()?;
        v.push(ms(t.elapsed()));
    }
    Ok(median(v))
}

fn main() -> Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_writer(std::io::stderr)
        .init();
    let args = Args::parse();
    fast::set_tf32(args.tf32);
    match args.arch.as_str() {
        "whisper" => whisper(&args),
        "step-audio-2-mini" | "step-audio-2" => step_audio2(&args),
        other => bail!("unknown --arch {other} (whisper, step-audio-2-mini)"),
    }
}

fn whisper(args: &Args) -> Result<()> {
    let spec = args
        .file
        .clone()
        .or_else(|| args.wavs.first().cloned())
        .unwrap_or_else(|| "en_jfk_ask_not.wav".into());
    let (file, audio) = load_clip(&spec)?;
    let seconds = audio.len() as f64 / SAMPLE_RATE as f64;
    let device = select_device(args.device.into())?;
    let dir = resolve_model(&args.model)?;
    let t = Instant::now();
    let weights = if std::env::var_os("BENCH_F32_DECODER").is_some() {
        DecoderWeights::F32
    } else {
        DecoderWeights::Int8
    };
    let model = load_whisper_for_inference(&dir, &device, DType::F32, weights)?;
    let load = t.elapsed();
    let opts = TranscribeOptions::default();
    let _ = transcribe_whisper(&model, &audio, &opts)?; // warm-up
    let (mut total, mut mel, mut enc, mut dec, mut per_tok) =
        (vec![], vec![], vec![], vec![], vec![]);
    let mut text = String::new();
    let mut tokens = 0;
    for _ in 0..args.runs.max(1) {
        let t = Instant::now();
        let tr = transcribe_whisper(&model, &audio, &opts)?;
        total.push(ms(t.elapsed()));
        mel.push(ms(tr.timings.mel));
        enc.push(ms(tr.timings.encoder));
        dec.push(ms(tr.timings.decoder));
        per_tok.push(ms(tr.timings.decoder) / tr.timings.tokens.max(1) as f64);
        tokens = tr.timings.tokens;
        text = tr.text();
    }
    println!(
        "file {file} ({seconds:.2} s), model {} on {device:?}, load {:.1} ms",
        args.model,
        ms(load)
    );
    println!(
        "{:<22} {:>10} {:>10} {:>10}",
        "stage (ms)", "min", "median", "max"
    );
    let mut j = serde_json::Map::new();
    for (name, v) in [
        ("log-mel", mel),
        ("encoder", enc),
        ("decoder", dec),
        ("decoder per token", per_tok),
        ("total", total.clone()),
    ] {
        let (a, b, c) = stats(v);
        println!("{name:<22} {a:>10.2} {b:>10.2} {c:>10.2}");
        j.insert(name.replace(' ', "_"), json!(b));
    }
    let (_, med, _) = stats(total);
    println!(
        "RTF (median) {:.4}  ({:.1}x real time)",
        med / 1e3 / seconds,
        seconds / (med / 1e3)
    );
    println!("text: {text}");
    if let Some(p) = &args.json {
        let out = json!({
            "arch": "whisper", "model": args.model, "device": format!("{device:?}"),
            "clip": file, "seconds": seconds, "tokens": tokens, "median_ms": j,
            "rtf": med / 1e3 / seconds, "text": text,
            "peak_device_memory_bytes": fast::device_memory_used(&device),
        });
        std::fs::write(p, serde_json::to_string_pretty(&out)?)?;
    }
    Ok(())
}

struct MemWatch {
    device: Device,
    peak: usize,
}

impl MemWatch {
    fn sample(&mut self) {
        if let Some(u) = fast::device_memory_used(&self.device) {
            self.peak = self.peak.max(u);
        }
    }
}

fn step_audio2(args: &Args) -> Result<()> {
    if !args.random_weights {
        bail!("--arch step-audio-2-mini needs --random-weights (no checkpoint here)");
    }
    let device = select_device(args.device.into())?;
    let dtype = args
        .dtype
        .map_or_else(|| default_dtype(&device), ComputeDType::dtype);
    let mut mem = MemWatch {
        device: device.clone(),
        peak: 0,
    };
    let before_model = fast::device_memory_used(&device);
    let cfg =
        StepAudio2Config::mini().reshaped(args.encoder_layers, args.llm_layers, args.vocab_size);
    let tok_path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/step_audio2/tiny_ckpt/tokenizer.json");
    let tok_path = if tok_path.exists() {
        tok_path
    } else {
        PathBuf::from("tests/fixtures/step_audio2/tiny_ckpt/tokenizer.json")
    };
    let tokenizer = StepTokenizer::load(&tok_path)?;
    let t0 = Instant::now();
    let model = random_weights(&cfg, &device, dtype, 0)?;
    device.synchronize()?;
    let build_s = t0.elapsed().as_secs_f64();
    let sa = StepAudio2::new(model, tokenizer)?;
    mem.sample();
    let after_model = fast::device_memory_used(&device);
    let _ = (before_model, after_model);
    let weight_bytes = Some(sa.model.parameter_bytes());
    // from here on the pool's high-water mark measures the benchmark, weights included
    device.synchronize()?;
    let _ = fast::device_memory_peak(&device, true);
    eprintln!(
        "random weights ({dtype:?}) built in {build_s:.1} s; weights {} MiB",
        weight_bytes.map_or("?".into(), |b| (b >> 20).to_string())
    );

    let specs = if args.wavs.is_empty() {
        vec![
            "en_ps_librivox_0870.wav".to_string(),
            "zh_aishell1_BAC009S0764W0121.wav+zh_aishell1_BAC009S0764W0121.wav@5.62".to_string(),
        ]
    } else {
        args.wavs.clone()
    };
    let clips = specs
        .iter()
        .map(|s| load_clip(s))
        .collect::<Result<Vec<_>>>()?;
    let modes: Vec<(String, FastPaths)> = match args.fast.as_str() {
        "compare" => vec![
            ("candle ops".into(), FastPaths::NONE),
            ("fused GPU paths".into(), FastPaths::ALL),
        ],
        s => vec![(
            s.to_string(),
            FastPaths::parse(s).map_err(anyhow::Error::msg)?,
        )],
    };
    let mut report = Vec::new();
    for (label, flags) in &modes {
        fast::set_fast_paths(*flags);
        let mut m = serde_json::Map::new();
        m.insert("mode".into(), json!(label));
        m.insert("fast_paths".into(), json!(flags.to_string()));
        println!("\n## Step-Audio 2 mini, random weights, {device:?} {dtype:?}, fast paths: {flags} ({label})");
        let fixed = fixed_sizes(&sa, &device, args.runs, &mut mem)?;
        println!(
            "log-mel 15 s: {:.3} ms on the device ({:.3} ms with the upload; CPU: {:.3} ms) | encoder 30 s: {:.2} ms | prefill 400 tokens: {:.2} ms",
            fixed.mel15_device, fixed.mel15_upload, fixed.mel15_cpu, fixed.encoder30, fixed.prefill400
        );
        println!(
            "encoder 30 s by stage (ms, one block timed alone × {} blocks): {}",
            sa.model.encoder.blocks.len(),
            fixed
                .breakdown
                .iter()
                .map(|(n, v)| format!("{n} {v:.2}"))
                .collect::<Vec<_>>()
                .join(", ")
        );
        m.insert(
            "encoder30_breakdown_ms".into(),
            json!(fixed
                .breakdown
                .iter()
                .map(|(n, v)| json!([n, v]))
                .collect::<Vec<_>>()),
        );
        m.insert(
            "fixed".into(),
            json!({"mel15_device_ms": fixed.mel15_device, "mel15_with_upload_ms": fixed.mel15_upload,
                   "mel15_cpu_ms": fixed.mel15_cpu, "encoder30_ms": fixed.encoder30,
                   "prefill400_ms": fixed.prefill400}),
        );
        println!("| clip | s | mel | encoder | adapter | prefill sys | prefill turn | prefill whole | ms/token | tok/s | E2E (cached sys) | E2E one-shot | RTF |");
        println!("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|");
        let mut clips_j = Vec::new();
        for (name, audio) in &clips {
            let r = clip_run(&sa, &device, audio, args, &mut mem)?;
            let secs = audio.len() as f64 / SAMPLE_RATE as f64;
            let one_shot = r.e2e + r.prefill_sys;
            println!(
                "| {name} | {secs:.2} | {:.2} | {:.2} | {:.2} | {:.2} | {:.2} | {:.2} | {:.2} | {:.1} | {:.1} | {:.1} | {:.4} |",
                r.mel, r.encoder, r.adapter, r.prefill_sys, r.prefill_turn, r.prefill_whole,
                r.per_token, 1e3 / r.per_token, r.e2e, one_shot, one_shot / 1e3 / secs
            );
            clips_j.push(json!({
                "clip": name, "seconds": secs, "prompt_tokens": r.prompt_tokens,
                "system_tokens": r.system_tokens, "decode_steps": r.steps,
                "mel_ms": r.mel, "encoder_ms": r.encoder, "adapter_ms": r.adapter,
                "prefill_system_ms": r.prefill_sys, "prefill_turn_ms": r.prefill_turn,
                "prefill_whole_ms": r.prefill_whole, "ms_per_token": r.per_token,
                "e2e_cached_system_ms": r.e2e, "e2e_one_shot_ms": one_shot,
                "rtf_one_shot": one_shot / 1e3 / secs, "tokens": r.tokens,
            }));
        }
        m.insert("clips".into(), json!(clips_j));
        report.push(serde_json::Value::Object(m));
    }
    mem.sample();
    device.synchronize()?;
    let pool_peak = fast::device_memory_peak(&device, false);
    println!(
        "\npeak device memory: {} MiB allocated at most (memory-pool high-water mark, weights included); \
         {} MiB reserved (total − free, sampled between stages: the pool keeps freed memory); weights {} MiB",
        pool_peak.map_or("?".into(), |b| (b >> 20).to_string()),
        mem.peak >> 20,
        weight_bytes.map_or("?".into(), |b| (b >> 20).to_string())
    );
    if let Some(p) = &args.json {
        let out = json!({
            "arch": "step-audio-2-mini", "weights": "random", "device": format!("{device:?}"),
            "dtype": format!("{dtype:?}"), "tokens": args.tokens, "runs": args.runs,
            "model_build_s": build_s, "peak_device_memory_bytes": mem.peak,
            "peak_allocated_bytes": pool_peak,
            "model_memory_bytes": weight_bytes, "modes": report,
        });
        std::fs::write(p, serde_json::to_string_pretty(&out)?)?;
    }
    Ok(())
}

struct Fixed {
    breakdown: Vec<(String, f64)>,
    prefill400: f64,
    mel15_device: f64,
    mel15_upload: f64,
    mel15_cpu: f64,
    encoder30: f64,
}

/// Deterministic noise-like audio (a chirp plus a hash), not zeros: zeros would skip
/// the CPU FFT and can run faster on a GPU than real data.
fn synthetic_audio(seconds: f64) -> Vec<f32> {
    let n = (seconds * SAMPLE_RATE as f64) as usize;
    (0..n)
        .map(|i| {
            let t = i as f64 / SAMPLE_RATE as f64;
            let h = (i as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 40;
            (0.3 * (2.0 * std::f64::consts::PI * (200.0 + 300.0 * t) * t).sin()
                + 0.05 * (h as f64 / (1u64 << 24) as f64 - 0.5)) as f32
        })
        .collect()
}

fn fixed_sizes(sa: &StepAudio2, device: &Device, runs: usize, mem: &mut MemWatch) -> Result<Fixed> {
    let runs = runs.max(3) * 4;
    let audio15 = synthetic_audio(15.0);
    let cpu = MelExtractor::new(sa.model.config.encoder.n_mels);
    let mel15_cpu = time_it(&Device::Cpu, runs, || {
        let _ = cpu.step_audio(&audio15);
        Ok(())
    })?;
    let flags = fast::fast_paths();
    let (mel15_device, mel15_upload) = match (&sa.device_mel, flags.mel) {
        (Some(dm), true) => {
            let on_dev = Tensor::new(audio15.as_slice(), device)?;
            let d = time_it(device, runs, || {
                dm.compute_on_device(&on_dev, STEP_AUDIO_TAIL_PADDING)?;
                Ok(())
            })?;
            let u = time_it(device, runs, || {
                dm.compute(&audio15, STEP_AUDIO_TAIL_PADDING)?;
                Ok(())
            })?;
            (d, u)
        }
        _ => (f64::NAN, f64::NAN),
    };
    // 30 s of mel (3000 frames, the encoder's 1500 positions), through the encoder only.
    let mel30 = LogMel {
        n_mels: sa.model.config.encoder.n_mels,
        n_frames: 3000,
        data: synthetic_audio(30.0)
            .iter()
            .take(sa.model.config.encoder.n_mels * 3000)
            .map(|x| x * 2.0)
            .collect(),
    };
    let (x, lens) = sa.model.mel_batch(&[&mel30])?;
    let encoder30 = time_it(device, runs / 4, || {
        sa.model.encoder.forward(&x, &lens)?;
        Ok(())
    })?;
    let breakdown = encoder_breakdown(sa, device, &x, &lens)?;
    // 400 random prompt tokens from an empty cache, as the PyTorch baseline's prefill
    // (which also computes the logits of all 400 rows; this computes the last row's).
    let llm = &sa.model.llm;
    let ids: Vec<u32> = (0..400u64)
        .map(|i| (i * 2_654_435_761 % 150_000) as u32)
        .collect();
    let embeds = llm.embed(&ids)?.unsqueeze(0)?;
    let prefill400 = time_it(device, runs / 4, || {
        let mut state = llm.new_state(401);
        let logits = llm.logits_last(&llm.forward(&embeds, &mut state)?)?;
        let _ = stepaudio_live::model::step_audio2::llm::argmax(&logits)?;
        Ok(())
    })?;
    mem.sample();
    Ok(Fixed {
        breakdown,
        prefill400,
        mel15_device,
        mel15_upload,
        mel15_cpu,
        encoder30,
    })
}

struct ClipRun {
    mel: f64,
    encoder: f64,
    adapter: f64,
    prefill_sys: f64,
    prefill_turn: f64,
    prefill_whole: f64,
    per_token: f64,
    e2e: f64,
    steps: usize,
    prompt_tokens: usize,
    system_tokens: usize,
    tokens: Vec<u32>,
}

fn clip_run(
    sa: &StepAudio2,
    device: &Device,
    audio: &[f32],
    args: &Args,
    mem: &mut MemWatch,
) -> Result<ClipRun> {
    let opts = SessionOptions {
        system_prompt: SystemPrompt::Chinese,
        max_new_tokens: args.tokens,
        ..Default::default()
    };
    let turn = TurnOptions {
        stop_at_eot: false,
        ..TurnOptions::new(args.tokens)
    };
    let flags = fast::fast_paths();
    let mut session = sa.session(opts.clone())?;
    let llm = &sa.model.llm;
    let (mut mel, mut enc, mut ad, mut p_turn, mut p_whole, mut per_tok, mut e2e, mut p_sys) = (
        vec![],
        vec![],
        vec![],
        vec![],
        vec![],
        vec![],
        vec![],
        vec![],
    );
    let (mut steps, mut prompt_tokens, mut tokens) = (0, 0, Vec::new());
    for i in 0..args.runs.max(1) + 1 {
        // system prompt prefill into a fresh cache (what a one-shot transcription adds)
        device.synchronize()?;
        let t = Instant::now();
        let fresh = sa.session(opts.clone())?;
        device.synchronize()?;
        let sys = ms(t.elapsed());
        drop(fresh);

        device.synchronize()?;
        let t0 = Instant::now();
        let mel_t = match (&sa.device_mel, flags.mel) {
            (Some(dm), true) => dm.compute(audio, STEP_AUDIO_TAIL_PADDING)?,
            _ => {
                let m = sa.mel.step_audio(audio);
                Tensor::from_vec(m.data, (m.n_mels, m.n_frames), device)?
            }
        };
        device.synchronize()?;
        let t1 = Instant::now();
        let x = mel_t.to_dtype(sa.model.dtype)?.unsqueeze(0)?;
        let e = sa.model.encoder.forward(&x, &[mel_t.dim(1)?])?;
        device.synchronize()?;
        let t2 = Instant::now();
        let (rows, _) = sa.model.adapter.kept_rows(&e)?;
        device.synchronize()?;
        let t3 = Instant::now();
        let out = session.decode_partial(sa, &rows, &[], &turn)?;
        let t4 = Instant::now();
        mem.sample();

        // the whole prompt from an empty cache, one forward
        let counts: Vec<usize> = rows.iter().map(|r| r.dim(0)).collect::<Result<_, _>>()?;
        let prompt = sa
            .tokenizer
            .asr_prompt(opts.system_prompt.text(), &counts)?;
        let mut state = llm.new_state(prompt.len() + 1);
        device.synchronize()?;
        let t = Instant::now();
        let embeds = sa.model.embed_prompt(&prompt, &rows)?.unsqueeze(0)?;
        let logits = llm.logits_last(&llm.forward(&embeds, &mut state)?)?;
        let _ = stepaudio_live::model::step_audio2::llm::argmax(&logits)?;
        let whole = ms(t.elapsed());
        drop(state);
        if i == 0 {
            continue; // warm-up (module loads, graph capture, cuBLAS heuristics)
        }
        p_sys.push(sys);
        mel.push(ms(t1 - t0));
        enc.push(ms(t2 - t1));
        ad.push(ms(t3 - t2));
        p_turn.push(ms(out.prefill_time));
        per_tok.push(ms(out.decode_time) / out.decode_steps.max(1) as f64);
        e2e.push(ms(t4 - t0));
        p_whole.push(whole);
        steps = out.decode_steps;
        prompt_tokens = out.prompt_tokens;
        tokens = out.generated.clone();
    }
    Ok(ClipRun {
        mel: median(mel),
        encoder: median(enc),
        adapter: median(ad),
        prefill_sys: median(p_sys),
        prefill_turn: median(p_turn),
        prefill_whole: median(p_whole),
        per_token: median(per_tok),
        e2e: median(e2e),
        steps,
        prompt_tokens,
        system_tokens: session.system_len(),
        tokens,
    })
}

/// Where the 30 s encoder's time goes: the conv stem once, then each part of one block
/// timed alone (synchronised) and multiplied by the number of blocks.
fn encoder_breakdown(
    sa: &StepAudio2,
    device: &Device,
    mel: &Tensor,
    lens: &[usize],
) -> Result<Vec<(String, f64)>> {
    use stepaudio_live::model::step_audio2::encoder::{
        key_bias_tensor, key_mask, layer_norm, linear, linear_gelu, linear_residual,
        linear_residual_norm,
    };
    let enc = &sa.model.encoder;
    let n = enc.blocks.len() as f64;
    let reps = 10;
    let stem = || -> Result<Tensor> {
        let x = enc.conv1.forward(mel)?.gelu_erf()?;
        let x = enc.conv2.forward(&x)?.gelu_erf()?.transpose(1, 2)?;
        let t2 = x.dim(1)?;
        Ok(x.broadcast_add(&enc.positions.narrow(0, 0, t2)?)?)
    };
    let mut out = vec![(
        "conv stem".to_string(),
        time_it(device, reps, || stem().map(|_| ()))?,
    )];
    let x = stem()?;
    let kb = key_bias_tensor(&key_mask(lens, mel.dim(2)?), device)?;
    let b = &enc.blocks[0];
    let h = b.attn_ln.forward(&x)?;
    let qkv = b.qkv.forward(&h)?;
    let a = b.attention(&qkv, enc.heads, &kb)?;
    let x2 = (&x + b.out.forward(&a)?)?;
    let h2 = b.mlp_ln.forward(&x2)?;
    let f1 = b.fc1.forward(&h2)?.gelu_erf()?;
    type Part<'a> = (&'static str, Box<dyn Fn() -> Result<()> + 'a>);
    let parts: Vec<Part> = vec![
        (
            "attn layer norm",
            Box::new(|| {
                layer_norm(&b.attn_ln, &x)?;
                Ok(())
            }),
        ),
        (
            "qkv linear",
            Box::new(|| {
                linear(&b.qkv, &h)?;
                Ok(())
            }),
        ),
        (
            "attention",
            Box::new(|| {
                b.attention(&qkv, enc.heads, &kb)?;
                Ok(())
            }),
        ),
        (
            "out linear + residual + mlp layer norm",
            Box::new(|| {
                linear_residual_norm(&b.out, &a, &x, &b.mlp_ln)?;
                Ok(())
            }),
        ),
        (
            "fc1 + GELU",
            Box::new(|| {
                linear_gelu(&b.fc1, &h2)?;
                Ok(())
            }),
        ),
        (
            "fc2 + residual",
            Box::new(|| {
                linear_residual(&b.fc2, &f1, &x2)?;
                Ok(())
            }),
        ),
    ];
    for (name, f) in parts {
        out.push((format!("{name} ×{n}"), n * time_it(device, reps, &f)?));
    }
    // the GEMM alone, both ways, and the flash kernel's two variants
    out.push((
        format!("qkv GEMM candle ×{n}"),
        n * time_it(device, reps, || {
            h.broadcast_matmul(&b.qkv.weight.t()?)?;
            Ok(())
        })?,
    ));
    if fast::matmul_t(&h, &b.qkv.weight)?.is_some() {
        out.push((
            format!("qkv GEMM cuBLAS direct ×{n}"),
            n * time_it(device, reps, || {
                fast::matmul_t(&h, &b.qkv.weight)?;
                Ok(())
            })?,
        ));
        for v in ["2stage", "1stage", "w8"] {
            fast::set_flash_variant(v)?;
            out.push((
                format!("attention {v} ×{n}"),
                n * time_it(device, reps, || {
                    b.attention(&qkv, enc.heads, &kb)?;
                    Ok(())
                })?,
            ));
        }
        fast::set_flash_variant("default")?;
    }
    Ok(out)
}
