"""Calls from the worker's event loop to the gateway's, handed over in batches.

A reply streams a text delta per token from the worker loop to the gateway loop: with one
``call_soon_threadsafe`` each, 64 sessions meant thousands of cross-thread wake-ups a second.
Calls made during one iteration of the source loop go over together, in order, with one wake-up.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Any

log = logging.getLogger("vita.bridge")

Call = tuple[Callable[..., Any], tuple[Any, ...]]


class LoopBridge:
    """``call`` from the source loop's thread; the calls run in order on the target loop."""

    def __init__(self, source: asyncio.AbstractEventLoop, target: asyncio.AbstractEventLoop) -> None:
        self.source = source
        self.target = target
        self._pending: list[Call] = []

    def call(self, function: Callable[..., Any], *args: Any) -> None:
        """Run ``function(*args)`` on the target loop, after every call made before it."""
        if not self._pending:
            self.source.call_soon(self._hand_over)  # at the end of this iteration of the source loop
        self._pending.append((function, args))

    def _hand_over(self) -> None:
        batch, self._pending = self._pending, []
        self.target.call_soon_threadsafe(_run_all, batch)


def _run_all(batch: list[Call]) -> None:
    for function, args in batch:
        try:
            function(*args)
        except Exception:  # one failing callback must not lose the others
            log.exception("bridged_call_failed function=%s", getattr(function, "__qualname__", function))
