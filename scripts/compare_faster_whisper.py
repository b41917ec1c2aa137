#!/usr/bin/env python3
"""Side by side on the English entries of the eval manifest: faster-whisper
(int8 and float32) and `stepaudio-live eval`, for tiny.en and base, with the
same CTranslate2 weights from the stepaudio-live cache.

Every configuration runs in its own process so that model load, transcription
wall time and peak RSS are measured per configuration (peak RSS from
os.wait4 on that one child). faster-whisper's hypotheses are scored by
`stepaudio-live eval --hyp`, so both systems go through the same normaliser
and word alignment. Decoding: greedy (beam_size=1), temperature 0 without
fallback, conditioned on previous text, no VAD, timestamps on, language "en".
Threads: all cores for both (cpu_threads and OMP_NUM_THREADS / RAYON_NUM_THREADS).

    python3 scripts/compare_faster_whisper.py [--binary target/release/stepaudio-live]
        [--manifest assets/manifest.tsv] [--models tiny.en base] [--out DIR]

The manifest defaults to assets/manifest.tsv (or manifest.tsv in
$STEPAUDIO_LIVE_SPEECH_DIR); pass a larger evaluation set with --manifest PATH.
Prints a Markdown table (and writes results.json into --out).
"""

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
LOADS = []  # 1-minute load averages seen before and after each measured run


def default_manifest() -> Path:
    speech = os.environ.get("STEPAUDIO_LIVE_SPEECH_DIR")
    base = Path(speech) if speech else REPO / "assets"
    return base / "manifest.tsv"


def default_binary() -> Path:
    target = os.environ.get("CARGO_TARGET_DIR")
    return (Path(target) if target else REPO / "target") / "release" / "stepaudio-live"


def read_manifest(path: Path, language: str):
    lines = [l for l in path.read_text(encoding="utf-8").splitlines() if l.strip()]
    header = lines[0].split("\t")
    col = {name: header.index(name) for name in ("id", "file", "language")}
    entries = []
    for line in lines[1:]:
        fields = line.split("\t")
        if fields[col["language"]] == language:
            entries.append((fields[col["id"]], str(path.parent / fields[col["file"]])))
    return entries


# ----------------------------------------------------------------- child


def child(args) -> None:
    """One faster-whisper configuration: load, transcribe every entry, write
    hypotheses (JSONL) and timings (JSON)."""
    from faster_whisper import WhisperModel

    threads = os.cpu_count() or 1
    start = time.perf_counter()
    model = WhisperModel(args.model_dir, device="cpu", compute_type=args.compute_type, cpu_threads=threads)
    load_s = time.perf_counter() - start
    transcribe_s = 0.0
    audio_s = 0.0
    with open(args.hyp_out, "w", encoding="utf-8") as hyp:
        for utt_id, audio in read_manifest(Path(args.manifest), args.language):
            start = time.perf_counter()
            segments, info = model.transcribe(
                audio,
                language=args.language,
                beam_size=1,
                temperature=0.0,
                condition_on_previous_text=True,
                vad_filter=False,
            )
            # Segments are produced lazily: decoding happens while joining.
            text = " ".join(s.text.strip() for s in segments)
            transcribe_s += time.perf_counter() - start
            audio_s += info.duration
            hyp.write(json.dumps({"id": utt_id, "text": text}, ensure_ascii=False) + "\n")
    Path(args.timing_out).write_text(
        json.dumps({"model_load_s": load_s, "transcribe_s": transcribe_s, "audio_s": audio_s, "threads": threads})
    )


# ---------------------------------------------------------------- parent


def run_measured(cmd, env, out_dir: Path, tag: str):
    """Runs cmd to completion; returns (stdout, wall seconds, peak RSS bytes)."""
    stdout_path = out_dir / f"{tag}.stdout"
    stderr_path = out_dir / f"{tag}.stderr"
    load_before = os.getloadavg()[0]
    with open(stdout_path, "wb") as out, open(stderr_path, "wb") as err:
        start = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=out, stderr=err, env=env)
        # wait4 reports the resource usage of this child alone.
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - start
        proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        sys.exit(
            f"{' '.join(map(str, cmd))} failed with {proc.returncode}:\n{stderr_path.read_text(errors='replace')[-3000:]}"
        )
    # ru_maxrss is in KiB on Linux, bytes on macOS.
    peak = usage.ru_maxrss * (1 if platform.system() == "Darwin" else 1024)
    # Other work on the machine slows whatever runs beside it; keep a record.
    LOADS.extend([load_before, os.getloadavg()[0]])
    return stdout_path.read_text(encoding="utf-8"), wall, peak


def models_dir(binary: Path, env) -> Path:
    out = subprocess.run([str(binary), "models", "list"], env=env, check=True, capture_output=True, text=True)
    first = out.stdout.splitlines()[0]
    assert first.startswith("cache: "), first
    return Path(first[len("cache: ") :])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--binary", type=Path, default=default_binary())
    parser.add_argument("--manifest", type=Path, default=default_manifest(),
                        help="evaluation manifest (default: assets/manifest.tsv)")
    parser.add_argument("--models", nargs="+", default=["tiny.en", "base"])
    parser.add_argument("--compute-types", nargs="+", default=["int8", "float32"])
    parser.add_argument("--language", default="en")
    parser.add_argument("--rounds", type=int, default=1, help="run every configuration this often; report the fastest")
    parser.add_argument("--out", type=Path, default=None, help="directory for hypotheses, logs and results.json")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--model-dir", help=argparse.SUPPRESS)
    parser.add_argument("--compute-type", help=argparse.SUPPRESS)
    parser.add_argument("--hyp-out", help=argparse.SUPPRESS)
    parser.add_argument("--timing-out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args)
        return

    if not args.binary.is_file():
        sys.exit(f"{args.binary} not found: build it with `cargo build --release` (or pass --binary)")
    out_dir = args.out or Path(tempfile.mkdtemp(prefix="compare-fw-"))
    out_dir.mkdir(parents=True, exist_ok=True)
    threads = os.cpu_count() or 1
    env = dict(os.environ)
    env.update({"OMP_NUM_THREADS": str(threads), "RAYON_NUM_THREADS": str(threads)})
    env.pop("RUST_LOG", None)
    cache = models_dir(args.binary, env)
    entries = read_manifest(args.manifest, args.language)
    print(f"{len(entries)} `{args.language}` utterances from {args.manifest}; {threads} threads; output in {out_dir}", file=sys.stderr)

    def score(hyp: Path) -> dict:
        cmd = [str(args.binary), "eval", "--manifest", str(args.manifest), "--lang", args.language, "--hyp", str(hyp), "--json"]
        out = subprocess.run(cmd, env=env, check=True, capture_output=True, text=True)
        return json.loads(out.stdout)

    fw_version = __import__("faster_whisper").__version__

    def run_faster_whisper(name: str, model_dir: Path, compute_type: str, round_no: int) -> dict:
        tag = f"faster-whisper_{name}_{compute_type}_r{round_no}"
        hyp = out_dir / f"{tag}.jsonl"
        timing = out_dir / f"{tag}.timing.json"
        cmd = [sys.executable, str(Path(__file__).resolve()), "--child", "--model-dir", str(model_dir),
               "--compute-type", compute_type, "--manifest", str(args.manifest), "--language", args.language,
               "--hyp-out", str(hyp), "--timing-out", str(timing)]
        print(f"running {tag} …", file=sys.stderr)
        _, wall, peak = run_measured(cmd, env, out_dir, tag)
        t = json.loads(timing.read_text())
        return {
            "system": f"faster-whisper {fw_version}", "model": name, "compute_type": compute_type,
            "wer": score(hyp)["rate"], "model_load_s": t["model_load_s"], "transcribe_s": t["transcribe_s"],
            "audio_s": t["audio_s"], "rtf": t["transcribe_s"] / t["audio_s"], "peak_rss_mb": peak / 2**20,
            "process_wall_s": wall,
        }

    def run_ours(name: str, model_dir: Path, round_no: int) -> dict:
        tag = f"stepaudio-live_{name}_r{round_no}"
        hyp = out_dir / f"{tag}.jsonl"
        cmd = [str(args.binary), "eval", "--manifest", str(args.manifest), "--lang", args.language,
               "--model", str(model_dir), "--json", "--write-hyp", str(hyp)]
        print(f"running {tag} …", file=sys.stderr)
        stdout, wall, peak = run_measured(cmd, env, out_dir, tag)
        report = json.loads(stdout)
        # Re-scoring our own hypotheses through --hyp checks both paths agree.
        rescored = score(hyp)["rate"]
        assert abs(rescored - report["rate"]) < 1e-12, (rescored, report["rate"])
        return {
            "system": "stepaudio-live (candle)", "model": name,
            "compute_type": "f32 (int8 decode-step weights, f32 logits refined for the top 32)", "wer": report["rate"],
            "model_load_s": report["model_load_s"], "transcribe_s": report["transcribe_s"],
            "audio_s": report["audio_s"], "rtf": report["rtf"], "peak_rss_mb": peak / 2**20,
            "process_wall_s": wall,
        }

    configs = []
    for name in args.models:
        model_dir = cache / name
        if not (model_dir / "model.bin").is_file():
            subprocess.run([str(args.binary), "models", "fetch", name], env=env, check=True)
        for compute_type in args.compute_types:
            configs.append(lambda r, n=name, d=model_dir, c=compute_type: run_faster_whisper(n, d, c, r))
        configs.append(lambda r, n=name, d=model_dir: run_ours(n, d, r))
    # Rounds go through every configuration in turn, so that a change in
    # other load on the machine hits all of them alike; each configuration
    # reports its fastest round (and the largest peak RSS).
    runs = [[] for _ in configs]
    for round_no in range(args.rounds):
        for i, config in enumerate(configs):
            runs[i].append(config(round_no))
    rows = []
    for config_runs in runs:
        best = dict(min(config_runs, key=lambda r: r["transcribe_s"]))
        best["peak_rss_mb"] = max(r["peak_rss_mb"] for r in config_runs)
        best["transcribe_s_all_rounds"] = [r["transcribe_s"] for r in config_runs]
        if len({r["wer"] for r in config_runs}) > 1:
            print(f"note: WER differs between rounds for {best['system']} {best['model']} {best['compute_type']}: "
                  f"{[r['wer'] for r in config_runs]}", file=sys.stderr)
        rows.append(best)

    (out_dir / "results.json").write_text(json.dumps(rows, indent=2))
    audio = rows[0]["audio_s"] if rows else 0.0
    print(f"\n{len(entries)} English utterances, {audio:.1f} s of audio; {platform.processor() or platform.machine()}, "
          f"{threads} threads; greedy, temperature 0, conditioned on previous text, no VAD; "
          f"fastest of {args.rounds} interleaved round(s).\n")
    print("| system | model | compute type | WER | model load (s) | transcription wall time (s) | RTF | peak RSS (MB) |")
    print("|---|---|---|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['system']} | {r['model']} | {r['compute_type']} | {100 * r['wer']:.2f}% | {r['model_load_s']:.2f} "
              f"| {r['transcribe_s']:.1f} | {r['rtf']:.3f} | {r['peak_rss_mb']:.0f} |")
    print(f"\n1-minute load average just before/after the runs: {min(LOADS):.2f} to {max(LOADS):.2f} "
          f"({threads} cores; a run itself adds up to {threads}, anything above that is other work).\n")
    for name in args.models:
        ours = next((r for r in rows if r["model"] == name and r["system"].startswith("stepaudio")), None)
        for ref in (r for r in rows if r["model"] == name and r["system"].startswith("faster")):
            print(f"{name}: stepaudio-live transcription time / faster-whisper {ref['compute_type']} = "
                  f"{ours['transcribe_s'] / ref['transcribe_s']:.2f}; WER difference "
                  f"{100 * (ours['wer'] - ref['wer']):+.2f} points")


if __name__ == "__main__":
    main()
