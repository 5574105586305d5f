"""Python's garbage collector in a serving process: what start-up built is frozen out of its scans,
and its passes are timed and logged.

A pass over the oldest generation walks every object the collector tracks, and no other thread of
the process runs Python meanwhile. After start-up the model worker holds hundreds of thousands of
them (319k on the 2-core CPU with the tiny checkpoint, where one full pass took 136 ms), and py-spy
caught the H200 worker at one allocation for about 250 ms during a 64-client burst, most likely in
such a pass (benchmarks/README.md, call 20). What is alive once start-up is done lives as long as the process:
`freeze_start_up_objects` moves it to the permanent generation, which no pass scans; a worker
that stops thaws them (`gc.unfreeze`), so that a restarted worker's old objects can be collected.
With it the H200 workers logged no full or slow pass under load (calls 21 and 22); their latencies
did not move: those stalls were not what made them.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import time
from typing import Any

SLOW_PASS_MS = 10.0  # a pass this long is logged even if it was not a full one
CHECK_EVERY_S = 1.0


def freeze_start_up_objects(logger: logging.Logger) -> None:
    """Collect what start-up left as garbage, then freeze every object still alive."""
    gc.collect()
    gc.freeze()
    logger.info("gc_frozen objects=%d", gc.get_freeze_count())


class GcPauses:
    """Times every collector pass (`gc.callbacks`; each pass costs two clock reads more) and logs,
    at most every `interval_s`, the passes since the last line when one was full or slow. Call
    `check` now and then (the worker does at each heartbeat) and `close` when done."""

    def __init__(self, logger: logging.Logger, interval_s: float = 10.0) -> None:
        self._logger, self._interval_s = logger, interval_s
        self._since = time.monotonic()
        self._started = 0.0
        self._passes = self._full_passes = 0
        self._total_s = self._longest_s = 0.0
        gc.callbacks.append(self._on_pass)

    def _on_pass(self, phase: str, info: dict[str, Any]) -> None:
        if phase == "start":
            self._started = time.perf_counter()
            return
        took = time.perf_counter() - self._started
        self._passes += 1
        self._full_passes += info["generation"] == 2
        self._total_s += took
        self._longest_s = max(self._longest_s, took)

    def check(self) -> None:
        now = time.monotonic()
        if now - self._since < self._interval_s:
            return
        if self._full_passes or self._longest_s * 1000 >= SLOW_PASS_MS:
            self._logger.info(
                "gc_passes window_s=%.1f passes=%d full=%d total_ms=%.1f longest_ms=%.1f frozen=%d",
                now - self._since, self._passes, self._full_passes, self._total_s * 1000,
                self._longest_s * 1000, gc.get_freeze_count(),
            )
        self._since = now
        self._passes = self._full_passes = 0
        self._total_s = self._longest_s = 0.0

    def close(self) -> None:
        gc.callbacks.remove(self._on_pass)


async def watch_gc(logger: logging.Logger) -> None:
    """Freeze what this process has built, then log its collector's passes until cancelled: for a
    process without a model worker (the gateway, whose worker runs in a child process)."""
    freeze_start_up_objects(logger)
    passes = GcPauses(logger)
    try:
        while True:
            await asyncio.sleep(CHECK_EVERY_S)
            passes.check()
    finally:
        passes.close()
        gc.unfreeze()
