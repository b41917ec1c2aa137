//! The encoder's linear layers on CUDA: the GEMM straight through cuBLAS (`cublasGemmEx`,
//! bf16 in/out, f32 accumulation, the "TN" layout that the row-major `[out, in]`
//! checkpoint weights already have), and the elementwise work after it (bias + GELU,
//! bias + residual) in one pass each instead of candle's two or three.

use super::{cuda_device, dev_ptr, func};
use candle_core::cuda::cudarc::cublas::result::gemm_ex;
use candle_core::cuda::cudarc::cublas::sys::{
    cublasComputeType_t, cublasGemmAlgo_t, cublasOperation_t, cudaDataType,
};
use candle_core::cuda::cudarc::driver::{DevicePtr, LaunchConfig, PushKernelArg};
use candle_core::cuda::{CudaStorage, WrapErr};
use candle_core::op::BackpropOp;
use candle_core::{DType, Result, Storage, Tensor};
use half::bf16;

fn bf16_contiguous(t: &Tensor) -> bool {
    t.dtype() == DType::BF16 && t.is_contiguous()
}

/// Wraps a fresh device buffer of `shape` as a tensor.
pub(crate) fn alloc_bf16(
    dev: &candle_core::cuda::CudaDevice,
    shape: &[usize],
) -> Result<(Tensor, u64)> {
    let n: usize = shape.iter().product();
    // SAFETY: every element is written by the caller's kernel or GEMM before any read.
    let slice = unsafe { dev.alloc::<bf16>(n)? };
    let ptr = {
        let stream = dev.cuda_stream();
        let (p, sync) = slice.device_ptr(&stream);
        drop(sync);
        p
    };
    let t = Tensor::from_storage(
        Storage::Cuda(CudaStorage::wrap_cuda_slice(slice, dev.clone())),
        shape,
        BackpropOp::none(),
        false,
    );
    Ok((t, ptr))
}

/// `x W^T` for `x` `[.., K]` and `W` `[N, K]`, both contiguous bf16: `[.., N]`. `None`
/// for other dtypes or layouts.
pub(crate) fn matmul_t(x: &Tensor, w: &Tensor) -> Result<Option<Tensor>> {
    if !bf16_contiguous(x) || !bf16_contiguous(w) || w.rank() != 2 {
        return Ok(None);
    }
    let (n, k) = w.dims2()?;
    let dims = x.dims();
    if dims.last() != Some(&k) {
        return Ok(None);
    }
    let m = x.elem_count() / k;
    let dev = cuda_device(x)?;
    let mut out_shape = dims.to_vec();
    *out_shape.last_mut().expect("rank >= 1") = n;
    let (out, o_ptr) = alloc_bf16(&dev, &out_shape)?;
    gemm_t(&dev, dev_ptr(w)?, dev_ptr(x)?, o_ptr, m, n, k, false)?;
    Ok(Some(out))
}

/// `Y = X W^T` on raw device buffers: `X` `[m, k]` and `W` `[n, k]` row-major bf16, `Y`
/// `[m, n]` row-major, bf16 or (`out_f32`) f32; f32 accumulation. Enqueued on the
/// device's stream (cuBLAS is bound to it), so it can be captured into a CUDA graph.
#[allow(clippy::too_many_arguments)]
pub(crate) fn gemm_t(
    dev: &candle_core::cuda::CudaDevice,
    w: u64,
    x: u64,
    out: u64,
    m: usize,
    n: usize,
    k: usize,
    out_f32: bool,
) -> Result<()> {
    let (alpha, beta) = (1.0f32, 0.0f32);
    let blas = dev.cublas_handle();
    let out_type = if out_f32 {
        cudaDataType::CUDA_R_32F
    } else {
        cudaDataType::CUDA_R_16BF
    };
    // Column-major view: Y^T [N, M] = W [N, K] · X^T [K, M]; W row-major [N, K] is W^T in
    // column-major (op T), X row-major [M, K] is X^T in column-major (op N).
    // SAFETY: the caller passes live buffers of the dimensions given.
    unsafe {
        gemm_ex(
            *blas.handle(),
            cublasOperation_t::CUBLAS_OP_T,
            cublasOperation_t::CUBLAS_OP_N,
            n as i32,
            m as i32,
            k as i32,
            (&alpha) as *const f32 as *const _,
            w as *const _,
            cudaDataType::CUDA_R_16BF,
            k as i32,
            x as *const _,
            cudaDataType::CUDA_R_16BF,
            k as i32,
            (&beta) as *const f32 as *const _,
            out as *mut _,
            out_type,
            n as i32,
            cublasComputeType_t::CUBLAS_COMPUTE_32F,
            cublasGemmAlgo_t::CUBLAS_GEMM_DEFAULT,
        )
        .map_err(|e| candle_core::Error::Cuda(Box::new(e)))?;
    }
    Ok(())
}

fn launch_cfg(n: usize) -> LaunchConfig {
    LaunchConfig {
        grid_dim: (n.div_ceil(256).min(132 * 16) as u32, 1, 1),
        block_dim: (256, 1, 1),
        shared_mem_bytes: 0,
    }
}

/// `gelu_erf(y + bias)`, `y` `[.., C]`, `bias` `[C]`, in one pass, in place on `y`
/// (the fresh output of a GEMM that nothing else shares).
pub(crate) fn bias_gelu(y: &Tensor, bias: &Tensor) -> Result<Option<Tensor>> {
    bias_epilogue(y, bias, "bias_gelu_bf16")
}

/// `y += bias` in place (`y` `[.., C]`, fresh, not shared).
pub(crate) fn bias_add(y: &Tensor, bias: &Tensor) -> Result<Option<Tensor>> {
    bias_epilogue(y, bias, "bias_add_bf16")
}

/// Launches a kernel `(y, bias, n, cols)` that rewrites `y` in place with its bias row.
fn bias_epilogue(y: &Tensor, bias: &Tensor, kernel: &str) -> Result<Option<Tensor>> {
    let cols = bias.elem_count();
    if !bf16_contiguous(y) || !bf16_contiguous(bias) || y.dims().last() != Some(&cols) {
        return Ok(None);
    }
    let dev = cuda_device(y)?;
    let f = func(&dev, kernel)?;
    let (yp, bp, n, c) = (
        dev_ptr(y)?,
        dev_ptr(bias)?,
        y.elem_count() as i64,
        cols as i32,
    );
    let stream = dev.cuda_stream();
    let mut b = stream.launch_builder(&f);
    b.arg(&yp).arg(&bp).arg(&n).arg(&c);
    // SAFETY: y has n elements, bias `cols`; y is written in place (callers pass a tensor
    // that nothing else shares: the fresh output of the GEMM).
    unsafe { b.launch(launch_cfg(n as usize)) }.w()?;
    Ok(Some(y.clone()))
}

/// `resid + (y + bias)` in one pass, into a new tensor.
pub(crate) fn bias_residual(y: &Tensor, bias: &Tensor, resid: &Tensor) -> Result<Option<Tensor>> {
    let cols = bias.elem_count();
    if !bf16_contiguous(y)
        || !bf16_contiguous(bias)
        || !bf16_contiguous(resid)
        || y.dims() != resid.dims()
        || y.dims().last() != Some(&cols)
    {
        return Ok(None);
    }
    let dev = cuda_device(y)?;
    let (out, op) = alloc_bf16(&dev, y.dims())?;
    let f = func(&dev, "bias_residual_bf16")?;
    let (yp, bp, rp) = (dev_ptr(y)?, dev_ptr(bias)?, dev_ptr(resid)?);
    let (n, c) = (y.elem_count() as i64, cols as i32);
    let stream = dev.cuda_stream();
    let mut b = stream.launch_builder(&f);
    b.arg(&yp).arg(&bp).arg(&rp).arg(&op).arg(&n).arg(&c);
    // SAFETY: all four buffers have n (bias: cols) elements.
    unsafe { b.launch(launch_cfg(n as usize)) }.w()?;
    Ok(Some(out))
}

fn ln_ok(x: &Tensor, gamma: &Tensor, beta: &Tensor) -> bool {
    let cols = gamma.elem_count();
    bf16_contiguous(x)
        && bf16_contiguous(gamma)
        && bf16_contiguous(beta)
        && beta.elem_count() == cols
        && x.dims().last() == Some(&cols)
        && cols.is_multiple_of(8)
        && cols <= 2048
}

fn ln_launch(rows: usize) -> LaunchConfig {
    // one warp per row, 8 rows per block
    LaunchConfig {
        grid_dim: (rows.div_ceil(8) as u32, 1, 1),
        block_dim: (256, 1, 1),
        shared_mem_bytes: 0,
    }
}

/// LayerNorm over the last dim, one warp per row.
pub(crate) fn layer_norm(
    x: &Tensor,
    gamma: &Tensor,
    beta: &Tensor,
    eps: f32,
) -> Result<Option<Tensor>> {
    if !ln_ok(x, gamma, beta) {
        return Ok(None);
    }
    let dev = cuda_device(x)?;
    let cols = gamma.elem_count();
    let rows = x.elem_count() / cols;
    let (out, op) = alloc_bf16(&dev, x.dims())?;
    let f = func(&dev, "layernorm_bf16")?;
    let (xp, gp, bp) = (dev_ptr(x)?, dev_ptr(gamma)?, dev_ptr(beta)?);
    let (r, c) = (rows as i32, cols as i32);
    let stream = dev.cuda_stream();
    let mut b = stream.launch_builder(&f);
    b.arg(&xp)
        .arg(&gp)
        .arg(&bp)
        .arg(&op)
        .arg(&r)
        .arg(&c)
        .arg(&eps);
    // SAFETY: x and out are [rows, cols], gamma/beta [cols].
    unsafe { b.launch(ln_launch(rows)) }.w()?;
    Ok(Some(out))
}

/// `x = resid + (y + bias)` and `LayerNorm(x)` in one pass: `(x, normed)`.
pub(crate) fn bias_residual_layer_norm(
    y: &Tensor,
    bias: &Tensor,
    resid: &Tensor,
    gamma: &Tensor,
    beta: &Tensor,
    eps: f32,
) -> Result<Option<(Tensor, Tensor)>> {
    if !ln_ok(y, gamma, beta)
        || !bf16_contiguous(resid)
        || !bf16_contiguous(bias)
        || resid.dims() != y.dims()
        || bias.elem_count() != gamma.elem_count()
    {
        return Ok(None);
    }
    let dev = cuda_device(y)?;
    let cols = gamma.elem_count();
    let rows = y.elem_count() / cols;
    let (x, xp) = alloc_bf16(&dev, y.dims())?;
    let (out, op) = alloc_bf16(&dev, y.dims())?;
    let f = func(&dev, "bias_residual_layernorm_bf16")?;
    let (yp, bp, rp) = (dev_ptr(y)?, dev_ptr(bias)?, dev_ptr(resid)?);
    let (gp, betap) = (dev_ptr(gamma)?, dev_ptr(beta)?);
    let (r, c) = (rows as i32, cols as i32);
    let stream = dev.cuda_stream();
    let mut b = stream.launch_builder(&f);
    b.arg(&yp)
        .arg(&bp)
        .arg(&rp)
        .arg(&xp)
        .arg(&gp)
        .arg(&betap)
        .arg(&op)
        .arg(&r)
        .arg(&c)
        .arg(&eps);
    // SAFETY: y, resid, x, out are [rows, cols]; bias, gamma, beta [cols].
    unsafe { b.launch(ln_launch(rows)) }.w()?;
    Ok(Some((x, out)))
}

/// The keys and values `[R, h, T, hd]` a batch of encoder rows attends to, in one
/// kernel (`splice_rows_kv`) instead of a few copies per row: see
/// [`crate::ops::fast::splice_rows`]. `None` where the layouts do not fit.
pub(crate) fn splice_rows(
    qkv: &Tensor,
    rows: &[crate::ops::fast::SpliceRow<'_>],
) -> Result<Option<(Tensor, Tensor)>> {
    let (r, t, three, heads, hd) = qkv.dims5()?;
    let Some(first) = rows.first() else {
        return Ok(None);
    };
    let window = first.whole.0.dim(2)?;
    if !bf16_contiguous(qkv) || three != 3 || rows.len() != r || hd % 8 != 0 || window == 0 {
        return Ok(None);
    }
    // A [1, heads, n, hd] view with unit position stride: its head stride (elements).
    let head_stride = |x: &Tensor, n: usize| -> Option<usize> {
        let s = x.stride();
        let ok = x.dtype() == DType::BF16
            && x.dims() == [1, heads, n, hd]
            && s[3] == 1
            && s[2] == hd
            && (x.layout().start_offset() * 2).is_multiple_of(16);
        ok.then_some(s[1])
    };
    let mut table: Vec<i64> = Vec::with_capacity(8 * r);
    for row in rows {
        let c = row.head.map_or(Ok(0), |h| h.0.dim(2))?;
        let (wk, wv) = row.whole;
        let (Some(wks), Some(wvs)) = (head_stride(wk, window), head_stride(wv, window)) else {
            return Ok(None);
        };
        if wks != wvs || row.own > t || c + row.own > window {
            return Ok(None);
        }
        let (hk, hv, hs) = match row.head {
            Some((k, v)) => match (head_stride(k, c), head_stride(v, c)) {
                (Some(a), Some(b)) if a == b => (dev_ptr(k)?, dev_ptr(v)?, a),
                _ => return Ok(None),
            },
            // never read (c = 0); a valid address all the same
            None => (dev_ptr(wk)?, dev_ptr(wv)?, wks),
        };
        table.extend([
            hk as i64,
            hv as i64,
            dev_ptr(wk)? as i64,
            dev_ptr(wv)? as i64,
            c as i64,
            row.own as i64,
            hs as i64,
            wks as i64,
        ]);
    }
    let dev = cuda_device(qkv)?;
    let table = Tensor::from_vec(table, 8 * r, qkv.device())?;
    let shape = [r, heads, window, hd];
    let (keys, kp) = alloc_bf16(&dev, &shape)?;
    let (values, vp) = alloc_bf16(&dev, &shape)?;
    let f = func(&dev, "splice_rows_kv")?;
    let (tp, qp) = (dev_ptr(&table)?, dev_ptr(qkv)?);
    let (t_i, h_i, w_i, hd_i) = (t as i32, heads as i32, window as i32, hd as i32);
    let stream = dev.cuda_stream();
    let mut b = stream.launch_builder(&f);
    b.arg(&tp)
        .arg(&qp)
        .arg(&t_i)
        .arg(&h_i)
        .arg(&w_i)
        .arg(&hd_i)
        .arg(&kp)
        .arg(&vp);
    let cfg = LaunchConfig {
        grid_dim: (
            (window * hd / 8).div_ceil(256) as u32,
            heads as u32,
            2 * r as u32,
        ),
        block_dim: (256, 1, 1),
        shared_mem_bytes: 0,
    };
    // SAFETY: every row's head and window hold c and `window` positions of `heads`
    // heads at the strides given (checked above), its own keys are within qkv (own ≤
    // t), and the outputs are [r, heads, window, hd].
    unsafe { b.launch(cfg) }.w()?;
    Ok(Some((keys, values)))
}
