//! Several streams' decodes as one call into the model.
//!
//! The stream engine hands the model every decode that is due at the same
//! time; the model family runs them together where its kernels allow (one
//! read of the weights per decode step for the whole batch) and gives each
//! stream exactly the result it would have had alone. Streams of different
//! families, or a family without a batched path, are decoded one by one.

use super::recognizer::{Hypothesis, Recognizer, SegmentFeatures};
use super::step_audio2::StepAudio2Recognizer;
use super::whisper::streaming::WhisperRecognizer;
use super::ModelError;

/// One stream's decode in a batch.
pub struct BatchRequest<'a> {
    pub recognizer: &'a mut dyn Recognizer,
    pub features: &'a SegmentFeatures,
    /// Forced start of the hypothesis (the segment's committed partial text).
    pub prefix: &'a [u32],
    /// A final: decoded and committed in one pass, as
    /// [`Recognizer::decode_final`]; otherwise [`Recognizer::decode`].
    pub commit: bool,
    /// A partial (never committed): [`Recognizer::decode_partial`].
    pub partial: bool,
}

/// One concrete recogniser's request, after the family is known.
pub(crate) struct FamilyRequest<'a, R> {
    pub recognizer: &'a mut R,
    pub features: &'a SegmentFeatures,
    pub prefix: &'a [u32],
    pub commit: bool,
    pub partial: bool,
}

/// Decodes every request; result `i` is request `i`'s, equal to what the
/// stream would get decoded alone. An error costs only its own request.
pub fn decode_batch(requests: &mut [BatchRequest<'_>]) -> Vec<Result<Hypothesis, ModelError>> {
    if requests.len() > 1 {
        if let Some(mut family) = downcast_all::<WhisperRecognizer>(requests) {
            return WhisperRecognizer::decode_batch(&mut family);
        }
        if let Some(mut family) = downcast_all::<StepAudio2Recognizer>(requests) {
            return StepAudio2Recognizer::decode_batch(&mut family);
        }
    }
    requests.iter_mut().map(decode_one).collect()
}

/// After a batch's finals: each recogniser prepares for its stream's next
/// segment ([`Recognizer::after_final`]), together where the family can
/// (Whisper's carried segments through the encoder in groups). Result `i` is
/// recogniser `i`'s; each is what it would be alone.
pub fn after_finals(recognizers: &mut [&mut dyn Recognizer]) -> Vec<Result<(), ModelError>> {
    if recognizers.len() > 1
        && recognizers
            .iter_mut()
            .all(|r| r.as_any_mut().is::<WhisperRecognizer>())
    {
        let mut family: Vec<&mut WhisperRecognizer> = recognizers
            .iter_mut()
            .map(|r| {
                r.as_any_mut()
                    .downcast_mut::<WhisperRecognizer>()
                    .expect("checked above")
            })
            .collect();
        return WhisperRecognizer::after_final_batch(&mut family);
    }
    recognizers.iter_mut().map(|r| r.after_final()).collect()
}

/// Decodes that join and leave one running batch between its steps
/// (continuous batching), for a model family whose decoding has steps to
/// share: a decode admitted while others run takes part in the next step,
/// one that is over is handed back while the others go on. Each gives what
/// it would alone. While a decode is in the loop its recogniser's context is
/// the loop's: the caller leaves the recogniser alone until
/// [`DecodeLoop::finish`] or [`DecodeLoop::abandon`] gives it back. Keys are
/// the caller's names for its decodes.
pub trait DecodeLoop: Send {
    /// Starts the decodes of `requests` (`keys[i]` names `requests[i]`); an
    /// error costs only its own request, whose recogniser is left as it was.
    fn admit(
        &mut self,
        keys: &[u64],
        requests: &mut [BatchRequest<'_>],
    ) -> Vec<Result<(), ModelError>>;
    /// One step of every running decode; the keys of the decodes over since
    /// the last call, to be finished.
    fn step(&mut self) -> Vec<u64>;
    /// The hypothesis of a decode that is over; `recognizer` (the one it was
    /// admitted with) gets its context back, committed or rolled back.
    fn finish(
        &mut self,
        key: u64,
        recognizer: &mut dyn Recognizer,
    ) -> Result<Hypothesis, ModelError>;
    /// Drops a decode wherever it is (after a panic), giving `recognizer` its
    /// committed context back; false for a key not here.
    fn abandon(&mut self, key: u64, recognizer: &mut dyn Recognizer) -> bool;
    /// Decodes still stepping.
    fn running(&self) -> usize;
}

/// A request run on its own, as the stream would without batching.
pub fn decode_one(r: &mut BatchRequest<'_>) -> Result<Hypothesis, ModelError> {
    if r.commit {
        r.recognizer.decode_final(r.features, r.prefix)
    } else if r.partial {
        r.recognizer.decode_partial(r.features, r.prefix)
    } else {
        r.recognizer.decode(r.features, r.prefix)
    }
}

/// The requests as one family's, if every recogniser is of type `R`.
pub(crate) fn downcast_all<'a, 'b, R: 'static>(
    requests: &'a mut [BatchRequest<'b>],
) -> Option<Vec<FamilyRequest<'a, R>>> {
    if !requests
        .iter_mut()
        .all(|r| r.recognizer.as_any_mut().is::<R>())
    {
        return None;
    }
    Some(
        requests
            .iter_mut()
            .map(|r| FamilyRequest {
                recognizer: r
                    .recognizer
                    .as_any_mut()
                    .downcast_mut::<R>()
                    .expect("checked above"),
                features: r.features,
                prefix: r.prefix,
                commit: r.commit,
                partial: r.partial,
            })
            .collect(),
    )
}
