"""Fixed shapes on CUDA: the batch sizes and attended spans that work is padded to.

Each new shape costs once: a CUDA graph of the decoder step is captured per (batch, span), and cuDNN
builds an execution plan for every new codec input shape (60 to 100 ms on an H200 with the
full-size codec). Padding to a few sizes makes all of that happen at start-up.
"""

from __future__ import annotations

SMALLEST_SPAN = 64


def batch_buckets(largest: int) -> tuple[int, ...]:
    """1, 2, 4, then multiples of 8, then `largest` (as vita/engine.py's decode graphs)."""
    small = [b for b in (1, 2, 4) if b < largest]
    return (*small, *range(8, largest, 8), largest)


def span_buckets(capacity: int) -> tuple[int, ...]:
    """Powers of two from 64, then `capacity`."""
    spans, span = [], SMALLEST_SPAN
    while span < capacity:
        spans.append(span)
        span *= 2
    return (*spans, capacity)


def padded(size: int, buckets: tuple[int, ...]) -> int:
    """The smallest bucket that holds `size` (`size` itself past the largest)."""
    return next((b for b in buckets if b >= size), size)
