"""The codec's decode replayed from CUDA graphs, one per (batch, length) shape the vocoder meets most.

An eager codec call launches hundreds of small kernels from Python. Beside the LLM engine and the TTS
decoder in other threads of the process, that made the vocoder thread the pipeline's bottleneck
(64 clients on an H200, full-size weights: 174 ms per call of 35 windows, the thread 94 % busy while
the GPU was busy 30 % of the time). A graph replays the same kernels with one launch.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

from layers.cuda_graphs import capture
from tts.codec import TiCodec


class CodecGraphs:
    """`decode` gives `TiCodec.decode`'s audio: replayed from a graph captured for the codes' shape,
    eagerly for other shapes. A graph's audio is its static output, overwritten by the next replay of
    that shape: read it (copy it) before the next call. One thread only."""

    def __init__(self, codec: TiCodec) -> None:
        self.codec = codec
        self._graphs: dict[tuple[int, int], tuple[torch.cuda.CUDAGraph, torch.Tensor, torch.Tensor]] = {}

    @property
    def shapes(self) -> set[tuple[int, int]]:
        """The (batch, length) shapes replayed from a graph."""
        return set(self._graphs)

    def capture(self, shapes: Iterable[tuple[int, int]]) -> None:
        """Capture a graph for each (batch, length) of codes (the codec must be on CUDA). Run it in the
        thread that will call `decode`: cuDNN plans the convolutions in the warm-up run, and PyTorch
        keeps those plans per thread. Other threads may launch CUDA work meanwhile."""
        device = self.codec.global_tokens.device
        pool = torch.cuda.graph_pool_handle()  # graphs replay one at a time, so they share one pool
        for batch, length in sorted(set(shapes) - self.shapes):
            codes = torch.zeros(batch, length, dtype=torch.long, device=device)
            graph, audio = capture(lambda: self.codec.decode(codes), "codec", device, pool,
                                   capture_error_mode="thread_local")
            self._graphs[(batch, length)] = (graph, codes, audio)

    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        """codes [B, T] -> audio [B, T * 600] on the codec's device (see the class docstring)."""
        entry = self._graphs.get((codes.shape[0], codes.shape[1])) if codes.dim() == 2 else None
        if entry is None:
            return self.codec.decode(codes)
        graph, static_codes, audio = entry
        static_codes.copy_(codes, non_blocking=True)
        graph.replay()
        return audio
