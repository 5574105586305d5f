"""Multi-session generation engine: engine-owned KV cache, continuous batching, chunked prefill.

One background task on the caller's event loop runs *steps*. A step prefills waiting turns (while
sessions are decoding: one forward of up to ``decoding_prefill_tokens`` padded tokens, at most
``prefill_chunk`` per session; otherwise everything waiting, in forwards of up to
``prefill_tokens``), several sessions per forward with their rows padded to the longest, and then
decodes one token for every session that is generating, all in one batch. Each session owns a cache
slot for its whole conversation, so a new turn only prefills its new tokens. Named prefixes (a
system prompt) are prefilled once and kept as compact key/value copies (the few most recently used);
a session that starts from one gets those copied into its slot and prefills only what follows. Each
decode step is launched before the previous step's tokens are read (ids carried on the device), so
host work overlaps the GPU.

Three parts: ``Scheduler`` (vita/scheduler.py, plain Python) decides what each step runs and
who gets which token; ``ModelRunner`` (vita/model_runner.py) holds the tensors and runs it (CUDA
graphs on CUDA); ``Engine`` here is the asyncio front end that glues them into a loop and
streams each turn's tokens.

All public methods must be called from the thread running the engine's event loop (another
thread uses ``loop.call_soon_threadsafe``); a step never yields mid-way, so they always see the
engine between steps.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Iterable

import torch
from torch import nn

from tts.activity_log import ActivityLog
from vita.model_runner import Launch, ModelRunner, gpu_seconds, timing_event
from vita.qwen2 import Qwen2Model
from vita.sampling import SamplingParams
from vita.scheduler import END_OF_TURN, Request, Scheduler, Session


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
        decoding_prefill_tokens: int | None = None,
        max_prefixes: int = 4,
        seed: int = 0,
        cuda_graphs: bool | None = None,
        fast_kernels: bool | None = None,
    ):
        self.runner = ModelRunner(
            model_core, lm_head, max_sessions=max_sessions, max_len=max_len, device=device, dtype=dtype,
            seed=seed, cuda_graphs=cuda_graphs, fast_kernels=fast_kernels, prefill_chunk=prefill_chunk,
        )
        self.scheduler = Scheduler(
            max_sessions=max_sessions, max_len=max_len, stop_token_ids=stop_token_ids,
            prefill_chunk=prefill_chunk, prefill_tokens=prefill_tokens, max_prefixes=max_prefixes,
            decoding_prefill_tokens=decoding_prefill_tokens,
        )
        self.max_len = max_len
        self.prefill_chunk = prefill_chunk
        self._in_flight: Launch | None = None
        self._wakeup = asyncio.Event()
        self._task: asyncio.Task | None = None
        self._activity = ActivityLog(logging.getLogger("vita.engine"), "engine")  # on the loop running it
        # CUDA: (started, ended, forwards) of prefill steps whose GPU time is not read yet
        self._gpu_prefills: list[tuple[torch.cuda.Event, torch.cuda.Event, int]] = []

    @property
    def device(self) -> torch.device:
        return self.runner.device

    @property
    def use_graphs(self) -> bool:
        return self.runner.use_graphs

    @property
    def prefilled_tokens(self) -> int:
        """Every token a prefill forward has processed, prefixes included."""
        return self.runner.prefilled_tokens

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
            while (item := await request.queue.get()) is not END_OF_TURN:
                if isinstance(item, BaseException):
                    raise item
                request.consumed += 1
                yield item
            received_all = True
        finally:
            self.scheduler.iterator_closed(session_id, request, received_all)

    def cancel(self, session_id: str) -> None:
        """Stop the session's current turn now, keeping only the tokens already yielded.

        A turn cancelled before yielding anything leaves the conversation as it was before it (a
        first turn: no session at all).
        """
        self.scheduler.cancel(session_id)

    def discard(self, session_id: str) -> None:
        """Drop the session's latest turn entirely, running or ended, even after tokens were yielded.

        The conversation goes back to before the turn (a first turn: no session at all) and the
        turn's iterator, if still open, ends.
        """
        self.scheduler.discard(session_id)

    def end_session(self, session_id: str) -> None:
        """Forget the conversation and free its cache slot."""
        self.scheduler.cancel(session_id)
        self.scheduler.release(session_id)

    def register_prefix(self, key: str, embeds: torch.Tensor) -> None:
        """Prefill ``embeds [P, hidden]`` (e.g. a system prompt) once under ``key``.

        Sessions that start with ``prefix=key`` copy its keys and values. Only the
        ``max_prefixes`` most recently used prefixes are kept; registering more forgets the oldest.
        """
        self.scheduler.check_prefix(embeds.shape[0])
        self.runner.store_prefix(key, embeds, self.prefill_chunk)
        for forgotten in self.scheduler.add_prefix(key, embeds.shape[0]):
            self.runner.drop_prefix(forgotten)

    def prefix_length(self, key: str) -> int | None:
        """Tokens of the registered prefix ``key``; None if it is not (or no longer) registered."""
        return self.scheduler.prefix_length(key)

    def capture_graphs(self) -> None:
        """Capture every decode and prefill graph up front (otherwise each is captured on first use)."""
        self.runner.capture_graphs()

    async def close(self) -> None:
        """Stop the background loop and end every open turn."""
        for session_id in list(self.scheduler.sessions):
            self.scheduler.cancel(session_id)
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None

    # ----------------------------------------------------------------- loop

    def _submit(
        self, session_id: str, new_embeds: torch.Tensor, params: SamplingParams, prefix_key: str | None
    ) -> Request:
        embeds = self.runner.turn_inputs(new_embeds, self.scheduler.pending_token(session_id))
        request = self.scheduler.submit(session_id, embeds, embeds.shape[0], params, prefix_key)
        if request.opens_session and prefix_key is not None:
            self.runner.copy_prefix(prefix_key, self.scheduler.sessions[session_id].slot)
        if self._task is None or self._task.done():
            self._task = asyncio.get_running_loop().create_task(self._run())
        self._wakeup.set()
        return request

    async def _run(self) -> None:
        while True:
            if not self.scheduler.has_work and self._in_flight is None:
                self._wakeup.clear()
                await self._wakeup.wait()
                continue
            try:
                with torch.inference_mode():
                    self._step()
            except Exception as error:  # a failed step ends every open turn with the error
                self._in_flight = None
                self.scheduler.fail_all(error)
            await asyncio.sleep(0)

    def _step(self) -> None:
        """Prefill what the scheduler picks, launch the next decode step, then hand out the tokens
        of the previous launch (read while the GPU already runs the next step)."""
        starting = self._prefill()
        started = time.perf_counter()
        previous, self._in_flight = self._in_flight, None
        plan = self.scheduler.plan_decode(previous.rows if previous is not None else None)
        if plan is not None:
            self._in_flight = self.runner.launch(plan, previous)
        if previous is not None:
            self.scheduler.deliver_launch(previous.rows, self.runner.collect(previous))
            self._activity.add("decode", time.perf_counter() - started, len(previous.rows))
            if previous.started is not None:
                self._activity.add("decode_gpu", gpu_seconds(previous.started, previous.ready), len(previous.rows))
        self.scheduler.start_decoding(starting)

    def _prefill(self) -> list[Session]:
        """Run the prefill forwards the scheduler plans; returns the sessions whose prefill completed
        (first token delivered)."""
        completed = []
        forwards = 0
        started = time.perf_counter()
        gpu_started = timing_event() if self.runner.on_cuda and self.scheduler.prefill_queue else None
        while rows := self.scheduler.prefill_rows(forwards):
            hidden = self.runner.prefill(rows)
            forwards += 1
            finishing = self.scheduler.prefilled(rows)
            if finishing:
                for (_, _, session), token in zip(finishing, self.runner.sample_last(hidden, finishing)):
                    self.scheduler.deliver(session, token)
                    completed.append(session)
        if forwards:
            self._activity.add("prefill", time.perf_counter() - started, forwards)
            if gpu_started is not None:
                self._gpu_prefills.append((gpu_started, timing_event(), forwards))
        self._log_gpu_prefills()
        return completed

    def _log_gpu_prefills(self) -> None:
        """Account the GPU time of the prefill forwards whose work has finished (no waiting: a
        forward that delivered no first token was not waited for)."""
        while self._gpu_prefills and self._gpu_prefills[0][1].query():
            gpu_started, ended, forwards = self._gpu_prefills.pop(0)
            self._activity.add("prefill_gpu", gpu_seconds(gpu_started, ended), forwards)
