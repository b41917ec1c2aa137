//! The Whisper family (tiny … large-v3): encoder, decoder, tokenizer and
//! greedy decoding, loaded from CTranslate2 or Hugging Face directories.

pub mod decoder;
pub mod decoding;
pub mod encoder;
pub mod load;
pub mod streaming;
pub mod tokens;

use crate::frontend::MelExtractor;
use candle_core::{DType, Device, Tensor};
use decoder::{CrossAttention, WhisperDecoder};
use encoder::WhisperEncoder;
use std::sync::Arc;
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
    pub fn is_multilingual(&self) -> bool {
        self.vocab_size >= 51865
    }
}

/// Weights of the decoder's single-token steps on the CPU.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default, clap::ValueEnum)]
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
}

impl WhisperModel {
    /// Encodes a normalised log-mel and prepares the decoder's cross-attention.
    pub fn encode(&self, mel: &crate::frontend::LogMel) -> candle_core::Result<Tensor> {
        let t = Tensor::from_slice(&mel.data, (1, mel.n_mels, mel.n_frames), &self.device)?
            .to_dtype(self.dtype)?;
        self.encoder.forward(&t)
    }

    pub fn cross_attention(&self, encoded: &Tensor) -> candle_core::Result<CrossAttention> {
        self.decoder.cross_attention(encoded)
    }
}
