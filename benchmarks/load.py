"""Load test: N concurrent websocket clients stream speech in real time; latency of the replies.

Each client streams a recording (default en_hello.wav) ``--turns`` times, separated by
silence, and records end of speech -> first reply text and -> first reply audio, both as the
client sees it (from when its last voiced audio was sent: VAD hangover and network included)
and as the server reports it (from its end-of-turn decision). Runs against ``--url`` or starts
an embedded server (``--checkpoint``, default the tiny random one) on loopback.

    python -m benchmarks.load --clients 1,4,8 --turns 2 --json out/load.json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import numpy as np
import soundfile as sf
import torch

from server.background import BackgroundServer
from server.client import ClientResult, stream_audio
from server.settings import ServerSettings
from server.worker import resolve_checkpoint

MAX_CLIENTS = 64
MAX_DURATION_S = 600.0
DEFAULT_WAV = Path(__file__).resolve().parents[2] / "shared" / "audio" / "en_hello.wav"  # shared/ beside the checkout


def percentiles(values: list[float]) -> dict[str, float | None]:
    """p50, p90 and max of ``values`` (all None when there are none)."""
    if not values:
        return {"p50": None, "p90": None, "max": None}
    array = np.asarray(values)
    return {"p50": float(np.percentile(array, 50)), "p90": float(np.percentile(array, 90)), "max": float(array.max())}


def summarize(clients: int, results: list[ClientResult | BaseException], wall_s: float) -> dict[str, Any]:
    """Latency percentiles over all completed turns of one load level."""
    turns = [t for r in results if isinstance(r, ClientResult) for t in r.turns]
    done = [t for t in turns if t.done is not None]
    server = [t.done["timings"] for t in done]

    def server_values(name: str) -> dict[str, float | None]:
        return percentiles([s[name] for s in server if s[name] is not None])

    return {
        "clients": clients,
        "turns_done": len(done),
        "turns_interrupted": sum(t.done is None and t.interrupted for t in turns),  # barge-in: next utterance
        "turns_unfinished": sum(t.done is None and not t.interrupted for t in turns),
        "failed_clients": sum(isinstance(r, BaseException) for r in results),
        "errors": sum(len(r.of_type("error")) for r in results if isinstance(r, ClientResult)),
        "wall_s": round(wall_s, 2),
        "client_first_text_ms": percentiles([v for t in done if (v := t.latency_ms(t.first_text_at)) is not None]),
        "client_first_audio_ms": percentiles([v for t in done if (v := t.latency_ms(t.first_audio_at)) is not None]),
        "server_first_text_ms": server_values("end_of_speech_to_first_text_ms"),
        "server_first_audio_ms": server_values("end_of_speech_to_first_audio_ms"),
        "tts_real_time_factor": server_values("real_time_factor"),
    }


async def run_level(url: str, clients: int, audio: np.ndarray, rate: int, args: argparse.Namespace) -> dict[str, Any]:
    """``clients`` concurrent conversations of ``args.turns`` utterances each, summarised."""
    gap = np.zeros((int(rate * args.gap_s),) + audio.shape[1:], dtype=np.int16)
    conversation = np.concatenate([part for _ in range(args.turns) for part in (audio, gap)][:-1])
    update = {"generation": {"max_new_tokens": args.max_new_tokens, "respect_not_addressed": False}}
    started = time.monotonic()
    runs = [
        stream_audio(url, conversation, rate, session_update=update, expected_turns=args.turns,
                     reply_timeout_s=args.reply_timeout_s)
        for _ in range(clients)
    ]
    results = await asyncio.wait_for(asyncio.gather(*runs, return_exceptions=True), args.max_duration_s)
    return summarize(clients, results, time.monotonic() - started)


def fmt(stats: dict[str, float | None]) -> str:
    """``p50/p90/max`` in whole numbers, ``-`` where missing."""
    return "/".join("-" if stats[k] is None else f"{stats[k]:.0f}" for k in ("p50", "p90", "max"))


def table(levels: list[dict[str, Any]]) -> str:
    """One row per concurrency level, for the terminal."""
    header = (f"{'clients':>7} {'turns':>5} {'cut':>3} {'err':>3}  {'client text ms':>16} {'client audio ms':>16}  "
              f"{'server text ms':>16} {'server audio ms':>16}  {'tts rtf p50':>11}")
    rows = [header, "(turns = replies done, cut = interrupted by the next utterance, err = errors or unfinished;"
                    " latencies p50/p90/max from end of speech)"]
    for level in levels:
        rtf = level["tts_real_time_factor"]["p50"]
        rows.append(
            f"{level['clients']:>7} {level['turns_done']:>5} {level['turns_interrupted']:>3} "
            f"{level['errors'] + level['failed_clients'] + level['turns_unfinished']:>3}  "
            f"{fmt(level['client_first_text_ms']):>16} {fmt(level['client_first_audio_ms']):>16}  "
            f"{fmt(level['server_first_text_ms']):>16} {fmt(level['server_first_audio_ms']):>16}  "
            f"{'-' if rtf is None else f'{rtf:.3f}':>11}"
        )
    return "\n".join(rows)


def machine() -> dict[str, Any]:
    """Where the benchmark ran: OS, CPU count and GPU name."""
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    return {"platform": platform.platform(), "cpus": os.cpu_count(), "gpu": gpu}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", help="ws://host:port/ws of a running server (default: start one here)")
    parser.add_argument("--checkpoint", type=Path, help="checkpoint of the embedded server (default: tiny)")
    parser.add_argument("--cache-dir", type=Path, default=Path(".cache"), help="tiny checkpoint cache")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--clients", default="1,4", help="comma-separated concurrency levels")
    parser.add_argument("--turns", type=int, default=2, help="utterances per client")
    parser.add_argument("--gap-s", type=float, default=6.0, help="silence between utterances")
    parser.add_argument("--max-new-tokens", type=int, default=48)
    parser.add_argument("--wav", type=Path, default=DEFAULT_WAV)
    parser.add_argument("--reply-timeout-s", type=float, default=60.0)
    parser.add_argument("--max-duration-s", type=float, default=300.0, help="cap per concurrency level")
    parser.add_argument("--json", type=Path, help="write the results here")
    args = parser.parse_args()
    levels = [int(n) for n in args.clients.split(",")]
    if max(levels) > MAX_CLIENTS or args.max_duration_s > MAX_DURATION_S:
        parser.error(f"at most {MAX_CLIENTS} clients and {MAX_DURATION_S:g} s per level")
    audio, rate = sf.read(args.wav, dtype="int16")

    embedded = None
    if args.url is None:
        settings = ServerSettings(checkpoint=args.checkpoint, cache_dir=args.cache_dir, device=args.device,
                                  max_sessions=max(levels))
        checkpoint, is_tiny = resolve_checkpoint(settings)
        embedded = BackgroundServer(settings, checkpoint, is_tiny)
    with embedded or nullcontext():
        url = args.url or embedded.ws_url
        results = [asyncio.run(run_level(url, n, audio, rate, args)) for n in levels]
    print(table(results))
    report = {
        "machine": machine(),
        "server": args.url or f"embedded, checkpoint {embedded.worker.model_name}, device {args.device}",
        "wav": str(args.wav),
        "turns_per_client": args.turns,
        "max_new_tokens": args.max_new_tokens,
        "levels": results,
    }
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=2))
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
