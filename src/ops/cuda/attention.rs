//! Fused (flash) attention for the encoder and the LLM prefill: one kernel reads Q, K
//! and V in place (any row/head/batch strides), keeps the scores in registers with an
//! online softmax in f32, and writes `[b, nq, h, hd]`. The unfused candle path writes
//! the `[b, h, nq, nk]` scores several times (matmul, f32 cast, mask add, softmax, bf16
//! cast): for the 30 s encoder that is ~1.4 GB of traffic per layer.

use super::{cuda_device, dev_ptr, func};
use candle_core::cuda::cudarc::driver::{DevicePtr, DeviceRepr, LaunchConfig, PushKernelArg};
use candle_core::cuda::{CudaStorage, WrapErr};
use candle_core::{CpuStorage, CustomOp3, DType, Layout, Result, Shape, Tensor};
use half::bf16;

/// Head-dim-64 kernel variants (all kept so they can be measured against each other):
/// 0 = two-stage cp.async pipeline, 4 warps × 16 rows; 1 = one stage, 4 warps;
/// 2 = two stages, 8 warps (128 query rows per block).
static VARIANT_HD64: std::sync::atomic::AtomicU8 = std::sync::atomic::AtomicU8::new(DEFAULT_HD64);
// w8 measured fastest on the H100 (4.75 vs 4.96 ms for 32 layers at 30 s; docs/gpu-notes.md)
const DEFAULT_HD64: u8 = 2;

pub(crate) fn set_variant(v: &str) -> Result<()> {
    let n = match v {
        "default" => DEFAULT_HD64,
        "2stage" => 0,
        "1stage" => 1,
        "w8" => 2,
        other => candle_core::bail!("unknown flash variant {other} (2stage, 1stage, w8)"),
    };
    VARIANT_HD64.store(n, std::sync::atomic::Ordering::Relaxed);
    Ok(())
}

/// Mirrors `struct AttnParams` in kernels.cu field by field (`#[repr(C)]`).
#[repr(C)]
#[derive(Clone, Copy, Debug)]
struct AttnParams {
    q: u64,
    k: u64,
    v: u64,
    o: u64,
    key_bias: u64,
    q_bs: i64,
    q_hs: i64,
    q_rs: i64,
    k_bs: i64,
    k_hs: i64,
    k_rs: i64,
    v_bs: i64,
    v_hs: i64,
    v_rs: i64,
    o_bs: i64,
    o_hs: i64,
    o_rs: i64,
    key_bias_stride: i64,
    nq: i32,
    nk: i32,
    heads: i32,
    kv_group: i32,
    causal: i32,
    causal_offset: i32,
    scale_log2: f32,
}

// SAFETY: plain old data with the C layout the kernel expects.
unsafe impl DeviceRepr for AttnParams {}

struct FlashAttn {
    scale: f32,
    causal: bool,
    key_bias: Option<Tensor>,
}

/// (batch, head, row) strides of a 4-D layout whose last stride is 1.
fn strides(l: &Layout) -> Result<(i64, i64, i64)> {
    let s = l.stride();
    if s.len() != 4 || s[3] != 1 {
        candle_core::bail!("flash attention needs a 4-D layout with unit last stride, got {s:?}");
    }
    Ok((s[0] as i64, s[1] as i64, s[2] as i64))
}

fn bf16_ptr(s: &CudaStorage, l: &Layout) -> Result<u64> {
    let stream = s.device.cuda_stream();
    let base = s.as_cuda_slice::<bf16>()?.device_ptr(&stream).0;
    Ok(base + 2 * l.start_offset() as u64)
}

impl CustomOp3 for FlashAttn {
    fn name(&self) -> &'static str {
        "stepaudio-flash-attention"
    }

    fn cpu_fwd(
        &self,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        candle_core::bail!("flash attention is CUDA-only")
    }

    fn cuda_fwd(
        &self,
        qs: &CudaStorage,
        ql: &Layout,
        ks: &CudaStorage,
        kl: &Layout,
        vs: &CudaStorage,
        vl: &Layout,
    ) -> Result<(CudaStorage, Shape)> {
        let (b, h, nq, hd) = ql.shape().dims4()?;
        let (_, hkv, nk, _) = kl.shape().dims4()?;
        let dev = qs.device.clone();
        let (q_bs, q_hs, q_rs) = strides(ql)?;
        let (k_bs, k_hs, k_rs) = strides(kl)?;
        let (v_bs, v_hs, v_rs) = strides(vl)?;
        let n_out = b * nq * h * hd;
        // SAFETY: every element is written by the kernel (rows < nq, all heads, all dims).
        let out = unsafe { dev.alloc::<bf16>(n_out)? };
        let stream = dev.cuda_stream();
        let (o_ptr, sync) = out.device_ptr(&stream);
        let (kb_ptr, kb_stride) = match &self.key_bias {
            Some(t) => (dev_ptr(t)?, t.dim(t.rank() - 1)? as i64),
            None => (0, 0),
        };
        let p = AttnParams {
            q: bf16_ptr(qs, ql)?,
            k: bf16_ptr(ks, kl)?,
            v: bf16_ptr(vs, vl)?,
            o: o_ptr,
            key_bias: kb_ptr,
            q_bs,
            q_hs,
            q_rs,
            k_bs,
            k_hs,
            k_rs,
            v_bs,
            v_hs,
            v_rs,
            o_bs: (nq * h * hd) as i64,
            o_hs: hd as i64,
            o_rs: (h * hd) as i64,
            key_bias_stride: kb_stride,
            nq: nq as i32,
            nk: nk as i32,
            heads: h as i32,
            kv_group: (h / hkv) as i32,
            causal: self.causal as i32,
            causal_offset: nk as i32 - nq as i32,
            scale_log2: self.scale * std::f32::consts::LOG2_E,
        };
        let (name, warps) = match (hd, VARIANT_HD64.load(std::sync::atomic::Ordering::Relaxed)) {
            (64, 1) => ("flash_attn_hd64_1stage", 4),
            (64, 2) => ("flash_attn_hd64_w8", 8),
            (64, _) => ("flash_attn_hd64", 4),
            (128, _) => ("flash_attn_hd128", 4),
            _ => candle_core::bail!("flash attention: head dim {hd} not compiled"),
        };
        let f = func(&dev, name)?;
        let cfg = LaunchConfig {
            grid_dim: (nq.div_ceil(16 * warps) as u32, h as u32, b as u32),
            block_dim: (32 * warps as u32, 1, 1),
            shared_mem_bytes: 0,
        };
        let mut lb = stream.launch_builder(&f);
        lb.arg(&p);
        // SAFETY: the parameters describe live buffers of the shapes checked in
        // `flash_attention`; the kernel stays inside them.
        unsafe { lb.launch(cfg) }.w()?;
        drop(sync);
        Ok((
            CudaStorage::wrap_cuda_slice(out, dev),
            Shape::from((b, nq, h, hd)),
        ))
    }
}

fn aligned(t: &Tensor, elems: usize) -> Result<bool> {
    let l = t.layout();
    let s = l.stride();
    Ok(l.start_offset().is_multiple_of(elems)
        && s[..3].iter().all(|&x| x % elems == 0)
        && dev_ptr(t)? % (2 * elems as u64) == 0)
}

/// See [`crate::ops::fast::attention`]. Returns `None` for shapes or layouts the
/// kernel does not cover (head dim other than 64/128, misaligned rows).
pub(crate) fn flash_attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    scale: f32,
    causal: bool,
    key_bias: Option<&Tensor>,
) -> Result<Option<Tensor>> {
    let (b, h, nq, hd) = q.dims4()?;
    let (bk, hkv, nk, hdk) = k.dims4()?;
    if v.dims4()? != (bk, hkv, nk, hdk)
        || bk != b
        || hdk != hd
        || !(hd == 64 || hd == 128)
        || hkv == 0
        || h % hkv != 0
        || nq == 0
        || nk == 0
        || k.dtype() != DType::BF16
        || v.dtype() != DType::BF16
        || (causal && nk < nq)
    {
        return Ok(None);
    }
    for t in [q, k, v] {
        if t.stride()[3] != 1 {
            return Ok(None);
        }
    }
    // Q is read in 4-byte pairs, K and V rows in 16-byte vectors.
    if !aligned(q, 2)? || !aligned(k, 8)? || !aligned(v, 8)? {
        tracing::debug!("flash attention: misaligned operands, using the reference path");
        return Ok(None);
    }
    let key_bias = match key_bias {
        Some(t) => {
            let t = t.to_dtype(DType::F32)?.reshape((b, nk))?.contiguous()?;
            Some(t)
        }
        None => None,
    };
    let _ = cuda_device(q)?;
    let op = FlashAttn {
        scale,
        causal,
        key_bias,
    };
    Ok(Some(q.apply_op3_no_bwd(k, v, &op)?))
}
