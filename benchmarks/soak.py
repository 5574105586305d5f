"""Soak: N clients keep talking to a server in its own process; its resources and latencies over time.

Each client holds one websocket for the whole run and streams real speech (the recordings in
shared/audio, in turn) in real time like a live microphone: an utterance, ``--gap-s`` of silence
in which the reply comes, the next utterance. A client whose session ends reconnects (counted).
Every ``--sample-s`` the script records the server's RSS (its worker process included), open file descriptors and
threads, the gateway event loop's lag (``vita_event_loop_lag_seconds`` in /metrics: mean and
the bucket bound of the worst wake-up), and the turns finished in that window with their
latency (client: end of speech sent -> first reply audio, VAD hangover included; server: its
end-of-turn decision -> first audio). Flat lines are the goal. Writes JSON and a PNG beside it.

    python -m benchmarks.soak --clients 4 --duration-s 600 --json out/soak.json   # also out/soak.png
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import psutil
import soxr
import websockets

from benchmarks.load import machine
from server.client import ReplyCollector, pcm_frames, read_wav
from server.local_cluster import free_port

AUDIO_DIR = Path(os.environ.get("VITA_SHARED_DIR") or Path(__file__).resolve().parents[2] / "shared") / "audio"
RATE = 16_000
READY_TIMEOUT_S = 300.0
LAG_BUCKET = re.compile(r'vita_event_loop_lag_seconds_bucket\{le="([^"]+)"\} (\S+)')


@dataclass
class Soak:
    """What the clients saw, shared with the sampler: finished turns as (monotonic time, client
    first-audio ms, server first-audio ms), error events and reconnections."""

    turns: list[tuple[float, float | None, float | None]] = field(default_factory=list)
    errors: list[dict[str, Any]] = field(default_factory=list)
    reconnects: int = 0
    interruptions: int = 0  # barge-ins: the next utterance began while a reply was generated or played


def load_clips(paths: list[Path]) -> list[np.ndarray]:
    """The recordings as 16 kHz mono int16."""
    clips = []
    for path in paths:
        audio, rate = read_wav(path)
        mono = audio if audio.ndim == 1 else audio.mean(axis=1).astype(np.int16)
        clips.append(mono if rate == RATE else soxr.resample(mono, rate, RATE).astype(np.int16))
    return clips


def start_server(args: argparse.Namespace, port: int, log_path: Path) -> subprocess.Popen:
    """``vita-server`` in its own process on loopback, logging to ``log_path``; returns once ready."""
    command = [sys.executable, "-m", "server.cli", "--host", "127.0.0.1", "--port", str(port),
               "--max-sessions", str(max(args.clients, 1)), "--device", "cpu", "--log-level", "WARNING"]
    if args.checkpoint:
        command += ["--checkpoint", str(args.checkpoint)]
    if args.cache_dir:
        command += ["--cache-dir", str(args.cache_dir)]
    with log_path.open("w") as log:
        server = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + READY_TIMEOUT_S
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise RuntimeError(f"the server exited with {server.returncode}: see {log_path}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=2) as response:
                if response.status == 200:
                    return server
        except OSError:
            pass
        time.sleep(0.2)
    server.kill()
    raise TimeoutError(f"the server was not ready after {READY_TIMEOUT_S:g} s")


async def talk(url: str, clips: list[np.ndarray], first: int, gap_s: float, until: float,
               generation: dict[str, Any], soak: Soak) -> None:
    """One client: utterances (clips in turn from ``first``) and silences in real time until ``until``."""
    silence = pcm_frames(np.zeros(int(RATE * gap_s), dtype=np.int16), RATE)
    turn = first
    while time.monotonic() < until:
        async with websockets.connect(url, max_size=None) as ws:
            await ws.send(json.dumps({"type": "session.start", "sample_rate": RATE, "generation": generation}))
            started = time.monotonic()
            collector = ReplyCollector(started, speed=1.0)
            receiver = asyncio.create_task(receive(ws, collector, soak))
            sent_s = 0.0  # audio sent, in seconds (a clip's last frame is shorter than the others)
            while time.monotonic() < until and not receiver.done():
                for frame in pcm_frames(clips[turn % len(clips)], RATE) + silence:
                    await ws.send(frame)
                    sent_s += len(frame) / 2 / RATE
                    delay = started + sent_s - time.monotonic()
                    if delay > 0:
                        await asyncio.sleep(delay)
                    if time.monotonic() >= until or receiver.done():
                        break
                turn += 1
            receiver.cancel()
            await asyncio.gather(receiver, return_exceptions=True)
            if time.monotonic() < until:
                soak.reconnects += 1
                await asyncio.sleep(1.0)


async def receive(ws: websockets.ClientConnection, collector: ReplyCollector, soak: Soak) -> None:
    """File the server's messages; each finished turn goes to ``soak`` as it ends."""
    async for message in ws:
        now = time.monotonic()
        collector.take(message, now)
        if isinstance(message, bytes):
            continue
        event = collector.result.events[-1]
        if event["type"] == "error":
            soak.errors.append(event)
        elif event["type"] == "response.interrupted":
            soak.interruptions += 1
        elif event["type"] == "response.done":
            turn = collector.turns[event["response_id"]]
            soak.turns.append((now, turn.latency_ms(turn.first_audio_at),
                               event["timings"]["end_of_speech_to_first_audio_ms"]))


def read_metrics(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        return response.read().decode()


def loop_lag(metrics: str) -> tuple[float, float, list[tuple[float, float]]]:
    """Sum and count of the loop-lag histogram and its cumulative buckets (bound, count)."""
    total = float(re.search(r"^vita_event_loop_lag_seconds_sum (\S+)", metrics, re.M).group(1))
    count = float(re.search(r"^vita_event_loop_lag_seconds_count (\S+)", metrics, re.M).group(1))
    buckets = [(float(bound), float(value)) for bound, value in LAG_BUCKET.findall(metrics)]
    return total, count, buckets


def percentile(values: list[float], q: float) -> float | None:
    return None if not values else round(float(np.percentile(values, q)), 1)


async def sample(process: psutil.Process, port: int, soak: Soak, started: float, until: float,
                 every_s: float) -> list[dict[str, Any]]:
    """One row every ``every_s`` until ``until``: server resources, loop lag and the window's turns."""
    rows = []
    previous = loop_lag(await asyncio.to_thread(read_metrics, port))
    seen_turns = 0
    while True:
        window_end = min(until, time.monotonic() + every_s)
        await asyncio.sleep(max(0.0, window_end - time.monotonic()))
        lag = loop_lag(await asyncio.to_thread(read_metrics, port))
        ticks = lag[1] - previous[1]
        worst = next((bound for (bound, count), (_, before) in zip(lag[2], previous[2]) if count - before >= ticks),
                     None) if ticks else None
        turns, seen_turns = soak.turns[seen_turns:], len(soak.turns)
        client = [c for _, c, _ in turns if c is not None]
        server = [s for _, _, s in turns if s is not None]
        rows.append(resources(process, time.monotonic() - started) | {
                "cpu_percent": process.cpu_percent(),
                "loop_lag_mean_ms": round((lag[0] - previous[0]) / ticks * 1000, 2) if ticks else None,
                "loop_lag_max_ms_at_most": None if worst is None else worst * 1000,
                "turns_done": len(turns),
                "client_first_audio_ms_p50": percentile(client, 50),
                "client_first_audio_ms_p95": percentile(client, 95),
                "server_first_audio_ms_p50": percentile(server, 50),
                "server_first_audio_ms_p95": percentile(server, 95),
                "errors_total": len(soak.errors),
        })
        previous = lag
        if time.monotonic() >= until:
            return rows


async def run(args: argparse.Namespace, port: int, process: psutil.Process) -> tuple[list[dict[str, Any]], Soak]:
    clips = load_clips(args.wav)
    url = f"ws://127.0.0.1:{port}/ws"
    generation = {"max_new_tokens": args.max_new_tokens, "temperature": 1.0, "top_p": 1.0,
                  "respect_not_addressed": False}
    soak = Soak()
    baseline = resources(process, 0.0) | {"before_clients": True}
    started = time.monotonic()
    until = started + args.duration_s
    process.cpu_percent()  # starts the CPU measurement
    clients = [asyncio.create_task(talk(url, clips, i, args.gap_s, until, generation, soak))
               for i in range(args.clients)]
    rows = await sample(process, port, soak, started, until, args.sample_s)
    results = await asyncio.gather(*clients, return_exceptions=True)
    failures = [repr(r) for r in results if isinstance(r, BaseException)]
    if failures:
        raise RuntimeError(f"clients failed: {failures}")
    await asyncio.sleep(args.settle_s)  # sessions closed: what they held should be released
    after = resources(process, time.monotonic() - started) | {"after_clients_left": True}
    return [baseline, *rows, after], soak


def resources(process: psutil.Process, t_s: float) -> dict[str, Any]:
    """RSS, open file descriptors and threads of the server process and its children (the worker
    process) now, summed."""
    rss = fds = threads = 0
    for member in [process, *process.children(recursive=True)]:
        with member.oneshot():
            rss, fds, threads = rss + member.memory_info().rss, fds + member.num_fds(), threads + member.num_threads()
    return {"t_s": round(t_s, 1), "rss_mib": round(rss / 2**20, 1), "open_fds": fds, "threads": threads}


def summarize(rows: list[dict[str, Any]], soak: Soak, warm_up_s: float) -> dict[str, Any]:
    """Growth of each resource from the end of the warm-up to the end, what is left after the clients
    (against before them), and turn latencies overall."""
    before, *during, after = rows
    steady = [r for r in during if r["t_s"] >= warm_up_s] or during
    minutes = max((steady[-1]["t_s"] - steady[0]["t_s"]) / 60, 1e-9)
    client = [c for _, c, _ in soak.turns if c is not None]
    server = [s for _, _, s in soak.turns if s is not None]
    lags = [r["loop_lag_mean_ms"] for r in during if r["loop_lag_mean_ms"] is not None]
    worst = [r["loop_lag_max_ms_at_most"] for r in during if r["loop_lag_max_ms_at_most"] is not None]
    return {
        "turns_done": len(soak.turns),
        "interruptions": soak.interruptions,
        "errors": len(soak.errors),
        "error_codes": sorted({e["code"] for e in soak.errors}),
        "reconnects": soak.reconnects,
        "rss_mib": {"before_clients": before["rss_mib"], "start": steady[0]["rss_mib"], "end": steady[-1]["rss_mib"],
                    "max": max(r["rss_mib"] for r in during), "after_clients_left": after["rss_mib"],
                    "growth_mib_per_min": round((steady[-1]["rss_mib"] - steady[0]["rss_mib"]) / minutes, 2)},
        "open_fds": {"before_clients": before["open_fds"], "start": steady[0]["open_fds"],
                     "end": steady[-1]["open_fds"], "max": max(r["open_fds"] for r in during),
                     "after_clients_left": after["open_fds"]},
        "threads": {"before_clients": before["threads"], "start": steady[0]["threads"], "end": steady[-1]["threads"],
                    "max": max(r["threads"] for r in during), "after_clients_left": after["threads"]},
        "loop_lag_ms": {"mean": round(float(np.mean(lags)), 2) if lags else None,
                        "worst_at_most": max(worst) if worst else None},
        "client_first_audio_ms": {"p50": percentile(client, 50), "p95": percentile(client, 95),
                                  "max": percentile(client, 100)},
        "server_first_audio_ms": {"p50": percentile(server, 50), "p95": percentile(server, 95),
                                  "max": percentile(server, 100)},
    }


def plot(report: dict[str, Any], path: Path) -> None:
    """Six panels over time: RSS, fds, threads, loop lag, first-audio latency, turns per window."""
    from matplotlib.figure import Figure

    rows = report["samples"][1:-1]  # while the clients talked
    t = [r["t_s"] / 60 for r in rows]

    def series(key: str) -> list[float]:
        return [np.nan if r[key] is None else r[key] for r in rows]

    fig = Figure(figsize=(14, 7.5), layout="constrained")
    axes = fig.subplots(2, 3).ravel()
    panels = [
        ("server RSS", "MiB", [("rss_mib", "RSS")]),
        ("open file descriptors", "fds", [("open_fds", "fds")]),
        ("threads", "threads", [("threads", "threads")]),
        ("gateway event-loop lag", "ms", [("loop_lag_mean_ms", "mean"), ("loop_lag_max_ms_at_most", "worst (bucket bound)")]),
        ("end of speech → first reply audio", "ms", [
            ("client_first_audio_ms_p50", "client p50"), ("client_first_audio_ms_p95", "client p95"),
            ("server_first_audio_ms_p50", "server p50"), ("server_first_audio_ms_p95", "server p95")]),
        (f"turns finished per {report['settings']['sample_s']:g} s", "turns", [("turns_done", "turns")]),
    ]
    for ax, (title, unit, keys) in zip(axes, panels):
        for key, label in keys:
            ax.plot(t, series(key), ".-", label=label)
        ax.set(title=title, ylabel=unit, xlabel="minutes", ylim=(0, None))
        ax.grid(alpha=0.3)
        if len(keys) > 1:
            ax.legend(fontsize=8)
    settings = report["settings"]
    fig.suptitle(f"soak: {settings['clients']} clients, {settings['duration_s']:g} s · {report['machine']['label']} · "
                 f"{report['model']}", fontsize=10)
    fig.savefig(path, dpi=100)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--duration-s", type=float, default=600.0)
    parser.add_argument("--sample-s", type=float, default=10.0, help="one row of measurements per this")
    parser.add_argument("--warm-up-s", type=float, help="growth is measured from here on (default: half the run)")
    parser.add_argument("--settle-s", type=float, default=3.0, help="wait after the clients left, then sample")
    parser.add_argument("--gap-s", type=float, default=6.0, help="silence after each utterance")
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--wav", type=Path, nargs="+", default=sorted(AUDIO_DIR.glob("*.wav")))
    parser.add_argument("--checkpoint", type=Path, help="server checkpoint (default: the tiny random one)")
    parser.add_argument("--cache-dir", type=Path, help="where the server generates the tiny checkpoint")
    parser.add_argument("--json", type=Path, required=True, help="results; the plot goes beside it (.png)")
    args = parser.parse_args(argv)
    if not args.wav:
        parser.error(f"no recordings found in {AUDIO_DIR}: pass --wav")
    if args.warm_up_s is None:
        args.warm_up_s = args.duration_s / 2
    args.json.parent.mkdir(parents=True, exist_ok=True)
    port = free_port()
    server = start_server(args, port, args.json.with_suffix(".server.log"))
    try:
        model = json.loads(urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=10).read())["model"]
        rows, soak = asyncio.run(run(args, port, psutil.Process(server.pid)))
    finally:
        server.terminate()
        server.wait(30)
    log_text = args.json.with_suffix(".server.log").read_text()
    report = {
        "machine": machine(None),
        "model": model,
        "settings": {k: (str(v) if isinstance(v, Path) else [str(p) for p in v] if k == "wav" else v)
                     for k, v in vars(args).items() if k not in ("json", "checkpoint", "cache_dir")},
        "server_log_errors": sum(" level=ERROR " in line or "Traceback" in line for line in log_text.splitlines()),
        "summary": summarize(rows, soak, args.warm_up_s),
        "samples": rows,
    }
    args.json.write_text(json.dumps(report, indent=2))
    plot(report, args.json.with_suffix(".png"))
    print(json.dumps(report["summary"], indent=2))
    print(f"server log errors: {report['server_log_errors']}; wrote {args.json} and {args.json.with_suffix('.png')}")


if __name__ == "__main__":
    main()
