"""The codec's decode replayed from CUDA graphs, one per (batch, length, kept frames) the vocoder meets most.

An eager codec call launches hundreds of small kernels from Python. Beside the LLM engine and the TTS
decoder in other threads of the process, that made the vocoder thread the pipeline's bottleneck
(64 clients on an H200, full-size weights: 174 ms per call of 35 windows, the thread 94 % busy while
the GPU was busy 30 % of the time). A graph replays the same kernels with one launch.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable

import torch

from layers.cuda_graphs import capture
from tts.codec import TiCodec
from tts.config import CODEC_FRAME_SAMPLES

Shape = tuple[int, int, tuple[int, int]]  # (batch, length, kept frames [start, stop))


class CodecGraphs:
    """`decode` gives `TiCodec.decode`'s audio: replayed from the graph of the codes' batch and length
    whose kept frames are the fewest that hold the ones asked for, eagerly otherwise (on CUDA the
    whole window, a shape planned at start-up, then cut). A graph's audio is its static output,
    overwritten by the next replay of that shape: read it (copy it) before the next call. One thread
    only."""

    def __init__(self, codec: TiCodec) -> None:
        self.codec = codec
        # (batch, length) -> kept frames -> (graph, its codes, its audio)
        self._graphs: defaultdict[tuple[int, int], dict[tuple[int, int], tuple]] = defaultdict(dict)

    @property
    def shapes(self) -> set[Shape]:
        """The (batch, length, kept frames) replayed from a graph."""
        return {(*size, keep) for size, by_keep in self._graphs.items() for keep in by_keep}

    def capture(self, shapes: Iterable[Shape]) -> None:
        """Capture a graph for each (batch, length, kept frames) of codes (the codec must be on CUDA).
        Run it in the thread that will call `decode`: cuDNN plans the convolutions in the warm-up run,
        and PyTorch keeps those plans per thread. Other threads may launch CUDA work meanwhile."""
        device = self.codec.global_tokens.device
        pool = torch.cuda.graph_pool_handle()  # graphs replay one at a time, so they share one pool
        for batch, length, keep in sorted(set(shapes) - self.shapes):
            codes = torch.zeros(batch, length, dtype=torch.long, device=device)
            graph, audio = capture(lambda: self.codec.decode(codes, keep), "codec", device, pool,
                                   capture_error_mode="thread_local")
            self._graphs[(batch, length)][keep] = (graph, codes, audio)

    def decode(self, codes: torch.Tensor, keep: tuple[int, int] | None = None) -> torch.Tensor:
        """codes [B, T] -> audio of frames `keep` (default all) on the codec's device (see the class
        docstring)."""
        start, stop = (0, codes.shape[1]) if keep is None else keep
        graphs = self._graphs.get(tuple(codes.shape)) if codes.dim() == 2 else None
        holding = [k for k in graphs or () if k[0] <= start and stop <= k[1]]
        if not holding:
            if self.codec.global_tokens.is_cuda:
                audio = self.codec.decode(codes)
                return audio[:, start * CODEC_FRAME_SAMPLES : stop * CODEC_FRAME_SAMPLES]
            return self.codec.decode(codes, keep)
        graph_keep = min(holding, key=lambda k: k[1] - k[0])
        graph, static_codes, audio = graphs[graph_keep]
        static_codes.copy_(codes, non_blocking=True)
        graph.replay()
        first = (start - graph_keep[0]) * CODEC_FRAME_SAMPLES
        return audio[:, first : first + (stop - start) * CODEC_FRAME_SAMPLES]
