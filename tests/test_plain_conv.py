"""Convolutions without cuDNN equal the modules' own forward."""

import pytest
import torch
from torch import nn

from vita.plain_conv import conv_without_cudnn


@pytest.mark.parametrize("conv, shape", [
    (nn.Conv2d(1, 8, 3, 2), (2, 1, 21, 80)),
    (nn.Conv2d(3, 6, 14, stride=14), (3, 3, 56, 56)),
    (nn.Conv1d(8, 16, 5, stride=2, padding=2, dilation=2), (2, 8, 33)),
])
def test_equals_the_module(conv: nn.Module, shape: tuple[int, ...]) -> None:
    x = torch.randn(shape, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(conv_without_cudnn(conv, x), conv(x), rtol=1e-5, atol=1e-5)


def test_refuses_other_padding_modes() -> None:
    with pytest.raises(ValueError, match="zero padding"):
        conv_without_cudnn(nn.Conv1d(2, 2, 3, padding=1, padding_mode="reflect"), torch.zeros(1, 2, 8))
