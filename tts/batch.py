"""Continuous batching of TTS utterances: every open stream advances one codec token per decoder step.

Each `DecoderBatch.generate` call is one stream with its own cache slot, sampling settings and
random generator. A stream that needs a token while its buffer is empty runs one batched step for
all open streams, so streams consumed round-robin from one thread share every forward pass.
Closing a stream (or dropping it) frees its slot; slots and capacity grow on demand.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch

from tts.decoder import KVCache, LLM2TTSCodecAR


@dataclass
class Stream:
    """Decoding state of one utterance."""

    top_k: int
    max_tokens: int
    generator: torch.Generator | None
    last_token: int
    length: int  # cache positions filled
    sampled: int = 0
    finished: bool = False
    ready: deque[int] = field(default_factory=deque)


class DecoderBatch:
    """Shares decoder steps among the utterances being synthesised (single thread)."""

    def __init__(self, decoder: LLM2TTSCodecAR, slots: int = 4, capacity: int = 1536) -> None:
        weight = decoder.embedding.weight
        self.decoder = decoder
        self.cache = KVCache.empty(decoder.config, slots, capacity, weight.device, weight.dtype)
        self.streams: list[Stream | None] = [None] * slots

    @property
    def open_streams(self) -> int:
        return sum(stream is not None for stream in self.streams)

    def generate(
        self,
        text_embeddings: torch.Tensor,
        *,
        top_k: int = 2,
        max_tokens: int = 1000,
        generator: torch.Generator | None = None,
    ) -> Iterator[int]:
        """Yield codec tokens for `text_embeddings` [T, idim] until eos or `max_tokens` draws.
        `generator` is a CPU generator; it makes this stream's draws reproducible."""
        slot = self._free_slot(len(text_embeddings) + 1 + max_tokens)
        length = self.decoder.prefill(text_embeddings, self.cache, slot)
        stream = Stream(top_k, max_tokens, generator, last_token=self.decoder.config.sos_id, length=length)
        self.streams[slot] = stream
        try:
            while True:
                if stream.ready:
                    yield stream.ready.popleft()
                elif stream.finished:
                    return
                else:
                    self._step()
        finally:
            self.streams[slot] = None

    def _free_slot(self, positions: int) -> int:
        slots = self.cache.slots if None in self.streams else 2 * self.cache.slots
        capacity = max(self.cache.capacity, positions)
        if (slots, capacity) != (self.cache.slots, self.cache.capacity):
            self.cache = self.cache.resized(slots, capacity)
            self.streams += [None] * (slots - len(self.streams))
        return self.streams.index(None)

    def _step(self) -> None:
        """One decoder step for every unfinished stream; slots in between idle at position 0."""
        rows = [i for i, s in enumerate(self.streams) if s is not None and not s.finished]
        tokens = [self.decoder.config.pad_id] * (rows[-1] + 1)
        positions = [0] * (rows[-1] + 1)
        for i in rows:
            tokens[i], positions[i] = self.streams[i].last_token, self.streams[i].length
        logits = self.decoder.step(tokens, positions, self.cache)
        for top_k in {self.streams[i].top_k for i in rows}:
            group = [i for i in rows if self.streams[i].top_k == top_k]
            draws = self.decoder.sample(logits[group], top_k, [self.streams[i].generator for i in group])
            for i, token in zip(group, draws):
                self._advance(self.streams[i], token)

    def _advance(self, stream: Stream, token: int) -> None:
        stream.length += 1
        stream.sampled += 1
        stream.last_token = token
        if token == self.decoder.config.eos_id:
            stream.finished = True
            return
        stream.ready.append(token)
        stream.finished = stream.sampled == stream.max_tokens
