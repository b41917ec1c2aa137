#!/usr/bin/env bash
# CUDA build of stepaudio-live, also on a machine without a GPU or a CUDA toolkit.
#
#   scripts/build-cuda.sh                 # release build with --features cuda
#   scripts/build-cuda.sh --stage DIR     # ... then copy what scripts/device_compare.sh
#                                         #     needs on a GPU machine into DIR
#
# With a normal CUDA toolkit (nvcc on PATH or CUDA_ROOT set) it just builds. Without one it
# installs nvcc, headers and the CUDA 13.0 libraries from PyPI wheels plus a stub libcuda
# (only for linking; the real driver is used at run time) with
# scripts/setup-cuda-toolchain.sh (override: SETUP_CUDA=path), into
# CUDA_WHEEL_PREFIX (default /tmp/cuda13). The staged speech clips come from assets/
# (override: STEPAUDIO_LIVE_SPEECH_DIR).
#
# Environment: CUDA_COMPUTE_CAP (default 90: H100/H200; 80 for A100, 89 for L4/4090),
# CARGO_TARGET_DIR (default target-cuda: keep it, the first candle-kernels build takes
# ~30 min on 2 cores, later builds seconds).
set -euo pipefail
cd "$(dirname "$0")/.."
STAGE=""
if [ "${1:-}" = "--stage" ]; then STAGE=${2:?--stage DIR}; fi

export CUDA_COMPUTE_CAP=${CUDA_COMPUTE_CAP:-90}
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$PWD/target-cuda}
if ! command -v nvcc >/dev/null 2>&1 && [ -z "${CUDA_ROOT:-}" ]; then
  PREFIX=${CUDA_WHEEL_PREFIX:-/tmp/cuda13}
  SETUP=${SETUP_CUDA:-scripts/setup-cuda-toolchain.sh}
  [ -f "$SETUP" ] || { echo "no nvcc and no $SETUP: install the CUDA toolkit or set SETUP_CUDA" >&2; exit 1; }
  cargo fetch
  bash "$SETUP" "$PREFIX"
  # shellcheck disable=SC1091
  source "$PREFIX/env.sh"
fi
cargo build --release --features cuda --bin stepaudio-live --example benchmark_e2e --example gpu_check \
  --example benchmark_streams --example benchmark_batch_decode --example whisper_gpu_check \
  --example benchmark_encoder_passes

if [ -n "$STAGE" ]; then
  # Everything the device run needs, small enough to travel (binaries stripped and
  # compressed: most of their size is candle's PTX, which compresses ~10x, and is the
  # same in every binary: with a dictionary reaching back past one binary (~60 MB), xz
  # stores it about once — 38 MB with its default 8 MiB dictionary, ~12 MB so).
  mkdir -p "$STAGE/speech" "$STAGE/scripts/reference"
  R=$CARGO_TARGET_DIR/release
  tmp=$(mktemp -d)
  for b in examples/benchmark_e2e examples/gpu_check examples/benchmark_streams \
    examples/benchmark_batch_decode examples/whisper_gpu_check examples/benchmark_encoder_passes; do
    objcopy --strip-debug "$R/$b" "$tmp/$(basename "$b")"
  done
  tar -C "$tmp" -cf - benchmark_e2e gpu_check benchmark_streams benchmark_batch_decode \
    whisper_gpu_check benchmark_encoder_passes | xz -T1 --lzma2=preset=9,dict=128MiB > "$STAGE/bins.tar.xz"
  rm -rf "$tmp"
  cp scripts/device_compare.sh scripts/device_table.py scripts/stage_times.py "$STAGE/scripts/"
  cp scripts/reference/step_audio2_ref.py scripts/reference/step_audio2_gpu_parity.py \
    scripts/reference/torch_baseline_stepaudio2.py scripts/reference/torch_batched_decode.py \
    scripts/reference/whisper_gpu_parity.py \
    "$STAGE/scripts/reference/"
  cp tests/fixtures/step_audio2/tiny_ckpt/tokenizer.json "$STAGE/tokenizer.json"
  # whisper_gpu_parity.py needs a multilingual Whisper tokenizer.json (none is in the
  # repo): by default the one `stepaudio-live fetch base` leaves in the model cache.
  WTOK=${WHISPER_TOKENIZER:-$HOME/.cache/stepaudio-live/models/base/tokenizer.json}
  if [ -f "$WTOK" ]; then cp "$WTOK" "$STAGE/whisper_tokenizer.json"
  else echo "no $WTOK: whisper_gpu_parity.py will have no tokenizer (set WHISPER_TOKENIZER)" >&2; fi
  SPEECH=${STEPAUDIO_LIVE_SPEECH_DIR:-assets}
  for w in en_ps_librivox_0870 zh_aishell1_BAC009S0764W0121; do
    cp "$SPEECH/$w.wav" "$STAGE/speech/"
  done
  du -sh "$STAGE"
fi
