//! Faster f32 CPU versions of the two elementwise-heavy operations of the
//! encoders, softmax and erf-GELU. candle's CPU versions call libm's `exp` and
//! `erf` per element, which made them the largest cost of Whisper's encoder
//! (softmax over 6×1500×1500 scores). These use branch-free polynomial
//! approximations that the compiler vectorises, accurate to a few ulp, and
//! split rows across threads. Other devices and dtypes use candle's ops.

use candle_core::{CpuStorage, CustomOp1, DType, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

/// e^x for x in roughly [-87, 88], relative error < 2e-7.
#[inline(always)]
pub(crate) fn fast_exp(x: f32) -> f32 {
    let x = x.clamp(-87.0, 88.0);
    // x = n ln2 + r, |r| <= ln2/2; 1.5 * 2^23 rounds to nearest without a branch.
    const ROUND: f32 = 12_582_912.0;
    let n = (x * std::f32::consts::LOG2_E + ROUND) - ROUND;
    let r = x - n * 0.693_145_75 - n * 1.428_606_8e-6;
    // Degree-6 Taylor polynomial of e^r: truncation error < 1.2e-7 on [-ln2/2, ln2/2].
    let p = 1.0
        + r * (1.0
            + r * (0.5
                + r * (1.0 / 6.0 + r * (1.0 / 24.0 + r * (1.0 / 120.0 + r * (1.0 / 720.0))))));
    let scale = f32::from_bits(((n as i32 + 127) as u32) << 23);
    p * scale
}

/// erf(x) with absolute error < 5e-7 in f32: Abramowitz & Stegun 7.1.26 (a
/// rational polynomial times e^{-x²}) for |x| ≥ 0.5, where it has no
/// cancellation, and the Maclaurin series below that. Both branches are
/// computed and one selected, so the loop stays branch-free.
#[inline(always)]
fn fast_erf(x: f32) -> f32 {
    let a = x.abs();
    let t = 1.0 / (1.0 + 0.327_591_1 * a);
    let poly = t
        * (0.254_829_6
            + t * (-0.284_496_74 + t * (1.421_413_7 + t * (-1.453_152 + t * 1.061_405_4))));
    let sign = f32::from_bits(x.to_bits() & 0x8000_0000 | 1f32.to_bits());
    let large = sign * (1.0 - poly * fast_exp(-a * a));
    let x2 = x * x;
    // 2/√π · (x − x³/3 + x⁵/10 − x⁷/42 + x⁹/216 − x¹¹/1320)
    let small = x
        * std::f32::consts::FRAC_2_SQRT_PI
        * (1.0
            + x2 * (-1.0 / 3.0
                + x2 * (0.1 + x2 * (-1.0 / 42.0 + x2 * (1.0 / 216.0 - x2 / 1320.0)))));
    let use_small = (a < 0.5) as u32 as f32;
    use_small * small + (1.0 - use_small) * large
}

const PAR_CHUNK: usize = 1 << 14;
const LANES: usize = 8;

/// Softmax of one row, in place.
#[inline(always)]
fn softmax_row(row: &mut [f32]) {
    // Lane-wise max and sum so the compiler can keep them in vector registers.
    let mut maxes = [f32::NEG_INFINITY; LANES];
    let (chunks, rest) = row.split_at(row.len() / LANES * LANES);
    for c in chunks.chunks_exact(LANES) {
        for l in 0..LANES {
            maxes[l] = maxes[l].max(c[l]);
        }
    }
    let max = rest
        .iter()
        .chain(maxes.iter())
        .copied()
        .fold(f32::NEG_INFINITY, f32::max);
    if max == f32::NEG_INFINITY {
        row.fill(0.0);
        return;
    }
    for d in row.iter_mut() {
        *d = fast_exp(*d - max);
    }
    let mut sums = [0f32; LANES];
    let (chunks, rest) = row.split_at(row.len() / LANES * LANES);
    for c in chunks.chunks_exact(LANES) {
        for l in 0..LANES {
            sums[l] += c[l];
        }
    }
    let inv = 1.0 / (sums.iter().sum::<f32>() + rest.iter().sum::<f32>());
    row.iter_mut().for_each(|d| *d *= inv);
}

#[inline(always)]
fn softmax_rows(rows: &mut [f32], n: usize) {
    for row in rows.chunks_exact_mut(n) {
        softmax_row(row);
    }
}

#[inline(always)]
fn gelu_slice(src: &[f32], dst: &mut [f32]) {
    for (d, &x) in dst.iter_mut().zip(src) {
        *d = 0.5 * x * (1.0 + fast_erf(x * std::f32::consts::FRAC_1_SQRT_2));
    }
}

/// The same loops compiled for AVX2 + FMA, chosen at run time.
#[cfg(target_arch = "x86_64")]
mod avx2 {
    #[target_feature(enable = "avx2,fma")]
    pub(crate) unsafe fn softmax_rows(rows: &mut [f32], n: usize) {
        super::softmax_rows(rows, n)
    }
    #[target_feature(enable = "avx2,fma")]
    pub(crate) unsafe fn gelu_slice(src: &[f32], dst: &mut [f32]) {
        super::gelu_slice(src, dst)
    }
}

pub(crate) fn has_avx2() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        static DETECTED: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
        *DETECTED
            .get_or_init(|| is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma"))
    }
    #[cfg(not(target_arch = "x86_64"))]
    false
}

/// Softmax of each `n`-long row of `rows`, in place.
fn softmax_dispatch(rows: &mut [f32], n: usize) {
    #[cfg(target_arch = "x86_64")]
    if has_avx2() {
        // SAFETY: the CPU supports the features the function was compiled for.
        return unsafe { avx2::softmax_rows(rows, n) };
    }
    softmax_rows(rows, n)
}

fn gelu_dispatch(src: &[f32], dst: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if has_avx2() {
        // SAFETY: as above.
        return unsafe { avx2::gelu_slice(src, dst) };
    }
    gelu_slice(src, dst)
}

fn contiguous_f32<'a>(storage: &'a CpuStorage, layout: &Layout, op: &str) -> Result<&'a [f32]> {
    match (storage, layout.contiguous_offsets()) {
        (CpuStorage::F32(s), Some((a, b))) => Ok(&s[a..b]),
        _ => candle_core::bail!("{op} needs a contiguous f32 tensor"),
    }
}

struct SoftmaxLastDim;

impl CustomOp1 for SoftmaxLastDim {
    fn name(&self) -> &'static str {
        "fast-softmax-last-dim"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let src = contiguous_f32(storage, layout, self.name())?;
        let n = (*layout.dims().last().unwrap_or(&1)).max(1);
        let mut dst = src.to_vec();
        let rows_per_task = (PAR_CHUNK / n).max(1);
        dst.par_chunks_mut(n * rows_per_task)
            .for_each(|d| softmax_dispatch(d, n));
        Ok((CpuStorage::F32(dst), layout.shape().clone()))
    }
}

struct GeluErf;

impl CustomOp1 for GeluErf {
    fn name(&self) -> &'static str {
        "fast-gelu-erf"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let src = contiguous_f32(storage, layout, self.name())?;
        let mut dst = vec![0f32; src.len()];
        dst.par_chunks_mut(PAR_CHUNK)
            .zip(src.par_chunks(PAR_CHUNK))
            .for_each(|(d, s)| gelu_dispatch(s, d));
        Ok((CpuStorage::F32(dst), layout.shape().clone()))
    }
}

/// Query rows per block of the fused attention. The block's scores
/// (`ATTN_BLOCK × keys` floats: 1.5 MB for 1500 keys) stay in cache between
/// the two products; blocks of 256+ rows keep the GEMMs efficient (64-row
/// blocks ran the q·kᵀ product ~1.5× slower).
const ATTN_BLOCK: usize = 256;

std::thread_local! {
    static SCORES: std::cell::RefCell<Vec<f32>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// softmax(q·kᵀ·scale)·v for contiguous f32 `[b, h, t, d]` q and `[b, h, s, d]`
/// k, v without a mask, one block of query rows at a time. The unfused
/// version writes and reads the whole `h×t×s` score matrix (54 MB per
/// Whisper encoder layer) several times; here each block's scores are
/// produced, normalised and consumed while in cache.
struct FusedAttention {
    scale: f32,
}

impl candle_core::CustomOp3 for FusedAttention {
    fn name(&self) -> &'static str {
        "fused-attention"
    }

    fn cpu_fwd(
        &self,
        qs: &CpuStorage,
        ql: &Layout,
        ks: &CpuStorage,
        kl: &Layout,
        vs: &CpuStorage,
        vl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (q, k, v) = (
            contiguous_f32(qs, ql, self.name())?,
            contiguous_f32(ks, kl, self.name())?,
            contiguous_f32(vs, vl, self.name())?,
        );
        let (b, h, t, d) = ql.shape().dims4()?;
        let s = kl.shape().dims4()?.2;
        if kl.shape().dims4()? != (b, h, s, d) || vl.shape().dims4()? != (b, h, s, d) {
            candle_core::bail!(
                "fused attention: q {:?}, k {:?}, v {:?} do not match",
                ql.shape(),
                kl.shape(),
                vl.shape()
            );
        }
        let mut out = vec![0f32; b * h * t * d];
        let blocks = t.div_ceil(ATTN_BLOCK);
        // One task per (batch·head, query block); each writes its own rows of `out`.
        let tasks: Vec<(usize, usize)> = (0..b * h)
            .flat_map(|bh| (0..blocks).map(move |blk| (bh, blk)))
            .collect();
        let out_ptr = SendPtr(out.as_mut_ptr());
        let scale = self.scale;
        tasks.par_iter().for_each(|&(bh, blk)| {
            let rows = ATTN_BLOCK.min(t - blk * ATTN_BLOCK);
            let q = &q[(bh * t + blk * ATTN_BLOCK) * d..][..rows * d];
            let k = &k[bh * s * d..][..s * d];
            let v = &v[bh * s * d..][..s * d];
            SCORES.with(|cell| {
                let mut scores = cell.borrow_mut();
                scores.resize(ATTN_BLOCK * s, 0.0);
                let sc = &mut scores[..rows * s];
                // SAFETY: the slices bound every pointer gemm reads or writes
                // (rows×s scores, rows×d queries, s×d keys/values); the output
                // rows of distinct tasks are disjoint.
                unsafe {
                    gemm::gemm(
                        rows,
                        s,
                        d,
                        sc.as_mut_ptr(),
                        1,
                        s as isize,
                        false,
                        q.as_ptr(),
                        1,
                        d as isize,
                        k.as_ptr(),
                        d as isize,
                        1,
                        0.0,
                        scale,
                        false,
                        false,
                        false,
                        gemm::Parallelism::None,
                    );
                }
                softmax_dispatch(sc, s);
                let dst = out_ptr.at((bh * t + blk * ATTN_BLOCK) * d);
                // SAFETY: `sc` holds rows×s probabilities and `v` s×d values; `dst`
                // points at rows×d floats of `out` (rows `blk·ATTN_BLOCK..` of head
                // `bh`, inside `out`'s b·h·t·d), which no other task writes and which
                // outlive the parallel loop.
                unsafe {
                    gemm::gemm(
                        rows,
                        d,
                        s,
                        dst,
                        1,
                        d as isize,
                        false,
                        sc.as_ptr(),
                        1,
                        s as isize,
                        v.as_ptr(),
                        1,
                        d as isize,
                        0.0,
                        1.0,
                        false,
                        false,
                        false,
                        gemm::Parallelism::None,
                    );
                }
            });
        });
        Ok((CpuStorage::F32(out), Shape::from_dims(&[b, h, t, d])))
    }
}

/// A raw pointer that rayon tasks may share; each task writes a disjoint range.
#[derive(Clone, Copy)]
struct SendPtr(*mut f32);
// SAFETY: only used for disjoint writes from the tasks of one parallel loop, whose
// buffer outlives the loop.
unsafe impl Send for SendPtr {}
// SAFETY: as for `Send`: the tasks sharing it write disjoint ranges and nothing reads
// the buffer until the loop has joined.
unsafe impl Sync for SendPtr {}

impl SendPtr {
    fn at(self, offset: usize) -> *mut f32 {
        self.0.wrapping_add(offset)
    }
}

/// Unmasked scaled dot-product attention over `[b, h, t, d]` tensors.
/// Fused on the CPU in f32; `None` elsewhere (callers use the general path).
pub fn fused_attention(q: &Tensor, k: &Tensor, v: &Tensor, scale: f64) -> Result<Option<Tensor>> {
    if !(use_fast_path(q) && k.dtype() == DType::F32 && v.dtype() == DType::F32) {
        return Ok(None);
    }
    let op = FusedAttention {
        scale: scale as f32,
    };
    Ok(Some(q.contiguous()?.apply_op3_no_bwd(
        &k.contiguous()?,
        &v.contiguous()?,
        &op,
    )?))
}

fn use_fast_path(x: &Tensor) -> bool {
    x.device().is_cpu() && x.dtype() == DType::F32
}

/// Softmax over the last dimension.
pub(crate) fn softmax_last_dim(x: &Tensor) -> Result<Tensor> {
    if use_fast_path(x) {
        x.contiguous()?.apply_op1_no_bwd(&SoftmaxLastDim)
    } else {
        candle_nn::ops::softmax_last_dim(x)
    }
}

/// GELU with the exact (erf) form, as Whisper and Step-Audio 2 use.
pub fn gelu_erf(x: &Tensor) -> Result<Tensor> {
    if use_fast_path(x) {
        x.contiguous()?.apply_op1_no_bwd(&GeluErf)
    } else {
        x.gelu_erf()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn fast_exp_is_accurate() {
        let mut x = -87.0f32;
        while x < 88.0 {
            let (a, b) = (fast_exp(x), x.exp());
            assert!(((a - b) / b).abs() < 3e-7, "x={x}: {a} vs {b}");
            x += 0.0137;
        }
    }

    #[test]
    fn fast_erf_is_accurate() {
        let mut x = -6.0f32;
        while x < 6.0 {
            // The series loses precision to cancellation past |x| ≈ 3.5, where erf is ±1 to 1e-6.
            let exact = if x.abs() > 3.5 {
                (x as f64).signum()
            } else {
                libm_erf(x as f64)
            };
            let tol = if x.abs() > 3.5 { 1e-6 } else { 4e-7 };
            assert!(
                (fast_erf(x) as f64 - exact).abs() < tol,
                "x={x}: {} vs {exact}",
                fast_erf(x)
            );
            x += 0.001;
        }
    }

    /// High-precision erf by its Taylor series / continued fraction, for the test only.
    fn libm_erf(x: f64) -> f64 {
        // erf via the series sum_{n} (-1)^n x^(2n+1) / (n! (2n+1)), fine for |x| <= 6 in f64.
        let mut sum: f64 = 0.0;
        let mut term = x;
        let mut n: f64 = 0.0;
        while term.abs() > 1e-17 * sum.abs().max(1e-300) || n < 3.0 {
            sum += term / (2.0 * n + 1.0);
            n += 1.0;
            term *= -x * x / n;
            if n > 400.0 {
                break;
            }
        }
        sum * 2.0 / std::f64::consts::PI.sqrt()
    }

    #[test]
    fn fused_attention_matches_the_unfused_computation() -> Result<()> {
        // 300 queries: a full block and a partial one; 2 batches × 3 heads.
        let q = Tensor::randn(0f32, 1.0, (2, 3, 300, 64), &Device::Cpu)?;
        let k = Tensor::randn(0f32, 1.0, (2, 3, 97, 64), &Device::Cpu)?;
        let v = Tensor::randn(0f32, 1.0, (2, 3, 97, 64), &Device::Cpu)?;
        let scale = 0.125;
        let fused = fused_attention(&q, &k, &v, scale)?.expect("CPU f32 takes the fused path");
        let scores = (q.matmul(&k.t()?)? * scale)?;
        let reference = candle_nn::ops::softmax_last_dim(&scores)?.matmul(&v)?;
        let err = (fused - reference)?.abs()?.max_all()?.to_scalar::<f32>()?;
        assert!(err < 1e-5, "fused attention differs by {err}");
        Ok(())
    }

    #[test]
    fn ops_match_candle() -> Result<()> {
        let x = Tensor::randn(0f32, 3.0, (7, 301), &Device::Cpu)?;
        let a = softmax_last_dim(&x)?;
        let b = candle_nn::ops::softmax_last_dim(&x)?;
        let err = (a - b)?.abs()?.max_all()?.to_scalar::<f32>()?;
        assert!(err < 1e-6, "softmax err {err}");
        let a = gelu_erf(&x)?;
        let b = x.gelu_erf()?;
        let err = (a - b)?.abs()?.max_all()?.to_scalar::<f32>()?;
        assert!(err < 2e-6, "gelu err {err}");
        Ok(())
    }
}
