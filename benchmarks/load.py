"""Load test: N concurrent websocket clients stream speech in real time; latency of the replies.

Each client streams a recording (default en_hello.wav) ``--turns`` times, separated by
silence, and records end of speech -> first reply text and -> first reply audio, both as the
client sees it (from when its last voiced audio was sent: VAD hangover and network included)
and as the server reports it (from its end-of-turn decision), the server's TTS real-time
factor, the replies cut (interrupted, audio dropped, unfinished) and, through NVML, how busy
the GPU was and its peak memory during each level. Runs against ``--url`` (a server in another
process), against ``--replicas N`` CPU replicas (vita-server processes) it starts behind HAProxy
with docker/haproxy.cfg, or starts an embedded server (``--checkpoint``, default the tiny random
one) on loopback.

    python -m benchmarks.load --clients 1,4,8 --json out/load.json   # also writes out/load.png
    python -m benchmarks.load --replicas 2 --pin-cores --clients 4,8,16 --json out/load_2_replicas.json

With an embedded server on CUDA, ``--kernel-trace FILE`` records every CUDA kernel and copy of the
process (the server's threads too) during the last level, from ``--trace-delay-s`` after its clients
start for ``--trace-s``, as a Chrome trace that ``benchmarks/trace_summary.py`` sums up. The profiler
runs on the main thread, the one that imported torch first: Kineto records nothing when started from
another thread (seen on an H200).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import time
import urllib.request
import tempfile
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import numpy as np
import soundfile as sf
import torch

from benchmarks.gpu_monitor import GpuMonitor
from server.background import BackgroundServer
from server.client import ClientResult, stream_audio
from server.local_cluster import LocalCluster
from server.settings import ServerSettings
from server.worker import resolve_checkpoint

MAX_CLIENTS = 64
MAX_DURATION_S = 600.0
DEFAULT_WAV = Path(__file__).resolve().parents[2] / "shared" / "audio" / "en_hello.wav"  # shared/ beside the checkout
Stats = dict[str, float | None]
STAGES = ("started", "media_encoded", "first_token", "first_sentence", "speech_prefilled", "speech_first_window",
          "speech_vocoder_call", "speech_first_segment", "first_audio")  # TurnStageTimings


def percentiles(values: list[float]) -> Stats:
    """p50, p90, p95 and max of ``values`` (all None when there are none)."""
    if not values:
        return {"p50": None, "p90": None, "p95": None, "max": None}
    p50, p90, p95, top = (round(float(v), 3) for v in np.percentile(values, [50, 90, 95, 100]))
    return {"p50": p50, "p90": p90, "p95": p95, "max": top}


def summarize(clients: int, turns: int, results: list[ClientResult | BaseException], wall_s: float) -> dict[str, Any]:
    """Replies cut and latency percentiles over all finished replies of one load level."""
    finished = [r for r in results if isinstance(r, ClientResult)]
    replies = [t for r in finished for t in r.turns]
    done = [t for t in replies if t.done is not None]
    timings = [t.done["timings"] for t in done]
    never_started = sum(max(0, turns - len(r.turns)) for r in finished) + turns * (len(results) - len(finished))

    reply_gaps = [t.playback_gaps_s() for t in done]

    def server(name: str) -> Stats:
        return percentiles([s[name] for s in timings if s[name] is not None])

    return {
        "clients": clients,
        "replies_expected": clients * turns,
        "replies_done": len(done),
        "replies_interrupted": sum(t.interrupted for t in replies),  # barge-in (the next utterance) or other
        "replies_interrupted_generating": sum(t.interrupted and t.done is None for t in replies),
        "replies_audio_dropped": sum(t.dropped_segments > 0 for t in replies),  # the client read too slowly
        "segments_dropped": sum(t.dropped_segments for t in replies),
        "replies_unfinished": sum(t.done is None and not t.interrupted for t in replies) + never_started,
        "errors": sum(len(r.of_type("error")) for r in finished),
        "failed_clients": len(results) - len(finished),
        "wall_s": round(wall_s, 2),
        "client_first_text_ms": percentiles([v for t in done if (v := t.latency_ms(t.first_text_at)) is not None]),
        "client_first_audio_ms": percentiles([v for t in done if (v := t.latency_ms(t.first_audio_at)) is not None]),
        "server_first_text_ms": server("end_of_speech_to_first_text_ms"),
        "server_first_audio_ms": server("end_of_speech_to_first_audio_ms"),
        "tts_real_time_factor": server("real_time_factor"),
        # as heard by a player with the web page's 80 ms jitter buffer; gaps under 20 ms are not counted
        "replies_with_gaps": sum(any(g >= 0.02 for g in gaps) for gaps in reply_gaps),
        "reply_gaps_ms": percentiles([1000 * sum(gaps) for gaps in reply_gaps]),
        "server_stages_ms": {  # a server of an older version may lack a stage
            stage: percentiles([v for s in timings if s.get("stages") and (v := s["stages"].get(f"{stage}_ms")) is not None])
            for stage in STAGES
        },
    }


async def run_level(url: str, clients: int, audio: np.ndarray, rate: int, args: argparse.Namespace,
                    traced: bool = False) -> dict[str, Any]:
    """``clients`` concurrent conversations of ``args.turns`` utterances each, summarised; ``traced``:
    with ``args.kernel_trace`` recorded meanwhile."""
    gap = np.zeros((int(rate * args.gap_s),) + audio.shape[1:], dtype=np.int16)
    update = {"generation": {"max_new_tokens": args.max_new_tokens, "respect_not_addressed": False,
                             "temperature": args.temperature, "top_p": 1.0}}
    if args.speculative_ms is not None:
        update["vad"] = {"speculative_ms": args.speculative_ms}
    started = time.monotonic()
    if args.started_file:
        args.started_file.touch()  # for tools that act at a time into the level (benchmarks/gpu_load.sh)

    def conversation(index: int) -> np.ndarray:
        """Client ``index``'s utterances with the gaps between them; with ``args.vary_speech`` each
        utterance is the clip cut to its own random share of 1 - vary_speech to 1 of its length."""
        rng = np.random.default_rng(index)
        shares = rng.uniform(1.0 - args.vary_speech, 1.0, args.turns)
        utterances = [audio[: int(len(audio) * share)] for share in shares]
        return np.concatenate([part for utterance in utterances for part in (utterance, gap)][:-1])

    async def client(index: int) -> ClientResult:
        await asyncio.sleep(index * args.stagger_s / clients)
        return await stream_audio(url, conversation(index), rate, session_update=update, expected_turns=args.turns,
                                  reply_timeout_s=args.reply_timeout_s)

    runs = [client(i) for i in range(clients)]
    tracing = asyncio.create_task(record_kernels(args.trace_delay_s, args.trace_s)) if traced else None
    results = await asyncio.wait_for(asyncio.gather(*runs, return_exceptions=True), args.max_duration_s)
    wall_s = time.monotonic() - started
    if tracing is not None:
        (await tracing).export_chrome_trace(str(args.kernel_trace))  # after the level: the export takes seconds
        print(f"wrote {args.kernel_trace}")
    return summarize(clients, args.turns, results, wall_s)


async def record_kernels(delay_s: float, seconds: float) -> torch.profiler.profile:
    """The process's CUDA activity from ``delay_s`` for ``seconds`` (call on the main thread)."""
    await asyncio.sleep(delay_s)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as trace:
        await asyncio.sleep(seconds)
    return trace


def fmt(stats: Stats, keys: tuple[str, ...] = ("p50", "p95"), digits: int = 0) -> str:
    """``stats`` values joined by ``/``, ``-`` where missing."""
    return "/".join("-" if stats[k] is None else f"{stats[k]:.{digits}f}" for k in keys)


def table(levels: list[dict[str, Any]]) -> str:
    """One row per concurrency level, for the terminal."""
    rows = [
        f"{'clients':>7} {'done':>7} {'int':>3} {'drop':>4} {'unf':>3} {'err':>3}  {'srv text ms':>11} "
        f"{'srv audio ms':>16} {'cli audio ms':>16}  {'tts rtf':>9} {'gaps':>5} {'gap ms':>9}  {'gpu busy %':>10} {'gpu GiB':>7}",
        "(done = replies finished / expected; int = interrupted (barge-in by the next utterance or other), "
        "drop = audio dropped (client read too slowly), unf = unfinished, err = errors + failed clients;",
        " srv ms from the VAD's end-of-turn decision, cli ms from the end of voiced audio sent, p50/p95/max; "
        "tts rtf p50/p90; gaps = finished replies heard with a gap (80 ms jitter buffer), gap ms = silence "
        "inside a reply p50/p90; gpu busy mean/p95 and peak memory, whole device)",
    ]
    for level in levels:
        busy = {"p50": level["gpu_busy_mean_pct"], "p95": level["gpu_busy_p95_pct"]}
        memory = level["gpu_memory_peak_gib"]
        done = f"{level['replies_done']}/{level['replies_expected']}"
        rows.append(
            f"{level['clients']:>7} {done:>7} "
            f"{level['replies_interrupted']:>3} {level['replies_audio_dropped']:>4} {level['replies_unfinished']:>3} "
            f"{level['errors'] + level['failed_clients']:>3}  {fmt(level['server_first_text_ms']):>11} "
            f"{fmt(level['server_first_audio_ms'], ('p50', 'p95', 'max')):>16} "
            f"{fmt(level['client_first_audio_ms'], ('p50', 'p95', 'max')):>16}  "
            f"{fmt(level['tts_real_time_factor'], ('p50', 'p90'), 2):>9} {level['replies_with_gaps']:>5} "
            f"{fmt(level['reply_gaps_ms'], ('p50', 'p90')):>9}  {fmt(busy):>10} "
            f"{'-' if memory is None else f'{memory:.1f}':>7}"
        )
    return "\n".join(rows)


def stage_table(levels: list[dict[str, Any]]) -> str:
    """Where a reply's time goes: each pipeline stage's p50/p95 in ms from the end of speech (negative =
    reached before it, by a speculative turn), one row per concurrency level."""
    widths = [max(12, len(stage)) for stage in STAGES]
    rows = [f"{'clients':>7} " + " ".join(f"{stage:>{w}}" for stage, w in zip(STAGES, widths)),
            "(worker turn pipeline stages, ms from the VAD's end-of-turn decision, p50/p95)"]
    for level in levels:
        rows.append(f"{level['clients']:>7} " + " ".join(
            f"{fmt(level['server_stages_ms'][s]):>{w}}" for s, w in zip(STAGES, widths)))
    return "\n".join(rows)


def plot(report: dict[str, Any], path: Path) -> None:
    """Latency percentiles, TTS RTF and replies heard with gaps against clients, three panels, to
    ``path`` (needs matplotlib)."""
    try:
        from matplotlib.figure import Figure
    except ImportError:
        print("matplotlib is not installed (pip install -e '.[bench]'): no plot")
        return
    levels = report["levels"]
    clients = [level["clients"] for level in levels]

    def series(key: str, q: str) -> list[float]:
        return [np.nan if level[key][q] is None else level[key][q] for level in levels]

    fig = Figure(figsize=(16, 4.8), layout="constrained")
    latency, rtf, gaps = fig.subplots(1, 3)
    for key, label, color in (("server_first_audio_ms", "server end of turn", "C0"),
                              ("client_first_audio_ms", "client end of speech", "C1")):
        for q, style in (("p50", "o-"), ("p95", "s--")):
            latency.plot(clients, series(key, q), style, color=color, label=f"{label} → first audio {q}")
    for q, style in (("p50", "o-"), ("p90", "s--")):
        rtf.plot(clients, series("tts_real_time_factor", q), style, color="C2", label=f"TTS RTF {q}")
    rtf.axhline(1.0, color="C3", linewidth=1, label="real time (1.0)")
    with_gaps = [100 * level.get("replies_with_gaps", np.nan) / level["replies_done"] if level["replies_done"] else np.nan
                 for level in levels]  # results written before the gap columns have none
    gaps.plot(clients, with_gaps, "o-", color="C4", label="finished replies heard with a gap ≥ 20 ms")
    latency.set(ylabel="ms", title="time to first reply audio", ylim=(0, None))
    rtf.set(ylabel="synthesis time / audio duration", title="TTS real-time factor", ylim=(0, None))
    gaps.set(ylabel="% of finished replies", title="gaps heard (80 ms jitter buffer)", ylim=(0, 100))
    for ax in (latency, rtf, gaps):
        ax.set_xscale("log", base=2)
        ax.set_xticks(clients, [str(n) for n in clients])
        ax.minorticks_off()
        ax.set_xlabel("concurrent clients")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(f"{report['machine']['label']} · {report['model']}\n{report['turns_per_client']} turns per client, "
                 f"max_new_tokens {report['max_new_tokens']}", fontsize=10)
    fig.savefig(path, dpi=110)
    print(f"wrote {path}")


def cpu_model() -> str:
    """The CPU's model name (Linux /proc/cpuinfo), else what ``platform`` knows."""
    cpuinfo = Path("/proc/cpuinfo")
    lines = cpuinfo.read_text().splitlines() if cpuinfo.exists() else []
    names = [line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")]
    return names[0] if names else platform.processor() or platform.machine()


def machine(gpu: str | None) -> dict[str, Any]:
    """Where the benchmark ran: OS, CPU, GPU and a one-line label (the GPU, else the CPU)."""
    gpu = gpu or (torch.cuda.get_device_name(0) if torch.cuda.is_available() else None)
    cpu = f"{cpu_model()}, {os.cpu_count()} cores"
    return {"label": gpu or f"CPU: {cpu}", "platform": platform.platform(), "cpu": cpu, "gpu": gpu}


def server_model(ws_url: str) -> str:
    """The model a running server reports on /readyz (ws://host:port/ws -> http://host:port/readyz)."""
    http = ws_url.replace("ws", "http", 1).rsplit("/", 1)[0]
    with urllib.request.urlopen(f"{http}/readyz", timeout=10) as response:
        return json.loads(response.read())["model"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", help="ws://host:port/ws of a running server (default: start one here)")
    parser.add_argument("--replicas", type=int, help="start this many CPU replicas behind HAProxy and run through it")
    parser.add_argument("--pin-cores", action="store_true", help="with --replicas: replica i runs on CPU core i alone")
    parser.add_argument("--checkpoint", type=Path, help="checkpoint of the embedded server or replicas (default: tiny)")
    parser.add_argument("--cache-dir", type=Path, default=Path(".cache"), help="tiny checkpoint cache")
    parser.add_argument("--device", default="cpu", help="device of the embedded server")
    parser.add_argument("--gpu-index", type=int, default=0, help="NVML index of the GPU to sample")
    parser.add_argument("--clients", default="1,4", help="comma-separated concurrency levels")
    parser.add_argument("--turns", type=int, default=3, help="utterances per client")
    parser.add_argument("--gap-s", type=float, default=6.0, help="silence between utterances")
    parser.add_argument("--stagger-s", type=float, default=0.0,
                        help="client i starts i/N of this later (0: all at once, every turn ends in the same burst)")
    parser.add_argument("--vary-speech", type=float, default=0.0,
                        help="cut each utterance to a random 1 - F to 1 of the clip's length, its own per client and "
                             "turn, so that turns differ in length as real ones do (0: the whole clip every time)")
    parser.add_argument("--speculative-ms", type=int, help="the sessions' vad.speculative_ms (default: the server's)")
    parser.add_argument("--temperature", type=float, default=1.0,
                        help="sampling temperature (random weights: sampling keeps replies varied, so they read "
                             "as sentences; 0 = greedy)")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--wav", type=Path, default=DEFAULT_WAV)
    parser.add_argument("--reply-timeout-s", type=float, default=60.0)
    parser.add_argument("--max-duration-s", type=float, default=300.0, help="cap per concurrency level")
    parser.add_argument("--started-file", type=Path, help="touch this file as each level's clients start")
    parser.add_argument("--json", type=Path, help="write the results here, and the plot beside it (.png)")
    parser.add_argument("--kernel-trace", type=Path, help="embedded CUDA server: the last level's kernel trace here")
    parser.add_argument("--trace-delay-s", type=float, default=4.5, help="trace from this long after the clients start")
    parser.add_argument("--trace-s", type=float, default=4.0, help="for this long")
    args = parser.parse_args()
    levels = [int(n) for n in args.clients.split(",")]
    if max(levels) > MAX_CLIENTS or args.max_duration_s > MAX_DURATION_S:
        parser.error(f"at most {MAX_CLIENTS} clients and {MAX_DURATION_S:g} s per level")
    if args.kernel_trace and (args.url or args.replicas or not args.device.startswith("cuda")):
        parser.error("--kernel-trace needs the embedded server on CUDA (the trace covers this process)")
    audio, rate = sf.read(args.wav, dtype="int16")

    embedded = cluster = None
    if args.url is None:
        settings = ServerSettings(checkpoint=args.checkpoint, cache_dir=args.cache_dir, device=args.device,
                                  max_sessions=max(levels),
                                  worker_process=not args.kernel_trace)  # a trace sees only this process
        checkpoint, is_tiny = resolve_checkpoint(settings)
        if args.replicas:
            logs = Path(tempfile.mkdtemp(prefix="vita-lb-"))
            print(f"replica and haproxy logs in {logs}")
            cluster = LocalCluster(checkpoint, [max(levels)] * args.replicas, logs, pin_cores=args.pin_cores)
        else:
            embedded = BackgroundServer(settings, checkpoint, is_tiny)
    results, gpu_name = [], None
    with embedded or cluster or nullcontext():
        url = args.url or (cluster.balancer.ws_url if cluster else embedded.ws_url)
        model = embedded.worker.model_name if embedded else server_model(
            f"ws://{cluster.replicas[0].address}/ws" if cluster else url)
        for index, clients in enumerate(levels):
            load_before = os.getloadavg()[0]
            traced = args.kernel_trace is not None and index == len(levels) - 1
            with GpuMonitor(args.gpu_index) as gpu:
                level = asyncio.run(run_level(url, clients, audio, rate, args, traced))
            # the machine's 1-minute load average before and after: other work on a shared machine shows here
            results.append(level | gpu.summary() | {"load_average_1m": [load_before, os.getloadavg()[0]]})
            gpu_name = gpu.name
    print(table(results))
    print(stage_table(results))
    report = {
        "machine": machine(gpu_name),
        "server": args.url or (f"HAProxy (docker/haproxy.cfg) in front of {args.replicas} CPU replicas, each in its "
                               f"own process{', replica i on core i alone' if args.pin_cores else ''}"
                               if cluster else f"embedded, device {args.device}"),
        "model": model,
        "wav": str(args.wav),
        "turns_per_client": args.turns,
        "gap_s": args.gap_s,
        "max_new_tokens": args.max_new_tokens,
        "temperature": args.temperature,
        "speculative_ms": args.speculative_ms,
        "stagger_s": args.stagger_s,
        "vary_speech": args.vary_speech,
        "levels": results,
    }
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=2))
        print(f"wrote {args.json}")
        plot(report, args.json.with_suffix(".png"))


if __name__ == "__main__":
    main()
