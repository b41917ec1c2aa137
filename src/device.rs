//! The one place where the tensor device is chosen, so the `cuda` and `metal`
//! features only change this file's behaviour.

use candle_core::Device;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum DeviceChoice {
    /// CUDA if compiled in and present, else Metal if compiled in, else CPU.
    #[default]
    Auto,
    Cpu,
    Cuda,
    Metal,
}

#[derive(Debug, thiserror::Error)]
pub enum DeviceError {
    #[error("device `{0}` was requested but this binary was built without the `{0}` feature")]
    NotCompiled(&'static str),
    #[error("could not open the {kind} device: {source}")]
    Open {
        kind: &'static str,
        source: candle_core::Error,
    },
}

/// The compute type used when none is asked for: f32 on the CPU (no fast
/// half-precision matmuls there), bf16 on a GPU.
pub fn default_dtype(device: &Device) -> candle_core::DType {
    if device.is_cpu() {
        candle_core::DType::F32
    } else {
        candle_core::DType::BF16
    }
}

pub fn select_device(choice: DeviceChoice) -> Result<Device, DeviceError> {
    match choice {
        DeviceChoice::Cpu => Ok(Device::Cpu),
        DeviceChoice::Cuda => open_cuda(),
        DeviceChoice::Metal => open_metal(),
        DeviceChoice::Auto => {
            if cfg!(feature = "cuda") {
                if let Ok(d) = open_cuda() {
                    return Ok(d);
                }
            }
            if cfg!(feature = "metal") {
                if let Ok(d) = open_metal() {
                    return Ok(d);
                }
            }
            Ok(Device::Cpu)
        }
    }
}

fn open_cuda() -> Result<Device, DeviceError> {
    if !cfg!(feature = "cuda") {
        return Err(DeviceError::NotCompiled("cuda"));
    }
    // One explicit stream that every thread enqueues on (weights are loaded on one
    // thread and used on the inference thread; per-thread default streams would not
    // order those), which is also what CUDA graph capture needs.
    let device = Device::new_cuda_with_stream(0).map_err(|source| DeviceError::Open {
        kind: "cuda",
        source,
    })?;
    #[cfg(feature = "cuda")]
    if let Device::Cuda(d) = &device {
        // SAFETY: all work goes to the one stream above, in order, so cudarc's per-buffer
        // read/write events (an event record or wait around every kernel) buy nothing.
        // Frees are stream-ordered. Done before any tensor exists on the device.
        unsafe { d.disable_event_tracking() };
        if let Err(e) = crate::ops::cuda::keep_pool_memory(d) {
            tracing::warn!("could not raise the CUDA memory pool's release threshold: {e}");
        }
    }
    Ok(device)
}

fn open_metal() -> Result<Device, DeviceError> {
    if !cfg!(feature = "metal") {
        return Err(DeviceError::NotCompiled("metal"));
    }
    Device::new_metal(0).map_err(|source| DeviceError::Open {
        kind: "metal",
        source,
    })
}
