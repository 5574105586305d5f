"""RMSNorm as Llama and Qwen2 define it (checkpoint key ``weight``)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class RMSNorm(nn.Module):
    """Root-mean-square norm: statistics in float32, result cast to the input dtype, then scaled.

    The LLM's layers read only ``weight`` and ``eps`` (their fused add-and-norm steps,
    ``vita.qwen2.add_rms_norm``); the TTS decoder calls the module.
    """

    def __init__(self, size: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.weight * F.rms_norm(x.float(), self.weight.shape, eps=self.eps).to(x.dtype)
