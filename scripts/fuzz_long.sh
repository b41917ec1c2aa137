#!/usr/bin/env bash
# Long fuzzing run: the three harnesses of tests/fuzz_inputs.rs (WAV parser,
# WebSocket client messages, HTTP request heads), each for MINUTES minutes,
# side by side, from a fresh seed (FUZZ_SEED=N to repeat a run). Prints per
# harness the inputs tried, crashes (panics, broken invariants), hangs (cases
# over FUZZ_CASE_LIMIT_MS of CPU time, default 2000 ms) and cases over the
# allocation bound. Inputs that failed are saved under target/fuzz-failures/;
# move them to tests/fixtures/fuzz/ once fixed (tests/fixtures/fuzz/README.md).
#
#   scripts/fuzz_long.sh [MINUTES]        # default 10
set -euo pipefail
cd "$(dirname "$0")/.."

minutes=${1:-10}
if ! [[ $minutes =~ ^[0-9]+$ ]] || (( minutes < 1 )); then
    echo "usage: $0 [MINUTES]" >&2
    exit 2
fi
seed=${FUZZ_SEED:-$(date +%s)}
target=${CARGO_TARGET_DIR:-target}
log=$(mktemp -t fuzz_long.XXXXXX)
trap 'rm -f "$log"' EXIT

echo "fuzzing for $minutes min per harness (side by side), seed $seed"
cargo test --release --test fuzz_inputs --no-run 2>&1 | tail -n 1
status=0
FUZZ_SEED=$seed FUZZ_SECONDS=$((minutes * 60)) \
    cargo test --release --test fuzz_inputs -- --nocapture --test-threads 3 fuzz_ \
    >"$log" 2>&1 || status=$?

echo
grep '^fuzz [a-z]*: seed' "$log" || { echo "no summary lines; the run's output:"; cat "$log"; }
if (( status != 0 )); then
    echo
    echo "FAILED (exit $status); failures:"
    grep -E '^fuzz [a-z]*: (panic|broken invariant|too slow|allocation)|aborting|allocation of' "$log" | head -n 40 || true
    ls -l "$target/fuzz-failures" 2>/dev/null || true
    echo "rerun: FUZZ_SEED=$seed $0 $minutes"
else
    echo "no crashes, hangs or allocations over the bound"
fi
exit "$status"
