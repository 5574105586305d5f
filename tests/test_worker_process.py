"""`ProcessWorker` on its own (tiny checkpoint, a real child process): what reaches the turns'
callbacks, and a child that dies while loading."""

from __future__ import annotations

import asyncio
import os
import signal
import time
from pathlib import Path

import pytest

from server.protocol import GenerationSettings
from server.settings import ServerSettings
from server.turns import TurnRequest
from server.worker_process import ProcessWorker
from vita.turn_outputs import TextDelta, TurnFinished, TurnOutput

GENERATION = GenerationSettings(max_new_tokens=8, speak=False, respect_not_addressed=False)


def wait_until(condition, timeout_s: float = 60.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline
        time.sleep(0.05)


@pytest.fixture(scope="module")
def worker(tiny_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory):
    started = ProcessWorker(ServerSettings(cache_dir=tmp_path_factory.mktemp("cache")), tiny_checkpoint, True)
    started.start()
    wait_until(lambda: started.ready or started.load_error)
    assert started.load_error is None
    yield started
    started.stop()


async def test_a_failing_callback_loses_no_other_turns_outputs(worker: ProcessWorker) -> None:
    finished = asyncio.Event()
    received: list[TurnOutput] = []

    def failing(output: TurnOutput) -> None:
        raise RuntimeError("a bug in the session")

    def recording(output: TurnOutput) -> None:
        received.append(output)
        if isinstance(output, TurnFinished):
            finished.set()

    for session, callback in (("failing", failing), ("recording", recording)):
        worker.open_session(session, None)
        worker.start_turn(TurnRequest(session, 1, None, text="hello", generation=GENERATION), callback)
    await asyncio.wait_for(finished.wait(), 60)
    deltas = [o.text for o in received if isinstance(o, TextDelta)]
    assert isinstance(received[-1], TurnFinished) and "".join(deltas) == received[-1].text != ""


def test_a_worker_process_that_dies_while_loading_reports_a_load_error(tiny_checkpoint: Path, tmp_path: Path) -> None:
    worker = ProcessWorker(ServerSettings(cache_dir=tmp_path), tiny_checkpoint, is_tiny=True)
    worker.start()
    try:
        os.kill(worker._process.pid, signal.SIGKILL)
        wait_until(lambda: worker.load_error is not None and not worker.ready, timeout_s=30)
        assert worker.load_error == "the worker process exited while loading the model (code -9)"
    finally:
        worker.stop()


def test_a_restart_has_the_old_child_write_every_threads_stack_first(tiny_checkpoint: Path, tmp_path: Path,
                                                                      capfd: pytest.CaptureFixture) -> None:
    """What the watchdog does to a failed child: before it is killed, a child still alive writes the
    Python stack of each of its threads to its stderr (the server's log); then a new child loads."""
    worker = ProcessWorker(ServerSettings(cache_dir=tmp_path), tiny_checkpoint, True)
    worker.start()
    try:
        wait_until(lambda: worker.ready or worker.load_error)
        old = worker._process.pid
        capfd.readouterr()
        worker.restart()
        stacks = capfd.readouterr().err
        assert "most recent call first" in stacks and "run_child" in stacks and "_run_loop" in stacks
        wait_until(lambda: worker.ready or worker.load_error)
        assert worker.load_error is None and worker._process.pid != old
    finally:
        worker.stop()
