"""Worker watchdog: a dead or hung model worker is found by heartbeat and restarted.

Runs on the gateway loop (and measures that loop's lag as it goes). Every ``interval_s`` it asks the worker loop to answer a heartbeat and
checks ``Worker.failure`` (thread or process dead, loop silent past the hang timeout, a model thread dead,
a device error). On a failure every thread's stack of this process goes to the log (what an in-process worker
waited on; a worker process is killed and started afresh),
the sessions are told and closed first (``on_failure``: their
conversations lived in the worker), then the worker is restarted; while it restarts it is not
ready (/readyz 503, new connections get ``not_ready``). A restart that fails or is not ready within
``restart_timeout_s`` sets ``failed``: /healthz turns 503 so that the supervisor restarts the process.
"""

from __future__ import annotations

import asyncio
import logging
import sys
import threading
import time
import traceback
from collections.abc import Callable

from server.metrics import ServerMetrics
from server.turns import Worker

log = logging.getLogger("vita.watchdog")

MAX_INTERVAL_S = 1.0


class WorkerWatchdog:
    """``run`` as a task for the app's lifetime; ``failed`` says why the worker cannot be restarted."""

    def __init__(
        self,
        worker: Worker,
        metrics: ServerMetrics,
        on_failure: Callable[[str], None],
        *,
        hang_timeout_s: float,
        restart_timeout_s: float,
    ) -> None:
        self.worker = worker
        self.metrics = metrics
        self.on_failure = on_failure
        self.hang_timeout_s = hang_timeout_s
        self.restart_timeout_s = restart_timeout_s
        self.interval_s = min(MAX_INTERVAL_S, hang_timeout_s / 4)
        self.failed: str | None = None
        self.restarting: str | None = None  # why the worker is being restarted, while it is

    async def run(self) -> None:
        """Watch until a restart fails (the process must then be restarted)."""
        loop = asyncio.get_running_loop()
        while self.failed is None:
            asleep = loop.time()
            await asyncio.sleep(self.interval_s)
            self.metrics.loop_lag_seconds.observe(max(0.0, loop.time() - asleep - self.interval_s))
            if self.worker.ready:
                lag, self.worker.beat_lag_s = self.worker.beat_lag_s, None  # the previous heartbeat's answer
                if lag is not None:
                    self.metrics.worker_loop_lag_seconds.observe(lag)
                self.worker.heartbeat()
            reason = self.worker.failure(self.hang_timeout_s)
            if reason is not None:
                await self._recover(reason)

    async def _recover(self, reason: str) -> None:
        log.error("worker_failed reason=%r", reason)
        log.error("worker_failed_threads\n%s", thread_stacks())
        self.metrics.worker_failures.inc()
        self.on_failure(reason)
        self.restarting = reason
        started = time.monotonic()
        await asyncio.to_thread(self.worker.restart)
        while not self.worker.ready and self.worker.load_error is None:
            if time.monotonic() - started > self.restart_timeout_s:
                break
            await asyncio.sleep(0.05)
        self.restarting = None
        seconds = time.monotonic() - started
        if self.worker.ready:
            self.metrics.worker_restarts.labels("ok").inc()
            log.warning("worker_restarted seconds=%.1f", seconds)
            return
        self.metrics.worker_restarts.labels("failed").inc()
        self.failed = self.worker.load_error or f"not ready {self.restart_timeout_s:g} s after the restart"
        log.error("worker_restart_failed seconds=%.1f error=%r", seconds, self.failed)


def thread_stacks() -> str:
    """Where every thread of the process is now, named: what a hung worker waits on."""
    names = {thread.ident: thread.name for thread in threading.enumerate()}
    return "\n".join(
        f"thread {names.get(ident, ident)}:\n{''.join(traceback.format_stack(frame))}"
        for ident, frame in sys._current_frames().items()
    )
