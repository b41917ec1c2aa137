#!/usr/bin/env python3
"""Whisper encoder/decoder reference fixtures from CTranslate2 weights.

    python3 scripts/reference/make_whisper_fixtures.py MODEL_DIR OUT_DIR [--audio WAV] [--positions K]
                                                       [--full-encoder | --encoder-rows N]

MODEL_DIR is a CTranslate2 Whisper directory (model.bin, config.json, tokenizer.json).
The weights are read with ct2_reader.py (float32), renamed to the Hugging Face `transformers`
layout (fused q/k/v and k/v matrices split; Whisper's key projection has no bias) and loaded into a
float32 WhisperForConditionalGeneration whose config is derived from the tensor shapes.

Outputs in OUT_DIR:
  encoder.safetensors  (--full-encoder)  mel f32[n_mels,3000], encoder_out f32[1500,d_model]
  decoder.safetensors  tokens i64[T], positions i64[K], logits f32[K,vocab], greedy_tokens i64[G]
                       (+ encoder_out_rows0_N f32[N,d_model] with --encoder-rows N)
  decoder.json         prompt ids, greedy ids, decoded text, cross-check numbers

`tokens` = prompt + ctranslate2's greedy transcript (without <|endoftext|>); `logits[k]` is the raw
decoder output (no suppression, no softmax) at position `positions[k]` when the decoder is run
causally over `tokens` (so it is the prediction for tokens[positions[k] + 1]; the last position
predicts <|endoftext|>). `greedy_tokens` = ctranslate2 Whisper.generate(beam_size=1,
max_length=448, suppress_blank=True, suppress_tokens=[-1]) on a float32 model.

The mel is the Whisper variant (pad/trim to 30 s) of make_frontend_fixtures.whisper_log_mel.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import sys

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

from ct2_reader import load_ct2  # noqa: E402
from make_frontend_fixtures import read_wav, whisper_log_mel  # noqa: E402


# ------------------------------------------------------------------ tokenizer
def special_ids(model_dir: str) -> dict:
    with open(os.path.join(model_dir, "tokenizer.json"), encoding="utf-8") as f:
        tok = json.load(f)
    ids = {a["content"]: a["id"] for a in tok["added_tokens"]}
    for k, v in tok["model"]["vocab"].items():
        if k.startswith("<|") and k.endswith("|>"):
            ids.setdefault(k, v)
    return ids


def decode_text(model_dir: str, ids) -> str:
    from tokenizers import Tokenizer

    tk = Tokenizer.from_file(os.path.join(model_dir, "tokenizer.json"))
    return tk.decode([int(i) for i in ids], skip_special_tokens=True)


# ------------------------------------------------------------------ CT2 -> transformers
def _count_layers(w: dict, prefix: str) -> int:
    pat = re.compile(re.escape(prefix) + r"/layer_(\d+)/")
    return 1 + max(int(m.group(1)) for n in w if (m := pat.match(n)))


def _attn(sd, w, src, dst, d, fused_qkv: bool):
    """Split CT2 attention (fused qkv for self, q + fused kv for cross) into q/k/v/out_proj."""
    if fused_qkv:
        W, b = w[f"{src}/linear_0/weight"], w[f"{src}/linear_0/bias"]
        assert W.shape == (3 * d, d), W.shape
        wq, wk, wv = W[:d], W[d : 2 * d], W[2 * d :]
        bq, bk, bv = b[:d], b[d : 2 * d], b[2 * d :]
        out = "linear_1"
    else:
        wq, bq = w[f"{src}/linear_0/weight"], w[f"{src}/linear_0/bias"]
        W, b = w[f"{src}/linear_1/weight"], w[f"{src}/linear_1/bias"]
        assert W.shape == (2 * d, d), W.shape
        wk, wv = W[:d], W[d:]
        bk, bv = b[:d], b[d:]
        out = "linear_2"
    assert np.all(bk == 0), f"{src}: key bias is not zero"
    sd[f"{dst}.q_proj.weight"], sd[f"{dst}.q_proj.bias"] = wq, bq
    sd[f"{dst}.k_proj.weight"] = wk
    sd[f"{dst}.v_proj.weight"], sd[f"{dst}.v_proj.bias"] = wv, bv
    sd[f"{dst}.out_proj.weight"] = w[f"{src}/{out}/weight"]
    sd[f"{dst}.out_proj.bias"] = w[f"{src}/{out}/bias"]


def _ln(sd, w, src, dst):
    sd[f"{dst}.weight"] = w[f"{src}/gamma"]
    sd[f"{dst}.bias"] = w[f"{src}/beta"]


def _ffn(sd, w, src, dst):
    sd[f"{dst}.fc1.weight"], sd[f"{dst}.fc1.bias"] = w[f"{src}/linear_0/weight"], w[f"{src}/linear_0/bias"]
    sd[f"{dst}.fc2.weight"], sd[f"{dst}.fc2.bias"] = w[f"{src}/linear_1/weight"], w[f"{src}/linear_1/bias"]
    _ln(sd, w, f"{src}/layer_norm", f"{dst}.final_layer_norm")


def ct2_to_hf_state_dict(w: dict) -> tuple[dict, dict]:
    """Returns (state_dict of numpy f32 arrays, shape info for the config)."""
    for flag, want in (("decoder/scale_embeddings", 0), ("decoder/pre_norm", 1), ("decoder/alibi", 0)):
        if flag in w:
            assert int(w[flag]) == want, f"{flag}={int(w[flag])}, expected {want}"
    if "decoder/activation" in w:
        assert int(w["decoder/activation"]) == 3, "expected exact (erf) GELU"  # CT2 ActivationType::GELU
    d = w["encoder/conv1/weight"].shape[0]
    info = dict(
        d_model=d,
        num_mel_bins=w["encoder/conv1/weight"].shape[1],
        encoder_layers=_count_layers(w, "encoder"),
        decoder_layers=_count_layers(w, "decoder"),
        encoder_attention_heads=int(w["encoder/num_heads"]),
        decoder_attention_heads=int(w["decoder/num_heads"]),
        encoder_ffn_dim=w["encoder/layer_0/ffn/linear_0/weight"].shape[0],
        decoder_ffn_dim=w["decoder/layer_0/ffn/linear_0/weight"].shape[0],
        vocab_size=w["decoder/embeddings/weight"].shape[0],
        max_source_positions=w["encoder/position_encodings/encodings"].shape[0],
        max_target_positions=w["decoder/position_encodings/encodings"].shape[0],
    )
    sd = {}
    E, D = "model.encoder", "model.decoder"
    for i in (1, 2):
        sd[f"{E}.conv{i}.weight"] = w[f"encoder/conv{i}/weight"]
        sd[f"{E}.conv{i}.bias"] = w[f"encoder/conv{i}/bias"]
    sd[f"{E}.embed_positions.weight"] = w["encoder/position_encodings/encodings"]
    for i in range(info["encoder_layers"]):
        s, t = f"encoder/layer_{i}", f"{E}.layers.{i}"
        _attn(sd, w, f"{s}/self_attention", f"{t}.self_attn", d, fused_qkv=True)
        _ln(sd, w, f"{s}/self_attention/layer_norm", f"{t}.self_attn_layer_norm")
        _ffn(sd, w, f"{s}/ffn", t)
    _ln(sd, w, "encoder/layer_norm", f"{E}.layer_norm")

    sd[f"{D}.embed_tokens.weight"] = w["decoder/embeddings/weight"]
    sd[f"{D}.embed_positions.weight"] = w["decoder/position_encodings/encodings"]
    for i in range(info["decoder_layers"]):
        s, t = f"decoder/layer_{i}", f"{D}.layers.{i}"
        _attn(sd, w, f"{s}/self_attention", f"{t}.self_attn", d, fused_qkv=True)
        _ln(sd, w, f"{s}/self_attention/layer_norm", f"{t}.self_attn_layer_norm")
        _attn(sd, w, f"{s}/attention", f"{t}.encoder_attn", d, fused_qkv=False)
        _ln(sd, w, f"{s}/attention/layer_norm", f"{t}.encoder_attn_layer_norm")
        _ffn(sd, w, f"{s}/ffn", t)
    _ln(sd, w, "decoder/layer_norm", f"{D}.layer_norm")
    proj = w.get("decoder/projection/weight")
    if proj is not None and not np.array_equal(proj, w["decoder/embeddings/weight"]):
        raise ValueError("untied output projection is not supported by this converter")
    return sd, info


def build_hf_model(model_dir: str):
    import torch
    from transformers import WhisperConfig, WhisperForConditionalGeneration

    w = load_ct2(os.path.join(model_dir, "model.bin"), dequantize=True, float_dtype=np.float32)
    sd, info = ct2_to_hf_state_dict(w)
    ids = special_ids(model_dir)
    eot, sot = ids["<|endoftext|>"], ids["<|startoftranscript|>"]
    cfg = WhisperConfig(
        **info,
        activation_function="gelu",
        scale_embedding=False,
        pad_token_id=eot,
        bos_token_id=eot,
        eos_token_id=eot,
        decoder_start_token_id=sot,
        tie_word_embeddings=True,
        suppress_tokens=None,
        begin_suppress_tokens=None,
        dropout=0.0,
        attention_dropout=0.0,
        activation_dropout=0.0,
    )
    cfg._attn_implementation = "eager"
    model = WhisperForConditionalGeneration(cfg).float().eval()
    tensors = {k: torch.from_numpy(np.ascontiguousarray(v, dtype=np.float32)) for k, v in sd.items()}
    missing, unexpected = model.load_state_dict(tensors, strict=False)
    missing = [m for m in missing if m != "proj_out.weight"]
    if missing or unexpected:
        raise RuntimeError(f"state dict mismatch: missing={missing} unexpected={unexpected}")
    model.tie_weights()
    assert model.proj_out.weight.data_ptr() == model.model.decoder.embed_tokens.weight.data_ptr() or torch.equal(
        model.proj_out.weight, model.model.decoder.embed_tokens.weight
    )
    return model, info, ids


# ------------------------------------------------------------------ reference runs
def _dtype(model):
    return next(model.parameters()).dtype


def hf_encode(model, mel: np.ndarray) -> np.ndarray:
    import torch

    with torch.no_grad():
        x = torch.from_numpy(np.ascontiguousarray(mel[None])).to(_dtype(model))
        return model.model.encoder(x).last_hidden_state[0].numpy()


def hf_logits(model, enc: np.ndarray, tokens) -> np.ndarray:
    """Raw logits [T, vocab] of a causal decoder pass over `tokens`."""
    import torch

    with torch.no_grad():
        h = model.model.decoder(
            input_ids=torch.tensor([list(tokens)], dtype=torch.long),
            encoder_hidden_states=torch.from_numpy(np.ascontiguousarray(enc[None])).to(_dtype(model)),
            use_cache=False,
        ).last_hidden_state
        return model.proj_out(h)[0].numpy()


def ct2_reference(model_dir: str, mel: np.ndarray, prompt):
    import ctranslate2

    m = ctranslate2.models.Whisper(model_dir, device="cpu", compute_type="float32")
    feats = ctranslate2.StorageView.from_array(np.ascontiguousarray(mel[None], dtype=np.float32))
    enc = np.array(m.encode(feats, to_cpu=True))[0]
    res = m.generate(
        feats,
        [list(prompt)],
        beam_size=1,
        max_length=448,
        suppress_blank=True,
        suppress_tokens=[-1],
        return_logits_vocab=True,
    )[0]
    steps = np.stack([np.array(x, dtype=np.float32).reshape(-1) for x in res.logits[0]])
    return enc, list(res.sequences_ids[0]), steps


def emulate_greedy(model_dir: str, logits: np.ndarray, prompt_len: int, ids: dict, gen_len: int) -> list:
    """Argmax of our raw logits under the suppression ctranslate2 applies (config suppress_ids,
    plus blank and <|endoftext|> at the first step), for teacher-forced positions."""
    with open(os.path.join(model_dir, "config.json"), encoding="utf-8") as f:
        cfg = json.load(f)
    sup = list(cfg.get("suppress_ids", []))
    sup_begin = list(cfg.get("suppress_ids_begin", []))
    out = []
    for step in range(gen_len + 1):
        row = logits[prompt_len - 1 + step].astype(np.float64).copy()
        row[sup] = -np.inf
        if step == 0:
            row[sup_begin] = -np.inf
        out.append(int(row.argmax()))
    return out


def rel_err(a, b):
    return float(np.abs(a - b).max() / np.abs(b).max())


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model_dir")
    ap.add_argument("out_dir")
    ap.add_argument("--audio", default="en_jfk_ask_not.wav", help="file in assets/ (or $STEPAUDIO_LIVE_SPEECH_DIR)")
    ap.add_argument("--positions", type=int, default=5, help="number of logit positions K")
    g = ap.add_mutually_exclusive_group()
    g.add_argument("--full-encoder", action="store_true", help="write encoder.safetensors (mel + all rows)")
    g.add_argument("--encoder-rows", type=int, default=0, help="put encoder_out_rows0_N in decoder.safetensors")
    args = ap.parse_args(argv)

    import ctranslate2
    import torch
    import transformers
    from safetensors.numpy import save_file

    torch.set_num_threads(max(1, os.cpu_count() or 1))
    model, info, ids = build_hf_model(args.model_dir)
    print("config:", info)
    multilingual = info["vocab_size"] >= 51865
    names = ["<|startoftranscript|>"] + (["<|en|>", "<|transcribe|>"] if multilingual else []) + ["<|notimestamps|>"]
    prompt = [ids[n] for n in names]
    eot = ids["<|endoftext|>"]
    print("prompt:", dict(zip(names, prompt)), "eot:", eot)

    audio = read_wav(args.audio)
    mel = whisper_log_mel(audio, info["num_mel_bins"]).astype(np.float32)

    enc_hf = hf_encode(model, mel)
    enc_ct2, greedy, ct2_steps = ct2_reference(args.model_dir, mel, prompt)
    enc_abs = float(np.abs(enc_hf - enc_ct2).max())
    enc_rel = rel_err(enc_hf, enc_ct2)
    print(f"encoder transformers vs ctranslate2 f32: max abs {enc_abs:.3e}, max abs / max |ref| {enc_rel:.3e}")
    rows = args.encoder_rows or enc_hf.shape[0]
    enc_rows_abs = float(np.abs(enc_hf[:rows] - enc_ct2[:rows]).max())
    print(f"  rows 0..{rows}: max abs {enc_rows_abs:.3e} (max |ref| {np.abs(enc_ct2[:rows]).max():.3f})")
    if enc_rel > 1e-3:
        raise SystemExit("encoder mismatch: the weight conversion is wrong")

    if greedy and greedy[-1] == eot:
        greedy = greedy[:-1]
    tokens = prompt + greedy
    T = len(tokens)
    logits_all = hf_logits(model, enc_hf, tokens)
    logits_ct2enc = hf_logits(model, enc_ct2, tokens)
    emu = emulate_greedy(args.model_dir, logits_all, len(prompt), ids, len(greedy))
    emu_ok = emu == greedy + [eot]
    print(f"greedy ({len(greedy)} tokens): {greedy}")
    print(f"argmax of our logits under CT2's suppression == CT2 greedy + EOT: {emu_ok}")
    if not emu_ok:
        print("  ours:", emu)

    # positions: first (sot), last prompt position, spread over the transcript, last (predicts EOT)
    K = args.positions
    if K >= 4:
        inner = np.linspace(len(prompt) - 1, T - 1, K - 1).round().astype(int).tolist()
        pos = sorted(set([0] + inner))
    else:
        pos = sorted(set(np.linspace(len(prompt) - 1, T - 1, K).round().astype(int).tolist()))
    positions = np.array(pos, dtype=np.int64)
    logits = logits_all[positions].astype(np.float32)
    lg_abs = float(np.abs(logits - logits_ct2enc[positions]).max())
    print(f"positions {positions.tolist()}; logits with HF encoder vs with CT2 encoder output: max abs {lg_abs:.3e}")

    # logits cross-check against ctranslate2's own decoder: generate(return_logits_vocab=True) gives
    # the raw logits of every greedy step with suppressed entries set to -FLT_MAX; compare the rest.
    steps = ct2_steps
    ours = logits_all[len(prompt) - 1 :]
    assert len(steps) == len(ours), (len(steps), len(ours))
    keep = steps > -1e30
    ct2_lg_abs = float(np.abs(ours - steps)[keep].max())
    ct2_lg_rel = float(ct2_lg_abs / np.abs(steps[keep]).max())
    print(f"logits vs ctranslate2 return_logits_vocab ({len(steps)} steps, unsuppressed entries): "
          f"max abs {ct2_lg_abs:.3e}, max abs / max |ref| {ct2_lg_rel:.3e}")

    # float64 run of the same model: how far each float32 implementation is from exact arithmetic
    import copy

    m64 = copy.deepcopy(model).double()
    enc64 = hf_encode(m64, mel.astype(np.float64))
    lg64 = hf_logits(m64, enc64, tokens)
    del m64
    f64 = {
        "encoder_hf_f32_vs_f64_max_abs": float(np.abs(enc_hf - enc64).max()),
        "encoder_ct2_f32_vs_f64_max_abs": float(np.abs(enc_ct2 - enc64).max()),
        "logits_hf_f32_vs_f64_max_abs": float(np.abs(logits_all - lg64).max()),
        "logits_ct2_f32_vs_f64_max_abs": float(np.abs(ct2_steps - lg64[len(prompt) - 1 :])[keep].max()),
    }
    print("vs float64:", " ".join(f"{k}={v:.3e}" for k, v in f64.items()))

    text = decode_text(args.model_dir, greedy)
    print("text:", text)

    os.makedirs(args.out_dir, exist_ok=True)
    meta = {"model_dir": os.path.basename(os.path.normpath(args.model_dir)), "audio": args.audio}
    if args.full_encoder:
        save_file(
            {"mel": np.ascontiguousarray(mel), "encoder_out": np.ascontiguousarray(enc_hf, dtype=np.float32)},
            os.path.join(args.out_dir, "encoder.safetensors"),
            metadata=meta,
        )
    dec = {
        "tokens": np.array(tokens, dtype=np.int64),
        "positions": positions,
        "logits": np.ascontiguousarray(logits),
        "greedy_tokens": np.array(greedy, dtype=np.int64),
    }
    if args.encoder_rows:
        dec[f"encoder_out_rows0_{args.encoder_rows}"] = np.ascontiguousarray(enc_hf[: args.encoder_rows], dtype=np.float32)
    save_file(dec, os.path.join(args.out_dir, "decoder.safetensors"), metadata=meta)
    sidecar = {
        "model": meta["model_dir"],
        "audio": args.audio,
        "mel": "whisper_log_mel (make_frontend_fixtures.py), 80 x 3000, float32",
        "prompt_tokens": dict(zip(names, prompt)),
        "endoftext": eot,
        "greedy_tokens": greedy,
        "greedy_includes_endoftext": False,
        "text": text,
        "positions": positions.tolist(),
        "argmax_under_ct2_suppression_matches": emu_ok,
        "crosscheck": {
            "encoder_vs_ct2_f32_max_abs": enc_abs,
            "encoder_vs_ct2_f32_max_rel": enc_rel,
            "encoder_rows_written_vs_ct2_f32_max_abs": enc_rows_abs,
            "logits_hf_encoder_vs_ct2_encoder_max_abs": lg_abs,
            "logits_vs_ct2_logits_vocab_max_abs": ct2_lg_abs,
            "logits_vs_ct2_logits_vocab_max_rel": ct2_lg_rel,
            **f64,
        },
        "versions": {
            "numpy": np.__version__,
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "ctranslate2": ctranslate2.__version__,
        },
    }
    with open(os.path.join(args.out_dir, "decoder.json"), "w", encoding="utf-8") as f:
        json.dump(sidecar, f, indent=2, ensure_ascii=False)
        f.write("\n")
    for n in sorted(os.listdir(args.out_dir)):
        print(f"wrote {os.path.join(args.out_dir, n)} ({os.path.getsize(os.path.join(args.out_dir, n))} bytes)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
