//! The decode step of many streams at once on the GPU: for each batch size, the time of
//! one step of B streams (each with `--context` tokens already in its own KV cache)
//! through the batched fused step, the aggregate tokens per second, and the memory a
//! stream costs; optionally candle ops' batched step (`forward_step_batch`) beside it.
//! Step-Audio 2 mini's LLM shape with random weights (bf16).
//!
//!   benchmark_batch_decode --batches 1,2,4,8,16,32,64,128,256 --context 512 \
//!       [--candle 1,8,64] [--layers 28] [--json FILE]
//!
//! A step is timed on the host around the whole call (row-table upload, graph launch,
//! the one sync and the read-back): what the engine waits for. Medians over `--steps`
//! steps after `--warmup`; after each batch size the caches are rolled back to the
//! context, so every size sees the same lengths.
//!
//! `--prefill-rows 48,96,192,384 --prefill-contexts 512,256,0`: then the batched fused
//! prefill of that many rows split over `--prefill-streams` streams, each stream's rows
//! after that many tokens of its own context (the engine's admissions: a few turns'
//! audio and prompt rows at once). Contexts apart show what the attention over the
//! cache costs, rows apart what the projections cost a row. Timed around the call and a
//! device sync, medians over `--steps`.

use anyhow::{bail, Context, Result};
use candle_core::DType;
use clap::Parser;
use serde_json::json;
use std::time::Instant;
use stepaudio_live::cli::DeviceArg;
use stepaudio_live::device::select_device;
use stepaudio_live::model::step_audio2::config::StepAudio2Config;
use stepaudio_live::model::step_audio2::llm::LlmState;
use stepaudio_live::model::step_audio2::load::random_weights;
use stepaudio_live::ops::fast::{self, FusedBatchDecoder, FusedDecoder};

#[derive(Parser, Debug)]
struct Args {
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "1,2,4,8,16,32,64,128,256"
    )]
    batches: Vec<usize>,
    /// Batch sizes also timed through candle ops (none by default).
    #[arg(long, value_delimiter = ',')]
    candle: Vec<usize>,
    #[arg(long, default_value_t = 512)]
    context: usize,
    #[arg(long, default_value_t = 28)]
    layers: usize,
    #[arg(long, default_value_t = 24)]
    steps: usize,
    #[arg(long, default_value_t = 4)]
    warmup: usize,
    #[arg(long, value_enum, default_value_t = DeviceArg::Cuda)]
    device: DeviceArg,
    #[arg(long)]
    json: Option<std::path::PathBuf>,
    /// Rows of each timed prefill (none by default).
    #[arg(long, value_delimiter = ',')]
    prefill_rows: Vec<usize>,
    /// Context lengths before the prefilled rows (each at most --context).
    #[arg(long, value_delimiter = ',', default_value = "512,256,0")]
    prefill_contexts: Vec<usize>,
    /// Streams the rows of a prefill are split over.
    #[arg(long, default_value_t = 4)]
    prefill_streams: usize,
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn main() -> Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_writer(std::io::stderr)
        .init();
    let args = Args::parse();
    // STEPAUDIO_FAST picks the paths compared (e.g. without `tiled`).
    let paths = fast::fast_paths();
    println!("fast paths: {paths}");
    let device = select_device(args.device.into())?;
    if !fast::available(&device) {
        bail!("no GPU fast paths on {device:?} in this build");
    }
    let cfg = StepAudio2Config::mini().reshaped(Some(1), Some(args.layers), None);
    let model = random_weights(&cfg, &device, DType::BF16, 3)?;
    let llm = &model.llm;
    let weights = llm.decode_weights();
    let max_b = args
        .batches
        .iter()
        .chain(&args.candle)
        .copied()
        .max()
        .unwrap_or(1);
    // Every stream's context, prefilled alone (random ids; the content does not change
    // the cost of a step).
    let prefill_streams = if args.prefill_rows.is_empty() {
        0
    } else {
        args.prefill_streams.max(1)
    };
    let max_b = max_b.max(prefill_streams);
    let longest_prefill = args
        .prefill_rows
        .iter()
        .max()
        .map_or(0, |r| r.div_ceil(prefill_streams));
    if args.prefill_contexts.iter().any(|&c| c > args.context) {
        bail!("--prefill-contexts beyond --context {}", args.context);
    }
    let cap = args.context + (args.warmup + args.steps + 8).max(longest_prefill);
    let mut states: Vec<LlmState> = Vec::with_capacity(max_b);
    for i in 0..max_b {
        let ids: Vec<u32> = (0..args.context)
            .map(|j| ((i * 7919 + j) as u64 * 2654435761 % 150000) as u32)
            .collect();
        let mut st = llm.new_state(cap);
        llm.forward(&llm.embed(&ids)?.unsqueeze(0)?, &mut st)?;
        states.push(st);
    }
    // bf16 keys and values of every layer, `cap` positions allocated per stream
    let t = &cfg.text;
    let per_position = t.num_layers * 2 * t.num_kv_heads * (t.hidden_size / t.num_heads) * 2;
    let kv_per_stream = (cap * per_position) as f64;
    println!(
        "{} layers, context {}: KV cache {:.1} MiB per stream ({cap} positions × {} KiB)",
        args.layers,
        args.context,
        kv_per_stream / 1048576.0,
        per_position / 1024
    );
    let mut rows = Vec::new();
    let mut one_ms = None;
    // The batch-1 fused step as the engine runs a lone stream.
    {
        let mut fd = FusedDecoder::default();
        let mut f = fd
            .prepare(&weights)?
            .context("fused decode did not apply")?;
        let st = &mut states[0];
        f.start(1, st.len())?;
        let mut ts = Vec::new();
        for s in 0..args.warmup + args.steps {
            let t = Instant::now();
            f.step(st)?;
            if s >= args.warmup {
                ts.push(t.elapsed().as_secs_f64() * 1e3);
            }
        }
        st.truncate(args.context);
        let ms = median(ts);
        println!("batch-1 fused step (own graph per stream): {ms:.2} ms");
        rows.push(
            json!({"path": "fused batch-1", "batch": 1, "step_ms": ms, "tokens_per_s": 1e3 / ms}),
        );
    }
    let mut bd = FusedBatchDecoder::default();
    for &b in &args.batches {
        let mut f = bd
            .prepare(&weights)?
            .context("batched fused decode did not apply")?;
        fast::device_memory_peak(&device, true);
        let before = fast::device_memory_used(&device).unwrap_or(0);
        let mut ts = Vec::new();
        let mut tokens = vec![1u32; b];
        for s in 0..args.warmup + args.steps {
            let mut st: Vec<&mut LlmState> = states[..b].iter_mut().collect();
            let t = Instant::now();
            let out = f.step(&tokens, &mut st)?;
            if s >= args.warmup {
                ts.push(t.elapsed().as_secs_f64() * 1e3);
            }
            tokens = out.into_iter().map(|(t, _)| t).collect();
        }
        let scratch = fast::device_memory_used(&device)
            .unwrap_or(0)
            .saturating_sub(before);
        states[..b]
            .iter_mut()
            .for_each(|s| s.truncate(args.context));
        let ms = median(ts);
        let base = *one_ms.get_or_insert(ms);
        println!(
            "batched fused  B={b:4}: step {ms:7.2} ms  {:8.0} tok/s  {:5.2}× the B=1 batched step  scratch {:.1} MiB",
            b as f64 * 1e3 / ms,
            ms / base,
            scratch as f64 / 1048576.0
        );
        rows.push(json!({"path": "fused batched", "batch": b, "step_ms": ms,
            "tokens_per_s": b as f64 * 1e3 / ms, "ratio_to_b1": ms / base,
            "scratch_mib_new": scratch as f64 / 1048576.0}));
    }
    fast::set_fast_paths(fast::FastPaths {
        decode: false,
        ..paths
    });
    for &b in &args.candle {
        let mut ts = Vec::new();
        for s in 0..args.warmup + args.steps.min(8) {
            let mut st: Vec<&mut LlmState> = states[..b].iter_mut().collect();
            let t = Instant::now();
            let e = llm.embed(&vec![1u32; b])?.unsqueeze(1)?;
            let h = llm.forward_step_batch(&e, &mut st)?;
            let l = llm.logits_rows(&h)?;
            let _: Vec<u32> = l.argmax(candle_core::D::Minus1)?.to_vec1()?;
            if s >= args.warmup {
                ts.push(t.elapsed().as_secs_f64() * 1e3);
            }
        }
        states[..b]
            .iter_mut()
            .for_each(|s| s.truncate(args.context));
        let ms = median(ts);
        println!(
            "candle ops     B={b:4}: step {ms:7.2} ms  {:8.0} tok/s",
            b as f64 * 1e3 / ms
        );
        rows.push(json!({"path": "candle ops", "batch": b, "step_ms": ms, "tokens_per_s": b as f64 * 1e3 / ms}));
    }
    fast::set_fast_paths(paths);
    let mut prefills = Vec::new();
    // Longest context first: a stream's cache is cut back to each context in turn.
    let mut contexts = args.prefill_contexts.clone();
    contexts.sort_unstable_by(|a, b| b.cmp(a));
    for &ctx in contexts.iter().filter(|_| prefill_streams > 0) {
        for &r in &args.prefill_rows {
            let mut f = bd
                .prepare(&weights)?
                .context("batched fused decode did not apply")?;
            // The rows shared out as evenly as they go; a stream with none left out.
            let used = prefill_streams.min(r);
            let embeds: Vec<_> = (0..used)
                .map(|i| {
                    let n = (r + used - 1 - i) / used;
                    candle_core::Tensor::randn(0f32, 1.0, (1, n, cfg.text.hidden_size), &device)
                        .and_then(|t| t.to_dtype(DType::BF16))
                })
                .collect::<candle_core::Result<_>>()?;
            let mut ts = Vec::new();
            for s in 0..args.warmup + args.steps {
                states[..used].iter_mut().for_each(|s| s.truncate(ctx));
                let mut st: Vec<&mut LlmState> = states[..used].iter_mut().collect();
                device.synchronize()?;
                let t = Instant::now();
                f.prefill(&embeds, &mut st)?
                    .context("the prefill fast path is off")?;
                device.synchronize()?;
                if s >= args.warmup {
                    ts.push(t.elapsed().as_secs_f64() * 1e3);
                }
            }
            let ms = median(ts);
            println!(
                "batched prefill  {r:4} rows over {used} streams after {ctx:4} tokens: {ms:7.2} ms  {:6.1} µs a row",
                ms * 1e3 / r as f64
            );
            prefills.push(json!({"rows": r, "streams": used, "context": ctx,
                "ms": ms, "us_per_row": ms * 1e3 / r as f64}));
        }
    }
    if let Some(p) = &args.json {
        let out = json!({"layers": args.layers, "context": args.context,
            "kv_mib_per_stream": kv_per_stream / 1048576.0, "rows": rows,
            "prefills": prefills});
        std::fs::write(p, serde_json::to_string_pretty(&out)?)?;
    }
    Ok(())
}
