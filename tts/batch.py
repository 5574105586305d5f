"""Continuous batching of TTS utterances: every open stream advances one codec token per decoder step.

`DecoderBatch.generate` queues an utterance (no model work, so any thread may call it) and returns
its token iterator. Whenever a stream needs a token and has none buffered, the batch admits the
queued utterances (prefill into a free cache slot) and runs one decoder step for all open streams,
buffering each one's token. Streams consumed round-robin from one thread thus share every forward
pass, and utterances queued together start together. Each stream has its own sampling settings
and random generator. Closing or dropping a stream frees its slot; slots and capacity grow on demand.
"""

from __future__ import annotations

import weakref
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch

from tts.decoder import KVCache, LLM2TTSCodecAR


@dataclass(eq=False)
class Stream:
    """Decoding state of one utterance."""

    text_embeddings: torch.Tensor | None  # dropped once prefilled
    top_k: int
    max_tokens: int
    generator: torch.Generator | None
    last_token: int = -1
    length: int = 0  # cache positions filled
    sampled: int = 0
    finished: bool = False
    cancelled: bool = False
    ready: deque[int] = field(default_factory=deque)


class DecoderBatch:
    """Shares decoder steps among the utterances being synthesised (steps run in one thread)."""

    def __init__(self, decoder: LLM2TTSCodecAR, slots: int = 4, capacity: int = 1536) -> None:
        weight = decoder.embedding.weight
        self.decoder = decoder
        self.cache = KVCache.empty(decoder.config, slots, capacity, weight.device, weight.dtype)
        self.streams: list[Stream | None] = [None] * slots
        self.queued: deque[Stream] = deque()

    @property
    def open_streams(self) -> int:
        """Utterances queued or decoding that nobody has cancelled."""
        return sum(not s.cancelled for s in [*self.queued, *self.streams] if s is not None)

    def generate(
        self,
        text_embeddings: torch.Tensor,
        *,
        top_k: int = 2,
        max_tokens: int = 1000,
        generator: torch.Generator | None = None,
    ) -> Iterator[int]:
        """Queue `text_embeddings` [T, idim]; the iterator yields its codec tokens until eos or
        `max_tokens` draws. `generator` is a CPU generator; it makes this stream's draws reproducible."""
        if max_tokens < 1 or top_k < 1:
            raise ValueError("max_tokens and top_k must be at least 1")
        stream = Stream(text_embeddings, top_k, max_tokens, generator)
        self.queued.append(stream)
        tokens = self._tokens(stream)
        weakref.finalize(tokens, self.cancel, stream)  # also if the iterator is dropped unstarted
        return tokens

    @staticmethod
    def cancel(stream: Stream) -> None:
        """Stop decoding `stream` (any thread); its slot is freed at the next step."""
        stream.cancelled = True

    def _tokens(self, stream: Stream) -> Iterator[int]:
        try:
            while True:
                if stream.ready:
                    yield stream.ready.popleft()
                elif stream.finished:
                    return
                else:
                    self._step()
        finally:
            self.cancel(stream)

    def _admit(self) -> None:
        """Free the slots of cancelled streams, then prefill the queued utterances."""
        self.streams = [None if s is not None and s.cancelled else s for s in self.streams]
        while self.queued:
            stream = self.queued.popleft()
            if stream.cancelled:
                continue
            slot = self._free_slot(len(stream.text_embeddings) + 1 + stream.max_tokens)
            stream.length = self.decoder.prefill(stream.text_embeddings, self.cache, slot)
            stream.text_embeddings, stream.last_token = None, self.decoder.config.sos_id
            self.streams[slot] = stream

    def _free_slot(self, positions: int) -> int:
        slots = self.cache.slots if None in self.streams else 2 * self.cache.slots
        capacity = max(self.cache.capacity, positions)
        if (slots, capacity) != (self.cache.slots, self.cache.capacity):
            self.cache = self.cache.resized(slots, capacity)
            self.streams += [None] * (slots - len(self.streams))
        return self.streams.index(None)

    def _step(self) -> None:
        """One decoder step for every unfinished stream; slots in between idle at position 0."""
        self._admit()
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
