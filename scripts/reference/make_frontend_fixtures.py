#!/usr/bin/env python3
"""Reference log-mel frontend (docs/architecture.md, "Log-mel frontend") and its test fixtures.

Independent float64 numpy implementation:
  periodic Hann(400), n_fft 400, hop 160, centred STFT with reflect padding of 200 samples on
  both sides, power |X|^2, last frame dropped, mel filterbank = librosa.filters.mel(sr=16000,
  n_fft=400, n_mels=N) (Slaney scale, Slaney area norm), log10(max(mel, 1e-10)), clamp from
  below at (global max - 8), then (x + 4) / 4.

Variants:
  whisper   : audio padded with zeros / trimmed to 480000 samples -> exactly 3000 frames
  stepaudio : 479 zero samples appended, no 30 s padding -> (n + 479) // 160 frames

Writes (relative to the repository root, or to --out):
  tests/fixtures/frontend/whisper80.safetensors       audio f32[n], filters80 f32[80,201], log_mel f32[80,3000]
  tests/fixtures/frontend/stepaudio128.safetensors    audio f32[n], filters128 f32[128,201], log_mel f32[128,L]
  tests/fixtures/frontend/stepaudio128_jfk.safetensors audio f32[112000], log_mel f32[128,L]

Cross-checks (printed; numbers recorded in tests/fixtures/README.md):
  * own STFT power vs torch.stft(center=True, pad_mode='reflect', window=torch.hann_window(400))
  * own log-mel vs the same pipeline run with torch.stft
  * own filterbank (float64) vs librosa's default float32 output
"""
from __future__ import annotations

import argparse
import os
import sys

import librosa
import numpy as np
import soundfile as sf

SR = 16000
N_FFT = 400
HOP = 160
N_SAMPLES_30S = 30 * SR  # 480000
STEPAUDIO_PAD = 479

REPO = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
SPEECH = os.environ.get("STEPAUDIO_LIVE_SPEECH_DIR", os.path.join(REPO, "assets"))


def periodic_hann(n: int) -> np.ndarray:
    k = np.arange(n, dtype=np.float64)
    return 0.5 - 0.5 * np.cos(2.0 * np.pi * k / n)


def mel_filters(n_mels: int) -> np.ndarray:
    """[n_mels, n_fft/2+1] float64 Slaney-scale, Slaney-normalised filterbank."""
    return librosa.filters.mel(sr=SR, n_fft=N_FFT, n_mels=n_mels, dtype=np.float64)


def stft_power(audio: np.ndarray) -> np.ndarray:
    """Centred STFT power spectrum [n_fft/2+1, frames] in float64, last frame dropped."""
    x = np.asarray(audio, dtype=np.float64)
    half = N_FFT // 2
    # reflect padding that does not repeat the edge sample (numpy 'reflect' == torch 'reflect')
    xp = np.pad(x, (half, half), mode="reflect")
    n_frames = 1 + (len(xp) - N_FFT) // HOP
    idx = np.arange(N_FFT)[None, :] + HOP * np.arange(n_frames)[:, None]
    frames = xp[idx] * periodic_hann(N_FFT)[None, :]
    spec = np.fft.rfft(frames, n=N_FFT, axis=1)  # [frames, 201]
    power = spec.real**2 + spec.imag**2
    return power[:-1].T  # drop the last frame -> [201, n_frames - 1]


def log_mel_from_power(power: np.ndarray, filters: np.ndarray) -> np.ndarray:
    mel = filters @ power
    logm = np.log10(np.maximum(mel, 1e-10))
    logm = np.maximum(logm, logm.max() - 8.0)
    return (logm + 4.0) / 4.0


def prepare_whisper(audio: np.ndarray) -> np.ndarray:
    a = np.asarray(audio, dtype=np.float64)
    if len(a) >= N_SAMPLES_30S:
        return a[:N_SAMPLES_30S]
    return np.concatenate([a, np.zeros(N_SAMPLES_30S - len(a))])


def prepare_stepaudio(audio: np.ndarray) -> np.ndarray:
    a = np.asarray(audio, dtype=np.float64)
    return np.concatenate([a, np.zeros(STEPAUDIO_PAD)])


def log_mel(audio: np.ndarray, n_mels: int, variant: str) -> np.ndarray:
    """float64 log-mel [n_mels, frames] of float samples at 16 kHz."""
    prep = {"whisper": prepare_whisper, "stepaudio": prepare_stepaudio}[variant]
    return log_mel_from_power(stft_power(prep(audio)), mel_filters(n_mels))


def whisper_log_mel(audio: np.ndarray, n_mels: int = 80) -> np.ndarray:
    return log_mel(audio, n_mels, "whisper")


def read_wav(name: str, seconds: float | None = None) -> np.ndarray:
    audio, sr = sf.read(os.path.join(SPEECH, name), dtype="float32", always_2d=False)
    assert sr == SR and audio.ndim == 1, (name, sr, audio.shape)
    if seconds is not None:
        audio = audio[: int(round(seconds * SR))]
    return audio


# ---------------------------------------------------------------- cross-checks (torch)
def torch_power(audio64: np.ndarray) -> np.ndarray:
    import torch

    x = torch.from_numpy(np.asarray(audio64, dtype=np.float64))
    win = torch.hann_window(N_FFT, dtype=torch.float64)
    X = torch.stft(x, N_FFT, HOP, window=win, center=True, pad_mode="reflect", return_complex=True)
    return (X.abs() ** 2)[:, :-1].numpy()


def torch_log_mel_f32(audio32: np.ndarray, n_mels: int) -> np.ndarray:
    """The whole pipeline in float32 torch (as the published Whisper code runs it)."""
    import torch

    x = torch.from_numpy(np.asarray(audio32, dtype=np.float32))
    X = torch.stft(x, N_FFT, HOP, window=torch.hann_window(N_FFT), center=True, pad_mode="reflect", return_complex=True)
    power = X[..., :-1].abs() ** 2
    filt = torch.from_numpy(librosa.filters.mel(sr=SR, n_fft=N_FFT, n_mels=n_mels))  # float32
    logm = torch.clamp(filt @ power, min=1e-10).log10()
    logm = torch.maximum(logm, logm.max() - 8.0)
    return ((logm + 4.0) / 4.0).numpy().astype(np.float64)


def cross_check(audio: np.ndarray, n_mels: int, variant: str, ours: np.ndarray, label: str) -> dict:
    prep = {"whisper": prepare_whisper, "stepaudio": prepare_stepaudio}[variant]
    a64 = prep(audio)
    p_ours = stft_power(a64)
    p_t64 = torch_power(a64)
    lm_t64 = log_mel_from_power(p_t64, mel_filters(n_mels))
    lm_t32 = torch_log_mel_f32(a64.astype(np.float32), n_mels)
    res = {
        "power_rel_f64": float(np.abs(p_ours - p_t64).max() / np.abs(p_t64).max()),
        "logmel_abs_vs_torch_f64": float(np.abs(ours - lm_t64).max()),
        "logmel_abs_vs_torch_f32": float(np.abs(ours - lm_t32).max()),
        "logmel_abs_f32_fixture_vs_f64": float(np.abs(ours.astype(np.float32).astype(np.float64) - ours).max()),
    }
    print(f"[{label}] shape={ours.shape} " + " ".join(f"{k}={v:.3e}" for k, v in res.items()))
    return res


def other_extractors(audio: np.ndarray, ours80: np.ndarray) -> None:
    """Informational: the Whisper feature extractors of faster-whisper and transformers (float32)."""
    try:
        from faster_whisper.feature_extractor import FeatureExtractor

        fw = FeatureExtractor(feature_size=80)(prepare_whisper(audio).astype(np.float32), padding=0)
        print(f"[whisper80 timit] max abs vs faster_whisper FeatureExtractor: {np.abs(fw[:, :3000] - ours80).max():.3e}")
    except Exception as e:  # pragma: no cover - optional
        print(f"faster_whisper check skipped: {e}")
    try:
        from transformers import WhisperFeatureExtractor

        hf = WhisperFeatureExtractor(feature_size=80)(audio, sampling_rate=SR, return_tensors="np").input_features[0]
        print(f"[whisper80 timit] max abs vs transformers WhisperFeatureExtractor: {np.abs(hf - ours80).max():.3e}")
    except Exception as e:  # pragma: no cover - optional
        print(f"transformers check skipped: {e}")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=os.path.join(REPO, "tests", "fixtures", "frontend"))
    ap.add_argument("--no-torch", action="store_true", help="skip the torch.stft cross-check")
    args = ap.parse_args(argv)
    from safetensors.numpy import save_file

    os.makedirs(args.out, exist_ok=True)
    timit = read_wav("en_timit_ldc93s1.wav")
    jfk7 = read_wav("en_jfk_ask_not.wav", seconds=7.0)

    # filterbank sanity vs librosa's default (float32) output
    for n in (80, 128):
        d = np.abs(mel_filters(n) - librosa.filters.mel(sr=SR, n_fft=N_FFT, n_mels=n)).max()
        print(f"filters{n}: max |f64 - librosa f32 default| = {d:.3e}")

    w80 = whisper_log_mel(timit, 80)
    s128 = log_mel(timit, 128, "stepaudio")
    s128_jfk = log_mel(jfk7, 128, "stepaudio")
    assert w80.shape == (80, 3000)
    assert s128.shape == (128, (len(timit) + STEPAUDIO_PAD) // HOP)
    assert s128_jfk.shape == (128, (len(jfk7) + STEPAUDIO_PAD) // HOP)

    if not args.no_torch:
        cross_check(timit, 80, "whisper", w80, "whisper80 timit")
        cross_check(timit, 128, "stepaudio", s128, "stepaudio128 timit")
        cross_check(jfk7, 128, "stepaudio", s128_jfk, "stepaudio128 jfk7")
        other_extractors(timit, w80)

    f32 = lambda a: np.ascontiguousarray(a, dtype=np.float32)
    save_file(
        {"audio": f32(timit), "filters80": f32(mel_filters(80)), "log_mel": f32(w80)},
        os.path.join(args.out, "whisper80.safetensors"),
        metadata={"source": "en_timit_ldc93s1.wav", "variant": "whisper (pad/trim to 480000 samples)"},
    )
    save_file(
        {"audio": f32(timit), "filters128": f32(mel_filters(128)), "log_mel": f32(s128)},
        os.path.join(args.out, "stepaudio128.safetensors"),
        metadata={"source": "en_timit_ldc93s1.wav", "variant": "stepaudio (append 479 zeros)"},
    )
    save_file(
        {"audio": f32(jfk7), "log_mel": f32(s128_jfk)},
        os.path.join(args.out, "stepaudio128_jfk.safetensors"),
        metadata={"source": "en_jfk_ask_not.wav[0:112000]", "variant": "stepaudio (append 479 zeros)"},
    )
    for n in sorted(os.listdir(args.out)):
        print(f"wrote {os.path.join(args.out, n)} ({os.path.getsize(os.path.join(args.out, n))} bytes)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
