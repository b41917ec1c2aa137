#!/usr/bin/env python3
"""Create the tiny random Step-Audio 2 checkpoint in the published layout.

Output: tests/fixtures/step_audio2/tiny_ckpt/
  config.json                         audio_encoder_config + text_config (real key names)
  model-00001-of-00002.safetensors    float32 tensors, published tensor names
  model-00002-of-00002.safetensors
  model.safetensors.index.json        {"metadata": {"total_size"}, "weight_map"}
  tokenizer.json                      small byte-level BPE trained here, with the special
                                      tokens placed after the text ids

The random init is chosen so greedy decoding is robust: for seeds base, base+1, ... the
decode fixtures are computed with the reference and the first seed whose every decode step
has (top1 - top2) / std(logits) >= MIN_REL_GAP, and whose first decoded token is not
<|EOT|>, is kept.

Usage: python3 scripts/reference/step_audio2_make_checkpoint.py [--seed N] [--out DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile

import torch
from safetensors.torch import save_file

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import step_audio2_ref as ref  # noqa: E402

REPO = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
DEFAULT_OUT = os.path.join(REPO, "tests", "fixtures", "step_audio2", "tiny_ckpt")
# 0.02 when seed 1006 was chosen; 0.018 since the Chinese clip became the AISHELL-1 one in
# assets/ (seed 1006's smallest margin is then 0.0187, in two_turns turn 2, step 1), so that
# the search still ends at the stored checkpoint. Rust and the reference agree to ~1e-6
# relative, far inside either margin.
MIN_REL_GAP = 1.8e-2

ENCODER = dict(n_mels=128, n_audio_ctx=1500, n_audio_state=64, n_audio_head=4,
               n_audio_layer=2, n_codebook_size=4096, llm_dim=128, kernel_size=3,
               adapter_stride=2)
TEXT = dict(hidden_size=128, intermediate_size=256, num_attention_heads=4,
            num_attention_groups=2, num_key_value_heads=2, num_hidden_layers=2)
ADAPTER_HIDDEN = 256   # width of adapter.linear1 (2048 in the real model; see README)
BPE_VOCAB = 640        # BPE model size incl. the 256 byte symbols; specials come after

# Special tokens appended after the BPE ids, in this order. Names follow the real
# tokenizer where docs/architecture.md / the published code name them; the five
# <|step_reserved_k|> tokens are placeholders of ours that mirror the gap between
# <audio_patch> (151690) and the first audio token (151696) in the real tokenizer.
TEXT_SPECIALS = ["<|endoftext|>", "<|BOT|>", "<|EOT|>", "<tts_start>", "<tts_end>"]
AUDIO_IN_SPECIALS = ["<audio_start>", "<audio_end>", "<audio_patch>"]
RESERVED = [f"<|step_reserved_{k}|>" for k in range(5)]
AUDIO_OUT = [f"<|audio_{k}|>" for k in range(16)]

# Qwen2-style pre-tokenisation split pattern (byte-level BPE after it).
SPLIT_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}|"
                 r" ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")

# A little English and Chinese text of our own to train the BPE on.
CORPUS = """\
Please record the audio content you hear.
The quick brown fox jumps over the lazy dog near the river bank.
We are testing a streaming speech recognizer that writes partial and final transcripts.
The microphone sends audio to a ring buffer, and the model turns speech into text.
She sells sea shells by the sea shore, and the shells she sells are surely sea shells.
Tomorrow morning the weather will be cloudy with a chance of light rain in the afternoon.
Numbers like 1, 2, 3, 42 and 2025 appear in many sentences about time and money.
A small random model cannot understand anything, but its numbers must still be exact.
Open the window, turn on the light, and read the first page of the book aloud.
How are you doing today? I am fine, thank you, and I hope you are well too.
Every segment of speech is encoded once, then the decoder writes one token at a time.
The cache keeps the keys and values of the committed context so nothing is recomputed.
When the context grows too long, the daemon starts again from the system prompt.
Children played in the park while their parents talked about the news of the day.
The train to the city leaves at seven o'clock and arrives before nine.
请记录下你所听到的语音内容。
今天天气很好，我们一起去公园散步吧。
这是一个实时语音识别的测试，模型把声音变成文字。
麦克风把声音送进缓冲区，然后模型逐个输出文字。
我们在北京和上海都有很多朋友，他们说普通话和英语。
明天早上可能会下雨，请记得带上雨伞。
小明每天早上七点起床，八点去学校上课。
这个系统可以识别中文和英文，也可以处理很长的录音。
请把窗户打开，再把灯打开，然后大声读出第一页。
时间就是金钱，效率就是生命。
他们在会议上讨论了新的计划和明年的目标。
语音识别需要声学模型、语言模型和解码器共同工作。
你好，很高兴认识你，希望我们以后多多交流。
"""


def build_tokenizer():
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(SPLIT_PATTERN), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=BPE_VOCAB, min_frequency=1, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  special_tokens=[])
    lines = CORPUS.splitlines()
    tok.train_from_iterator(lines * 3, trainer=trainer)
    n_bpe = tok.get_vocab_size()
    tok.add_special_tokens(TEXT_SPECIALS + AUDIO_IN_SPECIALS + RESERVED + AUDIO_OUT)
    vocab = tok.get_vocab(with_added_tokens=True)
    ordered = TEXT_SPECIALS + AUDIO_IN_SPECIALS + RESERVED + AUDIO_OUT
    assert [vocab[n] for n in ordered] == list(range(n_bpe, n_bpe + len(ordered))), \
        "special tokens must follow the BPE ids contiguously"
    return tok


def make_config(vocab_size: int, eos_id: int) -> dict:
    # Key set mirrors the Step-Audio-2-mini config.json (see README).
    return {
        "architectures": ["StepAudio2ForCausalLM"],
        "auto_map": {
            "AutoConfig": "configuration_step_audio_2.StepAudio2Config",
            "AutoModelForCausalLM": "modeling_step_audio_2.StepAudio2ForCausalLM",
        },
        "model_type": "step_audio_2",
        "text_config": {
            "hidden_size": TEXT["hidden_size"],
            "intermediate_size": TEXT["intermediate_size"],
            "num_attention_heads": TEXT["num_attention_heads"],
            "num_attention_groups": TEXT["num_attention_groups"],
            "num_key_value_heads": TEXT["num_key_value_heads"],
            "num_hidden_layers": TEXT["num_hidden_layers"],
            "max_seq_len": 16384,
            "vocab_size": vocab_size,
            "rms_norm_eps": 1e-06,
            "eos_token_id": eos_id,
            "pad_token_id": eos_id,
            "rope_theta": 1000000.0,
            "max_position_embeddings": 16384,
            "rope_scaling": None,
            "torch_dtype": "float32",
        },
        "audio_encoder_config": dict(ENCODER),
    }


def random_weights(cfg: dict, seed: int) -> dict:
    """Random float32 weights. Scales: linear/conv weights N(0, 1/fan_in) (signals stay
    O(1)), biases N(0, 0.1^2), norm weights 1 + N(0, 0.1^2), norm biases N(0, 0.1^2),
    token embeddings N(0, 1), positional embeddings N(0, 0.5^2)."""
    g = torch.Generator().manual_seed(seed)
    shapes = ref.expected_shapes(cfg, ADAPTER_HIDDEN)
    W = {}
    for name in ref.expected_tensor_names(cfg):
        shape = shapes[name]
        r = torch.randn(shape, generator=g, dtype=torch.float32)
        is_norm = any(k in name for k in ("_ln.", "after_norm", "layernorm", "model.norm"))
        if is_norm and name.endswith(".weight"):
            t = 1.0 + 0.1 * r
        elif name.endswith(".bias"):
            t = 0.1 * r
        elif name == "model.embed_tokens.weight":
            t = r
        elif name == "encoder.positional_embedding.weight":
            t = 0.5 * r
        else:
            fan_in = 1
            for d in shape[1:]:
                fan_in *= d
            t = r / fan_in ** 0.5
        W[name] = t.contiguous()
    return W


def write_checkpoint(out_dir: str, cfg: dict, W: dict, tok, seed: int) -> None:
    os.makedirs(out_dir, exist_ok=True)
    # Shard order: LLM tensors, lm_head, then encoder and adapter; cut at half the bytes
    # (the cut may fall inside a layer, as real shards do).
    names = sorted(W, key=lambda n: (0 if n.startswith("model.") else
                                     1 if n.startswith("lm_head") else
                                     2 if n.startswith("encoder.") else 3))
    total = sum(W[n].numel() * 4 for n in names)
    shards, acc = [[], []], 0
    for n in names:
        shards[0 if acc < total / 2 else 1].append(n)
        acc += W[n].numel() * 4
    weight_map = {}
    for k, group in enumerate(shards):
        fname = f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file({n: W[n] for n in group}, os.path.join(out_dir, fname),
                  metadata={"format": "pt", "stepaudio_live_seed": str(seed)})
        for n in group:
            weight_map[n] = fname
    with open(os.path.join(out_dir, "model.safetensors.index.json"), "w", encoding="utf-8") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))},
                  f, indent=2)
        f.write("\n")
    with open(os.path.join(out_dir, "config.json"), "w", encoding="utf-8") as f:
        json.dump(cfg, f, indent=2, ensure_ascii=False)
        f.write("\n")
    tok.save(os.path.join(out_dir, "tokenizer.json"), pretty=True)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--seed", type=int, default=1000, help="first seed tried")
    ap.add_argument("--out", default=DEFAULT_OUT)
    ap.add_argument("--max-tries", type=int, default=50)
    args = ap.parse_args()
    ref.set_deterministic()
    import step_audio2_make_fixtures as fx

    tok = build_tokenizer()
    n_tok = tok.get_vocab_size(with_added_tokens=True)
    vocab_size = (n_tok + 127) // 128 * 128
    eos_id = tok.get_vocab(with_added_tokens=True)["<|endoftext|>"]
    cfg = make_config(vocab_size, eos_id)
    print(f"tokenizer: {n_tok} tokens (BPE {BPE_VOCAB}), config vocab_size {vocab_size}")

    for seed in range(args.seed, args.seed + args.max_tries):
        W = random_weights(cfg, seed)
        with tempfile.TemporaryDirectory() as tmp:
            write_checkpoint(tmp, cfg, W, tok, seed)
            decode = fx.compute_decode_fixtures(tmp)
        gaps = [g for r in fx.decode_runs(decode) for g in r.rel_gaps]
        first_eot = [r.tokens[0] == decode["tok"].eot for r in fx.decode_runs(decode)]
        print(f"seed {seed}: min rel gap {min(gaps):.4f} over {len(gaps)} steps; "
              f"first token EOT in any run: {any(first_eot)}")
        if min(gaps) >= MIN_REL_GAP and not any(first_eot):
            break
    else:
        raise SystemExit("no seed passed the greedy-robustness check")
    if os.path.isdir(args.out):
        shutil.rmtree(args.out)
    write_checkpoint(args.out, cfg, W, tok, seed)
    print(f"wrote {args.out} (seed {seed})")


if __name__ == "__main__":
    main()
