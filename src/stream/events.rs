//! The events a live stream produces, as printed by `--format jsonl` and sent
//! to WebSocket clients. Times are seconds of stream time (audio consumed
//! since the stream started).

use serde::Serialize;

#[derive(Clone, Debug, PartialEq, Serialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Event {
    SpeechStart {
        segment: u64,
        start: f64,
    },
    SpeechEnd {
        segment: u64,
        start: f64,
        end: f64,
    },
    /// The current hypothesis of an open segment. `committed` is its start
    /// that will not change (it begins the segment's final).
    Partial {
        segment: u64,
        text: String,
        committed: String,
        start: f64,
        end: f64,
        /// Wall time from the arrival of the audio at `end` to this event.
        latency_ms: f64,
    },
    Final {
        segment: u64,
        text: String,
        start: f64,
        end: f64,
        /// Wall time from the arrival of the audio at `end` to this event.
        latency_ms: f64,
        /// Why the segment ended: `silence`, `max_length` or `flush` (end of
        /// input, stop, or a failed source); `error` when the segment could
        /// not be decoded (`text` is then empty and an `error` event came first).
        reason: &'static str,
    },
    Stats(Stats),
    Error {
        message: String,
    },
}

impl Event {
    pub fn segment(&self) -> Option<u64> {
        match self {
            Event::SpeechStart { segment, .. }
            | Event::SpeechEnd { segment, .. }
            | Event::Partial { segment, .. }
            | Event::Final { segment, .. } => Some(*segment),
            Event::Stats(_) | Event::Error { .. } => None,
        }
    }

    pub fn to_json(&self) -> String {
        serde_json::to_string(self).unwrap_or_else(|e| {
            format!(r#"{{"type":"error","message":"unserialisable event: {e}"}}"#)
        })
    }
}

#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct Stats {
    /// Audio consumed so far (s).
    pub audio_seconds: f64,
    /// Wall time since the stream started (s).
    pub wall_seconds: f64,
    /// Samples the source could not hand over because the ring was full.
    pub dropped_samples: u64,
    pub overflow_events: u64,
    /// Partial requests skipped because newer audio was already queued.
    pub skipped_partials: u64,
    pub segments: u64,
    pub finals: u64,
    /// Time spent in the model / audio consumed.
    pub model_rtf: f64,
    /// CPU time of the process / wall time, in percent of one core.
    pub cpu_percent: f64,
    pub rss_mb: f64,
    pub peak_rss_mb: f64,
}
