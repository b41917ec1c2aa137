#!/usr/bin/env python3
"""The hostile-user round: mutated WAV files through `stepaudio-live transcribe`.

Makes N (default 150) mutated WAV files from the recordings in assets/ -- cut
short, header bits flipped, header bytes set to boundary values, chunk sizes
that lie, absurd `fmt ` fields (2,147,483,647 Hz and 1 Hz among them), other
codecs, float files holding NaN, infinities or huge values, splices -- runs
`transcribe FILE` on each with a timeout, and counts how each run ended:

  exit 0   a transcript
  exit 2   a clear error (bad input)
  other    anything else: a signal, another exit code, the timeout, or
           "panicked" in stderr

The target is that every file ends in exit 0 or exit 2. The same --seed makes
the same files. Needs a release build (cargo build --release) and the model
(default tiny.en, fetched on first use).

    python3 scripts/mutate_wavs.py [--count 150] [--seed 1] [--timeout 120]
        [--binary target/release/stepaudio-live] [--model tiny.en] [--keep DIR]
"""

import argparse
import math
import os
import random
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


# --- WAV helpers -------------------------------------------------------------

def chunks(wav):
    """(offset of the chunk header, id, declared size) of each chunk."""
    out, pos = [], 12
    while pos + 8 <= len(wav) and len(out) < 64:
        cid = bytes(wav[pos:pos + 4])
        size = struct.unpack_from("<I", wav, pos + 4)[0]
        out.append((pos, cid, size))
        pos += 8 + size + (size & 1)
    return out


def find(wav, cid):
    for pos, c, size in chunks(wav):
        if c == cid:
            return pos, size
    raise ValueError(f"no {cid!r} chunk")


def pcm16(wav):
    """The 16-bit mono samples of an asset."""
    pos, size = find(wav, b"data")
    data = wav[pos + 8:pos + 8 + size]
    return list(struct.unpack("<%dh" % (len(data) // 2), data[: len(data) // 2 * 2]))


def build(samples_by_frame, code=1, channels=1, rate=16000, bits=16, pack=None,
          extensible=False, valid_bits=None):
    """A WAV file from frames (lists of per-channel values) with `pack` the
    struct code of one sample."""
    container = bits // 8
    block = container * channels
    data = bytearray()
    for frame in samples_by_frame:
        for v in frame:
            data += struct.pack("<" + pack, v)
    if extensible:
        fmt = struct.pack("<HHIIHHHHI", 0xFFFE, channels, rate, rate * block, block, bits,
                          22, valid_bits or bits, 0)
        fmt += struct.pack("<H", code) + bytes(
            [0x00, 0x00, 0x00, 0x00, 0x10, 0x00, 0x80, 0x00, 0x00, 0xAA, 0x00, 0x38, 0x9B, 0x71])
    else:
        fmt = struct.pack("<HHIIHH", code, channels, rate, rate * block, block, bits)
    body = b"WAVE" + b"fmt " + struct.pack("<I", len(fmt)) + fmt
    body += b"data" + struct.pack("<I", len(data)) + bytes(data)
    if len(data) % 2:
        body += b"\0"
    return bytearray(b"RIFF" + struct.pack("<I", len(body)) + body)


def fmt_field(wav, offset, fmt, value):
    pos, _ = find(wav, b"fmt ")
    struct.pack_into("<" + fmt, wav, pos + 8 + offset, value)


# --- mutation classes ----------------------------------------------------------
# Each takes (rng, asset bytes, all assets) and returns (label, bytes).

def truncated(rng, wav, _):
    if rng.random() < 0.4:
        cut = rng.randrange(0, 44)
    else:
        cut = rng.randrange(44, len(wav))
    return f"truncated at {cut} of {len(wav)}", wav[:cut]


def header_bit_flips(rng, wav, _):
    wav = bytearray(wav)
    flips = []
    for _ in range(rng.randint(1, 3)):
        i = rng.randrange(0, 44)
        b = rng.randrange(8)
        wav[i] ^= 1 << b
        flips.append(f"{i}:{b}")
    return "header bits flipped " + ",".join(flips), wav


def header_byte_set(rng, wav, _):
    wav = bytearray(wav)
    i = rng.randrange(0, 44)
    v = rng.choice([0x00, 0xFF, 0x80, 0x7F, 0x01])
    wav[i] = v
    return f"header byte {i} = 0x{v:02X}", wav


def data_size_lie(rng, wav, _):
    wav = bytearray(wav)
    pos, size = find(wav, b"data")
    v = rng.choice([0, 1, size + 1, size - 1, size * 2, len(wav) * 4, 0x7FFFFFFF,
                    0xFFFFFFFE, 0xFFFFFFFF, rng.randrange(2 ** 32)])
    struct.pack_into("<I", wav, pos + 4, v)
    return f"data size {size} -> {v}", wav


def chunk_size_lie(rng, wav, _):
    wav = bytearray(wav)
    which = rng.choice(["RIFF", "fmt "])
    v = rng.choice([0, 1, 15, 17, 39, 41, 0x7FFFFFFF, 0xFFFFFFFF, rng.randrange(2 ** 32)])
    if which == "RIFF":
        struct.pack_into("<I", wav, 4, v)
    else:
        pos, _ = find(wav, b"fmt ")
        struct.pack_into("<I", wav, pos + 4, v)
    return f"{which} size -> {v}", wav


RATES = [2147483647, 1, 0, 999, 384001, 0xFFFFFFFF, 1000, 384000, 7, 65535]


def absurd_rate(rng, wav, _):
    wav = bytearray(wav)
    rate = rng.choice(RATES)
    fmt_field(wav, 4, "I", rate)
    return f"sample rate {rate} Hz", wav


def absurd_fmt(rng, wav, _):
    wav = bytearray(wav)
    field, off, fmt, values = rng.choice([
        ("channels", 2, "H", [0, 3, 32, 33, 255, 65535]),
        ("block align", 12, "H", [0, 1, 3, 4, 8, 65535]),
        ("bits", 14, "H", [0, 1, 4, 12, 24, 33, 64, 65535]),
        ("byte rate", 8, "I", [0, 1, 0xFFFFFFFF]),
        ("format code", 0, "H", [0, 2, 3, 6, 7, 0x55, 0xFFFE, 0xFFFF]),
    ])
    v = rng.choice(values)
    fmt_field(wav, off, fmt, v)
    return f"fmt {field} = {v}", wav


def float_with_bad_values(rng, wav, _):
    s = pcm16(wav)
    n = min(len(s), 16000 * 3)
    bits = rng.choice([32, 64])
    values = [x / 32768.0 for x in s[:n]]
    kind = rng.choice(["nan", "inf", "huge", "nan-everywhere"])
    if kind == "nan-everywhere":
        values = [math.nan] * n
    else:
        for _ in range(rng.randint(1, 20)):
            i = rng.randrange(n)
            values[i] = {"nan": math.nan, "inf": rng.choice([math.inf, -math.inf]),
                         "huge": rng.choice([1e30, -3e38, 1e7])}[kind]
    extensible = rng.random() < 0.3
    out = build([[v] for v in values], code=3, bits=bits, pack="f" if bits == 32 else "d",
                extensible=extensible)
    return f"float{bits} with {kind}{' (extensible)' if extensible else ''}", out


def float_plain(rng, wav, _):
    """A valid float file (so the float path is exercised end to end)."""
    s = pcm16(wav)
    bits = rng.choice([32, 64])
    channels = rng.choice([1, 2])
    frames = [[x / 32768.0] * channels for x in s[: 16000 * 4]]
    return f"valid float{bits} x{channels}", build(frames, code=3, channels=channels, bits=bits,
                                                   pack="f" if bits == 32 else "d")


def splice(rng, wav, assets):
    other = rng.choice(assets)
    a = rng.randrange(0, len(wav))
    b = rng.randrange(0, len(other))
    return f"splice {a} + other[{b}:]", bytearray(wav[:a] + other[b:])


def extensible_mutated(rng, wav, _):
    s = pcm16(wav)
    out = build([[x] for x in s[: 16000 * 3]], extensible=True, pack="h")
    pos, _ = find(out, b"fmt ")
    what = rng.choice(["guid", "valid bits", "cbSize", "short"])
    if what == "guid":
        i = pos + 8 + 26 + rng.randrange(14)
        out[i] ^= 0xFF
    elif what == "valid bits":
        struct.pack_into("<H", out, pos + 8 + 18, rng.choice([0, 1, 17, 64, 65535]))
    elif what == "cbSize":
        struct.pack_into("<H", out, pos + 8 + 16, rng.choice([0, 65535]))
    else:
        struct.pack_into("<I", out, pos + 4, 18)  # claims a WAVEFORMATEX-sized chunk
    return f"extensible, {what} mutated", out


def multi(rng, wav, assets):
    labels = []
    for _ in range(rng.randint(2, 4)):
        fn = rng.choice([truncated, header_bit_flips, header_byte_set, data_size_lie,
                         chunk_size_lie, absurd_rate, absurd_fmt])
        try:
            label, wav = fn(rng, bytearray(wav), assets)
        except (ValueError, struct.error):
            label = fn.__name__ + " (skipped: structure gone)"
        labels.append(label)
    return "; ".join(labels), wav


CLASSES = [
    ("truncated", truncated),
    ("header-bits", header_bit_flips),
    ("header-byte", header_byte_set),
    ("data-size", data_size_lie),
    ("chunk-size", chunk_size_lie),
    ("rate", absurd_rate),
    ("fmt-field", absurd_fmt),
    ("float-bad", float_with_bad_values),
    ("float-ok", float_plain),
    ("splice", splice),
    ("extensible", extensible_mutated),
    ("multi", multi),
]


def make_files(count, seed, assets, out_dir):
    rng = random.Random(seed)
    names = sorted(assets)
    files = []
    # The two headers come first, on a real recording.
    first = bytearray(assets["en_jfk_ask_not.wav"] if "en_jfk_ask_not.wav" in assets
                      else assets[names[0]])
    for rate in (2147483647, 1):
        wav = bytearray(first)
        fmt_field(wav, 4, "I", rate)
        files.append(("rate", f"sample rate {rate} Hz (the issue's case)", wav))
    i = 0
    while len(files) < count:
        cls, fn = CLASSES[i % len(CLASSES)]
        i += 1
        # Mostly short recordings: each valid file is transcribed.
        pool = [n for n in names if len(assets[n]) <= 300_000] if rng.random() < 0.85 else names
        name = rng.choice(pool)
        try:
            label, data = fn(rng, bytearray(assets[name]), list(assets.values()))
        except (ValueError, struct.error) as e:
            label, data = f"{cls} failed to apply ({e}); unmutated", bytearray(assets[name])
        files.append((cls, f"{name}: {label}", data))
    paths = []
    for n, (cls, label, data) in enumerate(files):
        p = out_dir / f"{n:03d}_{cls}.wav"
        p.write_bytes(bytes(data))
        paths.append((p, cls, label))
    return paths


def gist(stderr):
    """The line of stderr that says what happened."""
    lines = [l for l in stderr.strip().splitlines() if l.strip()]
    for key in ("panicked", "memory allocation", "error:"):
        for l in lines:
            if key in l:
                return l.strip()[:200]
    return lines[-1].strip()[:200] if lines else ""


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--count", type=int, default=150)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--timeout", type=float, default=120.0,
                    help="seconds per file (a 1 kHz header on a long file is legitimately 16x the audio)")
    ap.add_argument("--binary", default=str(REPO / "target/release/stepaudio-live"))
    ap.add_argument("--model", default="tiny.en")
    ap.add_argument("--assets", default=os.environ.get("STEPAUDIO_LIVE_SPEECH_DIR", str(REPO / "assets")))
    ap.add_argument("--keep", help="write the files here (and keep them) instead of a temporary directory")
    args = ap.parse_args()

    assets = {p.name: p.read_bytes() for p in sorted(Path(args.assets).glob("*.wav"))}
    if not assets:
        sys.exit(f"no WAV files in {args.assets}")
    if not os.access(args.binary, os.X_OK):
        sys.exit(f"{args.binary} not found: cargo build --release first")

    tmp = None
    if args.keep:
        out_dir = Path(args.keep)
        out_dir.mkdir(parents=True, exist_ok=True)
    else:
        tmp = tempfile.TemporaryDirectory(prefix="mutated_wavs_")
        out_dir = Path(tmp.name)
    files = make_files(args.count, args.seed, assets, out_dir)

    counts = {"exit 0": 0, "exit 2": 0, "other": 0}
    by_class = {}
    others = []
    t_start = time.time()
    for path, cls, label in files:
        t0 = time.time()
        try:
            r = subprocess.run([args.binary, "transcribe", "--model", args.model, str(path)],
                               capture_output=True, timeout=args.timeout)
            code, stderr = r.returncode, r.stderr.decode("utf-8", "replace")
            if "panicked" in stderr:
                outcome, why = "other", gist(stderr)
            elif code in (0, 2):
                outcome = f"exit {code}"
                why = gist(stderr) if code == 2 else ""
            else:
                outcome = "other"
                why = (f"signal {-code}" if code < 0 else f"exit {code}") + ": " + gist(stderr)
        except subprocess.TimeoutExpired:
            outcome, why = "other", f"timeout after {args.timeout:.0f} s"
        dt = time.time() - t0
        counts[outcome] += 1
        by_class.setdefault(cls, {"exit 0": 0, "exit 2": 0, "other": 0})[outcome] += 1
        print(f"{path.name}\t{outcome}\t{dt:6.2f} s\t{label}" + (f"\t{why}" if why else ""),
              flush=True)
        if outcome == "other":
            others.append((path.name, label, why))

    total = len(files)
    print()
    print(f"{total} mutated files, seed {args.seed}, {time.time() - t_start:.0f} s in all")
    for cls in by_class:
        c = by_class[cls]
        print(f"  {cls:12s} exit 0: {c['exit 0']:3d}  exit 2: {c['exit 2']:3d}  other: {c['other']:3d}")
    print(f"exit 0 (transcript): {counts['exit 0']}")
    print(f"exit 2 (clear error): {counts['exit 2']}")
    print(f"other (signal, other code, timeout, panic): {counts['other']}")
    for name, label, why in others:
        print(f"  {name}: {label}: {why}")
    print(f"RESULT {counts['exit 0'] + counts['exit 2']}/{total} ended in exit 0 or 2")
    if tmp is not None:
        tmp.cleanup()
    sys.exit(0 if counts["other"] == 0 else 1)


if __name__ == "__main__":
    main()
