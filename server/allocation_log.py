"""How often the CUDA allocators grew: device and pinned host allocations since the last line.

A server's first burst of users was 300 to 450 ms slower at p95 than the next ones on an H200
(benchmarks/README.md, calls 15 to 17). One candidate is the caching allocators growing to the
burst's sizes (`cudaMalloc`, `cudaHostAlloc`) while every thread launches work; these lines show
whether they do, and how long the pinned allocations took.
"""

from __future__ import annotations

import logging
import time

import torch

COUNTERS = ("device_allocs", "device_frees", "host_allocs", "host_alloc_us")


def allocation_counts(device: torch.device) -> dict[str, int]:
    """The allocators' running totals (`COUNTERS`) for `device`."""
    device_stats = torch.cuda.memory_stats(device)
    host_memory_stats = getattr(torch.cuda, "host_memory_stats", None)  # newer torch only
    host_stats = host_memory_stats() if host_memory_stats is not None else {}
    return {
        "device_allocs": device_stats.get("num_device_alloc", 0),
        "device_frees": device_stats.get("num_device_free", 0),
        "host_allocs": host_stats.get("num_host_alloc", 0),
        "host_alloc_us": host_stats.get("host_alloc_time.total", 0),
    }


class AllocationLog:
    """Logs the growth of the CUDA allocators every `interval_s` at most, when there was any.
    Call `check` now and then (the worker does at each heartbeat), from one thread."""

    def __init__(self, logger: logging.Logger, device: torch.device, interval_s: float = 10.0) -> None:
        self._logger, self._device, self._interval_s = logger, device, interval_s
        self._since = time.monotonic()
        self._last = allocation_counts(device)

    def check(self) -> None:
        now = time.monotonic()
        if now - self._since < self._interval_s:
            return
        counts = allocation_counts(self._device)
        grown = {name: counts[name] - self._last[name] for name in COUNTERS}
        if any(grown.values()):
            self._logger.info(
                "cuda_allocations window_s=%.1f device_allocs=%d device_frees=%d reserved_gib=%.2f "
                "host_allocs=%d host_alloc_ms=%.1f", now - self._since, grown["device_allocs"],
                grown["device_frees"], torch.cuda.memory_reserved(self._device) / 2**30,
                grown["host_allocs"], grown["host_alloc_us"] / 1000,
            )
        self._since, self._last = now, counts
