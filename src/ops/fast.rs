//! Device-specific fast paths behind one switchboard, so model code asks "is there a
//! faster way for these tensors?" and falls back to plain candle ops when the answer is
//! no (CPU, Metal, a dtype or shape the kernels do not cover, or a build without the
//! `cuda` feature). Everything CUDA-specific lives in [`crate::ops::cuda`] behind
//! `cfg(feature = "cuda")`; this module compiles everywhere.
//!
//! The switches exist so one process can time the reference path and the fast path on
//! the same warm GPU (benchmarks) and check one against the other (tests). They are
//! read from `STEPAUDIO_FAST` once (`all` (default), `none`, or a comma list of
//! `mel,attention,decode,graph,gemm,epilogue,prefill,windows,splice,tiled,grouped,mma,fold`),
//! and can be changed at run time with [`set_fast_paths`].

use candle_core::{DType, Device, Result, Tensor};
use std::sync::atomic::{AtomicU16, Ordering};
use std::sync::OnceLock;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FastPaths {
    /// Log-mel on the device (one kernel per STFT frame batch).
    pub mel: bool,
    /// Fused (flash) attention for the encoder and the LLM prefill.
    pub attention: bool,
    /// The fused decode steps over preallocated buffers: Step-Audio 2's batch-1 GEMV
    /// step and batched step, Whisper's step of a stacked batch.
    pub decode: bool,
    /// Replay those decode steps as CUDA graphs (needs `decode`).
    pub graph: bool,
    /// The encoder's GEMMs straight through cuBLAS (`cublasGemmEx`, TN layout).
    pub gemm: bool,
    /// The encoder's bias + GELU and bias + residual in one pass each.
    pub epilogue: bool,
    /// Several streams' LLM prefill through the batched decode kernels (one launch
    /// sequence per layer for all streams instead of per-stream attention ops;
    /// needs `decode`).
    pub prefill: bool,
    /// Whisper's encoder windows of one engine batch in batches of similar
    /// lengths instead of one by one (a GPU only).
    pub windows: bool,
    /// Those batches' keys and values spliced (head, own, padding window) by one
    /// kernel per block instead of a few copies per window.
    pub splice: bool,
    /// The batched step's and prefill's attention by tiles (a kv head's query heads
    /// of up to a few rows of one stream read each key and value once) instead of one
    /// block per query head and row.
    pub tiled: bool,
    /// The batched step's attention by kv head: one block per kv head, stream and
    /// split of the positions, its query heads sharing each key and value read (before
    /// `tiled` and the per-row kernel, where the model's heads fit it).
    pub grouped: bool,
    /// The batched prefill's attention over tiles of a stream's rows as bf16
    /// tensor-core products (`mma.sync`, up to 9 rows of a 7-head group a tile)
    /// instead of `tiled`'s f32 lanes.
    pub mma: bool,
    /// A continuous batch's decode step that falls on an admission runs inside the
    /// admission's prefill forward, one row per running decode, instead of as a
    /// step of its own after it: one read of the weights for both.
    pub fold: bool,
}

impl FastPaths {
    pub const ALL: FastPaths = FastPaths {
        mel: true,
        attention: true,
        decode: true,
        graph: true,
        gemm: true,
        epilogue: true,
        prefill: true,
        windows: true,
        splice: true,
        tiled: true,
        grouped: true,
        mma: true,
        fold: true,
    };
    pub const NONE: FastPaths = FastPaths {
        mel: false,
        attention: false,
        decode: false,
        graph: false,
        gemm: false,
        epilogue: false,
        prefill: false,
        windows: false,
        splice: false,
        tiled: false,
        grouped: false,
        mma: false,
        fold: false,
    };

    fn bits(self) -> u16 {
        self.mel as u16
            | (self.attention as u16) << 1
            | (self.decode as u16) << 2
            | (self.graph as u16) << 3
            | (self.gemm as u16) << 4
            | (self.epilogue as u16) << 5
            | (self.prefill as u16) << 6
            | (self.windows as u16) << 7
            | (self.splice as u16) << 8
            | (self.tiled as u16) << 9
            | (self.grouped as u16) << 10
            | (self.mma as u16) << 11
            | (self.fold as u16) << 12
    }

    fn from_bits(b: u16) -> Self {
        FastPaths {
            mel: b & 1 != 0,
            attention: b & 2 != 0,
            decode: b & 4 != 0,
            graph: b & 8 != 0,
            gemm: b & 16 != 0,
            epilogue: b & 32 != 0,
            prefill: b & 64 != 0,
            windows: b & 128 != 0,
            splice: b & 256 != 0,
            tiled: b & 512 != 0,
            grouped: b & 1024 != 0,
            mma: b & 2048 != 0,
            fold: b & 4096 != 0,
        }
    }

    /// `all`, `none`, or a comma-separated subset of the switches' names.
    pub fn parse(s: &str) -> std::result::Result<Self, String> {
        match s.trim() {
            "" | "all" => return Ok(Self::ALL),
            "none" => return Ok(Self::NONE),
            _ => {}
        }
        let mut f = Self::NONE;
        for part in s.split(',') {
            match part.trim() {
                "mel" => f.mel = true,
                "attention" | "attn" => f.attention = true,
                "decode" => f.decode = true,
                "graph" => f.graph = true,
                "gemm" => f.gemm = true,
                "epilogue" => f.epilogue = true,
                "prefill" => f.prefill = true,
                "tiled" => f.tiled = true,
                "windows" => f.windows = true,
                "splice" => f.splice = true,
                "grouped" => f.grouped = true,
                "mma" => f.mma = true,
                "fold" => f.fold = true,
                other => return Err(format!("unknown fast path `{other}`")),
            }
        }
        Ok(f)
    }
}

impl std::fmt::Display for FastPaths {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if *self == Self::NONE {
            return write!(f, "none");
        }
        let names: Vec<&str> = [
            (self.mel, "mel"),
            (self.attention, "attention"),
            (self.decode, "decode"),
            (self.graph, "graph"),
            (self.gemm, "gemm"),
            (self.epilogue, "epilogue"),
            (self.prefill, "prefill"),
            (self.windows, "windows"),
            (self.splice, "splice"),
            (self.tiled, "tiled"),
            (self.grouped, "grouped"),
            (self.mma, "mma"),
            (self.fold, "fold"),
        ]
        .iter()
        .filter(|(on, _)| *on)
        .map(|(_, n)| *n)
        .collect();
        write!(f, "{}", names.join(","))
    }
}

const UNSET: u16 = 0xffff;
static FLAGS: AtomicU16 = AtomicU16::new(UNSET);

/// The switches now in force.
pub fn fast_paths() -> FastPaths {
    let b = FLAGS.load(Ordering::Relaxed);
    if b != UNSET {
        return FastPaths::from_bits(b);
    }
    static FROM_ENV: OnceLock<FastPaths> = OnceLock::new();
    let f = *FROM_ENV.get_or_init(|| match std::env::var("STEPAUDIO_FAST") {
        Ok(s) => FastPaths::parse(&s).unwrap_or_else(|e| {
            tracing::warn!("STEPAUDIO_FAST: {e}; using all fast paths");
            FastPaths::ALL
        }),
        Err(_) => FastPaths::ALL,
    });
    let _ = FLAGS.compare_exchange(UNSET, f.bits(), Ordering::Relaxed, Ordering::Relaxed);
    FastPaths::from_bits(FLAGS.load(Ordering::Relaxed))
}

pub fn set_fast_paths(f: FastPaths) {
    FLAGS.store(f.bits(), Ordering::Relaxed);
}

/// Whether this binary has any device fast path for `device` at all.
pub fn available(device: &Device) -> bool {
    #[cfg(feature = "cuda")]
    if let Device::Cuda(d) = device {
        return super::cuda::supported(d);
    }
    let _ = device;
    false
}

/// Scaled dot-product attention through the fused kernel, or `None` when it does not
/// apply (then the caller runs its reference path).
///
/// `q` `[b, h, nq, hd]`, `k`/`v` `[b, h_kv, nk, hd]` (any strides with a unit last
/// stride: views of a fused projection or of the KV cache are read in place), bf16.
/// Query head `i` uses kv head `i / (h / h_kv)`. With `causal`, query `i` sees keys
/// `0..=i + nk - nq`. `key_bias` `[b, nk]` f32 is added to the scaled scores (the
/// encoder's padding mask). Returns `[b, nq, h, hd]` (heads merged by a reshape).
pub fn attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    scale: f32,
    causal: bool,
    key_bias: Option<&Tensor>,
) -> Result<Option<Tensor>> {
    if !fast_paths().attention || q.dtype() != DType::BF16 {
        return Ok(None);
    }
    #[cfg(feature = "cuda")]
    if let Device::Cuda(d) = q.device() {
        if super::cuda::supported(d) {
            return super::cuda::attention::flash_attention(q, k, v, scale, causal, key_bias);
        }
    }
    let _ = (k, v, scale, causal, key_bias);
    Ok(None)
}

fn cuda_bf16(t: &Tensor) -> bool {
    #[cfg(feature = "cuda")]
    if let Device::Cuda(d) = t.device() {
        return t.dtype() == DType::BF16 && super::cuda::supported(d);
    }
    let _ = t;
    false
}

/// `x W^T` (`W` `[N, K]` as stored) through cuBLAS directly, or `None` (then the caller
/// uses candle's matmul).
pub fn matmul_t(x: &Tensor, w: &Tensor) -> Result<Option<Tensor>> {
    if !fast_paths().gemm || !cuda_bf16(x) {
        return Ok(None);
    }
    #[cfg(feature = "cuda")]
    return super::cuda::linear::matmul_t(x, w);
    #[cfg(not(feature = "cuda"))]
    {
        let _ = w;
        Ok(None)
    }
}

/// `gelu_erf(y + bias)` in one pass; `y` must be a fresh tensor nothing else shares (it
/// is overwritten). `None` when the fused kernel does not apply.
pub fn bias_gelu(y: &Tensor, bias: &Tensor) -> Result<Option<Tensor>> {
    if !fast_paths().epilogue || !cuda_bf16(y) {
        return Ok(None);
    }
    #[cfg(feature = "cuda")]
    return super::cuda::linear::bias_gelu(y, bias);
    #[cfg(not(feature = "cuda"))]
    {
        let _ = bias;
        Ok(None)
    }
}

/// `resid + (y + bias)` in one pass, or `None`.
pub fn bias_residual(y: &Tensor, bias: &Tensor, resid: &Tensor) -> Result<Option<Tensor>> {
    if !fast_paths().epilogue || !cuda_bf16(y) {
        return Ok(None);
    }
    #[cfg(feature = "cuda")]
    return super::cuda::linear::bias_residual(y, bias, resid);
    #[cfg(not(feature = "cuda"))]
    {
        let _ = (bias, resid);
        Ok(None)
    }
}

/// One row of a batch of encoder windows for [`splice_rows`].
pub struct SpliceRow<'a> {
    /// Keys and values `[1, h, c, hd]` of audio encoded earlier (none: c = 0).
    pub head: Option<(&'a Tensor, &'a Tensor)>,
    /// Keys and values `[1, h, T, hd]` of the row's padding-only window.
    pub whole: (&'a Tensor, &'a Tensor),
    /// The row's own new positions (its rows of the batch past them are padding).
    pub own: usize,
}

/// The keys and values `[R, h, T, hd]` a batch of encoder windows attends to: row r's
/// head, then its first `own` keys and values of the block's fused projection `qkv`
/// `[R, t, 3, h, hd]`, then its padding window's from there on; one kernel. `None`
/// where it does not apply (then the caller splices with candle ops).
pub fn splice_rows(qkv: &Tensor, rows: &[SpliceRow<'_>]) -> Result<Option<(Tensor, Tensor)>> {
    if !fast_paths().splice || !cuda_bf16(qkv) {
        return Ok(None);
    }
    #[cfg(feature = "cuda")]
    return super::cuda::linear::splice_rows(qkv, rows);
    #[cfg(not(feature = "cuda"))]
    {
        let _ = rows;
        Ok(None)
    }
}

/// The kernels of the batched step's and prefill's attention ([`rows_attention`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RowsKernel {
    /// Tiles of a stream's consecutive rows, as a prefill makes them.
    Tiled,
    /// One block per query head and row.
    PerRow,
    /// One block per kv head and row, as a step runs it.
    Grouped,
    /// Tiles of a stream's consecutive rows on tensor cores, as a prefill makes them
    /// with `mma` on.
    Mma,
}

/// The batched decode step's and prefill's attention alone, for checks against a
/// reference: `q` `[rows, nh, 128]` (bf16); row `r` is stream `rows[r].0`'s query at
/// position `rows[r].1` over that stream's `caches` entry (keys, values, each
/// `[nkv, capacity, 128]` bf16) up to and including that position, one stream's rows
/// consecutive; `kernel` picks which kernel runs them. `[rows, nh * 128]` (bf16);
/// `None` without CUDA.
pub fn rows_attention(
    q: &Tensor,
    rows: &[(usize, usize)],
    caches: &[(Tensor, Tensor)],
    kernel: RowsKernel,
) -> Result<Option<Tensor>> {
    #[cfg(feature = "cuda")]
    return super::cuda::decode_batch::rows_attention(q, rows, caches, kernel).map(Some);
    #[cfg(not(feature = "cuda"))]
    {
        let _ = (q, rows, caches, kernel);
        Ok(None)
    }
}

/// Chooses the flash kernel variant for head dim 64 (`default`, `2stage`, `1stage`,
/// `w8`); a no-op without CUDA.
pub fn set_flash_variant(v: &str) -> Result<()> {
    #[cfg(feature = "cuda")]
    return super::cuda::attention::set_variant(v);
    #[cfg(not(feature = "cuda"))]
    {
        let _ = v;
        Ok(())
    }
}

/// `y += bias` in place (rows of `bias.len()`); `y` must be a fresh tensor nothing else
/// shares. `None` when the kernel does not apply.
pub fn bias_add(y: &Tensor, bias: &Tensor) -> Result<Option<Tensor>> {
    if !fast_paths().epilogue || !cuda_bf16(y) {
        return Ok(None);
    }
    #[cfg(feature = "cuda")]
    return super::cuda::linear::bias_add(y, bias);
    #[cfg(not(feature = "cuda"))]
    {
        let _ = bias;
        Ok(None)
    }
}

/// LayerNorm over the last dim in one kernel (one warp per row), or `None`.
pub fn layer_norm(x: &Tensor, gamma: &Tensor, beta: &Tensor, eps: f32) -> Result<Option<Tensor>> {
    if !fast_paths().epilogue || !cuda_bf16(x) {
        return Ok(None);
    }
    #[cfg(feature = "cuda")]
    return super::cuda::linear::layer_norm(x, gamma, beta, eps);
    #[cfg(not(feature = "cuda"))]
    {
        let _ = (gamma, beta, eps);
        Ok(None)
    }
}

/// `x = resid + (y + bias)` and `LayerNorm(x)` in one pass, or `None`.
pub fn bias_residual_layer_norm(
    y: &Tensor,
    bias: &Tensor,
    resid: &Tensor,
    gamma: &Tensor,
    beta: &Tensor,
    eps: f32,
) -> Result<Option<(Tensor, Tensor)>> {
    if !fast_paths().epilogue || !cuda_bf16(y) {
        return Ok(None);
    }
    #[cfg(feature = "cuda")]
    return super::cuda::linear::bias_residual_layer_norm(y, bias, resid, gamma, beta, eps);
    #[cfg(not(feature = "cuda"))]
    {
        let _ = (bias, resid, gamma, beta, eps);
        Ok(None)
    }
}

/// Peak bytes allocated from the CUDA device's memory pool since the last reset (the
/// pool keeps freed memory, so total − free overstates what is in use), where known.
pub fn device_memory_peak(device: &Device, reset: bool) -> Option<usize> {
    #[cfg(feature = "cuda")]
    if let Device::Cuda(d) = device {
        return super::cuda::pool_peak(d, reset).ok();
    }
    let _ = (device, reset);
    None
}

/// The STFT the device log-mel computes (`MEL_NFFT`, `MEL_HOP`, `MEL_NBINS` of
/// `kernels.cu`): 400-sample periodic Hann frames every 160 samples, 201 bins.
pub const DEVICE_MEL_N_FFT: usize = 400;
pub const DEVICE_MEL_HOP: usize = 160;
pub const DEVICE_MEL_BINS: usize = DEVICE_MEL_N_FFT / 2 + 1;

/// Log-mel of 16 kHz audio computed on `device` (Whisper formula, `tail_zeros` zero
/// samples appended, global-max clamp over this mel), as `[n_mels, n_frames]` f32 on
/// the device, or `None` when the device has no kernel for it.
pub struct DeviceMel {
    #[cfg(feature = "cuda")]
    inner: super::cuda::mel::CudaMel,
}

impl DeviceMel {
    /// `filterbank` is the dense mel filterbank `[n_mels, DEVICE_MEL_BINS]` (row-major)
    /// of the CPU frontend, so both compute the same mel.
    pub fn new(filterbank: &[f32], n_mels: usize, device: &Device) -> Result<Option<Self>> {
        if filterbank.len() != n_mels * DEVICE_MEL_BINS {
            candle_core::bail!(
                "device log-mel: a filterbank of {} values is not {n_mels} × {DEVICE_MEL_BINS}",
                filterbank.len()
            );
        }
        #[cfg(feature = "cuda")]
        if let Device::Cuda(d) = device {
            if super::cuda::supported(d) {
                return Ok(Some(Self {
                    inner: super::cuda::mel::CudaMel::new(filterbank, n_mels, d)?,
                }));
            }
        }
        let _ = device;
        Ok(None)
    }

    /// Uploads `audio` and returns its log-mel `[n_mels, (len + tail_zeros) / 160]` (f32).
    pub fn compute(&self, audio: &[f32], tail_zeros: usize) -> Result<Tensor> {
        #[cfg(feature = "cuda")]
        return self.inner.compute(audio, tail_zeros);
        #[cfg(not(feature = "cuda"))]
        {
            let _ = (audio, tail_zeros);
            candle_core::bail!("no device log-mel in this build")
        }
    }

    /// The same from audio already on the device (`[len]` f32).
    pub fn compute_on_device(&self, audio: &Tensor, tail_zeros: usize) -> Result<Tensor> {
        #[cfg(feature = "cuda")]
        return self.inner.compute_tensor(audio, tail_zeros);
        #[cfg(not(feature = "cuda"))]
        {
            let _ = (audio, tail_zeros);
            candle_core::bail!("no device log-mel in this build")
        }
    }
}

/// Device memory in use on the device of `device` (total − free), in bytes, where the
/// backend can tell.
pub fn device_memory_used(device: &Device) -> Option<usize> {
    #[cfg(feature = "cuda")]
    if let Device::Cuda(d) = device {
        return super::cuda::memory_used(d).ok();
    }
    let _ = device;
    None
}

/// Free device memory on the device of `device`, in bytes, where the backend can tell.
pub fn device_memory_free(device: &Device) -> Option<usize> {
    #[cfg(feature = "cuda")]
    if let Device::Cuda(d) = device {
        return super::cuda::memory_free(d).ok();
    }
    let _ = device;
    None
}

/// Lets f32 matrix products use TF32 tensor cores on CUDA (about 10 bits of mantissa
/// in the products; off by default). No effect elsewhere.
pub fn set_tf32(on: bool) {
    #[cfg(feature = "cuda")]
    candle_core::cuda::set_gemm_reduced_precision_f32(on);
    let _ = on;
}

/// What the fused decode step reads of a Qwen2-shaped decoder: pre-norm layers
/// (RMSNorm), grouped-query attention with fused q/k/v projection and bias, RoPE on
/// non-interleaved halves, a SiLU-gated MLP with fused gate/up projection, a final
/// RMSNorm and an untied vocabulary head. Weights are stored `[out, in]`. The model
/// builds it from its own layers (the tensors are shared, not copied); the kernels
/// check dtypes, shapes and which biases are present.
#[derive(Clone, Debug)]
pub struct DecodeWeights {
    /// Token embeddings `[V, H]`.
    pub embed_tokens: Tensor,
    pub layers: Vec<DecodeLayerWeights>,
    /// Final RMSNorm weight `[H]`.
    pub final_norm: Tensor,
    /// Epsilon of every RMSNorm.
    pub rms_eps: f32,
    /// Vocabulary head `[V, H]`.
    pub lm_head: Tensor,
    /// RoPE tables `[max_positions, head_dim / 2]`.
    pub cos: Tensor,
    pub sin: Tensor,
    pub num_heads: usize,
    pub num_kv_heads: usize,
    pub head_dim: usize,
}

/// One layer of [`DecodeWeights`].
#[derive(Clone, Debug)]
pub struct DecodeLayerWeights {
    /// RMSNorm weight before attention `[H]`.
    pub input_norm: Tensor,
    /// q, k and v projections stacked: `[(heads + 2·kv_heads)·head_dim, H]`.
    pub qkv: Tensor,
    pub qkv_bias: Option<Tensor>,
    pub o_proj: Tensor,
    pub o_proj_bias: Option<Tensor>,
    /// RMSNorm weight before the MLP `[H]`.
    pub post_norm: Tensor,
    /// Gate and up projections stacked: `[2·I, H]`.
    pub gate_up: Tensor,
    pub gate_up_bias: Option<Tensor>,
    pub down_proj: Tensor,
    pub down_proj_bias: Option<Tensor>,
}

#[cfg(feature = "cuda")]
impl DecodeWeights {
    pub(crate) fn device(&self) -> &Device {
        self.embed_tokens.device()
    }
}

/// The per-layer key/value buffers of one stream, which the fused decode step writes
/// its new position into (the model's KV state implements it).
pub trait DecodeCache {
    /// Positions stored (the same in every layer).
    fn positions(&self) -> usize;
    /// Positions allocated (the same in every layer).
    fn capacity(&self) -> usize;
    fn num_layers(&self) -> usize;
    /// Makes room for `needed` positions in every layer.
    fn reserve(&mut self, needed: usize) -> Result<()>;
    /// Counts `n` positions written into every layer's buffers by the kernels.
    fn advance(&mut self, n: usize) -> Result<()>;
    /// Whole key and value buffers `[1, kv_heads, capacity, head_dim]` of layer `i`.
    fn layer_buffers(&self, i: usize) -> Option<(&Tensor, &Tensor)>;
}

/// The fused batch-1 decode step of one session (it bakes that session's KV-cache
/// buffers into a CUDA graph). Empty until [`FusedDecoder::prepare`] finds it applies.
#[derive(Default)]
pub struct FusedDecoder {
    #[cfg(feature = "cuda")]
    engine: Option<super::cuda::decode::DecodeEngine>,
    /// The model was checked and is not covered: do not check again.
    #[cfg(feature = "cuda")]
    unsupported: bool,
}

/// A fused decoder ready to step (borrowed from its [`FusedDecoder`]).
pub struct FusedStep<'a> {
    #[cfg(feature = "cuda")]
    engine: &'a mut super::cuda::decode::DecodeEngine,
    #[cfg(feature = "cuda")]
    graph: bool,
    #[cfg(not(feature = "cuda"))]
    never: std::convert::Infallible,
    _life: std::marker::PhantomData<&'a mut ()>,
}

/// The engine in `slot` for `weights`, with whether to replay CUDA graphs, when
/// the decode fast path is switched on for their device: made anew when it
/// serves other weights; `None` (and not tried again) when the kernels do not
/// cover the model.
#[cfg(feature = "cuda")]
fn engine_for<'a, E, W>(
    slot: &'a mut Option<E>,
    unsupported: &mut bool,
    weights: &W,
    device: &Device,
    serves: impl Fn(&E, &W) -> bool,
    new: impl FnOnce(&W) -> Result<Option<E>>,
) -> Result<Option<(&'a mut E, bool)>> {
    let flags = fast_paths();
    if !flags.decode || !available(device) || *unsupported {
        return Ok(None);
    }
    if !slot.as_ref().is_some_and(|e| serves(e, weights)) {
        *slot = new(weights)?;
        *unsupported = slot.is_none();
    }
    Ok(slot.as_mut().map(|e| (e, flags.graph)))
}

impl FusedDecoder {
    /// The fused step for the decoder `weights`, if the fast path is switched on and
    /// covers it.
    pub fn prepare(&mut self, weights: &DecodeWeights) -> Result<Option<FusedStep<'_>>> {
        #[cfg(feature = "cuda")]
        return Ok(engine_for(
            &mut self.engine,
            &mut self.unsupported,
            weights,
            weights.device(),
            super::cuda::decode::DecodeEngine::serves,
            super::cuda::decode::DecodeEngine::new,
        )?
        .map(|(engine, graph)| FusedStep {
            engine,
            graph,
            _life: std::marker::PhantomData,
        }));
        #[cfg(not(feature = "cuda"))]
        {
            let _ = weights;
            Ok(None)
        }
    }
}

impl FusedStep<'_> {
    /// The next step's input token and its position; clears the log-probability sum.
    pub fn start(&mut self, token: u32, position: usize) -> Result<()> {
        #[cfg(feature = "cuda")]
        return self.engine.start(token, position);
        #[cfg(not(feature = "cuda"))]
        {
            let _ = (token, position);
            match self.never {}
        }
    }

    /// Runs the pending token at `state.positions()`, appends its key/value, returns
    /// the greedy next token (which becomes the next step's input).
    pub fn step(&mut self, state: &mut impl DecodeCache) -> Result<u32> {
        #[cfg(feature = "cuda")]
        return self.engine.step(state, self.graph);
        #[cfg(not(feature = "cuda"))]
        {
            let _ = state;
            match self.never {}
        }
    }

    /// A copy of the last step's logits `[V]` (f32).
    pub fn logits(&self) -> Result<Tensor> {
        #[cfg(feature = "cuda")]
        return self.engine.logits().copy();
        #[cfg(not(feature = "cuda"))]
        match self.never {}
    }

    /// Sum of the chosen tokens' log-probabilities since [`Self::start`].
    pub(crate) fn logprob_sum(&self) -> Result<f64> {
        #[cfg(feature = "cuda")]
        return self.engine.logprob_sum();
        #[cfg(not(feature = "cuda"))]
        match self.never {}
    }
}

/// The fused decode step of several streams at once (CUDA, bf16), each over its own KV
/// cache; shared by all sessions of one model (it keeps no stream's state between
/// steps, only scratch buffers and one CUDA graph per batch-size bucket). Empty until
/// [`FusedBatchDecoder::prepare`] finds it applies.
#[derive(Default)]
pub struct FusedBatchDecoder {
    #[cfg(feature = "cuda")]
    engine: Option<super::cuda::decode_batch::BatchDecodeEngine>,
    #[cfg(feature = "cuda")]
    unsupported: bool,
}

/// A batched fused decoder ready to step (borrowed from its [`FusedBatchDecoder`]).
pub struct FusedBatchStep<'a> {
    #[cfg(feature = "cuda")]
    engine: &'a mut super::cuda::decode_batch::BatchDecodeEngine,
    #[cfg(feature = "cuda")]
    graph: bool,
    #[cfg(not(feature = "cuda"))]
    never: std::convert::Infallible,
    _life: std::marker::PhantomData<&'a mut ()>,
}

impl FusedBatchDecoder {
    /// The batched step for the decoder `weights`, if the fast path is switched on and
    /// covers it.
    pub fn prepare(&mut self, weights: &DecodeWeights) -> Result<Option<FusedBatchStep<'_>>> {
        #[cfg(feature = "cuda")]
        return Ok(engine_for(
            &mut self.engine,
            &mut self.unsupported,
            weights,
            weights.device(),
            super::cuda::decode_batch::BatchDecodeEngine::serves,
            super::cuda::decode_batch::BatchDecodeEngine::new,
        )?
        .map(|(engine, graph)| FusedBatchStep {
            engine,
            graph,
            _life: std::marker::PhantomData,
        }));
        #[cfg(not(feature = "cuda"))]
        {
            let _ = weights;
            Ok(None)
        }
    }
}

impl FusedBatchStep<'_> {
    /// One step of `states.len()` streams: `tokens[i]` goes in at
    /// `states[i].positions()`; returns each stream's greedy next token and its
    /// log-probability.
    pub fn step<S: DecodeCache>(
        &mut self,
        tokens: &[u32],
        states: &mut [&mut S],
    ) -> Result<Vec<(u32, f32)>> {
        #[cfg(feature = "cuda")]
        return self.engine.step(tokens, states, self.graph);
        #[cfg(not(feature = "cuda"))]
        {
            let _ = (tokens, states);
            match self.never {}
        }
    }

    /// Several streams' new positions (`embeds[i]` `[1, n_i, H]` at
    /// `states[i].positions()..`) as one batch of rows through the same kernels;
    /// each stream's final-norm hidden states `[1, n_i, H]`. `None` when the
    /// `prefill` switch is off.
    pub fn prefill<S: DecodeCache>(
        &mut self,
        embeds: &[Tensor],
        states: &mut [&mut S],
    ) -> Result<Option<Vec<Tensor>>> {
        if !fast_paths().prefill {
            return Ok(None);
        }
        #[cfg(feature = "cuda")]
        return self.engine.prefill(embeds, states).map(Some);
        #[cfg(not(feature = "cuda"))]
        {
            let _ = (embeds, states);
            match self.never {}
        }
    }

    /// A copy of the last step's logits `[streams, V]` (f32).
    pub fn logits(&self) -> Result<Tensor> {
        #[cfg(feature = "cuda")]
        return self.engine.logits();
        #[cfg(not(feature = "cuda"))]
        match self.never {}
    }
}

/// What the fused Whisper decode step reads of a Whisper decoder: pre-norm layers
/// (LayerNorm with bias), self-attention with a fused q/k/v projection, cross-attention
/// over the encoded window, a GELU MLP, learned positions, a final LayerNorm and the
/// vocabulary head tied to the token embedding. Every projection `(weight [out, in],
/// bias [out])` has a bias (Whisper's key projection a zero one); norms are `(γ, β)`.
/// The model builds it from its own layers (tensors shared, not copied).
#[derive(Clone, Debug)]
pub struct WhisperStepWeights {
    /// `[V, d]`, also the vocabulary head.
    pub token_embedding: Tensor,
    /// `[n_text_ctx, d]`.
    pub positions: Tensor,
    pub layers: Vec<WhisperStepLayer>,
    pub final_norm: (Tensor, Tensor),
    /// Epsilon of every LayerNorm.
    pub eps: f32,
    pub heads: usize,
}

/// One layer of [`WhisperStepWeights`].
#[derive(Clone, Debug)]
pub struct WhisperStepLayer {
    pub self_norm: (Tensor, Tensor),
    /// `[3·d, d]`: q, k, v.
    pub self_qkv: (Tensor, Tensor),
    pub self_out: (Tensor, Tensor),
    pub cross_norm: (Tensor, Tensor),
    pub cross_q: (Tensor, Tensor),
    pub cross_out: (Tensor, Tensor),
    pub mlp_norm: (Tensor, Tensor),
    pub fc1: (Tensor, Tensor),
    pub fc2: (Tensor, Tensor),
}

#[cfg(feature = "cuda")]
impl WhisperStepWeights {
    fn device(&self) -> &Device {
        self.token_embedding.device()
    }
}

/// The rows of one step of a stacked Whisper decode (row r of every tensor is one
/// window).
pub struct WhisperStepRows<'a> {
    /// Per layer: self-attention keys and values `[R, heads, capacity, 64]`, bf16.
    pub self_kv: &'a [(Tensor, Tensor)],
    /// Per layer: the windows' cross-attention keys and values `[R, heads, T, 64]`.
    pub cross: &'a [(Tensor, Tensor)],
    /// Per row: the token going in, its learned position, its first column.
    pub tokens: &'a [u32],
    pub positions: &'a [u32],
    pub first: &'a [usize],
    /// The column every row's key and value go to; a row attends to its columns
    /// `first..=column`.
    pub column: usize,
    /// Added to the logits before the argmax: the logit rules' suppression `[V]` f32.
    pub suppress: &'a Tensor,
}

/// Whisper's fused decode step (CUDA, bf16, head dimension 64): the step of a stacked
/// decode's rows as one CUDA graph per batch-size bucket, returning each row's greedy
/// pick; shared by all batches of one model (it keeps only scratch buffers and
/// graphs). Switched by `decode` (and `graph` for the replay). Empty until a step finds
/// it applies.
#[derive(Default)]
pub struct WhisperFusedStep {
    #[cfg(feature = "cuda")]
    engine: Option<super::cuda::whisper_step::WhisperStepEngine>,
    #[cfg(feature = "cuda")]
    unsupported: bool,
}

impl WhisperFusedStep {
    /// One step of `rows` through the decoder `weights`: each row's greedy next token
    /// and its log-probability, or `None` when the fast path is off or does not cover
    /// the model (then the caller steps through candle ops).
    pub fn step(
        &mut self,
        weights: &WhisperStepWeights,
        rows: &WhisperStepRows<'_>,
    ) -> Result<Option<Vec<(u32, f32)>>> {
        #[cfg(feature = "cuda")]
        {
            let engine = engine_for(
                &mut self.engine,
                &mut self.unsupported,
                weights,
                weights.device(),
                super::cuda::whisper_step::WhisperStepEngine::serves,
                super::cuda::whisper_step::WhisperStepEngine::new,
            )?;
            match engine {
                Some((e, graph)) => Ok(Some(e.step(rows, graph)?)),
                None => Ok(None),
            }
        }
        #[cfg(not(feature = "cuda"))]
        {
            let _ = (weights, rows);
            Ok(None)
        }
    }

    /// Not used again (after a failure): [`Self::step`] answers `None`.
    pub fn disable(&mut self) {
        #[cfg(feature = "cuda")]
        {
            self.engine = None;
            self.unsupported = true;
        }
    }

    /// The final-norm hidden states `[rows, d]` of the last step (a copy; for checks).
    pub fn last_hidden(&self) -> Result<Tensor> {
        #[cfg(feature = "cuda")]
        if let Some(e) = &self.engine {
            return e.last_hidden();
        }
        candle_core::bail!("no fused Whisper step has run")
    }
}

#[cfg(test)]
mod tests {
    use super::FastPaths;

    /// Each switch alone, and all but it: through the stored bits and through the
    /// `STEPAUDIO_FAST` text, every switch keeps its own place.
    #[test]
    fn every_switch_round_trips_alone_and_left_out() {
        let names = FastPaths::ALL.to_string();
        let names: Vec<&str> = names.split(',').collect();
        assert_eq!(names.len(), 13, "{names:?}");
        for (i, name) in names.iter().enumerate() {
            let alone = FastPaths::parse(name).unwrap();
            assert_eq!(alone.to_string(), *name);
            assert_eq!(FastPaths::from_bits(alone.bits()), alone);
            let others: Vec<&str> = names
                .iter()
                .enumerate()
                .filter(|&(j, _)| j != i)
                .map(|(_, n)| *n)
                .collect();
            let rest = FastPaths::parse(&others.join(",")).unwrap();
            assert_eq!(FastPaths::from_bits(rest.bits()), rest);
            assert_ne!(rest, FastPaths::ALL, "{name} left out");
            assert_eq!(rest.to_string(), others.join(","));
        }
        assert_eq!(FastPaths::parse("all").unwrap(), FastPaths::ALL);
        assert_eq!(FastPaths::parse("none").unwrap(), FastPaths::NONE);
        assert!(FastPaths::parse("tiled,nonsense").is_err());
    }
}
