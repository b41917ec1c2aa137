//! CUDA kernels of the hot paths (built only with the `cuda` feature): the kernels are
//! in `kernels.cu`, compiled to PTX by `build.rs` and loaded once per device through
//! candle's custom-module cache. See [`crate::ops::fast`] for how model code reaches
//! them and falls back when they do not apply.

pub mod attention;
pub mod decode;
pub mod decode_batch;
pub mod linear;
pub mod mel;
pub mod whisper_step;

use candle_core::cuda::cudarc::driver::sys::CUdevice_attribute;
use candle_core::cuda::cudarc::driver::{CudaFunction, CudaGraph, DevicePtr};
use candle_core::cuda::{CudaDevice, CudaStorageSlice, WrapErr};
use candle_core::{Result, Storage, Tensor};
use std::collections::HashMap;
use std::sync::Mutex;

pub(crate) const PTX: &str = include_str!(concat!(env!("OUT_DIR"), "/stepaudio_kernels.ptx"));
const MODULE: &str = "stepaudio_live_kernels";

/// A kernel of `kernels.cu`, loaded on first use; launch it on `dev.cuda_stream()`.
pub(crate) fn func(dev: &CudaDevice, name: &str) -> Result<CudaFunction> {
    Ok(dev
        .get_or_load_custom_func(name, MODULE, PTX)?
        .into_cuda_function())
}

/// Whether the kernels can run on this GPU: they use bf16 tensor-core instructions of
/// compute capability 8.0 (Ampere) and newer. Cached per device.
pub(crate) fn supported(dev: &CudaDevice) -> bool {
    static CACHE: Mutex<Option<HashMap<candle_core::cuda::DeviceId, bool>>> = Mutex::new(None);
    let mut cache = CACHE.lock().unwrap_or_else(|e| e.into_inner());
    *cache
        .get_or_insert_with(HashMap::new)
        .entry(dev.id())
        .or_insert_with(|| {
            let ctx = dev.cuda_stream().context().clone();
            match ctx.compute_capability() {
                Ok((major, _)) if major >= 8 => true,
                Ok((major, minor)) => {
                    tracing::info!(
                        "GPU compute capability {major}.{minor} < 8.0: custom kernels off, plain candle ops"
                    );
                    false
                }
                Err(e) => {
                    tracing::warn!("could not read the GPU's compute capability: {e}");
                    false
                }
            }
        })
}

/// Keeps freed memory in the device's stream-ordered pool instead of returning it to the
/// driver at every synchronisation (the default release threshold is 0). candle
/// allocates every op's output with cuMemAllocAsync, so without this each host sync (one
/// per decoded token, one per timed stage) makes the next allocations map memory again.
pub(crate) fn keep_pool_memory(dev: &CudaDevice) -> Result<()> {
    use candle_core::cuda::cudarc::driver::{result, sys};
    let ctx = dev.cuda_stream().context().clone();
    ctx.bind_to_thread().w()?;
    // SAFETY: the device handle comes from a live context; the attribute is a u64.
    unsafe {
        let pool = result::device::get_mem_pool(ctx.cu_device()).w()?;
        let mut threshold: u64 = u64::MAX;
        result::mem_pool::set_attribute(
            pool,
            sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_RELEASE_THRESHOLD,
            (&mut threshold) as *mut u64 as *mut _,
        )
        .w()?;
    }
    Ok(())
}

/// Peak bytes allocated from the device's pool (`CU_MEMPOOL_ATTR_USED_MEM_HIGH`),
/// optionally resetting the high-water mark afterwards.
pub(crate) fn pool_peak(dev: &CudaDevice, reset: bool) -> Result<usize> {
    use candle_core::cuda::cudarc::driver::{result, sys};
    let ctx = dev.cuda_stream().context().clone();
    ctx.bind_to_thread().w()?;
    // SAFETY: as in `keep_pool_memory`; the attribute is a u64.
    unsafe {
        let pool = result::device::get_mem_pool(ctx.cu_device()).w()?;
        let mut v: u64 = 0;
        sys::cuMemPoolGetAttribute(
            pool,
            sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_USED_MEM_HIGH,
            (&mut v) as *mut u64 as *mut _,
        )
        .result()
        .w()?;
        if reset {
            let mut zero: u64 = 0;
            result::mem_pool::set_attribute(
                pool,
                sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_USED_MEM_HIGH,
                (&mut zero) as *mut u64 as *mut _,
            )
            .w()?;
        }
        Ok(v as usize)
    }
}

pub(crate) fn sm_count(dev: &CudaDevice) -> Result<u32> {
    let n = dev
        .cuda_stream()
        .context()
        .attribute(CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT)
        .w()?;
    Ok(n.max(1) as u32)
}

pub(crate) fn memory_used(dev: &CudaDevice) -> Result<usize> {
    let (free, total) = dev.cuda_stream().context().mem_get_info().w()?;
    Ok(total - free)
}

pub(crate) fn memory_free(dev: &CudaDevice) -> Result<usize> {
    Ok(dev.cuda_stream().context().mem_get_info().w()?.0)
}

/// A captured CUDA graph of a decode step.
pub(crate) struct Graph(pub CudaGraph);
// SAFETY: a graph may be launched from any host thread as long as launches are
// serialised; its engine is behind `&mut self` for every launch.
unsafe impl Send for Graph {}

/// Captures what `enqueue` launches on `dev`'s stream as a CUDA graph, uploaded
/// and ready to launch.
pub(crate) fn capture_graph(
    dev: &CudaDevice,
    enqueue: impl FnOnce() -> Result<()>,
) -> Result<Graph> {
    use candle_core::cuda::cudarc::driver::sys::{CUgraphInstantiate_flags, CUstreamCaptureMode};
    let stream = dev.cuda_stream();
    stream
        .begin_capture(CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_THREAD_LOCAL)
        .w()?;
    let enq = enqueue();
    let graph = stream.end_capture(CUgraphInstantiate_flags(0)).w();
    enq?;
    let graph = graph?.ok_or_else(|| candle_core::Error::Msg("empty CUDA graph".into()))?;
    graph.upload().w()?;
    Ok(Graph(graph))
}

/// The CUDA graphs of a batched step, one per row bucket, captured on first
/// use; once a capture fails, every step launches its kernels directly.
#[derive(Default)]
pub(crate) struct BucketGraphs {
    graphs: HashMap<usize, Graph>,
    failed: bool,
}

impl BucketGraphs {
    /// Drops the graphs (they name buffers about to be replaced); a failed
    /// capture is still remembered.
    pub(crate) fn clear(&mut self) {
        self.graphs.clear();
    }

    /// Runs `bucket`'s step: its graph when `use_graph` (made by `capture` the
    /// first time), else `enqueue`'s launches. `what` names the engine in the
    /// warning a failed capture leaves.
    pub(crate) fn run(
        &mut self,
        bucket: usize,
        use_graph: bool,
        what: &str,
        capture: impl FnOnce() -> Result<Graph>,
        enqueue: impl FnOnce() -> Result<()>,
    ) -> Result<()> {
        if use_graph && !self.failed && !self.graphs.contains_key(&bucket) {
            match capture() {
                Ok(g) => {
                    self.graphs.insert(bucket, g);
                }
                Err(e) => {
                    tracing::warn!(
                        "{what}: CUDA graph capture failed ({e}); launching kernels directly"
                    );
                    self.failed = true;
                }
            }
        }
        match self.graphs.get(&bucket) {
            Some(g) if use_graph && !self.failed => g.0.launch().w(),
            _ => enqueue(),
        }
    }
}

/// Copies a step's results back — the first `n` rows of its row table into
/// `table` (`row_ints` entries a row) and its `n` log-probabilities — and
/// waits for the stream.
pub(crate) fn read_rows(
    dev: &CudaDevice,
    table: &mut [u32],
    table_ptr: u64,
    lp_ptr: u64,
    n: usize,
    row_ints: usize,
) -> Result<Vec<f32>> {
    use candle_core::cuda::cudarc::driver::result;
    let stream = dev.cuda_stream();
    let mut lp = vec![0f32; n];
    // SAFETY: the device buffers hold at least `n` rows (the step's bucket);
    // the copies complete before the synchronise below returns.
    unsafe {
        result::memcpy_dtoh_async(&mut table[..n * row_ints], table_ptr, stream.cu_stream()).w()?;
        result::memcpy_dtoh_async(&mut lp, lp_ptr, stream.cu_stream()).w()?;
    }
    stream.synchronize().w()?;
    Ok(lp)
}

/// Device address of the first element of `t` (its layout's start offset included).
/// The address stays valid while `t`'s storage lives; callers keep a clone of `t`.
pub(crate) fn dev_ptr(t: &Tensor) -> Result<u64> {
    let (storage, layout) = t.storage_and_layout();
    let Storage::Cuda(cs) = &*storage else {
        candle_core::bail!("expected a CUDA tensor, got one on {:?}", t.device())
    };
    let stream = cs.device.cuda_stream();
    let base = match &cs.slice {
        CudaStorageSlice::BF16(s) => s.device_ptr(&stream).0,
        CudaStorageSlice::F16(s) => s.device_ptr(&stream).0,
        CudaStorageSlice::F32(s) => s.device_ptr(&stream).0,
        CudaStorageSlice::U32(s) => s.device_ptr(&stream).0,
        CudaStorageSlice::I32(s) => s.device_ptr(&stream).0,
        CudaStorageSlice::I64(s) => s.device_ptr(&stream).0,
        CudaStorageSlice::U8(s) => s.device_ptr(&stream).0,
        _ => candle_core::bail!("dev_ptr: unsupported dtype {:?}", t.dtype()),
    };
    Ok(base + (layout.start_offset() * t.dtype().size_in_bytes()) as u64)
}

pub(crate) fn cuda_device(t: &Tensor) -> Result<CudaDevice> {
    match t.device() {
        candle_core::Device::Cuda(d) => Ok(d.clone()),
        other => candle_core::bail!("expected a CUDA tensor, got one on {other:?}"),
    }
}
