#!/usr/bin/env python3
"""Independent PyTorch reference of the Step-Audio 2 mini architecture (ASR path).

Written from docs/architecture.md ("Log-mel frontend", "Step-Audio 2 mini") and from
reading the behaviour of the published inference code (stepfun-ai/Step-Audio2:
stepaudio2.py, utils.py, and the model repo's modeling_step_audio_2.py); no code was
copied from them. Plain torch ops only: no transformers model classes.

Pieces, in pipeline order:
  * ``log_mel``            Step-Audio 2 log-mel: 128 bins, 479 zero samples appended,
                           no 30 s padding; ``split_pieces`` cuts audio into 25 s pieces.
  * ``encode_audio``       Whisper-style encoder + average pooling + after_norm, run on a
                           *batch* of mels the way the published code does it (mels
                           zero-padded to the longest, valid length L_i - 2, key mask
                           parity from the padded length). A single utterance is a batch
                           of one.
  * ``adapter``            conv(k3, s2, pad 1) -> GELU -> linear1 -> ReLU -> linear2, run on
                           all P pooled rows; the caller keeps the first n = (E-1)//2 + 1.
  * ``llm_logits``         Qwen2.5-shaped decoder (GQA, RoPE non-interleaved halves, RMSNorm,
                           SiLU-gated MLP, q/k/v bias only, untied lm_head), full causal
                           recomputation over a sequence of input embeddings (no KV cache:
                           every logit in the fixtures comes from a from-scratch forward).
  * ``StepTokenizer``      special ids looked up by token *name* in tokenizer.json.
  * ``build_ids``          the published chat template (turn layout), tokenised piece by
                           piece like the published code, with audio patch positions.
  * ``greedy``             greedy decoding by full recomputation.

Everything runs in float32 on the CPU with one thread (bit-reproducible re-runs) for
the fixtures. The same functions also run on a GPU in bf16 (step_audio2_gpu_parity.py):
tensors are created on the device and in the dtype of their inputs, and the places
where a low-precision model casts back (probabilities before ``@ v``, RoPE tables,
RMSNorm statistics in f32) follow transformers' Qwen2 and the published Whisper-style
encoder; in float32 these casts are no-ops, so the fixtures are unchanged.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F

SAMPLE_RATE = 16000
N_FFT = 400
HOP = 160
TAIL_PADDING = 479            # zero samples appended before the STFT
PIECE_SAMPLES = 25 * SAMPLE_RATE
MASK_VALUE = -1.0e10          # added to the scores of invalid encoder keys

ASR_PROMPT_ZH = "请记录下你所听到的语音内容。"
ASR_PROMPT_EN = "Please record the audio content you hear."


def set_deterministic() -> None:
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)


# --------------------------------------------------------------------------------------
# Log-mel frontend
# --------------------------------------------------------------------------------------

def mel_filterbank(n_mels: int) -> torch.Tensor:
    """librosa default filterbank (Slaney scale and norm), float32, [n_mels, 201]."""
    import librosa  # here, so the GPU parity run (no librosa there) can supply its own

    fb = librosa.filters.mel(sr=SAMPLE_RATE, n_fft=N_FFT, n_mels=n_mels)
    return torch.from_numpy(np.asarray(fb, dtype=np.float32))


def log_mel(audio, n_mels: int = 128, padding: int = TAIL_PADDING) -> torch.Tensor:
    """Step-Audio 2 log-mel of one piece of 16 kHz float32 audio -> [n_mels, L].

    L = (len(audio) + padding) // 160 frames (centred STFT gives one more; the last
    frame is dropped). The clamp uses the max of this mel only.
    """
    a = torch.as_tensor(np.asarray(audio, dtype=np.float32))
    if padding > 0:
        a = torch.cat([a, torch.zeros(padding, dtype=torch.float32)])
    window = torch.hann_window(N_FFT, periodic=True, dtype=torch.float32)
    spec = torch.stft(a, n_fft=N_FFT, hop_length=HOP, win_length=N_FFT, window=window,
                      center=True, pad_mode="reflect", return_complex=True)
    power = spec[:, :-1].abs() ** 2                       # [201, L]
    mel = mel_filterbank(n_mels) @ power                  # [n_mels, L]
    logm = torch.clamp(mel, min=1e-10).log10()
    logm = torch.maximum(logm, logm.max() - 8.0)
    return (logm + 4.0) / 4.0


def split_pieces(audio: np.ndarray) -> List[np.ndarray]:
    """Cut audio into consecutive 25 s pieces (the last one may be shorter)."""
    return [audio[i:i + PIECE_SAMPLES] for i in range(0, len(audio), PIECE_SAMPLES)]


# --------------------------------------------------------------------------------------
# Length arithmetic
# --------------------------------------------------------------------------------------

def encoder_valid_len(mel_len: int) -> int:
    """E: valid encoder (pooled) rows for a mel of L frames: ((L - 2) + 1) // 2 // 2."""
    return ((mel_len - 2) + 1) // 2 // 2


def adapter_keep_len(enc_valid: int, kernel: int = 3, stride: int = 2, pad: int = 1) -> int:
    """n: adapter outputs kept (= number of <audio_patch> tokens) for E valid rows."""
    return (enc_valid + 2 * pad - kernel) // stride + 1


def n_patches(mel_len: int) -> int:
    return adapter_keep_len(encoder_valid_len(mel_len))


# --------------------------------------------------------------------------------------
# Checkpoint loading (published layout)
# --------------------------------------------------------------------------------------

def load_config(ckpt_dir: str) -> dict:
    with open(os.path.join(ckpt_dir, "config.json"), encoding="utf-8") as f:
        return json.load(f)


def expected_tensor_names(cfg: dict) -> List[str]:
    a = cfg["audio_encoder_config"]
    t = cfg["text_config"]
    names = ["encoder.conv1.weight", "encoder.conv1.bias", "encoder.conv2.weight",
             "encoder.conv2.bias", "encoder.positional_embedding.weight"]
    for i in range(a["n_audio_layer"]):
        p = f"encoder.blocks.{i}."
        names += [p + "attn.query.weight", p + "attn.query.bias", p + "attn.key.weight",
                  p + "attn.value.weight", p + "attn.value.bias", p + "attn.out.weight",
                  p + "attn.out.bias", p + "attn_ln.weight", p + "attn_ln.bias",
                  p + "mlp.0.weight", p + "mlp.0.bias", p + "mlp.2.weight", p + "mlp.2.bias",
                  p + "mlp_ln.weight", p + "mlp_ln.bias"]
    names += ["encoder.after_norm.weight", "encoder.after_norm.bias",
              "adapter.conv.weight", "adapter.conv.bias",
              "adapter.linear1.weight", "adapter.linear1.bias",
              "adapter.linear2.weight", "adapter.linear2.bias",
              "model.embed_tokens.weight"]
    for i in range(t["num_hidden_layers"]):
        p = f"model.layers.{i}."
        names += [p + "input_layernorm.weight",
                  p + "self_attn.q_proj.weight", p + "self_attn.q_proj.bias",
                  p + "self_attn.k_proj.weight", p + "self_attn.k_proj.bias",
                  p + "self_attn.v_proj.weight", p + "self_attn.v_proj.bias",
                  p + "self_attn.o_proj.weight",
                  p + "post_attention_layernorm.weight",
                  p + "mlp.gate_proj.weight", p + "mlp.up_proj.weight", p + "mlp.down_proj.weight"]
    names += ["model.norm.weight", "lm_head.weight"]
    return names


def expected_shapes(cfg: dict, adapter_hidden: int) -> Dict[str, Tuple[int, ...]]:
    """Shapes of every tensor. ``adapter_hidden`` is the width of adapter.linear1 (2048 in
    the real model, where the published code hard-codes it; not in config.json)."""
    a = cfg["audio_encoder_config"]
    t = cfg["text_config"]
    D, M, C = a["n_audio_state"], a["n_mels"], a["n_audio_ctx"]
    k = a["kernel_size"]
    H = t["hidden_size"]
    hd = H // t["num_attention_heads"]
    kv = t["num_key_value_heads"] * hd
    I, V = t["intermediate_size"], t["vocab_size"]
    s = {"encoder.conv1.weight": (D, M, 3), "encoder.conv1.bias": (D,),
         "encoder.conv2.weight": (D, D, 3), "encoder.conv2.bias": (D,),
         "encoder.positional_embedding.weight": (C, D)}
    for i in range(a["n_audio_layer"]):
        p = f"encoder.blocks.{i}."
        for n in ("query", "key", "value", "out"):
            s[p + f"attn.{n}.weight"] = (D, D)
            if n != "key":
                s[p + f"attn.{n}.bias"] = (D,)
        s[p + "mlp.0.weight"] = (4 * D, D)
        s[p + "mlp.0.bias"] = (4 * D,)
        s[p + "mlp.2.weight"] = (D, 4 * D)
        s[p + "mlp.2.bias"] = (D,)
        for n in ("attn_ln", "mlp_ln"):
            s[p + n + ".weight"] = (D,)
            s[p + n + ".bias"] = (D,)
    s["encoder.after_norm.weight"] = (D,)
    s["encoder.after_norm.bias"] = (D,)
    s["adapter.conv.weight"] = (D, D, k)
    s["adapter.conv.bias"] = (D,)
    s["adapter.linear1.weight"] = (adapter_hidden, D)
    s["adapter.linear1.bias"] = (adapter_hidden,)
    s["adapter.linear2.weight"] = (a["llm_dim"], adapter_hidden)
    s["adapter.linear2.bias"] = (a["llm_dim"],)
    s["model.embed_tokens.weight"] = (V, H)
    for i in range(t["num_hidden_layers"]):
        p = f"model.layers.{i}."
        s[p + "input_layernorm.weight"] = (H,)
        s[p + "post_attention_layernorm.weight"] = (H,)
        s[p + "self_attn.q_proj.weight"] = (H, H)
        s[p + "self_attn.q_proj.bias"] = (H,)
        s[p + "self_attn.k_proj.weight"] = (kv, H)
        s[p + "self_attn.k_proj.bias"] = (kv,)
        s[p + "self_attn.v_proj.weight"] = (kv, H)
        s[p + "self_attn.v_proj.bias"] = (kv,)
        s[p + "self_attn.o_proj.weight"] = (H, H)
        s[p + "mlp.gate_proj.weight"] = (I, H)
        s[p + "mlp.up_proj.weight"] = (I, H)
        s[p + "mlp.down_proj.weight"] = (H, I)
    s["model.norm.weight"] = (H,)
    s["lm_head.weight"] = (V, H)
    return s


def load_weights(ckpt_dir: str, cfg: Optional[dict] = None) -> Dict[str, torch.Tensor]:
    """Read every tensor named in model.safetensors.index.json, as float32; check that all
    expected tensors are present with the expected shapes."""
    from safetensors.torch import load_file

    cfg = cfg or load_config(ckpt_dir)
    with open(os.path.join(ckpt_dir, "model.safetensors.index.json"), encoding="utf-8") as f:
        index = json.load(f)
    weights: Dict[str, torch.Tensor] = {}
    for shard in sorted(set(index["weight_map"].values())):
        for name, t in load_file(os.path.join(ckpt_dir, shard)).items():
            if index["weight_map"].get(name) != shard:
                raise ValueError(f"{name} found in {shard} but the index says "
                                 f"{index['weight_map'].get(name)}")
            weights[name] = t.to(torch.float32)
    adapter_hidden = weights["adapter.linear1.weight"].shape[0]
    shapes = expected_shapes(cfg, adapter_hidden)
    for name in expected_tensor_names(cfg):
        if name not in weights:
            raise KeyError(f"missing tensor {name}")
        if tuple(weights[name].shape) != shapes[name]:
            raise ValueError(f"tensor {name} has shape {tuple(weights[name].shape)}, "
                             f"expected {shapes[name]}")
    return weights


# --------------------------------------------------------------------------------------
# Audio encoder and adapter
# --------------------------------------------------------------------------------------

@dataclass
class EncoderResult:
    out: torch.Tensor              # [B, P, D] after after_norm (all P pooled rows)
    valid_len: List[int]           # E_i per batch entry
    key_valid: torch.Tensor        # [B, T2] bool, the attention key mask
    blocks_in: torch.Tensor        # [B, T2, D] after conv2+GELU+positional embedding
    blocks_out: torch.Tensor       # [B, T2, D] after the last block (before pooling)
    padded_len: int                # T, the padded mel length of the batch


def _layer_norm(x, W, name, eps=1e-5):
    return F.layer_norm(x, (x.shape[-1],), W[name + ".weight"], W[name + ".bias"], eps)


def _encoder_block(x, bias, W, p, n_head):
    B, T2, D = x.shape
    hd = D // n_head
    scale = hd ** -0.25
    h = _layer_norm(x, W, p + "attn_ln")
    q = F.linear(h, W[p + "attn.query.weight"], W[p + "attn.query.bias"])
    k = F.linear(h, W[p + "attn.key.weight"])
    v = F.linear(h, W[p + "attn.value.weight"], W[p + "attn.value.bias"])
    q = q.view(B, T2, n_head, hd).transpose(1, 2) * scale      # [B, h, T2, hd]
    k = k.view(B, T2, n_head, hd).transpose(1, 2) * scale
    v = v.view(B, T2, n_head, hd).transpose(1, 2)
    scores = q @ k.transpose(-1, -2) + bias[:, None, None, :]  # key mask
    probs = torch.softmax(scores.float(), dim=-1).to(v.dtype)
    att = (probs @ v).transpose(1, 2).reshape(B, T2, D)
    x = x + F.linear(att, W[p + "attn.out.weight"], W[p + "attn.out.bias"])
    h = _layer_norm(x, W, p + "mlp_ln")
    h = F.linear(h, W[p + "mlp.0.weight"], W[p + "mlp.0.bias"])
    h = F.gelu(h)                                               # erf GELU
    x = x + F.linear(h, W[p + "mlp.2.weight"], W[p + "mlp.2.bias"])
    return x


def encode_audio(W, cfg: dict, mels: Sequence[torch.Tensor]) -> EncoderResult:
    """Encoder on a batch of mels, as the published code batches them.

    mels are zero-padded (value 0.0) on the right to the longest length T; each entry's
    valid mel length is L_i - 2. The key mask is built per mel frame (t < L_i - 2) and
    sub-sampled as frames (T + 1) % 2, (T + 1) % 2 + 2, ...; invalid keys get -1e10 added
    to their scores. For a batch of one this masks exactly the last conv2 frame.
    """
    a = cfg["audio_encoder_config"]
    B = len(mels)
    T = max(m.shape[1] for m in mels)
    dev = mels[0].device
    x = torch.zeros(B, mels[0].shape[0], T, dtype=mels[0].dtype, device=dev)
    for i, m in enumerate(mels):
        x[i, :, :m.shape[1]] = m
    lens = torch.tensor([m.shape[1] - 2 for m in mels], device=dev)

    h = F.gelu(F.conv1d(x, W["encoder.conv1.weight"], W["encoder.conv1.bias"], padding=1))
    h = F.gelu(F.conv1d(h, W["encoder.conv2.weight"], W["encoder.conv2.bias"],
                        stride=2, padding=1))
    h = h.transpose(1, 2)                                       # [B, T2, D]
    T2 = h.shape[1]
    frame_valid = torch.arange(T, device=dev)[None, :] < lens[:, None]      # [B, T]
    key_valid = frame_valid[:, (T + 1) % 2::2]
    assert key_valid.shape[1] == T2, (key_valid.shape, T2)
    bias = torch.where(key_valid, torch.tensor(0.0, device=dev),
                       torch.tensor(MASK_VALUE, device=dev))
    h = h + W["encoder.positional_embedding.weight"][:T2]
    blocks_in = h
    for i in range(a["n_audio_layer"]):
        h = _encoder_block(h, bias, W, f"encoder.blocks.{i}.", a["n_audio_head"])
    blocks_out = h
    P = T2 // 2
    pooled = (h[:, 0:2 * P:2] + h[:, 1:2 * P:2]) / 2.0          # AvgPool1d(2, 2)
    out = _layer_norm(pooled, W, "encoder.after_norm")
    valid = [((int(l) + 1) // 2) // 2 for l in lens]
    return EncoderResult(out, valid, key_valid, blocks_in, blocks_out, T)


def adapter(W, cfg: dict, enc_out: torch.Tensor) -> torch.Tensor:
    """[B, P, D] -> [B, P', llm_dim] on all P rows (P' = (P - 1) // 2 + 1 for k3 s2 p1)."""
    a = cfg["audio_encoder_config"]
    h = F.conv1d(enc_out.transpose(1, 2), W["adapter.conv.weight"], W["adapter.conv.bias"],
                 stride=a["adapter_stride"], padding=1)
    h = F.gelu(h).transpose(1, 2)
    h = F.relu(F.linear(h, W["adapter.linear1.weight"], W["adapter.linear1.bias"]))
    return F.linear(h, W["adapter.linear2.weight"], W["adapter.linear2.bias"])


def audio_embeddings(W, cfg, mels: Sequence[torch.Tensor]):
    """Encoder + adapter on a batch of mels; returns (EncoderResult, all adapter rows
    [B, P', H], list of kept adapter rows [n_i, H])."""
    enc = encode_audio(W, cfg, mels)
    ad = adapter(W, cfg, enc.out)
    kept = [ad[i, :adapter_keep_len(e)] for i, e in enumerate(enc.valid_len)]
    return enc, ad, kept


# --------------------------------------------------------------------------------------
# LLM (Qwen2.5 shape)
# --------------------------------------------------------------------------------------

def _rms_norm(x, w, eps):
    xf = x.float()                      # statistics in f32 (a no-op for f32 input)
    var = xf.pow(2).mean(-1, keepdim=True)
    return w * (xf * torch.rsqrt(var + eps)).to(x.dtype)


def _rope(n: int, head_dim: int, theta: float):
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64)
                                .to(torch.float32) / head_dim))
    pos = torch.arange(n, dtype=torch.float32)
    freqs = pos[:, None] * inv_freq[None, :]                    # [n, hd/2]
    emb = torch.cat([freqs, freqs], dim=-1)                     # non-interleaved halves
    return emb.cos(), emb.sin()


def _rotate_half(x):
    h = x.shape[-1] // 2
    return torch.cat([-x[..., h:], x[..., :h]], dim=-1)


def llm_hidden(W, cfg: dict, embeds: torch.Tensor) -> torch.Tensor:
    """Causal decoder over input embeddings [N, H] (positions 0..N-1) -> final-norm
    hidden states [N, H]."""
    t = cfg["text_config"]
    N, H = embeds.shape
    nh, nkv = t["num_attention_heads"], t["num_key_value_heads"]
    hd = H // nh
    eps = t["rms_norm_eps"]
    cos, sin = _rope(N, hd, float(t["rope_theta"]))
    cos, sin = cos.to(embeds.device, embeds.dtype), sin.to(embeds.device, embeds.dtype)
    causal = torch.full((N, N), float("-inf"), device=embeds.device).triu(1)
    x = embeds
    for i in range(t["num_hidden_layers"]):
        p = f"model.layers.{i}."
        h = _rms_norm(x, W[p + "input_layernorm.weight"], eps)
        q = F.linear(h, W[p + "self_attn.q_proj.weight"], W[p + "self_attn.q_proj.bias"])
        k = F.linear(h, W[p + "self_attn.k_proj.weight"], W[p + "self_attn.k_proj.bias"])
        v = F.linear(h, W[p + "self_attn.v_proj.weight"], W[p + "self_attn.v_proj.bias"])
        q = q.view(N, nh, hd).transpose(0, 1)                   # [nh, N, hd]
        k = k.view(N, nkv, hd).transpose(0, 1)
        v = v.view(N, nkv, hd).transpose(0, 1)
        q = q * cos + _rotate_half(q) * sin
        k = k * cos + _rotate_half(k) * sin
        rep = nh // nkv                                         # GQA: query head j uses kv head j // rep
        k = k.repeat_interleave(rep, dim=0)
        v = v.repeat_interleave(rep, dim=0)
        scores = (q @ k.transpose(-1, -2)) * (hd ** -0.5) + causal
        probs = torch.softmax(scores.float(), dim=-1).to(v.dtype)
        att = (probs @ v).transpose(0, 1).reshape(N, H)
        x = x + F.linear(att, W[p + "self_attn.o_proj.weight"])
        h = _rms_norm(x, W[p + "post_attention_layernorm.weight"], eps)
        g = F.linear(h, W[p + "mlp.gate_proj.weight"])
        u = F.linear(h, W[p + "mlp.up_proj.weight"])
        x = x + F.linear(F.silu(g) * u, W[p + "mlp.down_proj.weight"])
    return _rms_norm(x, W["model.norm.weight"], eps)


def llm_logits(W, cfg: dict, embeds: torch.Tensor) -> torch.Tensor:
    return F.linear(llm_hidden(W, cfg, embeds), W["lm_head.weight"])


def embed_with_audio(W, ids: Sequence[int], patch_positions: Sequence[Sequence[int]],
                     audio_rows: Sequence[torch.Tensor]) -> torch.Tensor:
    """Token embeddings with the <audio_patch> positions of each audio piece replaced by
    that piece's kept adapter rows."""
    emb = W["model.embed_tokens.weight"][torch.tensor(list(ids), dtype=torch.long)].clone()
    for pos, rows in zip(patch_positions, audio_rows):
        assert len(pos) == rows.shape[0], (len(pos), rows.shape)
        emb[torch.tensor(list(pos), dtype=torch.long)] = rows
    return emb


# --------------------------------------------------------------------------------------
# Tokenizer and prompt
# --------------------------------------------------------------------------------------

class StepTokenizer:
    """tokenizer.json through the `tokenizers` library; special ids by token name."""

    def __init__(self, path: str):
        from tokenizers import Tokenizer

        self.tok = Tokenizer.from_file(path)
        vocab = self.tok.get_vocab(with_added_tokens=True)
        self.id_of = vocab
        self.bot = self._need("<|BOT|>")
        self.eot = self._need("<|EOT|>")
        self.audio_start = self._need("<audio_start>")
        self.audio_end = self._need("<audio_end>")
        self.audio_patch = self._need("<audio_patch>")
        audio = sorted((int(m.group(1)), i) for tname, i in vocab.items()
                       if (m := re.fullmatch(r"<\|audio_(\d+)\|>", tname)))
        self.audio_token_first = audio[0][1] if audio else None
        if audio:
            assert [i for _, i in audio] == list(range(audio[0][1], audio[0][1] + len(audio)))
        self.n_audio_tokens = len(audio)

    def _need(self, name):
        if name not in self.id_of:
            raise KeyError(f"special token {name} missing from tokenizer.json")
        return self.id_of[name]

    def encode(self, text: str) -> List[int]:
        return self.tok.encode(text, add_special_tokens=False).ids

    def is_text(self, i: int) -> bool:
        """The published code keeps ids below <audio_start> as text (151688 there)."""
        return i < self.audio_start


def build_ids(tok: StepTokenizer, messages: list, patch_counts: Sequence[int]):
    """The published StepAudio2 chat template, tokenised piece by piece.

    messages: list of {"role", "content", optional "eot"} with content a str, None, or a
    list of items {"type": "text", "text"} / {"type": "audio"} / {"type": "token", "token":
    [ids]}. Each audio item consumes one entry of patch_counts (one per 25 s piece; the
    caller passes the pieces of one long audio as consecutive audio items).
    Returns (ids, patch_positions per audio piece).
    """
    pieces: List = []          # str (tokenised separately) or list of ids
    audio_idx = 0
    for msg in messages:
        role = "human" if msg["role"] == "user" else msg["role"]
        content = msg["content"]
        eot = msg.get("eot", True)
        if isinstance(content, str):
            pieces.append(f"<|BOT|>{role}\n{content}" + ("<|EOT|>" if eot else ""))
        elif content is None:
            pieces.append(f"<|BOT|>{role}\n")
        else:
            pieces.append(f"<|BOT|>{role}\n")
            for item in content:
                if item["type"] == "text":
                    pieces.append(item["text"])
                elif item["type"] == "audio":
                    n = patch_counts[audio_idx]
                    audio_idx += 1
                    pieces.append("<audio_start>" + "<audio_patch>" * n + "<audio_end>")
                elif item["type"] == "token":
                    pieces.append(list(item["token"]))
                else:
                    raise ValueError(item["type"])
            if eot:
                pieces.append("<|EOT|>")
    assert audio_idx == len(patch_counts)
    ids: List[int] = []
    for p in pieces:
        ids += tok.encode(p) if isinstance(p, str) else p
    # patch positions: the n positions after each <audio_start>
    starts = [i for i, x in enumerate(ids) if x == tok.audio_start]
    positions = []
    for s, n in zip(starts, patch_counts):
        pos = list(range(s + 1, s + 1 + n))
        assert all(ids[j] == tok.audio_patch for j in pos) and ids[s + 1 + n] == tok.audio_end
        positions.append(pos)
    return ids, positions


def asr_messages(system_prompt: str, n_audio_pieces: int = 1) -> list:
    return [{"role": "system", "content": system_prompt},
            {"role": "human", "content": [{"type": "audio"}] * n_audio_pieces},
            {"role": "assistant", "content": None}]


# --------------------------------------------------------------------------------------
# Decoding
# --------------------------------------------------------------------------------------

@dataclass
class GreedyResult:
    tokens: List[int]              # all S decoded ids (decoding does not stop at EOT)
    step_logits: torch.Tensor      # [S, V]; row s is what tokens[s] was chosen from
    eot_step: int                  # index of the first <|EOT|> in tokens, or -1
    rel_gaps: List[float]          # (top1 - top2) / std(logits) per step


def greedy(W, cfg, embeds: torch.Tensor, steps: int, eot: int) -> GreedyResult:
    """Greedy decoding by full recomputation at every step; runs `steps` steps and records
    where <|EOT|> would have stopped it."""
    emb_table = W["model.embed_tokens.weight"]
    x = embeds
    toks, rows, gaps = [], [], []
    for _ in range(steps):
        logits = llm_logits(W, cfg, x)[-1]
        top2 = torch.topk(logits, 2).values
        gaps.append(float((top2[0] - top2[1]) / logits.std()))
        nxt = int(torch.argmax(logits))
        toks.append(nxt)
        rows.append(logits)
        x = torch.cat([x, emb_table[nxt][None]], dim=0)
    eot_step = toks.index(eot) if eot in toks else -1
    return GreedyResult(toks, torch.stack(rows), eot_step, gaps)


def text_ids(tok: StepTokenizer, tokens: Sequence[int]) -> List[int]:
    """What the ASR result keeps: tokens before the first <|EOT|>, text ids only."""
    out = []
    for t in tokens:
        if t == tok.eot:
            break
        if tok.is_text(t):
            out.append(t)
    return out


def read_wav(path: str) -> np.ndarray:
    import soundfile as sf

    audio, sr = sf.read(path, dtype="float32", always_2d=True)
    assert sr == SAMPLE_RATE, (path, sr)
    return np.ascontiguousarray(audio[:, 0])
