"""Capturing a CUDA graph as `torch.cuda.graphs` asks: a warm-up run on a side stream, then the capture.

Used by every graph of the project: the LLM's decode step, the TTS decoder's steps and prefills, and
the codec's windows.

Each owner (the engine, the TTS decoder, the codec) warms up and captures its graphs on a capture
stream of its own, no two owners on the same CUDA stream. PyTorch (2.11) keeps a cuBLAS workspace
per (thread's handle, stream), and a captured GEMM keeps the address of its capture stream's
workspace: graphs captured on one stream by one thread share a workspace (pytorch/pytorch#193402).
`torch.cuda.graph` given no stream captures every graph of the process on one default capture
stream, so the engine's decode graphs and the TTS decoder's graphs, all captured by the worker
thread but replayed by two threads at once, shared one workspace: two GEMMs could write it
together. (On an H200 at 64 clients the TTS prefill graphs, whose GEMMs are the largest, hung the
GPU or ended in an illegal memory access: benchmarks/README.md, call 13.) `torch.cuda.Stream()`
hands out streams round-robin from a pool of 32, so owners' streams are checked to differ. Warming
up on the capture stream itself also makes its workspace an ordinary allocation rather than one
inside a graph's private pool.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

import torch

Output = TypeVar("Output")

_capture_streams: dict[tuple[str, torch.device], torch.cuda.Stream] = {}


def capture_stream(owner: str, device: torch.device) -> torch.cuda.Stream:
    """The stream `owner`'s graphs are warmed up and captured on: always the same one for `owner`,
    and a CUDA stream no other owner's graphs use."""
    key = (owner, torch.device(device))
    if key not in _capture_streams:
        taken = {stream.cuda_stream for (_, other), stream in _capture_streams.items() if other == key[1]}
        stream = torch.cuda.Stream(key[1])
        while stream.cuda_stream in taken:  # the pool's next stream is another owner's: take the one after
            stream = torch.cuda.Stream(key[1])
        _capture_streams[key] = stream
    return _capture_streams[key]


def capture(run: Callable[[], Output], owner: str, device: torch.device, pool: tuple[int, int],
            capture_error_mode: str = "global") -> tuple[torch.cuda.CUDAGraph, Output]:
    """Run `run` once on `owner`'s capture stream (lazy initialisation, cuDNN plans, the cuBLAS
    workspace), then capture it there into a graph that allocates from memory pool `pool`. Returns
    the graph and what the captured run returned: its static outputs, which every replay overwrites.
    `capture_error_mode="thread_local"` lets other threads launch CUDA work during the capture; with
    "global" none may."""
    stream = capture_stream(owner, device)
    stream.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(stream):
        run()
    torch.cuda.current_stream(device).wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, pool=pool, stream=stream, capture_error_mode=capture_error_mode):
        output = run()
    return graph, output
