//! With the `cuda` feature, compiles `src/ops/cuda/kernels.cu` to PTX with nvcc (the
//! same compiler candle-kernels needs), for `OUT_DIR/stepaudio_kernels.ptx`. Without the
//! feature it does nothing, so CPU builds and CI need no CUDA toolkit.
//!
//! The target architecture comes from `CUDA_COMPUTE_CAP` (e.g. `90` for H100), as for
//! candle-kernels; the default is 80, the oldest architecture whose bf16 tensor-core
//! instructions the kernels use (the PTX is JIT-compiled for newer GPUs at load time).

use std::path::PathBuf;
use std::process::Command;

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    println!("cargo:rerun-if-changed=src/ops/cuda/kernels.cu");
    println!("cargo:rerun-if-env-changed=CUDA_COMPUTE_CAP");
    println!("cargo:rerun-if-env-changed=NVCC");
    if std::env::var_os("CARGO_FEATURE_CUDA").is_none() {
        return;
    }
    let out =
        PathBuf::from(std::env::var("OUT_DIR").expect("OUT_DIR")).join("stepaudio_kernels.ptx");
    let cap = std::env::var("CUDA_COMPUTE_CAP")
        .ok()
        .and_then(|c| c.trim().replace('.', "").parse::<u32>().ok())
        .unwrap_or(80)
        .max(80);
    let nvcc = std::env::var("NVCC")
        .ok()
        .or_else(|| {
            ["CUDA_ROOT", "CUDA_HOME", "CUDA_PATH"]
                .iter()
                .find_map(|v| std::env::var(v).ok())
                .map(|root| format!("{root}/bin/nvcc"))
                .filter(|p| std::path::Path::new(p).exists())
        })
        .unwrap_or_else(|| "nvcc".to_string());
    let status = Command::new(&nvcc)
        .args(["--ptx", "-O3", "-std=c++17"])
        .arg(format!("-arch=compute_{cap}"))
        .arg("-o")
        .arg(&out)
        .arg("src/ops/cuda/kernels.cu")
        .status()
        .unwrap_or_else(|e| panic!("running {nvcc} (set NVCC or CUDA_ROOT): {e}"));
    assert!(status.success(), "{nvcc} failed on src/ops/cuda/kernels.cu");
}
