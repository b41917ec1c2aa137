#!/usr/bin/env bash
# Runs on the GPU machine, from the repository root, with the folder made by
# `scripts/build-cuda.sh --stage .device` next to it. Builds nothing. In one call and on
# one card: software check, warm-up (PTX JIT), kernel checks, the Rust benchmark (candle
# ops and fused paths), the PyTorch baseline, optionally issue 5's parity check, and
# one comparison table at the end.
#
#   STEPS="check bench torch parity" bash .device/scripts/device_compare.sh
#   STEPS="check batch torchbatch streams" ...   (issue 15: many streams on one GPU)
#   STEPS="streamsab" AB_STREAMS=96 ...          (continuous batch vs batch at a time)
#   STEPS="streams" STREAMS_FLAGS=--no-continuous  (capacity batch at a time)
#   STEPS="wstreams" WSTREAMS_FLAGS=--full-partials  (Whisper capacity, whole-segment partials)
#   STEPS="wstreamsab" WAB_STREAMS="64 112"       (Whisper: bounded against whole-segment partials)
#   STEPS="wstreamsab" WAB_FLAGS="|--lanes 2"      (Whisper: one lane against two)
#   STEPS="wstreamsab" WAB_FLAGS=" " WAB_FAST="all mel,attention,decode,graph,gemm,epilogue,prefill"
#                                                 (Whisper: encoder windows grouped against one by one)
#
# Logs and JSON go to $OUT (default /tmp/device-out).
set -uo pipefail
D=${DEVICE_DIR:-.device}
OUT=${OUT:-/tmp/device-out}
STEPS=${STEPS:-check bench torch}
RUNS=${RUNS:-5}
mkdir -p "$OUT"
LOG=$OUT/run.log
export STEPAUDIO_LIVE_SPEECH_DIR=$D/speech
export CUDA_CACHE_MAXSIZE=4294967296   # keep candle's JIT-compiled PTX between processes
export PYTHONUNBUFFERED=1
say() { echo "== $(date +%T) $*" | tee -a "$LOG"; }

say "software"
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm,clocks.max.mem --format=csv,noheader | tee "$OUT/gpu.txt" | tee -a "$LOG"
python3 -c 'import torch, transformers; print("torch", torch.__version__, "transformers", transformers.__version__, "cuda", torch.version.cuda)' 2>&1 | tee -a "$LOG"
BIN=/tmp/sa-bin
mkdir -p $BIN && tar -C $BIN -xJf "$D/bins.tar.xz" || { echo "no binaries" | tee -a "$LOG"; exit 1; }
EN=$D/speech/en_ps_librivox_0870.wav
# 5.62 s of Chinese: the AISHELL-1 clip (4.2 s) twice, cut (assets/ has no longer Chinese clip).
ZH="$D/speech/zh_aishell1_BAC009S0764W0121.wav+$D/speech/zh_aishell1_BAC009S0764W0121.wav@5.62"

for step in $STEPS; do
  case $step in
  check)
    say "kernel checks (first run also JIT-compiles the PTX)"
    $BIN/gpu_check --kernels --wav "$EN" --wav "$D/speech/zh_aishell1_BAC009S0764W0121.wav" --json "$OUT/check.json" 2>&1 | tee -a "$LOG"
    ;;
  bench)
    say "Rust benchmark: candle ops, then fused paths, same process"
    $BIN/benchmark_e2e --arch step-audio-2-mini --random-weights --device cuda --fast compare \
      --runs "$RUNS" --wav "$EN" --wav "$ZH" --json "$OUT/rust_sa2.json" 2>&1 | tee -a "$LOG"
    ;;
  torch)
    say "PyTorch baseline (encoder, LLM eager, LLM static cache + torch.compile)"
    OUT=$OUT python3 "$D/scripts/reference/torch_baseline_stepaudio2.py" encoder llm static 2>&1 | grep -v "^RESULT" | tee -a "$LOG"
    ;;
  parity)
    say "issue 5 parity: random real-shape checkpoint + PyTorch reference (bf16, GPU)"
    CK=/dev/shm/sa2_parity
    avail=$(df -k --output=avail /dev/shm 2>/dev/null | tail -1 || echo 0)
    [ "${avail:-0}" -gt 20000000 ] || CK=/tmp/sa2_parity
    python3 "$D/scripts/reference/step_audio2_gpu_parity.py" --ckpt "$CK" --out "$OUT/parity_ref.safetensors" \
      --tokenizer "$D/tokenizer.json" --steps 8 "$EN" "$D/speech/zh_aishell1_BAC009S0764W0121.wav" 2>&1 | tee -a "$LOG"
    $BIN/gpu_check --parity --ckpt "$CK" --reference "$OUT/parity_ref.safetensors" --json "$OUT/parity.json" 2>&1 | tee -a "$LOG"
    rm -rf "$CK" "$OUT/parity_ref.safetensors"
    ;;
  batch)
    say "batched decode step per batch size (fused batched, batch-1 fused, candle ops)"
    $BIN/benchmark_batch_decode --batches ${BATCHES:-1,2,4,8,16,32,64,128,256} --context ${CONTEXT:-512} \
      --candle 1,8,64 --json "$OUT/batch_decode.json" 2>&1 | tee -a "$LOG"
    ;;
  torchbatch)
    say "PyTorch batched decode step (static cache; eager and torch.compile)"
    OUT=$OUT python3 "$D/scripts/reference/torch_batched_decode.py" --check \
      --batches ${BATCHES:-1,2,4,8,16,32,64,128,256} --context ${CONTEXT:-512} --budget-s ${TORCH_BUDGET_S:-300} 2>&1 | tee -a "$LOG"
    ;;
  streams)
    say "live capacity: Step-Audio 2 mini shape (random bf16) through the engine"
    # the whole English playlist of the repository's assets/ (the stage has two clips)
    STEPAUDIO_LIVE_SPEECH_DIR=$PWD/assets $BIN/benchmark_streams --step-audio-random --device cuda --find-capacity --max-batch 256 \
      --min-streams ${MIN_STREAMS:-16} --max-streams ${MAX_STREAMS:-512} --capacity-step ${CAPACITY_STEP:-1} --duration ${DURATION:-20} --stagger ${STAGGER:-0.05} \
      --max-partial-gap 1e9 ${STREAMS_FLAGS:-} --json "$OUT/streams_capacity.json" 2>&1 | tee -a "$LOG"
    # where the time goes at that capacity: one more run with the model's timing logs
    cap=$(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["runs"][-1].get("capacity", 0))' "$OUT/streams_capacity.json")
    if [ "${cap:-0}" -gt 0 ]; then
      say "stage times at $cap streams"
      RUST_LOG=stepaudio_live::model::step_audio2=debug STEPAUDIO_LIVE_SPEECH_DIR=$PWD/assets \
        $BIN/benchmark_streams --step-audio-random --device cuda --max-batch 256 --streams "$cap" \
        --duration ${DURATION:-20} --stagger ${STAGGER:-0.05} --warmup 0 ${STREAMS_FLAGS:-} > "$OUT/stage_run.txt" 2> "$OUT/stage_debug.log"
      python3 "$D/scripts/stage_times.py" "$OUT/stage_debug.log" 2>&1 | tee -a "$LOG"
    fi
    ;;
  streamsab)
    say "continuous batch against batch at a time, ${AB_STREAMS:-96} Step-Audio 2 streams each"
    # AB_MODES: "batch", "continuous:BUDGET:INTERVAL" (admit budget and interval, ms),
    # "nodrafts:BUDGET:INTERVAL" (the same without drafts) and "fullpartials:BUDGET:INTERVAL"
    # (every partial encoded and prefilled whole),
    # either with ":FAST" appended (the STEPAUDIO_FAST switches, default all); each run
    # logs the model's stage times.
    for mode in ${AB_MODES:-continuous:60:100 batch}; do
      IFS=: read -r kind budget interval fast <<< "$mode"
      flag=--no-continuous
      [ "$kind" = continuous ] && flag="--admit-budget-ms ${budget:-60} --admit-interval-ms ${interval:-100}"
      [ "$kind" = nodrafts ] && flag="--no-drafts --admit-budget-ms ${budget:-60} --admit-interval-ms ${interval:-100}"
      [ "$kind" = fullpartials ] && flag="--full-partials --admit-budget-ms ${budget:-60} --admit-interval-ms ${interval:-100}"
      [ "$kind" = batch ] && fast=$budget
      name=${mode//:/_}; name=${name//,/-}
      say "mode $mode (STEPAUDIO_FAST=${fast:-all})"
      STEPAUDIO_FAST=${fast:-all} RUST_LOG=stepaudio_live::model::step_audio2=debug STEPAUDIO_LIVE_SPEECH_DIR=$PWD/assets \
        $BIN/benchmark_streams --step-audio-random --device cuda --max-batch 256 \
        --streams ${AB_STREAMS:-96} --duration ${DURATION:-20} --stagger ${STAGGER:-0.05} $flag \
        --json "$OUT/streams_ab_$name.json" 2> "$OUT/streams_ab_$name.log" | grep "^streams" | tee -a "$LOG"
      python3 "$D/scripts/stage_times.py" "$OUT/streams_ab_$name.log" 2>&1 | tee -a "$LOG"
    done
    ;;
  wstreams)
    say "live capacity: Whisper large-v3-turbo shape (random bf16, made by whisper_gpu_parity.py) through the engine"
    W=/tmp/wp-streams
    [ -d $W/turbo/model ] || python3 "$D/scripts/reference/whisper_gpu_parity.py" --shapes turbo --dtypes f32 --steps 2 \
      --wav "$EN" --tokenizer "$D/whisper_tokenizer.json" --out $W 2>&1 | grep -v "Writing model" | tail -3 | tee -a "$LOG"
    name=whisper_streams_capacity${WSTREAMS_FLAGS:+_${WSTREAMS_FLAGS//[- ]/}}
    say "capacity, flags: ${WSTREAMS_FLAGS:-none}"
    STEPAUDIO_LIVE_SPEECH_DIR=$PWD/assets $BIN/benchmark_streams --model $W/turbo/model --device cuda \
      --find-capacity --max-batch 256 --min-streams ${MIN_STREAMS:-16} --max-streams ${MAX_STREAMS:-512} \
      --capacity-step ${CAPACITY_STEP:-1} --duration ${DURATION:-20} --stagger ${STAGGER:-0.05} \
      --max-partial-gap 1e9 ${WSTREAMS_FLAGS:-} --json "$OUT/$name.json" 2>&1 | tee -a "$LOG"
    cap=$(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["runs"][-1].get("capacity", 0))' "$OUT/$name.json")
    if [ "${cap:-0}" -gt 0 ]; then
      say "Whisper stage times at $cap streams"
      RUST_LOG=stepaudio_live::model::whisper=debug STEPAUDIO_LIVE_SPEECH_DIR=$PWD/assets \
        $BIN/benchmark_streams --model $W/turbo/model --device cuda --max-batch 256 --streams "$cap" \
        --duration ${DURATION:-20} --stagger ${STAGGER:-0.05} --warmup 0 ${WSTREAMS_FLAGS:-} > "$OUT/wstage_run.txt" 2> "$OUT/wstage_debug.log"
      head -1 "$OUT/wstage_run.txt" | tee -a "$LOG"
      python3 "$D/scripts/stage_times.py" "$OUT/wstage_debug.log" 2>&1 | tee -a "$LOG"
    fi
    ;;
  wstreamsab)
    say "Whisper large-v3-turbo shape: flag sets side by side (default: bounded against --full-partials), same call"
    W=/tmp/wp-streams
    [ -d $W/turbo/model ] || python3 "$D/scripts/reference/whisper_gpu_parity.py" --shapes turbo --dtypes f32 --steps 2 \
      --wav "$EN" --tokenizer "$D/whisper_tokenizer.json" --out $W 2>&1 | grep -v "Writing model" | tail -3 | tee -a "$LOG"
    # WAB_FLAGS: the flag sets to compare, separated by "|" (an empty one: the defaults)
    # WAB_FAST: STEPAUDIO_FAST settings to compare, separated by spaces (default all)
    IFS='|' read -r -a flagsets <<< "${WAB_FLAGS:-|--full-partials}"
    for n in ${WAB_STREAMS:-64 112}; do
      for fast in ${WAB_FAST:-all}; do
        for flag in "${flagsets[@]}"; do
          say "$n streams ${flag:-(defaults)} STEPAUDIO_FAST=$fast"
          STEPAUDIO_FAST=$fast STEPAUDIO_LIVE_SPEECH_DIR=$PWD/assets $BIN/benchmark_streams --model $W/turbo/model \
            --device cuda --max-batch 256 --streams $n --duration ${DURATION:-20} --stagger ${STAGGER:-0.05} $flag \
            --json "$OUT/whisper_ab_${n}${flag//[- ]/}_${fast//,/-}.json" 2>/dev/null | grep "^streams" | tee -a "$LOG"
        done
      done
    done
    ;;
  *) say "unknown step $step" ;;
  esac
done
say "table"
python3 "$D/scripts/device_table.py" "$OUT" 2>&1 | tee "$OUT/table.md"
