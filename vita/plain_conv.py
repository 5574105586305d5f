"""Convolutions that never pick cuDNN.

PyTorch keeps cuDNN convolution plans per thread and per input shape; a new shape costs a plan
(tens of ms, up to 100 on an H200 for the codec). Whale's input length changes with every
utterance and the number of camera tiles with every batch, so their convolutions run PyTorch's
own kernels (im2col and a matrix product), which take any shape at no extra cost.
"""

from __future__ import annotations

import torch
from torch import nn


def conv_without_cudnn(conv: nn.Conv1d | nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
    """``conv(x)`` (zero padding) without cuDNN; equal up to summation order."""
    if conv.padding_mode != "zeros" or isinstance(conv.padding, str):
        raise ValueError("only numeric zero padding is supported")
    return torch._convolution(
        x, conv.weight, conv.bias, conv.stride, conv.padding, conv.dilation,
        False, (0,) * len(conv.stride), conv.groups,
        False, False, False, torch.backends.cudnn.allow_tf32,  # benchmark, deterministic, cudnn_enabled, tf32
    )
