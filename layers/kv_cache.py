"""Slot-based key/value cache: one tensor per layer, one slot per sequence, position p at index p."""

from __future__ import annotations

import torch


class KVCache:
    """Static per-layer slots ``[slots, max_len, 2 * kv_heads, head_dim]`` (key heads, then value heads).

    The caller owns it (the LLM's model runner, the TTS decoder batch) and says which slots and positions a
    forward writes and attends to; keys and values of a position go in with one write.
    """

    def __init__(
        self,
        *,
        num_layers: int,
        kv_heads: int,
        head_dim: int,
        slots: int,
        max_len: int,
        device: torch.device | str,
        dtype: torch.dtype,
    ) -> None:
        shape = (slots, max_len, 2 * kv_heads, head_dim)
        self.layers = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(num_layers)]
        self.kv_heads = kv_heads
        self.slots = slots
        self.max_len = max_len

    @property
    def dtype(self) -> torch.dtype:
        return self.layers[0].dtype

    @property
    def device(self) -> torch.device:
        return self.layers[0].device

    def flat_index(self, slot_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Row of ``(slot_ids[b], positions[b, t])`` in a layer viewed as ``[slots * max_len, ...]``, flattened."""
        return (slot_ids[:, None] * self.max_len + positions).reshape(-1)

    def write(self, layer: int, flat_index: torch.Tensor, kv: torch.Tensor) -> None:
        """Store keys and values ``kv [B, T, 2 * kv_heads, head_dim]`` at the rows given by ``flat_index``."""
        store = self.layers[layer]
        store.view(-1, *store.shape[2:]).index_copy_(0, flat_index, kv.reshape(-1, *kv.shape[2:]))

    def read(self, layer: int, slot_ids: torch.Tensor, kv_len: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values of the first ``kv_len`` positions of each slot (a copy): ``[B, kv_heads, kv_len, head_dim]``."""
        kv = self.layers[layer][slot_ids, :kv_len].transpose(1, 2)
        return kv[:, : self.kv_heads], kv[:, self.kv_heads :]

    def leading(self, layer: int, slots: int, kv_len: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``read`` of slots ``0..slots-1`` as views of the cache, no copy: ``[slots, kv_heads, kv_len, head_dim]``."""
        kv = self.layers[layer][:slots, :kv_len].transpose(1, 2)
        return kv[:, : self.kv_heads], kv[:, self.kv_heads :]
