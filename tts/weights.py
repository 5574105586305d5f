"""Strict checkpoint loading shared by the TTS decoder and codec."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path

import torch
from torch import nn


class WeightMismatchError(ValueError):
    """A checkpoint tensor is missing, unexpected or of the wrong shape."""


def read_checkpoint(path: Path) -> dict:
    """Load a `final.pt` file onto the CPU, tensors only."""
    return torch.load(path, map_location="cpu", weights_only=True)


def fold_weight_norm(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Replace each `X.weight_g` / `X.weight_v` pair (torch weight_norm, dim 0) by `X.weight`.

    weight = g * v / ||v||, the norm taken over every dimension but the first.
    """
    folded: dict[str, torch.Tensor] = {}
    for name, tensor in state_dict.items():
        if name.endswith(".weight_g"):
            continue
        if name.endswith(".weight_v"):
            stem = name[: -len("_v")]
            gain_name = stem + "_g"
            if gain_name not in state_dict:
                raise WeightMismatchError(f"{gain_name} is missing (needed with {name})")
            v = tensor.float()
            norm = v.flatten(1).norm(dim=1).view(-1, *([1] * (v.dim() - 1)))
            folded[stem] = (state_dict[gain_name].float() * v / norm).to(tensor.dtype)
        else:
            folded[name] = tensor
    orphans = [n for n in state_dict if n.endswith(".weight_g") and n[:-2] + "_v" not in state_dict]
    if orphans:
        raise WeightMismatchError(f"{orphans[0]} has no matching weight_v")
    return folded


def load_strict(
    module: nn.Module,
    state_dict: Mapping[str, torch.Tensor],
    *,
    where: str,
    ignore: Callable[[str], bool] = lambda name: False,
) -> None:
    """Assign `state_dict` to `module` (built on any device, meta included) after checking it.

    Every parameter must be present with its exact shape and no unknown tensor may remain
    (except names for which `ignore` is true); the error names the first offending tensor.
    """
    expected = module.state_dict()
    given = {name: tensor for name, tensor in state_dict.items() if not ignore(name)}
    for name, tensor in expected.items():
        if name not in given:
            raise WeightMismatchError(f"{where}: tensor {name} {tuple(tensor.shape)} is missing")
        if given[name].shape != tensor.shape:
            raise WeightMismatchError(
                f"{where}: tensor {name} has shape {tuple(given[name].shape)}, "
                f"the config expects {tuple(tensor.shape)}"
            )
    unexpected = sorted(set(given) - set(expected))
    if unexpected:
        raise WeightMismatchError(f"{where}: unexpected tensor {unexpected[0]} ({len(unexpected)} in all)")
    module.load_state_dict(given, strict=True, assign=True)
