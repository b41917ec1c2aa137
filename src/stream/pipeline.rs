//! The live pipeline's threads:
//!
//! ```text
//! source ─ring─► audio thread (resample, StreamTracker) ─crossbeam─► inference thread
//!                     │ speech start/end                               (Recognizer,
//!                     ▼                                                 SegmentDecoder)
//!                 events channel ◄──────────── partials, finals ──────────┘
//!                     ▼
//!                 caller's thread: sink (stdout, WebSocket), stats
//! ```
//!
//! Stopping (Ctrl-C, SIGTERM, end of input, device failure) flows the same
//! way: the audio thread finalises the open segment and closes its channel,
//! the inference thread decodes every final still queued (skipping stale
//! partials) and closes the events channel, and the caller's loop ends once
//! the last event is delivered. No produced transcript is dropped.

use super::decoder::SegmentDecoder;
use super::events::{Event, Stats};
use super::tracker::{StreamTracker, TrackerConfig, TrackerOutput, UpdateKind};
use crate::audio::resample::StreamResampler;
use crate::audio::source::StartedSource;
use crate::audio::MODEL_SAMPLE_RATE;
use crate::model::recognizer::Recognizer;
use crossbeam_channel::{Receiver, RecvTimeoutError, Sender};
use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// A live microphone that delivers nothing for this long has failed.
const MIC_SILENCE_TIMEOUT: Duration = Duration::from_secs(3);
/// How often the audio thread polls the ring when it is empty.
const POLL_INTERVAL: Duration = Duration::from_millis(5);

#[derive(Clone, Debug)]
pub struct LiveOptions {
    pub tracker: TrackerConfig,
    /// Emit a stats event this often (and once at the end); `None` only at the end.
    pub stats_interval: Option<Duration>,
}

#[derive(Debug, thiserror::Error)]
pub enum LiveError {
    #[error("audio source failed: {0}")]
    Source(String),
    #[error("{0}")]
    Setup(String),
    #[error(
        "{failed} segment(s) could not be decoded (their finals have reason `error`); first: {first}"
    )]
    Decode { failed: u64, first: String },
}

pub enum InferenceMsg {
    Update(super::tracker::SegmentUpdate),
    Resume { segment: u64 },
}

/// Counters shared by the threads, read for stats events.
#[derive(Debug, Default)]
pub struct PipelineCounters {
    pub samples_16k: AtomicU64,
    pub skipped_partials: AtomicU64,
    pub segments: AtomicU64,
    pub finals: AtomicU64,
    pub model_micros: AtomicU64,
}

pub struct LiveSummary {
    pub stats: Stats,
}

/// Runs the pipeline until the input ends or `stop` is raised, handing every
/// event to `on_event` on the calling thread.
pub fn run_live(
    source: StartedSource,
    recognizer: Box<dyn Recognizer>,
    opts: &LiveOptions,
    stop: Arc<AtomicBool>,
    mut on_event: impl FnMut(&Event),
) -> Result<LiveSummary, LiveError> {
    let started = Instant::now();
    let counters = Arc::new(PipelineCounters::default());
    let ring_shared = source.reader.shared.clone();
    let (events_tx, events_rx) = crossbeam_channel::unbounded::<Event>();
    let (infer_tx, infer_rx) = crossbeam_channel::unbounded::<InferenceMsg>();
    let frontend = recognizer.frontend();
    let max_seconds = recognizer.max_segment_seconds();
    let tracker = StreamTracker::new(&opts.tracker, frontend, max_seconds)
        .map_err(|e| LiveError::Setup(e.to_string()))?;

    let StartedSource {
        reader,
        sample_rate,
        live,
        guard,
        description,
    } = source;
    tracing::info!(source = %description, model = %recognizer.name(), "live transcription started");
    let audio = {
        let (events_tx, counters, stop) = (events_tx.clone(), counters.clone(), stop.clone());
        std::thread::Builder::new()
            .name("audio".into())
            .spawn(move || {
                audio_thread(
                    reader,
                    sample_rate,
                    live,
                    tracker,
                    stop,
                    infer_tx,
                    events_tx,
                    counters,
                )
            })
            .map_err(|e| LiveError::Setup(format!("cannot start audio thread: {e}")))?
    };
    let inference = {
        let counters = counters.clone();
        std::thread::Builder::new()
            .name("inference".into())
            .spawn(move || inference_thread(recognizer, infer_rx, events_tx, counters))
            .map_err(|e| LiveError::Setup(format!("cannot start inference thread: {e}")))?
    };

    let stats = |counters: &PipelineCounters| -> Stats {
        let audio_seconds =
            counters.samples_16k.load(Ordering::Relaxed) as f64 / MODEL_SAMPLE_RATE as f64;
        let model = counters.model_micros.load(Ordering::Relaxed) as f64 / 1e6;
        let wall = started.elapsed().as_secs_f64();
        let usage = super::usage::ProcessUsage::read();
        Stats {
            audio_seconds,
            wall_seconds: wall,
            dropped_samples: ring_shared.dropped_samples.load(Ordering::Relaxed),
            overflow_events: ring_shared.overflow_events.load(Ordering::Relaxed),
            skipped_partials: counters.skipped_partials.load(Ordering::Relaxed),
            segments: counters.segments.load(Ordering::Relaxed),
            finals: counters.finals.load(Ordering::Relaxed),
            model_rtf: if audio_seconds > 0.0 {
                model / audio_seconds
            } else {
                0.0
            },
            cpu_percent: if wall > 0.0 {
                usage.cpu_seconds / wall * 100.0
            } else {
                0.0
            },
            rss_mb: usage.rss_mb,
            peak_rss_mb: usage.peak_rss_mb,
        }
    };

    let mut next_stats = opts.stats_interval.map(|i| Instant::now() + i);
    let mut last_overflow = 0;
    loop {
        let timeout = next_stats.map_or(Duration::from_millis(250), |t| {
            t.saturating_duration_since(Instant::now())
        });
        match events_rx.recv_timeout(timeout) {
            Ok(ev) => on_event(&ev),
            Err(RecvTimeoutError::Timeout) => {}
            Err(RecvTimeoutError::Disconnected) => break,
        }
        let overflows = ring_shared.overflow_events.load(Ordering::Relaxed);
        if overflows > last_overflow {
            tracing::warn!(
                dropped_samples = ring_shared.dropped_samples.load(Ordering::Relaxed),
                "audio ring overflowed: the pipeline fell behind the source"
            );
            last_overflow = overflows;
        }
        if let (Some(t), Some(interval)) = (next_stats, opts.stats_interval) {
            if Instant::now() >= t {
                on_event(&Event::Stats(stats(&counters)));
                next_stats = Some(t + interval);
            }
        }
    }
    let audio_result = audio
        .join()
        .map_err(|_| LiveError::Setup("audio thread panicked".into()))?;
    let inference_result = inference
        .join()
        .map_err(|_| LiveError::Setup("inference thread panicked".into()))?;
    drop(guard);
    let final_stats = stats(&counters);
    on_event(&Event::Stats(final_stats.clone()));
    audio_result?;
    inference_result?;
    Ok(LiveSummary { stats: final_stats })
}

#[allow(clippy::too_many_arguments)]
fn audio_thread(
    mut reader: crate::audio::ring::RingReader,
    sample_rate: u32,
    live: bool,
    mut tracker: StreamTracker,
    stop: Arc<AtomicBool>,
    infer_tx: Sender<InferenceMsg>,
    events_tx: Sender<Event>,
    counters: Arc<PipelineCounters>,
) -> Result<(), LiveError> {
    let mut resampler = if sample_rate == MODEL_SAMPLE_RATE {
        None
    } else {
        Some(
            StreamResampler::new(sample_rate, MODEL_SAMPLE_RATE)
                .map_err(|e| LiveError::Setup(e.to_string()))?,
        )
    };
    let mut buf = vec![0f32; (sample_rate as usize / 50).max(256)];
    let mut outputs = Vec::new();
    let mut last_data = Instant::now();
    let mut failure = None;
    let forward = |outputs: &mut Vec<TrackerOutput>| {
        for out in outputs.drain(..) {
            match out {
                TrackerOutput::Event(ev) => {
                    if matches!(ev, Event::SpeechStart { .. }) {
                        counters.segments.fetch_add(1, Ordering::Relaxed);
                    }
                    let _ = events_tx.send(ev);
                }
                TrackerOutput::Update(u) => {
                    let _ = infer_tx.send(InferenceMsg::Update(u));
                }
                TrackerOutput::Resume { segment } => {
                    let _ = infer_tx.send(InferenceMsg::Resume { segment });
                }
            }
        }
    };
    loop {
        let n = reader.read(&mut buf);
        if n > 0 {
            let now = Instant::now();
            last_data = now;
            let samples = match &mut resampler {
                Some(r) => r
                    .push(&buf[..n])
                    .map_err(|e| LiveError::Setup(e.to_string()))?,
                None => buf[..n].to_vec(),
            };
            counters
                .samples_16k
                .fetch_add(samples.len() as u64, Ordering::Relaxed);
            tracker.push(&samples, now, &mut outputs);
            forward(&mut outputs);
            continue;
        }
        if let Some(msg) = reader.shared.failure() {
            failure = Some(msg);
            break;
        }
        if reader.is_drained() || stop.load(Ordering::Relaxed) {
            break;
        }
        if live && last_data.elapsed() > MIC_SILENCE_TIMEOUT {
            failure = Some(format!(
                "no audio from the source for {} s",
                MIC_SILENCE_TIMEOUT.as_secs()
            ));
            break;
        }
        std::thread::sleep(POLL_INTERVAL);
    }
    // Whatever the resampler still holds is the end of the stream.
    if let Some(r) = &mut resampler {
        if let Ok(rest) = r.flush() {
            counters
                .samples_16k
                .fetch_add(rest.len() as u64, Ordering::Relaxed);
            tracker.push(&rest, Instant::now(), &mut outputs);
        }
    }
    tracker.finish(&mut outputs);
    forward(&mut outputs);
    match failure {
        Some(msg) => Err(LiveError::Source(msg)),
        None => Ok(()),
    }
}

fn inference_thread(
    mut recognizer: Box<dyn Recognizer>,
    rx: Receiver<InferenceMsg>,
    events_tx: Sender<Event>,
    counters: Arc<PipelineCounters>,
) -> Result<(), LiveError> {
    let mut decoder = SegmentDecoder::new();
    let mut queue: VecDeque<InferenceMsg> = VecDeque::new();
    let mut first_failure = None;
    let mut failed = 0;
    loop {
        if queue.is_empty() {
            match rx.recv() {
                Ok(m) => queue.push_back(m),
                Err(_) => break,
            }
        }
        queue.extend(rx.try_iter());
        let msg = queue.pop_front().unwrap();
        match msg {
            InferenceMsg::Resume { segment } => decoder.resume(segment),
            InferenceMsg::Update(update) => {
                // A partial or pause superseded by newer audio of the same segment is stale.
                let superseded = matches!(update.kind, UpdateKind::Partial | UpdateKind::Pause)
                    && queue.iter().any(
                        |m| matches!(m, InferenceMsg::Update(u) if u.segment == update.segment),
                    );
                if superseded {
                    counters.skipped_partials.fetch_add(1, Ordering::Relaxed);
                    continue;
                }
                let before = decoder.model_time;
                let emit = |ev: Event| {
                    if matches!(ev, Event::Final { .. }) {
                        counters.finals.fetch_add(1, Ordering::Relaxed);
                    }
                    let _ = events_tx.send(ev);
                };
                // A failure has already been reported as an `error` event
                // (and a failed final as a final with reason `error`).
                if let Err(failure) = decoder.handle_and_emit(&update, recognizer.as_mut(), emit) {
                    tracing::error!("decoding failed: {failure}");
                    failed += 1;
                    first_failure.get_or_insert(failure);
                }
                counters.model_micros.fetch_add(
                    (decoder.model_time - before).as_micros() as u64,
                    Ordering::Relaxed,
                );
            }
        }
    }
    match first_failure {
        Some(first) => Err(LiveError::Decode {
            failed,
            first: first.to_string(),
        }),
        None => Ok(()),
    }
}
