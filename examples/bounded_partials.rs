//! What bounding a Whisper partial's encoder work costs and saves: every
//! English recording of the manifest is fed as one growing segment, a
//! partial every `--step` seconds (the live default, 0.5 s), to two live
//! recognisers of the same weights — one encoding the whole open segment for
//! each partial (`--full-partials`), one reusing the last partial's encoder
//! states for all but the last second (the default). Reported per recording
//! and in total: partials whose tokens are identical, the word error rate
//! of the bounded partials against the full ones (the full partial as the
//! reference), and the encoder time per partial of each (medians, same
//! process, interleaved). The final of each recording is decoded by both
//! recognisers after their partials and must be identical (finals are always
//! encoded whole).
//!
//! Usage: `cargo run --release --example bounded_partials -- [--model tiny.en]
//! [--step 0.5] [--manifest PATH] [--compute cpu|cuda] [--json OUT]`
use anyhow::Context;
use stepaudio_live::eval::wer::{score, ErrorCounts, Unit};
use stepaudio_live::model::recognizer::{Recognizer, SegmentFeatures};
use stepaudio_live::model::{LoadedModel, RecognizerOptions};

/// Raw frames of `audio` plus the recogniser's tail of zeros, as the live
/// frontend gives a segment of that audio.
fn features(rec: &dyn Recognizer, audio: &[f32]) -> SegmentFeatures {
    let spec = rec.frontend();
    let mut padded = audio.to_vec();
    padded.resize(audio.len() + spec.tail_zeros, 0.0);
    SegmentFeatures {
        n_mels: spec.n_mels,
        raw_frames: stepaudio_live::frontend::MelExtractor::new(spec.n_mels).raw_frames(&padded),
        samples: audio.len(),
    }
}

fn median_ms(v: &mut [f64]) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(f64::total_cmp);
    v[v.len() / 2] * 1e3
}

fn arg(args: &[String], name: &str) -> Option<String> {
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1).cloned())
}

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let model_name = arg(&args, "--model").unwrap_or_else(|| "tiny.en".into());
    let step: f64 = arg(&args, "--step").map_or(Ok(0.5), |s| s.parse())?;
    let compute = match arg(&args, "--compute").as_deref() {
        Some("cuda") => stepaudio_live::device::DeviceChoice::Cuda,
        _ => stepaudio_live::device::DeviceChoice::Cpu,
    };
    let manifest_path = arg(&args, "--manifest").map_or_else(
        || std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("assets/manifest.tsv"),
        Into::into,
    );
    let speech_dir = manifest_path
        .parent()
        .map(std::path::Path::to_path_buf)
        .unwrap_or_default();
    let dir = stepaudio_live::fetch::resolve(&model_name)?;
    let model = LoadedModel::load(
        &dir,
        compute,
        None,
        stepaudio_live::model::whisper::DecoderWeights::Int8,
    )?;
    let make = |full: bool| {
        model.recognizer(&RecognizerOptions {
            full_partials: full,
            ..Default::default()
        })
    };
    let (mut full, mut bounded) = (make(true)?, make(false)?);
    let manifest = std::fs::read_to_string(&manifest_path)
        .with_context(|| format!("reading {}", manifest_path.display()))?;
    let (mut t_full, mut t_bounded) = (Vec::new(), Vec::new());
    let mut errors = ErrorCounts::default();
    let (mut partials, mut identical, mut finals_equal, mut recordings) = (0, 0, 0, 0);
    let mut rows = Vec::new();
    println!(
        "{:<28} {:>8} {:>9} {:>10} {:>12} {:>12}",
        "recording", "partials", "identical", "WER vs full", "enc full ms", "enc bound ms"
    );
    for line in manifest.lines().skip(1) {
        let cols: Vec<&str> = line.split('\t').collect();
        if cols.len() < 4 || cols[2] != "en" || cols[3].parse::<f64>()? > 15.0 {
            continue;
        }
        let audio = stepaudio_live::audio::wav::read_wav_16k_mono(&speech_dir.join(cols[1]))?;
        let (mut ef, mut eb) = (Vec::new(), Vec::new());
        let mut rec_errors = ErrorCounts::default();
        let (mut n, mut same) = (0, 0);
        let hop = (step * 16_000.0) as usize;
        for end in (1..).map(|k| k * hop).take_while(|&e| e < audio.len()) {
            let f = features(&*full, &audio[..end]);
            let a = full.decode_partial(&f, &[])?;
            let b = bounded.decode_partial(&f, &[])?;
            ef.push(a.encode_time.as_secs_f64());
            eb.push(b.encode_time.as_secs_f64());
            n += 1;
            same += usize::from(a.tokens == b.tokens);
            let c = score(&a.text, &b.text, Unit::Word);
            rec_errors.add(&c);
        }
        let f = features(&*full, &audio);
        let final_full = full.decode_final(&f, &[])?;
        let final_bounded = bounded.decode_final(&f, &[])?;
        finals_equal += usize::from(final_full.tokens == final_bounded.tokens);
        recordings += 1;
        full.reset_context();
        bounded.reset_context();
        let (mf, mb) = (median_ms(&mut ef.clone()), median_ms(&mut eb.clone()));
        println!(
            "{:<28} {:>8} {:>8.0}% {:>9.2}% {:>12.1} {:>12.1}",
            cols[0],
            n,
            100.0 * same as f64 / n.max(1) as f64,
            100.0 * rec_errors.rate(),
            mf,
            mb
        );
        rows.push(serde_json::json!({
            "recording": cols[0], "partials": n, "identical": same,
            "wer_vs_full": rec_errors.rate(), "encoder_ms_full_median": mf,
            "encoder_ms_bounded_median": mb,
        }));
        partials += n;
        identical += same;
        errors.add(&rec_errors);
        t_full.extend(ef);
        t_bounded.extend(eb);
    }
    let (mf, mb) = (median_ms(&mut t_full), median_ms(&mut t_bounded));
    let total_full: f64 = t_full.iter().sum();
    let total_bounded: f64 = t_bounded.iter().sum();
    println!(
        "all: {partials} partials of {recordings} recordings ({model_name}, a partial every {step} s): \
         identical {:.1} %, WER of the bounded partials against the full ones {:.2} %; \
         encoder per partial median {mf:.1} ms full, {mb:.1} ms bounded \
         (total {:.2} s vs {:.2} s, {:.2}×); finals identical {finals_equal}/{recordings}",
        100.0 * identical as f64 / partials.max(1) as f64,
        100.0 * errors.rate(),
        total_full,
        total_bounded,
        total_full / total_bounded.max(1e-9),
    );
    if let Some(out) = arg(&args, "--json") {
        let summary = serde_json::json!({
            "model": model_name, "step_s": step, "partials": partials,
            "identical": identical, "wer_vs_full": errors.rate(),
            "encoder_ms_full_median": mf, "encoder_ms_bounded_median": mb,
            "encoder_s_full_total": total_full, "encoder_s_bounded_total": total_bounded,
            "finals_identical": finals_equal, "recordings": recordings, "rows": rows,
        });
        std::fs::write(&out, serde_json::to_string_pretty(&summary)?)?;
    }
    Ok(())
}
