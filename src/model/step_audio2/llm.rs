//! The Qwen2.5-shaped language model of Step-Audio 2: pre-norm decoder layers
//! with grouped-query attention (q/k/v biases, no o_proj bias), RoPE on
//! non-interleaved halves, RMSNorm, SiLU-gated MLP, final norm and an untied
//! `lm_head`. Keys and values live in preallocated per-layer [`KvCache`]s, so
//! a step appends one position in place and a rollback is a truncation.

use crate::model::kv_cache::KvCache;
use crate::model::kv_pool::{KvSlot, SlotShape};
use crate::model::layers::{causal_mask, Linear, RmsNorm};
use crate::ops::fast::{DecodeCache, DecodeLayerWeights, DecodeWeights};
use candle_core::{DType, Device, Result, Tensor, D};

#[derive(Clone, Debug)]
pub struct LlmLayer {
    pub input_layernorm: RmsNorm,
    /// `q_proj`, `k_proj`, `v_proj` (all with bias) fused into one
    /// `[H + 2·kv·hd, H]` projection: one GEMM instead of three per layer.
    pub qkv: Linear,
    pub o_proj: Linear,
    pub post_attention_layernorm: RmsNorm,
    /// `gate_proj` and `up_proj` fused into `[2·I, H]`.
    pub gate_up: Linear,
    pub down_proj: Linear,
}

#[derive(Clone, Debug)]
pub struct Qwen2Llm {
    /// `[V, H]`.
    pub embed_tokens: Tensor,
    pub layers: Vec<LlmLayer>,
    pub norm: RmsNorm,
    /// `[V, H]`, separate from the embedding.
    pub lm_head: Linear,
    /// RoPE tables `[max_positions, hd/2]` in the model dtype.
    pub cos: Tensor,
    pub sin: Tensor,
    pub num_heads: usize,
    pub num_kv_heads: usize,
    pub head_dim: usize,
}

/// The per-layer key/value caches of one stream (empty by default: no layer),
/// in buffers of its own or in a pool slot.
#[derive(Debug, Default)]
pub struct LlmState {
    caches: Vec<KvCache>,
    /// The pool slot the caches live in (given back when the state is dropped).
    slot: Option<KvSlot>,
}

impl LlmState {
    pub fn len(&self) -> usize {
        self.caches.first().map_or(0, KvCache::len)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Forgets positions from `len` on (a partial's rollback); the stored prefix
    /// is not touched.
    pub fn truncate(&mut self, len: usize) {
        self.caches.iter_mut().for_each(|c| c.truncate(len));
    }

    /// Cached keys and values `[1, kv_heads, len, hd]` of layer `i`.
    pub fn layer(&self, i: usize) -> Result<Option<(Tensor, Tensor)>> {
        match self.caches.get(i) {
            Some(c) => c.current(),
            None => Ok(None),
        }
    }

    pub fn num_layers(&self) -> usize {
        self.caches.len()
    }

    /// Allocated positions (the same in every layer).
    pub(crate) fn capacity(&self) -> usize {
        self.caches.first().map_or(0, KvCache::capacity)
    }

    /// Positions this state can ever hold: its slot's, where it has one (a
    /// slot never grows); `None` for buffers of its own, which grow.
    pub fn fixed_positions(&self) -> Option<usize> {
        self.slot.as_ref().map(KvSlot::positions)
    }

    /// Makes room for `needed` positions in every layer (see [`KvCache::reserve`]).
    pub(crate) fn reserve(&mut self, needed: usize) -> Result<()> {
        self.caches.iter_mut().try_for_each(|c| c.reserve(needed))
    }

    /// Counts `n` positions written into every layer's buffers by a fused kernel.
    pub(crate) fn advance(&mut self, n: usize) -> Result<()> {
        self.caches.iter_mut().try_for_each(|c| c.advance(n))
    }

    /// Appends every cached position of `other` (same model) after this
    /// state's own, layer by layer: a copy of what prefilling the same
    /// positions computed.
    pub(crate) fn append_from(&mut self, other: &LlmState) -> Result<()> {
        if self.caches.len() != other.num_layers() {
            candle_core::bail!(
                "KV caches of {} layers cannot take {}",
                self.caches.len(),
                other.num_layers()
            );
        }
        for (i, cache) in self.caches.iter_mut().enumerate() {
            if let Some((k, v)) = other.layer(i)? {
                cache.append(&k, &v)?;
            }
        }
        Ok(())
    }

    /// Whole key and value buffers `[1, kv_heads, capacity, hd]` of layer `i`.
    pub(crate) fn layer_buffers(&self, i: usize) -> Option<(&Tensor, &Tensor)> {
        self.caches.get(i).and_then(KvCache::buffers)
    }
}

impl DecodeCache for LlmState {
    fn positions(&self) -> usize {
        self.len()
    }
    fn capacity(&self) -> usize {
        LlmState::capacity(self)
    }
    fn num_layers(&self) -> usize {
        LlmState::num_layers(self)
    }
    fn reserve(&mut self, needed: usize) -> Result<()> {
        LlmState::reserve(self, needed)
    }
    fn advance(&mut self, n: usize) -> Result<()> {
        LlmState::advance(self, n)
    }
    fn layer_buffers(&self, i: usize) -> Option<(&Tensor, &Tensor)> {
        LlmState::layer_buffers(self, i)
    }
}

/// RoPE angles as transformers' Qwen2 computes them in f32:
/// inv_freq_i = 1 / θ^(2i/hd), angle = position · inv_freq_i; the table holds
/// one half, which the kernel applies to both halves of a head.
pub(crate) fn rope_tables(
    max_positions: usize,
    head_dim: usize,
    theta: f64,
    dtype: DType,
    device: &Device,
) -> Result<(Tensor, Tensor)> {
    let half = head_dim / 2;
    let inv_freq: Vec<f32> = (0..half)
        .map(|i| {
            let exponent = (2 * i) as f32 / head_dim as f32;
            (1.0 / theta.powf(exponent as f64)) as f32
        })
        .collect();
    let mut cos = Vec::with_capacity(max_positions * half);
    let mut sin = Vec::with_capacity(max_positions * half);
    for p in 0..max_positions {
        for &f in &inv_freq {
            // The angle is rounded to f32 like the reference's; cos/sin of it
            // are then taken in f64 and rounded once.
            let angle = (p as f32 * f) as f64;
            cos.push(angle.cos() as f32);
            sin.push(angle.sin() as f32);
        }
    }
    let cos = Tensor::from_vec(cos, (max_positions, half), device)?.to_dtype(dtype)?;
    let sin = Tensor::from_vec(sin, (max_positions, half), device)?.to_dtype(dtype)?;
    Ok((cos, sin))
}

impl Qwen2Llm {
    pub(crate) fn max_positions(&self) -> usize {
        self.cos.dim(0).unwrap_or(0)
    }

    pub(crate) fn device(&self) -> &Device {
        self.embed_tokens.device()
    }

    /// The weights and dimensions as the fused decode step
    /// ([`crate::ops::fast::FusedDecoder`]) reads them; the tensors are shared.
    pub fn decode_weights(&self) -> DecodeWeights {
        DecodeWeights {
            embed_tokens: self.embed_tokens.clone(),
            layers: self
                .layers
                .iter()
                .map(|l| DecodeLayerWeights {
                    input_norm: l.input_layernorm.weight.clone(),
                    qkv: l.qkv.weight.clone(),
                    qkv_bias: l.qkv.bias.clone(),
                    o_proj: l.o_proj.weight.clone(),
                    o_proj_bias: l.o_proj.bias.clone(),
                    post_norm: l.post_attention_layernorm.weight.clone(),
                    gate_up: l.gate_up.weight.clone(),
                    gate_up_bias: l.gate_up.bias.clone(),
                    down_proj: l.down_proj.weight.clone(),
                    down_proj_bias: l.down_proj.bias.clone(),
                })
                .collect(),
            final_norm: self.norm.weight.clone(),
            rms_eps: self.norm.eps,
            lm_head: self.lm_head.weight.clone(),
            cos: self.cos.clone(),
            sin: self.sin.clone(),
            num_heads: self.num_heads,
            num_kv_heads: self.num_kv_heads,
            head_dim: self.head_dim,
        }
    }

    /// An empty state whose caches are allocated for `capacity` positions on
    /// the first append (they double if a stream ever needs more).
    pub fn new_state(&self, capacity: usize) -> LlmState {
        LlmState {
            caches: self.layers.iter().map(|_| KvCache::new(capacity)).collect(),
            slot: None,
        }
    }

    /// The shape of a pool slot that holds `positions` of this model's keys
    /// and values.
    pub fn slot_shape(&self, positions: usize) -> SlotShape {
        SlotShape {
            layers: self.layers.len(),
            kv_heads: self.num_kv_heads,
            positions,
            head_dim: self.head_dim,
        }
    }

    /// An empty state whose caches are the layers of `slot` (of a pool of
    /// [`Self::slot_shape`] in the model's dtype, on its device).
    pub fn state_in_slot(&self, slot: KvSlot) -> Result<LlmState> {
        let want = self.slot_shape(slot.positions());
        let dtype = self.lm_head.weight.dtype();
        if slot.shape() != want || slot.dtype() != dtype {
            candle_core::bail!(
                "a KV slot {:?} ({:?}) does not fit this model's {want:?} ({dtype:?})",
                slot.shape(),
                slot.dtype()
            );
        }
        let caches = (0..self.layers.len())
            .map(|l| {
                let (k, v) = slot.layer(l)?;
                KvCache::in_buffers(k, v)
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(LlmState {
            caches,
            slot: Some(slot),
        })
    }

    /// Token embeddings `[n, H]`.
    pub fn embed(&self, ids: &[u32]) -> Result<Tensor> {
        let ids = Tensor::new(ids, self.device())?;
        self.embed_tokens.index_select(&ids, 0)
    }

    /// Runs input embeddings `[1, n, H]` at positions `state.len()..` through
    /// the decoder, appending their keys and values to `state`, and returns
    /// the final-norm hidden states `[1, n, H]`.
    pub fn forward(&self, embeds: &Tensor, state: &mut LlmState) -> Result<Tensor> {
        let (_, n, _) = embeds.dims3()?;
        let past = state.len();
        if past + n > self.max_positions() {
            candle_core::bail!(
                "LLM context of {} positions exceeds the model's {}",
                past + n,
                self.max_positions()
            );
        }
        let cos = self.cos.narrow(0, past, n)?;
        let sin = self.sin.narrow(0, past, n)?;
        // A single new position may attend to everything cached: no mask.
        let mask = if n > 1 {
            Some(causal_mask(n, past, DType::F32, self.device())?)
        } else {
            None
        };
        let mut x = embeds.clone();
        for (layer, cache) in self.layers.iter().zip(&mut state.caches) {
            x = self.layer_forward(layer, &x, cache, &cos, &sin, mask.as_ref())?;
        }
        self.norm.forward(&x)
    }

    /// One decode step of several streams as one batch: row i of `embeds`
    /// `[B, 1, H]` is the next input of the stream whose cache is `states[i]`, at
    /// that cache's own length (its RoPE position). [`Self::forward_batch`] with
    /// one position per stream; returns the final-norm hidden states `[B, 1, H]`.
    pub fn forward_step_batch(
        &self,
        embeds: &Tensor,
        states: &mut [&mut LlmState],
    ) -> Result<Tensor> {
        let (b, n, _) = embeds.dims3()?;
        if n != 1 || b != states.len() {
            candle_core::bail!(
                "batched decode step of {b}×{n} inputs for {} streams",
                states.len()
            );
        }
        let rows = (0..b)
            .map(|i| embeds.narrow(0, i, 1))
            .collect::<Result<Vec<_>>>()?;
        Tensor::cat(&self.forward_batch(&rows, states)?, 0)
    }

    /// Several streams' new positions as one batch: `embeds[i]` `[1, n_i, H]`
    /// goes in at positions `states[i].len()..` of its own cache. The
    /// projections, the MLP and the norms run once over all `Σ n_i` rows, so
    /// every weight matrix is read once for the whole batch; RoPE, the cache
    /// append and attention (causal within a stream's new rows) run per stream
    /// over its own cache. Returns each stream's final-norm hidden states
    /// `[1, n_i, H]`. On an error a stream's caches may hold part of the
    /// batch: the caller truncates them.
    pub fn forward_batch(
        &self,
        embeds: &[Tensor],
        states: &mut [&mut LlmState],
    ) -> Result<Vec<Tensor>> {
        if embeds.len() != states.len() || embeds.is_empty() {
            candle_core::bail!(
                "batched forward of {} inputs for {} streams",
                embeds.len(),
                states.len()
            );
        }
        // Per stream: its rows' offset and count, RoPE rows and causal mask.
        let mut spans = Vec::with_capacity(embeds.len());
        let mut offset = 0;
        for (e, st) in embeds.iter().zip(states.iter()) {
            let n = e.dim(1)?;
            let past = st.len();
            if past + n > self.max_positions() {
                candle_core::bail!(
                    "LLM context of {} positions exceeds the model's {}",
                    past + n,
                    self.max_positions()
                );
            }
            // A single new position may attend to everything cached: no mask.
            let mask = match n {
                1 => None,
                _ => Some(causal_mask(n, past, DType::F32, self.device())?),
            };
            let rope = (self.cos.narrow(0, past, n)?, self.sin.narrow(0, past, n)?);
            spans.push((offset, n, rope, mask));
            offset += n;
        }
        let mut x = Tensor::cat(embeds, 1)?;
        for (i, layer) in self.layers.iter().enumerate() {
            let h = layer.input_layernorm.forward(&x)?;
            let qkv = rows_forward(&layer.qkv, &h)?;
            let mut attended = Vec::with_capacity(spans.len());
            for (st, (off, n, (cos, sin), mask)) in states.iter_mut().zip(&spans) {
                attended.push(self.attend(
                    &qkv.narrow(1, *off, *n)?,
                    &mut st.caches[i],
                    cos,
                    sin,
                    mask.as_ref(),
                )?);
            }
            x = self.layer_tail(layer, &x, &Tensor::cat(&attended, 1)?, true)?;
        }
        let x = self.norm.forward(&x)?;
        spans
            .iter()
            .map(|(off, n, _, _)| x.narrow(1, *off, *n))
            .collect()
    }

    fn layer_forward(
        &self,
        layer: &LlmLayer,
        x: &Tensor,
        cache: &mut KvCache,
        cos: &Tensor,
        sin: &Tensor,
        mask: Option<&Tensor>,
    ) -> Result<Tensor> {
        let h = layer.input_layernorm.forward(x)?;
        let qkv = layer.qkv.forward(&h)?;
        let a = self.attend(&qkv, cache, cos, sin, mask)?;
        self.layer_tail(layer, x, &a, false)
    }

    /// Self-attention of `qkv` `[b, n, (nh + 2·nkv)·hd]` (one stream's rows):
    /// RoPE, the cache append and attention over the whole cache → `[b, n, nh, hd]`.
    fn attend(
        &self,
        qkv: &Tensor,
        cache: &mut KvCache,
        cos: &Tensor,
        sin: &Tensor,
        mask: Option<&Tensor>,
    ) -> Result<Tensor> {
        let (b, n, _) = qkv.dims3()?;
        let (nh, nkv, hd) = (self.num_heads, self.num_kv_heads, self.head_dim);
        let heads = |start: usize, count: usize| -> Result<Tensor> {
            qkv.narrow(2, start, count * hd)?
                .reshape((b, n, count, hd))?
                .transpose(1, 2)?
                .contiguous()
        };
        let q = candle_nn::rotary_emb::rope(&heads(0, nh)?, cos, sin)?;
        let k = candle_nn::rotary_emb::rope(&heads(nh * hd, nkv)?, cos, sin)?;
        let v = heads((nh + nkv) * hd, nkv)?;
        let (k, v) = cache.append(&k, &v)?;
        let scale = (hd as f64).powf(-0.5);
        // Several new positions (a prefill): the fused kernel applies the causal mask
        // itself and reads the cache in place; a single one keeps the matmul path.
        let fused = match mask {
            Some(_) => crate::ops::fast::attention(&q, &k, &v, scale as f32, true, None)?,
            None => None,
        };
        match fused {
            Some(a) => Ok(a),
            None => gqa_attention(&q, &k, &v, nkv, scale, mask),
        }
    }

    /// The rest of a layer after attention `a` `[b, n, nh, hd]`: o_proj and
    /// residual, then the SiLU-gated MLP and residual. `as_rows` runs the
    /// projections over `[b·n, H]` (one GEMM for a decode batch instead of one
    /// per stream).
    fn layer_tail(
        &self,
        layer: &LlmLayer,
        x: &Tensor,
        a: &Tensor,
        as_rows: bool,
    ) -> Result<Tensor> {
        let (b, n, hidden) = x.dims3()?;
        let lin = |l: &Linear, t: &Tensor| {
            if as_rows {
                rows_forward(l, t)
            } else {
                l.forward(t)
            }
        };
        let x = (x + lin(&layer.o_proj, &a.reshape((b, n, hidden))?)?)?;
        let h = layer.post_attention_layernorm.forward(&x)?;
        let gu = lin(&layer.gate_up, &h)?;
        let inter = gu.dim(2)? / 2;
        let act = (gu.narrow(2, 0, inter)?.silu()? * gu.narrow(2, inter, inter)?)?;
        x + lin(&layer.down_proj, &act)?
    }

    /// Vocabulary logits `[B, V]` of hidden states `[B, 1, H]`, one `lm_head`
    /// GEMM for the batch.
    pub fn logits_rows(&self, hidden: &Tensor) -> Result<Tensor> {
        let (b, n, _) = hidden.dims3()?;
        rows_forward(&self.lm_head, hidden)?.reshape((b * n, ()))
    }

    /// Vocabulary logits of the last position of `hidden` `[1, n, H]`: `[V]`.
    /// Only that row goes through `lm_head` (the prefill needs no others).
    pub fn logits_last(&self, hidden: &Tensor) -> Result<Tensor> {
        let n = hidden.dim(1)?;
        self.lm_head
            .forward(&hidden.narrow(1, n - 1, 1)?)?
            .flatten_all()
    }

    /// Logits `[.., V]` of every row of `hidden`.
    pub fn logits(&self, hidden: &Tensor) -> Result<Tensor> {
        self.lm_head.forward(hidden)
    }
}

/// `lin` over `[b, n, K]` as one `[b·n, K]` GEMM: a 3-D input would go
/// through a batched matmul that reads the weights once per batch entry.
fn rows_forward(lin: &Linear, x: &Tensor) -> Result<Tensor> {
    let (b, n, k) = x.dims3()?;
    let y = lin.forward(&x.reshape((b * n, k))?)?;
    let out = y.dim(1)?;
    y.reshape((b, n, out))
}

/// Grouped-query attention without copying keys and values per query head:
/// query head j uses kv head j / rep, so the `rep` query heads of a group are
/// stacked along the sequence axis and share one matmul with their kv head.
/// q `[b, nh, n, hd]`, k/v `[b, nkv, S, hd]` (views of the cache), mask
/// `[n, S]` f32 → `[b, n, nh, hd]`. Scores, mask and softmax in f32.
fn gqa_attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    nkv: usize,
    scale: f64,
    mask: Option<&Tensor>,
) -> Result<Tensor> {
    let (b, nh, n, hd) = q.dims4()?;
    let s = k.dim(2)?;
    let rep = nh / nkv;
    let dtype = q.dtype();
    let q = q.reshape((b, nkv, rep * n, hd))?;
    let scores = (q.matmul(&k.t()?)?.to_dtype(DType::F32)? * scale)?;
    let scores = match mask {
        Some(m) => scores
            .reshape((b, nkv, rep, n, s))?
            .broadcast_add(m)?
            .reshape((b, nkv, rep * n, s))?,
        None => scores,
    };
    let probs = candle_nn::ops::softmax_last_dim(&scores)?.to_dtype(dtype)?;
    probs.matmul(v)?.reshape((b, nh, n, hd))?.transpose(1, 2)
}

/// Index of the largest logit, read back to the host: the one sync per step.
pub fn argmax(logits: &Tensor) -> Result<u32> {
    logits.argmax(D::Minus1)?.to_scalar::<u32>()
}

/// log p of the argmax token, kept on the device: max − logsumexp.
pub(crate) fn max_logprob(logits: &Tensor) -> Result<Tensor> {
    let l = logits.to_dtype(DType::F32)?;
    let max = l.max_keepdim(D::Minus1)?;
    let sum = l.broadcast_sub(&max)?.exp()?.sum_keepdim(D::Minus1)?;
    sum.log()?.neg()?.flatten_all()
}
