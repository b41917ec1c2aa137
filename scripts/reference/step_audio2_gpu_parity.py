#!/usr/bin/env python3
"""Issue 5, "full shape on a GPU": random weights at the real Step-Audio 2 mini config, in
the published checkpoint layout, and the PyTorch reference's outputs on them in bf16 on
the GPU, for the Rust side (`examples/gpu_check.rs --parity`) to compare against.

Both sides read the same weights from disk, so nothing large travels: this script draws
them on the device (fixed seed), writes sharded bf16 safetensors + index + config.json +
the tiny test tokenizer, runs the reference (step_audio2_ref.py, the same functions that
make the f32 CPU fixtures) on the clips, and writes every compared tensor to one
safetensors file.

Usage (on the device):
  python3 scripts/reference/step_audio2_gpu_parity.py --ckpt /dev/shm/sa2 --out ref.safetensors \
      [--steps 8] [--seed 1234] CLIP.wav [CLIP.wav ...]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time

import numpy as np
import torch
from safetensors.torch import save_file

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import step_audio2_ref as ref  # noqa: E402

REPO = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
TOKENIZER = os.path.join(REPO, "tests", "fixtures", "step_audio2", "tiny_ckpt", "tokenizer.json")

# The real Step-Audio 2 mini config (docs/architecture.md, "Step-Audio 2 mini"; key set as in
# the tiny checkpoint).
CONFIG = {
    "architectures": ["StepAudio2ForCausalLM"],
    "model_type": "step_audio_2",
    "text_config": {
        "hidden_size": 3584, "intermediate_size": 18944, "num_attention_heads": 28,
        "num_attention_groups": 4, "num_key_value_heads": 4, "num_hidden_layers": 28,
        "max_seq_len": 16384, "vocab_size": 158720, "rms_norm_eps": 1e-06,
        "eos_token_id": 151643, "pad_token_id": 151643, "rope_theta": 1000000.0,
        "max_position_embeddings": 16384, "rope_scaling": None, "torch_dtype": "bfloat16",
    },
    "audio_encoder_config": {
        "n_mels": 128, "n_audio_ctx": 1500, "n_audio_state": 1280, "n_audio_head": 20,
        "n_audio_layer": 32, "n_codebook_size": 4096, "llm_dim": 3584, "kernel_size": 3,
        "adapter_stride": 2,
    },
}
ADAPTER_HIDDEN = 2048
SHARD_BYTES = 4 << 30


def log(*a):
    print(*a, flush=True)


def slaney_filterbank(n_mels: int) -> torch.Tensor:
    """librosa.filters.mel(sr=16000, n_fft=400, n_mels) (htk=False, norm="slaney") in
    numpy, for machines without librosa (the GPU image has none); the CPU fixtures use
    librosa itself."""
    f_sp, min_log_hz = 200.0 / 3, 1000.0
    min_log_mel, logstep = min_log_hz / f_sp, np.log(6.4) / 27.0

    def hz_to_mel(f):
        f = np.asarray(f, dtype=np.float64)
        return np.where(f >= min_log_hz, min_log_mel + np.log(np.maximum(f, 1e-12) / min_log_hz) / logstep, f / f_sp)

    def mel_to_hz(m):
        m = np.asarray(m, dtype=np.float64)
        return np.where(m >= min_log_mel, min_log_hz * np.exp(logstep * (m - min_log_mel)), f_sp * m)

    fft_freqs = np.linspace(0, 8000, 201)
    mel_f = mel_to_hz(np.linspace(hz_to_mel(0.0), hz_to_mel(8000.0), n_mels + 2))
    fdiff = np.diff(mel_f)
    ramps = mel_f[:, None] - fft_freqs[None, :]
    lower = -ramps[:-2] / fdiff[:-1, None]
    upper = ramps[2:] / fdiff[1:, None]
    w = np.maximum(0, np.minimum(lower, upper))
    w *= (2.0 / (mel_f[2:n_mels + 2] - mel_f[:n_mels]))[:, None]
    return torch.from_numpy(w.astype(np.float32))


def read_wav(path: str) -> np.ndarray:
    """16-bit PCM mono 16 kHz WAV as float32 in [-1, 1] (int16 / 32768), like soundfile."""
    import wave

    with wave.open(path, "rb") as w:
        assert w.getframerate() == ref.SAMPLE_RATE and w.getsampwidth() == 2, path
        x = np.frombuffer(w.readframes(w.getnframes()), dtype="<i2").reshape(-1, w.getnchannels())
    return np.ascontiguousarray(x[:, 0].astype(np.float32) / 32768.0)


def init_std(name, shape):
    """(mean, std) as step_audio2_make_checkpoint.py draws them."""
    if name.endswith("_ln.weight") or name.endswith("norm.weight"):
        return 1.0, 0.1
    if name.endswith(".bias"):
        return 0.0, 0.1
    if name == "model.embed_tokens.weight":
        return 0.0, 1.0
    if name == "encoder.positional_embedding.weight":
        return 0.0, 0.5
    fan_in = int(np.prod(shape[1:])) if len(shape) > 1 else 1
    return 0.0, fan_in ** -0.5


def make_checkpoint(ckpt, seed, tokenizer):
    os.makedirs(ckpt, exist_ok=True)
    shapes = ref.expected_shapes(CONFIG, ADAPTER_HIDDEN)
    names = ref.expected_tensor_names(CONFIG)
    g = torch.Generator(device="cuda")
    W = {}
    for i, name in enumerate(names):
        mean, std = init_std(name, shapes[name])
        g.manual_seed(seed * 100003 + i)
        t = torch.randn(shapes[name], generator=g, device="cuda", dtype=torch.float32)
        W[name] = (t * std + mean).to(torch.bfloat16)
    # shards of ~4 GiB, in name order
    shards, cur, size = [], [], 0
    for name in names:
        nb = W[name].numel() * 2
        if cur and size + nb > SHARD_BYTES:
            shards.append(cur)
            cur, size = [], 0
        cur.append(name)
        size += nb
    shards.append(cur)
    weight_map, total = {}, 0
    for k, group in enumerate(shards):
        fname = f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file({n: W[n].cpu() for n in group}, os.path.join(ckpt, fname),
                  metadata={"format": "pt", "stepaudio_live_seed": str(seed)})
        for n in group:
            weight_map[n] = fname
            total += W[n].numel() * 2
    with open(os.path.join(ckpt, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=1)
    with open(os.path.join(ckpt, "config.json"), "w") as f:
        json.dump(CONFIG, f, indent=2)
    shutil.copy(tokenizer, os.path.join(ckpt, "tokenizer.json"))
    return W


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--ckpt", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--seed", type=int, default=1234)
    ap.add_argument("--tokenizer", default=TOKENIZER)
    ap.add_argument("clips", nargs="+")
    a = ap.parse_args()
    torch.backends.cuda.matmul.allow_tf32 = False
    t0 = time.time()
    try:
        import librosa  # noqa: F401
    except ImportError:
        ref.mel_filterbank = slaney_filterbank
    W = make_checkpoint(a.ckpt, a.seed, a.tokenizer)
    torch.cuda.synchronize()
    log(f"[parity] checkpoint ({sum(t.numel() for t in W.values()) / 1e9:.2f} B params, bf16) "
        f"written to {a.ckpt} in {time.time() - t0:.1f} s")
    tok = ref.StepTokenizer(os.path.join(a.ckpt, "tokenizer.json"))
    out, meta = {}, {"seed": str(a.seed), "steps": str(a.steps), "clips": ",".join(a.clips),
                     "torch": torch.__version__, "gpu": torch.cuda.get_device_name(0)}
    kept_rows = []
    with torch.inference_mode():
        for ci, clip in enumerate(a.clips):
            t1 = time.time()
            audio = read_wav(clip)
            mel = ref.log_mel(audio)                                   # f32, CPU, [128, L]
            mel_dev = mel.to("cuda", torch.bfloat16)
            enc, ad_all, kept = ref.audio_embeddings(W, CONFIG, [mel_dev])
            prompt = ref.ASR_PROMPT_ZH
            ids, pos = ref.build_ids(tok, ref.asr_messages(prompt), [kept[0].shape[0]])
            emb = ref.embed_with_audio(W, ids, pos, kept)
            g = ref.greedy(W, CONFIG, emb, a.steps, tok.eot)
            p = f"clip{ci}_"
            out[p + "audio"] = torch.from_numpy(audio.copy())
            out[p + "mel"] = mel
            out[p + "encoder_out"] = enc.out[0].float().cpu()
            out[p + "adapter_out"] = kept[0].float().cpu()
            out[p + "prompt_ids"] = torch.tensor(ids, dtype=torch.int64)
            out[p + "step_logits"] = g.step_logits.float().cpu()
            out[p + "greedy_tokens"] = torch.tensor(g.tokens, dtype=torch.int64)
            out[p + "rel_gaps"] = torch.tensor(g.rel_gaps, dtype=torch.float32)
            meta[p + "clip"] = os.path.basename(clip)
            kept_rows.append((ids, pos, mel, g.tokens))
            log(f"[parity] {os.path.basename(clip)}: mel {tuple(mel.shape)}, {kept[0].shape[0]} patches, "
                f"{len(ids)} prompt ids, greedy {g.tokens}, top1-top2 gaps / std "
                f"{[round(x, 3) for x in g.rel_gaps]} ({time.time() - t1:.1f} s)")
        # The same in float32 (weights upcast, TF32 off): how far each bf16 implementation
        # is from the function both compute. Teacher-forced with the bf16 greedy tokens, so
        # every step's logits come from one causal forward over prompt + tokens.
        t1 = time.time()
        for name in list(W):
            W[name] = W[name].float()
        for ci, (ids, pos, mel, tokens) in enumerate(kept_rows):
            p = f"clip{ci}_"
            enc, _, kept = ref.audio_embeddings(W, CONFIG, [mel.to("cuda")])
            emb = ref.embed_with_audio(W, ids, pos, kept)
            forced = W["model.embed_tokens.weight"][torch.tensor(tokens[:-1], device="cuda")]
            logits = ref.llm_logits(W, CONFIG, torch.cat([emb, forced], 0))[-len(tokens):]
            out[p + "f32_encoder_out"] = enc.out[0].cpu()
            out[p + "f32_adapter_out"] = kept[0].cpu()
            out[p + "f32_step_logits"] = logits.cpu()
            am = logits.argmax(-1).tolist()
            log(f"[parity] clip{ci} f32 reference: teacher-forced argmax {am} vs bf16 greedy {tokens}")
        log(f"[parity] f32 reference in {time.time() - t1:.1f} s")
    save_file(out, a.out, metadata=meta)
    log(f"[parity] reference written to {a.out}")


if __name__ == "__main__":
    main()
