//! Whisper text decoder with a self-attention KV cache that grows one token at
//! a time and cross-attention keys/values computed once per audio window.

use crate::model::kv_cache::KvCache;
use crate::model::layers::{
    attention, causal_mask, contiguous_pairs, merge_heads, narrow_positions, splice_cached_pair,
    split_heads, LayerNorm, Linear,
};
use crate::ops::cpu::gelu_erf;
use candle_core::{Result, Tensor};

#[derive(Clone, Debug)]
pub struct DecoderBlock {
    pub self_ln: LayerNorm,
    /// Fused q/k/v projection `[3·d, d]`.
    pub self_qkv: Linear,
    pub self_out: Linear,
    pub cross_ln: LayerNorm,
    pub cross_q: Linear,
    /// Fused k/v projection of the encoder output `[2·d, d]`.
    pub cross_kv: Linear,
    pub cross_out: Linear,
    pub mlp_ln: LayerNorm,
    pub fc1: Linear,
    pub fc2: Linear,
}

#[derive(Clone, Debug)]
pub struct WhisperDecoder {
    pub token_embedding: Tensor,
    /// `[n_text_ctx, d]` learned positions.
    pub positions: Tensor,
    pub blocks: Vec<DecoderBlock>,
    pub ln: LayerNorm,
    pub heads: usize,
    /// Int8 copy of the output projection (the token embedding) for decode steps.
    pub output_int8: Option<std::sync::Arc<crate::ops::quant::QuantMatrix>>,
}

/// Logits recomputed in f32 after the int8 vocabulary projection.
const REFINED_LOGITS: usize = 32;

/// Cross-attention keys and values of one encoded window, per layer.
pub struct CrossAttention {
    layers: Vec<(Tensor, Tensor)>,
}

impl CrossAttention {
    /// Keys and values `[1, h, T, dh]` per layer.
    pub(crate) fn layers(&self) -> &[(Tensor, Tensor)] {
        &self.layers
    }

    /// Positions of the window (T).
    pub fn positions(&self) -> usize {
        self.layers
            .first()
            .map_or(0, |(k, _)| k.dim(2).unwrap_or(0))
    }

    /// The first `n` positions.
    pub fn narrow(&self, n: usize) -> Result<Self> {
        Ok(Self {
            layers: narrow_positions(&self.layers, n)?,
        })
    }

    /// The same positions in tensors of their own (see [`Self::narrow`]).
    pub fn contiguous(&self) -> Result<Self> {
        Ok(Self {
            layers: contiguous_pairs(&self.layers)?,
        })
    }
}

/// Self-attention cache of one decoding pass.
pub struct DecoderState {
    caches: Vec<KvCache>,
}

impl DecoderState {
    pub(crate) fn len(&self) -> usize {
        self.caches.first().map_or(0, KvCache::len)
    }
}

impl WhisperDecoder {
    pub(crate) fn n_text_ctx(&self) -> usize {
        self.positions.dim(0).unwrap_or(0)
    }

    /// Recomputes in f32 the [`REFINED_LOGITS`] largest of each row of int8
    /// logits. The int8 vocabulary projection is off by up to ~0.3 (the
    /// final LayerNorm's outlier channels amplify rounding), never enough to
    /// push the true best token out of the top few: the chosen token and its
    /// close rivals get exact logits; the long tail, which only enters the
    /// softmax normaliser, keeps the approximation.
    fn refine_top_logits(&self, hidden: &Tensor, approx: Tensor) -> Result<Tensor> {
        let h = hidden.to_vec2::<f32>()?;
        let mut rows = approx.to_vec2::<f32>()?;
        let d = h.first().map_or(0, Vec::len);
        // Read the embedding in place: it is 51864×d floats, far too big to copy per step.
        let (storage, layout) = self.token_embedding.storage_and_layout();
        let emb: &[f32] = match (&*storage, layout.contiguous_offsets()) {
            (candle_core::Storage::Cpu(candle_core::CpuStorage::F32(v)), Some((a, b))) => &v[a..b],
            _ => candle_core::bail!("int8 logits need the f32 token embedding on the CPU"),
        };
        for (row, h) in rows.iter_mut().zip(&h) {
            let mut idx: Vec<u32> = (0..row.len() as u32).collect();
            let k = REFINED_LOGITS.min(idx.len());
            if k == 0 {
                continue;
            }
            idx.select_nth_unstable_by(k - 1, |&a, &b| row[b as usize].total_cmp(&row[a as usize]));
            for &t in &idx[..k] {
                let e = &emb[t as usize * d..(t as usize + 1) * d];
                row[t as usize] = e.iter().zip(h).map(|(a, b)| a * b).sum();
            }
        }
        let n = rows.len();
        let v = rows.first().map_or(0, Vec::len);
        Tensor::from_vec(rows.concat(), (n, v), hidden.device())
    }

    /// Int8 weights for single-token steps on the CPU (memory-bound): every
    /// projection of every block and the vocabulary projection. Prefills and
    /// the per-window cross-attention keys/values keep f32.
    pub fn quantize_for_decoding(&mut self) -> Result<()> {
        for b in &mut self.blocks {
            for l in [
                &mut b.self_qkv,
                &mut b.self_out,
                &mut b.cross_q,
                &mut b.cross_out,
                &mut b.fc1,
                &mut b.fc2,
            ] {
                l.quantize_for_decoding()?;
            }
        }
        if self.token_embedding.device().is_cpu() {
            self.output_int8 = Some(std::sync::Arc::new(
                crate::ops::quant::QuantMatrix::from_tensor(&self.token_embedding)?,
            ));
        }
        Ok(())
    }

    pub fn new_state(&self) -> DecoderState {
        DecoderState {
            caches: self.blocks.iter().map(|_| KvCache::new(64)).collect(),
        }
    }

    /// Cross-attention of a window whose positions `c..c + n` are `fresh`
    /// `[1, n, d]`, the first `c` those of `head` (if any), and the rest
    /// those `silent` was computed from (see `WhisperEncoder::forward_after`):
    /// only the fresh rows are projected.
    pub fn cross_attention_after(
        &self,
        head: Option<&CrossAttention>,
        fresh: &Tensor,
        silent: &CrossAttention,
    ) -> Result<CrossAttention> {
        let layers = self
            .cross_attention(fresh)?
            .layers
            .into_iter()
            .zip(&silent.layers)
            .enumerate()
            .map(|(i, ((k, v), whole))| {
                splice_cached_pair(head.map(|h| &h.layers[i]), (&k, &v), whole)
            })
            .collect::<Result<_>>()?;
        Ok(CrossAttention { layers })
    }

    pub fn cross_attention(&self, encoded: &Tensor) -> Result<CrossAttention> {
        let d = encoded.dim(2)?;
        let layers = self
            .blocks
            .iter()
            .map(|b| {
                let kv = b.cross_kv.forward(encoded)?;
                let k = split_heads(&kv.narrow(2, 0, d)?, self.heads)?.contiguous()?;
                let v = split_heads(&kv.narrow(2, d, d)?, self.heads)?.contiguous()?;
                Ok((k, v))
            })
            .collect::<Result<_>>()?;
        Ok(CrossAttention { layers })
    }

    /// Runs `tokens` (appended after what `state` holds) and returns the final
    /// hidden states `[1, n, d]` (after the last LayerNorm).
    pub fn forward_hidden(
        &self,
        tokens: &[u32],
        state: &mut DecoderState,
        cross: &CrossAttention,
    ) -> Result<Tensor> {
        let device = self.token_embedding.device();
        let past = state.len();
        let n = tokens.len();
        if past + n > self.n_text_ctx() {
            candle_core::bail!(
                "decoder context of {} tokens exceeds the model's {}",
                past + n,
                self.n_text_ctx()
            );
        }
        let ids = Tensor::new(tokens, device)?;
        let mut x = self
            .token_embedding
            .index_select(&ids, 0)?
            .add(&self.positions.narrow(0, past, n)?)?
            .unsqueeze(0)?;
        let d = x.dim(2)?;
        let mask = if n > 1 {
            Some(causal_mask(n, past, x.dtype(), device)?)
        } else {
            None
        };
        let scale = ((d / self.heads) as f64).powf(-0.5);
        for ((block, cache), (ck, cv)) in
            self.blocks.iter().zip(&mut state.caches).zip(&cross.layers)
        {
            let h = block.self_ln.forward(&x)?;
            let qkv = block.self_qkv.forward(&h)?;
            let q = split_heads(&qkv.narrow(2, 0, d)?, self.heads)?.contiguous()?;
            let k = split_heads(&qkv.narrow(2, d, d)?, self.heads)?;
            let v = split_heads(&qkv.narrow(2, 2 * d, d)?, self.heads)?;
            let (k, v) = cache.append(&k, &v)?;
            let a = attention(&q, &k, &v, scale, mask.as_ref())?;
            x = (x + block.self_out.forward(&merge_heads(&a)?)?)?;

            let h = block.cross_ln.forward(&x)?;
            let q = split_heads(&block.cross_q.forward(&h)?, self.heads)?.contiguous()?;
            let a = attention(&q, ck, cv, scale, None)?;
            x = (x + block.cross_out.forward(&merge_heads(&a)?)?)?;

            let h = block.mlp_ln.forward(&x)?;
            let h = block.fc2.forward(&gelu_erf(&block.fc1.forward(&h)?)?)?;
            x = (x + h)?;
        }
        self.ln.forward(&x)
    }

    /// One decode step of several streams: `tokens[i]` is appended after
    /// what `states[i]` holds and attends to `cross[i]`. Returns the final
    /// hidden states `[B, 1, d]`.
    ///
    /// Every projection runs once over the batch's rows (in groups of at
    /// most [`crate::ops::quant::MAX_ROWS`], so each row takes the same int8
    /// path as a lone step and gets the same bits); embeddings, positions
    /// and attention are each stream's own.
    pub fn step_batch(
        &self,
        tokens: &[u32],
        states: &mut [&mut DecoderState],
        cross: &[&CrossAttention],
    ) -> Result<Tensor> {
        let device = self.token_embedding.device();
        let b = tokens.len();
        if states.len() != b || cross.len() != b {
            candle_core::bail!(
                "a batch step needs one state and one window per token ({b}, {}, {})",
                states.len(),
                cross.len()
            );
        }
        let mut positions = Vec::with_capacity(b);
        for s in states.iter() {
            if s.len() + 1 > self.n_text_ctx() {
                candle_core::bail!(
                    "decoder context of {} tokens exceeds the model's {}",
                    s.len() + 1,
                    self.n_text_ctx()
                );
            }
            positions.push(s.len() as u32);
        }
        let ids = Tensor::new(tokens, device)?;
        let at = Tensor::new(positions.as_slice(), device)?;
        let mut x = self
            .token_embedding
            .index_select(&ids, 0)?
            .add(&self.positions.index_select(&at, 0)?)?
            .unsqueeze(1)?;
        let d = x.dim(2)?;
        let scale = ((d / self.heads) as f64).powf(-0.5);
        for (l, block) in self.blocks.iter().enumerate() {
            let h = block.self_ln.forward(&x)?;
            let qkv = forward_rows(&block.self_qkv, &h)?;
            let q = split_heads(&qkv.narrow(2, 0, d)?, self.heads)?;
            let k = split_heads(&qkv.narrow(2, d, d)?, self.heads)?;
            let v = split_heads(&qkv.narrow(2, 2 * d, d)?, self.heads)?;
            let mut heads = Vec::with_capacity(b);
            for (i, state) in states.iter_mut().enumerate() {
                let (k, v) = state.caches[l].append(&k.narrow(0, i, 1)?, &v.narrow(0, i, 1)?)?;
                let q = q.narrow(0, i, 1)?.contiguous()?;
                heads.push(attention(&q, &k, &v, scale, None)?);
            }
            let a = merge_heads(&Tensor::cat(&heads, 0)?)?;
            x = (x + forward_rows(&block.self_out, &a)?)?;

            let h = block.cross_ln.forward(&x)?;
            let q = split_heads(&forward_rows(&block.cross_q, &h)?, self.heads)?;
            let mut heads = Vec::with_capacity(b);
            for (i, window) in cross.iter().enumerate() {
                let (ck, cv) = &window.layers[l];
                let q = q.narrow(0, i, 1)?.contiguous()?;
                heads.push(attention(&q, ck, cv, scale, None)?);
            }
            let a = merge_heads(&Tensor::cat(&heads, 0)?)?;
            x = (x + forward_rows(&block.cross_out, &a)?)?;

            let h = block.mlp_ln.forward(&x)?;
            let h = forward_rows(&block.fc2, &gelu_erf(&forward_rows(&block.fc1, &h)?)?)?;
            x = (x + h)?;
        }
        self.ln.forward(&x)
    }

    /// Logits `[B, vocab]` of a batch step's hidden states `[B, 1, d]`, in
    /// groups of rows that each take the same path as a lone step's row.
    pub fn step_logits(&self, hidden: &Tensor) -> Result<Tensor> {
        let (b, _, d) = hidden.dims3()?;
        if !hidden.device().is_cpu() {
            // No int8 path off the CPU: one product for the whole batch.
            return self.logits_of_rows(&hidden.reshape((b, d))?);
        }
        let rows = hidden.reshape((1, b, d))?;
        let groups = (0..b)
            .step_by(crate::ops::quant::MAX_ROWS)
            .map(|start| {
                let n = crate::ops::quant::MAX_ROWS.min(b - start);
                let group = rows.narrow(1, start, n)?;
                self.logits(&group, &(0..n).collect::<Vec<_>>())
            })
            .collect::<Result<Vec<_>>>()?;
        Tensor::cat(&groups, 0)
    }

    /// Vocabulary logits `[rows, vocab]` of selected hidden rows (the output
    /// projection is the transposed token embedding).
    pub fn logits(&self, hidden: &Tensor, rows: &[usize]) -> Result<Tensor> {
        let h = hidden.squeeze(0)?;
        let idx = Tensor::new(
            rows.iter()
                .map(|&r| r as u32)
                .collect::<Vec<_>>()
                .as_slice(),
            h.device(),
        )?;
        let sel = h.index_select(&idx, 0)?;
        match &self.output_int8 {
            Some(q)
                if rows.len() <= crate::ops::quant::MAX_ROWS
                    && sel.device().is_cpu()
                    && sel.dtype() == candle_core::DType::F32 =>
            {
                let approx = crate::ops::quant::matmul_t(q, &sel, None)?;
                self.refine_top_logits(&sel, approx)
            }
            _ => sel.matmul(&self.token_embedding.t()?),
        }
    }
}

/// `linear` over the rows of `x` `[B, 1, d]` in groups of at most
/// [`crate::ops::quant::MAX_ROWS`]: the int8 kernel computes each row on
/// its own, so a row's result does not depend on the batch around it.
fn forward_rows(linear: &Linear, x: &Tensor) -> Result<Tensor> {
    let b = x.dim(0)?;
    if b <= crate::ops::quant::MAX_ROWS {
        return linear.forward(x);
    }
    let groups = (0..b)
        .step_by(crate::ops::quant::MAX_ROWS)
        .map(|start| {
            linear.forward(&x.narrow(0, start, crate::ops::quant::MAX_ROWS.min(b - start))?)
        })
        .collect::<Result<Vec<_>>>()?;
    Tensor::cat(&groups, 0)
}
