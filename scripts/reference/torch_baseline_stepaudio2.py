#!/usr/bin/env python3
"""PyTorch baseline on the device for a Step-Audio-2-mini-shaped model, random weights, bf16.

(a) audio encoder shaped like Whisper-large-v3's encoder: one forward on a 30 s mel.
(b) decoder-only LLM shaped like Qwen2.5-7B (vocab 158720): prefill 400 tokens and
    greedy decode of 128 new tokens with KV cache (eager), and optionally static cache
    (transformers then compiles the decode step with torch.compile).

Usage: python3 scripts/reference/torch_baseline_stepaudio2.py [encoder] [llm] [static]
       (default: encoder llm; needs a GPU, torch and transformers)
On the GPU machine scripts/device_compare.sh runs it from the folder that
`scripts/build-cuda.sh --stage` fills.
Prints a summary table at the end; writes JSON to $OUT/torch_baseline_<parts>.json if OUT is set.
"""
import json
import os
import sys
import time

import torch
import transformers

PARTS = set(sys.argv[1:]) or {"encoder", "llm"}
RES = {"torch": torch.__version__, "transformers": transformers.__version__,
       "gpu": torch.cuda.get_device_name(0), "parts": sorted(PARTS)}
torch.backends.cuda.matmul.allow_tf32 = True
torch.backends.cudnn.allow_tf32 = True


def log(*a):
    print(*a, flush=True)


def cuda_time(fn, reps):
    """median ms of fn() over reps, timed with CUDA events (fn is run once before as warm-up by caller)."""
    ts = []
    for _ in range(reps):
        s = torch.cuda.Event(enable_timing=True)
        e = torch.cuda.Event(enable_timing=True)
        torch.cuda.synchronize()
        s.record()
        fn()
        e.record()
        torch.cuda.synchronize()
        ts.append(s.elapsed_time(e))
    ts.sort()
    return ts[len(ts) // 2], ts


def wall_time(fn, reps):
    ts = []
    for _ in range(reps):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        ts.append((time.perf_counter() - t0) * 1e3)
    ts.sort()
    return ts[len(ts) // 2], ts


def bench_encoder():
    from transformers import WhisperConfig
    from transformers.models.whisper.modeling_whisper import WhisperEncoder

    cfg = WhisperConfig(num_mel_bins=128, d_model=1280, encoder_layers=32, encoder_attention_heads=20,
                        encoder_ffn_dim=5120, decoder_layers=2, decoder_attention_heads=20,
                        decoder_ffn_dim=5120, max_source_positions=1500, vocab_size=51866,
                        attn_implementation="sdpa")
    t0 = time.perf_counter()
    torch.set_default_dtype(torch.bfloat16)
    with torch.device("cuda"):
        enc = WhisperEncoder(cfg).eval()
    torch.set_default_dtype(torch.float32)
    enc = enc.to(torch.bfloat16)
    torch.cuda.synchronize()
    nparam = sum(p.numel() for p in enc.parameters())
    log(f"[enc] built in {time.perf_counter() - t0:.1f}s, params {nparam / 1e6:.1f}M, attn={cfg._attn_implementation}")
    mel = torch.randn(1, 128, 3000, device="cuda", dtype=torch.bfloat16)
    with torch.inference_mode():
        out = enc(mel).last_hidden_state  # warm-up
        torch.cuda.synchronize()
        log(f"[enc] out shape {tuple(out.shape)} finite={bool(torch.isfinite(out).all())}")
        med, ts = cuda_time(lambda: enc(mel), 10)
        # batch of 4 x 30 s for throughput
        mel4 = torch.randn(4, 128, 3000, device="cuda", dtype=torch.bfloat16)
        enc(mel4)
        med4, _ = cuda_time(lambda: enc(mel4), 5)
    # FLOPs: per layer 4 d^2 T (qkvo) + 2 T^2 d (QK^T, PV) + 2*d*4d*T (mlp), x2 for mul-add
    d, T, L = 1280, 1500, 32
    fl = L * 2 * (4 * d * d * T + 2 * T * T * d + 8 * d * d * T) + 2 * (128 * 3 * d * 3000 + d * 3 * d * 1500)
    RES["encoder"] = {"params_M": nparam / 1e6, "ms_30s_b1_median": med, "ms_all_b1": ts,
                      "ms_30s_b4_median": med4, "gflop_b1": fl / 1e9,
                      "tflops_b1": fl / (med / 1e3) / 1e12, "tflops_b4": 4 * fl / (med4 / 1e3) / 1e12}
    log(f"[enc] 30 s mel, batch 1: {med:.2f} ms (median of 10), {fl / 1e9:.0f} GFLOP -> {fl / (med / 1e3) / 1e12:.0f} TFLOP/s")
    log(f"[enc] 30 s mel, batch 4: {med4:.2f} ms ({med4 / 4:.2f} ms per clip)")
    del enc, out
    torch.cuda.empty_cache()


def build_llm():
    from transformers import Qwen2Config, Qwen2ForCausalLM

    kw = dict(vocab_size=158720, hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
              num_attention_heads=28, num_key_value_heads=4, max_position_embeddings=16384,
              rms_norm_eps=1e-6, tie_word_embeddings=False, use_cache=True,
              bos_token_id=None, eos_token_id=None, pad_token_id=0, attn_implementation="sdpa")
    try:  # transformers 5.x: rope_theta lives in rope_parameters
        cfg = Qwen2Config(rope_parameters={"rope_type": "default", "rope_theta": 1e6}, **kw)
    except TypeError:  # transformers 4.x
        cfg = Qwen2Config(rope_theta=1e6, **kw)
    t0 = time.perf_counter()
    torch.set_default_dtype(torch.bfloat16)
    with torch.device("cuda"):
        model = Qwen2ForCausalLM(cfg).eval()
    torch.set_default_dtype(torch.float32)
    model = model.to(torch.bfloat16)
    torch.cuda.synchronize()
    nparam = sum(p.numel() for p in model.parameters())
    a0 = model.model.layers[0].self_attn
    bias = {n: getattr(a0, n).bias is not None for n in ("q_proj", "k_proj", "v_proj", "o_proj")}
    rope = getattr(cfg, "rope_parameters", None) or getattr(cfg, "rope_scaling", None)
    log(f"[llm] built in {time.perf_counter() - t0:.1f}s, params {nparam / 1e9:.3f}B, bias {bias}, "
        f"rope {rope} rope_theta attr {getattr(cfg, 'rope_theta', None)}, "
        f"mem {torch.cuda.memory_allocated() / 2**30:.1f} GiB")
    return model, nparam


def bench_llm(static):
    model, nparam = build_llm()
    g = torch.Generator(device="cuda").manual_seed(0)
    ids = torch.randint(0, 158720, (1, 400), device="cuda", generator=g)
    mask = torch.ones_like(ids)
    key = "llm_static" if static else "llm_eager"
    r = {"params_B": nparam / 1e9}
    gen_kw = dict(do_sample=False, attention_mask=mask, pad_token_id=0)
    if static:
        gen_kw["cache_implementation"] = "static"
    with torch.inference_mode():
        if not static:
            # pure prefill forward (logits for all 400 positions, as model() returns)
            model(ids, use_cache=True)
            med, _ = cuda_time(lambda: model(ids, use_cache=True), 10)
            r["prefill_forward_400_ms"] = med
            log(f"[llm] prefill forward 400 tok: {med:.2f} ms -> {400 / med * 1e3:.0f} tok/s, "
                f"{2 * nparam * 400 / (med / 1e3) / 1e12:.0f} TFLOP/s (2*params*tokens)")
        # generate: 1 token (prefill + first token) and 128 tokens
        t0 = time.perf_counter()
        out = model.generate(ids, max_new_tokens=128, min_new_tokens=128, **gen_kw)  # warm-up (compiles if static)
        torch.cuda.synchronize()
        r["first_generate_128_s"] = time.perf_counter() - t0
        log(f"[llm:{key}] first generate(128) incl. warm-up/compile: {r['first_generate_128_s']:.1f}s; new tokens {out.shape[1] - 400}")
        if static:
            t0 = time.perf_counter()
            model.generate(ids, max_new_tokens=128, min_new_tokens=128, **gen_kw)
            torch.cuda.synchronize()
            log(f"[llm:{key}] second generate(128): {time.perf_counter() - t0:.1f}s")
        model.generate(ids, max_new_tokens=1, min_new_tokens=1, **gen_kw)
        t1, _ = wall_time(lambda: model.generate(ids, max_new_tokens=1, min_new_tokens=1, **gen_kw), 5)
        t128, all128 = wall_time(lambda: model.generate(ids, max_new_tokens=128, min_new_tokens=128, **gen_kw), 3)
        per_tok = (t128 - t1) / 127
        r.update({"generate_1_ms": t1, "generate_128_ms": t128, "generate_128_all_ms": all128,
                  "decode_ms_per_token": per_tok, "decode_tok_per_s": 1e3 / per_tok,
                  "end_to_end_tok_per_s_128": 128 / (t128 / 1e3),
                  "decode_GBps_weights_only": 2 * nparam / (per_tok / 1e3) / 1e9})
        log(f"[llm:{key}] generate(1) (prefill 400 + 1 token): {t1:.1f} ms; generate(128): {t128:.1f} ms; "
            f"decode {per_tok:.2f} ms/token = {1e3 / per_tok:.1f} tok/s "
            f"(weights {2 * nparam / 1e9:.1f} GB -> {2 * nparam / (per_tok / 1e3) / 1e9:.0f} GB/s)")
    RES[key] = r
    del model
    torch.cuda.empty_cache()


if __name__ == "__main__":
    log(f"torch {torch.__version__} transformers {transformers.__version__} gpu {RES['gpu']}")
    for part, fn in (("encoder", bench_encoder), ("llm", lambda: bench_llm(False)),
                     ("static", lambda: bench_llm(True))):
        if part in PARTS:
            try:
                fn()
            except Exception as e:  # keep going, report the failure
                import traceback
                traceback.print_exc()
                RES[part + "_error"] = repr(e)
    out = os.environ.get("OUT")
    if out:
        with open(os.path.join(out, "torch_baseline_" + "_".join(sorted(PARTS)) + ".json"), "w") as f:
            json.dump(RES, f, indent=1)
    log("RESULT " + json.dumps({k: v for k, v in RES.items()}, default=str))
