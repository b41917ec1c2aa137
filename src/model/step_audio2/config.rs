//! Step-Audio 2 configuration, read from the checkpoint's `config.json`
//! (`audio_encoder_config` + `text_config`), plus the published mini's shape
//! for building a model with random weights when no checkpoint is at hand.

use crate::model::{read_json, ModelError};
use serde_json::Value;
use std::path::Path;

/// Audio encoder and adapter (`audio_encoder_config`).
#[derive(Clone, Debug, PartialEq)]
pub struct EncoderConfig {
    pub n_mels: usize,
    /// Rows of the learned positional embedding: the longest conv2 output.
    pub n_audio_ctx: usize,
    pub n_state: usize,
    pub n_head: usize,
    pub n_layer: usize,
    /// Adapter output width (= the LLM's hidden size).
    pub llm_dim: usize,
    pub kernel_size: usize,
    pub adapter_stride: usize,
    /// Width of `adapter.linear1`. Not in config.json (the published code
    /// hard-codes 2048); the loader takes it from the weight's shape.
    pub adapter_hidden: usize,
}

/// The Qwen2.5-shaped language model (`text_config`).
#[derive(Clone, Debug, PartialEq)]
pub struct TextConfig {
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_layers: usize,
    pub num_heads: usize,
    pub num_kv_heads: usize,
    pub vocab_size: usize,
    pub rms_norm_eps: f64,
    pub rope_theta: f64,
    /// Length of the RoPE table, i.e. the longest context the model accepts.
    pub max_position_embeddings: usize,
}

impl TextConfig {
    /// No `head_dim` key exists in the published config: hidden / heads.
    pub(crate) fn head_dim(&self) -> usize {
        self.hidden_size / self.num_heads
    }
}

#[derive(Clone, Debug, PartialEq)]
pub struct StepAudio2Config {
    pub encoder: EncoderConfig,
    pub text: TextConfig,
}

/// The adapter width the published code hard-codes.
pub(crate) const PUBLISHED_ADAPTER_HIDDEN: usize = 2048;

impl StepAudio2Config {
    /// The same shape with fewer encoder or LLM layers or a smaller
    /// vocabulary (benchmarks of one piece, or runs that must fit a device).
    pub fn reshaped(
        mut self,
        encoder_layers: Option<usize>,
        llm_layers: Option<usize>,
        vocab_size: Option<usize>,
    ) -> Self {
        if let Some(n) = encoder_layers {
            self.encoder.n_layer = n;
        }
        if let Some(n) = llm_layers {
            self.text.num_layers = n;
        }
        if let Some(v) = vocab_size {
            self.text.vocab_size = v;
        }
        self
    }

    /// The shape of Step-Audio 2 mini (docs/architecture.md, "Step-Audio 2
    /// mini"): Whisper-large-v3-sized encoder, Qwen2.5-7B-sized LLM.
    pub fn mini() -> Self {
        Self {
            encoder: EncoderConfig {
                n_mels: 128,
                n_audio_ctx: 1500,
                n_state: 1280,
                n_head: 20,
                n_layer: 32,
                llm_dim: 3584,
                kernel_size: 3,
                adapter_stride: 2,
                adapter_hidden: PUBLISHED_ADAPTER_HIDDEN,
            },
            text: TextConfig {
                hidden_size: 3584,
                intermediate_size: 18944,
                num_layers: 28,
                num_heads: 28,
                num_kv_heads: 4,
                vocab_size: 158720,
                rms_norm_eps: 1e-6,
                rope_theta: 1e6,
                max_position_embeddings: 16384,
            },
        }
    }

    pub fn from_file(path: &Path) -> Result<Self, ModelError> {
        Self::from_json(&read_json(path)?, path)
    }

    /// Parses config.json; `path` only names the file in errors.
    pub(crate) fn from_json(json: &Value, path: &Path) -> Result<Self, ModelError> {
        let section = |key: &str| {
            json.get(key)
                .filter(|v| v.is_object())
                .ok_or_else(|| ModelError::config(path, format!("missing object `{key}`")))
        };
        let audio = section("audio_encoder_config")?;
        let text = section("text_config")?;
        let uint = |obj: &Value, sec: &str, key: &str| -> Result<usize, ModelError> {
            obj.get(key)
                .and_then(Value::as_u64)
                .map(|v| v as usize)
                .ok_or_else(|| ModelError::config(path, format!("missing integer `{sec}.{key}`")))
        };
        let float_or = |key: &str, default: f64| -> f64 {
            match text.get(key).and_then(Value::as_f64) {
                Some(v) => v,
                None => {
                    // transformers' Qwen2Config defaults, which the published model inherits.
                    tracing::warn!(
                        "{}: `text_config.{key}` missing, using {default}",
                        path.display()
                    );
                    default
                }
            }
        };
        let a = |k: &str| uint(audio, "audio_encoder_config", k);
        let t = |k: &str| uint(text, "text_config", k);
        if let Some(scaling) = text.get("rope_scaling") {
            if !scaling.is_null() {
                return Err(ModelError::config(
                    path,
                    format!(
                        "`text_config.rope_scaling` = {scaling} is not supported (only plain RoPE)"
                    ),
                ));
            }
        }
        let num_heads = t("num_attention_heads")?;
        // Step's configs carry both names for the same number; prefer the Qwen2 one.
        let num_kv_heads = t("num_key_value_heads").or_else(|_| t("num_attention_groups"))?;
        let hidden_size = t("hidden_size")?;
        let max_position_embeddings = t("max_position_embeddings")
            .or_else(|_| t("max_seq_len"))
            .unwrap_or(32768);
        let cfg = Self {
            encoder: EncoderConfig {
                n_mels: a("n_mels")?,
                n_audio_ctx: a("n_audio_ctx")?,
                n_state: a("n_audio_state")?,
                n_head: a("n_audio_head")?,
                n_layer: a("n_audio_layer")?,
                llm_dim: a("llm_dim")?,
                kernel_size: a("kernel_size").unwrap_or(3),
                adapter_stride: a("adapter_stride").unwrap_or(2),
                adapter_hidden: PUBLISHED_ADAPTER_HIDDEN,
            },
            text: TextConfig {
                hidden_size,
                intermediate_size: t("intermediate_size")?,
                num_layers: t("num_hidden_layers")?,
                num_heads,
                num_kv_heads,
                vocab_size: t("vocab_size")?,
                rms_norm_eps: float_or("rms_norm_eps", 1e-6),
                rope_theta: float_or("rope_theta", 10000.0),
                max_position_embeddings,
            },
        };
        cfg.validate()
            .map_err(|reason| ModelError::config(path, reason))?;
        Ok(cfg)
    }

    /// Checks the relations the code relies on.
    pub(crate) fn validate(&self) -> Result<(), String> {
        let (e, t) = (&self.encoder, &self.text);
        if e.n_head == 0 || e.n_state % e.n_head != 0 {
            return Err(format!(
                "n_audio_state {} is not a multiple of n_audio_head {}",
                e.n_state, e.n_head
            ));
        }
        if t.num_heads == 0 || t.hidden_size % t.num_heads != 0 {
            return Err(format!(
                "hidden_size {} is not a multiple of num_attention_heads {}",
                t.hidden_size, t.num_heads
            ));
        }
        if t.num_kv_heads == 0 || t.num_heads % t.num_kv_heads != 0 {
            return Err(format!(
                "num_attention_heads {} is not a multiple of num_key_value_heads {}",
                t.num_heads, t.num_kv_heads
            ));
        }
        if t.head_dim() % 2 != 0 {
            return Err(format!("head_dim {} must be even for RoPE", t.head_dim()));
        }
        if e.llm_dim != t.hidden_size {
            return Err(format!(
                "adapter output llm_dim {} differs from the LLM hidden_size {}",
                e.llm_dim, t.hidden_size
            ));
        }
        if e.kernel_size != 3 {
            // The patch count formula (E − 1)//2 + 1 assumes k3, padding 1.
            return Err(format!(
                "adapter kernel_size {} is not supported (3 expected)",
                e.kernel_size
            ));
        }
        Ok(())
    }
}

/// Encoder rows that carry audio for a mel of `mel_len` frames: the published
/// valid length is L − 2 mel frames, then conv2 and the pool halve it twice.
pub(crate) fn encoder_valid_len(mel_len: usize) -> usize {
    mel_len.saturating_sub(2).div_ceil(2) / 2
}

/// Adapter outputs kept (= `<audio_patch>` tokens) for `enc_valid` encoder
/// rows: the adapter conv's output length for that input (k3, padding 1).
pub(crate) fn adapter_keep_len(enc_valid: usize, stride: usize) -> usize {
    // (E + 2·1 − 3) // stride + 1 with Python's floor division, i.e. ⌈E / stride⌉
    // (0 for E = 0).
    enc_valid.div_ceil(stride)
}

/// `<audio_patch>` tokens for a mel of `mel_len` frames.
pub fn n_patches(mel_len: usize, stride: usize) -> usize {
    adapter_keep_len(encoder_valid_len(mel_len), stride)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn patch_counts_match_the_published_formula() {
        // (L, E, n) of the reference fixtures.
        for (l, e, n) in [
            (112, 27, 14),
            (202, 50, 25),
            (2502, 625, 313),
            (175, 43, 22),
        ] {
            assert_eq!(encoder_valid_len(l), e, "L={l}");
            assert_eq!(n_patches(l, 2), n, "L={l}");
        }
        assert_eq!(adapter_keep_len(0, 2), 0);
        assert_eq!(n_patches(0, 2), 0);
    }

    #[test]
    fn tiny_checkpoint_config_parses() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("tests/fixtures/step_audio2/tiny_ckpt/config.json");
        let cfg = StepAudio2Config::from_file(&dir).unwrap();
        assert_eq!(cfg.text.head_dim(), 32);
        assert_eq!(cfg.text.num_kv_heads, 2);
        assert_eq!(cfg.text.rope_theta, 1e6);
        assert_eq!(cfg.encoder.n_state, 64);
        StepAudio2Config::mini().validate().unwrap();
    }
}
