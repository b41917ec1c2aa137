#!/usr/bin/env python3
"""Soak test of the WebSocket server: one publishing session and a set of
subscribers for N minutes, loopback only.

Starts `stepaudio-live serve` on a free loopback port, then

- one audio-in session (`"publish": true`) streams real speech at real time:
  English recordings from assets/ joined with silences between them,
  looped, for --minutes;
- --subscribers (10) subscribers follow /v1/subscribe throughout.

Every minute it prints the server's RSS, the finals of that minute and
their latency: the server's `latency_ms`, and end of speech -> final as the
client sees it (the final's arrival minus the moment the audio at its `end`
was sent). At the end it checks

- speech_start count == final count, for the session and for every
  subscriber; every subscriber got the session's finals, same seqs, once
  each, in order; closes 1000 (session) and 1001 (subscribers);
- RSS growth from the first to the last quarter of the run after the
  warm-up (means of the samples) is at most --max-rss-growth-mb;
- latency drift is at most --max-latency-drift-ms: every loop of the
  playlist is the same audio, so the finals fall at the same places; for
  each place, the median latency_ms over the loops of the last quarter
  minus that over the loops of the first quarter (complete loops after the
  warm-up), and the median of those differences;
- the server exits 0 after SIGTERM;

prints a summary table and exits 1 when a check fails. The warm-up is the
first --warmup-loops loops (default 1) of the playlist: RSS grows while the
allocator first meets each segment length, then stays flat. Needs the
websockets package (pip install websockets), as scripts/ws_load.py does.

    python3 scripts/soak.py --minutes 2 [--binary target/release/stepaudio-live]
        [--model tiny.en] [--subscribers 10] [--json soak.json]
"""

import argparse
import asyncio
import json
import math
import os
import re
import signal
import statistics
import sys
import time
from pathlib import Path

from live_clients import RATE, join_recordings, rss_mb

try:
    import websockets
except ImportError:
    sys.exit("needs the websockets package: python3 -m pip install websockets")

REPO = Path(__file__).resolve().parent.parent
SPEECH = Path(os.environ.get("STEPAUDIO_LIVE_SPEECH_DIR", REPO / "assets"))
# English recordings, about 35 s with the gaps: short, so that each quarter
# of even a short run holds whole loops of the same audio.
PLAYLIST = [
    "en_jfk_ask_not", "en_ps_librivox_0870", "en_ps_librivox_0880",
    "en_ps_librivox_0930", "en_timit_ldc93s1",
]
CHUNK_MS = 100
GAP_S = 1.5  # silence after each recording, so that segments end between them
# The loop is a whole number of 300 ms: of 100 ms chunks and of 30 ms VAD
# frames, so every loop is cut into the same segments.
LOOP_QUANTUM = RATE * 300 // 1000
RSS_EVERY_S = 5


def load_playlist(speech_dir: Path) -> bytes:
    pcm = join_recordings(speech_dir, PLAYLIST, GAP_S)
    pcm += bytes(2 * (-(len(pcm) // 2) % LOOP_QUANTUM))
    return bytes(pcm)


def loop_drift(finals, loop_s, warmup_loops, end_s):
    """Latency drift, loop-aligned: (first-quarter ms, last-quarter ms,
    drift ms, loops compared), or None with fewer than two whole loops."""
    whole = [k for k in range(warmup_loops, int(end_s // loop_s))]
    if len(whole) < 2:
        return None
    q = max(1, len(whole) // 4)
    first, last = set(whole[:q]), set(whole[-q:])
    by_place = {}
    for f in finals:
        loop = int(f["end"] // loop_s)
        place = round(f["end"] - loop * loop_s, 1)
        side = 0 if loop in first else 1 if loop in last else None
        if side is not None:
            by_place.setdefault(place, ([], []))[side].append(f["latency_ms"])
    pairs = [(median(a), median(b)) for a, b in by_place.values() if a and b]
    if not pairs:
        return None
    return (median([a for a, _ in pairs]), median([b for _, b in pairs]),
            median([b - a for a, b in pairs]), (len(first), len(last), len(pairs)))


def median(values):
    return statistics.median(values) if values else float("nan")


class Run:
    """Everything observed, stamped with seconds since the session started."""

    def __init__(self):
        self.t0 = None
        self.rss = []  # (t, MB)
        self.session = {"starts": 0, "finals": [], "close": None, "errors": [],
                        "stream": None, "max_send_lag_s": 0.0, "sent_s": 0.0}
        self.subs = []

    def now(self):
        return time.monotonic() - self.t0 if self.t0 is not None else 0.0


async def sample_rss(pid, run, stop):
    while not stop.is_set():
        r = rss_mb(pid)
        if r is not None:
            run.rss.append((run.now(), r))
        try:
            await asyncio.wait_for(stop.wait(), RSS_EVERY_S)
        except asyncio.TimeoutError:
            pass


async def session(url, pcm, seconds, run, started):
    s = run.session
    async with websockets.connect(url + "/v1/audio", max_size=2**22) as ws:
        hello = json.loads(await ws.recv())
        assert hello["type"] == "hello", hello
        await ws.send(json.dumps({"type": "start", "protocol": 1, "sample_rate": RATE,
                                  "channels": 1, "format": "s16le", "publish": True}))
        reply = json.loads(await ws.recv())
        assert reply["type"] == "started", reply
        s["stream"] = reply["session"]
        run.t0 = time.monotonic()
        started.set()

        async def reader():
            async for m in ws:
                ev = json.loads(m)
                t = ev["type"]
                if t == "speech_start":
                    s["starts"] += 1
                elif t == "final":
                    # The audio at `end` was sent at t0 + end (real-time pacing).
                    ev["t"] = run.now()
                    ev["client_latency_ms"] = (ev["t"] - ev["end"]) * 1000
                    s["finals"].append(ev)
                elif t == "error":
                    s["errors"].append(ev)

        rtask = asyncio.create_task(reader())
        chunk = RATE * 2 * CHUNK_MS // 1000
        n = int(seconds * 1000 / CHUNK_MS)
        pos = 0
        for i in range(n):
            due = run.t0 + i * CHUNK_MS / 1000
            now = time.monotonic()
            if due > now:
                await asyncio.sleep(due - now)
            else:
                s["max_send_lag_s"] = max(s["max_send_lag_s"], now - due)
            piece = pcm[pos:pos + chunk]
            if len(piece) < chunk:
                piece += pcm[:chunk - len(piece)]
            pos = (pos + chunk) % len(pcm)
            await ws.send(piece)
        s["sent_s"] = n * CHUNK_MS / 1000
        await ws.send(json.dumps({"type": "end"}))
        await rtask
        s["close"] = ws.close_code


async def subscriber(url, rec, ready):
    async with websockets.connect(url + "/v1/subscribe", max_size=2**22) as ws:
        hello = json.loads(await ws.recv())
        assert hello["type"] == "hello", hello
        ready()
        async for m in ws:
            ev = json.loads(m)
            t = ev["type"]
            rec["events"] += 1
            if t == "speech_start":
                rec["starts"][ev["stream"]] = rec["starts"].get(ev["stream"], 0) + 1
            elif t == "final":
                rec["finals"].setdefault(ev["stream"], []).append((ev["seq"], ev["segment"], ev["text"]))
            elif t == "dropped":
                rec["dropped_partials"] += ev["partials"]
                rec["dropped_events"] += ev["events"]
            if "seq" in ev:
                last = rec["last_seq"].get(ev["stream"], 0)
                if ev["seq"] <= last:
                    rec["out_of_order"] += 1
                rec["last_seq"][ev["stream"]] = ev["seq"]
        rec["close"] = ws.close_code


async def report_minutes(run, minutes, done):
    """Prints a row per minute of the run."""
    print(f"{'min':>4} {'rss MB':>8} {'finals':>7} {'total':>6} {'lat p50':>8} "
          f"{'lat max':>8} {'end->final p50':>15} {'subs min finals':>16}", flush=True)
    rows = []
    count = math.ceil(minutes)
    for minute in range(1, count + 1):
        while run.now() < minute * 60 and not done.is_set():
            await asyncio.sleep(0.5)
        if minute == count:
            # The session's last finals come after its last audio.
            await done.wait()
        rows.append(minute_row(run, minute, last=minute == count))
        print_row(rows[-1])
    return rows


def minute_row(run, minute, last):
    lo, hi = (minute - 1) * 60, (float("inf") if last else minute * 60)
    finals = [f for f in run.session["finals"] if lo <= f["t"] < hi]
    rss = [r for t, r in run.rss if t < hi]
    stream = run.session["stream"]
    return {
        "minute": minute,
        "rss_mb": round(rss[-1], 1) if rss else None,
        "finals": len(finals),
        "finals_total": sum(1 for f in run.session["finals"] if f["t"] < hi),
        "latency_ms_p50": round(median([f["latency_ms"] for f in finals])),
        "latency_ms_max": round(max([f["latency_ms"] for f in finals], default=float("nan"))),
        "client_latency_ms_p50": round(median([f["client_latency_ms"] for f in finals])),
        "subscribers_min_finals": min((len(s["finals"].get(stream, [])) for s in run.subs), default=0),
    }


def print_row(r):
    print(f"{r['minute']:>4} {r['rss_mb']:>8} {r['finals']:>7} {r['finals_total']:>6} "
          f"{r['latency_ms_p50']:>8} {r['latency_ms_max']:>8} {r['client_latency_ms_p50']:>15} "
          f"{r['subscribers_min_finals']:>16}", flush=True)


def parse_args():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--minutes", type=float, required=True)
    ap.add_argument("--binary", default=str(REPO / "target/release/stepaudio-live"))
    ap.add_argument("--model", default="tiny.en")
    ap.add_argument("--subscribers", type=int, default=10)
    ap.add_argument("--max-rss-growth-mb", type=float, default=25.0)
    ap.add_argument("--max-latency-drift-ms", type=float, default=250.0)
    ap.add_argument("--warmup-loops", type=int, default=1,
                    help="playlist loops left out of the RSS and latency comparisons")
    ap.add_argument("--speech-dir", type=Path, default=SPEECH)
    ap.add_argument("--json", help="write the results here")
    a = ap.parse_args()
    if not (0.5 <= a.minutes <= 24 * 60 and 1 <= a.subscribers <= 200):
        sys.exit("bounds: 0.5 to 1440 minutes, 1 to 200 subscribers")
    if not Path(a.binary).is_file():
        sys.exit(f"no binary at {a.binary}: cargo build --release")
    return a


async def main(a):

    pcm = load_playlist(a.speech_dir)
    proc = await asyncio.create_subprocess_exec(
        a.binary, "serve", "127.0.0.1:0", "--model", a.model,
        "--max-subscribers", str(a.subscribers + 5),
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE)
    stderr_tail = []
    url = None
    try:
        while url is None:
            line = await asyncio.wait_for(proc.stderr.readline(), 300)
            if not line:
                sys.exit("the server exited:\n" + "".join(stderr_tail))
            text = line.decode(errors="replace")
            stderr_tail.append(text)
            m = re.search(r"listening on (ws://127\.0\.0\.1:\d+)", text)
            if m:
                url = m.group(1)
    except asyncio.TimeoutError:
        proc.kill()
        sys.exit("the server did not start in 300 s:\n" + "".join(stderr_tail))

    async def drain_stderr():
        while True:
            line = await proc.stderr.readline()
            if not line:
                return
            stderr_tail.append(line.decode(errors="replace"))
            del stderr_tail[:-50]

    drain = asyncio.create_task(drain_stderr())
    try:
        return await soak(a, proc, url, pcm, stderr_tail)
    finally:
        drain.cancel()
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


async def soak(a, proc, url, pcm, stderr_tail):
    run = Run()
    print(f"server {url} (pid {proc.pid}); {a.subscribers} subscribers, 1 publishing session, "
          f"{a.minutes:g} min of speech at real time", flush=True)

    ready = asyncio.Semaphore(0)
    for _ in range(a.subscribers):
        run.subs.append({"starts": {}, "finals": {}, "events": 0, "dropped_partials": 0,
                         "dropped_events": 0, "last_seq": {}, "out_of_order": 0, "close": None})
    sub_tasks = [asyncio.create_task(subscriber(url, rec, ready.release)) for rec in run.subs]
    for _ in range(a.subscribers):
        await asyncio.wait_for(ready.acquire(), 60)

    started, done, stop_rss = asyncio.Event(), asyncio.Event(), asyncio.Event()
    sess = asyncio.create_task(session(url, pcm, a.minutes * 60, run, started))
    await asyncio.wait_for(started.wait(), 60)
    rss_task = asyncio.create_task(sample_rss(proc.pid, run, stop_rss))
    reporter = asyncio.create_task(report_minutes(run, a.minutes, done))
    await sess
    done.set()
    rows = await reporter
    # Every final reached the subscribers' queues before the session closed;
    # SIGTERM closes the subscriptions (1001) once those are delivered.
    proc.send_signal(signal.SIGTERM)
    await asyncio.wait_for(asyncio.gather(*sub_tasks, return_exceptions=True), 120)
    rc = await asyncio.wait_for(proc.wait(), 120)
    stop_rss.set()
    await rss_task

    s = run.session
    stream = s["stream"]
    checks = []  # (what, value, limit, ok)

    def check(what, value, limit, ok):
        checks.append((what, value, limit, bool(ok)))

    want = [(f["seq"], f["segment"], f["text"]) for f in s["finals"]]
    segs = [f["segment"] for f in s["finals"]]
    check("session: speech_start == final", f"{s['starts']} / {len(s['finals'])}", "equal",
          s["starts"] == len(s["finals"]) and segs == list(range(len(segs))) and s["finals"])
    check("session: close", s["close"], 1000, s["close"] == 1000)
    bad_subs = []
    for i, rec in enumerate(run.subs):
        got = rec["finals"].get(stream, [])
        starts = rec["starts"].get(stream, 0)
        problems = []
        if starts != len(got):
            problems.append(f"{starts} speech_start vs {len(got)} finals")
        if got != want:
            problems.append(f"finals differ from the session's ({len(got)} vs {len(want)})")
        if rec["out_of_order"]:
            problems.append(f"{rec['out_of_order']} events out of order or repeated")
        if rec["close"] != 1001:
            problems.append(f"close {rec['close']}")
        if problems:
            bad_subs.append(f"subscriber {i}: " + "; ".join(problems))
    check("subscribers: speech_start == final, = session's finals",
          f"{a.subscribers - len(bad_subs)}/{a.subscribers} ok", "all", not bad_subs)

    loop_s = len(pcm) / 2 / RATE
    warmup_s = a.warmup_loops * loop_s
    rss = [r for t, r in run.rss if t >= warmup_s]
    if len(rss) >= 2:
        q = max(1, len(rss) // 4)
        rss_first, rss_last = statistics.mean(rss[:q]), statistics.mean(rss[-q:])
        growth = rss_last - rss_first
        check(f"RSS growth after {warmup_s:.0f} s warm-up, first -> last quarter (MB)",
              f"{rss_first:.1f} -> {rss_last:.1f} ({growth:+.1f})", f"<= {a.max_rss_growth_mb:g}",
              growth <= a.max_rss_growth_mb)
    else:
        check("RSS growth after the warm-up", "too short a run", "", False)
    drift = loop_drift(s["finals"], loop_s, a.warmup_loops, s["sent_s"])
    if drift:
        first, last, d, (nf, nl, places) = drift
        check(f"latency_ms drift, {nf} vs {nl} loop(s) of {loop_s:.1f} s, {places} places (ms)",
              f"{first:.0f} -> {last:.0f} ({d:+.0f})", f"<= {a.max_latency_drift_ms:g}",
              d <= a.max_latency_drift_ms)
    else:
        check("latency drift", "fewer than 2 whole loops after the warm-up", "", False)
    check("server exit code after SIGTERM", rc, 0, rc == 0)

    all_lat = [f["latency_ms"] for f in s["finals"]]
    client = [f["client_latency_ms"] for f in s["finals"]]
    print()
    print(f"finals {len(s['finals'])} in {s['sent_s']:.0f} s of audio; latency_ms p50 "
          f"{median(all_lat):.0f}, max {max(all_lat, default=float('nan')):.0f}; end of speech -> "
          f"final (client) p50 {median(client):.0f} ms; sender max lag {s['max_send_lag_s']:.2f} s; "
          f"subscribers dropped {sum(r['dropped_partials'] for r in run.subs)} partials, "
          f"{sum(r['dropped_events'] for r in run.subs)} other events")
    w = max(len(c[0]) for c in checks)
    print(f"\n{'check':<{w}}  {'value':<28} {'limit':<10} result")
    for what, value, limit, ok in checks:
        print(f"{what:<{w}}  {str(value):<28} {str(limit):<10} {'ok' if ok else 'FAIL'}")
    for b in bad_subs[:10]:
        print("  " + b)
    failed = [c for c in checks if not c[3]]
    if rc != 0:
        print("server stderr (last lines):\n" + "".join(stderr_tail[-20:]))
    print("\nSOAK " + ("FAILED" if failed else "PASSED"))
    if a.json:
        Path(a.json).write_text(json.dumps({
            "minutes": a.minutes, "subscribers": a.subscribers, "per_minute": rows,
            "rss_samples": run.rss, "checks": checks, "finals": len(s["finals"]),
            "latency_ms": all_lat, "client_latency_ms": client,
        }, indent=1))
    return 1 if failed else 0


if __name__ == "__main__":
    args = parse_args()
    try:
        sys.exit(asyncio.run(asyncio.wait_for(main(args), args.minutes * 60 + 600)))
    except asyncio.TimeoutError:
        sys.exit("the soak did not finish in time")
