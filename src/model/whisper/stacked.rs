//! Whisper's batched decode on a GPU: every window's prompt in one padded
//! prefill, then one step for all rows at a time. The rows' self-attention
//! caches and cross-attention windows are stacked along the batch axis, so a
//! layer's attention is one launch for the whole batch (the fused kernel
//! where it applies) instead of several per stream, and nothing goes back
//! to the host inside a step. On the CPU the per-row path of
//! `WhisperDecoder::step_batch` stays (int8 weights; a row's bits do not
//! depend on the batch around it).
//!
//! Without timestamps a step goes through the fused kernels of
//! `ops/cuda/whisper_step.rs` where they apply ([`WhisperDecoder::fused_stacked_step`]:
//! one CUDA graph launch, the picks made on the device).
//!
//! Prompts differ in length, so each row's prompt is right-aligned to end
//! at the same column and the columns before it are masked out of its
//! attention (Whisper's positions are added to the input embeddings, so
//! where a key sits in the cache does not matter); every step then writes
//! all rows' keys and values into one column.

use super::decoder::{CrossAttention, DecoderBlock, WhisperDecoder};
use crate::model::layers::{causal_mask, merge_heads, LayerNorm, Linear};
use crate::model::step_audio2::encoder::{
    layer_norm, linear, linear_gelu, linear_residual, linear_residual_norm,
};
use crate::ops::fast::{WhisperFusedStep, WhisperStepLayer, WhisperStepRows, WhisperStepWeights};
use candle_core::{DType, Device, Result, Tensor};

/// Added to the scores of a row's padding columns. Finite, so that a
/// padding query, which sees nothing else, keeps finite states.
const PAD_BIAS: f32 = -1.0e10;

/// Batches of single-token steps up to this many rows take the fused
/// attention kernel (see [`attend`]).
const FUSED_STEP_ROWS: usize = 16;

/// The stacked decoder state of a batch of windows (rows).
pub struct StackedDecode {
    /// Per layer: self-attention keys and values `[R, h, capacity, dh]`.
    self_kv: Vec<(Tensor, Tensor)>,
    /// Per layer: cross-attention keys and values `[R, h, T, dh]`.
    cross: Vec<(Tensor, Tensor)>,
    /// `[R, capacity]` f32: [`PAD_BIAS`] on a row's columns before its
    /// prompt, 0 from there on.
    key_bias: Tensor,
    /// Per row: the column of its first prompt token.
    start: Vec<usize>,
    /// Columns written, the same for every row.
    len: usize,
    capacity: usize,
}

impl StackedDecode {
    pub fn rows(&self) -> usize {
        self.start.len()
    }

    /// Columns written so far (the longest prompt plus the steps taken).
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The column of row `row`'s prompt token `i`.
    pub fn column(&self, row: usize, i: usize) -> usize {
        self.start[row] + i
    }

    /// Keeps only the rows `keep` (indices of the current rows, in the
    /// order given): one gather of every stacked tensor.
    pub fn retain(&mut self, keep: &[usize]) -> Result<()> {
        if keep.len() == self.rows() && keep.iter().enumerate().all(|(i, &k)| i == k) {
            return Ok(());
        }
        if let Some(&bad) = keep.iter().find(|&&k| k >= self.rows()) {
            candle_core::bail!("row {bad} kept from a batch of {}", self.rows());
        }
        let ids: Vec<u32> = keep.iter().map(|&k| k as u32).collect();
        let ids = Tensor::new(ids.as_slice(), self.key_bias.device())?;
        let pick = |t: &Tensor| t.index_select(&ids, 0);
        for (k, v) in self.self_kv.iter_mut().chain(self.cross.iter_mut()) {
            *k = pick(k)?;
            *v = pick(v)?;
        }
        self.key_bias = pick(&self.key_bias)?;
        self.start = keep.iter().map(|&k| self.start[k]).collect();
        Ok(())
    }
}

impl WhisperDecoder {
    /// Runs every row's `prompts[r]` (attending to `cross[r]`, all of the
    /// same length) in one padded pass and returns the stacked state, with
    /// room for `steps` more tokens per row, and the final hidden states
    /// `[R, P, d]` (P the longest prompt; row r's token i is at column
    /// [`StackedDecode::column`]).
    pub fn stacked_prefill(
        &self,
        prompts: &[&[u32]],
        cross: &[&CrossAttention],
        steps: usize,
    ) -> Result<(StackedDecode, Tensor)> {
        let rows = prompts.len();
        if rows == 0 || cross.len() != rows {
            candle_core::bail!(
                "a stacked prefill needs one window per prompt ({rows} prompts, {} windows)",
                cross.len()
            );
        }
        let width = prompts.iter().map(|p| p.len()).max().unwrap_or(0);
        if width == 0 || prompts.iter().any(|p| p.is_empty()) {
            candle_core::bail!("a stacked prefill needs a non-empty prompt per row");
        }
        if let Some(p) = prompts.iter().find(|p| p.len() > self.n_text_ctx()) {
            candle_core::bail!(
                "decoder context of {} tokens exceeds the model's {}",
                p.len(),
                self.n_text_ctx()
            );
        }
        let device = self.token_embedding.device().clone();
        let dtype = self.token_embedding.dtype();
        let capacity = width + steps;
        let start: Vec<usize> = prompts.iter().map(|p| width - p.len()).collect();

        // Padding columns take the row's first token at position 0: an
        // ordinary input, so their (masked) states stay finite.
        let mut ids = Vec::with_capacity(rows * width);
        let mut positions = Vec::with_capacity(rows * width);
        for (p, &s) in prompts.iter().zip(&start) {
            ids.extend(std::iter::repeat_n(p[0], s).chain(p.iter().copied()));
            positions.extend(std::iter::repeat_n(0u32, s).chain(0..p.len() as u32));
        }
        let bias: Vec<f32> = start
            .iter()
            .flat_map(|&s| (0..capacity).map(move |c| if c < s { PAD_BIAS } else { 0.0 }))
            .collect();
        let key_bias = Tensor::from_vec(bias, (rows, capacity), &device)?;

        let (h, dh) = (self.heads, self.token_embedding.dim(1)? / self.heads);
        let mut self_kv = Vec::with_capacity(self.blocks.len());
        let mut stacked_cross = Vec::with_capacity(self.blocks.len());
        for l in 0..self.blocks.len() {
            let alloc = || Tensor::zeros((rows, h, capacity, dh), dtype, &device);
            self_kv.push((alloc()?, alloc()?));
            let ks: Vec<&Tensor> = cross.iter().map(|c| &c.layers()[l].0).collect();
            let vs: Vec<&Tensor> = cross.iter().map(|c| &c.layers()[l].1).collect();
            stacked_cross.push((Tensor::cat(&ks, 0)?, Tensor::cat(&vs, 0)?));
        }
        let mut state = StackedDecode {
            self_kv,
            cross: stacked_cross,
            key_bias,
            start,
            len: 0,
            capacity,
        };
        let hidden = self.stacked_forward(&mut state, &ids, &positions, width, &device)?;
        Ok((state, hidden))
    }

    /// One step of every row: `tokens[r]` goes after what row r holds.
    /// Returns the final hidden states `[R, 1, d]`.
    pub fn stacked_step(&self, state: &mut StackedDecode, tokens: &[u32]) -> Result<Tensor> {
        if tokens.len() != state.rows() {
            candle_core::bail!(
                "a stacked step needs one token per row ({} tokens, {} rows)",
                tokens.len(),
                state.rows()
            );
        }
        if state.len >= state.capacity {
            candle_core::bail!("stacked decode state full ({} columns)", state.capacity);
        }
        let positions = self.step_positions(state);
        let device = self.token_embedding.device().clone();
        self.stacked_forward(state, tokens, &positions, 1, &device)
    }

    /// What the fused step reads of this decoder (shared tensors), or `None` when a
    /// projection has no bias or the norms' epsilons differ (the kernels assume both).
    pub fn step_weights(&self) -> Option<WhisperStepWeights> {
        let lin = |l: &Linear| Some((l.weight.clone(), l.bias.clone()?));
        let norm =
            |n: &LayerNorm| (n.eps == self.ln.eps).then(|| (n.gamma.clone(), n.beta.clone()));
        let layers = self
            .blocks
            .iter()
            .map(|b| {
                Some(WhisperStepLayer {
                    self_norm: norm(&b.self_ln)?,
                    self_qkv: lin(&b.self_qkv)?,
                    self_out: lin(&b.self_out)?,
                    cross_norm: norm(&b.cross_ln)?,
                    cross_q: lin(&b.cross_q)?,
                    cross_out: lin(&b.cross_out)?,
                    mlp_norm: norm(&b.mlp_ln)?,
                    fc1: lin(&b.fc1)?,
                    fc2: lin(&b.fc2)?,
                })
            })
            .collect::<Option<Vec<_>>>()?;
        Some(WhisperStepWeights {
            token_embedding: self.token_embedding.clone(),
            positions: self.positions.clone(),
            layers,
            final_norm: (self.ln.gamma.clone(), self.ln.beta.clone()),
            eps: self.ln.eps,
            heads: self.heads,
        })
    }

    /// [`Self::stacked_step`] through the fused step (`fused`, over `weights`
    /// from [`Self::step_weights`], made once per decode), the logits,
    /// `suppress` (`[V]` f32, added to them) and the argmax included: each row's
    /// greedy next token and its log-probability. `None` (the state untouched)
    /// where the fused step does not apply.
    pub fn fused_stacked_step(
        &self,
        fused: &mut WhisperFusedStep,
        weights: &WhisperStepWeights,
        state: &mut StackedDecode,
        tokens: &[u32],
        suppress: &Tensor,
    ) -> Result<Option<Vec<(u32, f32)>>> {
        let laid_out = |t: &Tensor| t.is_contiguous() && t.dtype() == DType::BF16;
        let fits = tokens.len() == state.rows()
            && state.len < state.capacity
            && suppress.is_contiguous()
            && state
                .self_kv
                .iter()
                .chain(&state.cross)
                .all(|(k, v)| laid_out(k) && laid_out(v));
        if !fits {
            return Ok(None);
        }
        let positions = self.step_positions(state);
        let rows = WhisperStepRows {
            self_kv: &state.self_kv,
            cross: &state.cross,
            tokens,
            positions: &positions,
            first: &state.start,
            column: state.len,
            suppress,
        };
        let picks = fused.step(weights, &rows)?;
        if picks.is_some() {
            state.len += 1;
        }
        Ok(picks)
    }

    /// Each row's learned position at the next step. A row's budget keeps it
    /// inside the text context; a finished row that still steps (its results
    /// dropped) may run past it and reads the last position instead.
    fn step_positions(&self, state: &StackedDecode) -> Vec<u32> {
        let last = self.n_text_ctx().saturating_sub(1);
        state
            .start
            .iter()
            .map(|&s| (state.len - s).min(last) as u32)
            .collect()
    }

    /// `n` new columns per row (`ids` and `positions` row-major `[R, n]`).
    fn stacked_forward(
        &self,
        state: &mut StackedDecode,
        ids: &[u32],
        positions: &[u32],
        n: usize,
        device: &Device,
    ) -> Result<Tensor> {
        let rows = state.rows();
        let ids = Tensor::new(ids, device)?;
        let at = Tensor::new(positions, device)?;
        let d = self.token_embedding.dim(1)?;
        let mut x = self
            .token_embedding
            .index_select(&ids, 0)?
            .add(&self.positions.index_select(&at, 0)?)?
            .reshape((rows, n, d))?;
        let total = state.len + n;
        // One contiguous copy per call, shared by the layers.
        let bias = state.key_bias.narrow(1, 0, total)?.contiguous()?;
        for (l, block) in self.blocks.iter().enumerate() {
            x = self.stacked_layer(block, l, &x, state, &bias)?;
        }
        state.len = total;
        layer_norm(&self.ln, &x)
    }

    fn stacked_layer(
        &self,
        block: &DecoderBlock,
        l: usize,
        x: &Tensor,
        state: &StackedDecode,
        bias: &Tensor,
    ) -> Result<Tensor> {
        let (rows, n, d) = x.dims3()?;
        let heads = self.heads;
        let dh = d / heads;
        let scale = (dh as f32).powf(-0.5);
        let total = state.len + n;

        let h = layer_norm(&block.self_ln, x)?;
        let qkv = linear(&block.self_qkv, &h)?.reshape((rows, n, 3, heads, dh))?;
        // [R, h, n, dh] views of the fused projection
        let part =
            |i: usize| -> Result<Tensor> { qkv.narrow(2, i, 1)?.squeeze(2)?.transpose(1, 2) };
        let (ck, cv) = &state.self_kv[l];
        ck.slice_set(&part(1)?.contiguous()?, 2, state.len)?;
        cv.slice_set(&part(2)?.contiguous()?, 2, state.len)?;
        let a = attend(
            &part(0)?,
            &ck.narrow(2, 0, total)?,
            &cv.narrow(2, 0, total)?,
            scale,
            n > 1,
            Some(bias),
        )?;
        let (x, h) = linear_residual_norm(&block.self_out, &a, x, &block.cross_ln)?;

        let q = linear(&block.cross_q, &h)?
            .reshape((rows, n, heads, dh))?
            .transpose(1, 2)?;
        let (xk, xv) = &state.cross[l];
        let a = attend(&q, xk, xv, scale, false, None)?;
        let (x, h) = linear_residual_norm(&block.cross_out, &a, &x, &block.mlp_ln)?;
        let h = linear_gelu(&block.fc1, &h)?;
        linear_residual(&block.fc2, &h, &x)
    }

    /// Vocabulary logits `[n, vocab]` of hidden rows `[n, d]`, one product
    /// (cuBLAS directly where it applies).
    pub fn logits_of_rows(&self, rows: &Tensor) -> Result<Tensor> {
        match crate::ops::fast::matmul_t(rows, &self.token_embedding)? {
            Some(l) => Ok(l),
            None => rows.matmul(&self.token_embedding.t()?),
        }
    }

    /// Logits `[picks, vocab]` of the hidden states `[R, P, d]` at the
    /// (row, column) pairs `picks`, in one gather and one product.
    pub fn stacked_logits(&self, hidden: &Tensor, picks: &[(usize, usize)]) -> Result<Tensor> {
        let (rows, width, d) = hidden.dims3()?;
        if let Some(&(r, c)) = picks.iter().find(|&&(r, c)| r >= rows || c >= width) {
            candle_core::bail!("logits at ({r}, {c}) of hidden states [{rows}, {width}, ·]");
        }
        let idx: Vec<u32> = picks.iter().map(|&(r, c)| (r * width + c) as u32).collect();
        let idx = Tensor::new(idx.as_slice(), hidden.device())?;
        let sel = hidden.reshape((rows * width, d))?.index_select(&idx, 0)?;
        self.logits_of_rows(&sel)
    }
}

/// Attention of `q` `[R, h, n, dh]` over `k`, `v` `[R, h, nk, dh]` (views
/// are read in place by the fused kernel), with the key bias `[R, nk]`
/// (f32) and, for `causal`, query i seeing keys up to `nk − n + i`:
/// `[R, n, h·dh]`.
fn attend(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    scale: f32,
    causal: bool,
    bias: Option<&Tensor>,
) -> Result<Tensor> {
    let (rows, heads, n, dh) = q.dims4()?;
    // The fused kernel computes 128 query rows per block: for one query row
    // of many windows the unfused path is faster (H200, large-v3-turbo
    // shape, whole step: 3.02 vs 2.27 ms at 64 rows, 9.94 vs 5.58 at 256;
    // 1.05 vs 1.11 at 8).
    let fused = n > 1 || rows <= FUSED_STEP_ROWS;
    if let Some(a) = fused
        .then(|| crate::ops::fast::attention(q, k, v, scale, causal, bias))
        .transpose()?
        .flatten()
    {
        return a.reshape((rows, n, heads * dh));
    }
    let nk = k.dim(2)?;
    let scores = (q.contiguous()?.matmul(&k.t()?)? * scale as f64)?.to_dtype(DType::F32)?;
    let scores = if causal {
        scores.broadcast_add(&causal_mask(n, nk - n, DType::F32, q.device())?)?
    } else {
        scores
    };
    let scores = match bias {
        Some(b) => scores.broadcast_add(&b.reshape((rows, 1, 1, nk))?)?,
        None => scores,
    };
    let probs = candle_nn::ops::softmax_last_dim(&scores)?.to_dtype(q.dtype())?;
    merge_heads(&probs.matmul(v)?)
}
