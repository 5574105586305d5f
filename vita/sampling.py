"""Batched next-token sampling on device: greedy, temperature, top-k and top-p, per-row parameters."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from layers.host_copy import to_device


@dataclass(frozen=True)
class SamplingParams:
    """How to pick tokens for one request. ``temperature == 0`` means greedy; ``top_k == 0`` disables top-k."""

    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    max_tokens: int = 512

    def __post_init__(self) -> None:
        if self.temperature < 0 or not 0 < self.top_p <= 1 or self.top_k < 0 or self.max_tokens < 1:
            raise ValueError(f"invalid sampling parameters: {self}")


@dataclass
class SamplingBatch:
    """Per-row parameters of a batch, as device tensors, plus host flags choosing the cheapest path."""

    temperature: torch.Tensor  # [B] float32
    top_p: torch.Tensor  # [B] float32
    top_k: torch.Tensor  # [B] int64
    all_greedy: bool
    needs_filter: bool

    @classmethod
    def from_params(cls, params: list[SamplingParams], device: torch.device | str) -> SamplingBatch:
        """One row per request, in order."""
        table = to_device([[p.temperature, p.top_p, p.top_k] for p in params], torch.device(device), torch.float32)
        return cls(
            temperature=table[:, 0],
            top_p=table[:, 1],
            top_k=table[:, 2].long(),
            all_greedy=all(p.temperature == 0 for p in params),
            needs_filter=any(p.temperature > 0 and (p.top_p < 1 or p.top_k > 0) for p in params),
        )


def sample(logits: torch.Tensor, batch: SamplingBatch, generator: torch.Generator | None = None) -> torch.Tensor:
    """Pick one token id per row of ``logits [B, vocab]``; stays on device (no host sync)."""
    logits = logits.float()
    greedy_ids = logits.argmax(dim=-1)
    if batch.all_greedy:
        return greedy_ids
    scaled = logits / batch.temperature.clamp_min(1e-5)[:, None]
    if batch.needs_filter:
        scaled, order = scaled.sort(dim=-1, descending=True)
        scaled = scaled.masked_fill(~_nucleus_and_top_k(scaled, batch), float("-inf"))
    probs = scaled.softmax(dim=-1)
    # Exponential race: argmax(p / E) with E ~ Exp(1) draws index i with probability p_i.
    noise = torch.empty_like(probs).exponential_(generator=generator)
    sampled = (probs / noise).argmax(dim=-1)
    if batch.needs_filter:
        sampled = order.gather(-1, sampled[:, None])[:, 0]
    return torch.where(batch.temperature > 0, sampled, greedy_ids)


def sample_requests(
    logits: torch.Tensor, params: list[SamplingParams], generator: torch.Generator | None = None
) -> torch.Tensor:
    """``sample`` with one row per request in ``params``; an all-greedy batch builds no parameter tensors."""
    if all(p.temperature == 0 for p in params):
        return logits.argmax(dim=-1)
    return sample(logits, SamplingBatch.from_params(params, logits.device), generator)


def _nucleus_and_top_k(sorted_logits: torch.Tensor, batch: SamplingBatch) -> torch.Tensor:
    """Keep-mask over descending-sorted logits: the top-k ranks and the smallest prefix reaching top_p."""
    probs = sorted_logits.softmax(dim=-1)
    mass_before = probs.cumsum(dim=-1) - probs
    keep = mass_before < batch.top_p[:, None]
    ranks = torch.arange(sorted_logits.shape[-1], device=sorted_logits.device)
    keep &= (batch.top_k[:, None] == 0) | (ranks < batch.top_k[:, None])
    keep[:, 0] = True
    return keep
