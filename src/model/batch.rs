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
}

/// One concrete recogniser's request, after the family is known.
pub(crate) struct FamilyRequest<'a, R> {
    pub recognizer: &'a mut R,
    pub features: &'a SegmentFeatures,
    pub prefix: &'a [u32],
    pub commit: bool,
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

/// A request run on its own, as the stream would without batching.
pub fn decode_one(r: &mut BatchRequest<'_>) -> Result<Hypothesis, ModelError> {
    if r.commit {
        r.recognizer.decode_final(r.features, r.prefix)
    } else {
        r.recognizer.decode(r.features, r.prefix)
    }
}

/// The requests as one family's, if every recogniser is of type `R`.
fn downcast_all<'a, 'b, R: 'static>(
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
            })
            .collect(),
    )
}
