//! Whisper as a live [`Recognizer`]: each segment is one window decoded
//! without timestamps, conditioned on the text of the previous finals.
//!
//! The decoder always sees a 30 s window, the segment padded with silence,
//! as in training: shorter windows wreck tiny.en (`examples/
//! context_experiment.rs`, English eval clips of ≤ 8 s: WER 11.4 % at 30 s,
//! 15.2 % at 20 s, 95.6 % at 10 s; the decoder loops). But most of a live
//! segment's window is padding, and the padding's encoder states hardly
//! depend on the audio before it. So by default only the audio's positions
//! plus 2 s are encoded; the rest, and their cross-attention keys and
//! values, come from a padding-only window at the same level, computed once
//! per level (`WhisperModel::encode_fresh`). Same clips: identical WER, the
//! encoder 517 → 139 ms median. `--full-window` turns it off.

use super::decoder::CrossAttention;
use super::decoding::DecodingOptions;
use super::{SilentWindows, WhisperModel};
use crate::frontend::{LogMel, LOG10_FLOOR, N_FFT, WHISPER_CHUNK_FRAMES};
use crate::model::recognizer::{FrontendSpec, Hypothesis, Recognizer, SegmentFeatures};
use crate::model::ModelError;
use crate::transcribe::Task;
use std::sync::Arc;
use std::time::Instant;

/// Encoder positions (2 s) computed past the end of the audio when the
/// padding's states are reused. With none, tiny.en's streaming WER on the
/// eval set rose from 12.26 % to 14.76 % (hallucinated "you" on noise);
/// with 100 (and 250) it was 12.46 %.
const FRESH_MARGIN: usize = 100;

pub struct WhisperRecognizer {
    model: Arc<WhisperModel>,
    task_tokens: Vec<u32>,
    /// Text tokens of the finals so far (the prompt keeps the most recent).
    context: Vec<u32>,
    condition_on_previous: bool,
    no_speech_threshold: f64,
    logprob_threshold: f64,
    /// Encode only the audio's positions plus this many (see
    /// [`WhisperModel::encode_fresh`]); `None`: the whole 30 s window.
    fresh_margin: Option<usize>,
}

impl WhisperRecognizer {
    pub fn new(
        model: Arc<WhisperModel>,
        language: Option<&str>,
        task: Task,
        reuse_padding: bool,
    ) -> Result<Self, ModelError> {
        let task_tokens = model.task_tokens(language.or(Some("en")), task, false)?;
        Ok(Self {
            model,
            task_tokens,
            context: Vec::new(),
            condition_on_previous: true,
            no_speech_threshold: 0.6,
            logprob_threshold: -1.0,
            fresh_margin: reuse_padding.then_some(FRESH_MARGIN),
        })
    }

    /// Encodes a segment padded to 30 s and prepares its cross-attention.
    fn encode(&self, features: &SegmentFeatures) -> Result<CrossAttention, ModelError> {
        let n_mels = features.n_mels;
        let target = WHISPER_CHUNK_FRAMES;
        let audio_frames = (features.raw_frames.len() / n_mels).min(target);
        let max = features
            .raw_frames
            .iter()
            .copied()
            .fold(LOG10_FLOOR, f32::max);
        let fresh = self
            .fresh_margin
            .map(|m| audio_frames.div_ceil(2) + m)
            .filter(|&f| f < target / 2);
        // The shortcut reads only the frames its fresh positions reach.
        let frames = fresh.map_or(target, |f| (2 * f + 4).min(target));
        let mut raw = features.raw_frames.clone();
        // Frames past the audio are silence: log10(1e-10), as the one-shot mel.
        raw.resize(frames * n_mels, LOG10_FLOOR);
        match fresh {
            Some(fresh) => {
                let key = SilentWindows::level_key(max);
                let mel =
                    LogMel::from_raw_frames_with_max(n_mels, raw, SilentWindows::level_max(key));
                Ok(self.model.encode_fresh(&mel, fresh, key)?)
            }
            None => {
                let mel = LogMel::from_raw_frames_with_max(n_mels, raw, max);
                let encoded = self.model.encode(&mel)?;
                Ok(self.model.cross_attention(&encoded)?)
            }
        }
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
        let cross = self.encode(features)?;
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
