#!/usr/bin/env python3
"""Batched greedy decode capacity of PyTorch + transformers for a Step-Audio-2-mini-shaped LLM.

The model is Qwen2ForCausalLM shaped like Qwen2.5-7B as Step-Audio 2 mini uses it (hidden 3584,
28 layers, 28 heads / 4 KV heads, head dim 128, MLP 18944, vocab 158720, rope theta 1e6, q/k/v
bias, untied lm_head), random bf16 weights built straight on the GPU. For each batch size B:
  - a StaticCache (max_cache_len = context + warmup + steps + 8) is filled with `--context`
    random tokens per stream (prefill through the base model, no lm_head, in chunks of at most
    `--prefill-tokens` tokens per forward; chunks are along time, so the static cache's fixed
    batch never has to be split);
  - then one greedy decode STEP (one new token for each of the B streams: forward on the static
    cache + argmax of the logits on the device) is timed with CUDA events, synchronising around
    each step, `--steps` times after `--warmup` steps; the median is reported.
Modes: "eager" (same static cache, no compile) and "compiled" (the forward wrapped in
torch.compile(mode="reduce-overhead", fullgraph=True), i.e. inductor + CUDA graphs, the standard
"static cache + torch.compile" fast path). One compile per B (dynamo is reset between batch
sizes, nothing is marked dynamic); the warm-up wall time, which holds the compile and the CUDA
graph capture, is reported per B as compile_s. If fullgraph=True fails to compile, that error is
recorded and the B is retried once with fullgraph=False (tagged in the results).

Per B and mode: median step ms, aggregate tokens/s (B / step time), MiB per stream
((torch.cuda.max_memory_allocated over the decode steps - weights) / B; the peak is reset after the
prefill, so it holds the cache, the step's activations and, when compiled, the CUDA graph pool),
and step ms relative to B=1 of the same mode. Errors (OOM, compile failures) are recorded per
entry and the run goes on. Note what the standard path does: with a static cache, attention runs
over all max_cache_len slots with an explicit mask, so transformers' sdpa path expands K/V from 4
to 28 heads (repeat_kv) each layer instead of using SDPA's GQA; that cost is part of the numbers.

Checked on CPU (--tiny, eager and compiled, with --check) with torch 2.11 and transformers
4.46.3, 4.57.1 and 5.17.0 (the StaticCache constructor and the forward's cache_position differ
between them; both are picked by inspect.signature at run time).

Defaults: eager for every B of --batches (1,2,4,...,256); compiled only for B in 1,8,64,256
(--compiled-batches; "all" = every B of --batches), since one compile of the 28-layer model costs
~25-40 s. Expected on one H200: ~3 min for the defaults, +~30 s with --check. --budget-s (480)
skips the compiled B that would start after that many seconds (recorded as skipped) so the
command stays inside the device's 10-minute limit.

--check (before the benchmark; --no-bench to run it alone): a 2-layer model of the same widths,
B=4 streams with different random contexts, 3 teacher-forced decode steps; each row's logits must
equal that stream decoded alone (batch 1) and the same stream run through the model without a
cache, within bf16 tolerance (--check-tol, relative to max |logit|). Done for each mode.

Usage (on the GPU machine):
  python3 scripts/reference/torch_batched_decode.py --batches 1,2,4,8,16,32,64,128,256 --context 512
  python3 scripts/reference/torch_batched_decode.py --check            # sanity check, then benchmark
  python3 scripts/reference/torch_batched_decode.py --tiny --check     # CPU smoke test, tiny model
Prints a markdown table at the end; writes $OUT/torch_batched_decode.json when OUT is set
(rewritten after each entry, so a run cut short still leaves its results).
"""
import argparse
import gc
import inspect
import json
import os
import sys
import time
import traceback

import torch
import transformers
from transformers import Qwen2Config, Qwen2ForCausalLM, StaticCache

T0 = time.perf_counter()


def log(*a):
    print(f"[{time.perf_counter() - T0:6.1f}s]", *a, flush=True)


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--batches", default="1,2,4,8,16,32,64,128,256")
    p.add_argument("--compiled-batches", default="1,8,64,256",
                   help='B to run compiled (only those also in --batches); "all" = every B')
    p.add_argument("--modes", default="eager,compiled", help="comma list of eager, compiled")
    p.add_argument("--context", type=int, default=512, help="tokens per stream in the cache before decoding")
    p.add_argument("--steps", type=int, default=32, help="timed decode steps")
    p.add_argument("--warmup", type=int, default=5, help="untimed steps first (compile + CUDA graph capture)")
    p.add_argument("--prefill-tokens", type=int, default=16384, help="max tokens (B x chunk) per prefill forward")
    p.add_argument("--budget-s", type=float, default=480.0, help="start no compiled B after this many seconds (0: no limit)")
    p.add_argument("--check", action="store_true", help="batched-vs-single logits check (2-layer model) first")
    p.add_argument("--check-tol", type=float, default=0.05)
    p.add_argument("--no-bench", action="store_true", help="skip the benchmark (with --check)")
    p.add_argument("--tiny", action="store_true", help="tiny 2-layer model (CPU smoke test)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args()
    a.batches = [int(x) for x in a.batches.split(",") if x]
    a.modes = [m for m in a.modes.split(",") if m]
    for m in a.modes:
        if m not in ("eager", "compiled"):
            p.error(f"unknown mode {m}")
    if a.compiled_batches == "all":
        a.compiled_batches = list(a.batches)
    else:
        a.compiled_batches = [b for b in (int(x) for x in a.compiled_batches.split(",") if x) if b in a.batches]
    return a


# ---------------------------------------------------------------- model, cache, forward arguments

def make_config(tiny, layers=None):
    if tiny:
        kw = dict(vocab_size=1024, hidden_size=64, intermediate_size=160, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2)
    else:
        kw = dict(vocab_size=158720, hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
                  num_attention_heads=28, num_key_value_heads=4)
    if layers is not None:
        kw["num_hidden_layers"] = layers
    kw.update(max_position_embeddings=32768, rms_norm_eps=1e-6, tie_word_embeddings=False, use_cache=True,
              use_sliding_window=False, bos_token_id=None, eos_token_id=None, pad_token_id=0,
              attn_implementation="sdpa")
    # transformers 5.x keeps rope theta in rope_parameters; 4.x takes rope_theta (and would silently
    # store an unknown rope_parameters kwarg), so pick by the signature rather than by try/except
    if "rope_parameters" in inspect.signature(Qwen2Config.__init__).parameters:
        kw["rope_parameters"] = {"rope_type": "default", "rope_theta": 1e6}
    else:
        kw["rope_theta"] = 1e6
    return Qwen2Config(**kw)


def rope_theta(cfg):
    rp = getattr(cfg, "rope_parameters", None)
    if isinstance(rp, dict) and "rope_theta" in rp:
        return rp["rope_theta"]
    return getattr(cfg, "rope_theta", None)


def build_model(cfg, device, seed):
    t0 = time.perf_counter()
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device(device):
            model = Qwen2ForCausalLM(cfg).eval()
    finally:
        torch.set_default_dtype(torch.float32)
    # (no model.to(bf16): it would also round the float32 rope inv_freq buffer)
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())
    # own init, independent of what the transformers version does in post_init: N(0, 0.02), norms 1
    g = torch.Generator(device=device).manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "norm" in n:
                p.fill_(1.0)
            else:
                p.normal_(0.0, 0.02, generator=g)
    sync(device)
    nparam = sum(p.numel() for p in model.parameters())
    a0 = model.model.layers[0].self_attn
    bias = {n: getattr(a0, n).bias is not None for n in ("q_proj", "k_proj", "v_proj", "o_proj")}
    log(f"model: {cfg.num_hidden_layers} layers, {nparam / 1e9:.3f}B params, bias {bias}, "
        f"rope theta {rope_theta(cfg)}, attn {model.config._attn_implementation}, built in {time.perf_counter() - t0:.1f}s")
    return model, nparam


def sig_params(fn):
    return set(inspect.signature(fn).parameters)


def make_cache(model, batch, max_len, device):
    """StaticCache for whatever signature the installed transformers has.

    4.4x: StaticCache(config, max_batch_size (or batch_size), max_cache_len, device, dtype), allocated
    at once; 5.x: StaticCache(config, max_cache_len), allocated lazily at the first update (our eager
    prefill, which also marks the tensors as static addresses for the CUDA graphs)."""
    params = sig_params(StaticCache.__init__)
    kw = {"config": model.config, "max_cache_len": max_len}
    if "max_batch_size" in params:
        kw["max_batch_size"] = batch
    elif "batch_size" in params:
        kw["batch_size"] = batch
    if "device" in params:
        kw["device"] = torch.device(device)
    if "dtype" in params:
        kw["dtype"] = torch.bfloat16
    return StaticCache(**kw)


class Fwd:
    """Builds the forward kwargs. position_ids are always passed; cache_position only where the
    model's forward still takes it (4.x: it picks the cache slots; 5.x: the cache counts itself)."""

    def __init__(self, model):
        self.full_cp = "cache_position" in sig_params(model.forward)
        self.base_cp = "cache_position" in sig_params(model.model.forward)

    def kwargs(self, ids, pos, cache, base=False):
        # pos: 1-D long tensor of the positions of ids' columns (same for every stream)
        kw = dict(input_ids=ids, position_ids=pos.view(1, -1), past_key_values=cache, use_cache=True)
        if self.base_cp if base else self.full_cp:
            kw["cache_position"] = pos
        return kw


def prefill(model, fwd, cache, ids, max_tokens):
    """Fill the cache with ids [B, C] through the base model (no lm_head: B*C*vocab logits would be
    tens of GB), in time chunks of at most max_tokens tokens per forward."""
    B, C = ids.shape
    chunk = max(1, min(C, max_tokens // B))
    for s in range(0, C, chunk):
        e = min(C, s + chunk)
        pos = torch.arange(s, e, device=ids.device)
        model.model(**fwd.kwargs(ids[:, s:e], pos, cache, base=True))
    return chunk


def cache_len(cache):
    try:
        return int(cache.get_seq_length())
    except Exception:
        return None


# ---------------------------------------------------------------- timing

def sync(device):
    if str(device).startswith("cuda"):
        torch.cuda.synchronize()


def time_step(step, device):
    """ms of one step(), with CUDA events on the GPU (synchronised before and after)."""
    if str(device).startswith("cuda"):
        s = torch.cuda.Event(enable_timing=True)
        e = torch.cuda.Event(enable_timing=True)
        torch.cuda.synchronize()
        s.record()
        step()
        e.record()
        torch.cuda.synchronize()
        return s.elapsed_time(e)
    t0 = time.perf_counter()
    step()
    return (time.perf_counter() - t0) * 1e3


def compile_counts():
    """(graphs dynamo compiled, CUDA graph skips) so far: to show one compile per B, none while timing."""
    from torch._dynamo.utils import counters
    return counters["stats"]["unique_graphs"], counters["inductor"]["cudagraph_skips"]


def compile_fn(model, fullgraph):
    # what transformers' generate compiles for decoding: the module call
    return torch.compile(model.__call__, mode="reduce-overhead", fullgraph=fullgraph)


def reset_compiler():
    torch._dynamo.reset()  # also drops the CUDA graph trees and their memory pool


def free(device):
    gc.collect()
    if str(device).startswith("cuda"):
        torch.cuda.empty_cache()


def bench_one(model, fwd, B, mode, args, weights_bytes, fullgraph=True):
    dev = args.device
    cuda = dev.startswith("cuda")
    C = args.context
    max_len = C + args.warmup + args.steps + 8
    r = {"B": B, "mode": mode, "context": C, "max_cache_len": max_len}
    if cuda:  # should be the weights alone: shows nothing leaked from the previous entry
        r["allocated_before_mib"] = torch.cuda.memory_allocated() / 2**20
    g = torch.Generator(device=dev).manual_seed(args.seed + B)
    vocab = model.config.vocab_size
    ids = torch.randint(0, vocab, (B, C), device=dev, generator=g)
    cache = make_cache(model, B, max_len, dev)
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    chunk = prefill(model, fwd, cache, ids, args.prefill_tokens)
    sync(dev)
    r["prefill_s"] = time.perf_counter() - t0
    r["prefill_chunk"] = chunk
    seen = cache_len(cache)
    if seen is not None and seen != C:
        raise RuntimeError(f"cache holds {seen} tokens after prefill, expected {C}")
    if cuda:
        r["prefill_peak_mib"] = torch.cuda.max_memory_allocated() / 2**20
    del ids

    call = model if mode == "eager" else compile_fn(model, fullgraph)
    if mode == "compiled":
        r["fullgraph"] = fullgraph
    tok = torch.randint(0, vocab, (B, 1), device=dev, generator=g)
    pos = torch.full((1,), C, dtype=torch.long, device=dev)

    def step():
        if mode == "compiled":
            torch.compiler.cudagraph_mark_step_begin()  # previous step's outputs are consumed
        logits = call(**fwd.kwargs(tok, pos, cache)).logits
        tok.copy_(logits[:, -1, :].argmax(-1, keepdim=True))  # greedy, on the device
        pos.add_(1)

    if cuda:
        torch.cuda.reset_peak_memory_stats()  # peak of the decode phase only (cache already allocated)
    c0 = compile_counts()
    t0 = time.perf_counter()
    warm = []
    for _ in range(args.warmup):
        warm.append(time_step(step, dev))
    r["compile_s" if mode == "compiled" else "warmup_s"] = time.perf_counter() - t0
    r["warmup_ms"] = warm
    c1 = compile_counts()
    ts = [time_step(step, dev) for _ in range(args.steps)]
    c2 = compile_counts()
    if mode == "compiled":
        r.update(graphs_compiled_warmup=c1[0] - c0[0], graphs_compiled_timed=c2[0] - c1[0],
                 cudagraph_skips=c2[1] - c0[1])
    srt = sorted(ts)
    med = srt[len(srt) // 2]
    r.update(step_ms=med, step_ms_min=srt[0], step_ms_max=srt[-1], step_ms_all=ts, tok_s=B / (med / 1e3))
    if cuda:
        peak = torch.cuda.max_memory_allocated()
        r["peak_mib"] = peak / 2**20
        r["mib_per_stream"] = (peak - weights_bytes) / B / 2**20
        r["reserved_mib"] = torch.cuda.memory_reserved() / 2**20
    seen = cache_len(cache)
    r["cache_len_after"] = seen
    del cache, call, tok, pos
    return r


# ---------------------------------------------------------------- batched-vs-single check

def run_streams(model, fwd, call, cache, ctx, toks, args, compiled):
    """prefill ctx [b, C], then teacher-forced decode of toks [b, n]; logits [n, b, V] in f32."""
    C = ctx.shape[1]
    prefill(model, fwd, cache, ctx, args.prefill_tokens)
    out = []
    for s in range(toks.shape[1]):
        pos = torch.tensor([C + s], device=ctx.device)
        if compiled:
            torch.compiler.cudagraph_mark_step_begin()
        lg = call(**fwd.kwargs(toks[:, s:s + 1].contiguous(), pos, cache)).logits
        out.append(lg[:, -1, :].float().clone())
    return torch.stack(out)


def rel_err(a, b):
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-30))


def check(args):
    dev = args.device
    res = {}
    cfg = make_config(args.tiny, layers=2)
    model, _ = build_model(cfg, dev, args.seed + 1)
    fwd = Fwd(model)
    B, n = 4, 3
    C = min(args.context, 128) if args.tiny else args.context
    g = torch.Generator(device=dev).manual_seed(args.seed + 7)
    ctx = torch.randint(0, cfg.vocab_size, (B, C), device=dev, generator=g)
    toks = torch.randint(0, cfg.vocab_size, (B, n), device=dev, generator=g)
    with torch.no_grad():
        # the same streams through the model without any cache: one full causal forward each
        ref = []
        for i in range(B):
            full = torch.cat([ctx[i:i + 1], toks[i:i + 1]], dim=1)
            ref.append(model(input_ids=full, use_cache=False).logits[0, C:C + n, :].float())
        ref = torch.stack(ref, dim=1)  # [n, B, V]
        for mode in args.modes:
            t0 = time.perf_counter()
            c0 = compile_counts()
            try:
                call = model if mode == "eager" else compile_fn(model, True)
                batched = run_streams(model, fwd, call, make_cache(model, B, C + n, dev), ctx, toks, args,
                                      mode == "compiled")
                single_cache = make_cache(model, 1, C + n, dev)  # one object, reset per row (no recompiles)
                single = []
                for i in range(B):
                    if i:
                        single_cache.reset()
                    single.append(run_streams(model, fwd, call, single_cache, ctx[i:i + 1], toks[i:i + 1],
                                              args, mode == "compiled")[:, 0])
                single = torch.stack(single, dim=1)
                e_bs = max(rel_err(batched[:, i], single[:, i]) for i in range(B))
                e_sr = max(rel_err(single[:, i], ref[:, i]) for i in range(B))
                e_br = max(rel_err(batched[:, i], ref[:, i]) for i in range(B))
                spread = min(rel_err(batched[:, i], batched[:, (i + 1) % B]) for i in range(B))
                agree = float((batched.argmax(-1) == single.argmax(-1)).float().mean())
                ok = max(e_bs, e_sr, e_br) < args.check_tol and spread > 10 * max(e_bs, e_sr)
                res[mode] = {"max_rel_err_batched_vs_single": e_bs, "max_rel_err_single_vs_uncached": e_sr,
                             "max_rel_err_batched_vs_uncached": e_br, "min_rel_diff_between_rows": spread,
                             "argmax_agreement_batched_vs_single": agree, "ok": ok,
                             "seconds": time.perf_counter() - t0, "graphs_compiled": compile_counts()[0] - c0[0]}
                log(f"check[{mode}] B={B} ctx={C} steps={n}: max rel err batched vs single {e_bs:.2e}, "
                    f"single (static cache) vs uncached forward {e_sr:.2e}, batched vs uncached {e_br:.2e}; "
                    f"rows differ by >= {spread:.2e}; argmax agree {agree:.2f} -> {'OK' if ok else 'MISMATCH'}")
            except Exception as e:
                traceback.print_exc()
                res[mode] = {"error": repr(e)[:2000]}
                log(f"check[{mode}] failed: {e!r}"[:500])
            finally:
                reset_compiler()
    del model
    free(dev)
    return res


# ---------------------------------------------------------------- main

def write_json(res):
    out = os.environ.get("OUT")
    if out:
        with open(os.path.join(out, "torch_batched_decode.json"), "w") as f:
            json.dump(res, f, indent=1, default=str)


def table(results):
    base = {r["mode"]: r["step_ms"] for r in results if r["B"] == 1 and "step_ms" in r}
    lines = ["| B | mode | step ms | tokens/s | MiB per stream | step ms / B=1 step ms |",
             "|---:|---|---:|---:|---:|---:|"]
    for r in results:
        mode = r["mode"] + ("" if r.get("fullgraph", True) else " (fullgraph=False)")
        if "step_ms" not in r:
            why = r.get("error") or r.get("skipped") or "?"
            lines.append(f"| {r['B']} | {mode} | {why[:80]} | | | |")
            continue
        mib = f"{r['mib_per_stream']:.1f}" if "mib_per_stream" in r else "-"
        rel = f"{r['step_ms'] / base[r['mode']]:.2f}" if r["mode"] in base else "-"
        lines.append(f"| {r['B']} | {mode} | {r['step_ms']:.2f} | {r['tok_s']:.0f} | {mib} | {rel} |")
    comp = [r for r in results if r["mode"] == "compiled" and "compile_s" in r]
    if comp:
        lines += ["", "| B | compile + CUDA graph capture s (warm-up steps) | prefill s |", "|---:|---:|---:|"]
        lines += [f"| {r['B']} | {r['compile_s']:.1f} | {r['prefill_s']:.2f} |" for r in comp]
    return "\n".join(lines)


def main():
    args = parse_args()
    dev = args.device
    cuda = dev.startswith("cuda")
    # one static compile per B: no automatic dynamic shapes, room for the recompiles we do cause
    torch._dynamo.config.automatic_dynamic_shapes = False
    for name in ("cache_size_limit", "recompile_limit"):
        if hasattr(torch._dynamo.config, name):
            setattr(torch._dynamo.config, name, 64)
    res = {"torch": torch.__version__, "transformers": transformers.__version__, "cuda": torch.version.cuda,
           "python": sys.version.split()[0], "gpu": torch.cuda.get_device_name(0) if cuda else "cpu",
           "device": dev, "args": {k: v for k, v in vars(args).items()},
           "static_cache_signature": str(inspect.signature(StaticCache.__init__))}
    log(f"torch {res['torch']} transformers {res['transformers']} cuda {res['cuda']} gpu {res['gpu']}")
    log(f"StaticCache{res['static_cache_signature']}")

    if args.check:
        res["check"] = check(args)
        write_json(res)
    if args.no_bench:
        log("RESULT " + json.dumps(res, default=str))
        return

    cfg = make_config(args.tiny)
    model, nparam = build_model(cfg, dev, args.seed)
    fwd = Fwd(model)
    weights = torch.cuda.memory_allocated() if cuda else 0
    res.update(params=nparam, weights_mib=weights / 2**20, forward_takes_cache_position=fwd.full_cp,
               config={k: getattr(cfg, k, None) for k in (
                   "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                   "num_key_value_heads", "rms_norm_eps", "tie_word_embeddings")} | {"rope_theta": rope_theta(cfg)})
    log(f"weights {weights / 2**20:.0f} MiB")
    results = res["results"] = []
    with torch.no_grad():
        for mode in args.modes:
            for B in (args.batches if mode == "eager" else args.compiled_batches):
                elapsed = time.perf_counter() - T0
                if mode == "compiled" and args.budget_s and elapsed > args.budget_s:
                    results.append({"B": B, "mode": mode, "skipped": f"time budget ({elapsed:.0f}s > {args.budget_s:.0f}s)"})
                    log(f"B={B} {mode}: skipped, {results[-1]['skipped']}")
                    continue
                fullgraph = True
                first_err = None
                while True:
                    try:
                        r = bench_one(model, fwd, B, mode, args, weights, fullgraph)
                        if first_err:
                            r["fullgraph_error"] = first_err
                        break
                    except Exception as e:
                        traceback.print_exc()
                        err = repr(e)[:2000]
                        oom = isinstance(e, torch.cuda.OutOfMemoryError) or "out of memory" in str(e)
                        if mode == "compiled" and fullgraph and not oom:
                            first_err, fullgraph = err, False  # one retry allowing graph breaks
                            log(f"B={B} compiled: fullgraph=True failed ({err[:200]}); retrying with fullgraph=False")
                            reset_compiler()
                            free(dev)
                            continue
                        r = {"B": B, "mode": mode, "error": err, "oom": oom}
                        if first_err:
                            r["fullgraph_error"] = first_err
                        break
                    finally:
                        if mode == "compiled":
                            reset_compiler()
                        free(dev)
                results.append(r)
                if "step_ms" in r:
                    extra = (f", compile+capture {r['compile_s']:.1f}s ({r['graphs_compiled_warmup']} graph(s); "
                             f"{r['graphs_compiled_timed']} compiled while timing; "
                             f"{r['cudagraph_skips']} CUDA graph skips)") if "compile_s" in r else ""
                    mem = f", {r['mib_per_stream']:.1f} MiB/stream" if "mib_per_stream" in r else ""
                    log(f"B={B} {mode}: step {r['step_ms']:.2f} ms (min {r['step_ms_min']:.2f}, max {r['step_ms_max']:.2f}), "
                        f"{r['tok_s']:.0f} tok/s{mem}, prefill {r['prefill_s']:.2f}s{extra}")
                else:
                    log(f"B={B} {mode}: ERROR {r['error'][:300]}")
                write_json(res)
    res["table"] = table(results)
    res["total_s"] = time.perf_counter() - T0
    write_json(res)
    print("\n" + res["table"] + "\n", flush=True)
    log(f"total {res['total_s']:.0f}s")


if __name__ == "__main__":
    main()
