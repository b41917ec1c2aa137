//! Building a [`WhisperModel`] from a CTranslate2 or Hugging Face directory.
//! Both layouts end in the same structures: self-attention q/k/v and
//! cross-attention k/v are fused into one projection each (CTranslate2 stores
//! them fused; the Hugging Face pieces are concatenated at load time).

use super::decoder::{DecoderBlock, WhisperDecoder};
use super::encoder::{EncoderBlock, WhisperEncoder};
use super::tokens::WhisperTokenizer;
use super::{SuppressConfig, WhisperConfig, WhisperModel};
use crate::frontend::MelExtractor;
use crate::model::ct2::Ct2Model;
use crate::model::layers::{Conv1d, LayerNorm, Linear};
use crate::model::safetensors_store::SafetensorsStore;
use crate::model::{detect_layout, read_json, ModelError, WeightLayout};
use candle_core::{DType, Device, Tensor};
use std::path::Path;
use std::sync::Arc;

const LN_EPS: f32 = 1e-5;

/// Loads the Whisper model in `dir` onto `device`, computing in `dtype`.
pub fn load_whisper(dir: &Path, device: &Device, dtype: DType) -> Result<WhisperModel, ModelError> {
    let tokenizer_path = dir.join("tokenizer.json");
    if !tokenizer_path.is_file() {
        return Err(ModelError::Layout {
            dir: dir.display().to_string(),
            reason: "tokenizer.json is missing".into(),
        });
    }
    let tokenizer = WhisperTokenizer::load(&tokenizer_path)?;
    let (config, encoder, decoder, suppress) = match detect_layout(dir)? {
        WeightLayout::CTranslate2 => load_ct2(dir, device, dtype)?,
        WeightLayout::HuggingFace => load_hf(dir, device, dtype)?,
    };
    if tokenizer.timestamp_begin as usize >= config.vocab_size {
        return Err(ModelError::Invalid(format!(
            "{}: tokenizer's <|notimestamps|> ({}) does not fit the model's vocabulary of {}",
            dir.display(),
            tokenizer.no_timestamps,
            config.vocab_size
        )));
    }
    tracing::info!(
        dir = %dir.display(),
        d_model = config.d_model,
        layers = config.encoder_layers,
        vocab = config.vocab_size,
        multilingual = config.is_multilingual(),
        "loaded Whisper model"
    );
    Ok(WhisperModel {
        mel: Arc::new(MelExtractor::new(config.n_mels)),
        config,
        encoder,
        decoder,
        tokenizer,
        suppress,
        device: device.clone(),
        dtype,
        silent_windows: Default::default(),
        fused_step: Default::default(),
    })
}

/// Loads for inference: as [`load_whisper`], then int8 decode-step weights
/// on the CPU unless `weights` asks for f32.
pub fn load_whisper_for_inference(
    dir: &Path,
    device: &Device,
    dtype: DType,
    weights: super::DecoderWeights,
) -> Result<WhisperModel, ModelError> {
    let mut model = load_whisper(dir, device, dtype)?;
    if weights == super::DecoderWeights::Int8 && device.is_cpu() {
        model.decoder.quantize_for_decoding()?;
    }
    Ok(model)
}

type Parts = (
    WhisperConfig,
    WhisperEncoder,
    WhisperDecoder,
    SuppressConfig,
);

fn count_layers(names: impl Iterator<Item = String>, prefix: &str) -> usize {
    names
        .filter_map(|n| {
            let rest = n.strip_prefix(prefix)?;
            rest.split(['/', '.']).next()?.parse::<usize>().ok()
        })
        .map(|i| i + 1)
        .max()
        .unwrap_or(0)
}

fn json_u32_list(v: &serde_json::Value, key: &str) -> Vec<u32> {
    v.get(key)
        .and_then(|x| x.as_array())
        .map(|a| {
            a.iter()
                .filter_map(|x| x.as_i64())
                .filter(|&x| x >= 0)
                .map(|x| x as u32)
                .collect()
        })
        .unwrap_or_default()
}

// ---------------------------------------------------------------- CTranslate2

fn load_ct2(dir: &Path, device: &Device, dtype: DType) -> Result<Parts, ModelError> {
    let bin = Ct2Model::open(&dir.join("model.bin"))?;
    if bin.spec != "WhisperSpec" {
        return Err(ModelError::corrupt(
            bin.path(),
            format!("model spec is `{}`, expected `WhisperSpec`", bin.spec),
        ));
    }
    let t = |name: &str| bin.tensor(name, dtype, device);
    let shape = |name: &str| -> Result<Vec<usize>, ModelError> {
        bin.variable(name)
            .map(|v| v.shape.clone())
            .ok_or_else(|| ModelError::MissingTensor {
                file: bin.path().display().to_string(),
                name: name.to_string(),
            })
    };
    let linear = |p: &str| -> Result<Linear, ModelError> {
        let bias_name = format!("{p}/bias");
        let bias = if bin.variable(&bias_name).is_some() {
            Some(t(&bias_name)?)
        } else {
            None
        };
        Ok(Linear::new(t(&format!("{p}/weight"))?, bias))
    };
    let ln = |p: &str| -> Result<LayerNorm, ModelError> {
        Ok(LayerNorm {
            gamma: t(&format!("{p}/gamma"))?,
            beta: t(&format!("{p}/beta"))?,
            eps: LN_EPS,
        })
    };
    let conv1_shape = shape("encoder/conv1/weight")?;
    let (d_model, n_mels) = (conv1_shape[0], conv1_shape[1]);
    let names = || {
        bin.names()
            .map(str::to_string)
            .collect::<Vec<_>>()
            .into_iter()
    };
    let encoder_layers = count_layers(names(), "encoder/layer_");
    let decoder_layers = count_layers(names(), "decoder/layer_");
    let vocab_size = shape("decoder/embeddings/weight")?[0];
    let config = WhisperConfig {
        n_mels,
        n_audio_ctx: shape("encoder/position_encodings/encodings")?[0],
        d_model,
        encoder_layers,
        encoder_heads: bin.scalar_int("encoder/num_heads")? as usize,
        n_text_ctx: shape("decoder/position_encodings/encodings")?[0],
        decoder_layers,
        decoder_heads: bin.scalar_int("decoder/num_heads")? as usize,
        vocab_size,
    };
    let encoder = WhisperEncoder {
        conv1: Conv1d::new(t("encoder/conv1/weight")?, t("encoder/conv1/bias")?, 1, 1)?,
        conv2: Conv1d::new(t("encoder/conv2/weight")?, t("encoder/conv2/bias")?, 2, 1)?,
        positions: t("encoder/position_encodings/encodings")?,
        blocks: (0..encoder_layers)
            .map(|i| {
                let p = format!("encoder/layer_{i}");
                Ok(EncoderBlock {
                    attn_ln: ln(&format!("{p}/self_attention/layer_norm"))?,
                    qkv: linear(&format!("{p}/self_attention/linear_0"))?,
                    out: linear(&format!("{p}/self_attention/linear_1"))?,
                    mlp_ln: ln(&format!("{p}/ffn/layer_norm"))?,
                    fc1: linear(&format!("{p}/ffn/linear_0"))?,
                    fc2: linear(&format!("{p}/ffn/linear_1"))?,
                })
            })
            .collect::<Result<_, ModelError>>()?,
        ln_post: ln("encoder/layer_norm")?,
        heads: config.encoder_heads,
    };
    let decoder = WhisperDecoder {
        token_embedding: t("decoder/embeddings/weight")?,
        positions: t("decoder/position_encodings/encodings")?,
        blocks: (0..decoder_layers)
            .map(|i| {
                let p = format!("decoder/layer_{i}");
                Ok(DecoderBlock {
                    self_ln: ln(&format!("{p}/self_attention/layer_norm"))?,
                    self_qkv: linear(&format!("{p}/self_attention/linear_0"))?,
                    self_out: linear(&format!("{p}/self_attention/linear_1"))?,
                    cross_ln: ln(&format!("{p}/attention/layer_norm"))?,
                    cross_q: linear(&format!("{p}/attention/linear_0"))?,
                    cross_kv: linear(&format!("{p}/attention/linear_1"))?,
                    cross_out: linear(&format!("{p}/attention/linear_2"))?,
                    mlp_ln: ln(&format!("{p}/ffn/layer_norm"))?,
                    fc1: linear(&format!("{p}/ffn/linear_0"))?,
                    fc2: linear(&format!("{p}/ffn/linear_1"))?,
                })
            })
            .collect::<Result<_, ModelError>>()?,
        ln: ln("decoder/layer_norm")?,
        heads: config.decoder_heads,
        output_int8: None,
    };
    let cfg_path = dir.join("config.json");
    let suppress = if cfg_path.is_file() {
        let cfg = read_json(&cfg_path)?;
        SuppressConfig {
            always: json_u32_list(&cfg, "suppress_ids"),
            at_begin: json_u32_list(&cfg, "suppress_ids_begin"),
        }
    } else {
        tracing::warn!(
            "{}: no config.json; no symbol suppression list",
            dir.display()
        );
        SuppressConfig::default()
    };
    Ok((config, encoder, decoder, suppress))
}

// --------------------------------------------------------------- Hugging Face

fn load_hf(dir: &Path, device: &Device, dtype: DType) -> Result<Parts, ModelError> {
    let store = SafetensorsStore::open(dir)?;
    let cfg_path = dir.join("config.json");
    let cfg = read_json(&cfg_path)?;
    let get = |key: &str| -> Result<usize, ModelError> {
        cfg.get(key)
            .and_then(|v| v.as_u64())
            .map(|v| v as usize)
            .ok_or_else(|| ModelError::config(&cfg_path, format!("missing integer `{key}`")))
    };
    let config = WhisperConfig {
        n_mels: get("num_mel_bins")?,
        n_audio_ctx: get("max_source_positions")?,
        d_model: get("d_model")?,
        encoder_layers: get("encoder_layers")?,
        encoder_heads: get("encoder_attention_heads")?,
        n_text_ctx: get("max_target_positions")?,
        decoder_layers: get("decoder_layers")?,
        decoder_heads: get("decoder_attention_heads")?,
        vocab_size: get("vocab_size")?,
    };
    // WhisperForConditionalGeneration prefixes `model.`; a bare WhisperModel does not.
    let prefix = if store.contains("model.encoder.conv1.weight") {
        "model."
    } else {
        ""
    };
    let d = config.d_model;
    let t = |name: &str, shape: &[usize]| {
        store.tensor(&format!("{prefix}{name}"), Some(shape), dtype, device)
    };
    let linear = |p: &str, out: usize, inp: usize, bias: bool| -> Result<Linear, ModelError> {
        let b = if bias {
            Some(t(&format!("{p}.bias"), &[out])?)
        } else {
            None
        };
        Ok(Linear::new(t(&format!("{p}.weight"), &[out, inp])?, b))
    };
    let ln = |p: &str| -> Result<LayerNorm, ModelError> {
        Ok(LayerNorm {
            gamma: t(&format!("{p}.weight"), &[d])?,
            beta: t(&format!("{p}.bias"), &[d])?,
            eps: LN_EPS,
        })
    };
    // q, k (no bias), v concatenated into one projection.
    let fused = |p: &str, parts: &[&str]| -> Result<Linear, ModelError> {
        let mut ws = Vec::new();
        let mut bs = Vec::new();
        for part in parts {
            let l = linear(&format!("{p}.{part}_proj"), d, d, *part != "k")?;
            ws.push(l.weight);
            bs.push(match l.bias {
                Some(b) => b,
                None => Tensor::zeros(d, dtype, device)?,
            });
        }
        Ok(Linear::new(
            Tensor::cat(&ws, 0)?,
            Some(Tensor::cat(&bs, 0)?),
        ))
    };
    let ffn = 4 * d;
    let ffn_dim = cfg
        .get("encoder_ffn_dim")
        .and_then(|v| v.as_u64())
        .map_or(ffn, |v| v as usize);
    let encoder = WhisperEncoder {
        conv1: Conv1d::new(
            t("encoder.conv1.weight", &[d, config.n_mels, 3])?,
            t("encoder.conv1.bias", &[d])?,
            1,
            1,
        )?,
        conv2: Conv1d::new(
            t("encoder.conv2.weight", &[d, d, 3])?,
            t("encoder.conv2.bias", &[d])?,
            2,
            1,
        )?,
        positions: t("encoder.embed_positions.weight", &[config.n_audio_ctx, d])?,
        blocks: (0..config.encoder_layers)
            .map(|i| {
                let p = format!("encoder.layers.{i}");
                Ok(EncoderBlock {
                    attn_ln: ln(&format!("{p}.self_attn_layer_norm"))?,
                    qkv: fused(&format!("{p}.self_attn"), &["q", "k", "v"])?,
                    out: linear(&format!("{p}.self_attn.out_proj"), d, d, true)?,
                    mlp_ln: ln(&format!("{p}.final_layer_norm"))?,
                    fc1: linear(&format!("{p}.fc1"), ffn_dim, d, true)?,
                    fc2: linear(&format!("{p}.fc2"), d, ffn_dim, true)?,
                })
            })
            .collect::<Result<_, ModelError>>()?,
        ln_post: ln("encoder.layer_norm")?,
        heads: config.encoder_heads,
    };
    let dec_ffn = cfg
        .get("decoder_ffn_dim")
        .and_then(|v| v.as_u64())
        .map_or(ffn, |v| v as usize);
    let decoder = WhisperDecoder {
        token_embedding: t("decoder.embed_tokens.weight", &[config.vocab_size, d])?,
        positions: t("decoder.embed_positions.weight", &[config.n_text_ctx, d])?,
        blocks: (0..config.decoder_layers)
            .map(|i| {
                let p = format!("decoder.layers.{i}");
                Ok(DecoderBlock {
                    self_ln: ln(&format!("{p}.self_attn_layer_norm"))?,
                    self_qkv: fused(&format!("{p}.self_attn"), &["q", "k", "v"])?,
                    self_out: linear(&format!("{p}.self_attn.out_proj"), d, d, true)?,
                    cross_ln: ln(&format!("{p}.encoder_attn_layer_norm"))?,
                    cross_q: linear(&format!("{p}.encoder_attn.q_proj"), d, d, true)?,
                    cross_kv: fused(&format!("{p}.encoder_attn"), &["k", "v"])?,
                    cross_out: linear(&format!("{p}.encoder_attn.out_proj"), d, d, true)?,
                    mlp_ln: ln(&format!("{p}.final_layer_norm"))?,
                    fc1: linear(&format!("{p}.fc1"), dec_ffn, d, true)?,
                    fc2: linear(&format!("{p}.fc2"), d, dec_ffn, true)?,
                })
            })
            .collect::<Result<_, ModelError>>()?,
        ln: ln("decoder.layer_norm")?,
        heads: config.decoder_heads,
        output_int8: None,
    };
    let gen_path = dir.join("generation_config.json");
    let suppress = if gen_path.is_file() {
        let gen = read_json(&gen_path)?;
        SuppressConfig {
            always: json_u32_list(&gen, "suppress_tokens"),
            at_begin: json_u32_list(&gen, "begin_suppress_tokens"),
        }
    } else {
        tracing::warn!(
            "{}: no generation_config.json; no symbol suppression list",
            dir.display()
        );
        SuppressConfig::default()
    };
    Ok((config, encoder, decoder, suppress))
}
