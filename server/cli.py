"""``vita-server``: run the real-time gateway with uvicorn (settings from env ``VITA_*`` and flags)."""

from __future__ import annotations

import argparse
import ipaddress
import json
import logging
import os
import sys
from pathlib import Path
from typing import Any

import torch
import uvicorn

from server.app import WEBSOCKET_OPTIONS, create_app
from server.settings import ServerSettings
from server.worker import resolve_checkpoint
from server.worker_process import new_worker

# PyTorch's CPU convolutions (oneDNN) keep 1024 primitives by default, one per convolution and input
# shape, and the codec alone meets its 54 to 78 convolutions at every window length (1 to 60 frames)
# and kept range. With the default each window re-created its primitives: 54 to 60 ms a window
# against 31 to 40 ms with this many, in 24- and 32-client loads on the 2-core CPU (tiny codec in
# bfloat16, benchmarks/README.md), for about 150 MB more memory.
ONEDNN_PRIMITIVE_CACHE_CAPACITY = 16384


class JsonLinesFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message (and exception text)."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "time": self.formatTime(record, "%Y-%m-%dT%H:%M:%S"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, ensure_ascii=False)


def configure_logging(log_format: str, level: str) -> None:
    """Structured logs on stderr for our loggers and uvicorn's."""
    handler = logging.StreamHandler(sys.stderr)
    if log_format == "json":
        handler.setFormatter(JsonLinesFormatter())
    else:
        handler.setFormatter(logging.Formatter("time=%(asctime)s level=%(levelname)s logger=%(name)s %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())


def parse_args(argv: list[str] | None) -> dict[str, Any]:
    """Command-line flags that were given (the rest comes from env or defaults)."""
    parser = argparse.ArgumentParser(prog="vita-server", description=__doc__)
    parser.add_argument("--checkpoint", type=Path, help="VITA-1.5 checkpoint folder (default: tiny random one)")
    parser.add_argument("--cache-dir", type=Path, help="where the tiny checkpoint is generated")
    parser.add_argument("--host")
    parser.add_argument("--port", type=int)
    parser.add_argument("--device", help="cpu, cuda, cuda:1 ... (default auto: cuda when available)")
    parser.add_argument("--dtype", choices=["bfloat16", "float16"],
                        help="VITA model dtype (default bfloat16 on GPU, float32 on CPU; upstream runs float16)")
    parser.add_argument("--max-sessions", type=int)
    parser.add_argument("--idle-timeout-s", type=float)
    parser.add_argument("--handshake-timeout-s", type=float)
    parser.add_argument("--api-keys", help="comma-separated API keys; every websocket must bring one")
    parser.add_argument("--allowed-origins", help="comma-separated browser origins allowed besides the page's own")
    parser.add_argument("--max-connections-per-ip", type=int, help="open websockets per client address (0: no limit)")
    parser.add_argument("--cpu-threads", type=int, help="torch threads per operation on the CPU device (default 1)")
    parser.add_argument("--codec-dtype", choices=["auto", "float32", "bfloat16", "float16"],
                        help="TTS codec dtype (default auto: bfloat16 on a CPU with bf16 in hardware, else float32)")
    parser.add_argument("--vocoder-threads", type=int,
                        help="threads that vocode different utterances side by side on the CPU device (default 2)")
    parser.add_argument("--prefill-tokens-while-decoding", type=int,
                        help="while replies generate, a prefill forward of new turns takes at most this many "
                        "padded tokens (default 2048)")
    parser.add_argument("--tts-steps-per-call", type=int,
                        help="TTS decoder steps per call of its thread (CUDA: one graph, one read back; default 1)")
    parser.add_argument("--tts-admit-every-calls", type=int,
                        help="TTS prefills at most every this many decoder calls while utterances speak (default 1)")
    parser.add_argument("--tts-prefill-graphs", action=argparse.BooleanOptionalAction,
                        help="CUDA: TTS prefills from CUDA graphs (default off: on H200s lower p50, higher p95 at 64 clients)")
    parser.add_argument("--worker-process", action=argparse.BooleanOptionalAction,
                        help="the model worker in a child process (default) or a thread of the server process")
    parser.add_argument("--ssl-certfile", type=Path)
    parser.add_argument("--ssl-keyfile", type=Path)
    parser.add_argument("--log-format", choices=["json", "kv"])
    parser.add_argument("--log-level")
    args = vars(parser.parse_args(argv))
    return {name: value for name, value in args.items() if value is not None}


def is_loopback(host: str) -> bool:
    """Whether ``host`` only takes connections from this machine."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def banner(settings: ServerSettings, checkpoint: Path, is_tiny: bool) -> str:
    """What the server prints on start: its URL, device and checkpoint (and a warning if tiny)."""
    scheme = "https" if settings.ssl_certfile else "http"
    lines = [
        f"vita-server on {scheme}://{settings.host}:{settings.port}/ (websockets /ws and /v1/realtime), "
        f"device {settings.resolved_device()}, TTS codec in {str(settings.codec_torch_dtype()).removeprefix('torch.')}",
        f"checkpoint: {checkpoint}",
    ]
    if not is_loopback(settings.host) and not settings.api_keys:
        lines.append(
            f"WARNING: listening on {settings.host} without API keys: anyone who can reach this port can use the "
            "server. Set VITA_API_KEYS (and VITA_ALLOWED_ORIGINS for pages served elsewhere)."
        )
    if is_tiny:
        lines.append(
            "NOTE: no --checkpoint given: running the TINY RANDOM checkpoint; replies are random noise "
            "(text and audio). Pass --checkpoint /path/to/VITA1.5_ckpt for real answers."
        )
    return "\n".join(lines)


def configure_cpu(settings: ServerSettings) -> None:
    """On the CPU device: torch threads per operation, and oneDNN's primitive cache (unless the
    environment sizes it), set before the first convolution; a spawned worker process inherits it."""
    if settings.resolved_device() == "cpu":
        torch.set_num_threads(settings.cpu_threads)
        os.environ.setdefault("ONEDNN_PRIMITIVE_CACHE_CAPACITY", str(ONEDNN_PRIMITIVE_CACHE_CAPACITY))


def main(argv: list[str] | None = None) -> None:
    settings = ServerSettings(**parse_args(argv))
    configure_logging(settings.log_format, settings.log_level)
    checkpoint, is_tiny = resolve_checkpoint(settings)
    print(banner(settings, checkpoint, is_tiny), flush=True)
    configure_cpu(settings)
    app = create_app(settings, new_worker(settings, checkpoint, is_tiny))
    uvicorn.run(
        app,
        host=settings.host,
        port=settings.port,
        ssl_certfile=settings.ssl_certfile,
        ssl_keyfile=settings.ssl_keyfile,
        **WEBSOCKET_OPTIONS,
        timeout_graceful_shutdown=settings.shutdown_grace_s,
        log_config=None,
    )


if __name__ == "__main__":
    main()
