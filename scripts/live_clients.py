"""What the over-the-wire load scripts (ws_load.py, soak.py) share: the
speech they stream and the server's memory as /proc reports it."""

import wave
from pathlib import Path

RATE = 16000


def join_recordings(speech_dir: Path, names, gap_s: float) -> bytearray:
    """16 kHz mono s16le recordings `names` from `speech_dir`, each followed
    by `gap_s` seconds of silence, as one buffer of raw bytes."""
    pcm = bytearray()
    gap = bytes(int(RATE * gap_s) * 2)
    for name in names:
        with wave.open(str(speech_dir / f"{name}.wav")) as w:
            assert w.getframerate() == RATE and w.getnchannels() == 1 and w.getsampwidth() == 2, name
            pcm += w.readframes(w.getnframes())
        pcm += gap
    return pcm


def rss_mb(pid):
    """Resident memory of process `pid` in MB, or None if it is gone."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None
