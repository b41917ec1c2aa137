//! Accuracy and cost of encoding less than Whisper's full 30 s window, on
//! the English eval files of at most `--max-seconds` (default 8 s), each
//! decoded as one window:
//! - `window:W` — a shorter window of W s (audio + silence; 0 = the audio
//!   plus 2 s, rounded up to 2 s), positions from the start of the table;
//! - `fresh:M` — the full 30 s window, but only the audio's positions plus M
//!   are computed; the padding's states come from a padding-only window at
//!   the same level (`WhisperModel::encode_fresh`);
//! - `full` — the full 30 s window, as offline transcription.
//!
//! Usage: `cargo run --release --example context_experiment -- [--manifest PATH]
//! [--max-seconds S] [VARIANT…]` (default variants: full window:10 window:20 fresh:0
//! fresh:25 fresh:50 fresh:100). The manifest (default `assets/manifest.tsv`) is a
//! TSV with the columns of `assets/manifest.tsv`; its `file` column is relative to the
//! manifest's folder.
use stepaudio_live::eval::wer::{score, ErrorCounts, Unit};
use stepaudio_live::frontend::{LogMel, WHISPER_CHUNK_FRAMES};
use stepaudio_live::model::whisper::decoding::DecodingOptions;
use stepaudio_live::model::whisper::SilentWindows;

#[derive(Clone, Copy, Debug)]
enum Variant {
    Full,
    Window(usize),
    Fresh(usize),
}

fn parse(v: &str) -> anyhow::Result<Variant> {
    Ok(match v.split_once(':') {
        None if v == "full" => Variant::Full,
        Some(("window", w)) => Variant::Window(w.parse()?),
        Some(("fresh", m)) => Variant::Fresh(m.parse()?),
        _ => anyhow::bail!("unknown variant {v:?} (full, window:W, fresh:M)"),
    })
}

fn main() -> anyhow::Result<()> {
    let mut args: Vec<String> = std::env::args().skip(1).collect();
    let mut max_seconds = 8.0;
    if let Some(i) = args.iter().position(|a| a == "--max-seconds") {
        max_seconds = args.get(i + 1).map_or(Ok(8.0), |v| v.parse())?;
        args.drain(i..(i + 2).min(args.len()));
    }
    let mut manifest_path =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("assets/manifest.tsv");
    if let Some(i) = args.iter().position(|a| a == "--manifest") {
        manifest_path = args
            .get(i + 1)
            .ok_or_else(|| anyhow::anyhow!("--manifest needs a path"))?
            .into();
        args.drain(i..i + 2);
    }
    let speech_dir = manifest_path
        .parent()
        .map(std::path::Path::to_path_buf)
        .unwrap_or_default();
    if args.is_empty() {
        args = "full window:10 window:20 fresh:0 fresh:25 fresh:50 fresh:100"
            .split(' ')
            .map(String::from)
            .collect();
    }
    let variants = args
        .iter()
        .map(|a| parse(a))
        .collect::<anyhow::Result<Vec<_>>>()?;
    let dir = stepaudio_live::fetch::resolve("tiny.en")?;
    let mut model = stepaudio_live::model::whisper::load::load_whisper(
        &dir,
        &candle_core::Device::Cpu,
        candle_core::DType::F32,
    )?;
    model.decoder.quantize_for_decoding()?;
    let manifest = std::fs::read_to_string(&manifest_path)
        .map_err(|e| anyhow::anyhow!("reading {}: {e}", manifest_path.display()))?;
    let mut totals = vec![ErrorCounts::default(); variants.len()];
    let mut times = vec![Vec::new(); variants.len()];
    let prompt = model.task_tokens(None, Default::default(), false)?;
    let opts = DecodingOptions {
        timestamps: false,
        max_new_tokens: 96,
        ..Default::default()
    };
    println!("{:<30} {}", "file", args.join(" "));
    for line in manifest.lines().skip(1) {
        let cols: Vec<&str> = line.split('\t').collect();
        if cols[2] != "en" || cols[3].parse::<f64>()? > max_seconds {
            continue;
        }
        let audio = stepaudio_live::audio::wav::read_wav_16k_mono(&speech_dir.join(cols[1]))?;
        let mut row = format!("{:<30}", cols[0]);
        for (i, &variant) in variants.iter().enumerate() {
            let audio_frames = audio.len() / 160;
            let t = std::time::Instant::now();
            let cross = match variant {
                Variant::Full => model.cross_attention(
                    &model.encode(&model.mel.whisper_frames(&audio, WHISPER_CHUNK_FRAMES))?,
                )?,
                Variant::Window(w) => {
                    let frames = if w == 0 {
                        ((audio_frames + 200).div_ceil(200) * 200).min(WHISPER_CHUNK_FRAMES)
                    } else {
                        w * 100
                    };
                    model.cross_attention(
                        &model.encode(&model.mel.whisper_frames(&audio, frames))?,
                    )?
                }
                Variant::Fresh(margin) => {
                    let mut padded = audio.clone();
                    padded.resize(WHISPER_CHUNK_FRAMES * 160, 0.0);
                    let raw = model.mel.raw_frames(&padded);
                    let max = raw.iter().copied().fold(f32::NEG_INFINITY, f32::max);
                    let key = SilentWindows::level_key(max);
                    // The padding-only window is made once per level, outside the timing.
                    model.silent_states(key)?;
                    let t_fresh = std::time::Instant::now();
                    let mel = LogMel::from_raw_frames_with_max(
                        model.config.n_mels,
                        raw,
                        SilentWindows::level_max(key),
                    );
                    let cross = model.encode_fresh(&mel, audio_frames.div_ceil(2) + margin, key)?;
                    times[i].push(t_fresh.elapsed().as_secs_f64());
                    cross
                }
            };
            if !matches!(variant, Variant::Fresh(_)) {
                times[i].push(t.elapsed().as_secs_f64());
            }
            let out = model.greedy_decode(&cross, &prompt, 0, &opts)?;
            let text = model.tokenizer.decode_text(&out.tokens);
            let c = score(cols[8], &text, Unit::Word);
            row += &format!(" {:>6.2}", c.rate());
            totals[i].add(&c);
        }
        println!("{row}");
    }
    for (i, v) in args.iter().enumerate() {
        let mut t = times[i].clone();
        t.sort_by(f64::total_cmp);
        println!(
            "{v:<10} WER {:>6.2} %, encoder+cross median {:>5.0} ms over {} files",
            100.0 * totals[i].rate(),
            1e3 * t.get(t.len() / 2).copied().unwrap_or(0.0),
            t.len()
        );
    }
    Ok(())
}
