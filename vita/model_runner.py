"""The engine's tensors: the KV cache, prefix copies, prefill and decode forwards, CUDA graphs,
shape buckets and sampling. It runs what ``vita.scheduler.Scheduler`` plans and decides nothing.

Prefill runs eagerly. On CUDA the decode forward is replayed from CUDA graphs captured per
(batch bucket, attended-length bucket), with the model's fast kernels (compiled elementwise steps,
Triton one-token attention). A decode step is launched without waiting for the previous one: rows
carried over take their input ids from its device output, and its sampled ids are copied to the
host behind an event, read by ``collect``. The runner fuses the model's q/k/v and gate/up
projections in place (``Qwen2Model.prepare_for_inference``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from layers.cuda_graphs import capture
from layers.host_copy import to_device
from layers.shapes import batch_buckets, padded, span_buckets
from vita.qwen2 import Qwen2Model, new_kv_cache
from vita.sampling import sample_requests
from vita.scheduler import DecodePlan, LaunchRows, Session

SMALLEST_KV_BUCKET = 256  # attended lengths a forward is padded to: powers of two from here, then max_len


@dataclass
class Launch:
    """A decode step on its way: each row's session and turn, the sampled ids on the device, and
    their host copy, readable once ``ready`` has passed (``started`` marks where its GPU work begins)."""

    rows: LaunchRows
    ids: torch.Tensor
    host_ids: torch.Tensor
    started: torch.cuda.Event | None  # None off CUDA, where the copy is already done
    ready: torch.cuda.Event | None


def timing_event() -> torch.cuda.Event:
    """A CUDA event recorded now on the current stream, for ``gpu_seconds``."""
    event = torch.cuda.Event(enable_timing=True)
    event.record()
    return event


def gpu_seconds(started: torch.cuda.Event, ended: torch.cuda.Event) -> float:
    """The GPU time between two passed timing events of one stream: the work queued between them,
    from when the stream reached it (after what was queued before) to its end."""
    return started.elapsed_time(ended) / 1000


class _DecodeGraph:
    """A CUDA graph of one decode forward (ids -> logits) at a fixed batch size and attended length."""

    def __init__(self, step: Callable, batch: int, kv_len: int, padding_slot: int, device: torch.device, pool):
        self.inputs = torch.zeros(3, batch, dtype=torch.long, device=device)  # ids, positions, slots
        self.inputs[2] = padding_slot
        self.padding_slot = padding_slot

        self.graph, self.logits = capture(
            lambda: step(self.inputs[0], self.inputs[1, :, None], self.inputs[2], kv_len), "llm_decode", device, pool
        )

    def __call__(self, inputs: torch.Tensor) -> torch.Tensor:
        """``inputs [3, n]`` (n <= batch); padding rows decode garbage in the padding slot."""
        n = inputs.shape[1]
        self.inputs[:, :n].copy_(inputs, non_blocking=True)
        self.inputs[:2, n:] = 0
        self.inputs[2, n:] = self.padding_slot
        self.graph.replay()
        return self.logits[:n]


class ModelRunner:
    """The model over a KV cache of ``max_sessions`` session slots, a padding slot and a prefix slot."""

    def __init__(
        self,
        model_core: Qwen2Model,
        lm_head: nn.Module,
        *,
        max_sessions: int,
        max_len: int,
        device: torch.device | str,
        dtype: torch.dtype,
        seed: int = 0,
        cuda_graphs: bool | None = None,
        fast_kernels: bool | None = None,
    ) -> None:
        self.model = model_core
        self.lm_head = lm_head
        self.device = torch.device(device)
        self.on_cuda = self.device.type == "cuda"
        model_core.prepare_for_inference(use_fast_kernels=self.on_cuda if fast_kernels is None else fast_kernels)
        self.prefilled_tokens = 0  # every token a prefill forward has processed, prefixes included
        self.padding_slot = max_sessions
        self.prefix_slot = max_sessions + 1  # where prefixes are computed before being copied out
        self.cache = new_kv_cache(model_core.config, max_sessions + 2, max_len, self.device, dtype)
        self._kv_buckets = span_buckets(max_len, smallest=SMALLEST_KV_BUCKET)
        self._batch_buckets = batch_buckets(max_sessions)
        self.generator = torch.Generator(self.device).manual_seed(seed)
        self.use_graphs = self.on_cuda if cuda_graphs is None else cuda_graphs
        self._graphs: dict[tuple[int, int], _DecodeGraph] = {}
        self._graph_pool = torch.cuda.graph_pool_handle() if self.use_graphs else None
        self._prefixes: dict[str, list[torch.Tensor]] = {}  # per layer [length, 2 * kv_heads, head_dim]

    # ----------------------------------------------------------------- turns and prefixes

    def turn_inputs(self, new_embeds: torch.Tensor, pending: int | None) -> torch.Tensor:
        """A turn's prefill inputs on the device: the embedding of ``pending`` (the previous turn's
        last token, not yet in the cache) if any, then ``new_embeds [T, hidden]``."""
        embeds = new_embeds.to(self.device, self.cache.dtype)
        if pending is not None:
            with torch.inference_mode():
                last = self.model.embed_tokens(to_device([pending], self.device))
            embeds = torch.cat([last.to(embeds.dtype), embeds])
        return embeds

    def store_prefix(self, key: str, embeds: torch.Tensor, chunk: int) -> None:
        """Prefill ``embeds [P, hidden]`` in ``chunk``-token forwards and keep a compact copy of its
        keys and values under ``key``."""
        with torch.inference_mode():
            embeds = embeds.to(self.device, self.cache.dtype)
            for start in range(0, embeds.shape[0], chunk):
                self._forward_chunk(self.prefix_slot, start, embeds[start : start + chunk])
        length = embeds.shape[0]
        self._prefixes[key] = [layer[self.prefix_slot, :length].clone() for layer in self.cache.layers]

    def drop_prefix(self, key: str) -> None:
        del self._prefixes[key]

    def copy_prefix(self, key: str, slot: int) -> None:
        """Put the stored prefix ``key`` at the start of ``slot``."""
        for layer, saved in zip(self.cache.layers, self._prefixes[key]):
            layer[slot, : saved.shape[0]] = saved

    # ----------------------------------------------------------------- steps

    def prefill(self, rows: list[tuple[Session, int]]) -> torch.Tensor:
        """One forward over each session's next ``size`` inputs, rows zero-padded to the longest;
        returns hidden states ``[rows, width, hidden]``. Padding positions lie past the turn's end:
        their cache writes are overwritten before anything attends to them."""
        width = max(size for _, size in rows)
        embeds = torch.zeros(len(rows), width, self.model.config.hidden_size, device=self.device, dtype=self.cache.dtype)
        for row, (session, size) in enumerate(rows):
            request = session.request
            embeds[row, :size] = request.inputs[request.prefilled : request.prefilled + size]
        starts, slots = to_device([[session.length for session, _ in rows], [session.slot for session, _ in rows]],
                                  self.device)
        positions = starts[:, None] + torch.arange(width, device=self.device)
        kv_len = padded(max(session.length for session, _ in rows) + width, self._kv_buckets)
        self.prefilled_tokens += sum(size for _, size in rows)
        return self.model(embeds, positions, self.cache, slots, kv_len)

    def sample_last(self, hidden: torch.Tensor, finishing: list[tuple[int, int, Session]]) -> list[int]:
        """First tokens of the turns in ``finishing`` (row, index of its last input, session) of a prefill's ``hidden``."""
        last = hidden[[row for row, _, _ in finishing], [index for _, index, _ in finishing]]
        params = [session.request.params for _, _, session in finishing]
        return sample_requests(self.lm_head(last), params, self.generator).tolist()

    def launch(self, plan: DecodePlan, previous: Launch | None) -> Launch:
        """Queue the decode step ``plan``; its carried rows take their ids from ``previous``."""
        started = timing_event() if self.on_cuda else None
        inputs = to_device([plan.ids, plan.positions, plan.slots], self.device, torch.long)
        if plan.carried_rows:
            rows, sources = plan.carried_rows, plan.carried_sources
            if rows == sources == list(range(len(rows))):  # the usual case: same sessions, same order
                inputs[0, : len(rows)] = previous.ids[: len(rows)]
            else:
                rows, sources = to_device([rows, sources], self.device)
                inputs[0, rows] = previous.ids[sources]
        kv_len = padded(max(plan.positions) + 1, self._kv_buckets)
        if self.use_graphs:
            logits = self._graph(padded(len(plan.rows), self._batch_buckets), kv_len)(inputs)
        else:
            logits = self._decode_logits(inputs[0], inputs[1, :, None], inputs[2], kv_len)
        sampled = sample_requests(logits, [request.params for _, request in plan.rows], self.generator)
        host_ids = torch.empty(len(plan.rows), dtype=torch.long, pin_memory=self.on_cuda)
        host_ids.copy_(sampled, non_blocking=True)
        ready = timing_event() if self.on_cuda else None
        return Launch(plan.rows, sampled, host_ids, started, ready)

    def collect(self, launch: Launch) -> list[int]:
        """Wait for ``launch``; its sampled ids."""
        if launch.ready is not None:
            launch.ready.synchronize()
        return launch.host_ids.tolist()

    def capture_graphs(self) -> None:
        """Capture every decode graph up front (otherwise each is captured on first use)."""
        for batch in self._batch_buckets:
            for kv_len in self._kv_buckets:
                self._graph(batch, kv_len)

    # ----------------------------------------------------------------- model calls

    def _forward_chunk(self, slot: int, start: int, embeds: torch.Tensor) -> torch.Tensor:
        positions = torch.arange(start, start + embeds.shape[0], device=self.device)[None]
        slots = to_device([slot], self.device)
        kv_len = padded(start + embeds.shape[0], self._kv_buckets)
        self.prefilled_tokens += embeds.shape[0]
        return self.model(embeds[None], positions, self.cache, slots, kv_len)

    def _decode_logits(self, ids: torch.Tensor, positions: torch.Tensor, slots: torch.Tensor, kv_len: int) -> torch.Tensor:
        hidden = self.model(self.model.embed_tokens(ids)[:, None], positions, self.cache, slots, kv_len)
        return self.lm_head(hidden[:, 0])

    def _graph(self, batch: int, kv_len: int) -> _DecodeGraph:
        key = (batch, kv_len)
        if key not in self._graphs:
            with torch.inference_mode():
                self._graphs[key] = _DecodeGraph(
                    self._decode_logits, batch, kv_len, self.padding_slot, self.device, self._graph_pool
                )
        return self._graphs[key]
