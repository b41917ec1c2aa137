//! The audio side of one stream: 16 kHz samples in; VAD, segmentation and
//! the incremental log-mel of the open segment; segment updates (partial,
//! pause, final) and speech start/end events out. No model, no threads:
//! the live pipeline runs it on its audio thread, the WebSocket server once
//! per client session.

use super::events::Event;
use super::segmenter::{EndReason, SegmentEvent, Segmenter, SegmenterConfig};
use crate::audio::vad::{VadError, VoiceDetector};
use crate::audio::MODEL_SAMPLE_RATE;
use crate::frontend::{MelExtractor, MelStream};
use crate::model::recognizer::{FrontendSpec, SegmentFeatures};
use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Instant;

#[derive(Clone, Debug, PartialEq)]
pub struct TrackerConfig {
    /// 0 (least aggressive) … 3 (most aggressive at rejecting non-speech).
    pub vad_mode: u8,
    pub frame_ms: u32,
    pub pre_roll_ms: u32,
    pub min_speech_ms: u32,
    pub hangover_ms: u32,
    pub tail_pad_ms: u32,
    pub max_segment_ms: u32,
    /// A partial is requested each time the open segment grows by this much.
    pub partial_interval_ms: u32,
}

impl Default for TrackerConfig {
    fn default() -> Self {
        Self {
            vad_mode: 1,
            frame_ms: 30,
            pre_roll_ms: 200,
            min_speech_ms: 120,
            hangover_ms: 300,
            tail_pad_ms: 150,
            max_segment_ms: 15_000,
            partial_interval_ms: 500,
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum UpdateKind {
    Partial,
    /// Silence reached the tail padding: the segment's final, if it stays silent.
    Pause,
    Final(EndReason),
}

#[derive(Clone, Debug)]
pub struct SegmentUpdate {
    pub segment: u64,
    pub kind: UpdateKind,
    pub features: SegmentFeatures,
    /// Stream time of the segment's audio (s).
    pub start: f64,
    pub end: f64,
    /// When the audio at `end` arrived (for final latency).
    pub end_arrival: Instant,
}

#[derive(Clone, Debug)]
pub enum TrackerOutput {
    Event(Event),
    Update(SegmentUpdate),
    /// Speech resumed: the last `Pause` of this segment is void.
    Resume {
        segment: u64,
    },
}

struct OpenSegment {
    id: u64,
    start: u64,
    mel: MelStream,
    /// Segment length (samples) at the last partial or pause request.
    last_request: usize,
    paused: bool,
}

pub struct StreamTracker {
    vad: VoiceDetector,
    segmenter: Segmenter,
    frontend: FrontendSpec,
    extractor: Arc<MelExtractor>,
    partial_interval: usize,
    /// Samples not yet forming a whole VAD frame.
    pending: Vec<f32>,
    /// Samples consumed into frames so far (the stream position).
    position: u64,
    /// The most recent samples, for pre-roll and cut points.
    history: VecDeque<f32>,
    history_capacity: usize,
    open: Option<OpenSegment>,
    /// (stream position after a chunk, its arrival time), recent chunks only.
    arrivals: VecDeque<(u64, Instant)>,
}

fn seconds(samples: u64) -> f64 {
    samples as f64 / MODEL_SAMPLE_RATE as f64
}

impl StreamTracker {
    pub fn new(
        cfg: &TrackerConfig,
        frontend: FrontendSpec,
        max_segment_seconds: f64,
    ) -> Result<Self, VadError> {
        let vad = VoiceDetector::new(cfg.vad_mode, cfg.frame_ms)?;
        let max_segment_ms = (cfg.max_segment_ms as f64).min(max_segment_seconds * 1000.0) as u32;
        let seg_cfg = SegmenterConfig::from_ms(
            cfg.frame_ms,
            cfg.pre_roll_ms,
            cfg.min_speech_ms,
            cfg.hangover_ms,
            cfg.tail_pad_ms,
            max_segment_ms,
        );
        let history_capacity =
            seg_cfg.pre_roll + seg_cfg.min_speech + seg_cfg.cut_search + 4 * seg_cfg.frame_samples;
        Ok(Self {
            vad,
            segmenter: Segmenter::new(seg_cfg),
            frontend,
            extractor: Arc::new(MelExtractor::new(frontend.n_mels)),
            partial_interval: (cfg.partial_interval_ms as usize * 16).max(1),
            pending: Vec::new(),
            position: 0,
            history: VecDeque::with_capacity(history_capacity),
            history_capacity,
            open: None,
            arrivals: VecDeque::new(),
        })
    }

    fn arrival_of(&self, sample: u64) -> Instant {
        self.arrivals
            .iter()
            .find(|(pos, _)| *pos >= sample)
            .or(self.arrivals.back())
            .map(|&(_, t)| t)
            .unwrap_or_else(Instant::now)
    }

    /// Feeds 16 kHz mono samples that arrived at `arrival`.
    pub fn push(&mut self, samples: &[f32], arrival: Instant, out: &mut Vec<TrackerOutput>) {
        let total = self.position + (self.pending.len() + samples.len()) as u64;
        self.arrivals.push_back((total, arrival));
        // Keep arrival times for the longest segment plus margin.
        let horizon = total.saturating_sub(64 * MODEL_SAMPLE_RATE as u64);
        while self.arrivals.front().is_some_and(|&(p, _)| p < horizon) && self.arrivals.len() > 1 {
            self.arrivals.pop_front();
        }
        let frame_len = self.vad.frame_len();
        let mut input = samples;
        let mut events = Vec::new();
        while !input.is_empty() {
            let take = (frame_len - self.pending.len()).min(input.len());
            self.pending.extend_from_slice(&input[..take]);
            input = &input[take..];
            if self.pending.len() < frame_len {
                break;
            }
            let frame = std::mem::take(&mut self.pending);
            let frame_start = self.position;
            self.position += frame_len as u64;
            self.history.extend(frame.iter().copied());
            while self.history.len() > self.history_capacity {
                self.history.pop_front();
            }
            if let Some(open) = &mut self.open {
                open.mel.push(&frame);
            }
            let decision = self.vad.classify(&frame);
            self.pending = frame;
            self.pending.clear();
            events.clear();
            self.segmenter
                .push(frame_start, decision.voiced, decision.energy, &mut events);
            for ev in events.drain(..) {
                self.apply(ev, out);
            }
            self.maybe_request_partial(out);
        }
    }

    /// Ends the stream: the open segment (with any unframed samples) becomes final.
    pub fn finish(&mut self, out: &mut Vec<TrackerOutput>) {
        let rest = std::mem::take(&mut self.pending);
        let stream_end = self.position + rest.len() as u64;
        if let Some(open) = &mut self.open {
            open.mel.push(&rest);
        }
        self.position = stream_end;
        if let Some(ev) = self.segmenter.flush(stream_end) {
            self.apply(ev, out);
        }
    }

    fn features(&mut self, len: usize) -> SegmentFeatures {
        let tail = self.frontend.tail_zeros;
        let open = self.open.as_mut().expect("an open segment");
        SegmentFeatures {
            n_mels: self.frontend.n_mels,
            raw_frames: open.mel.snapshot(len, tail),
            samples: len,
        }
    }

    fn update(&mut self, kind: UpdateKind, end: u64) -> TrackerOutput {
        let (id, start) = {
            let o = self.open.as_ref().expect("an open segment");
            (o.id, o.start)
        };
        let len = (end.saturating_sub(start)) as usize;
        TrackerOutput::Update(SegmentUpdate {
            segment: id,
            kind,
            features: self.features(len),
            start: seconds(start),
            end: seconds(end),
            end_arrival: self.arrival_of(end),
        })
    }

    /// Opens a segment at `start`, seeding its mel with the audio since then.
    fn open_at(&mut self, id: u64, start: u64) {
        let mut mel = MelStream::new(self.extractor.clone());
        let history_start = self.position - self.history.len() as u64;
        let from = start.max(history_start);
        let (a, b) = self.history.as_slices();
        let skip = (from - history_start) as usize;
        if skip < a.len() {
            mel.push(&a[skip..]);
            mel.push(b);
        } else {
            mel.push(&b[skip - a.len()..]);
        }
        self.open = Some(OpenSegment {
            id,
            start: from,
            mel,
            last_request: 0,
            paused: false,
        });
    }

    fn apply(&mut self, ev: SegmentEvent, out: &mut Vec<TrackerOutput>) {
        match ev {
            SegmentEvent::Start { segment, start } => {
                self.open_at(segment, start);
                out.push(TrackerOutput::Event(Event::SpeechStart {
                    segment,
                    start: seconds(start),
                }));
            }
            SegmentEvent::Pause { segment, end } => {
                if self.open.as_ref().is_some_and(|o| o.id == segment) {
                    let upd = self.update(UpdateKind::Pause, end);
                    if let Some(o) = &mut self.open {
                        o.paused = true;
                    }
                    out.push(upd);
                }
            }
            SegmentEvent::Resume { segment } => {
                if let Some(o) = &mut self.open {
                    o.paused = false;
                }
                out.push(TrackerOutput::Resume { segment });
            }
            SegmentEvent::End {
                segment,
                start,
                end,
                reason,
            } => {
                if self.open.as_ref().is_some_and(|o| o.id == segment) {
                    out.push(self.update(UpdateKind::Final(reason), end));
                    self.open = None;
                }
                out.push(TrackerOutput::Event(Event::SpeechEnd {
                    segment,
                    start: seconds(start),
                    end: seconds(end),
                }));
            }
        }
    }

    fn maybe_request_partial(&mut self, out: &mut Vec<TrackerOutput>) {
        let Some(open) = &self.open else { return };
        let len = open.mel.samples().len();
        // While the speaker is silent there is nothing new to transcribe, and
        // a partial started now would hold up the pause decode that follows.
        if open.paused
            || self.segmenter.trailing_silence() > 0
            || len < open.last_request + self.partial_interval
        {
            return;
        }
        let end = open.start + len as u64;
        let upd = self.update(UpdateKind::Partial, end);
        if let Some(o) = &mut self.open {
            o.last_request = len;
        }
        out.push(upd);
    }
}
