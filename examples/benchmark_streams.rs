//! Capacity of the stream engine: N simulated live streams in one process.
//!
//! Each stream plays the English recordings of `assets/` up to 30 s long
//! (the three ~50 s sonnets left out) joined with 1.5 s pauses (174 s), paced at real time in 20 ms chunks, streams starting
//! `--stagger` s apart (each from a different recording, so they do not
//! speak in unison). Every stream runs what an audio-in session of `serve`
//! runs — its own `StreamTracker` (VAD, segmenter, mel) on its own thread,
//! its updates into one shared engine (`stream::engine`), its events back
//! through the engine's sink — so the scheduler, batching and event path are
//! the server's; only the socket is missing (`scripts/ws_load.py` is the
//! over-the-wire check).
//!
//! Measured per stream and overall:
//! - end of speech → final: from the moment the last voiced frame of each
//!   recording was fed (frames within 40 dB of the recording's loudest) to
//!   the arrival of the final of the segment that holds it (p50/p95/p99);
//! - first-partial delay (speech start fed → first partial) and the gaps
//!   between partials while a segment is open (speech start → partial →
//!   partial … → speech end), p50/p95/p99/max; partials per second of speech;
//! - finals lost (a speech start without a final: must be 0), streams refused;
//! - model RTF, process CPU, RSS; the engine's batches.
//!
//! `--find-capacity`: the largest N (doubling, then bisecting) whose
//! end-of-speech→final p95 ≤ `--target-p95` (1 s) while every partial gap
//! (or the `--gap-quantile`) is ≤ `--max-partial-gap` (1.5 s) and nothing is
//! lost — dropping partials does not count as capacity.
//!
//! ```text
//! cargo run --release --example benchmark_streams -- --streams 8 [--model tiny.en] [--duration 174]
//! cargo run --release --example benchmark_streams -- --find-capacity --duration 60
//! cargo run --release --example benchmark_streams -- --streams 16 --capacity default
//! ```

use anyhow::{bail, Context, Result};
use clap::Parser;
use serde_json::json;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use stepaudio_live::audio::wav::read_wav_16k_mono;
use stepaudio_live::cli::{ComputeDType, DeviceArg};
use stepaudio_live::model::LoadedModel;
use stepaudio_live::stream::engine::{
    self, EngineConfig, EngineHandle, EngineMsg, StreamCounters, StreamEvent, StreamModel,
};
use stepaudio_live::stream::events::Event;
use stepaudio_live::stream::tracker::{StreamTracker, TrackerConfig, TrackerOutput};
use stepaudio_live::stream::usage::ProcessUsage;

const RATE: usize = 16_000;
const CHUNK: usize = RATE / 50;
const PAUSE_S: f64 = 1.5;
/// Longer recordings (the sonnets) would dominate a stream.
const MAX_RECORDING_S: usize = 30;
/// Frames quieter than this below the recording's loudest are not voiced.
const VOICED_DB: f64 = 40.0;

#[derive(Parser, Debug, Clone)]
#[command(about = "Live streams through one stream engine: latency, partial cadence, capacity")]
struct Args {
    /// Whisper model name or directory, or a Step-Audio 2 checkpoint.
    #[arg(long, default_value = "tiny.en")]
    model: String,
    /// Step-Audio 2 mini's shape with random weights instead of --model
    /// (no checkpoint needed to time it; greedy turns then run to
    /// --max-new-tokens, since random weights rarely say EOT).
    #[arg(long)]
    step_audio_random: bool,
    /// Step-Audio 2 (random): fewer LLM layers, for small devices.
    #[arg(long)]
    llm_layers: Option<usize>,
    /// Step-Audio 2 (random): fewer encoder layers.
    #[arg(long)]
    encoder_layers: Option<usize>,
    /// Step-Audio 2 (random): an encoder pass's fixed cost in padded mel
    /// frames, which groups new segments into passes (the device's default
    /// unless given).
    #[arg(long)]
    encode_pass_frames: Option<usize>,
    /// Step-Audio 2: greedy steps per turn at most.
    #[arg(long, default_value_t = 24)]
    max_new_tokens: usize,
    #[arg(long, value_enum, default_value_t = DeviceArg::Cpu)]
    device: DeviceArg,
    #[arg(long, value_enum)]
    dtype: Option<ComputeDType>,
    /// Concurrent streams.
    #[arg(long, default_value_t = 4)]
    streams: usize,
    /// Seconds of audio per stream (at most the 174 s playlist, looped past it).
    #[arg(long, default_value_t = 174.0)]
    duration: f64,
    /// Seconds between stream starts.
    #[arg(long, default_value_t = 5.0)]
    stagger: f64,
    /// Engine capacity: a number, or `default` (the engine's measured
    /// default for the model and device); default: as many as --streams.
    #[arg(long)]
    capacity: Option<String>,
    #[arg(long, default_value_t = EngineConfig::default().max_batch)]
    max_batch: usize,
    /// Budget of a batch of partials (ms).
    #[arg(long, default_value_t = EngineConfig::default().partial_budget.as_millis() as u64)]
    partial_budget_ms: u64,
    /// Least time between a stream's partials under load (ms; default: the
    /// engine's for the model and device).
    #[arg(long)]
    partial_spacing_ms: Option<u64>,
    /// Batches run at once (default: the engine's for the model and device).
    #[arg(long)]
    lanes: Option<usize>,
    /// Batch at a time instead of the continuous batch (decodes joining the
    /// running batch between steps) where the engine would use it (a GPU).
    #[arg(long)]
    no_continuous: bool,
    /// Step-Audio 2: no drafts (a segment's last hypothesis verified in the
    /// next decode's prefill), to compare.
    #[arg(long)]
    no_drafts: bool,
    /// Encode an open segment's whole audio for every partial
    /// (`--full-partials` of the binary), to compare.
    #[arg(long)]
    full_partials: bool,
    /// Continuous batch: time the partials joining in one round may take (ms).
    #[arg(long, default_value_t = EngineConfig::default().admit_budget.as_millis() as u64)]
    admit_budget_ms: u64,
    /// Continuous batch: least time between two admissions (ms).
    #[arg(long, default_value_t = EngineConfig::default().admit_interval.as_millis() as u64)]
    admit_interval_ms: u64,
    /// Continuous batch: partials yield to finals that would be out later
    /// than this after their segment's end (0: they never yield); with
    /// --final-target-ms the most the steered deadline grows to.
    #[arg(long, default_value_t = EngineConfig::default().final_deadline.map_or(0, |d| d.as_millis() as u64))]
    final_deadline_ms: u64,
    /// Continuous batch: segment end → final that 19 finals in 20 should
    /// keep; the deadline is steered to it (ms; 0: a fixed deadline).
    #[arg(long, default_value_t = EngineConfig::default().final_target.map_or(0, |d| d.as_millis() as u64))]
    final_target_ms: u64,
    /// Continuous batch: a final that has waited this long since its
    /// segment's end joins at once, between the partials' admissions (ms;
    /// 0: only at their admissions).
    #[arg(long, default_value_t = EngineConfig::default().final_admit_after.map_or(0, |d| d.as_millis() as u64))]
    final_admit_ms: u64,
    /// The tracker's partial interval (ms of new audio per partial request).
    #[arg(long, default_value_t = TrackerConfig::default().partial_interval_ms)]
    partial_interval_ms: u32,
    #[arg(long)]
    find_capacity: bool,
    /// Largest N tried by --find-capacity.
    #[arg(long, default_value_t = 64)]
    max_streams: usize,
    /// First N tried by --find-capacity (it doubles from there).
    #[arg(long, default_value_t = 1)]
    min_streams: usize,
    /// --find-capacity stops bisecting when the bound is known to within
    /// this many streams (the reported capacity is the lower end).
    #[arg(long, default_value_t = 1)]
    capacity_step: usize,
    #[arg(long, default_value_t = 1.0)]
    target_p95: f64,
    #[arg(long, default_value_t = 1.5)]
    max_partial_gap: f64,
    /// Which quantile of the partial gaps must be within --max-partial-gap
    /// (100: every gap, the issue's "a partial at least every 1.5 s").
    #[arg(long, default_value_t = 100.0)]
    gap_quantile: f64,
    /// Seconds of one stream run first and not reported (a fresh GPU
    /// compiles its kernels on first use: seconds of delay).
    #[arg(long, default_value_t = 6.0)]
    warmup: f64,
    /// Write every number as JSON here.
    #[arg(long)]
    json: Option<PathBuf>,
}

/// `$STEPAUDIO_LIVE_SPEECH_DIR`, else `assets/` of the source tree, else of
/// the current directory (a binary carried to another machine).
fn speech_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("STEPAUDIO_LIVE_SPEECH_DIR") {
        return PathBuf::from(dir);
    }
    let built = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("assets");
    if built.exists() {
        built
    } else {
        PathBuf::from("assets")
    }
}

/// One recording in the playlist: where its audio lies and where its voicing ends.
#[derive(Clone, Debug)]
struct Utterance {
    start: f64,
    voiced_end: f64,
}

struct Playlist {
    audio: Vec<f32>,
    utterances: Vec<Utterance>,
}

/// The last voiced 10 ms frame's end (s), relative to `audio`'s start.
fn voiced_end(audio: &[f32]) -> f64 {
    let frame = RATE / 100;
    let energies: Vec<f64> = audio
        .chunks(frame)
        .map(|c| c.iter().map(|&x| (x as f64) * (x as f64)).sum::<f64>() / c.len() as f64)
        .collect();
    let loudest = energies.iter().copied().fold(0.0, f64::max);
    let floor = loudest * 10f64.powf(-VOICED_DB / 10.0);
    let last = energies.iter().rposition(|&e| e > floor).unwrap_or(0);
    ((last + 1) * frame).min(audio.len()) as f64 / RATE as f64
}

fn load_playlist() -> Result<Playlist> {
    let manifest = std::fs::read_to_string(speech_dir().join("manifest.tsv"))
        .context("reading assets/manifest.tsv")?;
    let mut audio = Vec::new();
    let mut utterances = Vec::new();
    for line in manifest.lines().skip(1) {
        let cols: Vec<&str> = line.split('\t').collect();
        if cols.len() < 3 || cols[2] != "en" {
            continue;
        }
        let clip = read_wav_16k_mono(&speech_dir().join(cols[1]))
            .with_context(|| format!("reading {}", cols[1]))?;
        if clip.len() > MAX_RECORDING_S * RATE {
            continue;
        }
        let start = audio.len() as f64 / RATE as f64;
        utterances.push(Utterance {
            start,
            voiced_end: start + voiced_end(&clip),
        });
        audio.extend_from_slice(&clip);
        audio.extend(std::iter::repeat_n(0.0, (PAUSE_S * RATE as f64) as usize));
    }
    if utterances.is_empty() {
        bail!("no English recordings in assets/manifest.tsv");
    }
    Ok(Playlist { audio, utterances })
}

/// What one stream saw, with wall times relative to its start.
#[derive(Default)]
struct StreamLog {
    refused: bool,
    /// (segment, stream time of its start, wall time it was fed).
    speech_starts: Vec<(u64, f64)>,
    speech_ends: Vec<(u64, f64)>,
    partials: Vec<(u64, f64)>,
    /// (segment, stream start, stream end, arrival, the engine's latency_ms
    /// unless the segment ended because the run did).
    finals: Vec<(u64, f64, f64, f64, Option<f64>)>,
    /// Stream times of voiced ends fed (from the playlist, looped).
    voiced_ends: Vec<f64>,
    audio_seconds: f64,
    model_seconds: f64,
    skipped_partials: u64,
    unchanged_partials: u64,
}

/// Runs one simulated stream to its end; returns its log.
fn run_stream(
    id: u64,
    engine: EngineHandle,
    playlist: &Playlist,
    offset: usize,
    delay: f64,
    args: &Args,
) -> Result<StreamLog> {
    let (duration, partial_interval_ms) = (args.duration, args.partial_interval_ms);
    std::thread::sleep(Duration::from_secs_f64(delay));
    let log = Arc::new(Mutex::new(StreamLog::default()));
    let t0 = Instant::now();
    let secs = move |t: Instant| t.duration_since(t0).as_secs_f64();
    let counters = Arc::new(StreamCounters::default());
    let (opened_tx, opened_rx) = crossbeam_channel::bounded(1);
    let (closed_tx, closed_rx) = crossbeam_channel::bounded(1);
    let sink = {
        let log = log.clone();
        move |ev| match ev {
            StreamEvent::Opened(r) => {
                let _ = opened_tx.try_send(r.map_err(|e| e.to_string()));
            }
            StreamEvent::Event(ev) => {
                let now = secs(Instant::now());
                let mut log = log.lock().unwrap();
                match ev {
                    Event::Partial { segment, .. } => log.partials.push((segment, now)),
                    Event::Final {
                        segment,
                        start,
                        end,
                        latency_ms,
                        reason,
                        ..
                    } => {
                        // The end of the run is not the end of speech.
                        let latency = (reason != "flush").then_some(latency_ms);
                        log.finals.push((segment, start, end, now, latency))
                    }
                    _ => {}
                }
            }
            StreamEvent::Closed(_) => {
                let _ = closed_tx.try_send(());
            }
        }
    };
    let options = stepaudio_live::model::RecognizerOptions {
        step_audio_max_new_tokens: args.max_new_tokens,
        step_audio_drafts: !args.no_drafts,
        full_partials: args.full_partials,
        ..Default::default()
    };
    // The engine makes the recogniser, between batches (as for a server session).
    engine.send(EngineMsg::Open {
        id,
        model: StreamModel::Options(options),
        events: Box::new(sink),
        counters: counters.clone(),
    });
    let (frontend, max_seconds) = match opened_rx.recv()? {
        Ok(info) => (info.frontend, info.max_segment_seconds),
        Err(_) => {
            return Ok(StreamLog {
                refused: true,
                ..Default::default()
            });
        }
    };
    let config = TrackerConfig {
        partial_interval_ms,
        ..TrackerConfig::default()
    };
    let mut tracker = StreamTracker::new(&config, frontend, max_seconds)?;
    let total = (duration * RATE as f64) as usize;
    let n = playlist.audio.len();
    let mut outputs = Vec::new();
    let mut fed = 0;
    let forward = |outputs: &mut Vec<TrackerOutput>, log: &Mutex<StreamLog>| {
        for o in outputs.drain(..) {
            match o {
                TrackerOutput::Event(Event::SpeechStart { segment, .. }) => log
                    .lock()
                    .unwrap()
                    .speech_starts
                    .push((segment, secs(Instant::now()))),
                TrackerOutput::Event(Event::SpeechEnd { segment, .. }) => log
                    .lock()
                    .unwrap()
                    .speech_ends
                    .push((segment, secs(Instant::now()))),
                TrackerOutput::Event(_) => {}
                TrackerOutput::Update(update) => {
                    counters.pending.fetch_add(1, Ordering::Relaxed);
                    engine.send(EngineMsg::Update { id, update });
                }
                TrackerOutput::Resume { segment } => {
                    engine.send(EngineMsg::Resume { id, segment });
                }
            }
        }
    };
    // The playlist's voiced ends, in this stream's time (it starts at `offset`, looped).
    {
        let mut log = log.lock().unwrap();
        let period = n as f64 / RATE as f64;
        let from = offset as f64 / RATE as f64;
        for lap in 0..=(duration / period).ceil() as usize {
            for u in &playlist.utterances {
                let t = u.voiced_end - from + lap as f64 * period;
                if t > 0.0 && t <= duration && u.start - from + lap as f64 * period >= 0.0 {
                    log.voiced_ends.push(t);
                }
            }
        }
        log.voiced_ends.sort_by(f64::total_cmp);
    }
    while fed < total {
        let k = CHUNK.min(total - fed);
        let chunk: Vec<f32> = (0..k)
            .map(|i| playlist.audio[(offset + fed + i) % n])
            .collect();
        fed += k;
        // Real time: the chunk's last sample is "heard" at its stream time.
        let due = t0 + Duration::from_secs_f64(fed as f64 / RATE as f64);
        if let Some(wait) = due.checked_duration_since(Instant::now()) {
            std::thread::sleep(wait);
        }
        tracker.push(&chunk, Instant::now(), &mut outputs);
        forward(&mut outputs, &log);
    }
    tracker.finish(&mut outputs);
    forward(&mut outputs, &log);
    engine.send(EngineMsg::Close { id });
    closed_rx
        .recv_timeout(Duration::from_secs(600))
        .context("the engine never closed the stream")?;
    // The engine may still hold the sink (and its clone of the log) for a moment.
    let mut log = std::mem::take(&mut *log.lock().unwrap());
    log.audio_seconds = fed as f64 / RATE as f64;
    log.model_seconds = counters.model_time().as_secs_f64();
    log.skipped_partials = counters.skipped_partials.load(Ordering::Relaxed);
    log.unchanged_partials = counters.unchanged_partials.load(Ordering::Relaxed);
    Ok(log)
}

fn pct(v: &[f64], q: f64) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    let mut v = v.to_vec();
    v.sort_by(f64::total_cmp);
    let k = (v.len() - 1) as f64 * q / 100.0;
    let (lo, hi) = (k.floor() as usize, k.ceil() as usize);
    v[lo] + (v[hi] - v[lo]) * (k - lo as f64)
}

/// The numbers of one stream (or of all, pooled).
#[derive(Default, Debug, Clone)]
struct Measures {
    end_to_final: Vec<f64>,
    first_partial: Vec<f64>,
    partial_gaps: Vec<f64>,
    partials: usize,
    speech_seconds: f64,
    lost: usize,
    segments: usize,
    /// Per measured utterance: (voiced end, segment end, the engine's
    /// segment-end→final latency, voiced end→final), seconds.
    detail: Vec<(f64, f64, f64, f64)>,
    /// Where the longest partial gap lies: (gap, from, to, segment); `to` is
    /// the segment's end of speech when the gap is its last.
    longest_gap: Option<(f64, f64, f64, u64)>,
}

impl Measures {
    fn of(log: &StreamLog) -> Self {
        let mut m = Measures {
            segments: log.speech_starts.len(),
            ..Default::default()
        };
        for &(seg, started) in &log.speech_starts {
            let Some(&(_, start, end, arrival, latency_ms)) =
                log.finals.iter().find(|f| f.0 == seg)
            else {
                m.lost += 1;
                continue;
            };
            let ended = log
                .speech_ends
                .iter()
                .find(|e| e.0 == seg)
                .map_or(arrival, |e| e.1);
            m.speech_seconds += (end - start).max(0.0);
            let parts: Vec<f64> = log
                .partials
                .iter()
                .filter(|p| p.0 == seg && p.1 <= ended)
                .map(|p| p.1)
                .collect();
            if let Some(&first) = parts.first() {
                m.first_partial.push(first - started);
            }
            m.partials += parts.len();
            let mut last = started;
            for &p in parts.iter().chain([&ended]) {
                m.partial_gaps.push(p - last);
                if m.longest_gap.is_none_or(|g| p - last > g.0) {
                    m.longest_gap = Some((p - last, last, p, seg));
                }
                last = p;
            }
            // Each recording's last voiced frame, if this segment holds it.
            let Some(latency_ms) = latency_ms else {
                continue;
            };
            for &v in &log.voiced_ends {
                if v > start && v <= end + 0.05 {
                    m.end_to_final.push(arrival - v);
                    m.detail.push((v, end, latency_ms / 1e3, arrival - v));
                }
            }
        }
        m
    }

    fn merge(&mut self, o: &Measures) {
        self.end_to_final.extend(&o.end_to_final);
        self.first_partial.extend(&o.first_partial);
        self.partial_gaps.extend(&o.partial_gaps);
        self.partials += o.partials;
        self.speech_seconds += o.speech_seconds;
        self.lost += o.lost;
        self.segments += o.segments;
        self.detail.extend(&o.detail);
        if let Some(g) = o
            .longest_gap
            .filter(|g| self.longest_gap.is_none_or(|s| g.0 > s.0))
        {
            self.longest_gap = Some(g);
        }
    }

    fn summary(&self) -> serde_json::Value {
        let q = |v: &[f64]| json!({"p50": pct(v, 50.0), "p95": pct(v, 95.0), "p99": pct(v, 99.0), "max": pct(v, 100.0), "n": v.len()});
        json!({
            "end_of_speech_to_final_s": q(&self.end_to_final),
            "first_partial_s": q(&self.first_partial),
            "partial_gap_s": q(&self.partial_gaps),
            "longest_gap": self.longest_gap.map(|(gap, from, to, segment)| json!({"gap": gap, "from": from, "to": to, "segment": segment})),
            "partials_per_speech_second": self.partials as f64 / self.speech_seconds.max(1e-9),
            "segments": self.segments,
            "finals_lost": self.lost,
            "segment_end_to_final_s": q(&self.detail.iter().map(|d| d.2).collect::<Vec<_>>()),
            "utterances": self.detail.iter().map(|d| json!({"voiced_end": d.0, "segment_end": d.1, "segment_end_to_final": d.2, "end_to_final": d.3})).collect::<Vec<_>>(),
        })
    }
}

/// One run with `n` streams: (pooled measures, refused streams, the report).
fn run(
    args: &Args,
    model: &LoadedModel,
    playlist: &Playlist,
    n: usize,
) -> Result<(Measures, usize, serde_json::Value)> {
    let mut config = EngineConfig::for_model(model);
    config.max_batch = args.max_batch;
    config.partial_budget = Duration::from_millis(args.partial_budget_ms);
    if let Some(ms) = args.partial_spacing_ms {
        config.partial_spacing = Duration::from_millis(ms);
    }
    if let Some(lanes) = args.lanes {
        config.lanes = lanes;
    }
    config.continuous &= !args.no_continuous;
    config.admit_budget = Duration::from_millis(args.admit_budget_ms);
    config.admit_interval = Duration::from_millis(args.admit_interval_ms);
    config.final_deadline =
        (args.final_deadline_ms > 0).then(|| Duration::from_millis(args.final_deadline_ms));
    config.final_target =
        (args.final_target_ms > 0).then(|| Duration::from_millis(args.final_target_ms));
    config.final_admit_after =
        (args.final_admit_ms > 0).then(|| Duration::from_millis(args.final_admit_ms));
    config.max_streams = match args.capacity.as_deref() {
        None => n,
        Some("default") => config.max_streams,
        Some(c) => c.parse().context("--capacity: a number or `default`")?,
    };
    let capacity = config.max_streams;
    let spacing_ms = config.partial_spacing.as_millis() as u64;
    let ms = |d: Option<Duration>| d.map(|d| d.as_millis() as u64);
    let scheduler = json!({
        "admit_budget_ms": config.admit_budget.as_millis() as u64,
        "admit_interval_ms": config.admit_interval.as_millis() as u64,
        "final_deadline_ms": ms(config.final_deadline),
        "final_target_ms": ms(config.final_target),
    });
    let (engine, thread) = engine::spawn(model.clone(), config)?;
    let usage0 = ProcessUsage::read();
    let started = Instant::now();
    let step = playlist.audio.len() / n.max(1);
    let logs: Vec<Result<StreamLog>> = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..n)
            .map(|i| {
                let engine = engine.clone();
                let delay = i as f64 * args.stagger;
                scope.spawn(move || {
                    run_stream(i as u64 + 1, engine, playlist, i * step, delay, args)
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| {
                h.join()
                    .unwrap_or_else(|_| Err(anyhow::anyhow!("stream thread panicked")))
            })
            .collect()
    });
    let wall = started.elapsed().as_secs_f64();
    let usage = ProcessUsage::read();
    let stats = engine.stats();
    drop(engine);
    thread
        .join()
        .map_err(|_| anyhow::anyhow!("engine panicked"))?;
    let logs = logs.into_iter().collect::<Result<Vec<_>>>()?;
    let mut all = Measures::default();
    let mut per_stream = Vec::new();
    let mut refused = 0;
    let (mut audio, mut model_s, mut skipped, mut unchanged) = (0.0, 0.0, 0, 0);
    for (i, log) in logs.iter().enumerate() {
        if log.refused {
            refused += 1;
            per_stream.push(json!({"stream": i + 1, "refused": true}));
            continue;
        }
        let m = Measures::of(log);
        all.merge(&m);
        audio += log.audio_seconds;
        model_s += log.model_seconds;
        skipped += log.skipped_partials;
        unchanged += log.unchanged_partials;
        let mut s = m.summary();
        s["stream"] = json!(i + 1);
        s["skipped_partials"] = json!(log.skipped_partials);
        s["unchanged_partials"] = json!(log.unchanged_partials);
        per_stream.push(s);
    }
    let report = json!({
        "streams": n,
        "capacity": capacity,
        "refused": refused,
        "overall": all.summary(),
        "rtf": model_s / audio.max(1e-9),
        "cpu_percent": (usage.cpu_seconds - usage0.cpu_seconds) / wall * 100.0,
        "rss_mb": usage.rss_mb,
        "peak_rss_mb": usage.peak_rss_mb,
        "skipped_partials": skipped,
        "unchanged_partials": unchanged,
        "engine": stats,
        "partial_spacing_ms": spacing_ms,
        "scheduler": scheduler,
        "kv_pool": kv_pool(model),
        "wall_s": wall,
        "per_stream": per_stream,
    });
    Ok((all, refused, report))
}

/// The Step-Audio 2 streams' KV cache pool: slots, positions a slot, MiB.
fn kv_pool(model: &LoadedModel) -> serde_json::Value {
    match model {
        LoadedModel::StepAudio2(sa) => sa.kv_pool().map_or(json!(null), |p| {
            json!({"slots": p.slots(), "positions": p.shape().positions, "mib": p.bytes() >> 20})
        }),
        LoadedModel::Whisper(_) => json!(null),
    }
}

fn print_run(report: &serde_json::Value) {
    let o = &report["overall"];
    let f = |v: &serde_json::Value| v.as_f64().unwrap_or(f64::NAN);
    let e = &o["end_of_speech_to_final_s"];
    let g = &o["partial_gap_s"];
    let p = &o["first_partial_s"];
    println!(
        "streams {:>3} (refused {}): end→final p50 {:.0} / p95 {:.0} / p99 {:.0} ms (n={}); first partial p50 {:.0} ms; partial gap p95 {:.0} / p99 {:.0} / max {:.0} ms; {:.2} partials/s; lost {}; RTF {:.3}; CPU {:.0} %; RSS {:.0} MB; mean batch {:.2}",
        report["streams"], report["refused"],
        f(&e["p50"]) * 1e3, f(&e["p95"]) * 1e3, f(&e["p99"]) * 1e3, e["n"],
        f(&p["p50"]) * 1e3,
        f(&g["p95"]) * 1e3, f(&g["p99"]) * 1e3, f(&g["max"]) * 1e3,
        f(&o["partials_per_speech_second"]),
        o["finals_lost"], f(&report["rtf"]), f(&report["cpu_percent"]), f(&report["rss_mb"]),
        f(&report["engine"]["mean_batch"]),
    );
    for s in report["per_stream"].as_array().into_iter().flatten() {
        if s["refused"].as_bool() == Some(true) {
            println!("  stream {:>3}: refused (too_many_sessions)", s["stream"]);
            continue;
        }
        let e = &s["end_of_speech_to_final_s"];
        println!(
            "  stream {:>3}: end→final p50 {:.0} / p95 {:.0} ms, partial gap max {:.0} ms, lost {}, skipped partials {}, unchanged (not sent) {}",
            s["stream"], f(&e["p50"]) * 1e3, f(&e["p95"]) * 1e3,
            f(&s["partial_gap_s"]["max"]) * 1e3, s["finals_lost"], s["skipped_partials"],
            s["unchanged_partials"]
        );
    }
}

/// Whether a run meets the capacity bound.
fn holds(args: &Args, m: &Measures, refused: usize) -> bool {
    refused == 0
        && m.lost == 0
        && pct(&m.end_to_final, 95.0) <= args.target_p95
        && pct(&m.partial_gaps, args.gap_quantile) <= args.max_partial_gap
}

fn main() -> Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let args = Args::parse();
    let model = if args.step_audio_random {
        step_audio_random(&args)?
    } else {
        let dir = stepaudio_live::fetch::resolve(&args.model)?;
        LoadedModel::load(
            &dir,
            args.device.into(),
            args.dtype.map(ComputeDType::dtype),
            stepaudio_live::model::whisper::DecoderWeights::Int8,
        )?
    };
    let playlist = load_playlist()?;
    eprintln!(
        "playlist: {} recordings, {:.0} s; {} per stream, streams {} s apart",
        playlist.utterances.len(),
        playlist.audio.len() as f64 / RATE as f64,
        args.duration,
        args.stagger
    );
    if args.warmup > 0.0 {
        let warm = Args {
            duration: args.warmup,
            capacity: None,
            ..args.clone()
        };
        run(&warm, &model, &playlist, 1)?;
    }
    let mut runs = Vec::new();
    // The JSON is rewritten after every run, so a run cut short keeps what it measured.
    let save = |runs: &Vec<serde_json::Value>| -> Result<()> {
        if let Some(p) = &args.json {
            let doc = json!({
                "model": args.model,
                "device": format!("{:?}", args.device),
                "cores": std::thread::available_parallelism().map_or(1, |n| n.get()),
                "duration_s": args.duration,
                "stagger_s": args.stagger,
                "runs": runs,
            });
            std::fs::write(p, serde_json::to_string_pretty(&doc)?)?;
        }
        Ok(())
    };
    if args.find_capacity {
        // Doubling until the bound breaks, then bisecting.
        let (mut good, mut bad) = (0, None);
        let mut n = args.min_streams.max(1);
        while bad.is_none() && n <= args.max_streams {
            let (m, refused, report) = run(&args, &model, &playlist, n)?;
            print_run(&report);
            runs.push(report);
            save(&runs)?;
            if holds(&args, &m, refused) {
                good = n;
                // the largest N is tried too when doubling passes it
                n = if n < args.max_streams {
                    (n * 2).min(args.max_streams)
                } else {
                    n + 1
                };
            } else {
                bad = Some(n);
            }
        }
        if let Some(mut hi) = bad {
            while hi - good > args.capacity_step.max(1) {
                let mid = (good + hi) / 2;
                let (m, refused, report) = run(&args, &model, &playlist, mid)?;
                print_run(&report);
                runs.push(report);
                save(&runs)?;
                if holds(&args, &m, refused) {
                    good = mid;
                } else {
                    hi = mid;
                }
            }
        }
        println!(
            "capacity: {good} real-time streams (end→final p95 ≤ {} s, partial gap q{} ≤ {} s, nothing lost)",
            args.target_p95, args.gap_quantile, args.max_partial_gap
        );
        runs.push(json!({"capacity": good}));
    } else {
        let (_, _, report) = run(&args, &model, &playlist, args.streams)?;
        print_run(&report);
        runs.push(report);
    }
    save(&runs)
}

/// Step-Audio 2 mini's configuration with random weights (the tokenizer of
/// the test fixture, which has the real vocabulary's special tokens).
/// The tiny checkpoint's tokenizer with a word of its own (" w<id>") for
/// every id of a `vocab`-sized vocabulary that it lacks, written to the temp
/// directory. With the tiny vocabulary (669 ids) most of a random model's
/// picks read as nothing, every partial of a segment has the same (empty)
/// text, and a partial whose text did not change is not sent: the partial
/// gaps measured would be the tokenizer's, not the engine's.
fn covering_tokenizer(tiny: &Path, vocab: usize) -> Result<PathBuf> {
    let mut doc: serde_json::Value = serde_json::from_slice(&std::fs::read(tiny)?)?;
    let taken: usize = doc["added_tokens"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|t| t["id"].as_u64())
        .chain(
            doc["model"]["vocab"]
                .as_object()
                .into_iter()
                .flatten()
                .filter_map(|(_, id)| id.as_u64()),
        )
        .max()
        .map_or(0, |m| m as usize + 1);
    let words = doc["model"]["vocab"]
        .as_object_mut()
        .context("the tiny tokenizer has no BPE vocabulary")?;
    for id in taken..vocab {
        // "Ġ" is the byte-level form of a leading space.
        words.insert(format!("\u{120}w{id}"), json!(id));
    }
    let path = std::env::temp_dir().join(format!("stepaudio-random-tokenizer-{vocab}.json"));
    std::fs::write(&path, serde_json::to_vec(&doc)?)?;
    Ok(path)
}

fn step_audio_random(args: &Args) -> Result<LoadedModel> {
    use stepaudio_live::model::step_audio2::{
        config::StepAudio2Config, load, prompt::StepTokenizer,
    };
    let device = stepaudio_live::device::select_device(args.device.into())?;
    let dtype = args.dtype.map_or_else(
        || stepaudio_live::device::default_dtype(&device),
        ComputeDType::dtype,
    );
    let cfg = StepAudio2Config::mini().reshaped(args.encoder_layers, args.llm_layers, None);
    // From the source tree, or (a binary carried to another machine) the current directory.
    let rel = "tests/fixtures/step_audio2/tiny_ckpt/tokenizer.json";
    let built = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(rel);
    let tiny = if built.exists() {
        built
    } else {
        PathBuf::from(rel)
    };
    let tokenizer = StepTokenizer::load(&covering_tokenizer(&tiny, cfg.text.vocab_size)?)?;
    let model = load::random_weights(&cfg, &device, dtype, 0)?;
    let mut sa = stepaudio_live::model::step_audio2::StepAudio2::new(model, tokenizer)?;
    if let Some(frames) = args.encode_pass_frames {
        sa.encode_pass_frames = frames;
    }
    Ok(LoadedModel::StepAudio2(Arc::new(sa)))
}
