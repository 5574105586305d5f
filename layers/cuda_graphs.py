"""Capturing a CUDA graph as `torch.cuda.graphs` asks: a warm-up run on a side stream, then the capture.

Used by every graph of the project: the LLM's decode step, the TTS decoder's steps and prefills, and
the codec's windows.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

import torch

Output = TypeVar("Output")


def capture(run: Callable[[], Output], device: torch.device, pool: tuple[int, int],
            capture_error_mode: str = "global") -> tuple[torch.cuda.CUDAGraph, Output]:
    """Run `run` once on a side stream (lazy initialisation, cuDNN plans), then capture it into a graph
    that allocates from memory pool `pool`. Returns the graph and what the captured run returned: its
    static outputs, which every replay overwrites. `capture_error_mode="thread_local"` lets other
    threads launch CUDA work during the capture; with "global" none may."""
    side = torch.cuda.Stream(device)
    side.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(side):
        run()
    torch.cuda.current_stream(device).wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, pool=pool, capture_error_mode=capture_error_mode):
        output = run()
    return graph, output
