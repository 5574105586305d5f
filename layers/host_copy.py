"""Small host values (ids, positions, lengths, sampling settings) to the GPU without a wait.

A copy from ordinary (pageable) host memory to a GPU first waits for every kernel queued on the
stream, so a `torch.tensor(values, device="cuda")` between launches stops the launching thread until
the GPU has caught up: the engine's decode step launched ahead of time would no longer run while the
host prepares the next one. From pinned host memory the copy is queued like a kernel and the thread
goes on; PyTorch's pinned allocator keeps the buffer until the copy is done.
"""

from __future__ import annotations

from typing import Any

import torch


def to_device(values: Any, device: torch.device, dtype: torch.dtype | None = None) -> torch.Tensor:
    """`torch.tensor(values, dtype=dtype)` on `device`; on CUDA queued on the current stream, without waiting."""
    if device.type != "cuda":
        return torch.tensor(values, dtype=dtype, device=device)
    return torch.tensor(values, dtype=dtype, pin_memory=True).to(device, non_blocking=True)
