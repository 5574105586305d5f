"""The engine's tensors: the KV cache, prefix copies, prefill and decode forwards, CUDA graphs,
shape buckets and sampling. It runs what ``vita.scheduler.Scheduler`` plans and decides nothing.

On CUDA the decode forward is replayed from CUDA graphs captured per (batch bucket, attended-length
bucket), with the model's fast kernels (compiled elementwise steps, Triton one-token attention), and
a prefill forward of up to ``LARGEST_PREFILL_GRAPH_ROWS`` rows of up to a chunk's inputs from graphs
per (rows bucket, width bucket, attended-length bucket): launched eagerly, its thousand small
kernels cost the host 10 to 90 ms (more while other threads hold the GIL) for a few milliseconds of
GPU work. Larger prefills run eagerly. A decode step is launched without waiting for the previous
one: rows carried over take their input ids from its device output, and its sampled ids are copied
to the host behind an event, read by ``collect``. The runner fuses the model's q/k/v and gate/up
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
SMALLEST_PREFILL_WIDTH = 16  # inputs per row a prefill graph is padded to: powers of two from here to the chunk
LARGEST_PREFILL_GRAPH_ROWS = 8  # prefills of more rows run eagerly
SMALLEST_PREFILL_KV_BUCKET = 1024  # attended lengths of prefill graphs: powers of two from here, then max_len


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


class _RowsGraph:
    """A CUDA graph over a fixed number of rows, each described by three values in ``rows [3, n]``,
    the last one its cache slot; rows past the n given are padding in the padding slot."""

    graph: torch.cuda.CUDAGraph
    output: torch.Tensor

    def __init__(self, rows: int, padding_slot: int, device: torch.device):
        self.rows = torch.zeros(3, rows, dtype=torch.long, device=device)
        self.rows[2] = padding_slot
        self.padding_slot = padding_slot

    def __call__(self, rows: torch.Tensor) -> torch.Tensor:
        """Replay for the n rows of ``rows [3, n]``; the output's first n rows."""
        n = rows.shape[1]
        self.rows[:, :n].copy_(rows, non_blocking=True)
        self.rows[:2, n:] = 0
        self.rows[2, n:] = self.padding_slot
        self.graph.replay()
        return self.output[:n]


class _DecodeGraph(_RowsGraph):
    """A CUDA graph of one decode forward (rows: ids, positions, slots -> logits) at a fixed batch
    size and attended length; padding rows decode garbage in the padding slot."""

    def __init__(self, step: Callable, batch: int, kv_len: int, padding_slot: int, device: torch.device, pool):
        super().__init__(batch, padding_slot, device)
        ids, positions, slots = self.rows
        self.graph, self.output = capture(lambda: step(ids, positions[:, None], slots, kv_len), "llm", device, pool)


class _PrefillGraph(_RowsGraph):
    """A CUDA graph of one prefill forward over ``rows`` rows of ``width`` input embeddings (rows:
    starts, sizes, slots -> hidden states), attending over the first ``kv_len`` positions of each
    row's slot. The caller fills ``embeds`` before each call."""

    def __init__(self, forward: Callable, rows: int, width: int, kv_len: int, hidden_size: int,
                 dtype: torch.dtype, padding_slot: int, device: torch.device, pool):
        super().__init__(rows, padding_slot, device)
        self.embeds = torch.zeros(rows, width, hidden_size, dtype=dtype, device=device)
        self.graph, self.output = capture(lambda: forward(self.embeds, *self.rows, kv_len), "llm", device, pool)


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
        prefill_chunk: int = 256,
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
        self._prefill_rows = batch_buckets(LARGEST_PREFILL_GRAPH_ROWS)
        self._prefill_widths = span_buckets(prefill_chunk, smallest=min(SMALLEST_PREFILL_WIDTH, prefill_chunk))
        self._prefill_kv_buckets = span_buckets(max_len, smallest=min(SMALLEST_PREFILL_KV_BUCKET, max_len))
        self._prefill_graphs: dict[tuple[int, int, int], _PrefillGraph] = {}
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
                inputs = embeds[start : start + chunk]
                self.prefilled_tokens += inputs.shape[0]
                layout = to_device([[start], [inputs.shape[0]], [self.prefix_slot]], self.device)
                self._prefill_forward(inputs[None], *layout, padded(start + inputs.shape[0], self._kv_buckets))
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
        """One forward over each session's next ``size`` inputs, rows padded to the longest (on CUDA
        to a graph's rows and width); returns hidden states ``[rows, width, hidden]``."""
        width = max(size for _, size in rows)
        layout = [[session.length for session, _ in rows], [size for _, size in rows], [session.slot for session, _ in rows]]
        self.prefilled_tokens += sum(layout[1])
        attended = max(session.length + size for session, size in rows)
        graph = self._prefill_graph(len(rows), width, attended)
        if graph is not None:
            embeds = graph.embeds
        else:
            embeds = torch.zeros(len(rows), width, self.model.config.hidden_size, device=self.device, dtype=self.cache.dtype)
        for row, (session, size) in enumerate(rows):
            request = session.request
            embeds[row, :size] = request.inputs[request.prefilled : request.prefilled + size]
        layout = to_device(layout, self.device)
        if graph is not None:
            return graph(layout)
        return self._prefill_forward(embeds, *layout, padded(attended, self._kv_buckets))

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
        """Capture every decode and prefill graph up front (otherwise each is captured on first use)."""
        for batch in self._batch_buckets:
            for kv_len in self._kv_buckets:
                self._graph(batch, kv_len)
        for rows in self._prefill_rows:
            for width in self._prefill_widths:
                for kv_len in self._prefill_kv_buckets:
                    self._prefill_graph(rows, width, kv_len)

    # ----------------------------------------------------------------- model calls

    def _prefill_forward(
        self, embeds: torch.Tensor, starts: torch.Tensor, sizes: torch.Tensor, slots: torch.Tensor, kv_len: int
    ) -> torch.Tensor:
        """The forward of ``embeds [R, W, hidden]`` whose row r holds ``sizes[r]`` inputs of slot
        ``slots[r]`` from position ``starts[r]`` on; the keys and values of the padding after them
        go to the padding slot, so a row may be padded past the end of its slot."""
        offsets = torch.arange(embeds.shape[1], device=embeds.device)
        positions = starts[:, None] + offsets
        real = (offsets < sizes[:, None]).reshape(-1)
        spare = self.cache.flat_index(torch.full_like(slots, self.padding_slot), offsets.expand_as(positions))
        flat_index = torch.where(real, self.cache.flat_index(slots, positions), spare)
        return self.model(embeds, positions, self.cache, slots, kv_len, flat_index)

    def _decode_logits(self, ids: torch.Tensor, positions: torch.Tensor, slots: torch.Tensor, kv_len: int) -> torch.Tensor:
        hidden = self.model(self.model.embed_tokens(ids)[:, None], positions, self.cache, slots, kv_len)
        return self.lm_head(hidden[:, 0])

    def _prefill_graph(self, rows: int, width: int, attended: int) -> _PrefillGraph | None:
        """The graph for a prefill of ``rows`` rows of ``width`` inputs whose real inputs attend to at
        most ``attended`` positions (None: no graphs, or too large: run it eagerly)."""
        if not self.use_graphs or rows > self._prefill_rows[-1] or width > self._prefill_widths[-1]:
            return None
        key = (padded(rows, self._prefill_rows), padded(width, self._prefill_widths),
               padded(attended, self._prefill_kv_buckets))
        if key not in self._prefill_graphs:
            with torch.inference_mode():
                self._prefill_graphs[key] = _PrefillGraph(
                    self._prefill_forward, *key, self.model.config.hidden_size, self.cache.dtype, self.padding_slot,
                    self.device, self._graph_pool,
                )
        return self._prefill_graphs[key]

    def _graph(self, batch: int, kv_len: int) -> _DecodeGraph:
        key = (batch, kv_len)
        if key not in self._graphs:
            with torch.inference_mode():
                self._graphs[key] = _DecodeGraph(
                    self._decode_logits, batch, kv_len, self.padding_slot, self.device, self._graph_pool
                )
        return self._graphs[key]
