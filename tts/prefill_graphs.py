"""TTS prefills replayed from CUDA graphs: one graph per bucket of (sentences, text rows).

An eager prefill of the decoder launches about 300 small operations (6 layers); on an H200 a call
took 11 to 19 ms with the GPU mostly idle and up to 33 ms in a 64-client burst, and every one stops
the decoder thread's steps for all open utterances (benchmarks/README.md). A graph replay launches
them at once. Each graph runs `LLM2TTSCodecAR.prefill_padded` on static inputs: texts zero-padded
to the bucket's width, one row per sentence, rows past the sentences prefilling one row into a
scratch slot no stream uses. Texts wider than the widest bucket, or more sentences than the largest
batch bucket, take the eager path. The graphs have a memory pool of their own (the step graphs
have theirs), and are all captured at start-up: a capture while other threads launch CUDA work fails.
"""

from __future__ import annotations

import torch
from torch.nn.utils.rnn import pad_sequence

from layers.cuda_graphs import capture
from layers.host_copy import to_device
from layers.kv_cache import KVCache
from layers.shapes import padded
from tts.decoder import LLM2TTSCodecAR

WIDTHS = (64, 128, 256)  # text rows a graph takes (4 rows a token: sentences of up to 64 tokens)
TTS_GRAPHS = "tts_decoder"  # capture owner of the decoder's step and prefill graphs (one thread replays both)


class _PrefillGraph:
    """`prefill_padded` for `rows` texts of up to `width` rows, captured once, fed through static inputs."""

    def __init__(self, decoder: LLM2TTSCodecAR, cache: KVCache, rows: int, width: int, scratch_slot: int,
                 pool: tuple[int, int]) -> None:
        device = cache.device
        self.x = torch.zeros(rows, width, decoder.config.idim, device=device, dtype=cache.dtype)
        self.meta = torch.ones(2, rows, dtype=torch.long, device=device)  # lengths, slot ids
        self.meta[1] = self.scratch_slot = scratch_slot
        self.graph, _ = capture(lambda: decoder.prefill_padded(self.x, self.meta[0], cache, self.meta[1]),
                                TTS_GRAPHS, device, pool)

    def __call__(self, texts: list[torch.Tensor], slots: list[int]) -> None:
        padding = self.x.shape[0] - len(texts)
        self.meta.copy_(to_device([[len(t) for t in texts] + [1] * padding, slots + [self.scratch_slot] * padding],
                                  self.x.device))
        rows = pad_sequence(texts, batch_first=True)
        self.x.zero_()
        self.x[: len(texts), : rows.shape[1]].copy_(rows)
        self.graph.replay()


class PrefillGraphs:
    """The prefill graphs of one decoder and cache, whose slot `scratch_slot` no stream uses."""

    def __init__(self, decoder: LLM2TTSCodecAR, cache: KVCache, batches: tuple[int, ...], scratch_slot: int) -> None:
        self.decoder, self.cache, self.scratch_slot = decoder, cache, scratch_slot
        self.batches = batches
        self.widths = tuple(width for width in WIDTHS if width + 1 <= cache.max_len)
        self._graphs: dict[tuple[int, int], _PrefillGraph] = {}
        self._pool = torch.cuda.graph_pool_handle()

    def capture(self) -> None:
        """Capture every bucket's graph (no other thread may launch CUDA work meanwhile)."""
        with torch.no_grad():
            for rows in self.batches:
                for width in self.widths:
                    self._graphs[rows, width] = _PrefillGraph(self.decoder, self.cache, rows, width,
                                                              self.scratch_slot, self._pool)

    def fits(self, texts: list[torch.Tensor]) -> bool:
        """Whether a captured graph takes these texts."""
        return (bool(self._graphs) and len(texts) <= self.batches[-1]
                and max(len(t) for t in texts) <= self.widths[-1])

    def prefill(self, texts: list[torch.Tensor], slots: list[int]) -> None:
        """`LLM2TTSCodecAR.prefill_many` of texts that `fit`, from the smallest graph that takes them."""
        graph = self._graphs[padded(len(texts), self.batches), padded(max(len(t) for t in texts), self.widths)]
        graph(texts, slots)
