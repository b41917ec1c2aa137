#!/usr/bin/env python3
"""Re-verify the Step-Audio 2 fixtures.

1. Reloads tests/fixtures/step_audio2/tiny_ckpt from disk (config, sharded safetensors via
   the index, tokenizer.json), re-derives every fixture tensor with the reference and
   asserts bit-equality (float32, one CPU thread) and equal metadata.
2. Regenerates the random weights from the seed recorded in the shard metadata and asserts
   they equal the stored ones.
3. Checks the greedy-robustness margin of every stored decode step.
4. Independent float64 numpy re-implementation of the log-mel (rfft), encoder (with the
   key mask), pooling, after_norm and adapter for both clips and for the second piece of
   the long input (batched and alone): relative error <= 1e-5.
5. If transformers is installed: the LLM against transformers' Qwen2ForCausalLM on the same
   weights, from scratch and with a KV cache appended segment by segment (two_turns).

Bit-equality is only expected with the same torch build (see step_audio2_README.md for the
versions used); on another build step 1 prints the relative difference of each mismatching
tensor and fails.
Usage: python3 scripts/reference/step_audio2_selftest.py
"""

from __future__ import annotations

import math
import os
import sys

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import load_file

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import step_audio2_ref as ref  # noqa: E402
import step_audio2_make_checkpoint as mk  # noqa: E402
import step_audio2_make_fixtures as fx  # noqa: E402


def rel(a, b):
    a = np.asarray(a, np.float64)
    b = np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


def check_fixtures():
    files, d = fx.compute_all(fx.CKPT)
    bad = 0
    for name, (tensors, meta) in files.items():
        path = os.path.join(fx.FIXDIR, name + ".safetensors")
        stored = load_file(path)
        with safe_open(path, "pt") as f:
            smeta = f.metadata()
        assert set(stored) == set(tensors), (name, set(stored) ^ set(tensors))
        assert smeta == meta, (name, smeta, meta)
        for k, v in tensors.items():
            s = stored[k]
            if s.dtype != v.dtype or s.shape != v.shape or not torch.equal(s, v):
                bad += 1
                extra = ""
                if s.shape == v.shape and v.dtype.is_floating_point:
                    extra = f" rel diff {rel(v.numpy(), s.numpy()):.3e}"
                print(f"MISMATCH {name}:{k}{extra}")
        print(f"ok {name}: {len(tensors)} tensors bit-equal" if not bad else f"{name} checked")
    assert bad == 0, f"{bad} tensors differ"
    return d


def check_weights():
    cfg = ref.load_config(fx.CKPT)
    W = ref.load_weights(fx.CKPT, cfg)
    shard = os.path.join(fx.CKPT, "model-00001-of-00002.safetensors")
    with safe_open(shard, "pt") as f:
        seed = int(f.metadata()["stepaudio_live_seed"])
    R = mk.random_weights(cfg, seed)
    assert set(R) == set(W)
    for k in W:
        assert torch.equal(R[k], W[k]), k
    assert cfg == mk.make_config(cfg["text_config"]["vocab_size"], cfg["text_config"]["eos_token_id"])
    print(f"ok weights: {len(W)} tensors equal random_weights(seed={seed}); config matches")


def check_gaps(d):
    gaps = [g for r in fx.decode_runs(d) for g in r.rel_gaps]
    assert min(gaps) >= mk.MIN_REL_GAP, min(gaps)
    print(f"ok greedy margin: min (top1-top2)/std(logits) = {min(gaps):.4f} over {len(gaps)} steps")


# ----------------------------- independent numpy float64 path --------------------------

def np_log_mel(audio):
    x = np.concatenate([audio.astype(np.float64), np.zeros(ref.TAIL_PADDING)])
    x = np.pad(x, (200, 200), mode="reflect")
    n = 1 + (len(x) - 400) // 160
    win = 0.5 - 0.5 * np.cos(2 * np.pi * np.arange(400) / 400)      # periodic Hann
    frames = np.stack([x[i * 160:i * 160 + 400] * win for i in range(n)], axis=1)
    power = np.abs(np.fft.rfft(frames, axis=0)) ** 2
    power = power[:, :-1]
    import librosa
    fb = librosa.filters.mel(sr=16000, n_fft=400, n_mels=128, dtype=np.float64)
    m = np.log10(np.maximum(fb @ power, 1e-10))
    m = np.maximum(m, m.max() - 8.0)
    return (m + 4.0) / 4.0


def np_conv1d(x, w, b, stride, pad):                # x [C, T], w [O, C, K]
    C, T = x.shape
    O, _, K = w.shape
    xp = np.pad(x, ((0, 0), (pad, pad)))
    n = (T + 2 * pad - K) // stride + 1
    out = np.empty((O, n))
    for j in range(n):
        out[:, j] = np.einsum("ock,ck->o", w, xp[:, j * stride:j * stride + K])
    return out + b[:, None]


_erf = np.vectorize(math.erf, otypes=[np.float64])


def np_gelu(x):
    return 0.5 * x * (1.0 + _erf(x / np.sqrt(2.0)))


def np_ln(x, w, b, eps=1e-5):
    mu = x.mean(-1, keepdims=True)
    var = ((x - mu) ** 2).mean(-1, keepdims=True)
    return (x - mu) / np.sqrt(var + eps) * w + b


def np_encoder_adapter(W, cfg, mel, T=None):
    """One mel; with T, as a batch entry zero-padded to T frames (published batching)."""
    a = cfg["audio_encoder_config"]
    g = {k: v.double().numpy() for k, v in W.items() if not k.startswith(("model.", "lm_head"))}
    L = mel.shape[1]
    T = T or L
    mel = np.pad(mel, ((0, 0), (0, T - L)))
    h = np_gelu(np_conv1d(mel, g["encoder.conv1.weight"], g["encoder.conv1.bias"], 1, 1))
    h = np_gelu(np_conv1d(h, g["encoder.conv2.weight"], g["encoder.conv2.bias"], 2, 1)).T
    T2, D = h.shape
    # key j is the mel frame (T+1)%2 + 2j; valid when that frame < L - 2
    valid = np.array([((T + 1) % 2 + 2 * j) < L - 2 for j in range(T2)])
    h = h + g["encoder.positional_embedding.weight"][:T2]
    nh = a["n_audio_head"]
    hd = D // nh
    for i in range(a["n_audio_layer"]):
        p = f"encoder.blocks.{i}."
        y = np_ln(h, g[p + "attn_ln.weight"], g[p + "attn_ln.bias"])
        q = y @ g[p + "attn.query.weight"].T + g[p + "attn.query.bias"]
        k = y @ g[p + "attn.key.weight"].T
        v = y @ g[p + "attn.value.weight"].T + g[p + "attn.value.bias"]
        att = np.zeros_like(q)
        for hh in range(nh):
            sl = slice(hh * hd, (hh + 1) * hd)
            s = q[:, sl] @ k[:, sl].T / np.sqrt(hd)
            s[:, ~valid] = -np.inf
            s = np.exp(s - s.max(-1, keepdims=True))
            att[:, sl] = (s / s.sum(-1, keepdims=True)) @ v[:, sl]
        h = h + att @ g[p + "attn.out.weight"].T + g[p + "attn.out.bias"]
        y = np_ln(h, g[p + "mlp_ln.weight"], g[p + "mlp_ln.bias"])
        y = np_gelu(y @ g[p + "mlp.0.weight"].T + g[p + "mlp.0.bias"])
        h = h + y @ g[p + "mlp.2.weight"].T + g[p + "mlp.2.bias"]
    P = T2 // 2
    pooled = 0.5 * (h[0:2 * P:2] + h[1:2 * P:2])
    enc = np_ln(pooled, g["encoder.after_norm.weight"], g["encoder.after_norm.bias"])
    E = (L - 1) // 4
    y = np_gelu(np_conv1d(enc.T, g["adapter.conv.weight"], g["adapter.conv.bias"], 2, 1)).T
    y = np.maximum(y @ g["adapter.linear1.weight"].T + g["adapter.linear1.bias"], 0)
    y = y @ g["adapter.linear2.weight"].T + g["adapter.linear2.bias"]
    return enc, E, y[:(E - 1) // 2 + 1]


def check_numpy():
    cfg = ref.load_config(fx.CKPT)
    W = ref.load_weights(fx.CKPT, cfg)
    for clip, _ in (fx.CLIP1, fx.CLIP2):
        f = load_file(os.path.join(fx.FIXDIR, clip + ".safetensors"))
        mel = np_log_mel(f["audio"].numpy())
        r_mel = rel(f["mel"].numpy(), mel)
        # feed the stored f32 mel so that the encoder check isolates the encoder
        enc, E, ad = np_encoder_adapter(W, cfg, f["mel"].double().numpy())
        r_enc = rel(f["encoder_out"].numpy(), enc)
        r_ad = rel(f["adapter_out"].numpy(), ad)
        assert E == int(f["encoder_valid_len"][0])
        print(f"ok numpy f64 cross-check {clip}: mel rel {r_mel:.2e}, encoder_out rel {r_enc:.2e}, "
              f"adapter_out rel {r_ad:.2e}")
        assert r_mel < 1e-5 and r_enc < 1e-5 and r_ad < 1e-5
    lf = load_file(os.path.join(fx.FIXDIR, "long_27s.safetensors"))
    for pre in ("", "unpadded_"):
        mel1 = lf[pre + "mel_piece1"].double().numpy()
        enc, E, ad = np_encoder_adapter(W, cfg, mel1, T=int(lf["encoder_padded_len"][0]))
        want_enc = lf["encoder_out"][1] if pre == "" else lf["unpadded_encoder_out_piece1"]
        r_enc = rel(want_enc[:E].numpy(), enc[:E])
        r_ad = rel(lf[pre + "adapter_out_piece1"].numpy(), ad)
        enc_a, E_a, ad_a = np_encoder_adapter(W, cfg, mel1)
        r_ea = rel(lf[pre + "encoder_out_piece1_alone"].numpy(), enc_a)
        r_aa = rel(lf[pre + "adapter_out_piece1_alone"].numpy(), ad_a)
        print(f"ok numpy f64 cross-check long_27s {pre or 'padded_'}piece1: batched encoder rows "
              f"< E rel {r_enc:.2e}, adapter rel {r_ad:.2e}; alone encoder rel {r_ea:.2e}, "
              f"adapter rel {r_aa:.2e}")
        assert max(r_enc, r_ad, r_ea, r_aa) < 1e-5


def check_transformers():
    """Optional: the LLM part against transformers' own Qwen2ForCausalLM on the same
    weights and input embeddings, from scratch and with a KV cache appended per turn."""
    try:
        from transformers import Qwen2Config, Qwen2ForCausalLM
    except Exception as e:  # pragma: no cover
        print(f"skip transformers cross-check ({e})")
        return
    cfg = ref.load_config(fx.CKPT)
    W = ref.load_weights(fx.CKPT, cfg)
    t = cfg["text_config"]
    qc = Qwen2Config(vocab_size=t["vocab_size"], hidden_size=t["hidden_size"],
                     intermediate_size=t["intermediate_size"],
                     num_hidden_layers=t["num_hidden_layers"],
                     num_attention_heads=t["num_attention_heads"],
                     num_key_value_heads=t["num_key_value_heads"], rms_norm_eps=t["rms_norm_eps"],
                     rope_theta=t["rope_theta"], tie_word_embeddings=False,
                     max_position_embeddings=4096, attn_implementation="eager")
    m = Qwen2ForCausalLM(qc).eval()
    m.load_state_dict({k: v for k, v in W.items() if k.startswith(("model.", "lm_head"))},
                      strict=True)
    c1 = load_file(os.path.join(fx.FIXDIR, fx.CLIP1[0] + ".safetensors"))
    c2 = load_file(os.path.join(fx.FIXDIR, fx.CLIP2[0] + ".safetensors"))
    tw = load_file(os.path.join(fx.FIXDIR, "two_turns.safetensors"))
    emb = ref.embed_with_audio(W, tw["full_ids"].tolist(),
                               [tw["turn1_patch_positions"].tolist(),
                                tw["turn2_patch_positions"].tolist()],
                               [c1["adapter_out"], c2["adapter_out"]])
    b = tw["segment_bounds"].tolist()
    with torch.no_grad():
        full = m(inputs_embeds=emb[None]).logits[0, -1]
        cache = None
        for lo, hi in zip([0] + b[:-1], b):          # system, turn-1 prompt, turn-1 answer, turn 2
            o = m(inputs_embeds=emb[None, lo:hi], past_key_values=cache, use_cache=True)
            cache = o.past_key_values
        cached = o.logits[0, -1]
    want = tw["turn2_prefill_logits"]
    r_full, r_cached = rel(full.numpy(), want.numpy()), rel(cached.numpy(), want.numpy())
    print(f"ok transformers Qwen2 cross-check: turn2_prefill_logits rel {r_full:.2e} "
          f"(from scratch), {r_cached:.2e} (KV cache appended per segment)")
    assert r_full < 1e-5 and r_cached < 1e-5


def main():
    ref.set_deterministic()
    check_weights()
    d = check_fixtures()
    check_gaps(d)
    check_numpy()
    check_transformers()
    print("step_audio2 selftest passed")


if __name__ == "__main__":
    main()
