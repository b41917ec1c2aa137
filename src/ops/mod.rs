//! Kernels below the model families: faster CPU versions of a few ops
//! (`cpu`), int8 weight-only products for CPU decode steps (`quant`), the
//! CUDA kernels (`cuda`, feature `cuda`) and the switchboard that offers
//! them to model code (`fast`), which falls back to plain candle ops when no
//! fast path applies.
//!
//! This layer names no model type and nothing else of the crate: what a
//! kernel needs from a model (the fused decode step's weights and KV cache,
//! the log-mel filterbank) is handed to it as plain tensors and sizes.

pub mod cpu;
#[cfg(feature = "cuda")]
pub mod cuda;
pub mod fast;
pub mod quant;
