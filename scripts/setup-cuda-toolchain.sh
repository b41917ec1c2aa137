#!/bin/bash
# Sets up, on a machine WITHOUT a GPU or CUDA toolkit, what `cargo build` of candle-core/candle-nn
# with feature `cuda` needs: nvcc + headers + the CUDA libs to link against, all from PyPI wheels
# (CUDA 13.0, to match the device's driver 580 / CUDA 13.0), plus a stub libcuda.so.
#
#   bash scripts/setup-cuda-toolchain.sh [PREFIX]      # default PREFIX=/tmp/cuda13
#   source PREFIX/env.sh && cargo build --release     # in a crate that uses candle with `cuda`
#
# scripts/build-cuda.sh runs it when no CUDA toolkit is found.
#
# Idempotent. Needs pip, gcc, and (for the stub) the cudarc sources in ~/.cargo/registry
# (run `cargo fetch` in the crate first) -- falls back to a symbol list from cuda.h otherwise.
set -euo pipefail
PREFIX=${1:-/tmp/cuda13}
CUDA_TOOLKIT_VERSION=${CUDA_TOOLKIT_VERSION:-13.0.2}   # metapackage pinning nvcc 13.0.88, cudart 13.0.96, cublas 13.1.0.3, curand 10.4.0.35
mkdir -p "$PREFIX"
if [ ! -x "$PREFIX/site/nvidia/cu13/bin/nvcc" ]; then
  python3 -m pip install -q --no-cache-dir --target "$PREFIX/site" \
    "cuda-toolkit[nvcc,crt,nvvm,cudart,nvrtc,cublas,curand,cccl]==$CUDA_TOOLKIT_VERSION"
fi
ROOT="$PREFIX/site/nvidia/cu13"
# the wheels ship only versioned sonames; the linker (-lcublas etc.) wants the plain names
cd "$ROOT/lib"
for l in cublas cublasLt cudart nvrtc; do ln -sf "lib$l.so.13" "lib$l.so"; done
ln -sf libcurand.so.10 libcurand.so
# no wheel ships libcuda (it is the driver); cudarc's `dynamic-linking` (forced by candle-core)
# emits -lcuda, so link against a stub with SONAME libcuda.so.1 that defines every cu* entry point.
mkdir -p stubs
if [ ! -f stubs/libcuda.so ]; then
  SYS=$(ls -d "${CARGO_HOME:-$HOME/.cargo}"/registry/src/*/cudarc-*/src/driver/sys/mod.rs 2>/dev/null | sort -V | tail -1 || true)
  if [ -n "$SYS" ]; then
    grep -oE 'pub unsafe fn cu[A-Za-z0-9_]+\(' "$SYS" | sed -E 's/pub unsafe fn (cu[A-Za-z0-9_]+)\(/\1/'
  else
    grep -oE '\bcu[A-Z][A-Za-z0-9_]*\s*\(' "$ROOT/include/cuda.h" | sed -E 's/\s*\($//'
  fi | sort -u > "$PREFIX/cuda_syms.txt"
  awk '{print "int "$1"(void){return 999;}"}' "$PREFIX/cuda_syms.txt" > "$PREFIX/cuda_stub.c"
  gcc -shared -fPIC -o stubs/libcuda.so -Wl,-soname,libcuda.so.1 "$PREFIX/cuda_stub.c"
fi
cat > "$PREFIX/env.sh" <<EOF
export CUDA_ROOT=$ROOT
export CUDA_HOME=\$CUDA_ROOT CUDA_PATH=\$CUDA_ROOT
export NVCC=\$CUDA_ROOT/bin/nvcc
export PATH=\$CUDA_ROOT/bin:\$PATH
export CUDA_COMPUTE_CAP=90
export LD_LIBRARY_PATH=\$CUDA_ROOT/lib\${LD_LIBRARY_PATH:+:\$LD_LIBRARY_PATH}
EOF
"$ROOT/bin/nvcc" --version | tail -2
echo "ok: source $PREFIX/env.sh"
