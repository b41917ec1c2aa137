//! The live pipeline's threads:
//!
//! ```text
//! source ─ring─► audio thread (resample, StreamTracker) ─updates─► stream engine
//!                     │ speech start/end                           (one stream of it:
//!                     ▼                                             recogniser, decoder)
//!                 events channel ◄──────────── partials, finals ──────────┘
//!                     ▼
//!                 caller's thread: sink (stdout, WebSocket), stats
//! ```
//!
//! The local source is a stream of the same [`super::engine`] as every
//! audio-in WebSocket session, so with `--ws` one scheduler decides for all.
//! Stopping (Ctrl-C, SIGTERM, end of input, device failure) flows the same
//! way: the audio thread finalises the open segment and closes its stream,
//! the engine decodes every final still queued (skipping stale partials)
//! and drops the stream's end of the events channel, and the caller's loop
//! ends once the last event is delivered. No produced transcript is dropped.
//!
//! A live source that fails (an error from the device, or no audio for
//! [`SOURCE_STALL_TIMEOUT`]) ends the open segment the same way, with an
//! `error` event; then, with [`LiveOptions::reconnect`], the caller's thread
//! (which owns the device: a cpal stream stays on the thread that built it)
//! opens the source again with back-off and hands the new ring to the audio
//! thread, and the stream goes on: same segment numbering, same committed
//! context, stream time continuing where the lost audio ended.

use super::decoder::DecodeFailure;
use super::engine::{EngineHandle, EngineMsg, StreamCounters, StreamEvent, StreamId, StreamModel};
use super::events::{Event, Stats};
use super::tracker::{StreamTracker, TrackerConfig, TrackerOutput};
use crate::audio::resample::StreamResampler;
use crate::audio::ring::{RingReader, RingShared};
use crate::audio::source::{start_source, SourceSpec, StartedSource};
use crate::audio::MODEL_SAMPLE_RATE;
use crate::model::recognizer::Recognizer;
use crossbeam_channel::{Receiver, RecvTimeoutError, Sender};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// A live source that delivers nothing for this long has failed. (A
/// PulseAudio source that is suspended, or a capture stream that stalls,
/// shows only this way: no error, no data.)
pub const SOURCE_STALL_TIMEOUT: Duration = Duration::from_secs(3);
/// How often the audio thread polls the ring when it is empty.
const POLL_INTERVAL: Duration = Duration::from_millis(5);

#[derive(Clone, Debug)]
pub struct LiveOptions {
    pub tracker: TrackerConfig,
    /// Emit a stats event this often (and once at the end); `None` only at the end.
    pub stats_interval: Option<Duration>,
    /// When the source fails: `Some` opens it again (with back-off) and the
    /// stream goes on; `None` ends the stream with [`LiveError::Source`].
    pub reconnect: Option<Reconnect>,
}

/// How a failed live source is opened again: after `first_delay`, then
/// after twice the previous wait each time, at most `max_delay`, until it
/// opens and delivers audio (or the stream is stopped).
#[derive(Clone, Debug)]
pub struct Reconnect {
    /// The source to open again (the one the stream started with).
    pub spec: SourceSpec,
    pub first_delay: Duration,
    pub max_delay: Duration,
}

impl Reconnect {
    /// 0.5 s, 1 s, 2 s, 4 s, then every 5 s.
    pub fn new(spec: SourceSpec) -> Self {
        Self {
            spec,
            first_delay: Duration::from_millis(500),
            max_delay: Duration::from_secs(5),
        }
    }

    /// The wait before attempt `n` (0-based) since audio last flowed.
    fn delay(&self, n: u32) -> Duration {
        self.first_delay
            .saturating_mul(1 << n.min(16))
            .min(self.max_delay)
    }
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

/// What the audio thread tells the caller's thread about its source.
enum SourceNews {
    /// The source failed (the open segment is already flushed): why.
    Lost(String),
}

/// Dropped/overflow counts over every ring the stream has used.
struct RingTotals {
    current: Arc<RingShared>,
    dropped_before: u64,
    overflows_before: u64,
}

impl RingTotals {
    fn dropped(&self) -> u64 {
        self.dropped_before + self.current.dropped_samples.load(Ordering::Relaxed)
    }

    fn overflows(&self) -> u64 {
        self.overflows_before + self.current.overflow_events.load(Ordering::Relaxed)
    }

    fn replace(&mut self, next: Arc<RingShared>) {
        self.dropped_before = self.dropped();
        self.overflows_before = self.overflows();
        self.current = next;
    }
}

/// The caller's side of re-opening a failed source.
struct Reopener {
    policy: Reconnect,
    /// Hands a new ring and its sample rate to the audio thread.
    swap: Sender<(RingReader, u32)>,
    /// Attempts since audio last flowed (sets the back-off).
    attempts: u32,
    /// When to try next, while the source is down.
    next_try: Option<Instant>,
    /// A re-opened source that has not delivered audio yet.
    awaiting_audio: Option<String>,
}

/// The local source's stream in the engine (the server numbers its
/// audio-in sessions from 1).
pub const LOCAL_STREAM_ID: StreamId = 0;

/// Counters of the audio thread, read for stats events (the model's are
/// the engine's [`StreamCounters`]).
#[derive(Debug, Default)]
pub struct PipelineCounters {
    pub samples_16k: AtomicU64,
    pub segments: AtomicU64,
}

pub struct LiveSummary {
    pub stats: Stats,
}

/// Runs the pipeline until the input ends or `stop` is raised, handing every
/// event to `on_event` on the calling thread; `recognizer` is decoded as a
/// stream of `engine`.
pub fn run_live(
    source: StartedSource,
    engine: &EngineHandle,
    recognizer: Box<dyn Recognizer>,
    opts: &LiveOptions,
    stop: Arc<AtomicBool>,
    mut on_event: impl FnMut(&Event),
) -> Result<LiveSummary, LiveError> {
    let started = Instant::now();
    let counters = Arc::new(PipelineCounters::default());
    let model_counters = Arc::new(StreamCounters::default());
    let mut rings = RingTotals {
        current: source.reader.shared.clone(),
        dropped_before: 0,
        overflows_before: 0,
    };
    let (events_tx, events_rx) = crossbeam_channel::unbounded::<Event>();
    let (news_tx, mut news_rx) = crossbeam_channel::unbounded::<SourceNews>();
    let (swap_tx, swap_rx) = crossbeam_channel::unbounded::<(RingReader, u32)>();
    let mut reopener = opts.reconnect.clone().map(|policy| Reopener {
        policy,
        swap: swap_tx,
        attempts: 0,
        next_try: None,
        awaiting_audio: None,
    });
    let swaps = reopener.is_some().then_some(swap_rx);
    let frontend = recognizer.frontend();
    let max_seconds = recognizer.max_segment_seconds();
    let tracker = StreamTracker::new(&opts.tracker, frontend, max_seconds)
        .map_err(|e| LiveError::Setup(e.to_string()))?;

    let name = recognizer.name();
    let first_failure = open_stream(engine, recognizer, &events_tx, &model_counters)?;
    let StartedSource {
        reader,
        sample_rate,
        live,
        guard,
        description,
    } = source;
    tracing::info!(source = %description, model = %name, "live transcription started");
    let mut guard = Some(guard);
    let audio = {
        let (events_tx, counters, stop) = (events_tx.clone(), counters.clone(), stop.clone());
        let channels = AudioChannels {
            engine: engine.clone(),
            model_counters: model_counters.clone(),
            events_tx,
            news_tx,
            swaps,
        };
        let closer = engine.clone();
        let spawned = std::thread::Builder::new()
            .name("audio".into())
            .spawn(move || {
                let result =
                    audio_thread(reader, sample_rate, live, tracker, stop, channels, counters);
                // Whatever ended the audio: the engine decodes what is queued, then
                // drops the stream's end of the events channel.
                closer.send(EngineMsg::Close {
                    id: LOCAL_STREAM_ID,
                });
                result
            });
        match spawned {
            Ok(thread) => thread,
            Err(e) => {
                engine.send(EngineMsg::Close {
                    id: LOCAL_STREAM_ID,
                });
                return Err(LiveError::Setup(format!("cannot start audio thread: {e}")));
            }
        }
    };
    // The loop below ends when the audio thread and the engine's stream
    // have both dropped their senders.
    drop(events_tx);

    let stats = |counters: &PipelineCounters, rings: &RingTotals| -> Stats {
        let audio_seconds =
            counters.samples_16k.load(Ordering::Relaxed) as f64 / MODEL_SAMPLE_RATE as f64;
        let model = model_counters.model_time().as_secs_f64();
        let wall = started.elapsed().as_secs_f64();
        let usage = super::usage::ProcessUsage::read();
        Stats {
            audio_seconds,
            wall_seconds: wall,
            dropped_samples: rings.dropped(),
            overflow_events: rings.overflows(),
            skipped_partials: model_counters.skipped_partials.load(Ordering::Relaxed),
            segments: counters.segments.load(Ordering::Relaxed),
            finals: model_counters.finals.load(Ordering::Relaxed),
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
        let mut timeout = next_stats.map_or(Duration::from_millis(250), |t| {
            t.saturating_duration_since(Instant::now())
        });
        if let Some(t) = reopener.as_ref().and_then(|r| r.next_try) {
            timeout = timeout.min(t.saturating_duration_since(Instant::now()));
        }
        crossbeam_channel::select! {
            recv(events_rx) -> ev => match ev {
                Ok(ev) => on_event(&ev),
                Err(_) => break,
            },
            recv(news_rx) -> news => match news {
                Ok(SourceNews::Lost(why)) => {
                    // Stop the failed device now: a dead ALSA stream keeps
                    // its thread spinning on errors until it is dropped.
                    drop(guard.take());
                    if let Some(r) = &mut reopener {
                        let wait = r.policy.delay(r.attempts);
                        tracing::warn!(
                            "audio source lost ({why}); opening it again in {:.1} s",
                            wait.as_secs_f64()
                        );
                        r.next_try = Some(Instant::now() + wait);
                        r.awaiting_audio = None;
                    }
                }
                // The audio thread has ended.
                Err(_) => news_rx = crossbeam_channel::never(),
            },
            default(timeout) => {}
        }
        if let Some(r) = &mut reopener {
            if let Some(what) = &r.awaiting_audio {
                if rings.current.written_samples.load(Ordering::Relaxed) > 0 {
                    tracing::warn!("capture resumed: {what}");
                    r.awaiting_audio = None;
                    r.attempts = 0;
                }
            }
            if r.next_try.is_some_and(|t| Instant::now() >= t) {
                if stop.load(Ordering::Relaxed) {
                    r.next_try = None;
                } else if let Some(source) = try_reopen(r) {
                    rings.replace(source.reader.shared.clone());
                    guard = Some(source.guard);
                    // The audio thread waits for it; if it has ended, the
                    // loop ends as well.
                    let _ = r.swap.send((source.reader, source.sample_rate));
                }
            }
        }
        let overflows = rings.overflows();
        if overflows > last_overflow {
            tracing::warn!(
                dropped_samples = rings.dropped(),
                "audio ring overflowed: the pipeline fell behind the source"
            );
            last_overflow = overflows;
        }
        if let (Some(t), Some(interval)) = (next_stats, opts.stats_interval) {
            if Instant::now() >= t {
                on_event(&Event::Stats(stats(&counters, &rings)));
                next_stats = Some(t + interval);
            }
        }
    }
    let audio_result = audio
        .join()
        .map_err(|_| LiveError::Setup("audio thread panicked".into()))?;
    drop(guard);
    let final_stats = stats(&counters, &rings);
    on_event(&Event::Stats(final_stats.clone()));
    audio_result?;
    let failed = model_counters.failed.load(Ordering::Relaxed);
    let first = first_failure.lock().ok().and_then(|mut f| f.take());
    match first {
        Some(first) => Err(LiveError::Decode {
            failed,
            first: first.to_string(),
        }),
        None => Ok(LiveSummary { stats: final_stats }),
    }
}

/// Opens the local stream in the engine: its events go into `events_tx`
/// (the channel the audio thread also writes, so that each speech start
/// comes before its segment's partials); the first failed decode lands in
/// the returned slot when the engine closes the stream.
fn open_stream(
    engine: &EngineHandle,
    recognizer: Box<dyn Recognizer>,
    events_tx: &Sender<Event>,
    counters: &Arc<StreamCounters>,
) -> Result<Arc<Mutex<Option<DecodeFailure>>>, LiveError> {
    let first_failure = Arc::new(Mutex::new(None));
    let (opened_tx, opened_rx) = crossbeam_channel::bounded(1);
    let sink = {
        let (events_tx, first_failure) = (events_tx.clone(), first_failure.clone());
        move |ev| match ev {
            StreamEvent::Opened(result) => {
                let _ = opened_tx.try_send(result);
            }
            StreamEvent::Event(ev) => {
                let _ = events_tx.send(ev);
            }
            StreamEvent::Closed(failure) => {
                if let Ok(mut slot) = first_failure.lock() {
                    *slot = failure;
                }
            }
        }
    };
    let open = EngineMsg::Open {
        id: LOCAL_STREAM_ID,
        model: StreamModel::Ready(recognizer),
        events: Box::new(sink),
        counters: counters.clone(),
    };
    let gone = || LiveError::Setup("the stream engine has stopped".into());
    if !engine.send(open) {
        return Err(gone());
    }
    match opened_rx.recv() {
        Ok(Ok(_)) => Ok(first_failure),
        Ok(Err(e)) => Err(LiveError::Setup(e.to_string())),
        Err(_) => Err(gone()),
    }
}

/// One attempt to open the source again; schedules the next on failure.
fn try_reopen(r: &mut Reopener) -> Option<StartedSource> {
    r.attempts += 1;
    // No stop flag of its own: a re-opened microphone has no reader thread.
    let opened = start_source(&r.policy.spec, Arc::new(AtomicBool::new(false)));
    match opened {
        Ok(source) => {
            tracing::warn!(
                attempt = r.attempts,
                "audio source opened again: {}; waiting for audio",
                source.description
            );
            r.next_try = None;
            r.awaiting_audio = Some(source.description.clone());
            Some(source)
        }
        Err(e) => {
            let wait = r.policy.delay(r.attempts);
            tracing::warn!(
                attempt = r.attempts,
                "cannot open the audio source again: {e}; next attempt in {:.1} s",
                wait.as_secs_f64()
            );
            r.next_try = Some(Instant::now() + wait);
            None
        }
    }
}

/// The audio thread's channels: updates to the engine, events to the
/// caller, and news of its source to and from the caller.
struct AudioChannels {
    engine: EngineHandle,
    model_counters: Arc<StreamCounters>,
    events_tx: Sender<Event>,
    news_tx: Sender<SourceNews>,
    /// New rings after a failure (`None`: a failure ends the stream).
    swaps: Option<Receiver<(RingReader, u32)>>,
}

fn new_resampler(sample_rate: u32) -> Result<Option<StreamResampler>, LiveError> {
    if sample_rate == MODEL_SAMPLE_RATE {
        return Ok(None);
    }
    StreamResampler::new(sample_rate, MODEL_SAMPLE_RATE)
        .map(Some)
        .map_err(|e| LiveError::Setup(e.to_string()))
}

fn audio_thread(
    mut reader: RingReader,
    sample_rate: u32,
    live: bool,
    mut tracker: StreamTracker,
    stop: Arc<AtomicBool>,
    channels: AudioChannels,
    counters: Arc<PipelineCounters>,
) -> Result<(), LiveError> {
    let AudioChannels {
        engine,
        model_counters,
        events_tx,
        news_tx,
        swaps,
    } = channels;
    let mut resampler = new_resampler(sample_rate)?;
    let mut buf = vec![0f32; (sample_rate as usize / 50).max(256)];
    let mut outputs = Vec::new();
    let forward = |outputs: &mut Vec<TrackerOutput>| {
        for out in outputs.drain(..) {
            match out {
                TrackerOutput::Event(ev) => {
                    if matches!(ev, Event::SpeechStart { .. }) {
                        counters.segments.fetch_add(1, Ordering::Relaxed);
                    }
                    let _ = events_tx.send(ev);
                }
                TrackerOutput::Update(update) => {
                    model_counters.pending.fetch_add(1, Ordering::Relaxed);
                    engine.send(EngineMsg::Update {
                        id: LOCAL_STREAM_ID,
                        update,
                    });
                }
                TrackerOutput::Resume { segment } => {
                    engine.send(EngineMsg::Resume {
                        id: LOCAL_STREAM_ID,
                        segment,
                    });
                }
            }
        }
    };
    loop {
        let mut last_data = Instant::now();
        let mut failure = None;
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
            if live && last_data.elapsed() > SOURCE_STALL_TIMEOUT {
                failure = Some(format!(
                    "no audio from the source for {} s (stalled, suspended or gone)",
                    SOURCE_STALL_TIMEOUT.as_secs()
                ));
                break;
            }
            std::thread::sleep(POLL_INTERVAL);
        }
        if let Some(msg) = &failure {
            let next = if swaps.is_some() {
                "; opening it again"
            } else {
                ""
            };
            tracing::error!("audio source failed: {msg}");
            let _ = events_tx.send(Event::Error {
                message: format!("audio source failed: {msg}{next}"),
            });
        }
        // Whatever the resampler still holds is the end of this audio, and
        // the open segment ends with it (the tracker carries on afterwards:
        // segment numbers and stream time continue).
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
        let Some(msg) = failure else {
            return Ok(());
        };
        let Some(swaps) = &swaps else {
            return Err(LiveError::Source(msg));
        };
        let _ = news_tx.send(SourceNews::Lost(msg));
        // Wait for the caller to open the source again, or for the stop.
        let (next_reader, rate) = loop {
            if stop.load(Ordering::Relaxed) {
                return Ok(());
            }
            match swaps.recv_timeout(Duration::from_millis(50)) {
                Ok(next) => break next,
                Err(RecvTimeoutError::Timeout) => {}
                Err(RecvTimeoutError::Disconnected) => return Ok(()),
            }
        };
        reader = next_reader;
        resampler = new_resampler(rate)?;
        buf.resize((rate as usize / 50).max(256), 0.0);
    }
}
