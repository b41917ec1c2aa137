#!/usr/bin/env python3
"""Where a GPU engine's batches spend their time, from a benchmark_streams log run with
RUST_LOG=stepaudio_live::model::step_audio2=debug (or ...::model::whisper=debug for Whisper's
batches: encoder windows, the stacked prefill, the stacked steps): the encoder time of new segments, the
batched prefills and the greedy decode steps (count, widest), summed; per batch for the
batch-at-a-time engine, per logged second ("decode loop" lines) for the continuous batch;
how many draft ids (the last hypothesis of the segment) the decode loop took, and how many
prompt tokens were reused from the cache as the segment's last partial left them; with
RUST_LOG also naming stepaudio_live::stream::engine=debug, where the continuous batch's finals
spent their time (segment end → joining the loop, in the loop) and the work run alone beside it.
Decode steps taken inside an admission's prefill (switch `fold`) count as steps, their time as
the prefill's. Usage: python3 scripts/stage_times.py LOG"""
import re
import sys

num = lambda key, line: float(re.search(key + r"=([0-9.]+(?:[eE][-+]?[0-9]+)?)", line).group(1))
enc, pre, dec, steps, widest, turns, batches = [], [], [], [], [], [], 0
plan, carried, windows = [], 0, 0
enc_layers, cross, after_final = [], [], []
drafted, taken = 0, 0
folded = 0
final_before, final_loop, final_rounds = [], [], []
alone = []
prompt, reused = 0, 0
ansi = re.compile(r"\x1b\[[0-9;]*m")
for line in open(sys.argv[1], errors="replace"):
    line = ansi.sub("", line)
    if "work run alone beside the decode loop" in line:
        alone.append((num("decodes", line), num("ms", line)))
    elif "a final out of the decode loop" in line:
        final_before.append(num("before_ms", line))
        final_loop.append(num("in_loop_ms", line))
        final_rounds.append(num("rounds", line))
    elif "carried segments encoded after their finals" in line:
        after_final.append((num("segments", line), num("ms", line)))
    elif "encoder windows and their cross-attention" in line:
        enc_layers.append(num("encoder_ms", line))
        cross.append(num("cross_ms", line))
    elif "encoded a batch" in line:
        enc.append(num("encode_ms", line))
        if "plan_ms=" in line:
            plan.append(num("plan_ms", line))
            carried += num("carried", line)
            windows += num("windows", line)
    elif "batch of turns" in line or "decode loop" in line:
        batches += 1
        pre.append(num("prefill_ms", line))
        dec.append(num("decode_ms", line))
        steps.append(num("steps", line))
        widest.append(num("widest", line))
        turns.append(num("turns", line))
        if "steps_in_prefill=" in line:
            folded += num("steps_in_prefill", line)
        if "draft_taken=" in line:
            drafted += num("drafted", line)
            taken += num("draft_taken", line)
        if "reused=" in line:
            prompt += num("prompt", line)
            reused += num("reused", line)
if not batches:
    sys.exit("no 'batch of turns' lines: run with RUST_LOG=stepaudio_live::model::step_audio2=debug (or ::whisper)")
total = sum(enc) + sum(pre) + sum(dec)
print(f"{batches} batches (or seconds of the decode loop), {sum(turns):.0f} turns (mean {sum(turns) / batches:.1f} a batch, "
      f"widest decode step {max(widest):.0f}), {sum(steps):.0f} decode steps")
for name, v in (("encoder", enc), ("prefill", pre), ("decode", dec)):
    print(f"  {name:8s} {sum(v) / 1e3:7.2f} s  {100 * sum(v) / total:5.1f} %  "
          f"{sum(v) / max(len(v), 1):7.1f} ms a batch")
print(f"  decode step {sum(dec) / max(sum(steps) - folded, 1):.2f} ms on average")
if folded:
    print(f"  of the decode steps, {folded:.0f} ran inside admissions' prefills (their time is the prefill's)")
if plan:
    print(f"  of the encoder: carried segments encoded alone and windows planned {sum(plan) / 1e3:.2f} s "
          f"({100 * sum(plan) / max(sum(enc), 1e-9):.1f} %; {carried:.0f} carried encodes), the windows' batches "
          f"{(sum(enc) - sum(plan)) / 1e3:.2f} s ({windows:.0f} windows, "
          f"{(sum(enc) - sum(plan)) / max(windows, 1):.2f} ms a window)")
if enc_layers:
    print(f"  of the windows' batches: encoder blocks {sum(enc_layers) / 1e3:.2f} s "
          f"({sum(enc_layers) / max(windows, 1):.2f} ms a window), cross-attention keys/values "
          f"{sum(cross) / 1e3:.2f} s ({sum(cross) / max(windows, 1):.2f} ms a window)")
if drafted:
    print(f"  draft ids: {drafted:.0f} offered, {taken:.0f} taken without a step ({100 * taken / drafted:.1f} %)")
if prompt:
    print(f"  prompt tokens: {prompt:.0f} admitted, {reused:.0f} reused from the last partial ({100 * reused / prompt:.1f} %)")
if after_final:
    segs, ms = sum(a for a, _ in after_final), sum(b for _, b in after_final)
    print(f"  outside the batches: {segs:.0f} carried segments encoded after their finals in {len(after_final)} calls, "
          f"{ms / 1e3:.2f} s ({ms / max(segs, 1):.2f} ms a segment)")
if final_loop:
    q = lambda v, p: sorted(v)[min(len(v) - 1, int(p / 100 * len(v)))]
    print(f"  finals ({len(final_loop)}), segment end → joining the loop p50 {q(final_before, 50):.0f} / p95 "
          f"{q(final_before, 95):.0f} ms, in the loop p50 {q(final_loop, 50):.0f} / p95 {q(final_loop, 95):.0f} ms, "
          f"rounds p50 {q(final_rounds, 50):.0f} ({q(final_loop, 50) / max(q(final_rounds, 50), 1):.1f} ms a round)")
if alone:
    n, ms = sum(a for a, _ in alone), sum(b for _, b in alone)
    print(f"  work run alone beside the decode loop (a reused pause decode's commit): {n:.0f} decodes in "
          f"{len(alone)} rounds, {ms / 1e3:.2f} s ({ms / max(n, 1):.2f} ms a decode)")
