"""Where a worker thread's time goes: seconds and item counts per activity, one log line per interval."""

from __future__ import annotations

import logging
import time
from collections import defaultdict


class ActivityLog:
    """Accumulates (seconds, calls, items) per activity of one thread; `add` logs the totals of the
    last `interval_s` once it has passed (one line, only while the thread is busy). One thread only."""

    def __init__(self, logger: logging.Logger, thread: str, interval_s: float = 10.0) -> None:
        self._logger, self._thread, self._interval_s = logger, thread, interval_s
        self._since = time.monotonic()
        self._totals: dict[str, list[float]] = defaultdict(lambda: [0.0, 0, 0])

    def add(self, activity: str, seconds: float, items: int = 1) -> None:
        totals = self._totals[activity]
        totals[0] += seconds
        totals[1] += 1
        totals[2] += items
        now = time.monotonic()
        if now - self._since >= self._interval_s:
            window = now - self._since
            parts = " ".join(
                f"{name}_busy={t[0] / window:.3f} {name}_calls={t[1]} {name}_ms={1000 * t[0] / t[1]:.2f} "
                f"{name}_items_per_call={t[2] / t[1]:.1f}"
                for name, t in sorted(self._totals.items())
            )
            self._logger.info("thread_activity thread=%s window_s=%.1f %s", self._thread, window, parts)
            self._since = now
            self._totals.clear()
