"""Scaled dot-product attention that never picks cuDNN.

cuDNN attention builds an execution plan for every new input shape, which cost 63 to 118 ms per
new prompt length on an H100 (benchmarks/README.md), and 70 to 130 ms per TTS decoder step inside
the server (the attended span grows by one every step), while prompt, audio and reply lengths
change with every turn. Flash, memory-efficient and math attention take any shape without that cost.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

BACKENDS = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """``F.scaled_dot_product_attention(q, k, v, attn_mask=mask)`` restricted to ``BACKENDS``."""
    with sdpa_kernel(BACKENDS):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
