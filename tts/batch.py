"""Continuous batching of TTS utterances: every open stream advances one codec token per decoder step.

`DecoderBatch.add` prefills an utterance into a free slot of a fixed cache (slots x capacity);
`step` runs `steps_per_call` decoder steps for every open stream and returns each one's tokens (on
CUDA several steps per call are one graph replay, one read back and one wake-up of the calling
thread for several codes). A step always covers slots 0..n-1 (rows are slots, so attention reads
the cache in place; free slots among them decode a pad token from position 0, which their next
prefill overwrites) and attends over a span of positions; both are padded to buckets
(`layers/shapes.py`). The decoder forwards and the top-k draws run on the device from three input
rows (tokens, positions, top-k) and a uniform number per row and step (one batched draw from torch's
CPU generator, or a stream's own CPU generator where it has one, drawn in the order one step per
call would), with one device-to-host read of the tokens per call. On CUDA each (batch, span) shape
is a CUDA graph, captured by `capture_graphs` at start-up (or on first use); elsewhere the same
function runs eagerly. One thread drives a batch.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from layers.cuda_graphs import capture
from layers.shapes import batch_buckets, padded, span_buckets
from tts.decoder import LLM2TTSCodecAR, new_kv_cache
from tts.prefill_graphs import TTS_GRAPHS, PrefillGraphs

# (inputs [3, batch]: tokens, positions, top-k; uniforms [steps, batch]) -> token ids [steps, batch], on the device
StepFunction = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass(eq=False)
class Stream:
    """Decoding state of one utterance in its slot."""

    slot: int
    top_k: int
    max_tokens: int
    generator: torch.Generator | None
    length: int  # cache positions filled
    last_token: int
    sampled: int = 0
    finished: bool = False  # eos, max_tokens draws or a full slot: the stream has left the batch


class _StepGraph:
    """A CUDA graph of one step function at a fixed batch size, fed through static input tensors."""

    def __init__(self, function: StepFunction, inputs: torch.Tensor, uniforms: torch.Tensor, pool) -> None:
        self.inputs, self.uniforms = inputs.clone(), uniforms.clone()  # valid values: the warm-up run executes
        self.graph, self.ids = capture(lambda: function(self.inputs, self.uniforms), TTS_GRAPHS, inputs.device, pool)

    def __call__(self, inputs: torch.Tensor, uniforms: torch.Tensor) -> torch.Tensor:
        self.inputs.copy_(inputs, non_blocking=True)
        self.uniforms.copy_(uniforms, non_blocking=True)
        self.graph.replay()
        return self.ids


@dataclass(frozen=True)
class UtteranceText:
    """What an utterance brings to the decoder: text embeddings [T, idim] and its sampling settings."""

    text_embeddings: torch.Tensor
    top_k: int
    max_tokens: int
    generator: torch.Generator | None


class DecoderBatch:
    """Shares decoder steps among the utterances being synthesised (all calls from one thread)."""

    def __init__(self, decoder: LLM2TTSCodecAR, slots: int, capacity: int, *, cuda_graphs: bool | None = None,
                 steps_per_call: int = 1, prefill_graphs: bool = False) -> None:
        """`prefill_graphs`: with CUDA graphs, prefills too replay from graphs (`tts/prefill_graphs.py`;
        the cache gets one scratch slot more)."""
        if steps_per_call < 1:
            raise ValueError("steps_per_call must be at least 1")
        weight = decoder.embedding.weight
        self.decoder = decoder
        self.streams: list[Stream | None] = [None] * slots
        self.use_graphs = weight.device.type == "cuda" if cuda_graphs is None else cuda_graphs
        self.steps_per_call = steps_per_call
        self.prefill_graphs = prefill_graphs
        scratch = 1 if prefill_graphs and self.use_graphs else 0
        self.cache = new_kv_cache(decoder.config, slots + scratch, capacity, weight.device, weight.dtype)
        self._batches = batch_buckets(slots)
        self._spans = span_buckets(capacity)
        self._graphs: dict[tuple[int, int], _StepGraph] = {}
        self._graph_pool = torch.cuda.graph_pool_handle() if self.use_graphs else None
        self._prefills = PrefillGraphs(decoder, self.cache, self._batches, scratch_slot=slots) if scratch else None

    @property
    def free_slots(self) -> int:
        return self.streams.count(None)

    def add(
        self, text_embeddings: torch.Tensor, *, top_k: int, max_tokens: int, generator: torch.Generator | None
    ) -> Stream:
        """Prefill `text_embeddings` [T, idim] into the lowest free slot; the stream then gets a token per
        step until eos, `max_tokens` draws or a full slot. `generator` (CPU) makes its draws reproducible."""
        return self.add_many([UtteranceText(text_embeddings, top_k, max_tokens, generator)])[0]

    def add_many(self, utterances: list[UtteranceText]) -> list[Stream]:
        """`add` of several utterances with one prefill forward (rows padded to the longest text)."""
        if len(utterances) > self.free_slots:
            raise RuntimeError(f"no free slot: {len(utterances)} utterances for {self.free_slots} free slots")
        for utterance in utterances:
            if len(utterance.text_embeddings) + 2 > self.cache.max_len:
                raise ValueError(f"{len(utterance.text_embeddings)} text rows do not fit {self.cache.max_len} cache positions")
        slots = [i for i, stream in enumerate(self.streams) if stream is None][: len(utterances)]
        texts = [u.text_embeddings for u in utterances]
        if self._prefills is not None and self._prefills.fits(texts):
            self._prefills.prefill(texts, slots)
            lengths = [len(text) + 1 for text in texts]
        else:
            lengths = self.decoder.prefill_many(texts, self.cache, slots)
        streams = []
        for slot, length, u in zip(slots, lengths, utterances):
            streams.append(Stream(slot, u.top_k, u.max_tokens, u.generator, length, self.decoder.config.sos_id))
            self.streams[slot] = streams[-1]
        return streams

    def remove(self, stream: Stream) -> None:
        """Free the stream's slot (it gets no more tokens)."""
        if self.streams[stream.slot] is stream:
            self.streams[stream.slot] = None
        stream.finished = True

    def capture_graphs(self) -> None:
        """Capture the step graph of every (batch, span) bucket, and the prefill graphs if asked for;
        call with no stream open and no other thread launching CUDA work (a capture runs the step
        once, writing position 0 of the slots)."""
        if self.use_graphs:
            for batch in self._batches:
                for span in self._spans:
                    self._graph(batch, span)
        if self._prefills is not None:
            self._prefills.capture()

    def step(self) -> list[tuple[Stream, list[int]]]:
        """`steps_per_call` decoder steps for every open stream: (stream, the codec tokens it drew, in
        order; eos is not one). A stream that finishes on the way (eos, `max_tokens` draws, a full
        slot) leaves the batch and frees its slot; what the call drew for it after that is dropped."""
        streams = [s for s in self.streams if s is not None]
        if not streams:
            return []
        steps = self.steps_per_call
        batch = padded(streams[-1].slot + 1, self._batches)
        span = padded(min(max(s.length for s in streams) + steps, self.cache.max_len), self._spans)
        device = self.cache.device
        pin = device.type == "cuda"  # host inputs in pinned memory: their copies to the device do not wait
        inputs = [[self.decoder.config.pad_id] * batch, [0] * batch, [1] * batch]  # idle rows: pad, position 0, top-1
        uniforms = torch.rand(steps, batch, pin_memory=pin)  # per row and step; a stream's own generator, if any
        for s in streams:
            inputs[0][s.slot], inputs[1][s.slot], inputs[2][s.slot] = s.last_token, s.length, s.top_k
            if s.generator is not None:
                uniforms[:, s.slot] = torch.rand(steps, generator=s.generator)
        inputs = torch.tensor(inputs, pin_memory=pin)
        if self.use_graphs:  # copied straight into the graph's static inputs
            ids = self._graph(batch, span)(inputs, uniforms)
        else:
            on_device = [tensor.to(device, non_blocking=True) for tensor in (inputs, uniforms)]
            ids = self._step_function(span)(*on_device)
        rows = ids.t().tolist()  # the call's one read back to the host: [batch][steps]
        return [(s, self._take(s, rows[s.slot])) for s in streams]

    def _take(self, stream: Stream, drawn: list[int]) -> list[int]:
        """Advance `stream` by the tokens drawn for it, up to its end; the codec tokens among them."""
        tokens = []
        for token in drawn:
            stream.length += 1
            stream.sampled += 1
            stream.last_token = token
            if token == self.decoder.config.eos_id:
                self.remove(stream)
                break
            tokens.append(token)
            if stream.sampled == stream.max_tokens or stream.length == self.cache.max_len:
                self.remove(stream)
                break
        return tokens

    def _step_function(self, span: int) -> StepFunction:
        last = self.cache.max_len - 1  # a stream that fills its slot ends there: later steps rewrite its last position

        def steps(inputs: torch.Tensor, uniforms: torch.Tensor) -> torch.Tensor:
            tokens, positions, top_k = inputs
            drawn = []
            for uniform in uniforms:
                logits = self.decoder.step(tokens, positions, self.cache, span)
                tokens = self.decoder.sample(logits, top_k, uniform)
                drawn.append(tokens)
                positions = (positions + 1).clamp(max=last)
            return torch.stack(drawn)

        return steps

    def _graph(self, batch: int, span: int) -> _StepGraph:
        key = (batch, span)
        if key not in self._graphs:
            device = self.cache.device
            inputs = torch.tensor([[self.decoder.config.pad_id] * batch, [0] * batch, [1] * batch], device=device)
            uniforms = torch.zeros(self.steps_per_call, batch, device=device)
            with torch.no_grad():
                self._graphs[key] = _StepGraph(self._step_function(span), inputs, uniforms, self._graph_pool)
        return self._graphs[key]
