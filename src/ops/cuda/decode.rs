//! The batch-1 decode step of a Qwen2-shaped LLM (described by
//! [`DecodeWeights`], built by the model) as a fixed sequence of custom kernels over
//! preallocated buffers, replayable as one CUDA graph.
//!
//! Why: a decode step moves ~14.2 GB of bf16 weights (Step-Audio 2 mini) and does
//! almost no arithmetic, so its floor is memory bandwidth (~4.7 ms at 3 TB/s). Through
//! candle ops it is ~25 kernel launches per layer plus allocations and host work; here
//! it is 7 per layer, each GEMV streams its weight rows with 16-byte loads and does its
//! RMSNorm, bias, residual add or SiLU gate in the same pass, and with the graph the
//! host launches one thing per token.
//!
//! What makes the step replayable: the input token and its position live in a device
//! buffer (`io = [token, position]`) that the kernels read and the last kernel
//! advances (`io[0]` = the argmax, `io[1] += 1`), so the same graph serves every step.
//! The KV-cache buffers are baked in; the graph is captured again if the cache was
//! reallocated.

use super::{capture_graph, dev_ptr, func, sm_count};
use crate::ops::fast::{DecodeCache, DecodeWeights};
use candle_core::cuda::cudarc::driver::{
    result, CudaFunction, CudaGraph, LaunchConfig, PushKernelArg,
};
use candle_core::cuda::{CudaDevice, WrapErr};
use candle_core::{DType, Device, Result, Tensor};

/// Must match DEC_SPLITS in kernels.cu.
pub(crate) const DEC_SPLITS: usize = 16;
const ARGMAX_BLOCKS: usize = 264;

pub(crate) struct LayerPtrs {
    pub in_norm: u64,
    pub qkv_w: u64,
    pub qkv_b: u64,
    pub o_w: u64,
    pub post_norm: u64,
    pub gate_up_w: u64,
    pub down_w: u64,
}

struct Funcs {
    embed: CudaFunction,
    rope: CudaFunction,
    attn_part: CudaFunction,
    attn_comb: CudaFunction,
    am_part: CudaFunction,
    am_final: CudaFunction,
}

struct Captured {
    graph: CudaGraph,
    caches: Vec<(u64, u64)>,
    cap: usize,
}

// SAFETY: a CUDA graph (and its executable) may be used from any host thread as long as
// calls on it are serialised; the engine is owned by one session, which is driven by one
// thread at a time (`&mut self` for every launch), so moving it between threads is sound.
unsafe impl Send for Captured {}

/// The decoder's weights as the kernels read them: raw device pointers and dimensions,
/// shared by the batch-1 step and the batched one ([`super::decode_batch`]).
pub(crate) struct ModelPtrs {
    pub dev: CudaDevice,
    pub layers: Vec<LayerPtrs>,
    pub embed: u64,
    pub final_norm: u64,
    pub lm_head: u64,
    pub cos: u64,
    pub sin: u64,
    pub hidden: usize,
    pub inter: usize,
    pub nh: usize,
    pub nkv: usize,
    pub hd: usize,
    pub vocab: usize,
    pub eps: f32,
    /// Rows of the RoPE tables: positions the model can take.
    pub max_positions: usize,
    gemv: CudaFunction,
    gemv_max_blocks: u32,
    /// Keeps the weights (and so the raw pointers above) alive.
    _weights: Vec<Tensor>,
}

pub(crate) struct DecodeEngine {
    m: ModelPtrs,
    f: Funcs,
    // Scratch buffers, as candle tensors so they are freed with the engine.
    x: Tensor,
    qkv: Tensor,
    q: Tensor,
    attn: Tensor,
    act: Tensor,
    logits: Tensor,
    part_m: Tensor,
    part_l: Tensor,
    part_o: Tensor,
    am_max: Tensor,
    am_idx: Tensor,
    am_sum: Tensor,
    io: Tensor,
    lp: Tensor,
    graph: Option<Captured>,
    graph_failed: bool,
}

fn is_contiguous_bf16(t: &Tensor) -> bool {
    t.dtype() == DType::BF16 && t.is_contiguous()
}

impl ModelPtrs {
    /// The pointers of `llm`, or `None` when its shapes are not the ones the kernels
    /// were written for (bf16, head dim 128, widths multiple of 8, biases only on
    /// q/k/v).
    pub fn new(llm: &DecodeWeights) -> Result<Option<Self>> {
        let Device::Cuda(dev) = llm.device() else {
            return Ok(None);
        };
        let dev = dev.clone();
        let hidden = llm.embed_tokens.dim(1).unwrap_or(0);
        let vocab = llm.lm_head.dim(0).unwrap_or(0);
        let (nh, nkv, hd) = (llm.num_heads, llm.num_kv_heads, llm.head_dim);
        let inter = match llm.layers.first() {
            Some(l) => l.gate_up.dim(0).unwrap_or(0) / 2,
            None => return Ok(None),
        };
        let mut weights = vec![
            llm.embed_tokens.clone(),
            llm.final_norm.clone(),
            llm.lm_head.clone(),
            llm.cos.clone(),
            llm.sin.clone(),
        ];
        for l in &llm.layers {
            weights.push(l.input_norm.clone());
            weights.push(l.qkv.clone());
            match &l.qkv_bias {
                Some(b) => weights.push(b.clone()),
                None => return Ok(None),
            }
            weights.push(l.o_proj.clone());
            weights.push(l.post_norm.clone());
            weights.push(l.gate_up.clone());
            weights.push(l.down_proj.clone());
        }
        if llm.embed_tokens.dtype() != DType::BF16
            || hd != 128
            || nkv == 0
            || nh % nkv != 0
            || !hidden.is_multiple_of(8)
            || inter % 8 != 0
            || hidden * 2 > 48 * 1024
            || inter * 2 > 48 * 1024
            || !weights.iter().all(is_contiguous_bf16)
            || llm.layers.iter().any(|l| {
                l.o_proj_bias.is_some() || l.gate_up_bias.is_some() || l.down_proj_bias.is_some()
            })
        {
            tracing::debug!("fused decode: model shape not covered, using candle ops");
            return Ok(None);
        }
        let p = |t: &Tensor| dev_ptr(t);
        let layers = llm
            .layers
            .iter()
            .map(|l| {
                Ok(LayerPtrs {
                    in_norm: p(&l.input_norm)?,
                    qkv_w: p(&l.qkv)?,
                    qkv_b: p(l.qkv_bias.as_ref().expect("checked above"))?,
                    o_w: p(&l.o_proj)?,
                    post_norm: p(&l.post_norm)?,
                    gate_up_w: p(&l.gate_up)?,
                    down_w: p(&l.down_proj)?,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Some(Self {
            gemv: func(&dev, "gemv_bf16")?,
            gemv_max_blocks: sm_count(&dev)? * 8,
            layers,
            embed: p(&llm.embed_tokens)?,
            final_norm: p(&llm.final_norm)?,
            lm_head: p(&llm.lm_head)?,
            cos: p(&llm.cos)?,
            sin: p(&llm.sin)?,
            hidden,
            inter,
            nh,
            nkv,
            hd,
            vocab,
            eps: llm.rms_eps,
            max_positions: llm.cos.dim(0)?,
            _weights: weights,
            dev,
        }))
    }

    /// Whether these are `llm`'s weights (same buffers).
    pub fn serves(&self, llm: &DecodeWeights) -> bool {
        dev_ptr(&llm.lm_head).ok() == Some(self.lm_head)
    }

    /// Each layer's (key, value) buffer addresses of `state`, and its capacity. Checks
    /// they have the layout the kernels index: `[1, nkv, capacity, hd]` bf16, contiguous.
    pub fn cache_ptrs(&self, state: &impl DecodeCache) -> Result<(Vec<(u64, u64)>, usize)> {
        if state.num_layers() != self.layers.len() {
            candle_core::bail!(
                "fused decode: KV cache of {} layers for a model of {}",
                state.num_layers(),
                self.layers.len()
            );
        }
        let cap = state.capacity();
        let mut v = Vec::with_capacity(state.num_layers());
        for i in 0..state.num_layers() {
            let (k, vv) = state.layer_buffers(i).ok_or_else(|| {
                candle_core::Error::Msg("fused decode: KV cache not allocated".into())
            })?;
            let want = (1, self.nkv, cap, self.hd);
            for t in [k, vv] {
                if t.dtype() != DType::BF16 || !t.is_contiguous() || t.dims4()? != want {
                    candle_core::bail!(
                        "fused decode: KV cache must be bf16 {want:?}, got {:?} {:?}",
                        t.dtype(),
                        t.dims()
                    );
                }
            }
            v.push((dev_ptr(k)?, dev_ptr(vv)?));
        }
        Ok((v, cap))
    }

    /// The width of the fused q/k/v projection.
    pub fn qkv_rows(&self) -> usize {
        (self.nh + 2 * self.nkv) * self.hd
    }

    /// `out = W x` for one input row, W `[n, k]` (see the modes of `gemv_bf16`).
    #[allow(clippy::too_many_arguments)]
    pub fn gemv(
        &self,
        w: u64,
        x: u64,
        norm: u64,
        bias: u64,
        out: u64,
        n: usize,
        k: usize,
        mode: i32,
    ) -> Result<()> {
        let blocks = (n.div_ceil(8) as u32).min(self.gemv_max_blocks);
        let cfg = LaunchConfig {
            grid_dim: (blocks, 1, 1),
            block_dim: (256, 1, 1),
            shared_mem_bytes: (2 * k) as u32,
        };
        let (n, k, eps) = (n as i32, k as i32, self.eps);
        let stream = self.dev.cuda_stream();
        let mut b = stream.launch_builder(&self.gemv);
        b.arg(&w)
            .arg(&x)
            .arg(&norm)
            .arg(&eps)
            .arg(&bias)
            .arg(&out)
            .arg(&n)
            .arg(&k)
            .arg(&mode);
        // SAFETY: w is [n(*2 for mode 2), k] bf16, x [k], out [n]; checked at construction.
        unsafe { b.launch(cfg) }.w()?;
        Ok(())
    }
}

/// Where an argmax pass over logits `[rows, V]` keeps its partials (`parts` a row) and
/// writes each row's result: `io + row * io_stride` becomes {argmax, position + 1} and
/// log p(argmax) goes to `lp[row]` (added with `accumulate`).
pub(crate) struct ArgmaxArgs {
    pub logits: u64,
    pub rows: usize,
    pub parts: usize,
    pub am_max: u64,
    pub am_idx: u64,
    pub am_sum: u64,
    pub io: u64,
    pub io_stride: i32,
    pub lp: u64,
    pub accumulate: bool,
}

impl ModelPtrs {
    /// Enqueues the two argmax kernels (`argmax_partial`, then `argmax_final`).
    pub fn argmax(&self, part: &CudaFunction, fin: &CudaFunction, a: &ArgmaxArgs) -> Result<()> {
        enqueue_argmax(&self.dev, self.vocab, part, fin, a)
    }
}

/// Enqueues the two argmax kernels (`argmax_partial`, then `argmax_final`) over
/// logits of `vocab` columns on `dev`'s stream.
pub(crate) fn enqueue_argmax(
    dev: &CudaDevice,
    vocab: usize,
    part: &CudaFunction,
    fin: &CudaFunction,
    a: &ArgmaxArgs,
) -> Result<()> {
    let stream = dev.cuda_stream();
    let (v_i, parts) = (vocab as i32, a.parts as i32);
    let mut b = stream.launch_builder(part);
    b.arg(&a.logits)
        .arg(&v_i)
        .arg(&a.am_max)
        .arg(&a.am_idx)
        .arg(&a.am_sum);
    let cfg = LaunchConfig {
        grid_dim: (a.parts as u32, a.rows as u32, 1),
        block_dim: (256, 1, 1),
        shared_mem_bytes: 0,
    };
    // SAFETY: logits [rows, V], partial buffers [rows, parts] (the caller's).
    unsafe { b.launch(cfg) }.w()?;
    let accumulate = i32::from(a.accumulate);
    let mut b = stream.launch_builder(fin);
    b.arg(&a.am_max)
        .arg(&a.am_idx)
        .arg(&a.am_sum)
        .arg(&parts)
        .arg(&a.io)
        .arg(&a.io_stride)
        .arg(&a.lp)
        .arg(&accumulate);
    let cfg = LaunchConfig {
        grid_dim: (a.rows as u32, 1, 1),
        block_dim: (256, 1, 1),
        shared_mem_bytes: 0,
    };
    // SAFETY: as above; writes each row's io pair and lp entry.
    unsafe { b.launch(cfg) }.w()?;
    Ok(())
}

impl DecodeEngine {
    /// An engine for the decoder `llm`, or `None` when the kernels do not cover it.
    pub fn new(llm: &DecodeWeights) -> Result<Option<Self>> {
        let Some(m) = ModelPtrs::new(llm)? else {
            return Ok(None);
        };
        let device = llm.device();
        let zeros = |n: usize, dt: DType| Tensor::zeros(n, dt, device);
        let dev = &m.dev;
        let f = Funcs {
            embed: func(dev, "embed_row")?,
            rope: func(dev, "rope_kv_append")?,
            attn_part: func(dev, "attn_decode_partial")?,
            attn_comb: func(dev, "attn_decode_combine")?,
            am_part: func(dev, "argmax_partial")?,
            am_final: func(dev, "argmax_final")?,
        };
        let (nh, hd) = (m.nh, m.hd);
        Ok(Some(Self {
            f,
            x: zeros(m.hidden, DType::BF16)?,
            qkv: zeros(m.qkv_rows(), DType::BF16)?,
            q: zeros(nh * hd, DType::BF16)?,
            attn: zeros(nh * hd, DType::BF16)?,
            act: zeros(m.inter, DType::BF16)?,
            logits: zeros(m.vocab, DType::F32)?,
            part_m: zeros(nh * DEC_SPLITS, DType::F32)?,
            part_l: zeros(nh * DEC_SPLITS, DType::F32)?,
            part_o: zeros(nh * DEC_SPLITS * hd, DType::F32)?,
            am_max: zeros(ARGMAX_BLOCKS, DType::F32)?,
            am_idx: zeros(ARGMAX_BLOCKS, DType::U32)?,
            am_sum: zeros(ARGMAX_BLOCKS, DType::F32)?,
            io: zeros(2, DType::U32)?,
            lp: zeros(1, DType::F32)?,
            graph: None,
            graph_failed: false,
            m,
        }))
    }

    /// Whether this engine was built for `llm` (same weight buffers).
    pub(crate) fn serves(&self, llm: &DecodeWeights) -> bool {
        self.m.serves(llm)
    }

    /// Sets the next step's input token and position, and clears the summed
    /// log-probability.
    pub(crate) fn start(&mut self, token: u32, position: usize) -> Result<()> {
        let stream = self.m.dev.cuda_stream();
        let io = [token, position as u32];
        // SAFETY: io and lp are live device buffers of 2 u32 and 1 f32.
        unsafe {
            result::memcpy_htod_async(dev_ptr(&self.io)?, &io, stream.cu_stream()).w()?;
            result::memset_d8_async(dev_ptr(&self.lp)?, 0, 4, stream.cu_stream()).w()?;
        }
        Ok(())
    }

    /// One decode step: the token set by [`Self::start`] (or chosen by the previous
    /// step) at position `state.positions()` goes through the model, its key and value
    /// are appended to `state`, and the greedy next token is returned (the one sync).
    pub(crate) fn step(&mut self, state: &mut impl DecodeCache, use_graph: bool) -> Result<u32> {
        let pos = state.positions();
        state.reserve(pos + 1)?;
        let (caches, cap) = self.m.cache_ptrs(state)?;
        if use_graph && !self.graph_failed {
            let stale = match &self.graph {
                Some(g) => g.caches != caches || g.cap != cap,
                None => true,
            };
            if stale {
                self.graph = None;
                match self.capture(&caches, cap) {
                    Ok(g) => self.graph = Some(g),
                    Err(e) => {
                        tracing::warn!(
                            "CUDA graph capture failed ({e}); launching kernels directly"
                        );
                        self.graph_failed = true;
                    }
                }
            }
        }
        match (&self.graph, use_graph && !self.graph_failed) {
            (Some(g), true) => g.graph.launch().w()?,
            _ => self.enqueue(&caches, cap)?,
        }
        let mut io = [0u32; 2];
        let stream = self.m.dev.cuda_stream();
        // SAFETY: io is a live device buffer of 2 u32; synchronised right after.
        unsafe { result::memcpy_dtoh_async(&mut io, dev_ptr(&self.io)?, stream.cu_stream()).w()? };
        stream.synchronize().w()?;
        state.advance(1)?;
        if io[1] as usize != pos + 1 {
            candle_core::bail!("fused decode: position {} after a step at {pos}", io[1]);
        }
        Ok(io[0])
    }

    /// The logits `[V]` (f32) of the last step; overwritten by the next one.
    pub fn logits(&self) -> &Tensor {
        &self.logits
    }

    /// Sum of log p(argmax) over the steps since [`Self::start`].
    pub(crate) fn logprob_sum(&self) -> Result<f64> {
        Ok(self.lp.to_vec1::<f32>()?[0] as f64)
    }

    fn capture(&self, caches: &[(u64, u64)], cap: usize) -> Result<Captured> {
        let graph = capture_graph(&self.m.dev, || self.enqueue(caches, cap))?.0;
        tracing::debug!(
            layers = caches.len(),
            cap,
            "captured the decode step as a CUDA graph"
        );
        Ok(Captured {
            graph,
            caches: caches.to_vec(),
            cap,
        })
    }

    /// Enqueues the kernels of one step on the device's stream.
    fn enqueue(&self, caches: &[(u64, u64)], cap: usize) -> Result<()> {
        let stream = self.m.dev.cuda_stream();
        let (h, nh, nkv, hd) = (self.m.hidden, self.m.nh, self.m.nkv, self.m.hd);
        let x = dev_ptr(&self.x)?;
        let qkv = dev_ptr(&self.qkv)?;
        let q = dev_ptr(&self.q)?;
        let attn = dev_ptr(&self.attn)?;
        let act = dev_ptr(&self.act)?;
        let logits = dev_ptr(&self.logits)?;
        let (pm, pl, po) = (
            dev_ptr(&self.part_m)?,
            dev_ptr(&self.part_l)?,
            dev_ptr(&self.part_o)?,
        );
        let io = dev_ptr(&self.io)?;
        let (nh_i, nkv_i, hd_i, cap_i, h_i) =
            (nh as i32, nkv as i32, hd as i32, cap as i32, h as i32);
        let scale_log2 = (hd as f32).powf(-0.5) * std::f32::consts::LOG2_E;
        let null = 0u64;

        {
            let mut b = stream.launch_builder(&self.f.embed);
            b.arg(&self.m.embed).arg(&io).arg(&h_i).arg(&x);
            let cfg = LaunchConfig {
                grid_dim: ((h / 8).div_ceil(256) as u32, 1, 1),
                block_dim: (256, 1, 1),
                shared_mem_bytes: 0,
            };
            // SAFETY: embed is [V, h], io[0] < V (an argmax or a checked token id).
            unsafe { b.launch(cfg) }.w()?;
        }
        let qkv_rows = (nh + 2 * nkv) * hd;
        for (l, &(kc, vc)) in self.m.layers.iter().zip(caches) {
            self.m
                .gemv(l.qkv_w, x, l.in_norm, l.qkv_b, qkv, qkv_rows, h, 0)?;
            {
                let mut b = stream.launch_builder(&self.f.rope);
                b.arg(&qkv)
                    .arg(&self.m.cos)
                    .arg(&self.m.sin)
                    .arg(&io)
                    .arg(&nh_i)
                    .arg(&nkv_i)
                    .arg(&hd_i)
                    .arg(&cap_i)
                    .arg(&q)
                    .arg(&kc)
                    .arg(&vc);
                let cfg = LaunchConfig {
                    grid_dim: ((nh + nkv) as u32, 1, 1),
                    block_dim: ((hd / 2) as u32, 1, 1),
                    shared_mem_bytes: 0,
                };
                // SAFETY: position io[1] < cap (reserved by `step`) and < the RoPE table.
                unsafe { b.launch(cfg) }.w()?;
            }
            {
                let mut b = stream.launch_builder(&self.f.attn_part);
                b.arg(&q)
                    .arg(&kc)
                    .arg(&vc)
                    .arg(&io)
                    .arg(&nh_i)
                    .arg(&nkv_i)
                    .arg(&cap_i)
                    .arg(&scale_log2)
                    .arg(&pm)
                    .arg(&pl)
                    .arg(&po);
                let cfg = LaunchConfig {
                    grid_dim: (nh as u32, DEC_SPLITS as u32, 1),
                    block_dim: (128, 1, 1),
                    shared_mem_bytes: 0,
                };
                // SAFETY: reads cache rows 0..=io[1] of each kv head.
                unsafe { b.launch(cfg) }.w()?;
            }
            {
                let mut b = stream.launch_builder(&self.f.attn_comb);
                b.arg(&pm).arg(&pl).arg(&po).arg(&attn);
                let cfg = LaunchConfig {
                    grid_dim: (nh as u32, 1, 1),
                    block_dim: (128, 1, 1),
                    shared_mem_bytes: 0,
                };
                // SAFETY: partials of nh heads × DEC_SPLITS.
                unsafe { b.launch(cfg) }.w()?;
            }
            self.m.gemv(l.o_w, attn, null, null, x, h, nh * hd, 1)?;
            self.m
                .gemv(l.gate_up_w, x, l.post_norm, null, act, self.m.inter, h, 2)?;
            self.m
                .gemv(l.down_w, act, null, null, x, h, self.m.inter, 1)?;
        }
        self.m.gemv(
            self.m.lm_head,
            x,
            self.m.final_norm,
            null,
            logits,
            self.m.vocab,
            h,
            3,
        )?;
        self.m.argmax(
            &self.f.am_part,
            &self.f.am_final,
            &ArgmaxArgs {
                logits,
                rows: 1,
                parts: ARGMAX_BLOCKS,
                am_max: dev_ptr(&self.am_max)?,
                am_idx: dev_ptr(&self.am_idx)?,
                am_sum: dev_ptr(&self.am_sum)?,
                io,
                io_stride: 2,
                lp: dev_ptr(&self.lp)?,
                accumulate: true,
            },
        )?;
        Ok(())
    }
}
