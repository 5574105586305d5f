"""A hung or dead model worker on a real server (tiny checkpoint, loopback): sessions are told,
/readyz turns red, the watchdog restarts the worker and new sessions are answered again; a restart
that fails turns /healthz red.

The faults are real: the worker's event loop is blocked on a lock nobody releases, or a
``SystemExit`` raised in it ends the worker thread (a worker in a thread of the server process,
``worker_process=False``); a worker process (the default) is stopped with SIGSTOP or killed with SIGKILL.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import signal
import threading
import time
from pathlib import Path

import numpy as np
import psutil
import pytest
import soundfile as sf
import websockets

from server.background import BackgroundServer
from server.client import stream_audio
from server.settings import ServerSettings
from shared_data import AUDIO

HANG_TIMEOUT_S = 1.0
RESTART_DEADLINE_S = 30.0  # the operator's expectation: serving again within this


@pytest.fixture(scope="module")
def server(tiny_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory):
    settings = ServerSettings(worker_hang_timeout_s=HANG_TIMEOUT_S, cache_dir=tmp_path_factory.mktemp("cache"),
                              worker_process=False)
    with BackgroundServer(settings, tiny_checkpoint) as running:
        yield running


@pytest.fixture(scope="module")
def process_server(tiny_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory):
    settings = ServerSettings(worker_hang_timeout_s=HANG_TIMEOUT_S, cache_dir=tmp_path_factory.mktemp("cache"))
    with BackgroundServer(settings, tiny_checkpoint) as running:
        yield running


def hello() -> tuple[np.ndarray, int]:
    audio, rate = sf.read(AUDIO / "en_hello.wav", dtype="int16")
    return audio, rate


def kill_worker_loop(server: BackgroundServer) -> threading.Thread:
    """End the worker thread: a SystemExit escapes its event loop. Returns the thread."""

    def die() -> None:
        raise SystemExit("injected worker crash")

    thread = server.worker._thread
    server.worker._loop.call_soon_threadsafe(die)
    return thread


class ReadinessLog:
    """Polls /readyz and /healthz in a thread: every (seconds since start, readyz status, readyz body,
    healthz status) it saw."""

    def __init__(self, server: BackgroundServer) -> None:
        self.server = server
        self.seen: list[tuple[float, int, dict, int]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)
        self._started = time.monotonic()
        self._thread.start()

    def _poll(self) -> None:
        while not self._stop.is_set():
            status, body = self.server.get_json("/readyz")
            health = self.server.get_json("/healthz")[0]
            self.seen.append((time.monotonic() - self._started, status, body, health))
            time.sleep(0.02)

    def ready_again_after(self) -> float:
        """Seconds from the start until /readyz answered 200 after having been 503."""
        red = next(i for i, (_, status, _, _) in enumerate(self.seen) if status == 503)
        return next(t for t, status, _, _ in self.seen[red:] if status == 200)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5)


async def wait_ready(log: ReadinessLog) -> None:
    deadline = time.monotonic() + RESTART_DEADLINE_S + 5
    while time.monotonic() < deadline:
        if any(s == 503 for _, s, _, _ in log.seen) and log.seen[-1][1] == 200:
            return
        await asyncio.sleep(0.05)
    raise TimeoutError(f"not ready again: {log.seen[-3:]}")


async def assert_serves_a_turn(server: BackgroundServer) -> None:
    audio, rate = hello()
    generation = {"respect_not_addressed": False, "max_new_tokens": 8, "temperature": 0}
    result = await stream_audio(server.ws_url, audio, rate, speed=4, session_update={"generation": generation},
                                expected_turns=1, reply_timeout_s=30)
    assert not result.of_type("error"), result.events
    assert [t.done is not None for t in result.turns] == [True], result.events
    assert result.turns[0].audio_samples > 0


async def mid_reply_session(server: BackgroundServer) -> websockets.ClientConnection:
    """A session whose reply (512 tokens and their speech) is being generated."""
    audio, rate = hello()
    ws = await websockets.connect(server.ws_url)
    generation = {"respect_not_addressed": False, "max_new_tokens": 512, "temperature": 0}
    await ws.send(json.dumps({"type": "session.start", "sample_rate": rate, "generation": generation,
                              "vad": {"speculative_ms": 0}}))
    await ws.send(np.concatenate([audio, np.zeros(rate, dtype=np.int16)]).tobytes())
    while json.loads(await asyncio.wait_for(ws.recv(), 30))["type"] != "response.started":
        pass
    return ws


async def fatal_error(ws: websockets.ClientConnection) -> dict:
    """The error event that ends the session (text events before it are skipped), once closed."""
    error = None
    with contextlib.suppress(websockets.ConnectionClosed):
        async for message in ws:
            if isinstance(message, str) and json.loads(message)["type"] == "error":
                error = json.loads(message)
    assert error is not None
    return error


def lag_histogram(metrics: str) -> dict[str, float]:
    """``vita_worker_loop_lag_seconds`` buckets (le -> count) and ``count``, from /metrics text."""
    values = {}
    for line in metrics.splitlines():
        if line.startswith("vita_worker_loop_lag_seconds_bucket{"):
            values[line.split('le="')[1].split('"')[0]] = float(line.rsplit(" ", 1)[1])
        elif line.startswith("vita_worker_loop_lag_seconds_count "):
            values["count"] = float(line.rsplit(" ", 1)[1])
    return values


async def test_the_worker_loop_lag_is_measured(server: BackgroundServer) -> None:
    await asyncio.sleep(1.0)
    before = lag_histogram(server.get_text("/metrics"))
    # Busy for 0.5 s (well below the 1 s hang timeout): a heartbeat asked during that time (one is
    # asked every 0.25 s) waits at least 0.25 s for its answer; idle answers take milliseconds.
    server.worker._loop.call_soon_threadsafe(time.sleep, 0.5)
    await asyncio.sleep(1.5)
    after = lag_histogram(server.get_text("/metrics"))
    assert before["count"] > 0 and after["count"] > before["count"]
    assert (after["count"] - after["0.2"]) - (before["count"] - before["0.2"]) >= 1  # that wait was seen
    assert "vita_worker_failures_total 0.0" in server.get_text("/metrics")


async def test_a_hung_worker_is_restarted_and_new_sessions_are_served(
    server: BackgroundServer, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.ERROR, logger="vita.watchdog")
    ws = await mid_reply_session(server)
    readiness = ReadinessLog(server)
    deadlock = threading.Event()  # the worker loop waits on it forever: a real deadlock
    hung_thread = server.worker._thread
    server.worker._loop.call_soon_threadsafe(deadlock.wait)
    try:
        error = await asyncio.wait_for(fatal_error(ws), 10)
        assert (error["code"], error["fatal"]) == ("worker_failed", True)
        assert "did not answer" in error["message"]
        assert (ws.close_code, ws.close_reason) == (1013, "worker_failed")
        # the log says where the hung loop waits: its thread's stack ends in Event.wait
        [stacks] = [r.getMessage() for r in caplog.records if r.getMessage().startswith("worker_failed_threads")]
        worker_stack = stacks.split("thread vita-worker:\n")[1].split("\nthread ")[0]
        assert "in wait" in worker_stack.strip().splitlines()[-2]
        await wait_ready(readiness)
    finally:
        readiness.stop()
    restarting = [body for _, status, body, _ in readiness.seen if status == 503]
    assert restarting and all(body["status"] == "restarting" for body in restarting)
    assert all(health == 200 for *_, health in readiness.seen)
    assert readiness.ready_again_after() < HANG_TIMEOUT_S + RESTART_DEADLINE_S
    await assert_serves_a_turn(server)
    metrics = server.get_text("/metrics")
    assert "vita_worker_failures_total 1.0" in metrics and 'vita_worker_restarts_total{outcome="ok"} 1.0' in metrics
    deadlock.set()  # the abandoned loop wakes up, does nothing of what was queued on it, and stops
    hung_thread.join(10)
    assert not hung_thread.is_alive()
    await assert_serves_a_turn(server)


async def test_a_dead_worker_thread_is_restarted(server: BackgroundServer) -> None:
    ws = await mid_reply_session(server)
    dead = kill_worker_loop(server)
    error = await asyncio.wait_for(fatal_error(ws), 10)
    assert (error["code"], error["message"]) == (
        "worker_failed", "the model worker failed (the worker thread died) and is restarting; "
        "reconnect in a few seconds")
    dead.join(5)
    assert not dead.is_alive()
    deadline = time.monotonic() + RESTART_DEADLINE_S
    while server.get_json("/readyz")[0] != 200:
        assert time.monotonic() < deadline, server.get_json("/readyz")
        await asyncio.sleep(0.05)
    await assert_serves_a_turn(server)
    assert 'vita_worker_restarts_total{outcome="ok"} 2.0' in server.get_text("/metrics")


async def test_a_restart_that_fails_turns_healthz_red(tiny_checkpoint: Path, tmp_path: Path) -> None:
    settings = ServerSettings(worker_hang_timeout_s=HANG_TIMEOUT_S, cache_dir=tmp_path, worker_process=False)
    with BackgroundServer(settings, tiny_checkpoint) as server:
        assert server.get_json("/healthz") == (200, {"status": "ok"})

        def device_lost(*_: object) -> None:  # as after a CUDA error: every later kernel fails
            raise RuntimeError("CUDA error: an illegal memory access was encountered")

        server.worker.assistant.model.lm_head.register_forward_pre_hook(device_lost)
        kill_worker_loop(server)
        deadline = time.monotonic() + RESTART_DEADLINE_S
        while server.get_json("/healthz")[0] == 200:
            assert time.monotonic() < deadline
            await asyncio.sleep(0.05)
        status, body = server.get_json("/healthz")
        assert status == 503 and body["status"] == "failed" and "illegal memory access" in body["error"]
        status, body = server.get_json("/readyz")
        assert status == 503 and body["status"] == "failed"
        assert 'vita_worker_restarts_total{outcome="failed"} 1.0' in server.get_text("/metrics")
        async with websockets.connect(server.ws_url) as ws:
            error = json.loads(await asyncio.wait_for(ws.recv(), 5))
            assert (error["code"], error["fatal"]) == ("not_ready", True)


def worker_pid(server: BackgroundServer) -> int:
    return server.worker._process.pid


def is_running(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


async def test_the_worker_process_answers_turns_and_reports_its_loop_lag(process_server: BackgroundServer) -> None:
    pid = worker_pid(process_server)
    assert pid != os.getpid() and is_running(pid)
    assert process_server.get_json("/readyz")[1]["status"] == "ready"
    await assert_serves_a_turn(process_server)
    await asyncio.sleep(1.0)  # heartbeats every 0.25 s, each answered by the child with its worker loop's lag
    assert lag_histogram(process_server.get_text("/metrics"))["count"] > 0


@pytest.mark.parametrize(("fault", "reason"), [(signal.SIGKILL, "the worker process exited (code -9)"),
                                               (signal.SIGSTOP, "the worker process did not answer")])
async def test_a_killed_or_stopped_worker_process_is_replaced(process_server: BackgroundServer, fault: int,
                                                              reason: str) -> None:
    ws = await mid_reply_session(process_server)
    readiness = ReadinessLog(process_server)
    old = worker_pid(process_server)
    os.kill(old, fault)
    try:
        error = await asyncio.wait_for(fatal_error(ws), 10)
        assert error["code"] == "worker_failed" and reason in error["message"], error
        await wait_ready(readiness)
    finally:
        readiness.stop()
    assert worker_pid(process_server) != old and not is_running(old)  # a stopped child was killed, not left behind
    await assert_serves_a_turn(process_server)

