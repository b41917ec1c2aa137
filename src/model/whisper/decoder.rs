//! Whisper text decoder with a self-attention KV cache that grows one token at
//! a time and cross-attention keys/values computed once per audio window.

use crate::model::cpu_ops::gelu_erf;
use crate::model::kv_cache::KvCache;
use crate::model::layers::{attention, causal_mask, merge_heads, split_heads, LayerNorm, Linear};
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
}

/// Cross-attention keys and values of one encoded window, per layer.
pub struct CrossAttention {
    layers: Vec<(Tensor, Tensor)>,
}

/// Self-attention cache of one decoding pass.
pub struct DecoderState {
    caches: Vec<KvCache>,
}

impl DecoderState {
    pub fn len(&self) -> usize {
        self.caches.first().map_or(0, KvCache::len)
    }
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
    pub fn truncate(&mut self, len: usize) {
        self.caches.iter_mut().for_each(|c| c.truncate(len));
    }
}

impl WhisperDecoder {
    pub fn n_text_ctx(&self) -> usize {
        self.positions.dim(0).unwrap_or(0)
    }

    pub fn vocab_size(&self) -> usize {
        self.token_embedding.dim(0).unwrap_or(0)
    }

    pub fn new_state(&self) -> DecoderState {
        DecoderState {
            caches: self.blocks.iter().map(|_| KvCache::new(64)).collect(),
        }
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
        sel.matmul(&self.token_embedding.t()?)
    }
}
