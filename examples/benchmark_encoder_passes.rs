//! What one batched pass of Step-Audio 2's audio encoder (+ adapter) costs for
//! n segments of T mel frames each: the time of `audio_embeddings` on n mels
//! (median over `--reps`, the device synchronised around each), and a least-
//! squares fit `ms = fixed + per_frame · n·T` over the table. `fixed / per_frame`
//! is the pass's cost apart from its frames, counted in padded frames: what
//! `StepAudio2::encode_pass_frames` should be on this device.
//!
//!   benchmark_encoder_passes --device cuda --segments 1,4,16,32 --frames 100,300,600
//!
//! Step-Audio 2 mini's encoder shape with random weights (the LLM cut to one
//! layer: it is not run).

use anyhow::Result;
use clap::Parser;
use serde_json::json;
use std::time::Instant;
use stepaudio_live::cli::DeviceArg;
use stepaudio_live::device::{default_dtype, select_device};
use stepaudio_live::frontend::LogMel;
use stepaudio_live::model::step_audio2::config::StepAudio2Config;
use stepaudio_live::model::step_audio2::load::random_weights;

#[derive(Parser, Debug)]
struct Args {
    #[arg(long, value_delimiter = ',', default_value = "1,4,16,32")]
    segments: Vec<usize>,
    /// Mel frames a segment (100 a second).
    #[arg(long, value_delimiter = ',', default_value = "100,300,600")]
    frames: Vec<usize>,
    #[arg(long, default_value_t = 7)]
    reps: usize,
    #[arg(long, value_enum, default_value_t = DeviceArg::Cuda)]
    device: DeviceArg,
    /// Encoder layers (the mini has 32).
    #[arg(long)]
    encoder_layers: Option<usize>,
    #[arg(long)]
    json: Option<std::path::PathBuf>,
}

fn main() -> Result<()> {
    let args = Args::parse();
    let device = select_device(args.device.into())?;
    let cfg = StepAudio2Config::mini().reshaped(args.encoder_layers, Some(1), None);
    let model = random_weights(&cfg, &device, default_dtype(&device), 5)?;
    let n_mels = cfg.encoder.n_mels;
    // Log-mel-like values in [-1, 1]: the content does not change the cost.
    let mel = |t: usize, seed: usize| LogMel {
        n_mels,
        n_frames: t,
        data: (0..n_mels * t)
            .map(|k| (((k * 7919 + seed * 104_729) % 2001) as f32 / 1000.0) - 1.0)
            .collect(),
    };
    println!(
        "| segments | frames each | ms a pass (median of {}) |",
        args.reps
    );
    println!("|---:|---:|---:|");
    let mut rows = Vec::new();
    for &t in &args.frames {
        for &n in &args.segments {
            let mels: Vec<LogMel> = (0..n).map(|k| mel(t, k)).collect();
            let refs: Vec<&LogMel> = mels.iter().collect();
            model.audio_embeddings(&refs)?; // warm-up (allocations, kernel loads)
            device.synchronize()?;
            let mut times: Vec<f64> = (0..args.reps)
                .map(|_| {
                    let t0 = Instant::now();
                    model.audio_embeddings(&refs)?;
                    device.synchronize()?;
                    Ok(t0.elapsed().as_secs_f64() * 1e3)
                })
                .collect::<Result<_>>()?;
            times.sort_by(f64::total_cmp);
            let ms = times[times.len() / 2];
            println!("| {n} | {t} | {ms:.2} |");
            rows.push((n, t, ms));
        }
    }
    // Least squares: ms = a + b·(n·T).
    let k = rows.len() as f64;
    let (sx, sy) = rows.iter().fold((0.0, 0.0), |(x, y), &(n, t, ms)| {
        (x + (n * t) as f64, y + ms)
    });
    let (mx, my) = (sx / k, sy / k);
    let (sxy, sxx) = rows.iter().fold((0.0, 0.0), |(a, b), &(n, t, ms)| {
        let dx = (n * t) as f64 - mx;
        (a + dx * (ms - my), b + dx * dx)
    });
    let per_frame = if sxx > 0.0 { sxy / sxx } else { 0.0 };
    let fixed = my - per_frame * mx;
    let pass_frames = if per_frame > 0.0 {
        fixed / per_frame
    } else {
        0.0
    };
    println!(
        "fit: {fixed:.2} ms a pass + {:.3} µs a padded frame = a pass's fixed cost of {pass_frames:.0} frames",
        per_frame * 1e3
    );
    if let Some(path) = &args.json {
        let table: Vec<_> = rows
            .iter()
            .map(|&(n, t, ms)| json!({"segments": n, "frames": t, "ms": ms}))
            .collect();
        let doc = json!({
            "device": format!("{device:?}"),
            "encoder_layers": cfg.encoder.n_layer,
            "passes": table,
            "fixed_ms": fixed,
            "us_per_frame": per_frame * 1e3,
            "pass_frames": pass_frames,
        });
        std::fs::write(path, serde_json::to_vec_pretty(&doc)?)?;
    }
    Ok(())
}
