//! The model side of one stream: turns segment updates into partial and
//! final transcript events with a [`Recognizer`], keeping each open
//! segment's committed prefix, and reusing the decode made at a pause as the
//! final when the segment then ends with exactly that audio.

use super::events::Event;
use super::policy::StablePrefix;
use super::segmenter::EndReason;
use super::tracker::{SegmentUpdate, UpdateKind};
use crate::model::recognizer::{Hypothesis, Recognizer};
use crate::model::ModelError;
use std::time::{Duration, Instant};

/// Text is committed from partials only once a segment holds this much
/// audio (4 s at 16 kHz). A shorter one ends soon and its final comes from
/// all of its audio; early partials of a sentence agreed on wrong words
/// ("Looking like last" for "Look in thy glass") that were then forced.
const COMMIT_AFTER_SAMPLES: usize = 4 * 16_000;

struct SegmentState {
    segment: u64,
    policy: StablePrefix,
    /// Decode made at the last pause: (segment length in samples, result).
    at_pause: Option<(usize, Hypothesis)>,
    last_partial: String,
}

impl SegmentState {
    fn new(segment: u64) -> Self {
        Self {
            segment,
            policy: StablePrefix::new(),
            at_pause: None,
            last_partial: String::new(),
        }
    }
}

/// Per-stream decoding state; the recogniser is passed in so one model can
/// serve several streams.
#[derive(Default)]
pub struct SegmentDecoder {
    open: Option<SegmentState>,
    /// Time spent in the model.
    pub model_time: Duration,
    pub finals: u64,
}

fn reason_name(r: EndReason) -> &'static str {
    match r {
        EndReason::Silence => "silence",
        EndReason::MaxLength => "max_length",
        EndReason::Flush => "flush",
    }
}

impl SegmentDecoder {
    pub fn new() -> Self {
        Self::default()
    }

    fn state(&mut self, segment: u64) -> &mut SegmentState {
        if self.open.as_ref().is_none_or(|s| s.segment != segment) {
            self.open = Some(SegmentState::new(segment));
        }
        self.open.as_mut().unwrap()
    }

    /// Speech resumed after a pause: the decode made at the pause is stale.
    pub fn resume(&mut self, segment: u64) {
        if let Some(s) = self.open.as_mut().filter(|s| s.segment == segment) {
            s.at_pause = None;
        }
    }

    /// Decodes `update` and hands its event, if any, to `emit`; after a
    /// final is emitted the recogniser prepares for the next segment
    /// (counted as model time; a failure there is logged, and the work is
    /// redone by the next decode).
    pub fn handle_and_emit(
        &mut self,
        update: &SegmentUpdate,
        recognizer: &mut dyn Recognizer,
        emit: impl FnOnce(Event),
    ) -> Result<(), ModelError> {
        let Some(event) = self.handle(update, recognizer)? else {
            return Ok(());
        };
        let is_final = matches!(event, Event::Final { .. });
        emit(event);
        if is_final {
            let t = Instant::now();
            if let Err(e) = recognizer.after_final() {
                tracing::warn!("preparing the next segment failed: {e}");
            }
            self.model_time += t.elapsed();
        }
        Ok(())
    }

    pub fn handle(
        &mut self,
        update: &SegmentUpdate,
        recognizer: &mut dyn Recognizer,
    ) -> Result<Option<Event>, ModelError> {
        let segment = update.segment;
        match update.kind {
            UpdateKind::Partial | UpdateKind::Pause => {
                let prefix = self.state(segment).policy.committed().to_vec();
                let t = Instant::now();
                let hyp = recognizer.decode(&update.features, &prefix)?;
                self.model_time += t.elapsed();
                let state = self.state(segment);
                if update.kind == UpdateKind::Partial {
                    let long = update.features.samples >= COMMIT_AFTER_SAMPLES;
                    state
                        .policy
                        .update_if(&hyp.tokens, |tok| recognizer.starts_word(tok), long);
                } else {
                    state.at_pause = Some((update.features.samples, hyp.clone()));
                }
                if hyp.text == state.last_partial {
                    return Ok(None);
                }
                state.last_partial = hyp.text.clone();
                let committed = recognizer.detokenize(state.policy.committed());
                Ok(Some(Event::Partial {
                    segment,
                    text: hyp.text.trim().to_string(),
                    committed: committed.trim().to_string(),
                    start: update.start,
                    end: update.end,
                    latency_ms: update.end_arrival.elapsed().as_secs_f64() * 1e3,
                }))
            }
            UpdateKind::Final(reason) => {
                let mut state = match self.open.take() {
                    Some(s) if s.segment == segment => s,
                    _ => SegmentState::new(segment),
                };
                let reusable = state
                    .at_pause
                    .take()
                    .filter(|(len, _)| *len == update.features.samples);
                let t = Instant::now();
                let hyp = match reusable {
                    Some((_, hyp)) => hyp,
                    None => recognizer.decode(&update.features, state.policy.committed())?,
                };
                recognizer.commit(&update.features, &hyp)?;
                tracing::debug!(
                    segment,
                    no_speech_prob = hyp.no_speech_prob,
                    avg_logprob = hyp.avg_logprob,
                    encode_ms = hyp.encode_time.as_secs_f64() * 1e3,
                    decode_ms = hyp.decode_time.as_secs_f64() * 1e3,
                    text = %hyp.text,
                    "final decoded"
                );
                self.model_time += t.elapsed();
                self.finals += 1;
                Ok(Some(Event::Final {
                    segment,
                    text: hyp.text.trim().to_string(),
                    start: update.start,
                    end: update.end,
                    latency_ms: update.end_arrival.elapsed().as_secs_f64() * 1e3,
                    reason: reason_name(reason),
                }))
            }
        }
    }
}
