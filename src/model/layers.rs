//! Building blocks shared by the encoders and decoders.

use candle_core::{DType, Result, Tensor};

/// `y = x Wᵀ + b` with `W` stored `[out, in]` as in every checkpoint format.
#[derive(Clone, Debug)]
pub struct Linear {
    pub weight: Tensor,
    pub bias: Option<Tensor>,
    /// Int8 copy of `weight` for few-row CPU inputs (see [`super::quant`]).
    pub int8: Option<std::sync::Arc<crate::ops::quant::QuantMatrix>>,
}

impl Linear {
    pub fn new(weight: Tensor, bias: Option<Tensor>) -> Self {
        Self {
            weight,
            bias,
            int8: None,
        }
    }

    /// Adds an int8 copy of the weights used for inputs of at most
    /// [`crate::ops::quant::MAX_ROWS`] rows on the CPU (decode steps).
    pub(crate) fn quantize_for_decoding(&mut self) -> Result<()> {
        if self.weight.device().is_cpu() {
            self.int8 = Some(std::sync::Arc::new(
                crate::ops::quant::QuantMatrix::from_tensor(&self.weight)?,
            ));
        }
        Ok(())
    }

    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        if let Some(q) = &self.int8 {
            let rows = x.elem_count() / x.dim(candle_core::D::Minus1)?.max(1);
            if rows <= crate::ops::quant::MAX_ROWS && x.dtype() == DType::F32 && x.device().is_cpu()
            {
                return crate::ops::quant::matmul_t(q, x, self.bias.as_ref());
            }
        }
        let y = x.broadcast_matmul(&self.weight.t()?)?;
        match &self.bias {
            Some(b) => y.broadcast_add(b),
            None => Ok(y),
        }
    }
}

#[derive(Clone, Debug)]
pub struct LayerNorm {
    pub gamma: Tensor,
    pub beta: Tensor,
    pub eps: f32,
}

impl LayerNorm {
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        candle_nn::ops::layer_norm(&x.contiguous()?, &self.gamma, &self.beta, self.eps)
    }
}

#[derive(Clone, Debug)]
pub struct RmsNorm {
    pub weight: Tensor,
    pub eps: f32,
}

impl RmsNorm {
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        candle_nn::ops::rms_norm(&x.contiguous()?, &self.weight, self.eps)
    }
}

/// 1-D convolution over `[batch, channels, time]` with bias.
#[derive(Clone, Debug)]
pub struct Conv1d {
    pub weight: Tensor,
    pub bias: Tensor,
    pub stride: usize,
    pub padding: usize,
    /// The weights as the `[k·c_in, c_out]` matrix of [`Conv1d::forward_time_major`].
    pub im2col_weight: Option<Tensor>,
}

impl Conv1d {
    pub fn new(weight: Tensor, bias: Tensor, stride: usize, padding: usize) -> Result<Self> {
        let (c_out, c_in, k) = weight.dims3()?;
        // Tap-major rows to match the im2col columns; kept only on the CPU,
        // the one device that takes the im2col path.
        let im2col_weight = if weight.device().is_cpu() {
            Some(
                weight
                    .permute((2, 1, 0))?
                    .reshape((k * c_in, c_out))?
                    .contiguous()?,
            )
        } else {
            None
        };
        Ok(Self {
            weight,
            bias,
            stride,
            padding,
            im2col_weight,
        })
    }

    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let y = x.conv1d(&self.weight, self.padding, self.stride, 1, 1)?;
        y.broadcast_add(&self.bias.reshape((1, (), 1))?)
    }

    /// The same convolution on time-major input `[b, time, c_in]`, giving
    /// `[b, time_out, c_out]`, as one matrix product over an im2col matrix
    /// (each output step's k input steps side by side). On the CPU this is
    /// several times faster than candle's conv1d for Whisper's shapes, and
    /// the encoder wants time-major output anyway.
    pub fn forward_time_major(&self, x: &Tensor) -> Result<Tensor> {
        let (b, t, c_in) = x.dims3()?;
        let (c_out, _, k) = self.weight.dims3()?;
        let t_out = (t + 2 * self.padding - k) / self.stride + 1;
        let x = x.pad_with_zeros(1, self.padding, self.padding + self.stride)?;
        let taps = (0..k)
            .map(|kk| {
                // Rows kk, kk + stride, …: take stride-sized groups, keep the first of each.
                x.narrow(1, kk, t_out * self.stride)?
                    .reshape((b, t_out, self.stride, c_in))?
                    .narrow(2, 0, 1)?
                    .squeeze(2)
            })
            .collect::<Result<Vec<_>>>()?;
        let cols = Tensor::cat(&taps, 2)?; // [b, t_out, k·c_in], tap-major
                                           // Weights [c_out, c_in, k] -> [k·c_in, c_out] in the same tap-major order.
        let w = match &self.im2col_weight {
            Some(w) => w.clone(),
            None => self.weight.permute((2, 1, 0))?.reshape((k * c_in, c_out))?,
        };
        cols.broadcast_matmul(&w)?.broadcast_add(&self.bias)
    }
}

/// Scaled dot-product attention over `[b, h, t, d]` tensors; softmax in f32.
/// `mask` is added to the scores (0 or a large negative number).
pub fn attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    scale: f64,
    mask: Option<&Tensor>,
) -> Result<Tensor> {
    // Long unmasked attention (encoders) on the CPU: the fused kernel.
    if mask.is_none() && q.dim(2)? > 1 {
        if let Some(out) = crate::ops::cpu::fused_attention(q, k, v, scale)? {
            return Ok(out);
        }
    }
    let dtype = q.dtype();
    let scores = (q.matmul(&k.t()?)? * scale)?;
    let scores = match mask {
        Some(m) => scores.broadcast_add(&m.to_dtype(scores.dtype())?)?,
        None => scores,
    };
    let probs =
        crate::ops::cpu::softmax_last_dim(&scores.to_dtype(DType::F32)?)?.to_dtype(dtype)?;
    probs.matmul(&v.contiguous()?)
}

/// The first `n` positions (dim 2) of per-layer keys and values `[b, h, T, d]`.
pub(crate) fn narrow_positions(
    layers: &[(Tensor, Tensor)],
    n: usize,
) -> Result<Vec<(Tensor, Tensor)>> {
    layers
        .iter()
        .map(|(k, v)| Ok((k.narrow(2, 0, n)?, v.narrow(2, 0, n)?)))
        .collect()
}

/// Each pair in contiguous tensors of its own (a narrowed view keeps the
/// whole tensor it was cut from alive).
pub(crate) fn contiguous_pairs(layers: &[(Tensor, Tensor)]) -> Result<Vec<(Tensor, Tensor)>> {
    layers
        .iter()
        .map(|(k, v)| Ok((k.contiguous()?, v.contiguous()?)))
        .collect()
}

/// [`splice_cached`] for keys and values together.
pub(crate) fn splice_cached_pair(
    head: Option<&(Tensor, Tensor)>,
    own: (&Tensor, &Tensor),
    whole: &(Tensor, Tensor),
) -> Result<(Tensor, Tensor)> {
    Ok((
        splice_cached(head.map(|h| &h.0), own.0, &whole.0)?,
        splice_cached(head.map(|h| &h.1), own.1, &whole.1)?,
    ))
}

/// Keys or values of a window whose positions `c..c + n` were recomputed
/// (`own` `[b, h, n, d]`): `head`'s `c` positions (audio encoded earlier; none
/// when `None`), then `own`, then a cached `whole` `[b, h, T, d]` from
/// `c + n` on.
pub(crate) fn splice_cached(head: Option<&Tensor>, own: &Tensor, whole: &Tensor) -> Result<Tensor> {
    let c = match head {
        Some(h) => h.dim(2)?,
        None => 0,
    };
    let (n, total) = (own.dim(2)?, whole.dim(2)?);
    let mut parts: Vec<Tensor> = head.into_iter().cloned().collect();
    parts.push(own.clone());
    if c + n < total {
        parts.push(whole.narrow(2, c + n, total - c - n)?);
    }
    if parts.len() == 1 {
        return Ok(own.clone());
    }
    Tensor::cat(&parts, 2)
}

/// Causal mask for `n` new positions after `past` cached ones: `[n, past + n]`,
/// 0 where a query may attend, −inf where it may not.
pub(crate) fn causal_mask(
    n: usize,
    past: usize,
    dtype: DType,
    device: &candle_core::Device,
) -> Result<Tensor> {
    let total = past + n;
    let data: Vec<f32> = (0..n)
        .flat_map(|i| (0..total).map(move |j| if j > past + i { f32::NEG_INFINITY } else { 0.0 }))
        .collect();
    Tensor::from_vec(data, (n, total), device)?.to_dtype(dtype)
}

/// Splits `[b, t, h*d]` into heads `[b, h, t, d]`.
pub(crate) fn split_heads(x: &Tensor, heads: usize) -> Result<Tensor> {
    let (b, t, hd) = x.dims3()?;
    x.reshape((b, t, heads, hd / heads))?.transpose(1, 2)
}

/// Merges `[b, h, t, d]` back to `[b, t, h*d]`.
pub(crate) fn merge_heads(x: &Tensor) -> Result<Tensor> {
    let (b, h, t, d) = x.dims4()?;
    x.transpose(1, 2)?.reshape((b, t, h * d))
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn time_major_convolution_equals_conv1d() -> Result<()> {
        for (stride, t) in [(1, 37), (2, 37), (2, 40)] {
            let conv = Conv1d::new(
                Tensor::randn(0f32, 1.0, (5, 4, 3), &Device::Cpu)?,
                Tensor::randn(0f32, 1.0, 5, &Device::Cpu)?,
                stride,
                1,
            )?;
            let x = Tensor::randn(0f32, 1.0, (2, 4, t), &Device::Cpu)?;
            let reference = conv.forward(&x)?.transpose(1, 2)?;
            let ours = conv.forward_time_major(&x.transpose(1, 2)?.contiguous()?)?;
            assert_eq!(ours.dims(), reference.dims());
            let err = (ours - reference)?.abs()?.max_all()?.to_scalar::<f32>()?;
            assert!(err < 1e-5, "stride {stride}, t {t}: {err}");
        }
        Ok(())
    }
}
