#!/usr/bin/env python3
"""Numeric fixtures for the Rust Step-Audio 2 implementation, from the reference
(step_audio2_ref.py) on the tiny checkpoint (step_audio2_make_checkpoint.py).

Writes tests/fixtures/step_audio2/:
  en_ps_cards_001.safetensors          single clip, English system prompt
  zh_aishell1_BAC009S0764W0121.safetensors  single clip, Chinese (default) system prompt
  two_turns.safetensors                system + turn 1 (clip 1 + its transcript) + turn 2
  long_27s.safetensors                 27 s input: two 25 s pieces, mel/encoder level
See step_audio2_README.md for every tensor.

Usage: python3 scripts/reference/step_audio2_make_fixtures.py [--ckpt DIR] [--out DIR]
"""

from __future__ import annotations

import argparse
import os
import sys

import numpy as np
import torch
from safetensors.torch import save_file

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import step_audio2_ref as ref  # noqa: E402

REPO = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
FIXDIR = os.path.join(REPO, "tests", "fixtures", "step_audio2")
CKPT = os.path.join(FIXDIR, "tiny_ckpt")
SPEECH = os.environ.get("STEPAUDIO_LIVE_SPEECH_DIR", os.path.join(REPO, "assets"))

STEPS = 12                              # decode steps stored per run
CLIP1 = ("en_ps_cards_001", ref.ASR_PROMPT_EN)
CLIP2 = ("zh_aishell1_BAC009S0764W0121", ref.ASR_PROMPT_ZH)
LONG_CLIP = "en_mfa_acoustic_corpus"
LONG_SAMPLES = 27 * ref.SAMPLE_RATE
TWO_TURN_PROMPT = ref.ASR_PROMPT_EN


def i64(x):
    return torch.tensor(list(x) if not isinstance(x, int) else [x], dtype=torch.int64)


def load(ckpt_dir):
    cfg = ref.load_config(ckpt_dir)
    W = ref.load_weights(ckpt_dir, cfg)
    tok = ref.StepTokenizer(os.path.join(ckpt_dir, "tokenizer.json"))
    return cfg, W, tok


def clip_fixture(cfg, W, tok, clip: str, prompt: str):
    audio = ref.read_wav(os.path.join(SPEECH, clip + ".wav"))
    assert len(audio) <= ref.PIECE_SAMPLES
    mel = ref.log_mel(audio)
    enc, ad_all, kept = ref.audio_embeddings(W, cfg, [mel])
    n = kept[0].shape[0]
    assert n == ref.n_patches(mel.shape[1])
    ids, positions = ref.build_ids(tok, ref.asr_messages(prompt), [n])
    emb = ref.embed_with_audio(W, ids, positions, kept)
    g = ref.greedy(W, cfg, emb, STEPS, tok.eot)
    t = {
        "audio": torch.from_numpy(audio.copy()),
        "mel": mel,
        "encoder_key_valid": enc.key_valid[0].to(torch.uint8),
        "encoder_blocks_in": enc.blocks_in[0],
        "encoder_blocks_out": enc.blocks_out[0],
        "encoder_out": enc.out[0],
        "encoder_valid_len": i64(enc.valid_len[0]),
        "adapter_out_all": ad_all[0],
        "adapter_out": kept[0],
        "prompt_ids": i64(ids),
        "audio_patch_positions": i64(positions[0]),
        "prefill_logits": g.step_logits[0],
        "greedy_tokens": i64(g.tokens),
        "step_logits": g.step_logits,
        "eot_step": i64(g.eot_step),
        "text_tokens": i64(ref.text_ids(tok, g.tokens)),
    }
    meta = {"clip": clip + ".wav", "system_prompt": prompt, "steps": str(STEPS),
            "text": tok.tok.decode(ref.text_ids(tok, g.tokens), skip_special_tokens=False)}
    return t, meta, g


def two_turn_fixture(cfg, W, tok, clip1_greedy=None):
    """Context recomputed from scratch:
    <|BOT|>system\\n{prompt}<|EOT|>
    <|BOT|>human\\n<audio_start>{n1 patches}<audio_end><|EOT|><|BOT|>assistant\\n{turn-1 ids}<|EOT|>
    <|BOT|>human\\n<audio_start>{n2 patches}<audio_end><|EOT|><|BOT|>assistant\\n
    (shown on several lines here; there are no newlines between turns)."""
    a1 = ref.read_wav(os.path.join(SPEECH, CLIP1[0] + ".wav"))
    a2 = ref.read_wav(os.path.join(SPEECH, CLIP2[0] + ".wav"))
    m1, m2 = ref.log_mel(a1), ref.log_mel(a2)
    # each segment is encoded on its own (batch of one), as the streaming daemon does
    _, _, k1 = ref.audio_embeddings(W, cfg, [m1])
    _, _, k2 = ref.audio_embeddings(W, cfg, [m2])
    n1, n2 = k1[0].shape[0], k2[0].shape[0]

    # turn 1 on its own: system + human(audio 1) + assistant header -> greedy
    ids1, pos1 = ref.build_ids(tok, ref.asr_messages(TWO_TURN_PROMPT), [n1])
    g1 = ref.greedy(W, cfg, ref.embed_with_audio(W, ids1, pos1, k1), STEPS, tok.eot)
    if clip1_greedy is not None:
        assert g1.tokens == clip1_greedy.tokens
    # the assistant content is what was generated before <|EOT|> (all of it if none)
    assistant = g1.tokens[:g1.eot_step] if g1.eot_step >= 0 else list(g1.tokens)

    msgs = [{"role": "system", "content": TWO_TURN_PROMPT},
            {"role": "human", "content": [{"type": "audio"}]},
            {"role": "assistant", "content": [{"type": "token", "token": assistant}]},
            {"role": "human", "content": [{"type": "audio"}]},
            {"role": "assistant", "content": None}]
    ids, pos = ref.build_ids(tok, msgs, [n1, n2])
    assert ids[:len(ids1)] == ids1
    sys_end = ref.build_ids(tok, msgs[:1], [])[0]
    turn1_end = len(ids1) + len(assistant) + 1
    assert ids[turn1_end - 1] == tok.eot and ids[turn1_end] == tok.bot
    emb = ref.embed_with_audio(W, ids, pos, [k1[0], k2[0]])
    g2 = ref.greedy(W, cfg, emb, STEPS, tok.eot)
    t = {
        "full_ids": i64(ids),
        "turn1_patch_positions": i64(pos[0]),
        "turn2_patch_positions": i64(pos[1]),
        "segment_bounds": i64([len(sys_end), len(ids1), turn1_end, len(ids)]),
        "turn1_greedy_tokens": i64(g1.tokens),
        "turn1_assistant_ids": i64(assistant),
        "turn1_prefill_logits": g1.step_logits[0],
        "turn2_prefill_logits": g2.step_logits[0],
        "turn2_greedy_tokens": i64(g2.tokens),
        "turn2_step_logits": g2.step_logits,
        "turn2_eot_step": i64(g2.eot_step),
        "turn2_text_tokens": i64(ref.text_ids(tok, g2.tokens)),
    }
    meta = {"clip1": CLIP1[0] + ".wav", "clip2": CLIP2[0] + ".wav",
            "system_prompt": TWO_TURN_PROMPT, "steps": str(STEPS)}
    return t, meta, g1, g2


def long_fixture(cfg, W, tok):
    audio = ref.read_wav(os.path.join(SPEECH, LONG_CLIP + ".wav"))
    orig = len(audio)
    audio = np.concatenate([audio, np.zeros(max(0, LONG_SAMPLES - orig), np.float32)])
    audio = audio[:LONG_SAMPLES]
    pieces = ref.split_pieces(audio)
    assert len(pieces) == 2
    mels = [ref.log_mel(p) for p in pieces]
    enc, ad_all, kept = ref.audio_embeddings(W, cfg, mels)       # batched, published path
    alone = ref.encode_audio(W, cfg, [mels[1]])                  # piece 1 as a batch of one
    ad_alone = ref.adapter(W, cfg, alone.out)[0, :ref.adapter_keep_len(alone.valid_len[0])]
    counts = [k.shape[0] for k in kept]
    ids, pos = ref.build_ids(tok, ref.asr_messages(ref.ASR_PROMPT_ZH, 2), counts)
    emb = ref.embed_with_audio(W, ids, pos, kept)
    prefill = ref.llm_logits(W, cfg, emb)[-1]
    t = {
        "mel_piece0": mels[0],
        "mel_piece1": mels[1],
        "mel_valid_len": i64([m.shape[1] - 2 for m in mels]),
        "encoder_padded_len": i64(enc.padded_len),
        "encoder_key_valid": enc.key_valid.to(torch.uint8),
        "encoder_out": enc.out,
        "encoder_valid_len": i64(enc.valid_len),
        "adapter_out_piece0": kept[0],
        "adapter_out_piece1": kept[1],
        "encoder_out_piece1_alone": alone.out[0],
        "encoder_key_valid_piece1_alone": alone.key_valid[0].to(torch.uint8),
        "adapter_out_piece1_alone": ad_alone,
        "prompt_ids": i64(ids),
        "audio_patch_positions_piece0": i64(pos[0]),
        "audio_patch_positions_piece1": i64(pos[1]),
        "prefill_logits": prefill,
    }
    # Variant: the clip at its own length (26.72 s). Its second piece has an odd mel length
    # (175), so in the batch (padded length 2502, even) the key-mask parity differs from the
    # piece's own parity, and the batched rows differ from encoding the piece alone. Piece 0
    # is the same audio as above, so its mel and encoder rows are those of the 27 s input.
    raw = ref.read_wav(os.path.join(SPEECH, LONG_CLIP + ".wav"))
    rp = ref.split_pieces(raw)
    assert len(rp) == 2 and np.array_equal(rp[0], pieces[0])
    rm = [ref.log_mel(p) for p in rp]
    assert torch.equal(rm[0], mels[0])
    renc, _, rkept = ref.audio_embeddings(W, cfg, rm)
    assert torch.equal(renc.out[0], enc.out[0])
    ralone = ref.encode_audio(W, cfg, [rm[1]])
    rad_alone = ref.adapter(W, cfg, ralone.out)[0, :ref.adapter_keep_len(ralone.valid_len[0])]
    t.update({
        "unpadded_mel_piece1": rm[1],
        "unpadded_mel_valid_len": i64([m.shape[1] - 2 for m in rm]),
        "unpadded_encoder_key_valid_piece1": renc.key_valid[1].to(torch.uint8),
        "unpadded_encoder_out_piece1": renc.out[1],
        "unpadded_encoder_valid_len": i64(renc.valid_len),
        "unpadded_adapter_out_piece1": rkept[1],
        "unpadded_encoder_out_piece1_alone": ralone.out[0],
        "unpadded_encoder_key_valid_piece1_alone": ralone.key_valid[0].to(torch.uint8),
        "unpadded_adapter_out_piece1_alone": rad_alone,
    })
    meta = {"clip": LONG_CLIP + ".wav", "original_samples": str(orig),
            "padded_to_samples": str(LONG_SAMPLES), "piece_samples": str(ref.PIECE_SAMPLES),
            "system_prompt": ref.ASR_PROMPT_ZH,
            "unpadded_variant": "unpadded_* tensors: the clip at its original length"}
    return t, meta


def compute_decode_fixtures(ckpt_dir):
    """The decoding fixtures only (used by the checkpoint maker's seed check too)."""
    cfg, W, tok = load(ckpt_dir)
    out = {"tok": tok}
    for clip, prompt in (CLIP1, CLIP2):
        out[clip] = clip_fixture(cfg, W, tok, clip, prompt)
    out["two_turns"] = two_turn_fixture(cfg, W, tok, out[CLIP1[0]][2])
    return out


def decode_runs(d):
    return [d[CLIP1[0]][2], d[CLIP2[0]][2], d["two_turns"][2], d["two_turns"][3]]


def compute_all(ckpt_dir):
    d = compute_decode_fixtures(ckpt_dir)
    cfg, W, tok = load(ckpt_dir)
    files = {
        CLIP1[0]: d[CLIP1[0]][:2],
        CLIP2[0]: d[CLIP2[0]][:2],
        "two_turns": d["two_turns"][:2],
        "long_27s": long_fixture(cfg, W, tok),
    }
    return files, d


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--ckpt", default=CKPT)
    ap.add_argument("--out", default=FIXDIR)
    args = ap.parse_args()
    ref.set_deterministic()
    files, d = compute_all(args.ckpt)
    tok = d["tok"]
    for name, (tensors, meta) in files.items():
        path = os.path.join(args.out, name + ".safetensors")
        save_file({k: v.detach().clone().contiguous() for k, v in tensors.items()}, path, metadata=meta)
        print(f"{path}: {os.path.getsize(path)} bytes")
        for k, v in tensors.items():
            print(f"  {k:32s} {str(v.dtype).replace('torch.', ''):8s} {list(v.shape)}")
    for label, r in zip(["clip1", "clip2", "two_turns turn1", "two_turns turn2"], decode_runs(d)):
        print(f"{label}: tokens {r.tokens} eot_step {r.eot_step} "
              f"min rel gap {min(r.rel_gaps):.4f} (per step: "
              + ", ".join(f"{x:.3f}" for x in r.rel_gaps) + ")")
    print(f"special ids: <|BOT|> {tok.bot}, <|EOT|> {tok.eot}, <audio_start> {tok.audio_start} "
          f"(ids below it are text), <audio_end> {tok.audio_end}, <audio_patch> {tok.audio_patch}, "
          f"<|audio_0|> {tok.audio_token_first} ({tok.n_audio_tokens} audio tokens)")


if __name__ == "__main__":
    main()
