//! Whisper as a live [`Recognizer`]: each segment is one window decoded
//! without timestamps, conditioned on the text of the previous finals.
//!
//! The encoder normally sees the segment padded with silence to 30 s, as in
//! training. `EncoderContext::Trimmed` instead encodes only the segment plus
//! a margin (rounded up), which costs a fraction of the compute for short
//! segments; the benchmarks in the README give its accuracy cost.

use super::decoding::DecodingOptions;
use super::WhisperModel;
use crate::frontend::{LogMel, HOP_LENGTH, N_FFT, WHISPER_CHUNK_FRAMES};
use crate::model::recognizer::{FrontendSpec, Hypothesis, Recognizer, SegmentFeatures};
use crate::model::ModelError;
use crate::transcribe::Task;
use std::sync::Arc;
use std::time::Instant;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum EncoderContext {
    /// Pad every segment to 30 s (Whisper's training condition).
    #[default]
    Full,
    /// Encode the segment plus a margin, in 2 s steps.
    Trimmed,
}

/// Frames of silence kept after the audio in trimmed mode, and the step the
/// encoder length is rounded to (fewer distinct shapes, stabler results).
const TRIM_MARGIN_FRAMES: usize = 100;
const TRIM_STEP_FRAMES: usize = 200;

pub struct WhisperRecognizer {
    model: Arc<WhisperModel>,
    task_tokens: Vec<u32>,
    /// Text tokens of the finals so far (the prompt keeps the most recent).
    context: Vec<u32>,
    encoder_context: EncoderContext,
    condition_on_previous: bool,
    no_speech_threshold: f64,
    logprob_threshold: f64,
}

impl WhisperRecognizer {
    pub fn new(
        model: Arc<WhisperModel>,
        language: Option<&str>,
        task: Task,
        encoder_context: EncoderContext,
    ) -> Result<Self, ModelError> {
        let task_tokens = model.task_tokens(language.or(Some("en")), task, false)?;
        Ok(Self {
            model,
            task_tokens,
            context: Vec::new(),
            encoder_context,
            condition_on_previous: true,
            no_speech_threshold: 0.6,
            logprob_threshold: -1.0,
        })
    }

    /// The frames the encoder sees for `n` frames of audio.
    fn encoder_frames(&self, n: usize) -> usize {
        match self.encoder_context {
            EncoderContext::Full => WHISPER_CHUNK_FRAMES,
            EncoderContext::Trimmed => ((n + TRIM_MARGIN_FRAMES).div_ceil(TRIM_STEP_FRAMES)
                * TRIM_STEP_FRAMES)
                .min(WHISPER_CHUNK_FRAMES),
        }
    }

    fn log_mel(&self, features: &SegmentFeatures) -> LogMel {
        let n_mels = features.n_mels;
        let audio_frames = features.samples.div_ceil(HOP_LENGTH);
        let target = self.encoder_frames(audio_frames);
        let mut raw = features.raw_frames.clone();
        // Frames past the audio are silence: log10(1e-10), as the one-shot mel.
        raw.resize(target * n_mels, -10.0);
        raw.truncate(target * n_mels);
        LogMel::from_raw_frames(n_mels, raw)
    }
}

impl Recognizer for WhisperRecognizer {
    fn name(&self) -> String {
        format!(
            "whisper-{}L-{}d",
            self.model.config.decoder_layers, self.model.config.d_model
        )
    }

    fn frontend(&self) -> FrontendSpec {
        // N_FFT zeros reach every frame that overlaps the audio; later frames are silence.
        FrontendSpec {
            n_mels: self.model.config.n_mels,
            tail_zeros: N_FFT,
        }
    }

    fn max_segment_seconds(&self) -> f64 {
        30.0
    }

    fn decode(
        &mut self,
        features: &SegmentFeatures,
        prefix: &[u32],
    ) -> Result<Hypothesis, ModelError> {
        let t0 = Instant::now();
        let mel = self.log_mel(features);
        let encoded = self.model.encode(&mel)?;
        let cross = self.model.cross_attention(&encoded)?;
        let encode_time = t0.elapsed();
        let conditioning: &[u32] = if self.condition_on_previous {
            &self.context
        } else {
            &[]
        };
        let (prompt, sot_index) = self.model.build_prompt(conditioning, &self.task_tokens);
        let opts = DecodingOptions {
            timestamps: false,
            ..Default::default()
        };
        let result = self
            .model
            .greedy_decode_forced(&cross, &prompt, sot_index, prefix, &opts)?;
        let silent = result.no_speech_prob > self.no_speech_threshold
            && result.avg_logprob < self.logprob_threshold;
        // A segment the model itself calls silence keeps only what was already committed.
        let tokens = if silent && prefix.is_empty() {
            Vec::new()
        } else {
            result.tokens
        };
        Ok(Hypothesis {
            text: self.model.tokenizer.decode_text(&tokens),
            tokens,
            no_speech_prob: Some(result.no_speech_prob),
            avg_logprob: result.avg_logprob,
            encode_time,
            decode_time: t0.elapsed() - encode_time,
        })
    }

    fn commit(
        &mut self,
        _features: &SegmentFeatures,
        hypothesis: &Hypothesis,
    ) -> Result<(), ModelError> {
        self.context.extend_from_slice(&hypothesis.tokens);
        // The prompt only ever uses the most recent half-context of tokens.
        let keep = self.model.decoder.n_text_ctx() / 2;
        if self.context.len() > 2 * keep {
            self.context.drain(..self.context.len() - keep);
        }
        Ok(())
    }

    fn detokenize(&self, tokens: &[u32]) -> String {
        self.model.tokenizer.decode_text(tokens)
    }

    fn starts_word(&self, token: u32) -> bool {
        self.model.tokenizer.decode_text(&[token]).starts_with(' ')
    }

    fn reset_context(&mut self) {
        self.context.clear();
    }
}
