//! Building [`StepAudio2Model`] from the published checkpoint layout (sharded
//! safetensors with `model.safetensors.index.json`, memory-mapped), or with
//! random weights at any configuration for benchmarks. Both go through the
//! same builder, which asks for every expected tensor by name and shape, so a
//! checkpoint with a missing or misshaped tensor fails with its name.

use super::adapter::Adapter;
use super::config::StepAudio2Config;
use super::encoder::{AudioEncoder, EncoderBlock};
use super::llm::{rope_tables, LlmLayer, Qwen2Llm};
use super::prompt::StepTokenizer;
use super::{StepAudio2, StepAudio2Model};
use crate::model::layers::{Conv1d, LayerNorm, Linear, RmsNorm};
use crate::model::safetensors_store::SafetensorsStore;
use crate::model::ModelError;
use candle_core::{DType, Device, Tensor};
use std::collections::HashSet;
use std::path::Path;

/// LayerNorm epsilon of the Whisper-style encoder (PyTorch's default).
const ENCODER_LN_EPS: f32 = 1e-5;

/// Where the builder's tensors come from.
trait WeightSource {
    /// The tensor `name`, of exactly `shape`, in the model's dtype and device.
    fn get(&mut self, name: &str, shape: &[usize]) -> Result<Tensor, ModelError>;
}

struct StoreSource<'a> {
    store: &'a SafetensorsStore,
    dtype: DType,
    device: &'a Device,
    used: HashSet<String>,
}

impl WeightSource for StoreSource<'_> {
    fn get(&mut self, name: &str, shape: &[usize]) -> Result<Tensor, ModelError> {
        self.used.insert(name.to_string());
        self.store
            .tensor(name, Some(shape), self.dtype, self.device)
    }
}

/// Random weights with the reference checkpoint's scales: linear/conv weights
/// of variance 1/fan_in, biases 0.1², norm gains 1 ± 0.1, token embeddings 1,
/// positions 0.5². Values are uniform with those variances (the distribution
/// does not matter for timing, and uniform is cheap to draw on the CPU).
struct RandomSource<'a> {
    dtype: DType,
    device: &'a Device,
    /// Host generator state (splitmix64); the GPU path uses the device RNG.
    state: u64,
}

impl RandomSource<'_> {
    fn next_u64(&mut self) -> u64 {
        self.state = self.state.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.state;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
}

impl WeightSource for RandomSource<'_> {
    fn get(&mut self, name: &str, shape: &[usize]) -> Result<Tensor, ModelError> {
        let is_norm = name.ends_with("_ln.weight") || name.ends_with("norm.weight");
        let (mean, std) = if is_norm {
            (1.0, 0.1)
        } else if name.ends_with(".bias") {
            (0.0, 0.1)
        } else if name == "model.embed_tokens.weight" {
            (0.0, 1.0)
        } else if name == "encoder.positional_embedding.weight" {
            (0.0, 0.5)
        } else {
            let fan_in: usize = shape[1..].iter().product();
            (0.0, (1.0 / fan_in.max(1) as f64).sqrt())
        };
        // Uniform on [mean − a, mean + a] has standard deviation a / √3.
        let a = std * 3f64.sqrt();
        let t = if self.device.is_cpu() {
            let n: usize = shape.iter().product();
            let data: Vec<f32> = (0..n)
                .map(|_| {
                    let u = (self.next_u64() >> 40) as f64 / (1u64 << 24) as f64;
                    (mean + a * (2.0 * u - 1.0)) as f32
                })
                .collect();
            Tensor::from_vec(data, shape, self.device)?
        } else {
            // Device RNGs draw f32 only; converted below.
            Tensor::rand((mean - a) as f32, (mean + a) as f32, shape, self.device)?
        };
        Ok(t.to_dtype(self.dtype)?)
    }
}

/// candle's CPU matmul has no bf16 kernel: say so at load time rather than
/// at the first matmul.
fn check_dtype(device: &Device, dtype: DType) -> Result<(), ModelError> {
    match dtype {
        DType::F32 | DType::F16 => Ok(()),
        DType::BF16 if !device.is_cpu() => Ok(()),
        DType::BF16 => Err(ModelError::Invalid(
            "bf16 is not supported on the CPU (candle has no CPU bf16 matmul); use f32 or f16"
                .into(),
        )),
        other => Err(ModelError::Invalid(format!(
            "dtype {other:?} is not supported; use f32, f16 or bf16"
        ))),
    }
}

fn build(
    cfg: &StepAudio2Config,
    src: &mut dyn WeightSource,
    device: &Device,
    dtype: DType,
) -> Result<StepAudio2Model, ModelError> {
    cfg.validate().map_err(ModelError::Invalid)?;
    let e = &cfg.encoder;
    let t = &cfg.text;
    let (d, h) = (e.n_state, t.hidden_size);
    let hd = t.head_dim();
    let kv = t.num_kv_heads * hd;
    let mut get = |name: String, shape: &[usize]| src.get(&name, shape);

    let conv1 = Conv1d::new(
        get("encoder.conv1.weight".into(), &[d, e.n_mels, 3])?,
        get("encoder.conv1.bias".into(), &[d])?,
        1,
        1,
    )?;
    let conv2 = Conv1d::new(
        get("encoder.conv2.weight".into(), &[d, d, 3])?,
        get("encoder.conv2.bias".into(), &[d])?,
        2,
        1,
    )?;
    let positions = get(
        "encoder.positional_embedding.weight".into(),
        &[e.n_audio_ctx, d],
    )?;
    let mut blocks = Vec::with_capacity(e.n_layer);
    for i in 0..e.n_layer {
        let p = format!("encoder.blocks.{i}");
        let mut ln = |name: &str| -> Result<LayerNorm, ModelError> {
            Ok(LayerNorm {
                gamma: get(format!("{p}.{name}.weight"), &[d])?,
                beta: get(format!("{p}.{name}.bias"), &[d])?,
                eps: ENCODER_LN_EPS,
            })
        };
        let attn_ln = ln("attn_ln")?;
        let mlp_ln = ln("mlp_ln")?;
        let qw = get(format!("{p}.attn.query.weight"), &[d, d])?;
        let qb = get(format!("{p}.attn.query.bias"), &[d])?;
        let kw = get(format!("{p}.attn.key.weight"), &[d, d])?;
        let vw = get(format!("{p}.attn.value.weight"), &[d, d])?;
        let vb = get(format!("{p}.attn.value.bias"), &[d])?;
        let kb = Tensor::zeros(d, dtype, device)?;
        let qkv = Linear::new(
            Tensor::cat(&[qw, kw, vw], 0)?,
            Some(Tensor::cat(&[qb, kb, vb], 0)?),
        );
        let out = Linear::new(
            get(format!("{p}.attn.out.weight"), &[d, d])?,
            Some(get(format!("{p}.attn.out.bias"), &[d])?),
        );
        let fc1 = Linear::new(
            get(format!("{p}.mlp.0.weight"), &[4 * d, d])?,
            Some(get(format!("{p}.mlp.0.bias"), &[4 * d])?),
        );
        let fc2 = Linear::new(
            get(format!("{p}.mlp.2.weight"), &[d, 4 * d])?,
            Some(get(format!("{p}.mlp.2.bias"), &[d])?),
        );
        blocks.push(EncoderBlock {
            attn_ln,
            qkv,
            out,
            mlp_ln,
            fc1,
            fc2,
        });
    }
    let after_norm = LayerNorm {
        gamma: get("encoder.after_norm.weight".into(), &[d])?,
        beta: get("encoder.after_norm.bias".into(), &[d])?,
        eps: ENCODER_LN_EPS,
    };
    let encoder = AudioEncoder {
        conv1,
        conv2,
        positions,
        blocks,
        after_norm,
        heads: e.n_head,
    };

    let ah = e.adapter_hidden;
    let adapter = Adapter {
        conv: Conv1d::new(
            get("adapter.conv.weight".into(), &[d, d, e.kernel_size])?,
            get("adapter.conv.bias".into(), &[d])?,
            e.adapter_stride,
            1,
        )?,
        linear1: Linear::new(
            get("adapter.linear1.weight".into(), &[ah, d])?,
            Some(get("adapter.linear1.bias".into(), &[ah])?),
        ),
        linear2: Linear::new(
            get("adapter.linear2.weight".into(), &[e.llm_dim, ah])?,
            Some(get("adapter.linear2.bias".into(), &[e.llm_dim])?),
        ),
    };

    let eps = t.rms_norm_eps as f32;
    let embed_tokens = get("model.embed_tokens.weight".into(), &[t.vocab_size, h])?;
    let mut layers = Vec::with_capacity(t.num_layers);
    for i in 0..t.num_layers {
        let p = format!("model.layers.{i}");
        let input_layernorm = RmsNorm {
            weight: get(format!("{p}.input_layernorm.weight"), &[h])?,
            eps,
        };
        let a = format!("{p}.self_attn");
        let qw = get(format!("{a}.q_proj.weight"), &[h, h])?;
        let qb = get(format!("{a}.q_proj.bias"), &[h])?;
        let kw = get(format!("{a}.k_proj.weight"), &[kv, h])?;
        let kb = get(format!("{a}.k_proj.bias"), &[kv])?;
        let vw = get(format!("{a}.v_proj.weight"), &[kv, h])?;
        let vb = get(format!("{a}.v_proj.bias"), &[kv])?;
        let qkv = Linear::new(
            Tensor::cat(&[qw, kw, vw], 0)?,
            Some(Tensor::cat(&[qb, kb, vb], 0)?),
        );
        let o_proj = Linear::new(get(format!("{a}.o_proj.weight"), &[h, h])?, None);
        let post_attention_layernorm = RmsNorm {
            weight: get(format!("{p}.post_attention_layernorm.weight"), &[h])?,
            eps,
        };
        let im = t.intermediate_size;
        let gate = get(format!("{p}.mlp.gate_proj.weight"), &[im, h])?;
        let up = get(format!("{p}.mlp.up_proj.weight"), &[im, h])?;
        let gate_up = Linear::new(Tensor::cat(&[gate, up], 0)?, None);
        let down_proj = Linear::new(get(format!("{p}.mlp.down_proj.weight"), &[h, im])?, None);
        layers.push(LlmLayer {
            input_layernorm,
            qkv,
            o_proj,
            post_attention_layernorm,
            gate_up,
            down_proj,
        });
    }
    let norm = RmsNorm {
        weight: get("model.norm.weight".into(), &[h])?,
        eps,
    };
    let lm_head = Linear::new(get("lm_head.weight".into(), &[t.vocab_size, h])?, None);
    let (cos, sin) = rope_tables(t.max_position_embeddings, hd, t.rope_theta, dtype, device)?;
    let llm = Qwen2Llm {
        embed_tokens,
        layers,
        norm,
        lm_head,
        cos,
        sin,
        num_heads: t.num_heads,
        num_kv_heads: t.num_kv_heads,
        head_dim: hd,
    };
    Ok(StepAudio2Model {
        config: cfg.clone(),
        encoder,
        adapter,
        llm,
        device: device.clone(),
        dtype,
    })
}

/// Loads the weights of a checkpoint directory (config.json + safetensors).
pub(crate) fn load_model(
    dir: &Path,
    device: &Device,
    dtype: DType,
) -> Result<StepAudio2Model, ModelError> {
    check_dtype(device, dtype)?;
    let mut config = StepAudio2Config::from_file(&dir.join("config.json"))?;
    let store = SafetensorsStore::open(dir)?;
    // The adapter width is not in config.json: take it from the weight.
    let name = "adapter.linear1.weight";
    let shape = store.shape(name).ok_or_else(|| ModelError::MissingTensor {
        file: dir.display().to_string(),
        name: name.into(),
    })?;
    if shape.len() != 2 || shape[1] != config.encoder.n_state {
        return Err(ModelError::Shape {
            file: dir.display().to_string(),
            name: name.into(),
            expected: vec![shape.first().copied().unwrap_or(0), config.encoder.n_state],
            found: shape,
        });
    }
    config.encoder.adapter_hidden = shape[0];
    let mut src = StoreSource {
        store: &store,
        dtype,
        device,
        used: HashSet::new(),
    };
    let model = build(&config, &mut src, device, dtype)?;
    let unused: Vec<String> = store
        .names()
        .into_iter()
        .filter(|n| !src.used.contains(n))
        .collect();
    if !unused.is_empty() {
        tracing::debug!(
            "{}: {} tensors not used by the ASR path (e.g. {})",
            dir.display(),
            unused.len(),
            unused[0]
        );
    }
    tracing::info!(
        "loaded Step-Audio 2 from {} ({:?} on {:?}): encoder {}×{}, LLM {}×{}",
        dir.display(),
        dtype,
        device,
        config.encoder.n_layer,
        config.encoder.n_state,
        config.text.num_layers,
        config.text.hidden_size
    );
    Ok(model)
}

/// Weights and tokenizer of a checkpoint directory.
pub fn load_step_audio2(
    dir: &Path,
    device: &Device,
    dtype: DType,
) -> Result<StepAudio2, ModelError> {
    let tokenizer = StepTokenizer::load(&dir.join("tokenizer.json"))?;
    let model = load_model(dir, device, dtype)?;
    StepAudio2::new(model, tokenizer)
}

/// The model at `config` with random weights (benchmarks without a
/// checkpoint). Deterministic for a seed on a given device kind.
pub fn random_weights(
    config: &StepAudio2Config,
    device: &Device,
    dtype: DType,
    seed: u64,
) -> Result<StepAudio2Model, ModelError> {
    check_dtype(device, dtype)?;
    if !device.is_cpu() {
        device.set_seed(seed)?;
    }
    let mut src = RandomSource {
        dtype,
        device,
        state: seed,
    };
    build(config, &mut src, device, dtype)
}
