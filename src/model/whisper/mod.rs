//! The Whisper family (tiny … large-v3): encoder, decoder, tokenizer, task
//! and prompt tokens, language detection and greedy decoding, loaded from
//! CTranslate2 or Hugging Face directories.

pub mod decoder;
pub mod decoding;
pub mod encoder;
pub mod load;
pub mod prompt;
pub mod stacked;
pub mod streaming;
pub mod tokens;

pub use prompt::Task;

use crate::frontend::MelExtractor;
use candle_core::{DType, Device, Tensor};
use decoder::{CrossAttention, WhisperDecoder};
use encoder::{SilentWindow, WhisperEncoder};
use std::sync::{Arc, Mutex};
use tokens::WhisperTokenizer;

/// Dimensions read off the weights (and config where the weights are silent).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WhisperConfig {
    pub n_mels: usize,
    pub n_audio_ctx: usize,
    pub d_model: usize,
    pub encoder_layers: usize,
    pub encoder_heads: usize,
    pub n_text_ctx: usize,
    pub decoder_layers: usize,
    pub decoder_heads: usize,
    pub vocab_size: usize,
}

impl WhisperConfig {
    /// Whisper's own rule: English-only checkpoints have 51864 tokens.
    pub(crate) fn is_multilingual(&self) -> bool {
        self.vocab_size >= 51865
    }
}

/// Weights of the decoder's single-token steps on the CPU.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum DecoderWeights {
    /// Int8 copies (a quarter of the memory traffic; logits within ~1e-2).
    #[default]
    Int8,
    /// The f32 weights as loaded (bit-for-bit the reference computation).
    F32,
}

/// Token lists the decoder suppresses, from the model's configuration.
#[derive(Clone, Debug, Default)]
pub struct SuppressConfig {
    /// Suppressed at every step (symbols and special tokens).
    pub always: Vec<u32>,
    /// Suppressed at the first sampled position (blank and end of text).
    pub at_begin: Vec<u32>,
}

pub struct WhisperModel {
    pub config: WhisperConfig,
    pub encoder: WhisperEncoder,
    pub decoder: WhisperDecoder,
    pub tokenizer: WhisperTokenizer,
    pub suppress: SuppressConfig,
    pub mel: Arc<MelExtractor>,
    pub device: Device,
    pub dtype: DType,
    /// Padding-only windows by level, for [`WhisperModel::encode_fresh`].
    pub silent_windows: SilentWindows,
    /// The fused decode step of stacked batches (a GPU only; see
    /// [`crate::ops::fast::WhisperFusedStep`]).
    pub fused_step: std::sync::Mutex<crate::ops::fast::WhisperFusedStep>,
}

/// What a window of nothing but padding at one level leaves in the encoder
/// and in the decoder's cross-attention (≈ 37 MB for tiny).
pub struct SilentStates {
    pub encoder: SilentWindow,
    pub cross: CrossAttention,
}

/// Encoder and cross-attention states of audio encoded alone, reused in
/// front of the audio that follows it (`WhisperModel::encode_after`).
pub(crate) struct EncodedAudio {
    pub encoder: encoder::EncodedHead,
    pub cross: CrossAttention,
    /// The padding level it was normalised and encoded with.
    pub key: i32,
}

impl EncodedAudio {
    pub(crate) fn positions(&self) -> usize {
        self.encoder.positions()
    }

    /// The first `n` positions.
    pub fn narrow(&self, n: usize) -> candle_core::Result<Self> {
        Ok(Self {
            encoder: self.encoder.narrow(n)?,
            cross: self.cross.narrow(n)?,
            key: self.key,
        })
    }
}

/// Audio to encode alone for [`WhisperModel::encode_heads`]: its log-mel
/// (`fresh` positions after padding at level `key`), of which the states of
/// the first `positions` are kept.
pub(crate) struct HeadJob<'a> {
    pub mel: &'a crate::frontend::LogMel,
    pub positions: usize,
    pub fresh: usize,
    pub key: i32,
}

/// One stream's window for [`WhisperModel::encode_after_batch`] (the
/// arguments of [`WhisperModel::encode_after`]).
pub(crate) struct AfterJob<'a> {
    pub mel: &'a crate::frontend::LogMel,
    pub fresh: usize,
    pub key: i32,
    pub head: Option<&'a EncodedAudio>,
    pub keep: usize,
}

/// The padding levels met most recently, at most [`SilentWindows::capacity`]
/// of them.
pub struct SilentWindows {
    /// (level key, states), most recently used last.
    entries: Mutex<Vec<(i32, Arc<SilentStates>)>>,
    /// Levels kept; a stream meets one or two, so several streams need
    /// more (each miss is a full 30 s encoder pass: with four streams and
    /// three levels kept, 45 passes in 75 s).
    capacity: std::sync::atomic::AtomicUsize,
}

impl Default for SilentWindows {
    fn default() -> Self {
        Self {
            entries: Mutex::default(),
            capacity: Self::MIN_CAPACITY.into(),
        }
    }
}

impl SilentWindows {
    const MIN_CAPACITY: usize = 3;

    fn capacity(&self) -> usize {
        self.capacity.load(std::sync::atomic::Ordering::Relaxed)
    }
    /// Levels are the log-mel maximum in steps of this (log10 power).
    pub(crate) const LEVEL_STEP: f32 = 0.25;

    /// The level key of a log-mel maximum.
    pub fn level_key(max: f32) -> i32 {
        (max / Self::LEVEL_STEP).round() as i32
    }

    /// The log-mel maximum a level key stands for.
    pub fn level_max(key: i32) -> f32 {
        key as f32 * Self::LEVEL_STEP
    }
}

impl WhisperModel {
    /// Keeps the padding windows of two levels per stream for `streams`
    /// streams (at least three levels; each level ≈ 37 MB for tiny).
    pub fn plan_streams(&self, streams: usize) {
        let levels = (2 * streams + 1).max(SilentWindows::MIN_CAPACITY);
        self.silent_windows
            .capacity
            .store(levels, std::sync::atomic::Ordering::Relaxed);
    }

    /// The padding-only window states for level `key`, computed (one full
    /// encoder pass) the first time the level is met.
    pub fn silent_states(&self, key: i32) -> candle_core::Result<Arc<SilentStates>> {
        let mut entries = self
            .silent_windows
            .entries
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        if let Some(i) = entries.iter().position(|(k, _)| *k == key) {
            let entry = entries.remove(i);
            let states = entry.1.clone();
            entries.push(entry);
            return Ok(states);
        }
        tracing::debug!(
            level = SilentWindows::level_max(key),
            "encoding a padding-only window for a new level"
        );
        let n_mels = self.config.n_mels;
        let frames = 2 * self.config.n_audio_ctx;
        // The normalised value of a padding frame: (max − 8 + 4) / 4.
        let value = (SilentWindows::level_max(key) - 4.0) / 4.0;
        let mel = Tensor::full(value, (1, n_mels, frames), &self.device)?.to_dtype(self.dtype)?;
        let encoder = self.encoder.silent_window(&mel)?;
        let cross = self.decoder.cross_attention(&encoder.output)?;
        let states = Arc::new(SilentStates { encoder, cross });
        while entries.len() >= self.silent_windows.capacity() {
            entries.remove(0);
        }
        entries.push((key, states.clone()));
        Ok(states)
    }

    /// Encodes a window whose mel frames from `2·fresh` on are padding at
    /// level `key` (see [`WhisperEncoder::forward_fresh`]) and prepares its
    /// cross-attention, projecting only the fresh positions.
    pub fn encode_fresh(
        &self,
        mel: &crate::frontend::LogMel,
        fresh: usize,
        key: i32,
    ) -> candle_core::Result<CrossAttention> {
        Ok(self.encode_after(mel, fresh, key, None, 0)?.0)
    }

    /// As [`Self::encode_fresh`] for audio that follows `head`'s (encoded
    /// earlier at the same level): the new audio takes the positions after
    /// the head's, whose states are reused. With `keep` past the head's
    /// positions (and within what was encoded) it also returns the head of
    /// the window's first `keep` positions (the given head, then the new
    /// audio's), to stand in front of audio that comes later.
    pub(crate) fn encode_after(
        &self,
        mel: &crate::frontend::LogMel,
        fresh: usize,
        key: i32,
        head: Option<&EncodedAudio>,
        keep: usize,
    ) -> candle_core::Result<(CrossAttention, Option<EncodedAudio>)> {
        let job = AfterJob {
            mel,
            fresh,
            key,
            head,
            keep,
        };
        Ok(self.encode_after_batch(&[job])?.remove(0))
    }

    /// [`Self::encode_after`] for several streams' windows: on a GPU in
    /// batches of similar lengths
    /// ([`encoder::WhisperEncoder::forward_after_grouped`]), on the CPU (or
    /// with the `windows` fast path off) one by one.
    pub(crate) fn encode_after_batch(
        &self,
        jobs: &[AfterJob<'_>],
    ) -> candle_core::Result<Vec<(CrossAttention, Option<EncodedAudio>)>> {
        // Stage times under DEBUG (the device synchronised at each).
        let clock = tracing::enabled!(tracing::Level::DEBUG).then(|| {
            let _ = self.device.synchronize();
            std::time::Instant::now()
        });
        let windows: Vec<_> = jobs
            .iter()
            .map(|j| (j.mel, j.fresh, j.key, j.head.map(|h| &h.encoder)))
            .collect();
        let (states, encoded) = self.encode_grouped(&windows)?;
        let encoder_done = clock.map(|t| {
            let _ = self.device.synchronize();
            t.elapsed()
        });
        let out = jobs
            .iter()
            .zip(encoded)
            .zip(&states)
            .map(|((j, (encoded, fresh_states)), st)| {
                let cross = self.decoder.cross_attention_after(
                    j.head.map(|h| &h.cross),
                    &encoded,
                    &st.cross,
                )?;
                let start = j.head.map_or(0, EncodedAudio::positions);
                if j.keep <= start || j.keep > start + encoded.dim(1)? {
                    return Ok((cross, None));
                }
                let grown = fresh_states.narrow(j.keep - start)?;
                let encoder = match j.head {
                    Some(h) => h.encoder.append(&grown)?,
                    None => grown.contiguous()?,
                };
                let kept = EncodedAudio {
                    encoder,
                    cross: cross.narrow(j.keep)?.contiguous()?,
                    key: j.key,
                };
                Ok((cross, Some(kept)))
            })
            .collect();
        if let (Some(t), Some(encoder)) = (clock, encoder_done) {
            let _ = self.device.synchronize();
            tracing::debug!(
                windows = jobs.len(),
                encoder_ms = encoder.as_secs_f64() * 1e3,
                cross_ms = (t.elapsed() - encoder).as_secs_f64() * 1e3,
                "encoder windows and their cross-attention"
            );
        }
        out
    }

    /// Encodes audio alone (the padding past `2·positions` frames at level
    /// `key`) and keeps the states of its first `positions`, to go in front
    /// of later audio ([`Self::encode_after`]).
    pub(crate) fn encode_head(
        &self,
        mel: &crate::frontend::LogMel,
        positions: usize,
        fresh: usize,
        key: i32,
    ) -> candle_core::Result<EncodedAudio> {
        let job = HeadJob {
            mel,
            positions,
            fresh,
            key,
        };
        Ok(self.encode_heads(&[job])?.remove(0))
    }

    /// [`Self::encode_head`] of several streams' audio, through the encoder
    /// in groups as [`Self::encode_after_batch`] (one by one on the CPU).
    pub(crate) fn encode_heads(
        &self,
        jobs: &[HeadJob<'_>],
    ) -> candle_core::Result<Vec<EncodedAudio>> {
        let windows: Vec<_> = jobs.iter().map(|j| (j.mel, j.fresh, j.key, None)).collect();
        let (_, encoded) = self.encode_grouped(&windows)?;
        jobs.iter()
            .zip(encoded)
            .map(|(j, (encoded, encoder))| {
                let positions = j.positions.min(encoded.dim(1)?);
                Ok(EncodedAudio {
                    encoder: encoder.narrow(positions)?,
                    cross: self
                        .decoder
                        .cross_attention(&encoded.narrow(1, 0, positions)?)?,
                    key: j.key,
                })
            })
            .collect()
    }

    /// Windows `(mel, new positions, padding level, head)` through the encoder
    /// in groups of [`Self::window_group`], with each one's padding states.
    #[allow(clippy::type_complexity)]
    fn encode_grouped(
        &self,
        windows: &[(
            &crate::frontend::LogMel,
            usize,
            i32,
            Option<&encoder::EncodedHead>,
        )],
    ) -> candle_core::Result<(Vec<Arc<SilentStates>>, Vec<(Tensor, encoder::EncodedHead)>)> {
        let states = windows
            .iter()
            .map(|w| self.silent_states(w.2))
            .collect::<candle_core::Result<Vec<_>>>()?;
        let mels = windows
            .iter()
            .map(|w| self.mel_tensor(w.0))
            .collect::<candle_core::Result<Vec<_>>>()?;
        let inputs: Vec<encoder::AfterInput<'_>> = windows
            .iter()
            .zip(&mels)
            .zip(&states)
            .map(|((w, mel), st)| encoder::AfterInput {
                mel,
                fresh: w.1,
                head: w.3,
                silent: &st.encoder,
            })
            .collect();
        let encoded = self
            .encoder
            .forward_after_grouped(&inputs, self.window_group())?;
        Ok((states, encoded))
    }

    /// Windows one encoder batch takes: grouped on a GPU, where the host's
    /// launches are the cost; one by one on the CPU, where the arithmetic
    /// is and padding would add to it.
    fn window_group(&self) -> usize {
        if self.device.is_cpu() || !crate::ops::fast::fast_paths().windows {
            1
        } else {
            encoder::MAX_WINDOW_GROUP
        }
    }

    /// Encodes a normalised log-mel and prepares the decoder's cross-attention.
    pub fn encode(&self, mel: &crate::frontend::LogMel) -> candle_core::Result<Tensor> {
        self.encoder.forward(&self.mel_tensor(mel)?)
    }

    /// A log-mel as the encoder's `[1, n_mels, frames]` input on the model's device.
    fn mel_tensor(&self, mel: &crate::frontend::LogMel) -> candle_core::Result<Tensor> {
        Tensor::from_slice(&mel.data, (1, mel.n_mels, mel.n_frames), &self.device)?
            .to_dtype(self.dtype)
    }

    pub fn cross_attention(&self, encoded: &Tensor) -> candle_core::Result<CrossAttention> {
        self.decoder.cross_attention(encoded)
    }
}
