//! End-to-end offline benchmark: model load, log-mel, encoder, decoder and
//! real-time factor for one WAV, repeated; prints min/median/max.
//!
//! cargo run --release --example benchmark_e2e -- [--model tiny.en] [--runs 5] FILE.wav

use std::time::{Duration, Instant};
use stepaudio_live::audio::wav::read_wav_16k_mono;
use stepaudio_live::device::{select_device, DeviceChoice};
use stepaudio_live::model::hub::resolve_model;
use stepaudio_live::model::whisper::load::load_whisper_for_inference;
use stepaudio_live::model::whisper::DecoderWeights;
use stepaudio_live::transcribe::TranscribeOptions;

fn stats(mut v: Vec<f64>) -> (f64, f64, f64) {
    v.sort_by(f64::total_cmp);
    (v[0], v[v.len() / 2], v[v.len() - 1])
}

fn main() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1);
    let (mut model_name, mut runs, mut file, mut device) =
        ("tiny.en".to_string(), 5usize, None, DeviceChoice::Auto);
    while let Some(a) = args.next() {
        match a.as_str() {
            "--model" => model_name = args.next().expect("--model NAME"),
            "--runs" => runs = args.next().expect("--runs N").parse()?,
            "--device" => {
                device = match args.next().as_deref() {
                    Some("cpu") => DeviceChoice::Cpu,
                    Some("cuda") => DeviceChoice::Cuda,
                    Some("metal") => DeviceChoice::Metal,
                    _ => DeviceChoice::Auto,
                }
            }
            _ => file = Some(a),
        }
    }
    let file = file.unwrap_or_else(|| "../shared/eval/speech/en_jfk_ask_not.wav".into());
    let audio = read_wav_16k_mono(std::path::Path::new(&file))?;
    let seconds = audio.len() as f64 / 16000.0;
    let device = select_device(device)?;
    let dir = resolve_model(&model_name)?;
    let t = Instant::now();
    let weights = if std::env::var_os("BENCH_F32_DECODER").is_some() {
        DecoderWeights::F32
    } else {
        DecoderWeights::Int8
    };
    let model = load_whisper_for_inference(&dir, &device, candle_core::DType::F32, weights)?;
    let load = t.elapsed();
    let opts = TranscribeOptions::default();
    let _ = model.transcribe(&audio, &opts)?; // warm-up
    let ms = |d: Duration| d.as_secs_f64() * 1e3;
    let (mut total, mut mel, mut enc, mut dec, mut per_tok) =
        (vec![], vec![], vec![], vec![], vec![]);
    let mut text = String::new();
    for _ in 0..runs {
        let t = Instant::now();
        let tr = model.transcribe(&audio, &opts)?;
        total.push(ms(t.elapsed()));
        mel.push(ms(tr.timings.mel));
        enc.push(ms(tr.timings.encoder));
        dec.push(ms(tr.timings.decoder));
        per_tok.push(ms(tr.timings.decoder) / tr.timings.tokens.max(1) as f64);
        text = tr.text();
    }
    println!(
        "file {file} ({seconds:.2} s), model {model_name} on {device:?}, load {:.1} ms",
        ms(load)
    );
    println!(
        "{:<22} {:>10} {:>10} {:>10}",
        "stage (ms)", "min", "median", "max"
    );
    for (name, v) in [
        ("log-mel", mel),
        ("encoder", enc),
        ("decoder", dec),
        ("decoder per token", per_tok),
        ("total", total.clone()),
    ] {
        let (a, b, c) = stats(v);
        println!("{name:<22} {a:>10.2} {b:>10.2} {c:>10.2}");
    }
    let (_, med, _) = stats(total);
    println!(
        "RTF (median) {:.4}  ({:.1}x real time)",
        med / 1e3 / seconds,
        seconds / (med / 1e3)
    );
    println!("text: {text}");
    Ok(())
}
