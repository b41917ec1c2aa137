#!/usr/bin/env python3
"""Load test of the WebSocket server, bounded in count and time, loopback only.

Starts `stepaudio-live serve 127.0.0.1:0`, then

1. baseline: one audio-in session streaming real speech at real time, alone;
2. load: N subscribers, then M audio-in sessions (publishing) streaming the
   English eval recordings, looped, at real time for D seconds, all at once.

and checks that

- every session's finals are numbered 0..n-1 with one final per speech_start
  (nothing lost, nothing repeated) and each session ends with close 1000;
- every subscriber saw every published final exactly once;
- the server's RSS stays flat (sampled every 2 s);

and reports final latency (the server's `latency_ms`) p50/p95 per session
next to the baseline's, how far the senders fell behind real time, and the
partials skipped. Needs the `websockets` package (pip install websockets).

    python3 scripts/ws_load.py --binary target/release/stepaudio-live \\
        [--model tiny.en] [--subscribers 50] \\
        [--sessions 4] [--duration 120] [--baseline 60] [--json out.json] \\
        [--speech-dir DIR]

The recordings come from assets/ (or $STEPAUDIO_LIVE_SPEECH_DIR); --speech-dir
points at another folder holding the same file names.
"""

import argparse
import asyncio
import json
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
# Short and medium English recordings; the 50 s sonnets would dominate a loop.
PLAYLIST = [
    "en_jfk_ask_not", "en_ps_librivox_0870", "en_mfa_thoughts", "en_ps_librivox_0880",
    "en_librispeech_61-70968-0000", "en_ps_librivox_0890", "en_mfa_her",
    "en_ps_librivox_0920", "en_timit_ldc93s1", "en_ps_librivox_0930", "en_mfa_surround",
    "en_ps_goforward", "en_mfa_words", "en_ps_cards_005",
]
CHUNK_MS = 100
GAP_S = 0.6  # silence between recordings, so that segments end between them
HARD_LIMIT_S = 1200  # the whole run, whatever happens


def load_playlist(speech_dir: Path):
    return bytes(join_recordings(speech_dir, PLAYLIST, GAP_S))


def pct(values, q):
    if not values:
        return float("nan")
    v = sorted(values)
    k = (len(v) - 1) * q / 100
    lo, hi = int(k), min(int(k) + 1, len(v) - 1)
    return v[lo] + (v[hi] - v[lo]) * (k - lo)


async def sample_rss(pid, out, stop):
    t0 = time.monotonic()
    while not stop.is_set():
        r = rss_mb(pid)
        if r is not None:
            out.append((round(time.monotonic() - t0, 1), round(r, 1)))
        try:
            await asyncio.wait_for(stop.wait(), 2.0)
        except asyncio.TimeoutError:
            pass


async def run_session(url, pcm, offset, duration, publish):
    """Streams `pcm` (looped, from `offset` bytes) at real time for `duration` s."""
    res = {"finals": [], "starts": [], "partials": 0, "errors": [], "close": None,
           "max_send_lag_s": 0.0, "stats": None, "session": None}
    try:
        await stream_session(url, pcm, offset, duration, publish, res)
    except websockets.exceptions.ConnectionClosed as e:
        res["close"] = e.rcvd.code if e.rcvd else None
        res["errors"].append({"type": "connection", "message": str(e)})
    return res


async def stream_session(url, pcm, offset, duration, publish, res):
    async with websockets.connect(url + "/v1/audio", max_size=2**22) as ws:
        hello = json.loads(await ws.recv())
        assert hello["type"] == "hello", hello
        start = {"type": "start", "protocol": 1, "sample_rate": RATE, "channels": 1,
                 "format": "s16le", "publish": publish}
        await ws.send(json.dumps(start))
        started = json.loads(await ws.recv())
        assert started["type"] == "started", started
        res["session"] = started["session"]
        t_start = time.monotonic()

        async def reader():
            async for m in ws:
                ev = json.loads(m)
                t = ev["type"]
                if t == "final":
                    ev["client_latency_s"] = time.monotonic() - (t_start + ev["end"])
                    res["finals"].append(ev)
                elif t == "speech_start":
                    res["starts"].append(ev["segment"])
                elif t == "partial":
                    res["partials"] += 1
                elif t == "stats":
                    res["stats"] = ev
                elif t == "error":
                    res["errors"].append(ev)

        rtask = asyncio.create_task(reader())
        chunk = RATE * 2 * CHUNK_MS // 1000
        n = int(duration * 1000 / CHUNK_MS)
        pos = offset - offset % 2
        for i in range(n):
            due = t_start + i * CHUNK_MS / 1000
            now = time.monotonic()
            if due > now:
                await asyncio.sleep(due - now)
            else:
                res["max_send_lag_s"] = max(res["max_send_lag_s"], now - due)
            piece = pcm[pos:pos + chunk]
            if len(piece) < chunk:
                piece += pcm[:chunk - len(piece)]
            pos = (pos + chunk) % len(pcm)
            await ws.send(piece)
        await ws.send(json.dumps({"type": "end"}))
        res["sent_s"] = n * CHUNK_MS / 1000
        await rtask
        res["close"] = ws.close_code
        res["end_wall_s"] = time.monotonic() - t_start


async def run_subscriber(url, out, ready):
    rec = {"finals": {}, "dropped_partials": 0, "dropped_events": 0, "events": 0, "close": None}
    out.append(rec)
    async with websockets.connect(url + "/v1/subscribe", max_size=2**22) as ws:
        hello = json.loads(await ws.recv())
        assert hello["type"] == "hello"
        ready()
        async for m in ws:
            ev = json.loads(m)
            rec["events"] += 1
            if ev["type"] == "final":
                key = (ev["stream"], ev["segment"])
                rec["finals"][key] = rec["finals"].get(key, 0) + 1
            elif ev["type"] == "dropped":
                rec["dropped_partials"] += ev["partials"]
                rec["dropped_events"] += ev["events"]
        rec["close"] = ws.close_code


def summarise(name, res):
    lat = [f["latency_ms"] for f in res["finals"]]
    return {
        "session": res["session"], "name": name, "finals": len(res["finals"]),
        "speech_starts": len(res["starts"]), "partials": res["partials"],
        "latency_ms_p50": round(pct(lat, 50)), "latency_ms_p95": round(pct(lat, 95)),
        "latency_ms_max": round(max(lat)) if lat else None,
        "max_send_lag_s": round(res["max_send_lag_s"], 2),
        "skipped_partials": (res["stats"] or {}).get("skipped_partials"),
        "model_rtf": round((res["stats"] or {}).get("model_rtf", float("nan")), 3),
        "audio_s": res.get("sent_s"), "wall_s": round(res.get("end_wall_s", 0), 1),
        "close": res["close"], "errors": len(res["errors"]),
    }


async def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--binary", default=str(REPO / "target/release/stepaudio-live"))
    ap.add_argument("--model", default="tiny.en")
    ap.add_argument("--subscribers", type=int, default=50)
    ap.add_argument("--sessions", type=int, default=4)
    ap.add_argument("--duration", type=float, default=120)
    ap.add_argument("--baseline", type=float, default=60, help="seconds of the single-stream run (0: skip)")
    ap.add_argument("--json", help="write the results here")
    ap.add_argument("--speech-dir", type=Path, default=SPEECH,
                    help="folder with the playlist's recordings (default: assets/)")
    a = ap.parse_args()
    if not (1 <= a.subscribers <= 200 and 1 <= a.sessions <= 16 and 1 <= a.duration <= 600 and 0 <= a.baseline <= 600):
        sys.exit("bounds: 1-200 subscribers, 1-16 sessions, duration 1-600 s, baseline 0-600 s")

    pcm = load_playlist(a.speech_dir)
    proc = await asyncio.create_subprocess_exec(
        a.binary, "serve", "127.0.0.1:0", "--model", a.model,
        "--max-subscribers", str(a.subscribers + 10), "--max-sessions", str(a.sessions + 2),
        # The load asked for, even past the engine's measured capacity.
        "--max-streams", str(a.sessions + 1),
        stderr=asyncio.subprocess.PIPE)
    url = None
    stderr_tail = []
    while url is None:
        line = await asyncio.wait_for(proc.stderr.readline(), 120)
        if not line:
            sys.exit("the server exited: " + "".join(stderr_tail))
        text = line.decode(errors="replace")
        stderr_tail.append(text)
        m = re.search(r"listening on (ws://127\.0\.0\.1:\d+)", text)
        if m:
            url = m.group(1)

    async def drain_stderr():
        while True:
            line = await proc.stderr.readline()
            if not line:
                return
            stderr_tail.append(line.decode(errors="replace"))
            del stderr_tail[:-50]

    drain = asyncio.create_task(drain_stderr())
    stop_rss = asyncio.Event()
    rss = []
    rss_task = asyncio.create_task(sample_rss(proc.pid, rss, stop_rss))
    results = {"binary": a.binary, "model": a.model,
               "subscribers": a.subscribers, "sessions": a.sessions, "duration_s": a.duration,
               "cpus": os.cpu_count(), "load_avg_at_start": os.getloadavg()}
    print(f"server {url}", flush=True)

    if a.baseline > 0:
        print(f"baseline: 1 session, {a.baseline:.0f} s at real time", flush=True)
        base = await run_session(url, pcm, 0, a.baseline, False)
        results["baseline"] = summarise("baseline", base)
        print("  ", results["baseline"], flush=True)
    rss_load_start = len(rss)

    print(f"load: {a.subscribers} subscribers + {a.sessions} sessions, {a.duration:.0f} s", flush=True)
    subs = []
    ready = asyncio.Semaphore(0)
    sub_tasks = [asyncio.create_task(run_subscriber(url, subs, ready.release)) for _ in range(a.subscribers)]
    for _ in range(a.subscribers):
        await asyncio.wait_for(ready.acquire(), 60)
    offsets = [i * len(pcm) // a.sessions for i in range(a.sessions)]
    sessions = await asyncio.gather(*[
        run_session(url, pcm, off, a.duration, True) for off in offsets])
    # Every final was sent to the subscribers' queues before the sessions'
    # closes; the SIGTERM closes the subscriptions once those are delivered.
    proc.send_signal(signal.SIGTERM)
    await asyncio.wait_for(asyncio.gather(*sub_tasks), 120)
    rc = await asyncio.wait_for(proc.wait(), 120)
    stop_rss.set()
    await rss_task
    drain.cancel()

    problems = []
    published = {}
    for i, s in enumerate(sessions):
        segs = [f["segment"] for f in s["finals"]]
        if segs != list(range(len(s["starts"]))):
            problems.append(f"session {s['session']}: finals {segs[:5]}… vs {len(s['starts'])} speech starts")
        if s["close"] != 1000:
            problems.append(f"session {s['session']}: close {s['close']} {s['errors'][-1:]}")
        published[s["session"]] = set(segs)
    for j, sub in enumerate(subs):
        dup = [k for k, c in sub["finals"].items() if c != 1]
        if dup:
            problems.append(f"subscriber {j}: finals seen more than once: {dup[:5]}")
        for name, segs in published.items():
            got = {seg for (st, seg) in sub["finals"] if st == name}
            if got != segs:
                problems.append(f"subscriber {j}: stream {name}: missing {sorted(segs - got)[:5]}, extra {sorted(got - segs)[:5]}")
        if sub["close"] != 1001:
            problems.append(f"subscriber {j}: close {sub['close']}")

    results["load"] = [summarise(f"session {i}", s) for i, s in enumerate(sessions)]
    all_lat = [f["latency_ms"] for s in sessions for f in s["finals"]]
    client_lat = [f["client_latency_s"] * 1000 for s in sessions for f in s["finals"]]
    results["load_all"] = {
        "finals": len(all_lat),
        "latency_ms_p50": round(pct(all_lat, 50)), "latency_ms_p95": round(pct(all_lat, 95)),
        "client_latency_ms_p50": round(pct(client_lat, 50)), "client_latency_ms_p95": round(pct(client_lat, 95)),
    }
    results["subscribers_summary"] = {
        "finals_each": sorted({sum(s["finals"].values()) for s in subs}),
        "dropped_partials_total": sum(s["dropped_partials"] for s in subs),
        "dropped_events_total": sum(s["dropped_events"] for s in subs),
        "events_each_min": min(s["events"] for s in subs),
    }
    load_rss = [r for _, r in rss[rss_load_start:]] or [r for _, r in rss]
    quarter = max(1, len(load_rss) // 4)
    results["rss_mb"] = {
        "baseline_end": rss[rss_load_start - 1][1] if rss_load_start else None,
        "load_first_quarter_mean": round(statistics.mean(load_rss[:quarter]), 1),
        "load_last_quarter_mean": round(statistics.mean(load_rss[-quarter:]), 1),
        "load_min": min(load_rss), "load_max": max(load_rss), "samples": rss,
    }
    results["server_exit"] = rc
    results["problems"] = problems
    results["load_avg_at_end"] = os.getloadavg()

    print("\nper session (load):")
    for r in results["load"]:
        print("  ", r)
    print("all sessions:", results["load_all"])
    if "baseline" in results:
        b = results["baseline"]
        print(f"single stream baseline: p50 {b['latency_ms_p50']} ms, p95 {b['latency_ms_p95']} ms")
    print("subscribers:", results["subscribers_summary"])
    r = results["rss_mb"]
    print(f"server RSS (MB): load first quarter {r['load_first_quarter_mean']}, last quarter "
          f"{r['load_last_quarter_mean']}, min {r['load_min']}, max {r['load_max']}")
    print("server exit code:", rc)
    print("PROBLEMS:" if problems else "no final lost or duplicated", *problems, sep="\n  ")
    if a.json:
        Path(a.json).write_text(json.dumps(results, indent=1, default=str))
    return 1 if problems or rc != 0 else 0


if __name__ == "__main__":
    try:
        sys.exit(asyncio.run(asyncio.wait_for(main(), HARD_LIMIT_S)))
    except asyncio.TimeoutError:
        sys.exit(f"gave up after {HARD_LIMIT_S} s")
