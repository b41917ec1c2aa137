//! The stream engine: owns the model's compute for every live stream — the
//! local source and every audio-in session alike — and decides what runs
//! next. An intake thread queues what streams send; lanes (one by default)
//! take batches under one scheduler lock and run them outside it; streams
//! opened with options get their recogniser made by lane 0 between batches.
//!
//! Each stream keeps its own recogniser (own committed context over the
//! shared weights) and [`SegmentDecoder`] here; its segment updates queue up
//! per stream, in order. Each round the scheduler takes the head update of
//! some streams and runs them as one batch ([`crate::model::batch`]): one
//! call into the model, so a stream's decode steps share the weights'
//! reads with the others'. What runs first:
//!
//! 1. finals (and pause decodes, which usually become finals) of every
//!    stream that has one, oldest first, up to [`EngineConfig::max_batch`];
//! 2. otherwise partials, the streams whose last partial is oldest first,
//!    as many as fit [`EngineConfig::partial_budget`] by the measured cost
//!    of a partial batch (a fixed part plus a part per partial: on a GPU
//!    most of a batch's time is the fixed part), each stream's spaced by [`EngineConfig::partial_spacing`]
//!    while others wait — under load each stream gets partials less often,
//!    never fewer finals.
//!
//! With [`EngineConfig::continuous`] (Step-Audio 2 on a GPU) one lane keeps
//! a decode loop running instead: decodes join it between decode steps (in
//! groups, finals first) and leave it as they end, so a final never waits
//! for a whole batch ([`Core::continuous_lane`]); partials join only as far
//! as the finals in it still make a deadline, which the finals that come out
//! steer so that about 19 in 20 keep [`EngineConfig::final_target`].
//!
//! A queued partial or pause decode is dropped as soon as newer audio of its
//! segment arrives (never a final), so a stream's queue holds at most one of
//! them per segment. A stream opened when [`EngineConfig::max_streams`] are
//! open is refused ([`OpenError::AtCapacity`]) rather than slowing everyone.
//! Results go to each stream's own event sink; nothing here waits for a
//! client.

use super::decoder::{guarded, reset_context, DecodeFailure, DecodeWork, SegmentDecoder};
use super::events::Event;
use super::tracker::{SegmentUpdate, UpdateKind};
use crate::model::batch::{decode_batch, BatchRequest, DecodeLoop};
use crate::model::recognizer::{FrontendSpec, Recognizer};
use crate::model::{LoadedModel, ModelError, RecognizerOptions};
use crossbeam_channel::Sender;
use std::collections::{HashMap, VecDeque};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

pub type StreamId = u64;

/// How the engine schedules.
#[derive(Clone, Debug)]
pub struct EngineConfig {
    /// Streams served at once; one more is refused.
    pub max_streams: usize,
    /// Most decodes in one batch.
    pub max_batch: usize,
    /// How long a batch of partials may take, by the measured cost of a
    /// batch (at least one partial runs per batch).
    pub partial_budget: Duration,
    /// Least time between the starts of two partials of a stream while
    /// other streams wait for partials too (alone, a stream gets every
    /// partial its tracker asks for). Partials are most of the work; spacing
    /// them keeps room for finals, which then rarely wait. Start to start,
    /// so that a stream's partials come about this far apart whatever a
    /// decode takes.
    pub partial_spacing: Duration,
    /// Batches run at once. With two, the second lane takes only finals
    /// and pause decodes, so they never wait behind partials. One by
    /// default: on the 2-core test machine a second lane made every decode
    /// slower (4 streams, tiny.en: model RTF per stream 0.209 → 0.276,
    /// end-of-speech→final p95 1462 → 1521 ms), and a GPU runs one batch at
    /// a time.
    pub lanes: usize,
    /// Decode as one continuous batch where the model has one
    /// ([`LoadedModel::decode_loop`]): decodes join and leave the running
    /// batch between decode steps, so a final waits one step, not a batch.
    /// On by default on a GPU.
    pub continuous: bool,
    /// Continuous batch: how long the partials that join at one admission
    /// may take to encode and prefill, by the measured cost of admitting
    /// decodes (at least one joins). Every decode in flight waits for an
    /// admission.
    pub admit_budget: Duration,
    /// Continuous batch: least time between two admissions while decodes run
    /// (between them the loop only steps). New decodes join in groups: one
    /// batched encoder pass and prefill for many streams costs little more
    /// than for one (a prefill reads all the weights however few rows it
    /// has), and the decodes in flight are held up once per group.
    pub admit_interval: Duration,
    /// Continuous batch: how soon after its segment's end a final (or pause
    /// decode) should be out, at most. Partials join only as far as every
    /// final in the loop or joining it still makes the deadline at the
    /// loop's measured pace: a partial's encoding and prefill hold up every
    /// decode in flight, and under load most partials would be overtaken by
    /// their own final anyway. With [`Self::final_target`] the deadline in
    /// use moves below this one. `None`: partials take their whole budget
    /// whatever the finals.
    pub final_deadline: Option<Duration>,
    /// Continuous batch: the time from a segment's end to its final that
    /// about 19 finals in 20 should keep. The deadline partials leave the
    /// finals is steered by the finals that come out (down for each one
    /// later than this, up for each one sooner; [`DeadlineSteer`]), between
    /// ~300 ms and [`Self::final_deadline`]: with few streams partials take
    /// more of the finals' slack, under load less. `None`: the deadline stays
    /// [`Self::final_deadline`].
    pub final_target: Option<Duration>,
    /// Continuous batch: a final (or pause decode) that has waited this long
    /// since its segment's end joins at once, with the other finals waiting
    /// and no partials, however soon after the last admission; partials
    /// keep their [`Self::admit_interval`]. `None`: finals join only at the
    /// interval's admissions. Such an admission is cheap (a few turns, no
    /// partials), and under load a final waited ~1.5 admission intervals to
    /// join, about 40 % of its time in the engine.
    pub final_admit_after: Option<Duration>,
}

/// Streams the CPU holds by default, by Whisper width and core count: the
/// capacity `examples/benchmark_streams.rs --find-capacity` measured on a
/// 2-core machine for tiny.en (README, "How many streams"): 2 streams
/// (end-of-speech→final p95 ≤ 1 s, 95 % of partial gaps ≤ 1.5 s, nothing
/// lost; 3 streams: p95 1.15 s), so one per core. Wider models cost at
/// least twice as much per decode: one per two cores.
fn cpu_capacity(d_model: usize, cores: usize) -> usize {
    let streams = if d_model <= 384 { cores } else { cores / 2 };
    streams.max(1)
}

/// Streams a GPU holds by default: at or below the capacity that
/// `benchmark_streams` measured on one H200 with random weights
/// (end-of-speech→final p95 ≤ 1 s, nothing lost; README, "How many
/// streams"; 24 tokens a turn): Step-Audio 2 mini with the continuous batch,
/// its GPU default, 384 streams (p95 905 ms; 256 at 770–798 ms, where the
/// binary before finals were admitted early gave 878–919 ms on the same card;
/// an older one 1.03–1.10 s on a slower card), 144 batch at a time; Whisper
/// large-v3-turbo's shape 368 (kept at 96 here for cards smaller than an
/// H200; Whisper has no memory cap). Step-Audio 2 is also bounded by the memory
/// its streams' KV cache slots take ([`LoadedModel::streams_fitting_memory`]).
const GPU_STREAMS_STEP_AUDIO2: usize = 256;
/// [`EngineConfig::partial_spacing`] on a GPU. A partial takes 0.15–0.45 s there
/// (admission, encoder, prefill, steps), so at 1 s start to start a stream's longest
/// gap sat at the 1.5 s a speaking stream may wait (H200, 20 s runs of 40 / 64
/// Step-Audio 2 streams: 1.50 / 1.56 s); at 0.9 s, 64 streams gave 1.44, 1.52, 1.53
/// and 1.56 s and 48 streams 1.44 s (0.8 s: 1.42 s at 64, one run). At 256 streams partials are thinned for the
/// finals anyway: finals' p95 781 and 772 ms against 797 ms at 1 s in the same call.
const GPU_PARTIAL_SPACING: Duration = Duration::from_millis(900);
const GPU_STREAMS_WHISPER: usize = 96;

impl EngineConfig {
    /// The defaults for `model` on this machine: capacity from the measured
    /// streams per CPU core (at least one stream), or the measured streams of
    /// one GPU.
    pub fn for_model(model: &LoadedModel) -> Self {
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        let max_streams = match model {
            LoadedModel::Whisper(m) if m.device.is_cpu() => cpu_capacity(m.config.d_model, cores),
            LoadedModel::Whisper(_) => GPU_STREAMS_WHISPER,
            LoadedModel::StepAudio2(sa) if sa.model.device.is_cpu() => 1,
            LoadedModel::StepAudio2(_) => {
                GPU_STREAMS_STEP_AUDIO2.min(model.streams_fitting_memory().unwrap_or(usize::MAX))
            }
        };
        let gpu = !on_cpu(model);
        let defaults = Self::default();
        Self {
            max_streams,
            continuous: gpu,
            partial_spacing: if gpu {
                GPU_PARTIAL_SPACING
            } else {
                defaults.partial_spacing
            },
            ..defaults
        }
    }
}

impl Default for EngineConfig {
    fn default() -> Self {
        Self {
            max_streams: 4,
            max_batch: 64,
            partial_budget: Duration::from_millis(350),
            partial_spacing: Duration::from_millis(1000),
            lanes: 1,
            continuous: false,
            admit_budget: Duration::from_millis(60),
            admit_interval: Duration::from_millis(100),
            // A segment ends 150 ms (its tail) after the last voiced audio and
            // its final is asked for when the 300 ms hangover has passed; the
            // voiced end lies ~0.3 s before the segment's end arrives (H200
            // runs: p50 0.32 s, p95 0.38 s). So a final out 550 ms after its
            // segment's end is ~0.9 s after the end of speech, inside the
            // 1 s that finals should keep; 700 ms, the most the deadline may
            // grow to, is that bound itself. A fixed 400 ms kept 256
            // Step-Audio 2 streams' finals at p95 0.77–0.81 s on an H200 but
            // thinned the partials of 96 streams to gaps of up to 2.4 s,
            // where 700 ms gave 1.41 s (docs/gpu-results/h200-steered-deadline.md).
            final_deadline: Some(Duration::from_millis(700)),
            final_target: Some(Duration::from_millis(550)),
            // 80 ms (H200, 256 Step-Audio 2 streams, side by side with 40,
            // 60, 100 and none: docs/gpu-results/h200-finals-admitted-early.md):
            // finals' p95 ~60–90 ms lower; 40 ms admitted so often that the
            // extra admissions cost the decodes in flight what they saved.
            final_admit_after: Some(Duration::from_millis(80)),
        }
    }
}

/// Where a stream's recogniser comes from.
pub enum StreamModel {
    /// Made on the engine's thread from the shared model (a Step-Audio 2
    /// system-prompt prefill is model work like any other).
    Options(RecognizerOptions),
    /// Made by the caller.
    Ready(Box<dyn Recognizer>),
}

/// Counters of one stream, kept up to date by the engine.
#[derive(Debug, Default)]
pub struct StreamCounters {
    /// Updates queued and not yet taken (the stream increments it when it
    /// sends one; the engine decrements it).
    pub pending: AtomicUsize,
    pub skipped_partials: AtomicU64,
    /// Partials (and pause decodes) decoded whose text was that of the one
    /// before, so not sent.
    pub unchanged_partials: AtomicU64,
    pub finals: AtomicU64,
    /// Decodes that failed (their finals went out with reason `error`).
    pub failed: AtomicU64,
    /// Model time spent on this stream (its share of each batch).
    pub model_micros: AtomicU64,
}

impl StreamCounters {
    pub fn model_time(&self) -> Duration {
        Duration::from_micros(self.model_micros.load(Ordering::Relaxed))
    }
}

pub type EventSink = Box<dyn FnMut(StreamEvent) + Send>;

pub enum EngineMsg {
    /// Opens a stream; answered with [`StreamEvent::Opened`].
    Open {
        id: StreamId,
        model: StreamModel,
        events: EventSink,
        counters: Arc<StreamCounters>,
    },
    Update {
        id: StreamId,
        update: SegmentUpdate,
    },
    /// Speech resumed in `segment` after a pause.
    Resume {
        id: StreamId,
        segment: u64,
    },
    /// The stream has sent its last update: answered with
    /// [`StreamEvent::Closed`] once everything before it is decoded.
    Close {
        id: StreamId,
    },
}

/// What a new stream needs to know to build its tracker.
#[derive(Clone, Debug)]
pub struct StreamInfo {
    pub name: String,
    pub frontend: FrontendSpec,
    pub max_segment_seconds: f64,
}

#[derive(Clone, Debug, thiserror::Error)]
pub enum OpenError {
    #[error("the engine is at capacity ({capacity} streams)")]
    AtCapacity { capacity: usize },
    #[error("cannot start a recogniser with these options: {0}")]
    Recognizer(String),
}

#[derive(Debug)]
pub enum StreamEvent {
    Opened(Result<StreamInfo, OpenError>),
    Event(Event),
    /// Everything of the stream is decoded; the first failed decode, if any.
    Closed(Option<DecodeFailure>),
}

/// Counters of the whole engine, for stats and benchmarks. In the
/// continuous batch a round (admission and one step) counts as a batch and
/// the decodes in flight as its size.
#[derive(Debug, Default)]
pub struct EngineCounters {
    pub streams: AtomicUsize,
    pub refused: AtomicU64,
    pub batches: AtomicU64,
    /// Decodes run in batches (their sum over batches).
    pub batched_decodes: AtomicU64,
    pub largest_batch: AtomicUsize,
    pub model_micros: AtomicU64,
}

/// A snapshot of [`EngineCounters`].
#[derive(Clone, Debug, Default, PartialEq, serde::Serialize)]
pub struct EngineStats {
    pub streams: usize,
    pub capacity: usize,
    pub refused: u64,
    pub batches: u64,
    pub mean_batch: f64,
    pub largest_batch: usize,
    pub model_seconds: f64,
}

/// The engine's address: cheap to clone, one per producer.
#[derive(Clone)]
pub struct EngineHandle {
    tx: Sender<EngineMsg>,
    counters: Arc<EngineCounters>,
    capacity: usize,
}

impl EngineHandle {
    /// Sends a message; false once the engine is gone.
    pub fn send(&self, msg: EngineMsg) -> bool {
        self.tx.send(msg).is_ok()
    }

    pub fn stats(&self) -> EngineStats {
        let c = &self.counters;
        let batches = c.batches.load(Ordering::Relaxed);
        EngineStats {
            streams: c.streams.load(Ordering::Relaxed),
            capacity: self.capacity,
            refused: c.refused.load(Ordering::Relaxed),
            batches,
            mean_batch: c.batched_decodes.load(Ordering::Relaxed) as f64 / batches.max(1) as f64,
            largest_batch: c.largest_batch.load(Ordering::Relaxed),
            model_seconds: c.model_micros.load(Ordering::Relaxed) as f64 / 1e6,
        }
    }
}

/// Starts the engine: an intake thread that queues what streams send, and
/// [`EngineConfig::lanes`] lanes that run batches. The returned thread ends
/// when every handle is dropped and all queued work is done. `model` makes
/// the recognisers of streams opened with [`StreamModel::Options`], and holds
/// room for `config.max_streams` of them ([`LoadedModel::reserve_streams`]).
pub fn spawn(
    model: LoadedModel,
    config: EngineConfig,
) -> std::io::Result<(EngineHandle, std::thread::JoinHandle<()>)> {
    model.reserve_streams(config.max_streams);
    let (tx, rx) = crossbeam_channel::unbounded();
    let counters = Arc::new(EngineCounters::default());
    let handle = EngineHandle {
        tx,
        counters: counters.clone(),
        capacity: config.max_streams,
    };
    let core = Arc::new(Core {
        state: Mutex::new(State {
            slots: HashMap::new(),
            opening: VecDeque::new(),
            partial_cost: CostModel::default(),
            senders_gone: false,
        }),
        wake: Condvar::new(),
        // One batch at a time on a GPU: its work shares one stream.
        lanes: if on_cpu(&model) {
            config.lanes.max(1)
        } else {
            1
        },
        config,
        counters,
        model,
    });
    let mut lanes = Vec::new();
    let decode_loop = core
        .config
        .continuous
        .then(|| core.model.decode_loop())
        .flatten();
    let batch_lanes = if decode_loop.is_some() { 0 } else { core.lanes };
    // What a server operator sizes the machine by (README, "How many streams").
    tracing::info!(
        max_streams = core.config.max_streams,
        max_batch = core.config.max_batch,
        continuous = decode_loop.is_some(),
        lanes = batch_lanes,
        "stream engine started"
    );
    if let Some(decodes) = decode_loop {
        let lane_core = core.clone();
        let spawned = std::thread::Builder::new()
            .name("stream-loop".into())
            .spawn(move || lane_core.continuous_lane(decodes));
        match spawned {
            Ok(t) => lanes.push(t),
            Err(e) => {
                core.stop();
                return Err(e);
            }
        }
    }
    for lane in 0..batch_lanes {
        let lane_core = core.clone();
        let spawned = std::thread::Builder::new()
            .name(format!("stream-lane-{lane}"))
            .spawn(move || lane_core.lane(lane));
        match spawned {
            Ok(t) => lanes.push(t),
            Err(e) => {
                core.stop();
                return Err(e);
            }
        }
    }
    let intake = std::thread::Builder::new()
        .name("stream-engine".into())
        .spawn(move || {
            for msg in rx.iter() {
                core.accept(msg);
            }
            core.stop();
            for lane in lanes {
                if lane.join().is_err() {
                    tracing::error!("a stream engine lane panicked");
                }
            }
            tracing::debug!("stream engine stopped");
        })?;
    Ok((handle, intake))
}

fn on_cpu(model: &LoadedModel) -> bool {
    match model {
        LoadedModel::Whisper(m) => m.device.is_cpu(),
        LoadedModel::StepAudio2(sa) => sa.model.device.is_cpu(),
    }
}

enum Job {
    Update(SegmentUpdate),
    Resume(u64),
    Close,
}

/// A stream's model side.
struct Stream {
    recognizer: Box<dyn Recognizer>,
    decoder: SegmentDecoder,
    events: EventSink,
    counters: Arc<StreamCounters>,
    first_failure: Option<DecodeFailure>,
}

impl Stream {
    fn emit(&mut self, ev: Event) {
        if matches!(ev, Event::Final { .. }) {
            self.counters.finals.fetch_add(1, Ordering::Relaxed);
        }
        (self.events)(StreamEvent::Event(ev));
    }
}

/// A stream's place in the scheduler.
struct Slot {
    jobs: VecDeque<Job>,
    counters: Arc<StreamCounters>,
    /// When this stream's last partial was taken to be decoded: partials are
    /// spaced start to start, so the time a stream sees between its partials
    /// is about the spacing, not the spacing plus a decode.
    last_partial: Instant,
    /// The one before: a partial dropped from the decode loop gave the
    /// client nothing, so the stream's spacing counts from this again.
    partial_before: Instant,
    /// The segment of the last partial taken.
    partial_segment: Option<u64>,
    /// `None` while a lane decodes for this stream (its jobs wait).
    stream: Option<Stream>,
}

impl Slot {
    /// The update at the head of the queue, if the stream is free to take it.
    fn ready_update(&self) -> Option<&SegmentUpdate> {
        match (self.jobs.front(), &self.stream) {
            (Some(Job::Update(u)), Some(_)) => Some(u),
            _ => None,
        }
    }

    /// When the partial at the head of the queue (if the stream is free) is
    /// due under `spacing`: `spacing` after the stream's last partial, or at
    /// once for a segment's first partial — its gap counts from its own
    /// speech start, and a short segment spaced from the last segment's
    /// partial could end before it had any.
    fn partial_due(&self, spacing: Duration) -> Option<Instant> {
        let u = self
            .ready_update()
            .filter(|u| u.kind == UpdateKind::Partial)?;
        Some(if self.partial_segment == Some(u.segment) {
            self.last_partial + spacing
        } else {
            self.last_partial
        })
    }
}

/// A stream whose recogniser is still to be made.
struct Opening {
    id: StreamId,
    options: RecognizerOptions,
    events: EventSink,
    counters: Arc<StreamCounters>,
}

/// The model time of a batch of n partials as `fixed + per · n`, fitted by
/// least squares over recent batches (exponentially forgotten). On a CPU the
/// fixed part is near zero (each partial costs its own compute); on a GPU a
/// batch's decode steps cost about the same for 1 or 60 streams, so counting
/// all of a batch's time per partial would keep batches needlessly small.
#[derive(Default)]
struct CostModel {
    /// Weighted sums of 1, n, t, n², n·t.
    w: f64,
    n: f64,
    t: f64,
    nn: f64,
    nt: f64,
}

impl CostModel {
    /// Weight left to a batch after each newer one.
    const KEEP: f64 = 0.9;

    fn observe(&mut self, n: usize, secs: f64) {
        let n = n as f64;
        for (sum, x) in [
            (&mut self.w, 1.0),
            (&mut self.n, n),
            (&mut self.t, secs),
            (&mut self.nn, n * n),
            (&mut self.nt, n * secs),
        ] {
            *sum = *sum * Self::KEEP + x;
        }
    }

    /// The fitted seconds of a batch, (fixed, per partial); `None` before
    /// any measurement.
    fn parts(&self) -> Option<(f64, f64)> {
        if self.w == 0.0 || self.n == 0.0 {
            return None;
        }
        let det = self.w * self.nn - self.n * self.n;
        // Sizes too alike to separate the parts: all of it per partial.
        let (fixed, per) = if det > 1e-9 * self.w * self.nn {
            let per = (self.w * self.nt - self.n * self.t) / det;
            (((self.t - per * self.n) / self.w).max(0.0), per)
        } else {
            (0.0, self.t / self.n)
        };
        // A fit whose slope is (noise) zero or negative: the mean cost of a
        // partial bounds it instead.
        let per = if per > 0.0 { per } else { self.t / self.n };
        Some((fixed, per))
    }

    /// How many partials fit `budget` seconds (at least 1; 1 before any
    /// measurement).
    fn fit(&self, budget: f64) -> usize {
        self.fit_beside(budget, 0, 1)
    }

    /// How many partials may join `with` other decodes in one batch whose
    /// time they raise by at most `budget` seconds (the fixed part is paid
    /// by the others when there are any); at least `least`.
    fn fit_beside(&self, budget: f64, with: usize, least: usize) -> usize {
        let Some((fixed, per)) = self.parts() else {
            return if budget > 0.0 { least.max(1) } else { least };
        };
        if per <= 0.0 {
            return usize::MAX;
        }
        let fixed = if with == 0 { fixed } else { 0.0 };
        ((budget - fixed).max(0.0) / per).floor().max(least as f64) as usize
    }
}

/// The continuous batch's measured pace: wall seconds a round (a step and
/// its share of the admissions) and rounds a decode spends in the loop,
/// both exponential means.
#[derive(Default)]
struct Pace {
    round: f64,
    rounds: f64,
}

impl Pace {
    /// Weight of each new measurement.
    const NEW: f64 = 0.1;

    fn mean(old: f64, x: f64) -> f64 {
        if old == 0.0 {
            x
        } else {
            old + Self::NEW * (x - old)
        }
    }

    fn observe_round(&mut self, secs: f64) {
        self.round = Self::mean(self.round, secs);
    }

    fn observe_decode(&mut self, rounds: usize) {
        self.rounds = Self::mean(self.rounds, rounds as f64);
    }

    /// Seconds a decode that has run `done` rounds still needs (one round at
    /// least).
    fn remaining(&self, done: usize) -> f64 {
        (self.rounds - done as f64).max(1.0) * self.round
    }
}

/// The deadline partials leave the finals ([`EngineConfig::final_deadline`]
/// at most), steered by the finals that come out: each one later than
/// [`EngineConfig::final_target`] after its segment's end takes [`Self::DOWN`]
/// off it, each one on time gives [`Self::UP`] back. It settles where one
/// final in (DOWN + UP) / UP = 20 is late, so the finals' p95 sits at the
/// target whatever the card and the load, and partials get the slack left.
/// A fixed deadline is either too tight with few streams (partials thinned
/// for finals that had time to spare) or too loose under load.
struct DeadlineSteer {
    /// The deadline now; `None`: no deadline.
    secs: Option<f64>,
    /// Its range.
    low: f64,
    high: f64,
    /// `None`: the deadline stays where it is.
    target: Option<f64>,
}

impl DeadlineSteer {
    const UP: f64 = 0.002;
    const DOWN: f64 = 0.038;
    /// The least it is steered to: below it partials barely join under load
    /// (H200, 256 streams at 300 ms: 0.11 partials a second a stream).
    const FLOOR: f64 = 0.3;

    fn new(deadline: Option<Duration>, target: Option<Duration>) -> Self {
        let high = deadline.map_or(0.0, |d| d.as_secs_f64());
        Self {
            secs: deadline.map(|_| high),
            low: Self::FLOOR.min(high),
            high,
            target: target.map(|t| t.as_secs_f64()),
        }
    }

    fn deadline(&self) -> Option<Duration> {
        self.secs.map(Duration::from_secs_f64)
    }

    /// `update`'s decode is out now (only finals steer).
    fn landed(&mut self, update: &SegmentUpdate) {
        if matches!(update.kind, UpdateKind::Final(_)) {
            self.observe(update.end_arrival.elapsed());
        }
    }

    /// A final came out `latency` after its segment's end.
    fn observe(&mut self, latency: Duration) {
        let (Some(secs), Some(target)) = (self.secs.as_mut(), self.target) else {
            return;
        };
        let step = if latency.as_secs_f64() > target {
            -Self::DOWN
        } else {
            Self::UP
        };
        *secs = (*secs + step).clamp(self.low, self.high);
    }
}

/// Whether the `finals` waiting should join the continuous batch at `now`,
/// between the partials' admissions: one of them has waited `after`
/// ([`EngineConfig::final_admit_after`]) since its segment's end, and so
/// long has passed since the last admission.
fn finals_overdue(
    after: Option<Duration>,
    state: &State,
    finals: &[StreamId],
    last_admission: Option<Instant>,
    now: Instant,
) -> bool {
    let Some(after) = after else {
        return false;
    };
    last_admission.is_none_or(|t| now.saturating_duration_since(t) >= after)
        && finals.iter().any(|id| {
            state
                .slots
                .get(id)
                .and_then(Slot::ready_update)
                .is_some_and(|u| now.saturating_duration_since(u.end_arrival) >= after)
        })
}

/// Seconds the partials joining the continuous batch now may add to the
/// admission: `budget`, or less where more would make a final miss
/// `deadline` after its segment's end at the loop's `pace` — `finals` gives
/// each final's segment end and the rounds it has run (0 if joining now).
/// The second value says whether a final bounded it.
fn partial_admission(
    budget: f64,
    deadline: Option<Duration>,
    finals: impl Iterator<Item = (Instant, usize)>,
    pace: &Pace,
    now: Instant,
) -> (f64, bool) {
    let Some(deadline) = deadline else {
        return (budget, false);
    };
    let slack = finals
        .map(|(end, done)| {
            let left = deadline.as_secs_f64() - now.saturating_duration_since(end).as_secs_f64();
            left - pace.remaining(done)
        })
        .fold(f64::INFINITY, f64::min);
    if slack < budget {
        (slack, true)
    } else {
        (budget, false)
    }
}

/// A stream back from its batch.
type Done = (StreamId, Stream);

struct State {
    slots: HashMap<StreamId, Slot>,
    opening: VecDeque<Opening>,
    /// Measured model time of partial batches against their size.
    partial_cost: CostModel,
    /// Every handle is gone: lanes stop once nothing is left to do.
    senders_gone: bool,
}

struct Core {
    state: Mutex<State>,
    /// Raised whenever work may have become available.
    wake: Condvar,
    lanes: usize,
    config: EngineConfig,
    counters: Arc<EngineCounters>,
    model: LoadedModel,
}

/// One decode taken by a lane: the stream, its update and the plan for it.
type Taken = (StreamId, Stream, SegmentUpdate, DecodeWork);

impl Core {
    fn lock(&self) -> MutexGuard<'_, State> {
        // A lane never panics while holding the lock (model calls run outside it).
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn stop(&self) {
        self.lock().senders_gone = true;
        self.wake.notify_all();
    }

    fn accept(&self, msg: EngineMsg) {
        match msg {
            EngineMsg::Open {
                id,
                model,
                events,
                counters,
            } => self.open(id, model, events, counters),
            EngineMsg::Update { id, update } => self.enqueue(id, Job::Update(update)),
            EngineMsg::Resume { id, segment } => self.enqueue(id, Job::Resume(segment)),
            EngineMsg::Close { id } => self.enqueue(id, Job::Close),
        }
    }

    fn open(
        &self,
        id: StreamId,
        model: StreamModel,
        mut events: EventSink,
        counters: Arc<StreamCounters>,
    ) {
        let mut state = self.lock();
        // Only this (intake) thread adds streams, so the check holds until
        // the stream is in.
        if state.slots.len() + state.opening.len() >= self.config.max_streams {
            drop(state);
            self.counters.refused.fetch_add(1, Ordering::Relaxed);
            events(StreamEvent::Opened(Err(OpenError::AtCapacity {
                capacity: self.config.max_streams,
            })));
            return;
        }
        match model {
            StreamModel::Ready(recognizer) => {
                self.insert(&mut state, id, recognizer, events, counters)
            }
            // Making a recogniser is model work (a Step-Audio 2 prefill on
            // the device): lane 0 does it between batches, so it never runs
            // beside a batch (a CUDA graph being captured on the same
            // stream fails when another thread launches work on it).
            StreamModel::Options(options) => {
                state.opening.push_back(Opening {
                    id,
                    options,
                    events,
                    counters,
                });
                drop(state);
                self.wake.notify_all();
            }
        }
    }

    /// Makes the recogniser of the oldest stream waiting to open (lane 0).
    fn make_opening<'a>(&'a self, mut state: MutexGuard<'a, State>) -> MutexGuard<'a, State> {
        let Some(o) = state.opening.pop_front() else {
            return state;
        };
        drop(state);
        let made = self.model.recognizer(&o.options);
        let mut state = self.lock();
        match made {
            Ok(recognizer) => self.insert(&mut state, o.id, recognizer, o.events, o.counters),
            Err(e) => {
                let mut events = o.events;
                events(StreamEvent::Opened(Err(OpenError::Recognizer(
                    e.to_string(),
                ))));
            }
        }
        state
    }

    /// Adds an opened stream and tells it so.
    fn insert(
        &self,
        state: &mut State,
        id: StreamId,
        recognizer: Box<dyn Recognizer>,
        events: EventSink,
        counters: Arc<StreamCounters>,
    ) {
        let info = StreamInfo {
            name: recognizer.name(),
            frontend: recognizer.frontend(),
            max_segment_seconds: recognizer.max_segment_seconds(),
        };
        self.model.plan_streams(state.slots.len() + 1);
        state.slots.insert(
            id,
            Slot {
                jobs: VecDeque::new(),
                counters: counters.clone(),
                last_partial: Instant::now(),
                partial_before: Instant::now(),
                partial_segment: None,
                stream: Some(Stream {
                    recognizer,
                    decoder: SegmentDecoder::new(),
                    events,
                    counters,
                    first_failure: None,
                }),
            },
        );
        self.counters
            .streams
            .store(state.slots.len(), Ordering::Relaxed);
        // Told once it is counted, so that stats read after `Opened` include it.
        if let Some(stream) = state.slots.get_mut(&id).and_then(|s| s.stream.as_mut()) {
            (stream.events)(StreamEvent::Opened(Ok(info)));
        }
    }

    fn enqueue(&self, id: StreamId, job: Job) {
        let mut state = self.lock();
        let Some(slot) = state.slots.get_mut(&id) else {
            tracing::warn!(stream = id, "job for an unknown stream dropped");
            return;
        };
        // A queued partial or pause decode is stale once newer audio of its
        // segment arrives: drop it now, so that a stream's queue holds at
        // most one of them per segment (plus finals, never dropped) and its
        // pending count measures real work. Resumed speech voids a queued
        // pause decode of its segment alike.
        let voids = |u: &SegmentUpdate| match &job {
            Job::Update(new) => {
                u.segment == new.segment
                    && matches!(u.kind, UpdateKind::Partial | UpdateKind::Pause)
            }
            Job::Resume(segment) => u.segment == *segment && u.kind == UpdateKind::Pause,
            Job::Close => false,
        };
        let before = slot.jobs.len();
        slot.jobs
            .retain(|j| !matches!(j, Job::Update(u) if voids(u)));
        let stale = before - slot.jobs.len();
        if stale > 0 {
            tracing::trace!(
                stream = id,
                stale,
                "queued partial or pause decode voided by newer audio"
            );
        }
        slot.counters
            .skipped_partials
            .fetch_add(stale as u64, Ordering::Relaxed);
        slot.counters.pending.fetch_sub(stale, Ordering::Relaxed);
        slot.jobs.push_back(job);
        drop(state);
        self.wake.notify_all();
    }

    /// Applies the jobs at the head of each free stream's queue that need no
    /// model: resumes, and closes (everything before them is done).
    fn settle(&self, state: &mut State) {
        let mut closed = Vec::new();
        for (&id, slot) in &mut state.slots {
            let Some(stream) = &mut slot.stream else {
                continue;
            };
            loop {
                match slot.jobs.front() {
                    Some(Job::Resume(segment)) => {
                        stream.decoder.resume(*segment);
                        slot.jobs.pop_front();
                    }
                    Some(Job::Close) => {
                        closed.push(id);
                        break;
                    }
                    _ => break,
                }
            }
        }
        for id in closed {
            let slot = state.slots.remove(&id).expect("slot present");
            let mut stream = slot.stream.expect("a closing stream is free");
            (stream.events)(StreamEvent::Closed(stream.first_failure.take()));
        }
        self.counters
            .streams
            .store(state.slots.len(), Ordering::Relaxed);
    }

    /// Whether a lane may stop: no handle left, no job queued, nothing in flight.
    fn finished(state: &State) -> bool {
        state.senders_gone
            && state.opening.is_empty()
            && state
                .slots
                .values()
                .all(|s| s.jobs.is_empty() && s.stream.is_some())
    }

    /// The streams whose head update lane `lane` runs next. Every lane takes
    /// finals (and pause decodes) first — those committing their pause
    /// decode before the rest; only lane 0 takes partials, so a final never
    /// waits behind a batch of partials when there are two.
    fn pick(&self, state: &State, lane: usize) -> Vec<StreamId> {
        let (commits, mut finals) = Self::ready_finals(state);
        // In a batch of their own, commits do not wait for the others' decodes.
        if !commits.is_empty() {
            return commits;
        }
        if !finals.is_empty() {
            finals.truncate(self.config.max_batch);
            return finals;
        }
        if lane > 0 {
            return Vec::new();
        }
        let mut partials = self.due_partials(state);
        let fit = state
            .partial_cost
            .fit(self.config.partial_budget.as_secs_f64());
        partials.truncate(fit.clamp(1, self.config.max_batch));
        partials
    }

    /// The free streams with a final (or pause decode) at the head of their
    /// queue, oldest end of speech first, in two: the finals that commit
    /// their pause decode ([`SegmentDecoder::reuses_pause`], no model pass),
    /// and the rest.
    fn ready_finals(state: &State) -> (Vec<StreamId>, Vec<StreamId>) {
        let mut finals: Vec<(Instant, bool, StreamId)> = state
            .slots
            .iter()
            .filter_map(|(&id, slot)| {
                let u = slot
                    .ready_update()
                    .filter(|u| u.kind != UpdateKind::Partial)?;
                let commits = slot
                    .stream
                    .as_ref()
                    .is_some_and(|s| s.decoder.reuses_pause(u));
                Some((u.end_arrival, commits, id))
            })
            .collect();
        finals.sort();
        let (commits, rest): (Vec<_>, Vec<_>) = finals.into_iter().partition(|f| f.1);
        let ids = |v: Vec<(Instant, bool, StreamId)>| v.into_iter().map(|f| f.2).collect();
        (ids(commits), ids(rest))
    }

    /// The free streams with a partial at the head of their queue, the one
    /// whose last partial is oldest first; while several wait, only those
    /// due under [`EngineConfig::partial_spacing`] ([`Slot::partial_due`]).
    fn due_partials(&self, state: &State) -> Vec<StreamId> {
        let spacing = self.config.partial_spacing;
        let mut partials: Vec<(Instant, Instant, StreamId)> = state
            .slots
            .iter()
            .filter_map(|(&id, s)| Some((s.last_partial, s.partial_due(spacing)?, id)))
            .collect();
        let now = Instant::now();
        if partials.len() > 1 {
            partials.retain(|(_, due, _)| *due <= now);
        }
        partials.sort();
        partials.into_iter().map(|(.., id)| id).collect()
    }

    /// When a partial held back by [`EngineConfig::partial_spacing`] is due.
    fn next_partial_due(&self, state: &State) -> Option<Instant> {
        state
            .slots
            .values()
            .filter_map(|s| s.partial_due(self.config.partial_spacing))
            .min()
    }

    /// Waits until work may have come (lane 0 also until the next held-back
    /// partial is due).
    fn wait_for_work<'a>(
        &'a self,
        state: MutexGuard<'a, State>,
        lane: usize,
    ) -> MutexGuard<'a, State> {
        match self.next_partial_due(&state).filter(|_| lane == 0) {
            Some(due) => {
                let wait = due.saturating_duration_since(Instant::now());
                self.wake
                    .wait_timeout(state, wait.max(Duration::from_millis(1)))
                    .unwrap_or_else(|e| e.into_inner())
                    .0
            }
            None => self.wake.wait(state).unwrap_or_else(|e| e.into_inner()),
        }
    }

    /// One lane: takes a batch under the lock, decodes it without.
    fn lane(&self, lane: usize) {
        let mut state = self.lock();
        loop {
            if lane == 0 && !state.opening.is_empty() {
                state = self.make_opening(state);
                continue;
            }
            self.settle(&mut state);
            let ids = self.pick(&state, lane);
            if ids.is_empty() {
                if Self::finished(&state) {
                    break;
                }
                state = self.wait_for_work(state, lane);
                continue;
            }
            let taken = Self::take(&mut state, ids);
            drop(state);
            let (done, partial_batch) = self.run_batch(taken);
            state = self.lock();
            Self::give_back(&mut state, done);
            if let Some((n, secs)) = partial_batch {
                state.partial_cost.observe(n, secs);
            }
            self.wake.notify_all();
        }
    }

    /// Takes the head updates of the picked streams, each stream out of its
    /// slot while it decodes, with the decoder's plan for it.
    fn take(state: &mut State, ids: Vec<StreamId>) -> Vec<Taken> {
        ids.into_iter()
            .map(|id| {
                let slot = state.slots.get_mut(&id).expect("picked slot");
                let mut stream = slot.stream.take().expect("picked streams are free");
                let Some(Job::Update(update)) = slot.jobs.pop_front() else {
                    unreachable!("picked streams have an update at the head");
                };
                slot.counters.pending.fetch_sub(1, Ordering::Relaxed);
                if update.kind == UpdateKind::Partial {
                    slot.partial_before = slot.last_partial;
                    slot.last_partial = Instant::now();
                    slot.partial_segment = Some(update.segment);
                }
                let work = stream.decoder.plan(&update);
                (id, stream, update, work)
            })
            .collect()
    }

    /// Puts streams back into their slots after their decodes.
    fn give_back(state: &mut State, done: Vec<Done>) {
        for (id, stream) in done {
            let slot = state
                .slots
                .get_mut(&id)
                .expect("a stream in flight keeps its slot");
            slot.stream = Some(stream);
        }
    }

    /// Runs the taken decodes as one batch and emits their events; returns
    /// each stream and, for a batch of partials, the time per partial.
    fn run_batch(&self, mut taken: Vec<Taken>) -> (Vec<Done>, Option<(usize, f64)>) {
        let partials = taken
            .iter()
            .all(|(_, _, u, _)| u.kind == UpdateKind::Partial);
        let t = Instant::now();
        // Work that cannot join the batch (a reused pause decode, an
        // injected fault) runs alone, guarded as always.
        let (batched, alone): (Vec<usize>, Vec<usize>) =
            (0..taken.len()).partition(|&i| taken[i].3.batchable().is_some());
        let results = decode_together(&mut taken, &batched);
        let mut outcomes: Vec<Option<Result<_, DecodeFailure>>> =
            (0..taken.len()).map(|_| None).collect();
        for (i, r) in batched.iter().zip(results) {
            outcomes[*i] = Some(r);
        }
        for &i in &alone {
            let (_, s, update, work) = &mut taken[i];
            outcomes[i] = Some(guarded(
                s.recognizer.as_mut(),
                update.segment,
                work.is_final(),
                |r| work.run_alone(&update.features, r),
            ));
        }
        let elapsed = t.elapsed();
        let n = taken.len();
        tracing::debug!(
            decodes = n,
            partials,
            ms = elapsed.as_secs_f64() * 1e3,
            "batch decoded"
        );
        let share = elapsed / n as u32;
        self.counters.batches.fetch_add(1, Ordering::Relaxed);
        self.counters
            .batched_decodes
            .fetch_add(n as u64, Ordering::Relaxed);
        self.counters.largest_batch.fetch_max(n, Ordering::Relaxed);
        self.counters
            .model_micros
            .fetch_add(elapsed.as_micros() as u64, Ordering::Relaxed);
        let mut done = Vec::with_capacity(n);
        let mut finished = Vec::new();
        for ((id, mut s, update, work), outcome) in taken.into_iter().zip(outcomes) {
            let outcome = outcome.expect("every decode has an outcome");
            if Self::deliver(id, &mut s, &update, work, outcome, share) {
                finished.push(done.len());
            }
            done.push((id, s, update.segment));
        }
        // Work for the next segments waits until every final of the batch is out.
        Self::prepare_next_batch(&mut done, &finished);
        let partial_batch = partials.then_some((n, elapsed.as_secs_f64()));
        (
            done.into_iter().map(|(id, s, _)| (id, s)).collect(),
            partial_batch,
        )
    }
}

impl Core {
    /// Hands a decode's outcome to its stream's decoder and emits the events;
    /// counts `share` of model time to the stream. True when a final is out.
    fn deliver(
        id: StreamId,
        s: &mut Stream,
        update: &SegmentUpdate,
        work: DecodeWork,
        outcome: Result<crate::model::recognizer::Hypothesis, DecodeFailure>,
        share: Duration,
    ) -> bool {
        s.counters
            .model_micros
            .fetch_add(share.as_micros() as u64, Ordering::Relaxed);
        let Stream {
            decoder,
            recognizer,
            ..
        } = s;
        let mut events = Vec::new();
        let result = decoder.complete(
            update,
            work,
            outcome,
            Duration::ZERO,
            recognizer.as_mut(),
            |ev| events.push(ev),
        );
        let unchanged = matches!(update.kind, UpdateKind::Partial | UpdateKind::Pause)
            && events.is_empty()
            && result.is_ok();
        if unchanged {
            s.counters
                .unchanged_partials
                .fetch_add(1, Ordering::Relaxed);
        }
        tracing::trace!(
            stream = id,
            kind = ?update.kind,
            segment = update.segment,
            end = update.end,
            events = events.len(),
            "decode out"
        );
        for ev in events {
            s.emit(ev);
        }
        match result {
            Ok(finished) => finished,
            Err(failure) => {
                tracing::error!(stream = id, "decoding failed: {failure}");
                s.counters.failed.fetch_add(1, Ordering::Relaxed);
                s.first_failure.get_or_insert(failure);
                false
            }
        }
    }

    /// [`Self::prepare_next`] for the streams `finished` of `done` (id, stream,
    /// segment), in one call into the model; after a panic there,
    /// each stream on its own (guarded).
    fn prepare_next_batch(done: &mut [(StreamId, Stream, u64)], finished: &[usize]) {
        if finished.len() < 2 {
            for &i in finished {
                let (_, s, segment) = &mut done[i];
                Self::prepare_next(s, *segment);
            }
            return;
        }
        let t = Instant::now();
        let mut streams: Vec<&mut (StreamId, Stream, u64)> = done
            .iter_mut()
            .enumerate()
            .filter(|(i, _)| finished.contains(i))
            .map(|(_, d)| d)
            .collect();
        let mut recognizers: Vec<&mut dyn Recognizer> = Vec::with_capacity(streams.len());
        for d in streams.iter_mut() {
            recognizers.push(d.1.recognizer.as_mut());
        }
        let results = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            crate::model::batch::after_finals(&mut recognizers)
        }));
        drop(recognizers);
        let share = t.elapsed() / streams.len() as u32;
        match results {
            Ok(results) => {
                for ((id, s, _), result) in streams.iter_mut().map(|d| &mut **d).zip(results) {
                    if let Err(e) = result {
                        tracing::warn!(stream = *id, "preparing the next segment failed: {e}");
                    }
                    s.decoder.model_time += share;
                    s.counters
                        .model_micros
                        .fetch_add(share.as_micros() as u64, Ordering::Relaxed);
                }
            }
            Err(_) => {
                tracing::warn!("preparing the next segments together panicked; one by one");
                for (_, s, segment) in streams.iter_mut().map(|d| &mut **d) {
                    Self::prepare_next(s, *segment);
                }
            }
        }
    }

    /// Work for the stream's next segment, once the final of `segment` is out.
    fn prepare_next(s: &mut Stream, segment: u64) {
        let t = Instant::now();
        s.decoder.prepare_next(segment, s.recognizer.as_mut());
        s.counters
            .model_micros
            .fetch_add(t.elapsed().as_micros() as u64, Ordering::Relaxed);
    }
}

/// A decode in the continuous batch.
struct InFlight {
    stream: Stream,
    update: SegmentUpdate,
    work: DecodeWork,
    /// Its share of the rounds' model time so far.
    model_time: Duration,
    /// Rounds of the loop it has been in.
    rounds: usize,
    /// When it joined the loop.
    joined: Instant,
}

impl InFlight {
    fn new((_, stream, update, work): Taken) -> Self {
        Self {
            stream,
            update,
            work,
            model_time: Duration::ZERO,
            rounds: 0,
            joined: Instant::now(),
        }
    }

    /// Decodes its update alone, guarded (work that cannot join the loop, or
    /// after a panic in it).
    fn decode_alone(&mut self) -> Result<crate::model::recognizer::Hypothesis, DecodeFailure> {
        let started = Instant::now();
        let (update, work) = (&self.update, &self.work);
        let outcome = guarded(
            self.stream.recognizer.as_mut(),
            update.segment,
            work.is_final(),
            |r| work.run_alone(&update.features, r),
        );
        self.model_time += started.elapsed();
        outcome
    }
}

impl Core {
    /// The lane of a model with a decode loop (continuous batching; see
    /// [`EngineConfig::continuous`]). Each round admits new decodes into the
    /// running batch — every ready final (oldest end of speech first), then
    /// due partials ([`Self::due_partials`]) as many as fit
    /// [`EngineConfig::admit_budget`] and the finals' deadline
    /// ([`Self::partials_joining`]), while fewer than
    /// [`EngineConfig::max_batch`] run; at most once an
    /// [`EngineConfig::admit_interval`] — runs one decode step, and hands each
    /// decode that is over to its stream. A final waits for one step and its
    /// own admission, never for a whole batch to end, nor for its stream's
    /// partial in flight (dropped: it would be stale); one that commits its
    /// pause decode waits for no admission either.
    fn continuous_lane(&self, mut decodes: Box<dyn DecodeLoop>) {
        let mut flying: HashMap<StreamId, InFlight> = HashMap::new();
        // Measured time to admit n decodes (encode and prefill).
        let mut admit_cost = CostModel::default();
        let mut last_admission: Option<Instant> = None;
        // The last admission that partials could join.
        let mut last_partials: Option<Instant> = None;
        let mut pace = Pace::default();
        let mut steer = DeadlineSteer::new(self.config.final_deadline, self.config.final_target);
        let mut state = self.lock();
        loop {
            if !state.opening.is_empty() {
                state = self.make_opening(state);
            }
            self.settle(&mut state);
            let preempted = Self::preempted(&state, &flying);
            if !preempted.is_empty() {
                drop(state);
                let back: Vec<(Done, UpdateKind)> = preempted
                    .into_iter()
                    .map(|id| Self::drop_decode(decodes.as_mut(), &mut flying, id))
                    .collect();
                state = self.lock();
                let mut done = Vec::with_capacity(back.len());
                for (d, kind) in back {
                    let slot = state.slots.get_mut(&d.0);
                    if let Some(slot) = slot.filter(|_| kind == UpdateKind::Partial) {
                        slot.last_partial = slot.partial_before;
                    }
                    done.push(d);
                }
                Self::give_back(&mut state, done);
            }
            let due = flying.is_empty()
                || last_partials.is_none_or(|t| t.elapsed() >= self.config.admit_interval);
            // A final that commits its pause decode costs no model pass: it
            // goes out this round, not at the next admission.
            let (mut ids, mut finals) = Self::ready_finals(&state);
            let room = self.config.max_batch.saturating_sub(flying.len());
            finals.truncate(room);
            if due {
                let deadline = steer.deadline();
                let partials =
                    self.partials_joining(&state, &flying, &finals, deadline, &pace, &admit_cost);
                let partials = partials.min(room - finals.len());
                ids.extend(finals);
                ids.extend(self.due_partials(&state).into_iter().take(partials));
            } else if finals_overdue(
                self.config.final_admit_after,
                &state,
                &finals,
                last_admission,
                Instant::now(),
            ) {
                ids.extend(finals);
            }
            if ids.is_empty() && flying.is_empty() {
                if Self::finished(&state) {
                    break;
                }
                state = self.wait_for_work(state, 0);
                continue;
            }
            let taken = Self::take(&mut state, ids);
            drop(state);
            let started = Instant::now();
            let (done, admitted) =
                self.round(decodes.as_mut(), &mut flying, taken, &mut pace, &mut steer);
            if !flying.is_empty() {
                pace.observe_round(started.elapsed().as_secs_f64());
            }
            if let Some((n, secs)) = admitted {
                admit_cost.observe(n, secs);
                last_admission = Some(Instant::now());
                if due {
                    last_partials = last_admission;
                }
            }
            state = self.lock();
            Self::give_back(&mut state, done);
            self.wake.notify_all();
        }
    }

    /// How many due partials join the loop at this admission beside the
    /// finals `joining`: as many as fit [`EngineConfig::admit_budget`], fewer
    /// where their encoding and prefill would make a final in the loop or
    /// joining it miss `deadline` (then maybe none).
    fn partials_joining(
        &self,
        state: &State,
        flying: &HashMap<StreamId, InFlight>,
        joining: &[StreamId],
        deadline: Option<Duration>,
        pace: &Pace,
        admit_cost: &CostModel,
    ) -> usize {
        let in_loop = flying
            .values()
            .filter(|run| run.update.kind != UpdateKind::Partial)
            .map(|run| (run.update.end_arrival, run.rounds));
        let new = joining
            .iter()
            .filter_map(|id| state.slots.get(id)?.ready_update())
            .map(|u| (u.end_arrival, 0));
        let budget = self.config.admit_budget.as_secs_f64();
        let (secs, bounded) =
            partial_admission(budget, deadline, in_loop.chain(new), pace, Instant::now());
        if bounded {
            admit_cost.fit_beside(secs, joining.len(), 0)
        } else {
            admit_cost.fit(secs)
        }
    }

    /// The streams whose decode in flight is overtaken: a partial by a
    /// final queued behind it — the partial would be stale once out, and
    /// the final waits for the stream — and a pause decode by its segment's
    /// resumed speech: void once out, it would hold a row of every step and
    /// the stream's next partial. A pause decode queued behind a partial
    /// waits for it: the partial is the client's newest text, and dropping
    /// it for a pause decode that resumed speech then voids too left
    /// segments with brief pauses without any partial for 1.5–2 s (H200, 40
    /// and 48 Step-Audio 2 streams).
    fn preempted(state: &State, flying: &HashMap<StreamId, InFlight>) -> Vec<StreamId> {
        flying
            .iter()
            .filter(|(id, run)| {
                let Some(slot) = state.slots.get(id) else {
                    return false;
                };
                let segment = run.update.segment;
                slot.jobs.iter().any(|j| match (run.update.kind, j) {
                    (UpdateKind::Partial, Job::Update(u)) => {
                        matches!(u.kind, UpdateKind::Final(_))
                    }
                    (UpdateKind::Pause, Job::Resume(s)) => *s == segment,
                    _ => false,
                })
            })
            .map(|(&id, _)| id)
            .collect()
    }

    /// Drops stream `id`'s partial or pause decode from the decode loop
    /// (counted as a skipped partial) and gives the stream back, with the
    /// kind of update dropped.
    fn drop_decode(
        decodes: &mut dyn DecodeLoop,
        flying: &mut HashMap<StreamId, InFlight>,
        id: StreamId,
    ) -> (Done, UpdateKind) {
        let mut run = flying.remove(&id).expect("a preempted stream is in flight");
        let rec = run.stream.recognizer.as_mut();
        let dropped = catch_unwind(AssertUnwindSafe(|| decodes.abandon(id, &mut *rec)));
        if !matches!(dropped, Ok(true)) {
            tracing::error!(
                stream = id,
                kind = ?run.update.kind,
                "dropping a decode from the decode loop failed"
            );
            reset_context(rec);
        }
        tracing::debug!(stream = id, kind = ?run.update.kind, rounds = run.rounds, "a decode dropped from the loop");
        run.stream
            .counters
            .skipped_partials
            .fetch_add(1, Ordering::Relaxed);
        ((id, run.stream), run.update.kind)
    }

    /// One round of the continuous batch: the `taken` decodes join it (work
    /// that cannot join — a reused pause decode, an injected fault — runs
    /// alone now), one step runs, and the decodes over are delivered. A panic
    /// in the loop costs every decode in it a reset context and a decode
    /// alone, as in [`decode_together`]. Returns the streams back and how
    /// many decodes joined in how long.
    fn round(
        &self,
        decodes: &mut dyn DecodeLoop,
        flying: &mut HashMap<StreamId, InFlight>,
        taken: Vec<Taken>,
        pace: &mut Pace,
        steer: &mut DeadlineSteer,
    ) -> (Vec<Done>, Option<(usize, f64)>) {
        let t = Instant::now();
        let mut done = Vec::new();
        let (mut joining, alone): (Vec<Taken>, Vec<Taken>) = taken
            .into_iter()
            .partition(|(_, _, _, w)| w.batchable().is_some());
        let alone_start = Instant::now();
        let alone_n = alone.len();
        for taken in alone {
            let id = taken.0;
            let mut run = InFlight::new(taken);
            let outcome = run.decode_alone();
            steer.landed(&run.update);
            done.push(Self::land(id, run, outcome));
        }
        if alone_n > 0 {
            // Every decode in flight waits for these (scripts/stage_times.py sums them).
            tracing::debug!(
                decodes = alone_n,
                ms = alone_start.elapsed().as_secs_f64() * 1e3,
                "work run alone beside the decode loop"
            );
        }
        let keys: Vec<u64> = joining.iter().map(|(id, ..)| *id).collect();
        let admit_start = Instant::now();
        let admitted = catch_unwind(AssertUnwindSafe(|| {
            if joining.is_empty() {
                return Vec::new();
            }
            let mut requests: Vec<BatchRequest<'_>> =
                joining.iter_mut().map(batch_request).collect();
            decodes.admit(&keys, &mut requests)
        }));
        let Ok(admitted) = admitted else {
            flying.extend(joining.into_iter().map(|t| (t.0, InFlight::new(t))));
            done.extend(self.recover(decodes, flying));
            return (done, None);
        };
        let admission =
            (!keys.is_empty()).then(|| (keys.len(), admit_start.elapsed().as_secs_f64()));
        for (taken, r) in joining.into_iter().zip(admitted) {
            let id = taken.0;
            let run = InFlight::new(taken);
            match r {
                Ok(()) => {
                    // One stream's path through the loop (a partial gap's cause).
                    let u = &run.update;
                    tracing::trace!(
                        stream = id,
                        kind = ?u.kind,
                        segment = u.segment,
                        end = u.end,
                        "joined the decode loop"
                    );
                    flying.insert(id, run);
                }
                Err(e) => {
                    let failure = decode_failure(&run.update, &run.work, e);
                    steer.landed(&run.update);
                    done.push(Self::land(id, run, Err(failure)));
                }
            }
        }
        let over = catch_unwind(AssertUnwindSafe(|| {
            let over = decodes.step();
            over.into_iter()
                .map(|key| {
                    let run = flying.get_mut(&key).expect("a decode over was in flight");
                    (key, decodes.finish(key, run.stream.recognizer.as_mut()))
                })
                .collect::<Vec<_>>()
        }));
        // The round's model time, shared by the decodes in it.
        let elapsed = t.elapsed();
        let width = flying.len().max(1);
        for run in flying.values_mut() {
            run.model_time += elapsed / width as u32;
            run.rounds += 1;
        }
        self.count_round(width, elapsed);
        let Ok(over) = over else {
            done.extend(self.recover(decodes, flying));
            return (done, admission);
        };
        for (key, result) in over {
            let run = flying.remove(&key).expect("in flight");
            pace.observe_decode(run.rounds);
            if run.update.kind != UpdateKind::Partial {
                // Where a final's time went (scripts/stage_times.py sums these).
                let ms = |d: Duration| d.as_secs_f64() * 1e3;
                tracing::debug!(
                    before_ms = ms(run.joined.saturating_duration_since(run.update.end_arrival)),
                    in_loop_ms = ms(run.joined.elapsed()),
                    rounds = run.rounds,
                    pause = run.update.kind == UpdateKind::Pause,
                    "a final out of the decode loop"
                );
            }
            let outcome = result.map_err(|e| decode_failure(&run.update, &run.work, e));
            steer.landed(&run.update);
            done.push(Self::land(key, run, outcome));
        }
        (done, admission)
    }

    /// Delivers a decode's outcome to its stream (and the next segment's
    /// preparation after a final).
    fn land(
        id: StreamId,
        run: InFlight,
        outcome: Result<crate::model::recognizer::Hypothesis, DecodeFailure>,
    ) -> Done {
        let InFlight {
            mut stream,
            update,
            work,
            model_time,
            ..
        } = run;
        if Self::deliver(id, &mut stream, &update, work, outcome, model_time) {
            Self::prepare_next(&mut stream, update.segment);
        }
        (id, stream)
    }

    /// After a panic in the decode loop: every decode in it is dropped from
    /// the loop, its stream's context reset and its update decoded alone.
    fn recover(
        &self,
        decodes: &mut dyn DecodeLoop,
        flying: &mut HashMap<StreamId, InFlight>,
    ) -> Vec<Done> {
        tracing::error!(
            "the decode loop of {} decodes panicked; each is decoded again alone",
            flying.len()
        );
        flying
            .drain()
            .map(|(id, mut run)| {
                let rec = run.stream.recognizer.as_mut();
                if catch_unwind(AssertUnwindSafe(|| decodes.abandon(id, &mut *rec))).is_err() {
                    tracing::error!(stream = id, "dropping a decode from the loop panicked");
                }
                reset_context(rec);
                let outcome = run.decode_alone();
                Self::land(id, run, outcome)
            })
            .collect()
    }

    /// Counts one round of `width` decodes that took `elapsed`.
    fn count_round(&self, width: usize, elapsed: Duration) {
        let c = &self.counters;
        c.batches.fetch_add(1, Ordering::Relaxed);
        c.batched_decodes.fetch_add(width as u64, Ordering::Relaxed);
        c.largest_batch.fetch_max(width, Ordering::Relaxed);
        c.model_micros
            .fetch_add(elapsed.as_micros() as u64, Ordering::Relaxed);
    }
}

/// The model request of a taken decode (batchable work).
fn batch_request<'a>((_, s, update, work): &'a mut Taken) -> BatchRequest<'a> {
    let (prefix, commit, partial) = work.batchable().expect("batchable work");
    BatchRequest {
        recognizer: s.recognizer.as_mut(),
        features: &update.features,
        prefix,
        commit,
        partial,
    }
}

/// A failed decode of `update`.
fn decode_failure(update: &SegmentUpdate, work: &DecodeWork, e: ModelError) -> DecodeFailure {
    DecodeFailure {
        segment: update.segment,
        on_final: work.is_final(),
        panicked: false,
        message: e.to_string(),
    }
}

/// Decodes the batchable items `which` of `taken` in one call into the
/// model. A panic inside the batch may have left any of its streams
/// half-updated: each of them has its context reset and is decoded again
/// alone, so only a stream that fails alone loses its segment.
fn decode_together(
    taken: &mut [Taken],
    which: &[usize],
) -> Vec<Result<crate::model::recognizer::Hypothesis, DecodeFailure>> {
    if which.is_empty() {
        return Vec::new();
    }
    let outcome = {
        let mut requests: Vec<BatchRequest<'_>> = taken
            .iter_mut()
            .enumerate()
            // `which` is in batch order.
            .filter(|(i, _)| which.binary_search(i).is_ok())
            .map(|(_, t)| batch_request(t))
            .collect();
        catch_unwind(AssertUnwindSafe(|| decode_batch(&mut requests)))
    };
    match outcome {
        Ok(results) => which
            .iter()
            .zip(results)
            .map(|(&i, r)| {
                let (_, _, update, work) = &taken[i];
                r.map_err(|e| decode_failure(update, work, e))
            })
            .collect(),
        Err(_) => {
            tracing::error!(
                "a batch of {} decodes panicked; each is decoded again alone",
                which.len()
            );
            which
                .iter()
                .map(|&i| {
                    let (_, s, update, work) = &mut taken[i];
                    reset_context(s.recognizer.as_mut());
                    guarded(
                        s.recognizer.as_mut(),
                        update.segment,
                        work.is_final(),
                        |r| work.run_alone(&update.features, r),
                    )
                })
                .collect()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::{
        finals_overdue, partial_admission, Core, CostModel, DeadlineSteer, DecodeWork, InFlight,
        Job, Pace, SegmentDecoder, Slot, State, Stream, StreamCounters,
    };
    use crate::stream::decoder::tests::{update, Scripted};
    use crate::stream::segmenter::EndReason;
    use crate::stream::tracker::UpdateKind;
    use std::collections::{HashMap, VecDeque};
    use std::sync::Arc;
    use std::time::{Duration, Instant};

    fn state() -> State {
        State {
            slots: HashMap::new(),
            opening: VecDeque::new(),
            partial_cost: CostModel::default(),
            senders_gone: false,
        }
    }

    /// A stream of a scripted recogniser with `decoder`.
    fn stream(decoder: SegmentDecoder) -> Stream {
        Stream {
            recognizer: Box::new(Scripted::default()),
            decoder,
            events: Box::new(|_| {}),
            counters: Arc::new(StreamCounters::default()),
            first_failure: None,
        }
    }

    /// A slot with `job` queued whose stream's counters are `counters`,
    /// holding `stream` when free; its last partial at `last_partial`.
    fn slot(
        job: Job,
        counters: &Arc<StreamCounters>,
        stream: Option<Stream>,
        last_partial: Instant,
    ) -> Slot {
        Slot {
            jobs: VecDeque::from([job]),
            counters: counters.clone(),
            last_partial,
            partial_before: last_partial,
            partial_segment: None,
            stream,
        }
    }

    #[test]
    fn finals_that_commit_their_pause_decode_are_told_from_finals_to_decode() {
        let silence = UpdateKind::Final(EndReason::Silence);
        let mut state = state();
        // Stream 1's final has the audio its pause decode saw, stream 2's
        // more; stream 3 has a partial at its head; stream 4 is decoding.
        let streams = [
            (1, true, update(0, silence, 100), true),
            (2, true, update(0, silence, 130), true),
            (3, true, update(0, UpdateKind::Partial, 130), true),
            (4, true, update(0, silence, 100), false),
            (5, false, update(0, silence, 100), true),
        ];
        for (id, paused, head, free) in streams {
            let mut decoder = SegmentDecoder::new();
            if paused {
                let pause = update(0, UpdateKind::Pause, 100);
                decoder
                    .handle_and_emit(&pause, &mut Scripted::default(), |_| {})
                    .unwrap();
            }
            let s = stream(decoder);
            let counters = s.counters.clone();
            let slot = slot(
                Job::Update(head),
                &counters,
                free.then_some(s),
                Instant::now(),
            );
            state.slots.insert(id, slot);
        }
        assert_eq!(Core::ready_finals(&state), (vec![1], vec![2, 5]));
    }

    #[test]
    fn a_final_overtakes_a_partial_in_flight_and_resumed_speech_a_pause_decode() {
        let silence = UpdateKind::Final(EndReason::Silence);
        let mut state = state();
        let mut flying = HashMap::new();
        let partial = |n| update(0, UpdateKind::Partial, n);
        // (stream, in flight, queued behind it, overtaken)
        let cases = [
            (1, partial(100), Job::Update(update(0, silence, 120)), true),
            (2, update(0, UpdateKind::Pause, 100), Job::Resume(0), true),
            (3, update(1, UpdateKind::Pause, 100), Job::Resume(0), false),
            (4, update(0, silence, 100), Job::Resume(0), false),
            (5, partial(100), Job::Update(partial(120)), false),
            (
                6,
                update(0, UpdateKind::Pause, 100),
                Job::Update(partial(120)),
                false,
            ),
            (
                7,
                partial(100),
                Job::Update(update(0, UpdateKind::Pause, 120)),
                false,
            ),
        ];
        let mut want = Vec::new();
        for (id, running, queued, overtaken) in cases {
            let s = stream(SegmentDecoder::new());
            state
                .slots
                .insert(id, slot(queued, &s.counters, None, Instant::now()));
            let work = DecodeWork::Decode {
                prefix: Vec::new(),
                commit: false,
                partial: running.kind == UpdateKind::Partial,
                fault: None,
            };
            flying.insert(id, InFlight::new((id, s, running, work)));
            if overtaken {
                want.push(id);
            }
        }
        let mut got = Core::preempted(&state, &flying);
        got.sort();
        assert_eq!(got, want);
    }

    #[test]
    fn a_final_that_waited_long_enough_joins_between_the_partials_admissions() {
        let silence = UpdateKind::Final(EndReason::Silence);
        let mut state = state();
        let t0 = Instant::now();
        let ms = |n| Duration::from_millis(n);
        for (id, kind) in [(1, UpdateKind::Pause), (2, silence)] {
            let mut head = update(0, kind, 100);
            head.end_arrival = t0 + ms(10 * id);
            let s = stream(SegmentDecoder::new());
            let counters = s.counters.clone();
            state
                .slots
                .insert(id, slot(Job::Update(head), &counters, Some(s), t0));
        }
        let after = Some(ms(80));
        let at = |n| t0 + ms(n);
        // Stream 1's pause decode ended at 10 ms, stream 2's final at 20 ms.
        assert!(!finals_overdue(after, &state, &[1, 2], None, at(85)));
        assert!(finals_overdue(after, &state, &[1, 2], None, at(90)));
        assert!(finals_overdue(after, &state, &[2], None, at(100)));
        assert!(!finals_overdue(after, &state, &[2], None, at(95)));
        // Not within `after` of the last admission, nor when switched off.
        assert!(!finals_overdue(
            after,
            &state,
            &[1, 2],
            Some(at(50)),
            at(120)
        ));
        assert!(finals_overdue(
            after,
            &state,
            &[1, 2],
            Some(at(40)),
            at(120)
        ));
        assert!(!finals_overdue(None, &state, &[1, 2], None, at(1000)));
        assert!(!finals_overdue(after, &state, &[], None, at(1000)));
    }

    #[test]
    fn a_segments_first_partial_is_due_at_once_and_the_next_after_the_spacing() {
        let t0 = Instant::now();
        let spacing = Duration::from_millis(1000);
        let s = stream(SegmentDecoder::new());
        let counters = s.counters.clone();
        let head = Job::Update(update(3, UpdateKind::Partial, 100));
        let mut slot = slot(head, &counters, Some(s), t0);
        slot.partial_segment = Some(2);
        // Segment 3's first partial: due at once.
        assert_eq!(slot.partial_due(spacing), Some(t0));
        // Its next one: a spacing after the last.
        slot.partial_segment = Some(3);
        assert_eq!(slot.partial_due(spacing), Some(t0 + spacing));
        // No partial at the head, or the stream decoding: nothing is due.
        let s = slot.stream.take();
        assert_eq!(slot.partial_due(spacing), None);
        slot.stream = s;
        slot.jobs = VecDeque::from([Job::Update(update(3, UpdateKind::Pause, 100))]);
        assert_eq!(slot.partial_due(spacing), None);
    }

    #[test]
    fn the_deadline_settles_where_one_final_in_twenty_is_late() {
        let ms = |m: u64| Duration::from_millis(m);
        let secs = |s: &DeadlineSteer| s.deadline().unwrap().as_secs_f64();
        // Starts at the most it may be; finals on time keep it there.
        let mut steer = DeadlineSteer::new(Some(ms(700)), Some(ms(550)));
        assert_eq!(steer.deadline(), Some(ms(700)));
        for _ in 0..100 {
            steer.observe(ms(300));
        }
        assert_eq!(steer.deadline(), Some(ms(700)));
        // Every final late: down to the floor, not below.
        for _ in 0..100 {
            steer.observe(ms(900));
        }
        assert!((secs(&steer) - 0.3).abs() < 1e-9, "{}", secs(&steer));
        // A deadline whose finals are late as often as it is loose: when more
        // than one in twenty is late it falls, when fewer it rises. The
        // finals' latency grows with the deadline (partials take its slack):
        // 1 in 10 late above 500 ms, 1 in 50 below — it settles near 500.
        let mut k = 0;
        for _ in 0..4000 {
            k += 1;
            let late = if secs(&steer) > 0.5 {
                k % 10 == 0
            } else {
                k % 50 == 0
            };
            steer.observe(if late { ms(600) } else { ms(400) });
        }
        assert!((secs(&steer) - 0.5).abs() < 0.05, "{}", secs(&steer));
        // Without a target it stays fixed; without a deadline there is none.
        let mut fixed = DeadlineSteer::new(Some(ms(400)), None);
        fixed.observe(ms(900));
        assert_eq!(fixed.deadline(), Some(ms(400)));
        let mut none = DeadlineSteer::new(None, Some(ms(550)));
        none.observe(ms(900));
        assert_eq!(none.deadline(), None);
        // A deadline below the floor stays where it is set.
        let mut zero = DeadlineSteer::new(Some(Duration::ZERO), Some(ms(550)));
        zero.observe(ms(100));
        assert_eq!(zero.deadline(), Some(Duration::ZERO));
    }

    #[test]
    fn partials_yield_to_a_final_that_would_miss_its_deadline() {
        let now = Instant::now();
        let deadline = Some(Duration::from_millis(500));
        // 20 ms a round, 24 rounds a decode.
        let mut pace = Pace::default();
        pace.observe_round(0.020);
        pace.observe_decode(24);
        // No final: the whole budget.
        assert_eq!(
            partial_admission(0.060, deadline, std::iter::empty(), &pace, now),
            (0.060, false)
        );
        // A final joining now, its segment ended 100 ms ago: 400 ms left,
        // 480 ms of rounds to go → nothing for partials.
        let late = now - Duration::from_millis(100);
        let (secs, bounded) =
            partial_admission(0.060, deadline, [(late, 0)].into_iter(), &pace, now);
        assert!(bounded && secs < 0.0, "{secs}");
        // The same final 20 rounds in (4 to go, 80 ms) with 300 ms left:
        // 220 ms of slack, more than the budget.
        let (secs, bounded) = partial_admission(
            0.060,
            deadline,
            [(now - Duration::from_millis(200), 20)].into_iter(),
            &pace,
            now,
        );
        assert_eq!((secs, bounded), (0.060, false));
        // One with 30 ms of slack bounds it; without a deadline nothing does.
        let tight = now - Duration::from_millis(200 + 190);
        let (secs, bounded) =
            partial_admission(0.060, deadline, [(tight, 20)].into_iter(), &pace, now);
        assert!(bounded && (secs - 0.030).abs() < 1e-6, "{secs}");
        assert_eq!(
            partial_admission(0.060, None, [(late, 0)].into_iter(), &pace, now),
            (0.060, false)
        );
        // 30 ms at 5 ms a partial beside joining finals (their admission
        // pays the 200 ms fixed part): 6; alone it pays the fixed part: 0.
        let mut gpu = CostModel::default();
        for n in [2, 4, 8, 3, 6] {
            gpu.observe(n, 0.200 + 0.005 * n as f64);
        }
        assert_eq!(gpu.fit_beside(0.0301, 2, 0), 6);
        assert_eq!(gpu.fit_beside(0.0301, 0, 0), 0);
        assert_eq!(gpu.fit_beside(-0.1, 2, 0), 0);
        assert_eq!(CostModel::default().fit_beside(-0.1, 0, 0), 0);
    }

    #[test]
    fn the_cost_model_separates_a_batchs_fixed_time_from_its_time_per_partial() {
        // CPU-like: every partial costs its own 10 ms → 35 fit 355 ms.
        let mut cpu = CostModel::default();
        for n in [1, 3, 2, 5, 4] {
            cpu.observe(n, 0.010 * n as f64);
        }
        assert_eq!(cpu.fit(0.355), 35);
        // GPU-like: 200 ms whatever the size plus 5 ms a partial → 30 fit
        // 352.5 ms (counted all per partial, a batch of 4 would have said 7).
        let mut gpu = CostModel::default();
        for n in [2, 4, 8, 3, 6] {
            gpu.observe(n, 0.200 + 0.005 * n as f64);
        }
        assert_eq!(gpu.fit(0.3525), 30);
        // One size only: the parts cannot be told apart, the mean cost per
        // partial decides (4 × 50 ms measured → 7 fit 355 ms).
        let mut same = CostModel::default();
        for _ in 0..3 {
            same.observe(4, 0.200);
        }
        assert_eq!(same.fit(0.355), 7);
        // Before any measurement, and when the fixed part alone passes the
        // budget: one partial a batch.
        assert_eq!(CostModel::default().fit(0.350), 1);
        let mut slow = CostModel::default();
        for n in [1, 2, 3] {
            slow.observe(n, 0.500 + 0.01 * n as f64);
        }
        assert_eq!(slow.fit(0.350), 1);
    }
}
