//! The model side of one stream: turns segment updates into partial and
//! final transcript events with a [`Recognizer`], keeping each open
//! segment's committed prefix, and reusing the decode made at a pause as the
//! final when the segment then ends with exactly that audio.
//!
//! Every call into the recogniser is guarded: an error or a panic costs the
//! segment it happened in, not the stream (see [`SegmentDecoder::handle_and_emit`]).

use super::events::Event;
use super::policy::StablePrefix;
use super::segmenter::EndReason;
use super::tracker::{SegmentUpdate, UpdateKind};
use crate::model::recognizer::{Hypothesis, Recognizer, SegmentFeatures};
use crate::model::ModelError;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

/// Text is committed from partials only once a segment holds this much
/// audio (4 s at 16 kHz). A shorter one ends soon and its final comes from
/// all of its audio; early partials of a sentence agreed on wrong words
/// ("Looking like last" for "Look in thy glass") that were then forced.
const COMMIT_AFTER_SAMPLES: usize = 4 * 16_000;

/// A partial whose text is that of the last one sent is not sent again,
/// unless the last one sent reached this much less far into the segment's
/// audio (s) (or, before the first, the segment is this long): then it
/// goes out anyway, so a client sees its hypothesis is current through the
/// partial's end, and a speaking stream is never long without a partial
/// only because its words did not change (in a 20 s run of two streams on
/// the CPU, real tiny.en weights gave 9–10 partials a stream with the text
/// of the one before). Half the engine's default partial spacing (1 s):
/// under load, partials about a second apart always go out; only one less
/// than half a second after the last one sent is held back (a pause decode
/// right after a partial; some of a lightly loaded stream's, asked every
/// 0.5 s of audio), and the next comes within about a second. At 1 s, a
/// partial a hair under a second after the last was dropped and the stream
/// waited 2 s (H200, 4 Step-Audio 2 streams).
const RESEND_UNCHANGED_AFTER_S: f64 = 0.5;

/// The `reason` of the final of a segment whose decode failed (its text is empty).
pub const ERROR_REASON: &str = "error";

struct SegmentState {
    segment: u64,
    policy: StablePrefix,
    /// Decode made at the last pause: (segment length in samples, result).
    at_pause: Option<(usize, Hypothesis)>,
    last_partial: String,
    /// Stream time (s) that the last partial sent reached.
    last_sent_end: Option<f64>,
}

impl SegmentState {
    fn new(segment: u64) -> Self {
        Self {
            segment,
            policy: StablePrefix::new(),
            at_pause: None,
            last_partial: String::new(),
            last_sent_end: None,
        }
    }
}

/// A decode that failed with an error or a panic inside the recogniser.
#[derive(Clone, Debug, PartialEq)]
pub struct DecodeFailure {
    pub segment: u64,
    /// The segment's final failed (it went out with reason `error` and no
    /// text); otherwise a partial or pause decode failed and the segment
    /// goes on.
    pub on_final: bool,
    /// The recogniser panicked (its committed context was then reset).
    pub panicked: bool,
    pub message: String,
}

impl std::fmt::Display for DecodeFailure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let what = if self.on_final { "final" } else { "partial" };
        write!(f, "segment {} ({what}): {}", self.segment, self.message)
    }
}

/// Per-stream decoding state; the recogniser is passed in so one model can
/// serve several streams.
pub struct SegmentDecoder {
    open: Option<SegmentState>,
    /// Time spent in the model.
    pub model_time: Duration,
    pub finals: u64,
    fault: Option<InjectedFault>,
}

impl Default for SegmentDecoder {
    fn default() -> Self {
        Self::new()
    }
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
        let stream = STREAMS_CREATED.fetch_add(1, Ordering::Relaxed);
        Self {
            open: None,
            model_time: Duration::ZERO,
            finals: 0,
            fault: injected_fault().filter(|f| f.stream.is_none_or(|s| s == stream)),
        }
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

    /// Decodes `update` on its own and hands its event, if any, to `emit`;
    /// after a final is emitted the recogniser prepares for the next
    /// segment ([`Self::prepare_next`]).
    ///
    /// A failure inside the recogniser (an error, or a panic, which is
    /// caught here) emits an [`Event::Error`]; if it was the segment's final
    /// that failed, a final with reason `error` and empty text follows, so
    /// that every segment still gets exactly one final. After a panic, or a
    /// failed final, the recogniser's committed context is reset: its state
    /// may be half-updated. Later segments are decoded as usual. The failure
    /// is also returned, for logs and the exit status.
    pub fn handle_and_emit(
        &mut self,
        update: &SegmentUpdate,
        recognizer: &mut dyn Recognizer,
        emit: impl FnMut(Event),
    ) -> Result<(), DecodeFailure> {
        let work = self.plan(update);
        let t = Instant::now();
        let result = guarded(recognizer, update.segment, work.is_final(), |r| {
            work.run_alone(&update.features, r)
        });
        if self.complete(update, work, result, t.elapsed(), recognizer, emit)? {
            self.prepare_next(update.segment, recognizer);
        }
        Ok(())
    }

    /// After a final is out: the recogniser prepares for the next segment
    /// (counted as model time; a failure is logged, and the work is redone
    /// by the next decode).
    pub fn prepare_next(&mut self, segment: u64, recognizer: &mut dyn Recognizer) {
        let t = Instant::now();
        if let Err(f) = guarded(recognizer, segment, true, |r| r.after_final()) {
            tracing::warn!("preparing the next segment failed: {f}");
        }
        self.model_time += t.elapsed();
    }

    /// Whether `update` is a final whose audio is exactly what its pause
    /// decode saw: [`Self::plan`] makes it a commit of that decode, no model
    /// pass (so a scheduler may run it at once, outside any batch).
    pub fn reuses_pause(&self, update: &SegmentUpdate) -> bool {
        matches!(update.kind, UpdateKind::Final(_))
            && self.open.as_ref().is_some_and(|s| {
                s.segment == update.segment
                    && s.at_pause
                        .as_ref()
                        .is_some_and(|(len, _)| *len == update.features.samples)
            })
    }

    /// What the model must do for `update` (the first half of
    /// [`Self::handle_and_emit`]; [`Self::complete`] is the second). A final
    /// closes the open segment here.
    pub fn plan(&mut self, update: &SegmentUpdate) -> DecodeWork {
        let segment = update.segment;
        match update.kind {
            UpdateKind::Partial | UpdateKind::Pause => DecodeWork::Decode {
                prefix: self.state(segment).policy.committed().to_vec(),
                commit: false,
                // A pause decode may become the final: only partials may be bounded.
                partial: update.kind == UpdateKind::Partial,
                fault: None,
            },
            UpdateKind::Final(_) => {
                let reusable = self.reuses_pause(update);
                let mut state = match self.open.take() {
                    Some(s) if s.segment == segment => s,
                    _ => SegmentState::new(segment),
                };
                match state.at_pause.take().filter(|_| reusable) {
                    Some((_, hyp)) => DecodeWork::Commit(hyp),
                    None => DecodeWork::Decode {
                        prefix: state.policy.committed().to_vec(),
                        commit: true,
                        partial: false,
                        fault: self.fault.filter(|f| f.segment == segment),
                    },
                }
            }
        }
    }

    /// Turns the model's result for `update` (planned by [`Self::plan`])
    /// into its event, if any, handed to `emit`; see
    /// [`Self::handle_and_emit`] for what a failure does. True when a final
    /// was emitted (then call [`Self::prepare_next`]).
    pub fn complete(
        &mut self,
        update: &SegmentUpdate,
        work: DecodeWork,
        result: Result<Hypothesis, DecodeFailure>,
        model_time: Duration,
        recognizer: &mut dyn Recognizer,
        mut emit: impl FnMut(Event),
    ) -> Result<bool, DecodeFailure> {
        self.model_time += model_time;
        let event = match self.event(update, result, recognizer) {
            Ok(Some(event)) => event,
            Ok(None) => return Ok(false),
            Err(failure) => {
                emit(Event::Error {
                    message: format!("decoding failed: {failure}"),
                });
                if failure.on_final {
                    // A failed commit may have changed part of the context.
                    if !failure.panicked {
                        reset_context(recognizer);
                    }
                    self.finals += 1;
                    emit(Event::Final {
                        segment: update.segment,
                        text: String::new(),
                        start: update.start,
                        end: update.end,
                        latency_ms: update.end_arrival.elapsed().as_secs_f64() * 1e3,
                        reason: ERROR_REASON,
                    });
                }
                return Err(failure);
            }
        };
        drop(work);
        let is_final = matches!(event, Event::Final { .. });
        emit(event);
        Ok(is_final)
    }

    /// The event for a decoded `update`, if any.
    fn event(
        &mut self,
        update: &SegmentUpdate,
        result: Result<Hypothesis, DecodeFailure>,
        recognizer: &mut dyn Recognizer,
    ) -> Result<Option<Event>, DecodeFailure> {
        let segment = update.segment;
        let hyp = result?;
        match update.kind {
            UpdateKind::Partial | UpdateKind::Pause => {
                let state = self.state(segment);
                if update.kind == UpdateKind::Partial {
                    let long = update.features.samples >= COMMIT_AFTER_SAMPLES;
                    state
                        .policy
                        .update_if(&hyp.tokens, |tok| recognizer.starts_word(tok), long);
                } else {
                    state.at_pause = Some((update.features.samples, hyp.clone()));
                }
                let since_sent = update.end - state.last_sent_end.unwrap_or(update.start);
                if hyp.text == state.last_partial && since_sent < RESEND_UNCHANGED_AFTER_S {
                    tracing::debug!(segment, kind = ?update.kind, "partial text unchanged: not sent");
                    return Ok(None);
                }
                state.last_partial = hyp.text.clone();
                state.last_sent_end = Some(update.end);
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
                tracing::debug!(
                    segment,
                    no_speech_prob = hyp.no_speech_prob,
                    avg_logprob = hyp.avg_logprob,
                    encode_ms = hyp.encode_time.as_secs_f64() * 1e3,
                    decode_ms = hyp.decode_time.as_secs_f64() * 1e3,
                    text = %hyp.text,
                    "final decoded"
                );
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

/// What the model must do for one update ([`SegmentDecoder::plan`]).
#[derive(Clone, Debug)]
pub enum DecodeWork {
    /// Decode the segment after a forced `prefix`; a final (`commit`) is
    /// decoded and committed in one pass; a `partial` is never committed
    /// ([`Recognizer::decode_partial`]).
    Decode {
        prefix: Vec<u32>,
        commit: bool,
        partial: bool,
        fault: Option<InjectedFault>,
    },
    /// A final whose audio is exactly what its pause decode saw: that
    /// hypothesis is committed as it is.
    Commit(Hypothesis),
}

impl DecodeWork {
    pub fn is_final(&self) -> bool {
        matches!(self, Self::Commit(_) | Self::Decode { commit: true, .. })
    }

    /// The decode's forced prefix, whether it commits and whether it is a
    /// partial, when it can be run in a batch with other streams' (not a
    /// reused pause decode, not an injected fault).
    pub fn batchable(&self) -> Option<(&[u32], bool, bool)> {
        match self {
            Self::Decode {
                prefix,
                commit,
                partial,
                fault: None,
            } => Some((prefix, *commit, *partial)),
            _ => None,
        }
    }

    /// Runs the work for this stream alone.
    pub fn run_alone(
        &self,
        features: &SegmentFeatures,
        recognizer: &mut dyn Recognizer,
    ) -> Result<Hypothesis, ModelError> {
        match self {
            Self::Decode {
                prefix,
                commit,
                partial,
                fault,
            } => {
                if let Some(fault) = fault {
                    fault.trigger()?;
                }
                if *commit {
                    recognizer.decode_final(features, prefix)
                } else if *partial {
                    recognizer.decode_partial(features, prefix)
                } else {
                    recognizer.decode(features, prefix)
                }
            }
            Self::Commit(hyp) => {
                recognizer.commit(features, hyp)?;
                Ok(hyp.clone())
            }
        }
    }
}

/// Runs one call into the recogniser, turning an error or a panic into a
/// [`DecodeFailure`]; after a panic the committed context is reset.
pub(crate) fn guarded<T>(
    recognizer: &mut dyn Recognizer,
    segment: u64,
    on_final: bool,
    call: impl FnOnce(&mut dyn Recognizer) -> Result<T, ModelError>,
) -> Result<T, DecodeFailure> {
    let failure = |panicked, message| DecodeFailure {
        segment,
        on_final,
        panicked,
        message,
    };
    // The recogniser is not used again before its context is reset, and the
    // decoder's own state is only changed after a successful call.
    match catch_unwind(AssertUnwindSafe(|| call(&mut *recognizer))) {
        Ok(Ok(value)) => Ok(value),
        Ok(Err(e)) => Err(failure(false, e.to_string())),
        Err(payload) => {
            let what = payload
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| payload.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "(no message)".into());
            reset_context(recognizer);
            Err(failure(true, format!("the model panicked: {what}")))
        }
    }
}

pub(crate) fn reset_context(recognizer: &mut dyn Recognizer) {
    if catch_unwind(AssertUnwindSafe(|| recognizer.reset_context())).is_err() {
        tracing::error!("resetting the recogniser's context panicked as well");
    }
}

/// Testing aid, read once per process from `STEPAUDIO_LIVE_INJECT_FAULT`:
/// `panic:SEG` or `error:SEG` makes the final decode of segment SEG panic
/// or fail with an error inside the guarded recogniser call, as a model bug
/// or a device failure would; `panic:SEG@N` or `error:SEG@N` does so only
/// for the Nth stream (0-based) created in the process: the local source's
/// stream, or the server's audio-in sessions in the order they started.
/// Used by tests/faults.rs; an unparsable value is reported and ignored.
pub const INJECT_FAULT_VAR: &str = "STEPAUDIO_LIVE_INJECT_FAULT";

/// Streams (decoders) created in this process, for `@N` in the fault spec.
static STREAMS_CREATED: AtomicUsize = AtomicUsize::new(0);

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum FaultKind {
    Panic,
    Error,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct InjectedFault {
    kind: FaultKind,
    segment: u64,
    stream: Option<usize>,
}

impl InjectedFault {
    fn parse(spec: &str) -> Option<Self> {
        let (kind, rest) = spec.trim().split_once(':')?;
        let kind = match kind {
            "panic" => FaultKind::Panic,
            "error" => FaultKind::Error,
            _ => return None,
        };
        let (segment, stream) = match rest.split_once('@') {
            Some((seg, stream)) => (seg, Some(stream.parse().ok()?)),
            None => (rest, None),
        };
        Some(Self {
            kind,
            segment: segment.parse().ok()?,
            stream,
        })
    }

    fn trigger(self) -> Result<(), ModelError> {
        match self.kind {
            FaultKind::Panic => panic!(
                "injected fault ({INJECT_FAULT_VAR}) in segment {}",
                self.segment
            ),
            FaultKind::Error => Err(ModelError::Invalid(format!(
                "injected fault ({INJECT_FAULT_VAR}) in segment {}",
                self.segment
            ))),
        }
    }
}

fn injected_fault() -> Option<InjectedFault> {
    static FAULT: OnceLock<Option<InjectedFault>> = OnceLock::new();
    *FAULT.get_or_init(|| {
        let spec = std::env::var(INJECT_FAULT_VAR).ok()?;
        let fault = InjectedFault::parse(&spec);
        match fault {
            Some(f) => tracing::warn!("{INJECT_FAULT_VAR}={spec}: injecting {f:?}"),
            None => tracing::warn!(
                "{INJECT_FAULT_VAR}={spec} not understood (panic:SEG[@STREAM] or error:SEG[@STREAM]); ignored"
            ),
        }
        fault
    })
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::model::recognizer::FrontendSpec;

    /// Transcribes a segment as `words N` (N: its length); decode number
    /// `panic_at` panics and `fail_at` returns an error.
    #[derive(Default)]
    pub(crate) struct Scripted {
        decodes: usize,
        panic_at: Option<usize>,
        fail_at: Option<usize>,
        context: Vec<String>,
        resets: usize,
    }

    impl Recognizer for Scripted {
        fn as_any_mut(&mut self) -> &mut dyn std::any::Any {
            self
        }

        fn name(&self) -> String {
            "scripted".into()
        }
        fn frontend(&self) -> FrontendSpec {
            FrontendSpec {
                n_mels: 1,
                tail_zeros: 0,
            }
        }
        fn max_segment_seconds(&self) -> f64 {
            30.0
        }
        fn decode(
            &mut self,
            features: &SegmentFeatures,
            _prefix: &[u32],
        ) -> Result<Hypothesis, ModelError> {
            let n = self.decodes;
            self.decodes += 1;
            if self.panic_at == Some(n) {
                panic!("scripted panic");
            }
            if self.fail_at == Some(n) {
                return Err(ModelError::Invalid("scripted error".into()));
            }
            Ok(Hypothesis {
                tokens: vec![features.samples as u32],
                text: format!("words {}", features.samples),
                ..Default::default()
            })
        }
        fn commit(&mut self, _: &SegmentFeatures, h: &Hypothesis) -> Result<(), ModelError> {
            self.context.push(h.text.clone());
            Ok(())
        }
        fn detokenize(&self, tokens: &[u32]) -> String {
            format!("{tokens:?}")
        }
        fn starts_word(&self, _: u32) -> bool {
            true
        }
        fn reset_context(&mut self) {
            self.context.clear();
            self.resets += 1;
        }
    }

    pub(crate) fn update(segment: u64, kind: UpdateKind, samples: usize) -> SegmentUpdate {
        SegmentUpdate {
            segment,
            kind,
            features: SegmentFeatures {
                n_mels: 1,
                raw_frames: Vec::new(),
                samples,
            },
            start: segment as f64,
            end: segment as f64 + 0.5,
            end_arrival: Instant::now(),
        }
    }

    fn run(
        decoder: &mut SegmentDecoder,
        rec: &mut Scripted,
        updates: &[SegmentUpdate],
    ) -> (Vec<Event>, Vec<DecodeFailure>) {
        let (mut events, mut failures) = (Vec::new(), Vec::new());
        for u in updates {
            if let Err(f) = decoder.handle_and_emit(u, rec, |e| events.push(e)) {
                failures.push(f);
            }
        }
        (events, failures)
    }

    fn final_of(events: &[Event], segment: u64) -> (String, &'static str) {
        events
            .iter()
            .find_map(|e| match e {
                Event::Final {
                    segment: s,
                    text,
                    reason,
                    ..
                } if *s == segment => Some((text.clone(), *reason)),
                _ => None,
            })
            .unwrap_or_else(|| panic!("no final for segment {segment}: {events:?}"))
    }

    #[test]
    fn a_panicking_final_costs_its_segment_and_resets_the_context() {
        let silence = UpdateKind::Final(EndReason::Silence);
        let mut rec = Scripted {
            panic_at: Some(1),
            ..Default::default()
        };
        let mut decoder = SegmentDecoder::new();
        decoder.fault = None;
        let updates = [
            update(0, silence, 100),
            update(1, silence, 200),
            update(2, silence, 300),
        ];
        let (events, failures) = run(&mut decoder, &mut rec, &updates);
        assert_eq!(final_of(&events, 0), ("words 100".into(), "silence"));
        assert_eq!(final_of(&events, 1), (String::new(), ERROR_REASON));
        assert_eq!(final_of(&events, 2), ("words 300".into(), "silence"));
        let error_at = events
            .iter()
            .position(|e| matches!(e, Event::Error { message } if message.contains("segment 1") && message.contains("scripted panic")))
            .expect("an error event for segment 1");
        let final_at = events
            .iter()
            .position(|e| matches!(e, Event::Final { segment: 1, .. }))
            .unwrap();
        assert!(
            error_at < final_at,
            "the error comes before the error final"
        );
        assert_eq!(failures.len(), 1);
        assert!(failures[0].panicked && failures[0].on_final);
        assert_eq!(rec.resets, 1);
        // The context holds only what was committed after the reset.
        assert_eq!(rec.context, vec!["words 300".to_string()]);
        assert_eq!(decoder.finals, 3);
    }

    #[test]
    fn an_unchanged_partial_is_sent_again_once_half_a_second_of_audio_later() {
        let mut rec = Scripted::default();
        let mut decoder = SegmentDecoder::new();
        decoder.fault = None;
        // The same audio length (so the same text) at ends 0.2–0.3 s apart.
        let at = |end: f64| SegmentUpdate {
            end,
            start: 0.0,
            ..update(0, UpdateKind::Partial, 100)
        };
        let updates: Vec<_> = [0.5, 0.8, 1.1, 1.3, 1.6].map(at).into();
        let (events, failures) = run(&mut decoder, &mut rec, &updates);
        assert!(failures.is_empty());
        let ends: Vec<f64> = events
            .iter()
            .map(|e| match e {
                Event::Partial { text, end, .. } => {
                    assert_eq!(text, "words 100");
                    *end
                }
                other => panic!("{other:?}"),
            })
            .collect();
        // New text at 0.5; the same again once 0.5 s past the last one sent.
        assert_eq!(ends, [0.5, 1.1, 1.6]);
    }

    #[test]
    fn a_final_with_its_pause_decodes_audio_commits_that_decode_unless_speech_resumed() {
        let silence = UpdateKind::Final(EndReason::Silence);
        let mut rec = Scripted::default();
        let mut decoder = SegmentDecoder::new();
        decoder.fault = None;
        // Segment 0: the final has the pause's audio; segment 1: more audio
        // came after the pause; segment 2: speech resumed after the pause.
        run(&mut decoder, &mut rec, &[update(0, UpdateKind::Pause, 100)]);
        assert!(decoder.reuses_pause(&update(0, silence, 100)));
        assert!(!decoder.reuses_pause(&update(0, UpdateKind::Pause, 100)));
        assert!(!decoder.reuses_pause(&update(0, silence, 130)));
        assert!(!decoder.reuses_pause(&update(1, silence, 100)));
        let (events, _) = run(&mut decoder, &mut rec, &[update(0, silence, 100)]);
        assert_eq!(final_of(&events, 0).0, "words 100");
        assert_eq!(rec.decodes, 1, "the final reused the pause decode");

        run(&mut decoder, &mut rec, &[update(1, UpdateKind::Pause, 200)]);
        assert!(!decoder.reuses_pause(&update(1, silence, 230)));
        let (events, _) = run(&mut decoder, &mut rec, &[update(1, silence, 230)]);
        assert_eq!(final_of(&events, 1).0, "words 230");
        assert_eq!(rec.decodes, 3);

        run(&mut decoder, &mut rec, &[update(2, UpdateKind::Pause, 300)]);
        decoder.resume(2);
        assert!(!decoder.reuses_pause(&update(2, silence, 300)));
    }

    #[test]
    fn a_failed_partial_emits_an_error_and_the_segment_goes_on() {
        let mut rec = Scripted {
            fail_at: Some(0),
            ..Default::default()
        };
        let mut decoder = SegmentDecoder::new();
        decoder.fault = None;
        let updates = [
            update(0, UpdateKind::Partial, 100),
            update(0, UpdateKind::Partial, 200),
            update(0, UpdateKind::Final(EndReason::Flush), 250),
        ];
        let (events, failures) = run(&mut decoder, &mut rec, &updates);
        assert!(matches!(&events[0], Event::Error { .. }), "{events:?}");
        assert!(matches!(&events[1], Event::Partial { text, .. } if text == "words 200"));
        assert_eq!(final_of(&events, 0), ("words 250".into(), "flush"));
        assert_eq!(events.len(), 3);
        assert_eq!(failures.len(), 1);
        assert!(!failures[0].on_final && !failures[0].panicked);
        assert_eq!(
            rec.resets, 0,
            "an error in a partial leaves the context alone"
        );
    }

    #[test]
    fn injected_faults_hit_the_final_of_their_segment() {
        let silence = UpdateKind::Final(EndReason::Silence);
        for (kind, panicked) in [(FaultKind::Error, false), (FaultKind::Panic, true)] {
            let mut rec = Scripted::default();
            let mut decoder = SegmentDecoder::new();
            decoder.fault = Some(InjectedFault {
                kind,
                segment: 1,
                stream: None,
            });
            let updates = [
                update(0, silence, 100),
                update(1, UpdateKind::Partial, 150),
                update(1, silence, 200),
                update(2, silence, 300),
            ];
            let (events, failures) = run(&mut decoder, &mut rec, &updates);
            assert_eq!(final_of(&events, 1), (String::new(), ERROR_REASON));
            assert_eq!(final_of(&events, 2), ("words 300".into(), "silence"));
            assert_eq!(failures.len(), 1);
            assert_eq!(failures[0].panicked, panicked);
            assert_eq!(rec.resets, 1, "{kind:?}");
        }
    }

    #[test]
    fn fault_specs_parse() {
        let f = |kind, segment, stream| {
            Some(InjectedFault {
                kind,
                segment,
                stream,
            })
        };
        assert_eq!(
            InjectedFault::parse("panic:1"),
            f(FaultKind::Panic, 1, None)
        );
        assert_eq!(
            InjectedFault::parse("error:3@2"),
            f(FaultKind::Error, 3, Some(2))
        );
        for bad in ["", "panic", "panic:x", "crash:1", "error:1@", "error:1@a"] {
            assert_eq!(InjectedFault::parse(bad), None, "{bad:?}");
        }
    }
}
