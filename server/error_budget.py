"""Per-session error budget: garbage input gets a bounded number of error events, then a close.

Every client error is counted. At most ``events_per_s`` of them a second are sent (and
logged); the others are counted as suppressed until the next event reports them. Errors
also fill a bucket that drains at ``events_per_s``: a client that keeps erring faster than
that overflows it after ``close_after`` excess errors and its session is closed.
"""

from __future__ import annotations

import time
from enum import Enum
from typing import Callable

from server.protocol import ERROR_EVENTS_PER_S

WINDOW_S = 1.0
CLOSE_AFTER_EXCESS_ERRORS = 100


class Verdict(Enum):
    """What to do with one client error."""

    SEND = "send"
    SUPPRESS = "suppress"
    CLOSE = "close"


class ErrorBudget:
    """``admit()`` for each client error; ``take_suppressed()`` when an error event goes out."""

    def __init__(
        self,
        events_per_s: int = ERROR_EVENTS_PER_S,
        close_after: int = CLOSE_AFTER_EXCESS_ERRORS,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.events_per_s = events_per_s
        self.close_after = close_after
        self._clock = clock
        self._window_start = float("-inf")
        self._sent_in_window = 0
        self._level = 0.0  # the leaky bucket
        self._level_at = clock()
        self.suppressed = 0  # errors not sent since the last error event

    @property
    def window_end(self) -> float:
        """When the current window ends (monotonic s): suppressed errors are reported by then."""
        return self._window_start + WINDOW_S

    def admit(self) -> Verdict:
        """Count one client error and say whether to send it, suppress it or close the session."""
        now = self._clock()
        self._level = max(0.0, self._level - (now - self._level_at) * self.events_per_s) + 1
        self._level_at = now
        if self._level > self.close_after:
            return Verdict.CLOSE
        if now >= self.window_end:
            self._window_start, self._sent_in_window = now, 0
        if self._sent_in_window < self.events_per_s:
            self._sent_in_window += 1
            return Verdict.SEND
        self.suppressed += 1
        return Verdict.SUPPRESS

    def take_suppressed(self) -> int:
        """The suppressed count to report in the error event about to be sent; resets it."""
        count, self.suppressed = self.suppressed, 0
        return count
