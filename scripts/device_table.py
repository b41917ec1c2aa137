#!/usr/bin/env python3
"""Prints one comparison table from the JSON files that scripts/device_compare.sh writes:
the Rust benchmark (benchmark_e2e --arch step-audio-2-mini --json, one or two modes),
the PyTorch baseline (reference/torch_baseline_stepaudio2.py), the kernel checks and the parity
check (gpu_check --json). Missing files are skipped.

Usage: device_table.py OUT_DIR
"""
import glob
import json
import os
import sys


def load(path):
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def fmt(x, nd=2):
    if x is None:
        return "–"
    if isinstance(x, float) and x != x:
        return "–"
    return f"{x:.{nd}f}"


def main():
    out = sys.argv[1] if len(sys.argv) > 1 else os.environ.get("OUT", ".")
    rust = load(os.path.join(out, "rust_sa2.json"))
    torch_files = sorted(glob.glob(os.path.join(out, "torch_baseline_*.json")))
    torch = {}
    for p in torch_files:
        torch.update(load(p) or {})
    gpu = open(os.path.join(out, "gpu.txt")).read().strip().splitlines()[-1] if os.path.exists(
        os.path.join(out, "gpu.txt")) else "?"
    print(f"\n### Step-Audio 2 mini (random weights, bf16), one call, one card: {gpu}\n")
    modes = rust["modes"] if rust else []
    heads = [m["mode"] for m in modes]
    cols = ["metric", "target"] + [f"Rust: {h}" for h in heads] + ["PyTorch eager", "PyTorch static+compile"]
    print("| " + " | ".join(cols) + " |")
    print("|" + "---|" * len(cols))

    def row(name, target, rust_vals, te=None, ts=None):
        print("| " + " | ".join([name, target] + rust_vals + [te or "–", ts or "–"]) + " |")

    le, ls = torch.get("llm_eager", {}), torch.get("llm_static", {})
    for ci in range(max((len(m["clips"]) for m in modes), default=0)):
        name = modes[0]["clips"][ci]["clip"].split("/")[-1]
        secs = modes[0]["clips"][ci]["seconds"]
        c = [m["clips"][ci] for m in modes]
        row(f"decode ms/token ({name})", "≤ 6.7 (≥ 150 tok/s)",
            [f"{fmt(x['ms_per_token'])} ({fmt(1e3 / x['ms_per_token'], 0)} tok/s)" for x in c],
            f"{fmt(le.get('decode_ms_per_token'))} ({fmt(le.get('decode_tok_per_s'), 0)} tok/s)" if le else None,
            f"{fmt(ls.get('decode_ms_per_token'))} ({fmt(ls.get('decode_tok_per_s'), 0)} tok/s)" if ls else None)
        row(f"log-mel {secs:.2f} s, ms", "", [fmt(x["mel_ms"], 3) for x in c])
        row("encoder, ms", "", [fmt(x["encoder_ms"]) for x in c])
        row("adapter, ms", "", [fmt(x["adapter_ms"]) for x in c])
        row(f"prefill turn ({c[0]['prompt_tokens']} tok, system cached), ms", "", [fmt(x["prefill_turn_ms"]) for x in c])
        row(f"prefill whole prompt ({c[0]['prompt_tokens'] + c[0]['system_tokens']} tok), ms", "", [fmt(x["prefill_whole_ms"]) for x in c])
        row(f"E2E mel→{c[0]['decode_steps'] + 1} tokens, system prompt cached, ms", "≤ 350 (7.18 s clip)", [fmt(x["e2e_cached_system_ms"], 1) for x in c])
        row("E2E one-shot (+ system prompt prefill), ms / RTF", "",
            [f"{fmt(x['e2e_one_shot_ms'], 1)} / {fmt(x['rtf_one_shot'], 4)}" for x in c])
    f = [m.get("fixed", {}) for m in modes]
    row("encoder 30 s, ms", "≤ 10", [fmt(x.get("encoder30_ms")) for x in f],
        fmt(torch.get("encoder", {}).get("ms_30s_b1_median")) if torch.get("encoder") else None)
    row("prefill 400 tokens, ms", "", [fmt(x.get("prefill400_ms")) for x in f],
        fmt(le.get("prefill_forward_400_ms")) + " (logits of all 400 rows)" if le.get("prefill_forward_400_ms") else None)
    row("log-mel 15 s on the GPU, ms (with upload)", "≤ 0.2",
        [f"{fmt(x.get('mel15_device_ms'), 3)} ({fmt(x.get('mel15_with_upload_ms'), 3)})" for x in f])
    row("log-mel 15 s on the CPU (1 thread of this host), ms", "", [fmt(x.get("mel15_cpu_ms"), 3) for x in f])
    if rust:
        gib = rust["peak_device_memory_bytes"] / 2**30
        alloc = (rust.get("peak_allocated_bytes") or 0) / 2**30
        mod = (rust.get("model_memory_bytes") or 0) / 2**30
        print(f"\nPeak device memory: {alloc:.2f} GiB allocated at most (pool high-water mark, weights "
              f"included), {gib:.1f} GiB reserved (total − free); weights {mod:.2f} GiB "
              f"(target: fits 24 GB). Torch {torch.get('torch', '?')}, transformers {torch.get('transformers', '?')}.")
    for name in ("check.json", "parity.json"):
        j = load(os.path.join(out, name))
        if not j:
            continue
        checks = j.get("checks", [])
        bad = [c for c in checks if not c["pass"]]
        print(f"\n{name}: {len(checks) - len(bad)}/{len(checks)} checks pass")
        for c in checks:
            print(f"  {'PASS' if c['pass'] else 'FAIL'} {c['name']}: {c['detail']}")


if __name__ == "__main__":
    main()
