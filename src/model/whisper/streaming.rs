//! Whisper as a live [`Recognizer`]: each segment is one window decoded
//! without timestamps, conditioned on the text of the previous finals.
//!
//! The encoder always sees the segment padded with silence to 30 s, as in
//! training. Shorter windows would cut the encoder's cost for short
//! segments, but `examples/context_experiment.rs` shows what they do to
//! tiny.en on the English eval clips of ≤ 8 s: WER 11.4 % at 30 s, 15.2 %
//! at 20 s, 16.5 % at 15 s, 95.6 % at 10 s and 287 % for the segment plus
//! 2 s (the decoder loops, repeating the text until its token limit).

use super::decoding::DecodingOptions;
use super::WhisperModel;
use crate::frontend::{LogMel, N_FFT, WHISPER_CHUNK_FRAMES};
use crate::model::recognizer::{FrontendSpec, Hypothesis, Recognizer, SegmentFeatures};
use crate::model::ModelError;
use crate::transcribe::Task;
use std::sync::Arc;
use std::time::Instant;

pub struct WhisperRecognizer {
    model: Arc<WhisperModel>,
    task_tokens: Vec<u32>,
    /// Text tokens of the finals so far (the prompt keeps the most recent).
    context: Vec<u32>,
    condition_on_previous: bool,
    no_speech_threshold: f64,
    logprob_threshold: f64,
}

impl WhisperRecognizer {
    pub fn new(
        model: Arc<WhisperModel>,
        language: Option<&str>,
        task: Task,
    ) -> Result<Self, ModelError> {
        let task_tokens = model.task_tokens(language.or(Some("en")), task, false)?;
        Ok(Self {
            model,
            task_tokens,
            context: Vec::new(),
            condition_on_previous: true,
            no_speech_threshold: 0.6,
            logprob_threshold: -1.0,
        })
    }

    fn log_mel(&self, features: &SegmentFeatures) -> LogMel {
        let n_mels = features.n_mels;
        let target = WHISPER_CHUNK_FRAMES;
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
