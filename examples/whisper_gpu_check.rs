//! Whisper under `--compute cuda` checked against transformers, and timed.
//!
//! `--case DIR` (repeatable): DIR is one shape's folder written by
//! `scripts/reference/whisper_gpu_parity.py` (random weights in Hugging Face layout,
//! transformers' WhisperForConditionalGeneration outputs in f32 and bf16 on the same
//! mel). The model is loaded with the project's loader on `--compute` (bf16 on a GPU,
//! f32 on the CPU) and compared with the f32 reference (and with torch's own bf16 as
//! the yardstick):
//!   - the encoder output (relative error ‖ours − ref‖ / ‖ref‖);
//!   - the logits of every teacher-forced step along the reference's greedy tokens,
//!     through each decoder path: one prefill over the whole sequence, the stacked
//!     batch step that greedy decoding uses off the CPU, and the per-row step;
//!   - the token each step picks (after the live decoding rules) against the
//!     reference's, every disagreement with the reference's margin between the two;
//!   - free-running greedy decoding (`greedy_decode_batch`) against the greedy tokens;
//!   - a stacked batch of rows with prompts of different lengths: a short row padded
//!     in the batch against the same row alone.
//!
//! `--bench DIR`: times, on one model folder (large-v3-turbo shape for the capacity
//! numbers), the encoder's 30 s window, the cross-attention projection of a window,
//! and one batched greedy decode step at each `--batches` size: the device part
//! (stacked step and logits), the fused attention switched off, the per-row step
//! path for comparison (batches ≤ 64), and whole greedy decodes (host rules and
//! transfers included) per token. Medians over `--reps`.
//!
//! Prints PASS/FAIL lines; `--json FILE` writes every number.

use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, Tensor};
use clap::Parser;
use serde_json::{json, Value};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;
use stepaudio_live::cli::DeviceArg;
use stepaudio_live::model::whisper::decoder::CrossAttention;
use stepaudio_live::model::whisper::decoding::{DecodingOptions, WindowJob};
use stepaudio_live::model::whisper::{DecoderWeights, WhisperModel};
use stepaudio_live::model::LoadedModel;
use stepaudio_live::ops::fast::{self, FastPaths};

#[derive(Parser, Debug)]
struct Args {
    /// A shape's folder from whisper_gpu_parity.py (model/, ref.json, ref.safetensors).
    #[arg(long = "case")]
    cases: Vec<PathBuf>,
    /// Time this model folder.
    #[arg(long)]
    bench: Option<PathBuf>,
    #[arg(long, value_delimiter = ',', default_value = "1,8,64,256")]
    batches: Vec<usize>,
    #[arg(long, default_value_t = 20)]
    reps: usize,
    /// Tokens of each whole greedy decode timed in `--bench`.
    #[arg(long, default_value_t = 24)]
    bench_tokens: usize,
    /// The recording the reference's mel came from: our log-mel is compared with it.
    #[arg(long)]
    wav: Option<PathBuf>,
    #[arg(long, value_enum, default_value_t = DeviceArg::Cuda)]
    compute: DeviceArg,
    #[arg(long)]
    json: Option<PathBuf>,
}

/// Limits a check passes within, by the precision the model computes in.
struct Tolerance {
    encoder: f64,
    logits: f64,
    /// The padded row of a stacked batch against the same row alone.
    batch: f64,
    /// Share of teacher-forced steps whose token must agree.
    agree: f64,
    /// A disagreement is a near-tie when the reference's margin between the two
    /// tokens is below this many RMS errors of the step's logits.
    tie_rms: f64,
}

impl Tolerance {
    fn for_dtype(dtype: DType) -> Self {
        match dtype {
            DType::F32 => Self {
                encoder: 1e-3,
                logits: 1e-3,
                batch: 1e-4,
                agree: 1.0,
                tie_rms: 6.0,
            },
            _ => Self {
                encoder: 2e-2,
                logits: 2e-2,
                batch: 2e-2,
                agree: 0.9,
                tie_rms: 6.0,
            },
        }
    }
}

#[derive(Default)]
struct Report {
    failed: Vec<String>,
    json: serde_json::Map<String, Value>,
}

impl Report {
    fn check(&mut self, name: &str, ok: bool, detail: String) {
        println!("{} {name}: {detail}", if ok { "PASS" } else { "FAIL" });
        if !ok {
            self.failed.push(name.to_string());
        }
    }
}

/// Three streams' windows — after heads of 60 and 30 positions and after none, at
/// three padding levels, with 40, 130 and 10 new positions (random mels) — through
/// `forward_after_batch` against each through `forward_after` alone: the worst
/// relative error of the outputs and of the new positions' keys and values; and
/// whether the batch is bit for bit the same with its keys and values spliced by the
/// kernel and by candle copies (the `splice` switch).
fn batched_after(m: &WhisperModel) -> Result<(f64, f64, bool)> {
    use stepaudio_live::model::whisper::encoder::AfterInput;
    let mel = |positions: usize| -> Result<Tensor> {
        Ok(Tensor::randn(
            0f32,
            1.0,
            (1, m.config.n_mels, 2 * (positions + 2) + 4),
            &m.device,
        )?
        .to_dtype(m.dtype)?)
    };
    let levels = [
        m.silent_states(-4)?,
        m.silent_states(0)?,
        m.silent_states(2)?,
    ];
    let head0 = m
        .encoder
        .forward_after(&mel(60)?, 60, None, &levels[0].encoder)?
        .1;
    let head2 = m
        .encoder
        .forward_after(&mel(30)?, 30, None, &levels[2].encoder)?
        .1;
    let mels = [mel(40)?, mel(130)?, mel(10)?];
    let inputs = [
        AfterInput {
            mel: &mels[0],
            fresh: 40,
            head: Some(&head0),
            silent: &levels[0].encoder,
        },
        AfterInput {
            mel: &mels[1],
            fresh: 130,
            head: None,
            silent: &levels[1].encoder,
        },
        AfterInput {
            mel: &mels[2],
            fresh: 10,
            head: Some(&head2),
            silent: &levels[2].encoder,
        },
    ];
    let batched = m.encoder.forward_after_batch(&inputs)?;
    let (mut worst_out, mut worst_kv) = (0f64, 0f64);
    let flat = |t: &Tensor| -> Result<Vec<f32>> {
        Ok(t.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?)
    };
    let flags = fast::fast_paths();
    fast::set_fast_paths(FastPaths {
        splice: !flags.splice,
        ..flags
    });
    let other = m.encoder.forward_after_batch(&inputs);
    fast::set_fast_paths(flags);
    let mut splice_identical = true;
    for ((out, kv), (o, okv)) in batched.iter().zip(&other?) {
        splice_identical &= flat(out)? == flat(o)?;
        for ((k, v), (ok, ov)) in kv.keys_values.iter().zip(&okv.keys_values) {
            splice_identical &= flat(k)? == flat(ok)? && flat(v)? == flat(ov)?;
        }
    }
    for (input, (out, kv)) in inputs.iter().zip(&batched) {
        let (alone_out, alone_kv) =
            m.encoder
                .forward_after(input.mel, input.fresh, input.head, input.silent)?;
        worst_out = worst_out.max(rel(&flat(out)?, &flat(&alone_out)?));
        for ((k, v), (ak, av)) in kv.keys_values.iter().zip(&alone_kv.keys_values) {
            worst_kv = worst_kv
                .max(rel(&flat(k)?, &flat(ak)?))
                .max(rel(&flat(v)?, &flat(av)?));
        }
    }
    Ok((worst_out, worst_kv, splice_identical))
}

/// ‖a − b‖ / ‖b‖ in f64 (NaN anywhere gives NaN).
fn rel(a: &[f32], b: &[f32]) -> f64 {
    let (mut num, mut den) = (0f64, 0f64);
    for (&x, &y) in a.iter().zip(b) {
        num += (x as f64 - y as f64).powi(2);
        den += (y as f64).powi(2);
    }
    if a.len() != b.len() {
        return f64::NAN;
    }
    (num / den).sqrt()
}

fn rms_diff(a: &[f32], b: &[f32]) -> f64 {
    let s: f64 = a
        .iter()
        .zip(b)
        .map(|(&x, &y)| (x as f64 - y as f64).powi(2))
        .sum();
    (s / a.len().max(1) as f64).sqrt()
}

fn rows_f32(t: &Tensor) -> Result<Vec<Vec<f32>>> {
    Ok(t.to_dtype(DType::F32)?.to_device(&Device::Cpu)?.to_vec2()?)
}

fn tokens(v: &Value, key: &str) -> Result<Vec<u32>> {
    v.get(key)
        .and_then(Value::as_array)
        .with_context(|| format!("ref.json: no `{key}`"))?
        .iter()
        .map(|x| {
            x.as_u64()
                .map(|x| x as u32)
                .with_context(|| format!("ref.json: `{key}` holds a non-token"))
        })
        .collect()
}

fn load(dir: &Path, compute: DeviceArg) -> Result<Arc<WhisperModel>> {
    match LoadedModel::load(dir, compute.into(), None, DecoderWeights::F32)? {
        LoadedModel::Whisper(m) => Ok(m),
        _ => bail!("{}: not a Whisper model", dir.display()),
    }
}

fn live_options(max_new_tokens: usize) -> DecodingOptions {
    DecodingOptions {
        timestamps: false,
        max_new_tokens,
        ..Default::default()
    }
}

/// Per-step comparison of one decoder path's logits rows with the reference rows
/// (`ours[k]` and `reference[k]` predict `greedy[k]`; the last row has no token).
fn compare_steps(
    m: &WhisperModel,
    name: &str,
    ours: &[Vec<f32>],
    reference: &[Vec<f32>],
    greedy: &[u32],
    tol: &Tolerance,
    report: &mut Report,
) -> Value {
    let opts = live_options(greedy.len());
    let errs: Vec<f64> = ours.iter().zip(reference).map(|(a, b)| rel(a, b)).collect();
    let max = errs.iter().copied().fold(0f64, f64::max);
    let worst_ok = errs.iter().all(|e| e.is_finite() && *e <= tol.logits);
    let mut agree = 0;
    let mut disagreements = Vec::new();
    let mut unexplained = 0;
    for (k, &want) in greedy.iter().enumerate() {
        let (Some(o), Some(r)) = (ours.get(k), reference.get(k)) else {
            break;
        };
        let (mut o, mut r) = (o.clone(), r.clone());
        let rms = rms_diff(&o, &r);
        m.apply_logit_rules(&mut o, &greedy[..k], &opts);
        m.apply_logit_rules(&mut r, &greedy[..k], &opts);
        let got = stepaudio_live::model::whisper::decoding::argmax(&o);
        if got == want {
            agree += 1;
            continue;
        }
        let margin = (r[want as usize] - r[got as usize]) as f64;
        let near_tie = margin <= tol.tie_rms * rms;
        if !near_tie {
            unexplained += 1;
        }
        disagreements.push(json!({"step": k, "reference": want, "ours": got,
            "reference_margin": margin, "logits_rms_error": rms, "near_tie": near_tie}));
    }
    let n = greedy.len().min(ours.len());
    let share = if n == 0 { 1.0 } else { agree as f64 / n as f64 };
    report.check(
        &format!("{name} logits"),
        worst_ok,
        format!(
            "max rel. error over {} steps {max:.2e} (≤ {:.0e})",
            errs.len(),
            tol.logits
        ),
    );
    report.check(
        &format!("{name} tokens"),
        share >= tol.agree && unexplained == 0,
        format!(
            "{agree}/{n} teacher-forced steps pick the reference token; {} disagreements, {unexplained} not near-ties",
            disagreements.len()
        ),
    );
    json!({"rel_errors": errs, "max_rel_error": max, "agree": agree, "steps": n,
        "disagreements": disagreements})
}

fn parity_case(dir: &Path, args: &Args, report: &mut Report) -> Result<Value> {
    let info: Value = serde_json::from_str(&std::fs::read_to_string(dir.join("ref.json"))?)?;
    let shape = info["shape"].as_str().unwrap_or("?").to_string();
    println!("== {shape} ({})", dir.display());
    let refs = candle_core::safetensors::load(dir.join("ref.safetensors"), &Device::Cpu)?;
    let get = |k: &str| {
        refs.get(k)
            .with_context(|| format!("ref.safetensors: no `{k}`"))
    };
    let t0 = Instant::now();
    let m = load(&dir.join("model"), args.compute)?;
    let load_s = t0.elapsed().as_secs_f64();
    let tol = Tolerance::for_dtype(m.dtype);
    let dev = m.device.clone();
    let tag = |s: &str| format!("{shape} {s}");
    let mut out = serde_json::Map::new();
    let (rel_out, rel_kv, splice_identical) = batched_after(&m)?;
    report.check(
        &tag("encoder batch spliced by the kernel vs by candle copies"),
        splice_identical,
        format!("outputs, keys and values bit-identical: {splice_identical}"),
    );
    report.check(
        &tag("encoder windows of three streams as one batch vs each alone"),
        rel_out <= tol.batch && rel_kv <= tol.batch,
        format!(
            "output rel {rel_out:.2e}, own keys/values rel {rel_kv:.2e} (tolerance {:.0e})",
            tol.batch
        ),
    );
    out.insert(
        "batched_encoder".into(),
        json!({"rel_output": rel_out, "rel_keys_values": rel_kv, "splice_kernel_identical": splice_identical}),
    );
    out.insert("dtype".into(), json!(format!("{:?}", m.dtype)));
    out.insert("device".into(), json!(format!("{dev:?}")));
    out.insert("load_s".into(), json!(load_s));

    // The tokenizer's special tokens must be where the reference put them.
    let sp = &info["special"];
    let ours_sp = json!({"eot": m.tokenizer.eot, "sot": m.tokenizer.sot,
        "no_timestamps": m.tokenizer.no_timestamps, "timestamp_begin": m.tokenizer.timestamp_begin,
        "translate": m.tokenizer.translate, "transcribe": m.tokenizer.transcribe});
    let same = [
        "eot",
        "sot",
        "no_timestamps",
        "timestamp_begin",
        "translate",
        "transcribe",
    ]
    .iter()
    .all(|k| sp[k] == ours_sp[k]);
    report.check(&tag("special tokens"), same, format!("ours {ours_sp}"));

    let mel = get("mel")?;
    let (n_mels, frames) = mel.dims2()?;
    if let Some(wav) = &args.wav {
        let audio = stepaudio_live::audio::wav::read_wav_16k_mono(wav)?;
        let ours = m.mel.whisper(&audio);
        let e = rel(&ours.data, &mel.flatten_all()?.to_vec1::<f32>()?);
        out.insert("mel_rel_error".into(), json!(e));
        report.check(
            &tag("log-mel"),
            e <= 1e-3,
            format!("our frontend vs WhisperFeatureExtractor: rel. error {e:.2e} (≤ 1e-3)"),
        );
    }

    // Encoder.
    let x = mel
        .reshape((1, n_mels, frames))?
        .to_device(&dev)?
        .to_dtype(m.dtype)?;
    let enc = m.encoder.forward(&x)?;
    dev.synchronize()?;
    let enc_rows = rows_f32(&enc.squeeze(0)?)?.concat();
    let e32 = rel(&enc_rows, &get("enc_f32")?.flatten_all()?.to_vec1::<f32>()?);
    // torch's bf16 run is left out of CPU references.
    let e16 = match refs.get("enc_bf16") {
        Some(t) => rel(&enc_rows, &t.flatten_all()?.to_vec1::<f32>()?),
        None => f64::NAN,
    };
    let yard = &info["torch_bf16_vs_f32"];
    report.check(
        &tag("encoder"),
        e32.is_finite() && e32 <= tol.encoder,
        format!(
            "rel. error vs torch f32 {e32:.2e} (≤ {:.0e}); vs torch bf16 {e16:.2e}; torch bf16 vs f32 {:.2e}",
            tol.encoder,
            yard["encoder_rel"].as_f64().unwrap_or(f64::NAN)
        ),
    );
    out.insert(
        "encoder".into(),
        json!({"rel_error_vs_f32": e32, "rel_error_vs_bf16": e16}),
    );

    let cross = m.decoder.cross_attention(&enc)?;
    let prompt = tokens(&info, "prompt")?;
    let greedy = tokens(&info, "greedy_f32")?;
    let tf = tokens(&info, "tf_tokens")?;
    let p = prompt.len();
    let ref_rows = rows_f32(get("tf_logits_f32")?)?;
    // Rows p − 1 … predict greedy[0] …
    let ref_steps: Vec<Vec<f32>> = ref_rows[p - 1..].to_vec();
    let sot_index = info["sot_index"].as_u64().unwrap_or(0) as usize;

    // (a) One prefill over the whole teacher-forced sequence.
    let mut state = m.decoder.new_state();
    let hidden = m.decoder.forward_hidden(&tf, &mut state, &cross)?;
    let all: Vec<usize> = (0..tf.len()).collect();
    let rows = rows_f32(&m.decoder.logits(&hidden, &all)?)?;
    let sot_err = rel(&rows[sot_index], &ref_rows[sot_index]);
    out.insert("sot_row_rel_error".into(), json!(sot_err));
    let prefill = compare_steps(
        &m,
        &tag("prefill"),
        &rows[p - 1..],
        &ref_steps,
        &greedy,
        &tol,
        report,
    );
    out.insert("prefill".into(), prefill);

    // (b) The stacked path greedy decoding takes off the CPU.
    let (mut st, hidden) =
        m.decoder
            .stacked_prefill(&[prompt.as_slice()], &[&cross], greedy.len())?;
    let mut rows = rows_f32(
        &m.decoder
            .stacked_logits(&hidden, &[(0, st.column(0, p - 1))])?,
    )?;
    for &t in &greedy {
        let h = m.decoder.stacked_step(&mut st, &[t])?;
        rows.extend(rows_f32(&m.decoder.step_logits(&h)?)?);
    }
    let stacked = compare_steps(
        &m,
        &tag("stacked step"),
        &rows,
        &ref_steps,
        &greedy,
        &tol,
        report,
    );
    out.insert("stacked_step".into(), stacked);
    let stacked_alone = rows;

    // (c) The per-row step (the CPU's path; off the CPU, windows of unequal lengths).
    let mut state = m.decoder.new_state();
    let hidden = m.decoder.forward_hidden(&prompt, &mut state, &cross)?;
    let mut rows = rows_f32(&m.decoder.logits(&hidden, &[p - 1])?)?;
    for &t in &greedy {
        let h = m.decoder.step_batch(&[t], &mut [&mut state], &[&cross])?;
        rows.extend(rows_f32(&m.decoder.step_logits(&h)?)?);
    }
    let per_row = compare_steps(
        &m,
        &tag("per-row step"),
        &rows,
        &ref_steps,
        &greedy,
        &tol,
        report,
    );
    out.insert("per_row_step".into(), per_row);

    // (d) Free-running greedy decoding.
    let job = WindowJob {
        cross: &cross,
        prompt: &prompt,
        sot_index,
        forced: &[],
        max_new_tokens: greedy.len(),
    };
    let t0 = Instant::now();
    let decoded = m
        .greedy_decode_batch(&[job], &live_options(greedy.len()))?
        .remove(0);
    let decode_ms = t0.elapsed().as_secs_f64() * 1e3;
    let prefix = |a: &[u32], b: &[u32]| a.iter().zip(b).take_while(|(x, y)| x == y).count();
    // No bf16 reference in CPU runs.
    let ref_bf16 = tokens(&info, "greedy_bf16").ok();
    let pf = prefix(&decoded.tokens, &greedy);
    let pb = ref_bf16.as_ref().map(|r| prefix(&decoded.tokens, r));
    let torch_prefix = yard["greedy_agree_prefix"].as_u64();
    let show = |v: Option<u64>| v.map_or("-".to_string(), |v| v.to_string());
    println!(
        "     {shape} greedy: {} tokens; agrees with torch f32 for the first {pf}, with torch bf16 for {} (torch bf16 vs f32: {}); {decode_ms:.1} ms",
        decoded.tokens.len(),
        show(pb.map(|v| v as u64)),
        show(torch_prefix)
    );
    out.insert(
        "greedy".into(),
        json!({"tokens": decoded.tokens, "prefix_vs_f32": pf, "prefix_vs_bf16": pb,
            "torch_bf16_prefix_vs_f32": torch_prefix, "ms": decode_ms}),
    );

    // (e) A short row padded in a stacked batch against the same row alone.
    let mut long_prompt = vec![m.tokenizer.sot_prev];
    long_prompt.extend((0..20).map(|i| 400 + 37 * i));
    long_prompt.extend(&prompt);
    let mut long_tf = long_prompt.clone();
    long_tf.extend(&greedy);
    let cross2 = m.decoder.cross_attention(&(&enc * 0.5)?)?;
    let (mut st, hidden) = m.decoder.stacked_prefill(
        &[prompt.as_slice(), long_prompt.as_slice()],
        &[&cross, &cross2],
        greedy.len(),
    )?;
    let picks = [
        (0, st.column(0, p - 1)),
        (1, st.column(1, long_prompt.len() - 1)),
    ];
    let first = rows_f32(&m.decoder.stacked_logits(&hidden, &picks)?)?;
    let mut errs = vec![rel(&first[0], &stacked_alone[0])];
    for (k, &t) in greedy.iter().enumerate() {
        let h = m
            .decoder
            .stacked_step(&mut st, &[t, long_tf[long_prompt.len() + k]])?;
        let rows = rows_f32(&m.decoder.step_logits(&h)?)?;
        errs.push(rel(&rows[0], &stacked_alone[k + 1]));
    }
    let max = errs.iter().copied().fold(0f64, f64::max);
    report.check(
        &tag("stacked batch padding"),
        max.is_finite() && max <= tol.batch,
        format!(
            "a {p}-token row beside a {}-token one vs alone: max rel. error {max:.2e} over {} steps (≤ {:.0e})",
            long_prompt.len(),
            errs.len(),
            tol.batch
        ),
    );
    out.insert("batch_padding_rel_errors".into(), json!(errs));

    // (f) The fused step (one CUDA graph a step, picks on the device) against the
    // candle stacked step, and its graph replay against direct launches.
    if !dev.is_cpu() && fast::fast_paths().decode {
        let fused = fused_vs_stacked(
            &m,
            [&prompt, &long_prompt, &prompt],
            [&cross, &cross2, &cross2],
            |k| [greedy[k], long_tf[long_prompt.len() + k], greedy[k]],
            greedy.len(),
        )?;
        report.check(
            &tag("fused step vs candle stacked step"),
            fused.hidden_rel.is_finite()
                && fused.hidden_rel <= tol.batch
                && fused.agree as f64 >= tol.agree * fused.picks as f64,
            format!(
                "3 rows ({p}, {} and {p} prompt tokens) over {} teacher-forced steps: hidden states max rel. error {:.2e} (≤ {:.0e}); picks equal to the candle logits' argmax at {} of {} (≥ {:.0} %), log-prob max abs diff {:.2e}",
                long_prompt.len(),
                greedy.len(),
                fused.hidden_rel,
                tol.batch,
                fused.agree,
                fused.picks,
                tol.agree * 100.0,
                fused.lp_diff
            ),
        );
        report.check(
            &tag("fused step graph replay vs direct launches"),
            fused.graph_identical,
            format!(
                "picks and hidden states bit-identical: {}",
                fused.graph_identical
            ),
        );
        out.insert(
            "fused_step".into(),
            json!({"hidden_rel": fused.hidden_rel, "agree": fused.agree, "picks": fused.picks,
                "logprob_max_abs_diff": fused.lp_diff, "graph_identical": fused.graph_identical}),
        );
    }

    // Batched greedy decoding against each window alone (informational off the CPU:
    // a GEMM over more rows may round differently).
    let forced: Vec<u32> = greedy.iter().take(5).copied().collect();
    let jobs = [
        WindowJob {
            cross: &cross,
            prompt: &prompt,
            sot_index,
            forced: &[],
            max_new_tokens: greedy.len(),
        },
        WindowJob {
            cross: &cross2,
            prompt: &long_prompt,
            sot_index: long_prompt.len() - p,
            forced: &[],
            max_new_tokens: greedy.len(),
        },
        WindowJob {
            cross: &cross,
            prompt: &prompt,
            sot_index,
            forced: &forced,
            max_new_tokens: greedy.len() - forced.len(),
        },
    ];
    let opts = live_options(greedy.len());
    let together = m.greedy_decode_batch(&jobs, &opts)?;
    let mut same = Vec::new();
    for (i, job) in jobs.iter().enumerate() {
        let alone = m
            .greedy_decode_batch(std::slice::from_ref(job), &opts)?
            .remove(0);
        same.push(json!({"identical": alone.tokens == together[i].tokens,
            "prefix": prefix(&alone.tokens, &together[i].tokens), "tokens": alone.tokens.len(),
            "avg_logprob_alone": alone.avg_logprob, "avg_logprob_batched": together[i].avg_logprob}));
    }
    println!(
        "     {shape} batched greedy vs alone: {}",
        Value::Array(same.clone())
    );
    out.insert("batched_vs_alone".into(), Value::Array(same));
    Ok(Value::Object(out))
}

struct FusedCheck {
    hidden_rel: f64,
    agree: usize,
    picks: usize,
    lp_diff: f64,
    graph_identical: bool,
}

/// Three rows teacher-forced through the candle stacked step and through the fused
/// step (graph replay and direct launches), with no suppression: the fused hidden
/// states against candle's, its picks against the argmax and log-softmax of
/// candle's logits.
fn fused_vs_stacked(
    m: &WhisperModel,
    prompts: [&[u32]; 3],
    crosses: [&CrossAttention; 3],
    tokens_at: impl Fn(usize) -> [u32; 3],
    steps: usize,
) -> Result<FusedCheck> {
    use stepaudio_live::ops::fast::WhisperFusedStep;
    let vocab = m.decoder.token_embedding.dim(0)?;
    let zero = Tensor::zeros(vocab, DType::F32, &m.device)?;
    let weights = m
        .decoder
        .step_weights()
        .context("the decoder has no fused-step weights")?;
    let prefill = || m.decoder.stacked_prefill(&prompts, &crosses, steps);
    let (mut candle, _) = prefill()?;
    let (mut graph, _) = prefill()?;
    let (mut direct, _) = prefill()?;
    let (mut fused_graph, mut fused_direct) =
        (WhisperFusedStep::default(), WhisperFusedStep::default());
    let flags = fast::fast_paths();
    let mut c = FusedCheck {
        hidden_rel: 0.0,
        agree: 0,
        picks: 0,
        lp_diff: 0.0,
        graph_identical: true,
    };
    for k in 0..steps {
        let toks = tokens_at(k);
        let h = m.decoder.stacked_step(&mut candle, &toks)?;
        let want = rows_f32(&h.squeeze(1)?)?;
        let logits = rows_f32(&m.decoder.step_logits(&h)?)?;
        let picks = m
            .decoder
            .fused_stacked_step(&mut fused_graph, &weights, &mut graph, &toks, &zero)?
            .context("the fused step did not apply")?;
        let got = rows_f32(&fused_graph.last_hidden()?)?;
        fast::set_fast_paths(FastPaths {
            graph: false,
            ..flags
        });
        let plain =
            m.decoder
                .fused_stacked_step(&mut fused_direct, &weights, &mut direct, &toks, &zero);
        fast::set_fast_paths(flags);
        let plain = plain?.context("the fused step did not apply")?;
        let plain_hidden = rows_f32(&fused_direct.last_hidden()?)?;
        c.graph_identical &= plain == picks && plain_hidden == got;
        for r in 0..3 {
            c.hidden_rel = c.hidden_rel.max(rel(&got[r], &want[r]));
            let row = &logits[r];
            let (best, &max) = row
                .iter()
                .enumerate()
                .fold(
                    (0, &f32::NEG_INFINITY),
                    |a, (i, v)| if *v > *a.1 { (i, v) } else { a },
                );
            let lse = max as f64
                + row
                    .iter()
                    .map(|&v| ((v - max) as f64).exp())
                    .sum::<f64>()
                    .ln();
            let lp = row[best] as f64 - lse;
            c.picks += 1;
            c.agree += usize::from(picks[r].0 as usize == best);
            c.lp_diff = c.lp_diff.max((picks[r].1 as f64 - lp).abs());
        }
    }
    Ok(c)
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    if v.is_empty() {
        return f64::NAN;
    }
    v[v.len() / 2]
}

/// Median milliseconds of `f` over `reps` runs after `warm` (the device synchronised
/// around each).
fn time_ms(
    dev: &Device,
    warm: usize,
    reps: usize,
    mut f: impl FnMut() -> Result<()>,
) -> Result<f64> {
    let mut times = Vec::with_capacity(reps);
    for i in 0..warm + reps {
        dev.synchronize()?;
        let t0 = Instant::now();
        f()?;
        dev.synchronize()?;
        if i >= warm {
            times.push(t0.elapsed().as_secs_f64() * 1e3);
        }
    }
    Ok(median(times))
}

/// Live encoder windows as the engine encodes them: groups of 1–16 windows of 150 new
/// positions (3 s) after a carried head of 100, through `forward_after_batch`, with
/// their keys and values spliced by the kernel and by candle copies; ms per window.
fn encoder_groups(m: &WhisperModel, dev: &Device, reps: usize) -> Result<Value> {
    use stepaudio_live::model::whisper::encoder::AfterInput;
    let silent = m.silent_states(0)?;
    let mel = |positions: usize| -> Result<Tensor> {
        Ok(Tensor::randn(
            0f32,
            1.0,
            (1, m.config.n_mels, 2 * (positions + 2) + 4),
            dev,
        )?
        .to_dtype(m.dtype)?)
    };
    let head = m
        .encoder
        .forward_after(&mel(100)?, 100, None, &silent.encoder)?
        .1;
    let new = mel(150)?;
    let flags = fast::fast_paths();
    let mut out = Vec::new();
    for g in [1usize, 4, 8, 16] {
        let inputs: Vec<AfterInput> = (0..g)
            .map(|_| AfterInput {
                mel: &new,
                fresh: 150,
                head: Some(&head),
                silent: &silent.encoder,
            })
            .collect();
        let mut per_window = Vec::new();
        for splice in [true, false] {
            fast::set_fast_paths(FastPaths { splice, ..flags });
            let ms = time_ms(dev, 2, reps.min(10), || {
                m.encoder.forward_after_batch(&inputs)?;
                Ok(())
            });
            fast::set_fast_paths(flags);
            per_window.push(ms? / g as f64);
        }
        println!(
            "encoder, {g:>2} windows of 3 s after 2 s in one batch: {:.2} ms a window spliced by the kernel, {:.2} ms by candle copies",
            per_window[0], per_window[1]
        );
        out.push(
            json!({"windows": g, "ms_per_window_splice_kernel": per_window[0],
            "ms_per_window_candle_splice": per_window[1]}),
        );
    }
    Ok(Value::Array(out))
}

fn bench(dir: &Path, args: &Args) -> Result<Value> {
    let m = load(dir, args.compute)?;
    let dev = m.device.clone();
    let c = &m.config;
    println!(
        "== bench {} (d_model {}, {} + {} layers, {} mels) on {dev:?} {:?}",
        dir.display(),
        c.d_model,
        c.encoder_layers,
        c.decoder_layers,
        c.n_mels,
        m.dtype
    );
    let audio = match &args.wav {
        Some(w) => stepaudio_live::audio::wav::read_wav_16k_mono(w)?,
        None => (0..16000 * 10)
            .map(|i| (i as f32 * 0.05).sin() * 0.1)
            .collect(),
    };
    let mel = m.mel.whisper(&audio);
    let x =
        Tensor::from_slice(&mel.data, (1, mel.n_mels, mel.n_frames), &dev)?.to_dtype(m.dtype)?;
    let reps = args.reps;
    let mut enc = m.encoder.forward(&x)?;
    let encoder_ms = time_ms(&dev, 3, reps, || {
        enc = m.encoder.forward(&x)?;
        Ok(())
    })?;
    let flags = fast::fast_paths();
    fast::set_fast_paths(FastPaths {
        attention: false,
        gemm: false,
        epilogue: false,
        ..flags
    });
    let encoder_plain_ms = time_ms(&dev, 1, reps.min(5), || {
        m.encoder.forward(&x)?;
        Ok(())
    })?;
    fast::set_fast_paths(flags);
    let cross_ms = time_ms(&dev, 3, reps, || {
        m.decoder.cross_attention(&enc)?;
        Ok(())
    })?;
    println!(
        "encoder 30 s window: {encoder_ms:.2} ms (candle ops only: {encoder_plain_ms:.2} ms); cross-attention K/V of a window: {cross_ms:.2} ms"
    );
    let after = encoder_groups(&m, &dev, reps)?;
    let prompt = [
        m.tokenizer.sot,
        m.tokenizer.sot + 1,
        m.tokenizer.no_timestamps,
    ];
    let mut rows = Vec::new();
    for &b in &args.batches {
        // Every row its own window (the same values, separate buffers: each step reads
        // b windows' keys and values, as b streams would).
        let crosses: Vec<CrossAttention> = (0..b)
            .map(|_| m.decoder.cross_attention(&enc))
            .collect::<candle_core::Result<_>>()?;
        let cross_refs: Vec<&CrossAttention> = crosses.iter().collect();
        let prompts: Vec<&[u32]> = (0..b).map(|_| &prompt[..]).collect();
        let steps = 3 + reps + 3;
        let t0 = Instant::now();
        let (mut st, _) = m
            .decoder
            .stacked_prefill(&prompts, &cross_refs, 2 * steps)?;
        dev.synchronize()?;
        let prefill_ms = t0.elapsed().as_secs_f64() * 1e3;
        let toks: Vec<u32> = (0..b as u32).map(|i| 400 + i).collect();
        let mut last = None;
        let step_ms = time_ms(&dev, 3, reps, || {
            let h = m.decoder.stacked_step(&mut st, &toks)?;
            last = Some(m.decoder.step_logits(&h)?);
            Ok(())
        })?;
        let logits = last.context("no step ran")?;
        let to_host_ms = time_ms(&dev, 1, 5, || {
            logits.to_dtype(DType::F32)?.to_vec2::<f32>()?;
            Ok(())
        })?;
        fast::set_fast_paths(FastPaths {
            attention: false,
            ..flags
        });
        let step_plain_attention_ms = time_ms(&dev, 1, reps.min(5), || {
            let h = m.decoder.stacked_step(&mut st, &toks)?;
            m.decoder.step_logits(&h)?;
            Ok(())
        })?;
        fast::set_fast_paths(flags);
        drop(st);
        // The fused step: layers, logits and picks in one graph launch, picks to the host.
        let fused_step_ms = {
            let (mut st, _) = m
                .decoder
                .stacked_prefill(&prompts, &cross_refs, 2 * steps)?;
            let zero = Tensor::zeros(m.decoder.token_embedding.dim(0)?, DType::F32, &dev)?;
            let mut fused = stepaudio_live::ops::fast::WhisperFusedStep::default();
            let weights = m
                .decoder
                .step_weights()
                .context("the decoder has no fused-step weights")?;
            let mut applied = true;
            let ms = time_ms(&dev, 3, reps, || {
                applied &= m
                    .decoder
                    .fused_stacked_step(&mut fused, &weights, &mut st, &toks, &zero)?
                    .is_some();
                Ok(())
            })?;
            applied.then_some(ms)
        };
        let per_row_ms = if b <= 64 {
            let mut states: Vec<_> = (0..b).map(|_| m.decoder.new_state()).collect();
            for (s, c) in states.iter_mut().zip(&crosses) {
                m.decoder.forward_hidden(&prompt, s, c)?;
            }
            let ms = time_ms(&dev, 2, reps.min(5), || {
                let mut refs: Vec<_> = states.iter_mut().collect();
                let h = m.decoder.step_batch(&toks, &mut refs, &cross_refs)?;
                m.decoder.step_logits(&h)?;
                Ok(())
            })?;
            Some(ms)
        } else {
            None
        };
        // Whole greedy decodes: prefill, steps, transfers and host rules.
        let n = args.bench_tokens;
        let jobs: Vec<WindowJob> = crosses
            .iter()
            .map(|c| WindowJob {
                cross: c,
                prompt: &prompt,
                sot_index: 0,
                forced: &[],
                max_new_tokens: n,
            })
            .collect();
        let mut made = 0;
        let greedy_ms = time_ms(&dev, 1, 3, || {
            let out = m.greedy_decode_batch(&jobs, &live_options(n))?;
            made = out.iter().map(|w| w.tokens.len()).sum::<usize>();
            Ok(())
        })?;
        let per_token_ms = greedy_ms / (made as f64 / b as f64).max(1.0);
        fast::set_fast_paths(FastPaths {
            decode: false,
            ..flags
        });
        let mut made_candle = 0;
        let greedy_candle_ms = time_ms(&dev, 1, 3, || {
            let out = m.greedy_decode_batch(&jobs, &live_options(n))?;
            made_candle = out.iter().map(|w| w.tokens.len()).sum::<usize>();
            Ok(())
        })?;
        fast::set_fast_paths(flags);
        let per_token_candle_ms = greedy_candle_ms / (made_candle as f64 / b as f64).max(1.0);
        println!(
            "batch {b:>3}: fused step {} (picks to the host); greedy per token: fused {per_token_ms:.3} ms, candle step {per_token_candle_ms:.3} ms",
            fused_step_ms.map_or("-".into(), |v| format!("{v:.3} ms")),
        );
        println!(
            "batch {b:>3}: step {step_ms:.3} ms device ({:.0} tokens/s; unfused attention {step_plain_attention_ms:.3} ms; per-row path {}); logits to host {to_host_ms:.3} ms; prefill {prefill_ms:.1} ms; greedy {n} tokens {greedy_ms:.1} ms = {per_token_ms:.3} ms/token ({:.0} tokens/s)",
            b as f64 / step_ms * 1e3,
            per_row_ms.map_or("-".into(), |v| format!("{v:.3} ms")),
            b as f64 / per_token_ms * 1e3,
        );
        rows.push(json!({"batch": b, "step_ms": step_ms, "step_unfused_attention_ms": step_plain_attention_ms,
            "per_row_step_ms": per_row_ms, "logits_to_host_ms": to_host_ms, "prefill_ms": prefill_ms,
            "greedy_tokens": made, "greedy_ms": greedy_ms, "greedy_ms_per_token": per_token_ms,
            "fused_step_ms": fused_step_ms, "greedy_candle_step_ms_per_token": per_token_candle_ms,
            "memory_peak_bytes": fast::device_memory_peak(&dev, true)}));
    }
    Ok(
        json!({"model": dir.display().to_string(), "d_model": c.d_model,
        "encoder_layers": c.encoder_layers, "decoder_layers": c.decoder_layers, "dtype": format!("{:?}", m.dtype),
        "encoder_ms": encoder_ms, "encoder_candle_only_ms": encoder_plain_ms, "cross_attention_ms": cross_ms,
        "encoder_after_groups": after,
        "reps": reps, "batches": rows}),
    )
}

fn main() -> Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()),
        )
        .init();
    let args = Args::parse();
    if args.cases.is_empty() && args.bench.is_none() {
        bail!("nothing to do: give --case DIR and/or --bench DIR");
    }
    let mut report = Report::default();
    let mut cases = serde_json::Map::new();
    for dir in &args.cases {
        let name = dir
            .file_name()
            .map_or("case".into(), |n| n.to_string_lossy().to_string());
        match parity_case(dir, &args, &mut report) {
            Ok(v) => {
                cases.insert(name, v);
            }
            Err(e) => {
                report.check(&format!("{name} ran"), false, format!("{e:#}"));
            }
        }
    }
    report.json.insert("cases".into(), Value::Object(cases));
    if let Some(dir) = &args.bench {
        match bench(dir, &args) {
            Ok(v) => {
                report.json.insert("bench".into(), v);
            }
            Err(e) => report.check("bench ran", false, format!("{e:#}")),
        }
    }
    report
        .json
        .insert("failed".into(), json!(report.failed.clone()));
    if let Some(path) = &args.json {
        std::fs::write(path, serde_json::to_string_pretty(&report.json)?)?;
    }
    if report.failed.is_empty() {
        println!("ALL PASS");
        Ok(())
    } else {
        bail!(
            "{} check(s) failed: {}",
            report.failed.len(),
            report.failed.join(", ")
        )
    }
}
