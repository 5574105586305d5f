"""Fixed shapes on CUDA: the batch sizes and attended lengths that work is padded to.

Each new shape costs once: a CUDA graph is captured per (batch, length) of the LLM's decode step
and of the TTS decoder's step, and cuDNN builds an execution plan for every new codec input shape
(60 to 100 ms on an H200 with the full-size codec). Padding to a few sizes makes all of that
happen at start-up.
"""

from __future__ import annotations


def batch_buckets(largest: int) -> tuple[int, ...]:
    """1, 2, 4, then multiples of 8, then `largest`."""
    small = [b for b in (1, 2, 4) if b < largest]
    return (*small, *range(8, largest, 8), largest)


def span_buckets(capacity: int, smallest: int = 64) -> tuple[int, ...]:
    """Powers of two from `smallest`, then `capacity`."""
    spans, span = [], smallest
    while span < capacity:
        spans.append(span)
        span *= 2
    return (*spans, capacity)


def padded(size: int, buckets: tuple[int, ...]) -> int:
    """The smallest bucket that holds `size` (`size` itself past the largest)."""
    return next((b for b in buckets if b >= size), size)
