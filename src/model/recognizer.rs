//! The interface the live pipeline drives, implemented by every model family.
//!
//! A recogniser holds the *committed context* (the text of finished segments
//! that conditions the next ones: Whisper's prompt, Step-Audio 2's persistent
//! KV cache). [`Recognizer::decode`] never changes it; [`Recognizer::commit`]
//! extends it with a finished segment.

use super::ModelError;
use std::time::Duration;

/// What the pipeline must compute for a model: `n_mels` bins of the segment's
/// audio followed by `tail_zeros` zero samples (Step-Audio 2: 479; Whisper:
/// enough for every frame that touches the audio, the rest being silence).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FrontendSpec {
    pub n_mels: usize,
    pub tail_zeros: usize,
}

/// Un-normalised log10 mel frames of one segment, frame-major
/// `[n_frames, n_mels]`, as [`crate::frontend::MelStream`] produces them.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct SegmentFeatures {
    pub n_mels: usize,
    pub raw_frames: Vec<f32>,
    /// Audio samples (16 kHz) the frames cover, tail excluded.
    pub samples: usize,
}

impl SegmentFeatures {
    pub(crate) fn n_frames(&self) -> usize {
        self.raw_frames.len() / self.n_mels.max(1)
    }
}

#[derive(Clone, Debug, Default, PartialEq)]
pub struct Hypothesis {
    /// Text tokens of the whole segment, the forced prefix included.
    pub tokens: Vec<u32>,
    /// Their text.
    pub text: String,
    /// Probability that the segment holds no speech, where the model says.
    pub no_speech_prob: Option<f64>,
    pub avg_logprob: f64,
    pub encode_time: Duration,
    pub decode_time: Duration,
}

pub trait Recognizer: Send {
    /// The concrete recogniser, so that a batch of streams of one model
    /// family can be run together ([`crate::model::batch::decode_batch`]).
    fn as_any_mut(&mut self) -> &mut dyn std::any::Any;
    /// Short model name for logs and stats.
    fn name(&self) -> String;
    fn frontend(&self) -> FrontendSpec;
    /// Longest audio one segment may hold, in seconds.
    fn max_segment_seconds(&self) -> f64;
    /// Hypothesis for a segment, starting with the forced `prefix` tokens;
    /// the committed context is left exactly as it was.
    fn decode(
        &mut self,
        features: &SegmentFeatures,
        prefix: &[u32],
    ) -> Result<Hypothesis, ModelError>;
    /// A partial's hypothesis: as [`Self::decode`], but never committed (a
    /// pause decode, which may become the final, goes through `decode`), so
    /// the recogniser may bound its work at some cost in agreement with
    /// `decode` ([`crate::model::RecognizerOptions::full_partials`]).
    fn decode_partial(
        &mut self,
        features: &SegmentFeatures,
        prefix: &[u32],
    ) -> Result<Hypothesis, ModelError> {
        self.decode(features, prefix)
    }
    /// Appends a finished segment (its audio and the hypothesis `decode` gave
    /// for it) to the committed context.
    fn commit(
        &mut self,
        features: &SegmentFeatures,
        hypothesis: &Hypothesis,
    ) -> Result<(), ModelError>;
    /// Work for the next segment that can wait until the final of the last
    /// one is out (Whisper: encoding the segment carried into the next).
    fn after_final(&mut self) -> Result<(), ModelError> {
        Ok(())
    }
    /// Text of tokens this recogniser produced.
    fn detokenize(&self, tokens: &[u32]) -> String;
    /// Whether `token` begins a new word (commits stop at word boundaries).
    fn starts_word(&self, token: u32) -> bool;
    /// Drops the committed context (a new, unrelated stream).
    fn reset_context(&mut self);

    /// Decodes a finished segment and commits it.
    fn decode_final(
        &mut self,
        features: &SegmentFeatures,
        prefix: &[u32],
    ) -> Result<Hypothesis, ModelError> {
        let hypothesis = self.decode(features, prefix)?;
        self.commit(features, &hypothesis)?;
        Ok(hypothesis)
    }
}
