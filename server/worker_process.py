"""The model worker in a process of its own, so that the gateway and the model threads do not share a GIL.

On an H200 with 64 clients the gateway's loop (websockets, VAD, audio input) held the GIL in about
half of the samples of a burst in which a thread held it at all, and every model thread waited for
it after each CUDA sync: one more busy Python thread in the process slowed the engine's decode step
from 4-5 to 12-14 ms (benchmarks/README.md). Here the gateway keeps the process it started in and
the worker (`ModelWorker`, unchanged: engine, encoders, speech threads) runs in a spawned child.

`ProcessWorker` (gateway side) does for the app, the sessions (`server.turns.TurnRunner`) and the
watchdog what `ModelWorker` does in-process. Each side has a pipe reader thread and a sender thread,
so neither event loop ever blocks on the pipe. Gateway → child: ("open" | "reset", session, prompt),
("close", session), ("turn", id, TurnRequest), ("cancel", id, discard), ("beat",), ("stop",).
Child → gateway: ("ready",), ("load_error", message), ("outputs", [(id, TurnOutput), ...]) once per
iteration of the child's loop, ("health", loop lag or None, failure or None) for each beat.
A restart kills the child and starts another, which loads the weights again; unlike the in-process
restart this also frees a CUDA context that hung.
"""

from __future__ import annotations

import asyncio
import contextlib
import faulthandler
import itertools
import logging
import multiprocessing
import os
import queue
import signal
import threading
import time
from collections import defaultdict
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import torch

from server.settings import ServerSettings
from server.turns import TurnRequest, Worker
from server.worker import ModelWorker, WorkerIdentity
from vita.turn_outputs import OutputCallback, TurnFailed, TurnFinished, TurnOutput

log = logging.getLogger("vita.worker")

STOP_TIMEOUT_S = 15.0  # the child's own worker.stop() waits up to 10 s
READY_POLL_S = 0.05
STACKS_WAIT_S = 0.5  # for a failed child to write its threads' stacks before it is killed


def new_worker(settings: ServerSettings, checkpoint: Path, is_tiny: bool) -> Worker:
    """The worker `settings.worker_process` asks for: in a child process, or in a thread of this one."""
    return (ProcessWorker if settings.worker_process else ModelWorker)(settings, checkpoint, is_tiny)


class PipeSender:
    """Sends messages over a pipe from a thread of its own: `send` never blocks its caller."""

    def __init__(self, conn: Connection, name: str) -> None:
        self._conn = conn
        self._queue: queue.SimpleQueue[Any] = queue.SimpleQueue()
        threading.Thread(target=self._run, name=name, daemon=True).start()

    def send(self, message: Any) -> None:
        self._queue.put(message)

    def close(self) -> None:
        """Stop after the messages queued so far."""
        self._queue.put(None)

    def _run(self) -> None:
        while (message := self._queue.get()) is not None:
            try:
                self._conn.send(message)
            except (OSError, ValueError):  # the other side is gone
                return


class ProcessTurn:
    """A turn running in the child; `cancel` is safe from any thread."""

    def __init__(self, worker: ProcessWorker, turn_id: int) -> None:
        self._worker = worker
        self._turn_id = turn_id

    def cancel(self, discard: bool = False) -> None:
        self._worker._cancel(self._turn_id, discard)


class ProcessWorker(WorkerIdentity):
    """`ModelWorker`'s interface for the gateway, with the worker in a child process."""

    def __init__(self, settings: ServerSettings, checkpoint: Path, is_tiny: bool) -> None:
        super().__init__(settings, checkpoint, is_tiny)
        self.beat_lag_s: float | None = None  # the longest loop lag the child reported since the watchdog took it
        self._spawn_context = multiprocessing.get_context("spawn")  # CUDA cannot be forked
        self._process: multiprocessing.process.BaseProcess | None = None
        self._conn: Connection | None = None
        self._sender: PipeSender | None = None
        self._turns: dict[int, tuple[asyncio.AbstractEventLoop, OutputCallback]] = {}
        self._turn_ids = itertools.count()
        self._last_health = time.monotonic()
        self._child_failure: str | None = None

    # ------------------------------------------------------------------ lifecycle

    def start(self) -> None:
        """Start the child; the model loads there (``ready`` turns True when done)."""
        parent, child = self._spawn_context.Pipe()
        process = self._spawn_context.Process(target=run_child, args=(child, self.settings, self.checkpoint,
                                              self.is_tiny), name="vita-worker", daemon=True)
        process.start()
        child.close()
        self._process, self._conn = process, parent
        self._sender = PipeSender(parent, "vita-worker-sender")
        self._last_health, self._child_failure = time.monotonic(), None
        threading.Thread(target=self._read, args=(parent,), name="vita-worker-reader", daemon=True).start()
        log.info("worker_process_started pid=%s", process.pid)

    def stop(self) -> None:
        """Ask the child to stop its worker and exit; kill it if it does not in time."""
        if self._process is None or not self._process.is_alive():
            return
        self._send(("stop",))
        self._process.join(STOP_TIMEOUT_S)
        self._end_child()
        log.info("worker_stopped")

    def restart(self) -> None:
        """Kill the child (dead or hung: its sessions are gone) and start a new one, which loads the weights.
        A child still alive first writes every thread's Python stack to its stderr, the server's log
        (`faulthandler`, which needs no GIL: what a hung worker waits on)."""
        self.ready = False
        self.load_error = None
        process = self._process
        if process is not None and process.is_alive() and process.pid is not None:
            log.error("worker_process_stacks pid=%s: written to stderr", process.pid)
            with contextlib.suppress(ProcessLookupError):
                os.kill(process.pid, signal.SIGUSR1)
            time.sleep(STACKS_WAIT_S)
        self._end_child()
        self._turns.clear()
        self.start()

    def _end_child(self) -> None:
        process, conn, sender = self._process, self._conn, self._sender
        self._conn = None  # from now on its reader thread ignores what comes and how it ends
        if process is not None and process.is_alive():
            process.kill()
            process.join(STOP_TIMEOUT_S)
        if sender is not None:
            sender.close()
        if conn is not None:
            conn.close()  # its reader thread ends

    # ------------------------------------------------------------------ health

    def heartbeat(self) -> None:
        """Ask the child for its health (its worker loop's lag and failure, if any)."""
        self._send(("beat",))

    def failure(self, hang_timeout_s: float) -> str | None:
        """Why the worker cannot serve: the child exited, has not answered a heartbeat for
        ``hang_timeout_s``, or reported its worker's failure; None while it loads."""
        if self._process is None or not self._process.is_alive():
            code = None if self._process is None else self._process.exitcode
            return f"the worker process exited (code {code})"
        if not self.ready:
            return None
        silent_s = time.monotonic() - self._last_health
        if silent_s > hang_timeout_s:
            return f"the worker process did not answer for {silent_s:.0f} s"
        return self._child_failure

    # ------------------------------------------------------------------ sessions (any thread)

    def open_session(self, session_id: str, system_prompt: str | None) -> None:
        self._send(("open", session_id, system_prompt))

    def reset_session(self, session_id: str, system_prompt: str | None) -> None:
        self._send(("reset", session_id, system_prompt))

    def close_session(self, session_id: str) -> None:
        self._send(("close", session_id))

    def start_turn(self, request: TurnRequest, on_output: OutputCallback) -> ProcessTurn:
        turn_id = next(self._turn_ids)
        self._turns[turn_id] = (asyncio.get_running_loop(), on_output)
        self._send(("turn", turn_id, request))
        return ProcessTurn(self, turn_id)

    def _cancel(self, turn_id: int, discard: bool) -> None:
        self._turns.pop(turn_id, None)  # nothing of it is delivered from now on
        self._send(("cancel", turn_id, discard))

    def _send(self, message: tuple[Any, ...]) -> None:
        if self._sender is not None:
            self._sender.send(message)

    # ------------------------------------------------------------------ from the child (reader thread)

    def _read(self, conn: Connection) -> None:
        while True:
            try:
                message = conn.recv()
            except (EOFError, OSError):  # the child exited or was killed; once loaded, `failure` says so
                self._exited_while_loading(conn)
                return
            if conn is not self._conn:  # a killed child's last words
                return
            kind = message[0]
            if kind == "outputs":
                self._dispatch(message[1])
            elif kind == "health":
                self._last_health = time.monotonic()
                lag, self._child_failure = message[1], message[2]
                if lag is not None:
                    self.beat_lag_s = max(self.beat_lag_s or 0.0, lag)
            elif kind == "ready":
                self._last_health = time.monotonic()
                self.ready = True
            elif kind == "load_error":
                self.load_error = message[1]

    def _exited_while_loading(self, conn: Connection) -> None:
        """A child gone before it was ready could not load the model: `load_error` says so at once."""
        process = self._process
        if conn is self._conn and not self.ready and self.load_error is None and process is not None:
            process.join(STOP_TIMEOUT_S)
            if conn is self._conn:  # not restarted meanwhile
                self.load_error = f"the worker process exited while loading the model (code {process.exitcode})"

    def _dispatch(self, outputs: list[tuple[int, TurnOutput]]) -> None:
        """Hand the outputs to their turns' loops, one wake-up per loop."""
        by_loop: dict[asyncio.AbstractEventLoop, list[tuple[int, TurnOutput]]] = defaultdict(list)
        for turn_id, output in outputs:
            if (entry := self._turns.get(turn_id)) is not None:
                by_loop[entry[0]].append((turn_id, output))
        for loop, batch in by_loop.items():
            with contextlib.suppress(RuntimeError):  # that loop is closed
                loop.call_soon_threadsafe(self._deliver, batch)

    def _deliver(self, batch: list[tuple[int, TurnOutput]]) -> None:
        """On the turns' loop: each output to its turn's callback, unless the turn was cancelled."""
        for turn_id, output in batch:
            entry = self._turns.get(turn_id)
            if entry is None:
                continue
            if isinstance(output, (TurnFinished, TurnFailed)):
                del self._turns[turn_id]
            try:
                entry[1](output)
            except Exception:  # one failing callback must not lose the others (as `LoopBridge`)
                log.exception("turn_output_callback_failed turn=%d", turn_id)


# ---------------------------------------------------------------------- the child


def run_child(conn: Connection, settings: ServerSettings, checkpoint: Path, is_tiny: bool) -> None:
    """The child process: a `ModelWorker` and a loop relaying the gateway's commands and its outputs."""
    from server.cli import configure_logging  # the child's own logging, as the server's

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the whole group: the gateway stops the child
    faulthandler.register(signal.SIGUSR1, all_threads=True)  # `ProcessWorker.restart` asks for the stacks
    configure_logging(settings.log_format, settings.log_level)
    if settings.resolved_device() == "cpu":
        torch.set_num_threads(settings.cpu_threads)
    asyncio.run(ChildRelay(conn, ModelWorker(settings, checkpoint, is_tiny)).run())


class ChildRelay:
    """Runs the gateway's commands on the worker and sends its outputs back, batched per loop iteration."""

    def __init__(self, conn: Connection, worker: ModelWorker) -> None:
        self.conn = conn
        self.worker = worker
        self.sender = PipeSender(conn, "vita-relay-sender")
        # id -> the worker's handle, kept after the turn ended until the session's next turn or its end:
        # a finished turn can still be discarded (a speculative reply that was complete before speech resumed)
        self.turns: dict[int, Any] = {}
        self.latest: dict[str, int] = {}  # session -> the id of its latest turn
        self.outbox: list[tuple[int, TurnOutput]] = []
        self.stopped = asyncio.Event()
        self.loop: asyncio.AbstractEventLoop | None = None

    async def run(self) -> None:
        self.loop = asyncio.get_running_loop()
        self.worker.start()
        threading.Thread(target=self._read, name="vita-relay-reader", daemon=True).start()
        while not (self.worker.ready or self.worker.load_error):
            await asyncio.sleep(READY_POLL_S)
        self.sender.send(("ready",) if self.worker.ready else ("load_error", self.worker.load_error))
        await self.stopped.wait()
        await asyncio.to_thread(self.worker.stop)
        self.sender.close()

    def _read(self) -> None:
        while True:
            try:
                message = self.conn.recv()
            except (EOFError, OSError):  # the gateway is gone: stop
                message = ("stop",)
            self.loop.call_soon_threadsafe(self._handle, message)
            if message[0] == "stop":
                return

    def _handle(self, message: tuple[Any, ...]) -> None:
        kind = message[0]
        if kind == "turn":
            _, turn_id, request = message
            self._forget_latest(request.session_id)
            self.latest[request.session_id] = turn_id
            self.turns[turn_id] = self.worker.start_turn(request, lambda output: self._output(turn_id, output))
        elif kind == "cancel":
            _, turn_id, discard = message
            if (handle := self.turns.get(turn_id)) is not None:
                handle.cancel(discard)
        elif kind == "open":
            self.worker.open_session(message[1], message[2])
        elif kind == "reset":
            self._forget_latest(message[1])
            self.worker.reset_session(message[1], message[2])
        elif kind == "close":
            self._forget_latest(message[1])
            self.worker.close_session(message[1])
        elif kind == "beat":
            self.worker.heartbeat()
            lag, self.worker.beat_lag_s = self.worker.beat_lag_s, None
            failure = self.worker.failure(self.worker.settings.worker_hang_timeout_s) if self.worker.ready else None
            self.sender.send(("health", lag, failure))
        elif kind == "stop":
            self.stopped.set()

    def _forget_latest(self, session_id: str) -> None:
        """Let go of the session's latest turn's handle (the worker cancels that turn itself if it runs)."""
        if (turn_id := self.latest.pop(session_id, None)) is not None:
            self.turns.pop(turn_id, None)

    def _output(self, turn_id: int, output: TurnOutput) -> None:
        """On this loop (the worker's outputs come batched, `LoopBridge`): queue, sent once per iteration."""
        if not self.outbox:
            self.loop.call_soon(self._flush)
        self.outbox.append((turn_id, output))

    def _flush(self) -> None:
        self.sender.send(("outputs", self.outbox))
        self.outbox = []
