"""Multi-session generation engine: engine-owned KV cache, continuous batching, chunked prefill.

One background task on the caller's event loop runs *steps*. A step prefills waiting turns
(while sessions are decoding: one forward of up to ``prefill_tokens`` padded tokens, at most
``prefill_chunk`` per session; otherwise everything waiting), several sessions per forward with
their rows padded to the longest, and then decodes one token for every session that is
generating, all in one batch. Each session owns a cache slot for its whole conversation, so a new turn only
prefills its new tokens. Named prefixes (a system prompt) are prefilled once and kept as
compact key/value copies (the few most recently used); a session that starts from one gets
those copied into its slot and prefills only what follows. On CUDA the decode forward is
replayed from CUDA graphs captured per (batch bucket, attended-length bucket), with the
model's fast kernels (compiled elementwise steps, Triton one-token attention); prefill runs
eagerly. Each decode step is launched before the previous step's tokens are read, so host work
overlaps the GPU. The engine fuses the model's q/k/v and gate/up projections in place
(``Qwen2Model.prepare_for_inference``).

All public methods must be called from the thread running the engine's event loop (another
thread uses ``loop.call_soon_threadsafe``); a step never yields mid-way, so they always see the
engine between steps.
"""

from __future__ import annotations

import asyncio
from collections import OrderedDict
from collections.abc import AsyncIterator, Callable, Iterable
from dataclasses import dataclass, field

import torch
from torch import nn

from vita.qwen2 import Qwen2Model, new_kv_cache
from vita.sampling import SamplingParams, sample_requests

_FINISHED = None


@dataclass
class _Request:
    """One turn of one session: embeddings still to prefill, then tokens to stream."""

    embeds: torch.Tensor  # [T, hidden], includes the previous turn's last token
    params: SamplingParams
    start_length: int  # cache length before this turn
    start_pending: int | None  # the session's last token not yet in the cache, restored if the turn is dropped
    opens_session: bool  # the session's first turn: dropping it forgets the session
    queue: asyncio.Queue = field(default_factory=asyncio.Queue)
    prefilled: int = 0
    tokens: list[int] = field(default_factory=list)  # sampled so far
    consumed: int = 0  # tokens the caller has received
    done: bool = False  # the engine has stopped working on it

    @property
    def prompt_end(self) -> int:
        return self.start_length + self.embeds.shape[0]


@dataclass
class _Prefix:
    """Keys and values of a prefilled prefix, per layer ``[length, 2 * kv_heads, head_dim]``."""

    kv: list[torch.Tensor]

    @property
    def length(self) -> int:
        return self.kv[0].shape[0]


@dataclass
class _Session:
    slot: int
    length: int = 0  # positions of the slot holding this conversation
    pending: int | None = None  # last sampled token, yielded but not yet written to the cache
    request: _Request | None = None  # the turn whose iterator is open
    turn: _Request | None = None  # the latest turn in the conversation, running or ended (``discard``)


@dataclass
class _Launch:
    """A decode step on its way: each row's session and turn, the sampled ids on the device, and
    their host copy, readable once ``ready`` has passed."""

    rows: list[tuple[_Session, _Request]]
    ids: torch.Tensor
    host_ids: torch.Tensor
    ready: torch.cuda.Event | None  # None off CUDA, where the copy is already done


class _DecodeGraph:
    """A CUDA graph of one decode forward (ids -> logits) at a fixed batch size and attended length."""

    def __init__(self, step: Callable, batch: int, kv_len: int, padding_slot: int, device: torch.device, pool):
        self.inputs = torch.zeros(3, batch, dtype=torch.long, device=device)  # ids, positions, slots
        self.inputs[2] = padding_slot
        self.padding_slot = padding_slot

        def run() -> torch.Tensor:
            return step(self.inputs[0], self.inputs[1, :, None], self.inputs[2], kv_len)

        side = torch.cuda.Stream(device)
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side):
            run()
        torch.cuda.current_stream(device).wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph, pool=pool):
            self.logits = run()

    def __call__(self, inputs: torch.Tensor) -> torch.Tensor:
        """``inputs [3, n]`` (n <= batch); padding rows decode garbage in the padding slot."""
        n = inputs.shape[1]
        self.inputs[:, :n].copy_(inputs, non_blocking=True)
        self.inputs[:2, n:] = 0
        self.inputs[2, n:] = self.padding_slot
        self.graph.replay()
        return self.logits[:n]


class Engine:
    """Continuous-batching generator over a fixed number of session slots."""

    def __init__(
        self,
        model_core: Qwen2Model,
        lm_head: nn.Module,
        *,
        max_sessions: int,
        max_len: int,
        device: torch.device | str,
        dtype: torch.dtype,
        stop_token_ids: Iterable[int],
        prefill_chunk: int = 256,
        prefill_tokens: int = 2048,
        max_prefixes: int = 4,
        seed: int = 0,
        cuda_graphs: bool | None = None,
        fast_kernels: bool | None = None,
    ):
        self.model = model_core
        self.lm_head = lm_head
        self.device = torch.device(device)
        self.on_cuda = self.device.type == "cuda"
        model_core.prepare_for_inference(use_fast_kernels=self.on_cuda if fast_kernels is None else fast_kernels)
        self.max_sessions = max_sessions
        self.max_len = max_len
        self.stop_token_ids = frozenset(stop_token_ids)
        self.prefill_chunk = prefill_chunk
        self.prefill_tokens = max(prefill_tokens, prefill_chunk)
        self.max_prefixes = max_prefixes
        self.prefilled_tokens = 0  # every token a prefill forward has processed, prefixes included
        self.padding_slot = max_sessions
        self.prefix_slot = max_sessions + 1  # where prefixes are computed before being copied out
        self.cache = new_kv_cache(model_core.config, max_sessions + 2, max_len, self.device, dtype)
        self._kv_buckets = kv_buckets(max_len)
        self._batch_buckets = batch_buckets(max_sessions)
        self.generator = torch.Generator(self.device).manual_seed(seed)
        self.use_graphs = self.on_cuda if cuda_graphs is None else cuda_graphs
        self._graphs: dict[tuple[int, int], _DecodeGraph] = {}
        self._graph_pool = torch.cuda.graph_pool_handle() if self.use_graphs else None
        self._sessions: dict[str, _Session] = {}
        self._free_slots = list(range(max_sessions))
        self._prefill_queue: list[_Session] = []
        self._decoding: list[_Session] = []
        self._in_flight: _Launch | None = None
        self._prefixes: OrderedDict[str, _Prefix] = OrderedDict()  # least recently used first
        self._wakeup = asyncio.Event()
        self._task: asyncio.Task | None = None

    # ----------------------------------------------------------------- public API

    async def generate(
        self, session_id: str, new_embeds: torch.Tensor, params: SamplingParams, prefix: str | None = None
    ) -> AsyncIterator[int]:
        """Append ``new_embeds [T, hidden]`` to the session's conversation and stream sampled token ids.

        Ends after a stop token, ``params.max_tokens`` tokens, a full cache, or ``cancel``. The
        conversation keeps exactly the tokens this iterator yielded (the last one included); leaving
        the iterator early cancels the turn. ``prefix`` names a registered prefix the conversation
        starts from; only a session's first turn may give one (``KeyError`` if unknown,
        ``RuntimeError`` if the session exists).
        """
        request = self._submit(session_id, new_embeds, params, prefix)
        received_all = False
        try:
            while (item := await request.queue.get()) is not _FINISHED:
                if isinstance(item, BaseException):
                    raise item
                request.consumed += 1
                yield item
            received_all = True
        finally:
            session = self._sessions.get(session_id)
            if session is not None and session.request is request:
                if not received_all:
                    self.cancel(session_id)
                session.request = None

    def cancel(self, session_id: str) -> None:
        """Stop the session's current turn now, keeping only the tokens already yielded.

        A turn cancelled before yielding anything leaves the conversation as it was before it (a
        first turn: no session at all).
        """
        session = self._sessions.get(session_id)
        if session is None or session.request is None:
            return
        request = session.request
        if request.consumed == 0:
            self.discard(session_id)
            return
        self._end_iterator(session)
        session.length = request.prompt_end + request.consumed - 1
        session.pending = request.tokens[request.consumed - 1]

    def discard(self, session_id: str) -> None:
        """Drop the session's latest turn entirely, running or ended, even after tokens were yielded.

        The conversation goes back to before the turn (a first turn: no session at all) and the
        turn's iterator, if still open, ends.
        """
        session = self._sessions.get(session_id)
        if session is None or session.turn is None:
            return
        turn, session.turn = session.turn, None
        if session.request is turn:
            self._end_iterator(session)
            session.request = None
        session.length, session.pending = turn.start_length, turn.start_pending
        if turn.opens_session:
            self._release(session_id)

    def end_session(self, session_id: str) -> None:
        """Forget the conversation and free its cache slot."""
        self.cancel(session_id)
        self._release(session_id)

    def register_prefix(self, key: str, embeds: torch.Tensor) -> None:
        """Prefill ``embeds [P, hidden]`` (e.g. a system prompt) once under ``key``.

        Sessions that start with ``prefix=key`` copy its keys and values. Only the
        ``max_prefixes`` most recently used prefixes are kept; registering more forgets the oldest.
        """
        if not 0 < embeds.shape[0] < self.max_len:
            raise ValueError(f"a prefix needs 1 to {self.max_len - 1} tokens, got {embeds.shape[0]}")
        with torch.inference_mode():
            embeds = embeds.to(self.device, self.cache.dtype)
            for start in range(0, embeds.shape[0], self.prefill_chunk):
                self._forward_chunk(self.prefix_slot, start, embeds[start : start + self.prefill_chunk])
        length = embeds.shape[0]
        self._prefixes[key] = _Prefix([layer[self.prefix_slot, :length].clone() for layer in self.cache.layers])
        self._prefixes.move_to_end(key)
        while len(self._prefixes) > self.max_prefixes:
            self._prefixes.popitem(last=False)

    def prefix_length(self, key: str) -> int | None:
        """Tokens of the registered prefix ``key``; None if it is not (or no longer) registered."""
        prefix = self._prefixes.get(key)
        return prefix.length if prefix is not None else None

    def capture_graphs(self) -> None:
        """Capture every decode graph up front (otherwise each is captured on first use)."""
        for batch in self._batch_buckets:
            for kv_len in self._kv_buckets:
                self._graph(batch, kv_len)

    async def close(self) -> None:
        """Stop the background loop and end every open turn."""
        for session_id in list(self._sessions):
            self.cancel(session_id)
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None

    # ----------------------------------------------------------------- requests

    def _submit(
        self, session_id: str, new_embeds: torch.Tensor, params: SamplingParams, prefix_key: str | None
    ) -> _Request:
        session = self._sessions.get(session_id)
        if session is not None and session.request is not None and not session.request.done:
            raise RuntimeError(f"session {session_id!r} is already generating")
        if session is not None and prefix_key is not None:
            raise RuntimeError(f"session {session_id!r} has started: only its first turn may name a prefix")
        prefix = self._use_prefix(prefix_key) if prefix_key is not None else None
        embeds = new_embeds.to(self.device, self.cache.dtype)
        if session is not None and session.pending is not None:
            with torch.inference_mode():
                last = self.model.embed_tokens(torch.tensor([session.pending], device=self.device))
            embeds = torch.cat([last.to(embeds.dtype), embeds])
        cached = session.length if session is not None else prefix.length if prefix is not None else 0
        if embeds.shape[0] == 0 or cached + embeds.shape[0] > self.max_len:
            raise ValueError(f"turn of {embeds.shape[0]} tokens does not fit after {cached} cached tokens")
        opens_session = session is None
        if opens_session:
            session = self._open_session(session_id, prefix)
        session.request = session.turn = _Request(embeds, params, session.length, session.pending, opens_session)
        session.pending = None
        self._prefill_queue.append(session)
        self._ensure_loop()
        return session.request

    def _use_prefix(self, key: str) -> _Prefix:
        if key not in self._prefixes:
            raise KeyError(f"no prefix registered as {key!r}")
        self._prefixes.move_to_end(key)
        return self._prefixes[key]

    def _open_session(self, session_id: str, prefix: _Prefix | None) -> _Session:
        """Take a free slot for a new session, holding a copy of ``prefix`` if given."""
        if not self._free_slots:
            raise RuntimeError(f"all {self.max_sessions} session slots are in use")
        session = _Session(slot=min(self._free_slots))
        self._free_slots.remove(session.slot)
        if prefix is not None:
            for layer, saved in zip(self.cache.layers, prefix.kv):
                layer[session.slot, : prefix.length] = saved
            session.length = prefix.length
        self._sessions[session_id] = session
        return session

    def _release(self, session_id: str) -> None:
        session = self._sessions.pop(session_id, None)
        if session is not None:
            self._free_slots.append(session.slot)

    def _deliver(self, session: _Session, token: int) -> None:
        request = session.request
        request.tokens.append(token)
        session.pending = token
        request.queue.put_nowait(token)
        if (
            token in self.stop_token_ids
            or len(request.tokens) >= request.params.max_tokens
            or session.length >= self.max_len
        ):
            self._finish(session)
            request.queue.put_nowait(_FINISHED)

    def _end_iterator(self, session: _Session) -> None:
        """Stop the session's turn and end its iterator after the tokens already received."""
        request = session.request
        self._finish(session)
        while not request.queue.empty():
            request.queue.get_nowait()
        request.queue.put_nowait(_FINISHED)

    def _finish(self, session: _Session) -> None:
        """Take the session's turn out of the engine's work lists."""
        session.request.done = True
        if session in self._prefill_queue:
            self._prefill_queue.remove(session)
        if session in self._decoding:
            self._decoding.remove(session)

    # ----------------------------------------------------------------- loop

    def _ensure_loop(self) -> None:
        if self._task is None or self._task.done():
            self._task = asyncio.get_running_loop().create_task(self._run())
        self._wakeup.set()

    async def _run(self) -> None:
        while True:
            if not self._prefill_queue and not self._decoding and self._in_flight is None:
                self._wakeup.clear()
                await self._wakeup.wait()
                continue
            try:
                with torch.inference_mode():
                    self._step()
            except Exception as error:  # a failed step ends every open turn with the error
                self._in_flight = None
                for session in self._prefill_queue + self._decoding:
                    self._finish(session)
                    session.request.queue.put_nowait(error)
            await asyncio.sleep(0)

    def _step(self) -> None:
        """Prefill up to ``prefill_chunk`` tokens of waiting turns, launch a decode step for all
        generating sessions, then hand out the tokens of the previous launch.

        Sessions carried over from the previous launch take their input ids from its device output,
        so the host reads those tokens while the GPU already runs the next step. A carried row whose
        turn ends on that token has its extra token dropped; its cache write lands past the
        conversation's length, where nothing attends until it is overwritten. Rows whose turn ends
        on the previous token by length (``max_tokens``, a full slot) are not launched again.
        """
        starting = self._prefill_some()
        previous, self._in_flight = self._in_flight, None
        ending = set()
        if previous is not None:
            ending = {id(s) for s, request in previous.rows if s.request is request and self._last_of_turn(s)}
        launching = [s for s in self._decoding if id(s) not in ending]
        if launching:
            self._in_flight = self._launch(launching, previous)
        if previous is not None:
            self._collect(previous)
        self._decoding += [session for session in starting if not session.request.done]

    def _last_of_turn(self, session: _Session) -> bool:
        """Whether the session's next token ends its turn by length alone."""
        return len(session.request.tokens) + 1 >= session.request.params.max_tokens or session.length + 1 >= self.max_len

    def _prefill_some(self) -> list[_Session]:
        """Run prefill forwards; returns the sessions whose prefill completed (first token delivered).

        While sessions are decoding, one forward of at most ``prefill_tokens`` padded tokens and
        ``prefill_chunk`` per session (so they keep streaming); otherwise forwards until nothing
        waits (fewest forward calls to the first token).
        """
        completed = []
        while self._prefill_queue:
            rows = self._prefill_rows(row_limit=self.prefill_chunk if self._decoding else self.max_len)
            hidden = self._forward_rows(rows)
            finishing = []
            for row, (session, size) in enumerate(rows):
                session.length += size
                session.request.prefilled += size
                if session.request.prefilled == session.request.embeds.shape[0]:
                    self._prefill_queue.remove(session)
                    finishing.append((row, size - 1, session))
            if finishing:
                last = hidden[[row for row, _, _ in finishing], [index for _, index, _ in finishing]]
                params = [session.request.params for _, _, session in finishing]
                for (_, _, session), token in zip(finishing, sample_requests(self.lm_head(last), params, self.generator).tolist()):
                    self._deliver(session, token)
                    completed.append(session)
            if self._decoding:
                break
        return completed

    def _prefill_rows(self, row_limit: int) -> list[tuple[_Session, int]]:
        """Waiting sessions (in order) for one prefill forward and each one's chunk size: rows are
        padded to the longest chunk, within ``prefill_tokens`` and every row's cache slot."""
        rows: list[tuple[_Session, int]] = []
        width = 0
        for session in self._prefill_queue:
            request = session.request
            size = min(request.embeds.shape[0] - request.prefilled, row_limit, self.prefill_tokens)
            grown = max(width, size)
            fits = (len(rows) + 1) * grown <= self.prefill_tokens and all(
                s.length + grown <= self.max_len for s, _ in [*rows, (session, size)]
            )
            if rows and not fits:
                break
            rows.append((session, size))
            width = grown
        return rows

    def _launch(self, sessions: list[_Session], previous: _Launch | None) -> _Launch:
        """Queue one decode step for ``sessions``; rows still in ``previous`` continue from its ids."""
        carried = {id(s): row for row, (s, request) in enumerate(previous.rows) if s.request is request} if previous else {}
        positions = [s.length + (id(s) in carried) for s in sessions]
        ids = [0 if id(s) in carried else s.pending for s in sessions]
        inputs = torch.tensor([ids, positions, [s.slot for s in sessions]], dtype=torch.long)
        inputs = inputs.to(self.device, non_blocking=True)
        if carried:
            rows = [row for row, s in enumerate(sessions) if id(s) in carried]
            sources = [carried[id(sessions[row])] for row in rows]
            if rows == sources == list(range(len(rows))):  # the usual case: same sessions, same order
                inputs[0, : len(rows)] = previous.ids[: len(rows)]
            else:
                inputs[0, torch.tensor(rows, device=self.device)] = previous.ids[torch.tensor(sources, device=self.device)]
        kv_len = self._kv_bucket(max(positions) + 1)
        if self.use_graphs:
            logits = self._graph(self._batch_bucket(len(sessions)), kv_len)(inputs)
        else:
            logits = self._decode_logits(inputs[0], inputs[1, :, None], inputs[2], kv_len)
        sampled = sample_requests(logits, [s.request.params for s in sessions], self.generator)
        host_ids = torch.empty(len(sessions), dtype=torch.long, pin_memory=self.on_cuda)
        host_ids.copy_(sampled, non_blocking=True)
        ready = torch.cuda.Event() if self.on_cuda else None
        if ready is not None:
            ready.record()
        return _Launch([(s, s.request) for s in sessions], sampled, host_ids, ready)

    def _collect(self, launch: _Launch) -> None:
        """Wait for ``launch`` and deliver its tokens to the turns still running."""
        if launch.ready is not None:
            launch.ready.synchronize()
        for (session, request), token in zip(launch.rows, launch.host_ids.tolist()):
            if session.request is request and not request.done:
                session.length += 1
                self._deliver(session, token)

    # ----------------------------------------------------------------- model calls

    def _forward_rows(self, rows: list[tuple[_Session, int]]) -> torch.Tensor:
        """One forward over each session's next ``size`` embeddings, rows zero-padded to the longest;
        returns hidden states ``[rows, width, hidden]``. Padding positions lie past the turn's end:
        their cache writes are overwritten before anything attends to them."""
        width = max(size for _, size in rows)
        embeds = torch.zeros(len(rows), width, self.model.config.hidden_size, device=self.device, dtype=self.cache.dtype)
        for row, (session, size) in enumerate(rows):
            request = session.request
            embeds[row, :size] = request.embeds[request.prefilled : request.prefilled + size]
        starts = torch.tensor([session.length for session, _ in rows], device=self.device)
        positions = starts[:, None] + torch.arange(width, device=self.device)
        slots = torch.tensor([session.slot for session, _ in rows], device=self.device)
        kv_len = self._kv_bucket(max(session.length for session, _ in rows) + width)
        self.prefilled_tokens += sum(size for _, size in rows)
        return self.model(embeds, positions, self.cache, slots, kv_len)

    def _forward_chunk(self, slot: int, start: int, embeds: torch.Tensor) -> torch.Tensor:
        positions = torch.arange(start, start + embeds.shape[0], device=self.device)[None]
        slots = torch.tensor([slot], device=self.device)
        kv_len = self._kv_bucket(start + embeds.shape[0])
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

    # ----------------------------------------------------------------- shape buckets

    def _kv_bucket(self, length: int) -> int:
        return next(b for b in self._kv_buckets if b >= length)

    def _batch_bucket(self, size: int) -> int:
        return next(b for b in self._batch_buckets if b >= size)


def kv_buckets(max_len: int) -> tuple[int, ...]:
    """Attended lengths a forward is padded to: powers of two from 256, then ``max_len``."""
    buckets, size = [], 256
    while size < max_len:
        buckets.append(size)
        size *= 2
    return (*buckets, max_len)


def batch_buckets(max_sessions: int) -> tuple[int, ...]:
    """Decode batch sizes a CUDA graph is captured for: 1, 2, 4, multiples of 8, then ``max_sessions``."""
    small = [b for b in (1, 2, 4) if b < max_sessions]
    return (*small, *range(8, max_sessions, 8), max_sessions)
