//! Step-Audio 2 audio encoder: Whisper-style conv stem and pre-norm blocks
//! (OpenAI naming in the checkpoint), then average pooling over pairs of
//! frames and `after_norm`.
//!
//! Padding and masking follow the published inference code, because that is
//! what the weights were used with: a batch of mels is zero-padded on the
//! right to the longest length T, each entry's valid mel length is L_i − 2,
//! and the attention key mask keeps every second entry of the per-mel-frame
//! mask starting at (T + 1) % 2, adding −1e10 to the scores of invalid keys.
//! For a batch of one this masks exactly the last conv2 frame.

use crate::model::layers::{merge_heads, split_heads, Conv1d, LayerNorm, Linear};
use candle_core::{DType, Device, Result, Tensor};

/// Added to the attention scores of padded keys (the published value; not
/// −inf, so a fully masked row stays finite).
pub(crate) const KEY_MASK_VALUE: f32 = -1.0e10;

#[derive(Clone, Debug)]
pub struct EncoderBlock {
    pub attn_ln: LayerNorm,
    /// `query` (bias), `key` (no bias: a zero bias here) and `value` (bias)
    /// fused into one `[3·d, d]` projection, so a block does one GEMM for them.
    pub qkv: Linear,
    pub out: Linear,
    pub mlp_ln: LayerNorm,
    pub fc1: Linear,
    pub fc2: Linear,
}

impl EncoderBlock {
    fn forward(&self, x: &Tensor, heads: usize, key_bias: &Tensor) -> Result<Tensor> {
        let h = layer_norm(&self.attn_ln, x)?;
        let qkv = linear(&self.qkv, &h)?;
        let a = self.attention(&qkv, heads, key_bias)?;
        self.finish(x, &a)
    }

    /// Multi-head attention over the fused projection `qkv` `[b, t, 3d]` with the key
    /// bias `[b, 1, 1, t]` (f32): `[b, t, d]`. The fused kernel where it applies.
    pub fn attention(&self, qkv: &Tensor, heads: usize, key_bias: &Tensor) -> Result<Tensor> {
        if let Some(a) = fused_attention(qkv, heads, key_bias)? {
            return Ok(a);
        }
        let d = qkv.dim(2)? / 3;
        let dtype = qkv.dtype();
        // q and k are each scaled by head_dim^-1/4 before the product, as
        // published; it also keeps f16/bf16 scores in range.
        let scale = ((d / heads) as f64).powf(-0.25);
        let q = (split_heads(&qkv.narrow(2, 0, d)?, heads)? * scale)?;
        let k = (split_heads(&qkv.narrow(2, d, d)?, heads)? * scale)?;
        let v = split_heads(&qkv.narrow(2, 2 * d, d)?, heads)?.contiguous()?;
        // The mask is added and the softmax taken in f32 so −1e10 stays finite
        // whatever the model dtype.
        let scores = q.matmul(&k.t()?)?.to_dtype(DType::F32)?;
        let scores = scores.broadcast_add(key_bias)?;
        let probs = candle_nn::ops::softmax_last_dim(&scores)?.to_dtype(dtype)?;
        merge_heads(&probs.matmul(&v)?)
    }

    /// Output projection, residual and MLP after the attention `a` `[b, t, d]`.
    pub fn finish(&self, x: &Tensor, a: &Tensor) -> Result<Tensor> {
        let (x, h) = linear_residual_norm(&self.out, a, x, &self.mlp_ln)?;
        let h = linear_gelu(&self.fc1, &h)?;
        linear_residual(&self.fc2, &h, &x)
    }
}

/// LayerNorm through the one-warp-per-row kernel where it applies.
pub fn layer_norm(ln: &LayerNorm, x: &Tensor) -> Result<Tensor> {
    match crate::ops::fast::layer_norm(x, &ln.gamma, &ln.beta, ln.eps)? {
        Some(h) => Ok(h),
        None => ln.forward(x),
    }
}

/// `x' = resid + (a W^T + b)` and `ln(x')`: the residual stream and the next sublayer's
/// input, in one pass over the rows where a kernel exists.
pub fn linear_residual_norm(
    l: &Linear,
    a: &Tensor,
    resid: &Tensor,
    ln: &LayerNorm,
) -> Result<(Tensor, Tensor)> {
    if let Some(b) = &l.bias {
        let y = project(l, a)?;
        if let Some(pair) =
            crate::ops::fast::bias_residual_layer_norm(&y, b, resid, &ln.gamma, &ln.beta, ln.eps)?
        {
            return Ok(pair);
        }
        let x = match crate::ops::fast::bias_residual(&y, b, resid)? {
            Some(v) => v,
            None => (resid + y.broadcast_add(b)?)?,
        };
        let h = ln.forward(&x)?;
        return Ok((x, h));
    }
    let x = linear_residual(l, a, resid)?;
    let h = ln.forward(&x)?;
    Ok((x, h))
}

/// `x W^T` through the device's fast GEMM where there is one, else candle's matmul.
pub(crate) fn project(l: &Linear, x: &Tensor) -> Result<Tensor> {
    match crate::ops::fast::matmul_t(x, &l.weight)? {
        Some(y) => Ok(y),
        None => x.broadcast_matmul(&l.weight.t()?),
    }
}

pub fn linear(l: &Linear, x: &Tensor) -> Result<Tensor> {
    let y = project(l, x)?;
    let Some(b) = &l.bias else { return Ok(y) };
    match crate::ops::fast::bias_add(&y, b)? {
        Some(v) => Ok(v),
        None => y.broadcast_add(b),
    }
}

/// `gelu_erf(x W^T + b)`, the bias and GELU in one pass where a kernel exists.
pub fn linear_gelu(l: &Linear, x: &Tensor) -> Result<Tensor> {
    let y = project(l, x)?;
    let Some(b) = &l.bias else {
        return y.gelu_erf();
    };
    match crate::ops::fast::bias_gelu(&y, b)? {
        Some(v) => Ok(v),
        None => y.broadcast_add(b)?.gelu_erf(),
    }
}

/// `resid + (x W^T + b)`, the bias and the residual in one pass where a kernel exists.
pub fn linear_residual(l: &Linear, x: &Tensor, resid: &Tensor) -> Result<Tensor> {
    let y = project(l, x)?;
    let Some(b) = &l.bias else { return resid + y };
    match crate::ops::fast::bias_residual(&y, b, resid)? {
        Some(v) => Ok(v),
        None => resid + y.broadcast_add(b)?,
    }
}

/// The block's attention through the fused kernel, reading q, k and v as strided views
/// of the fused projection `[b, t, 3d]` (no copies); the two head_dim^-1/4 factors
/// become one head_dim^-1/2 on the scores. `None` when the kernel does not apply.
fn fused_attention(qkv: &Tensor, heads: usize, key_bias: &Tensor) -> Result<Option<Tensor>> {
    let (b, t, d3) = qkv.dims3()?;
    let d = d3 / 3;
    let hd = d / heads;
    // [b, t, 3, h, hd] → three [b, h, t, hd] views
    let parts = qkv.reshape((b, t, 3, heads, hd))?;
    let view = |i: usize| -> Result<Tensor> { parts.narrow(2, i, 1)?.squeeze(2)?.transpose(1, 2) };
    let scale = (hd as f32).powf(-0.5);
    let out = crate::ops::fast::attention(
        &view(0)?,
        &view(1)?,
        &view(2)?,
        scale,
        false,
        Some(key_bias),
    )?;
    out.map(|a| a.reshape((b, t, d))).transpose()
}

#[derive(Clone, Debug)]
pub struct AudioEncoder {
    pub conv1: Conv1d,
    pub conv2: Conv1d,
    /// Learned `[n_audio_ctx, d]` positions.
    pub positions: Tensor,
    pub blocks: Vec<EncoderBlock>,
    pub after_norm: LayerNorm,
    pub heads: usize,
}

/// What the encoder hands to the adapter.
#[derive(Clone, Debug)]
pub struct EncoderOutput {
    /// `[B, P, d]` after pooling and `after_norm`: all P = T2 // 2 rows of
    /// every batch entry, padded ones included (the adapter runs on all).
    pub out: Tensor,
    /// E_i = ((L_i − 2) + 1) // 2 // 2 valid rows per entry.
    pub valid_len: Vec<usize>,
    /// Key validity over the T2 conv2 frames, per entry (what was masked).
    pub key_valid: Vec<Vec<bool>>,
    /// T, the padded mel length of the batch.
    pub padded_len: usize,
}

/// The published key mask for mels of lengths `mel_lens` padded to `padded`:
/// frame t of entry b is valid iff t < L_b − 2; conv2 frame j stands for mel
/// frame (T + 1) % 2 + 2j.
pub fn key_mask(mel_lens: &[usize], padded: usize) -> Vec<Vec<bool>> {
    let t2 = padded.div_ceil(2);
    let start = (padded + 1) % 2;
    mel_lens
        .iter()
        .map(|&l| {
            let valid = l.saturating_sub(2);
            (0..t2).map(|j| start + 2 * j < valid).collect()
        })
        .collect()
}

impl AudioEncoder {
    /// Encodes a batch of mels `[B, n_mels, T]`, zero-padded on the right to
    /// T, whose unpadded lengths are `mel_lens` (frames).
    pub fn forward(&self, mels: &Tensor, mel_lens: &[usize]) -> Result<EncoderOutput> {
        let (b, _, t) = mels.dims3()?;
        if mel_lens.len() != b {
            candle_core::bail!("{} mel lengths for a batch of {b}", mel_lens.len());
        }
        if let Some(&l) = mel_lens.iter().find(|&&l| l > t) {
            candle_core::bail!("mel length {l} exceeds the padded length {t}");
        }
        let x = self.conv1.forward(mels)?.gelu_erf()?;
        let x = self.conv2.forward(&x)?.gelu_erf()?;
        let x = x.transpose(1, 2)?;
        let t2 = x.dim(1)?;
        let max = self.positions.dim(0)?;
        if t2 > max {
            candle_core::bail!(
                "encoder input of {t2} frames after conv2 exceeds the model's {max} positions"
            );
        }
        let mut x = x.broadcast_add(&self.positions.narrow(0, 0, t2)?)?;

        let key_valid = key_mask(mel_lens, t);
        debug_assert!(key_valid.iter().all(|k| k.len() == t2));
        let key_bias = key_bias_tensor(&key_valid, x.device())?;
        for block in &self.blocks {
            x = block.forward(&x, self.heads, &key_bias)?;
        }
        // AvgPool1d(2, 2) over time: the mean of frames 2i and 2i + 1; an odd
        // last frame is dropped.
        let p = t2 / 2;
        let d = x.dim(2)?;
        let pooled = (x.narrow(1, 0, 2 * p)?.reshape((b, p, 2, d))?.sum(2)? * 0.5)?;
        let out = self.after_norm.forward(&pooled)?;
        Ok(EncoderOutput {
            out,
            valid_len: mel_lens
                .iter()
                .map(|&l| super::config::encoder_valid_len(l))
                .collect(),
            key_valid,
            padded_len: t,
        })
    }
}

/// `[B, 1, 1, T2]` f32: 0 for valid keys, −1e10 for padded ones.
pub fn key_bias_tensor(key_valid: &[Vec<bool>], device: &Device) -> Result<Tensor> {
    let b = key_valid.len();
    let t2 = key_valid.first().map_or(0, Vec::len);
    let data: Vec<f32> = key_valid
        .iter()
        .flat_map(|k| k.iter().map(|&v| if v { 0.0 } else { KEY_MASK_VALUE }))
        .collect();
    Tensor::from_vec(data, (b, 1, 1, t2), device)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn single_mel_masks_only_the_last_conv2_frame() {
        for l in [3usize, 4, 111, 112, 201, 202, 2502] {
            let k = &key_mask(&[l], l)[0];
            assert_eq!(k.len(), l.div_ceil(2));
            assert!(!k[k.len() - 1], "L={l}");
            assert!(k[..k.len() - 1].iter().all(|&v| v), "L={l}");
        }
    }

    #[test]
    fn batched_mask_parity_comes_from_the_padded_length() {
        // long_27s fixture: T = 2502, piece 1 has L = 202 → 100 valid keys;
        // the unpadded variant (L = 175) → 86.
        let k = key_mask(&[2502, 202, 175], 2502);
        assert_eq!(k[0].iter().filter(|&&v| v).count(), 1250);
        assert_eq!(k[1].iter().filter(|&&v| v).count(), 100);
        assert_eq!(k[2].iter().filter(|&&v| v).count(), 86);
    }
}
