//! Int8 weight-only matrix–vector products for the CPU decode step.
//!
//! A decode step multiplies one token's activations by every weight matrix of
//! the decoder and by the vocabulary projection: for Whisper tiny.en that is
//! ~110 MB of f32 weights read per token, so the step is bound by memory
//! bandwidth, not arithmetic. Storing those matrices as int8 with one f32
//! scale per group of 32 consecutive weights of a row (symmetric, scale =
//! max|w| / 127) reads about a quarter of the bytes; activations and
//! accumulation stay f32. (One scale per whole row was tried first: the
//! outlier channels of the LayerNorm output then moved logits by up to 1.0.) Encoders and prefills
//! (many rows at once) keep the f32 GEMM, which is compute-bound.

use candle_core::{DType, Result, Tensor};
use rayon::prelude::*;

/// Output rows per parallel task.
const ROWS_PER_TASK: usize = 256;
/// Inputs with at most this many rows take the int8 path.
pub(crate) const MAX_ROWS: usize = 8;
/// Weights sharing one scale (along a row).
const GROUP: usize = 32;

#[derive(Debug)]
pub struct QuantMatrix {
    rows: usize,
    cols: usize,
    q: Vec<i8>,
    scales: Vec<f32>,
}

impl QuantMatrix {
    /// Quantises a `[rows, cols]` weight matrix (any float dtype).
    pub(crate) fn from_tensor(w: &Tensor) -> Result<Self> {
        let (rows, cols) = w.dims2()?;
        if cols % GROUP != 0 {
            candle_core::bail!("int8 weights need a multiple of {GROUP} columns, not {cols}");
        }
        let data = w.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
        let mut q = vec![0i8; rows * cols];
        let mut scales = vec![0f32; rows * cols / GROUP];
        q.par_chunks_mut(GROUP)
            .zip(data.par_chunks(GROUP))
            .zip(scales.par_iter_mut())
            .for_each(|((q, w), scale)| {
                let max = w.iter().fold(0f32, |m, v| m.max(v.abs()));
                *scale = if max > 0.0 { max / 127.0 } else { 1.0 };
                let inv = 1.0 / *scale;
                for (q, &v) in q.iter_mut().zip(w) {
                    *q = (v * inv).round().clamp(-127.0, 127.0) as i8;
                }
            });
        Ok(Self {
            rows,
            cols,
            q,
            scales,
        })
    }

    /// `out[m, r] = Σ_c x[m, c] · w[r, c]` for `x` of `m` rows (row-major).
    pub(crate) fn matmul_t(&self, x: &[f32], out: &mut [f32]) {
        let m = x.len() / self.cols;
        debug_assert_eq!(out.len(), m * self.rows);
        // Split the output by weight rows so each thread streams its own part
        // of the matrix once, for all input rows.
        let mut by_row = vec![0f32; self.rows * m];
        by_row
            .par_chunks_mut(ROWS_PER_TASK * m)
            .enumerate()
            .for_each(|(task, chunk)| {
                let first = task * ROWS_PER_TASK;
                dot_rows_dispatch(self, first, x, m, chunk);
            });
        for r in 0..self.rows {
            for i in 0..m {
                out[i * self.rows + r] = by_row[r * m + i];
            }
        }
    }
}

/// Σ w·x over one row, each group of [`GROUP`] weights scaled by its scale.
#[inline(always)]
fn dot_i8(w: &[i8], scales: &[f32], x: &[f32]) -> f32 {
    const LANES: usize = 8;
    let mut total = [0f32; LANES];
    for ((wg, xg), &scale) in w.chunks_exact(GROUP).zip(x.chunks_exact(GROUP)).zip(scales) {
        let mut acc = [0f32; LANES];
        for (w8, x8) in wg.chunks_exact(LANES).zip(xg.chunks_exact(LANES)) {
            for l in 0..LANES {
                acc[l] += w8[l] as f32 * x8[l];
            }
        }
        for l in 0..LANES {
            total[l] += acc[l] * scale;
        }
    }
    total.iter().sum()
}

/// Rows `first..` of the matrix times every input row, into `out[row][m]`.
#[inline(always)]
fn dot_rows(mat: &QuantMatrix, first: usize, x: &[f32], m: usize, out: &mut [f32]) {
    let cols = mat.cols;
    for (k, dst) in out.chunks_exact_mut(m).enumerate() {
        let r = first + k;
        let w = &mat.q[r * cols..(r + 1) * cols];
        let groups = cols / GROUP;
        let scales = &mat.scales[r * groups..(r + 1) * groups];
        for (i, d) in dst.iter_mut().enumerate() {
            *d = dot_i8(w, scales, &x[i * cols..(i + 1) * cols]);
        }
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn dot_rows_avx2(mat: &QuantMatrix, first: usize, x: &[f32], m: usize, out: &mut [f32]) {
    dot_rows(mat, first, x, m, out)
}

fn dot_rows_dispatch(mat: &QuantMatrix, first: usize, x: &[f32], m: usize, out: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if super::cpu::has_avx2() {
        // SAFETY: the CPU has the features the function is compiled for.
        return unsafe { dot_rows_avx2(mat, first, x, m, out) };
    }
    dot_rows(mat, first, x, m, out)
}

/// `x · wᵀ (+ bias)` through the int8 matrix, for a CPU f32 `x` whose
/// leading dimensions hold at most [`MAX_ROWS`] rows.
pub(crate) fn matmul_t(mat: &QuantMatrix, x: &Tensor, bias: Option<&Tensor>) -> Result<Tensor> {
    let dims = x.dims().to_vec();
    let cols = *dims.last().unwrap_or(&0);
    if cols != mat.cols {
        candle_core::bail!(
            "int8 matmul: input has {cols} columns, weights {}",
            mat.cols
        );
    }
    let data = x.flatten_all()?.to_vec1::<f32>()?;
    let mut out = vec![0f32; data.len() / cols * mat.rows];
    mat.matmul_t(&data, &mut out);
    let mut shape = dims;
    *shape.last_mut().unwrap() = mat.rows;
    let y = Tensor::from_vec(out, shape, x.device())?;
    match bias {
        Some(b) => y.broadcast_add(b),
        None => Ok(y),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn int8_matvec_is_close_to_f32() -> Result<()> {
        let w = Tensor::randn(0f32, 0.05, (1000, 384), &Device::Cpu)?;
        let x = Tensor::randn(0f32, 1.0, (1, 3, 384), &Device::Cpu)?;
        let exact = x.broadcast_matmul(&w.t()?)?;
        let q = QuantMatrix::from_tensor(&w)?;
        let approx = matmul_t(&q, &x, None)?;
        let err = (&approx - &exact)?.abs()?.max_all()?.to_scalar::<f32>()?;
        let scale = exact.abs()?.max_all()?.to_scalar::<f32>()?;
        // Rounding each weight by ≤ half a step of its group's max|w|/127.
        assert!(err / scale < 1e-2, "relative error {}", err / scale);
        assert!(
            QuantMatrix::from_tensor(&Tensor::zeros((4, 30), DType::F32, &Device::Cpu)?).is_err()
        );
        Ok(())
    }
}
