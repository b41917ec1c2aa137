#!/usr/bin/env python3
"""Reference for examples/whisper_gpu_check.rs: random-weight Whisper models in
Hugging Face layout and what transformers' WhisperForConditionalGeneration computes
with them (encoder output, teacher-forced logits, greedy tokens), on the GPU in bf16
and f32.

For each shape asked for (tiny: d_model 384, 4 + 4 layers, 6 heads, vocab 51865,
80 mels; large-v3-turbo: d_model 1280, 32 encoder + 4 decoder layers, 20 heads, vocab
51866, 128 mels) it writes OUT/SHAPE/model/ (config.json, generation_config.json,
preprocessor_config.json, model.safetensors, tokenizer.json) and OUT/SHAPE/ref.json and
ref.safetensors:

  mel            [n_mels, 3000] f32  transformers' WhisperFeatureExtractor of the wav;
                                     the Rust side reads it, so both encode one input
  enc_f32/_bf16  [1500, d] f32       encoder output
  tf_logits_*    [P + N, vocab] f32  logits of prompt + greedy_f32, teacher-forced
  ref.json: prompt, greedy_f32, greedy_bf16 (N tokens each), the masked ids, the
            torch bf16-vs-f32 errors (the yardstick for ours) and the torch encoder time.

Greedy decoding is argmax after the rules examples/whisper_gpu_check.rs asks the
Rust side for (live decoding: no timestamps): generation_config's suppress_tokens at
every step, begin_suppress_tokens at the first, and <|startoftranscript|>,
<|startofprev|>, <|transcribe|>, <|translate|>, <|nospeech|>/<|nocaptions|>,
<|notimestamps|> and every timestamp token always. Each step recomputes the whole
decoder pass (no cache), the plainest form of the function.

The weights are random but not HF's defaults (zero biases and unit LayerNorms would
hide loading mistakes): every bias and LayerNorm is drawn too, and the q/k projections
are scaled so that attention is peaked rather than uniform.

    python3 scripts/reference/whisper_gpu_parity.py --wav W.wav --tokenizer T.json \\
        --out /tmp/whisper_parity [--shapes tiny,turbo] [--steps 32] [--device cuda]
"""
import argparse
import copy
import json
import math
import os
import time
import wave

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from transformers import WhisperConfig, WhisperFeatureExtractor, WhisperForConditionalGeneration
from transformers.modeling_outputs import BaseModelOutput

SHAPES = {
    "tiny": dict(d_model=384, encoder_layers=4, decoder_layers=4, heads=6, vocab=51865, n_mels=80),
    "turbo": dict(d_model=1280, encoder_layers=32, decoder_layers=4, heads=20, vocab=51866,
                  n_mels=128),
}
SOURCE_POSITIONS = 1500
TARGET_POSITIONS = 448
# A few of Whisper's symbol suppressions (a shorter list than the real one; the rule
# is what is checked, not the list).
SUPPRESS = [1, 2, 7, 8, 9, 10, 14, 25, 26, 27, 28, 29, 31, 58, 59, 60, 61, 62, 63, 90, 91, 92, 93]
BEGIN_SUPPRESS = [220, 50257]


def read_wav(path):
    with wave.open(path, "rb") as w:
        if w.getnchannels() != 1 or w.getsampwidth() != 2 or w.getframerate() != 16000:
            raise SystemExit(f"{path}: expected 16 kHz mono s16")
        pcm = np.frombuffer(w.readframes(w.getnframes()), dtype="<i2")
    return pcm.astype(np.float32) / 32768.0


def tokenizer_for(base, vocab):
    """The multilingual tokenizer as is for a 51865-token model; for 51866 tokens
    (large-v3) <|yue|> is added after the 99 languages and every special token from
    <|translate|> on moves up by one, as in the large-v3 vocabulary."""
    tok = json.loads(json.dumps(base))
    if vocab == 51865:
        return tok
    if vocab != 51866:
        raise SystemExit(f"no tokenizer layout for a vocabulary of {vocab}")
    ids = {a["content"]: a["id"] for a in tok["added_tokens"]}
    moved = ids["<|translate|>"]
    for a in tok["added_tokens"]:
        if a["id"] >= moved:
            a["id"] += 1
    yue = dict(next(a for a in tok["added_tokens"] if a["content"] == "<|en|>"))
    yue.update(id=moved, content="<|yue|>")
    tok["added_tokens"].append(yue)
    tok["added_tokens"].sort(key=lambda a: a["id"])
    new_ids = {a["content"]: a["id"] for a in tok["added_tokens"]}
    for name, entry in (tok.get("post_processor") or {}).get("special_tokens", {}).items():
        entry["ids"] = [new_ids[t] for t in entry["tokens"]]
    return tok


def special_ids(tok):
    ids = {a["content"]: a["id"] for a in tok["added_tokens"]}
    out = dict(
        eot=ids["<|endoftext|>"],
        sot=ids["<|startoftranscript|>"],
        sot_prev=ids["<|startofprev|>"],
        transcribe=ids["<|transcribe|>"],
        translate=ids["<|translate|>"],
        no_speech=ids.get("<|nospeech|>", ids.get("<|nocaptions|>")),
        no_timestamps=ids["<|notimestamps|>"],
        en=ids["<|en|>"],
    )
    out["timestamp_begin"] = out["no_timestamps"] + 1
    return out


def randomize(model, d_model, seed):
    g = torch.Generator().manual_seed(seed)
    qk_std = 1.2 / math.sqrt(d_model)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("encoder.embed_positions.weight"):
                continue  # Whisper's sinusoids, as HF sets them
            if "layer_norm" in name:
                base = 1.0 if name.endswith("weight") else 0.0
                std = 0.1 if name.endswith("weight") else 0.05
                p.copy_(base + std * torch.randn(p.shape, generator=g))
            elif name.endswith("bias"):
                p.copy_(0.02 * torch.randn(p.shape, generator=g))
            elif name.endswith(("q_proj.weight", "k_proj.weight")):
                p.copy_(qk_std * torch.randn(p.shape, generator=g))
            else:
                p.copy_(0.02 * torch.randn(p.shape, generator=g))


def build(shape, seed, out_dir, base_tok):
    s = SHAPES[shape]
    d, heads = s["d_model"], s["heads"]
    tok = tokenizer_for(base_tok, s["vocab"])
    sp = special_ids(tok)
    cfg = WhisperConfig(
        vocab_size=s["vocab"], num_mel_bins=s["n_mels"], d_model=d,
        encoder_layers=s["encoder_layers"], decoder_layers=s["decoder_layers"],
        encoder_attention_heads=heads, decoder_attention_heads=heads,
        encoder_ffn_dim=4 * d, decoder_ffn_dim=4 * d,
        max_source_positions=SOURCE_POSITIONS, max_target_positions=TARGET_POSITIONS,
        decoder_start_token_id=sp["sot"], pad_token_id=sp["eot"], bos_token_id=sp["eot"],
        eos_token_id=sp["eot"], tie_word_embeddings=True,
    )
    torch.manual_seed(seed)
    model = WhisperForConditionalGeneration(cfg).eval()
    randomize(model, d, seed)
    mdir = os.path.join(out_dir, "model")
    os.makedirs(mdir, exist_ok=True)
    model.save_pretrained(mdir, safe_serialization=True)
    # What our loader reads must be in the file (tied or buffer-like weights are
    # sometimes left out by save_pretrained).
    saved = load_file(os.path.join(mdir, "model.safetensors"))
    state = model.state_dict()
    for name in ("model.encoder.embed_positions.weight", "model.decoder.embed_positions.weight",
                 "model.decoder.embed_tokens.weight", "model.encoder.conv1.weight"):
        if name not in saved:
            saved[name] = state[name].contiguous()
            save_file(saved, os.path.join(mdir, "model.safetensors"), metadata={"format": "pt"})
    with open(os.path.join(mdir, "tokenizer.json"), "w") as f:
        json.dump(tok, f, ensure_ascii=False)
    gen = dict(
        decoder_start_token_id=sp["sot"], eos_token_id=sp["eot"], pad_token_id=sp["eot"],
        no_timestamps_token_id=sp["no_timestamps"], suppress_tokens=SUPPRESS,
        begin_suppress_tokens=BEGIN_SUPPRESS, max_length=TARGET_POSITIONS,
    )
    with open(os.path.join(mdir, "generation_config.json"), "w") as f:
        json.dump(gen, f, indent=1)
    fe = WhisperFeatureExtractor(feature_size=s["n_mels"])
    fe.save_pretrained(mdir)
    return model, fe, sp


def masked_ids(sp, vocab):
    always = set(SUPPRESS) | {sp["sot"], sp["sot_prev"], sp["transcribe"], sp["translate"],
                              sp["no_timestamps"]}
    if sp["no_speech"] is not None:
        always.add(sp["no_speech"])
    always |= set(range(sp["timestamp_begin"], vocab))
    return sorted(i for i in always if i < vocab)


def rel(a, b):
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm())


@torch.no_grad()
def decoder_logits(model, enc, tokens, device):
    ids = torch.tensor([tokens], device=device)
    out = model(encoder_outputs=BaseModelOutput(last_hidden_state=enc), decoder_input_ids=ids,
                use_cache=False)
    return out.logits[0].float()


@torch.no_grad()
def greedy(model, enc, prompt, steps, always, begin, eot, device):
    seq = list(prompt)
    out = []
    vocab = model.config.vocab_size
    mask_always = torch.zeros(vocab, dtype=torch.bool, device=device)
    mask_always[always] = True
    mask_begin = mask_always.clone()
    mask_begin[[b for b in begin if b < vocab]] = True
    for i in range(steps):
        logits = decoder_logits(model, enc, seq, device)[-1]
        logits = logits.masked_fill(mask_begin if i == 0 else mask_always, float("-inf"))
        t = int(torch.argmax(logits))
        if t == eot:
            break
        out.append(t)
        seq.append(t)
    return out


def time_encoder(model, feats, reps=10):
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    with torch.no_grad():
        for i in range(reps + 3):
            start.record()
            model.model.encoder(feats)
            end.record()
            torch.cuda.synchronize()
            if i >= 3:
                times.append(start.elapsed_time(end))
    return float(np.median(times))


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--wav", required=True)
    ap.add_argument("--tokenizer", required=True, help="a multilingual Whisper tokenizer.json")
    ap.add_argument("--out", required=True)
    ap.add_argument("--shapes", default="tiny,turbo")
    ap.add_argument("--steps", type=int, default=32)
    ap.add_argument("--seed", type=int, default=1234)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--dtypes", default="f32,bf16",
                    help="f32 alone on a CPU, where bf16 is slow (no bf16 references then)")
    args = ap.parse_args()
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False  # the f32 reference is f32, convolutions too
    device = torch.device(args.device)
    with open(args.tokenizer) as f:
        base_tok = json.load(f)
    audio = read_wav(args.wav)
    for shape in args.shapes.split(","):
        t0 = time.time()
        out_dir = os.path.join(args.out, shape)
        model, fe, sp = build(shape, args.seed, out_dir, base_tok)
        vocab = model.config.vocab_size
        mel = fe(audio, sampling_rate=16000, return_tensors="np").input_features[0]
        mel = torch.from_numpy(np.ascontiguousarray(mel, dtype=np.float32))
        prompt = [sp["sot"], sp["en"], sp["transcribe"], sp["no_timestamps"]]
        always = masked_ids(sp, vocab)
        tensors = {"mel": mel.contiguous()}
        info = dict(shape=shape, seed=args.seed, wav=os.path.basename(args.wav), prompt=prompt,
                    sot_index=0, steps=args.steps, masked_always=always,
                    masked_at_begin=BEGIN_SUPPRESS, special=sp,
                    torch=torch.__version__, transformers=__import__("transformers").__version__,
                    device=torch.cuda.get_device_name() if device.type == "cuda" else "cpu")
        # Two copies: .to() converts a module in place.
        models = {"f32": model.to(device=device)}
        if "bf16" in args.dtypes.split(","):
            models["bf16"] = copy.deepcopy(models["f32"]).to(dtype=torch.bfloat16)
        encs = {}
        for name, m in models.items():
            feats = mel[None].to(device=device, dtype=next(m.parameters()).dtype)
            with torch.no_grad():
                encs[name] = m.model.encoder(feats).last_hidden_state
            info[f"greedy_{name}"] = greedy(m, encs[name], prompt, args.steps, always,
                                            BEGIN_SUPPRESS, sp["eot"], device)
            tensors[f"enc_{name}"] = encs[name][0].float().cpu().contiguous()
            if device.type == "cuda" and name == "bf16":
                info["torch_encoder_ms_bf16"] = time_encoder(m, feats)
        tf = prompt + info["greedy_f32"]
        for name, m in models.items():
            tensors[f"tf_logits_{name}"] = decoder_logits(m, encs[name], tf, device).cpu().contiguous()
        info["tf_tokens"] = tf
        if "bf16" in models:
            # torch's own bf16 against its f32: the yardstick for ours.
            gb, gf = info["greedy_bf16"], info["greedy_f32"]
            info["torch_bf16_vs_f32"] = dict(
                encoder_rel=rel(tensors["enc_bf16"], tensors["enc_f32"]),
                logits_rel=[rel(a, b) for a, b in zip(tensors["tf_logits_bf16"],
                                                      tensors["tf_logits_f32"])],
                greedy_agree_prefix=next((i for i, (a, b) in enumerate(zip(gb, gf)) if a != b),
                                         min(len(gb), len(gf))),
            )
        save_file(tensors, os.path.join(out_dir, "ref.safetensors"))
        with open(os.path.join(out_dir, "ref.json"), "w") as f:
            json.dump(info, f, indent=1)
        y = info.get("torch_bf16_vs_f32")
        line = f"{shape}: {time.time() - t0:.1f} s"
        if y:
            line += (f"; torch bf16 vs f32: encoder {y['encoder_rel']:.2e}, logits max"
                     f" {max(y['logits_rel']):.2e}, greedy prefix {y['greedy_agree_prefix']}"
                     f"/{args.steps}")
        if "torch_encoder_ms_bf16" in info:
            line += f"; torch encoder {info['torch_encoder_ms_bf16']:.2f} ms"
        print(line, flush=True)
        del model, models, encs
        if device.type == "cuda":
            torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
