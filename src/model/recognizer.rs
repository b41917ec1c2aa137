//! The interface the live pipeline drives, implemented by every model family.
//!
//! A recogniser holds the *committed context* (the text of finished segments
//! that conditions the next ones: Whisper's prompt, Step-Audio 2's persistent
//! KV cache). Partial hypotheses never change it; finals extend it.

use super::ModelError;
use crate::frontend::LogMel;
use std::time::Duration;

/// How a model wants the log-mel of a segment.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MelLayout {
    /// Whisper: the segment followed by silence up to `frames` frames (3000 = 30 s).
    Whisper { n_mels: usize, frames: usize },
    /// Step-Audio 2: the segment plus 479 zero samples, no further padding.
    StepAudio { n_mels: usize },
}

impl MelLayout {
    pub fn n_mels(&self) -> usize {
        match *self {
            MelLayout::Whisper { n_mels, .. } | MelLayout::StepAudio { n_mels } => n_mels,
        }
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
    /// Short model name for logs and stats.
    fn name(&self) -> String;
    fn mel_layout(&self) -> MelLayout;
    /// Longest audio one segment may hold, in seconds.
    fn max_segment_seconds(&self) -> f64;
    /// Hypothesis for an open segment, starting with the forced `prefix`
    /// tokens; the committed context is left exactly as it was.
    fn decode_partial(&mut self, mel: &LogMel, prefix: &[u32]) -> Result<Hypothesis, ModelError>;
    /// Final text of a finished segment, starting with `prefix`; its text is
    /// appended to the committed context.
    fn decode_final(&mut self, mel: &LogMel, prefix: &[u32]) -> Result<Hypothesis, ModelError>;
    /// Text of tokens this recogniser produced.
    fn detokenize(&self, tokens: &[u32]) -> String;
    /// Drops the committed context (a new, unrelated stream).
    fn reset_context(&mut self);
}
