"""Qwen2 decoder (the VITA-1.5 LLM) attending over a caller-owned, slot-based KV cache.

Key names mirror the checkpoint: ``embed_tokens``, ``layers.N.self_attn.{q,k,v,o}_proj``,
``layers.N.mlp.{gate,up,down}_proj``, ``layers.N.{input,post_attention}_layernorm``, ``norm``.
``lm_head`` lives in the composite model; ``Qwen2Model`` returns final-normed hidden states.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass(frozen=True)
class LLMConfig:
    """Dimensions of a Qwen2 decoder."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    rms_norm_eps: float
    rope_theta: float
    max_position_embeddings: int

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @classmethod
    def full(cls) -> LLMConfig:
        """Qwen2.5-7B, the VITA-1.5 LLM."""
        return cls(152064, 3584, 18944, 28, 28, 4, 1e-6, 1e6, 32768)

    @classmethod
    def tiny(cls, vocab_size: int = 512) -> LLMConfig:
        """Small dims for tests; ``vocab_size`` should match the tiny tokenizer."""
        return cls(vocab_size, 64, 128, 2, 4, 2, 1e-6, 10000.0, 4096)

    @classmethod
    def from_hf_config(cls, config: dict) -> LLMConfig:
        """Parse a Hugging Face Qwen2 ``config.json`` dict (transformers 4.x or 5.x style)."""
        rope_theta = config.get("rope_theta")
        if rope_theta is None:
            rope_theta = config.get("rope_parameters", {}).get("rope_theta", 10000.0)
        heads = config["num_attention_heads"]
        return cls(
            vocab_size=config["vocab_size"],
            hidden_size=config["hidden_size"],
            intermediate_size=config["intermediate_size"],
            num_hidden_layers=config["num_hidden_layers"],
            num_attention_heads=heads,
            num_key_value_heads=config.get("num_key_value_heads", heads),
            rms_norm_eps=config.get("rms_norm_eps", 1e-6),
            rope_theta=float(rope_theta),
            max_position_embeddings=config.get("max_position_embeddings", 32768),
        )


class KVCache:
    """Static per-layer key/value slots ``[slots, max_len, kv_heads, head_dim]``, owned by the caller.

    A slot holds one sequence; position ``p`` of a sequence lives at index ``p`` of its slot.
    """

    def __init__(self, config: LLMConfig, slots: int, max_len: int, device: torch.device | str, dtype: torch.dtype):
        shape = (slots, max_len, config.num_key_value_heads, config.head_dim)
        self.k = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(config.num_hidden_layers)]
        self.v = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(config.num_hidden_layers)]
        self.slots = slots
        self.max_len = max_len

    def flat_index(self, slot_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Row of ``(slot_ids[b], positions[b, t])`` in a layer viewed as ``[slots * max_len, ...]``, flattened."""
        return (slot_ids[:, None] * self.max_len + positions).reshape(-1)

    def write(self, layer: int, flat_index: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        """Store ``k``/``v`` ``[B, T, kv_heads, head_dim]`` at the rows given by ``flat_index``."""
        for store, new in ((self.k[layer], k), (self.v[layer], v)):
            store.view(-1, *store.shape[2:]).index_copy_(0, flat_index, new.reshape(-1, *new.shape[2:]))

    def read(self, layer: int, slot_ids: torch.Tensor, kv_len: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values of the first ``kv_len`` positions of each slot: ``[B, kv_heads, kv_len, head_dim]``."""
        return self.k[layer][slot_ids, :kv_len].transpose(1, 2), self.v[layer][slot_ids, :kv_len].transpose(1, 2)


class RMSNorm(nn.Module):
    """Root-mean-square norm with a learned scale (statistics in fp32)."""

    def __init__(self, size: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.rms_norm(x, self.weight.shape, self.weight, self.eps)


class RotaryEmbedding(nn.Module):
    """cos/sin tables for rotate-half RoPE at arbitrary positions."""

    def __init__(self, head_dim: int, theta: float):
        super().__init__()
        inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float) / head_dim))
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    def forward(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """``positions [B, T]`` -> cos and signed sin ``[B, T, 1, head_dim]`` (broadcast over heads).

        The signed sin has its first half negated, so that rotate-half becomes a plain roll.
        """
        freqs = positions[..., None].float() * self.inv_freq
        cos = torch.cat((freqs.cos(), freqs.cos()), dim=-1)
        signed_sin = torch.cat((-freqs.sin(), freqs.sin()), dim=-1)
        return cos[:, :, None].to(dtype), signed_sin[:, :, None].to(dtype)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, signed_sin: torch.Tensor) -> torch.Tensor:
    """Rotate ``x [B, T, heads, head_dim]``: ``x * cos + rotate_half(x) * sin`` with rotate_half = [-x2, x1]."""
    return torch.addcmul(x * cos, x.roll(x.shape[-1] // 2, dims=-1), signed_sin)


def attention_bias(allowed: torch.Tensor, group: int, dtype: torch.dtype) -> torch.Tensor:
    """Boolean ``allowed [B, 1, T, L]`` -> additive bias ``[B, 1, group * T, L]`` for the folded queries."""
    bias = torch.zeros(allowed.shape, dtype=dtype, device=allowed.device).masked_fill_(~allowed, float("-inf"))
    return bias.repeat(1, 1, group, 1)


def grouped_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """GQA through SDPA without repeating K/V.

    ``q [B, T, heads, D]``, ``k``/``v [B, kv_heads, L, D]``, ``bias`` from ``attention_bias``.
    The query heads sharing a KV head are folded into the query length (a free view when T == 1).
    Returns ``[B, T, heads * D]``.
    """
    batch, length, heads, head_dim = q.shape
    kv_heads = k.shape[1]
    group = heads // kv_heads
    folded = q.view(batch, length, kv_heads, group, head_dim).permute(0, 2, 3, 1, 4)
    folded = folded.reshape(batch, kv_heads, group * length, head_dim)
    out = F.scaled_dot_product_attention(folded, k, v, attn_mask=bias)
    out = out.view(batch, kv_heads, group, length, head_dim).permute(0, 3, 1, 2, 4)
    return out.reshape(batch, length, heads * head_dim)


class Qwen2Attention(nn.Module):
    """Self-attention with biased q/k/v projections, RoPE and grouped KV heads."""

    def __init__(self, config: LLMConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.head_dim = config.head_dim
        kv_size = self.num_kv_heads * self.head_dim
        self.q_proj = nn.Linear(config.hidden_size, self.num_heads * self.head_dim, bias=True)
        self.k_proj = nn.Linear(config.hidden_size, kv_size, bias=True)
        self.v_proj = nn.Linear(config.hidden_size, kv_size, bias=True)
        self.o_proj = nn.Linear(self.num_heads * self.head_dim, config.hidden_size, bias=False)

    def forward(
        self,
        x: torch.Tensor,
        rope: tuple[torch.Tensor, torch.Tensor],
        bias: torch.Tensor,
        cache: CacheAccess | None,
    ) -> torch.Tensor:
        batch, length, _ = x.shape
        q = self.q_proj(x).view(batch, length, self.num_heads, self.head_dim)
        k = self.k_proj(x).view(batch, length, self.num_kv_heads, self.head_dim)
        v = self.v_proj(x).view(batch, length, self.num_kv_heads, self.head_dim)
        q, k = apply_rotary(q, *rope), apply_rotary(k, *rope)
        if cache is None:
            k, v = k.transpose(1, 2), v.transpose(1, 2)
        else:
            k, v = cache.write_and_read(self.layer_idx, k, v)
        return self.o_proj(grouped_attention(q, k, v, bias))


class Qwen2MLP(nn.Module):
    """SwiGLU feed-forward."""

    def __init__(self, config: LLMConfig):
        super().__init__()
        self.gate_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Qwen2DecoderLayer(nn.Module):
    """Pre-norm attention block followed by a pre-norm MLP block."""

    def __init__(self, config: LLMConfig, layer_idx: int):
        super().__init__()
        self.self_attn = Qwen2Attention(config, layer_idx)
        self.mlp = Qwen2MLP(config)
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(
        self,
        x: torch.Tensor,
        rope: tuple[torch.Tensor, torch.Tensor],
        bias: torch.Tensor,
        cache: CacheAccess | None,
    ) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), rope, bias, cache)
        return x + self.mlp(self.post_attention_layernorm(x))


@dataclass
class CacheAccess:
    """Where one forward call reads and writes the KV cache."""

    cache: KVCache
    slot_ids: torch.Tensor  # [B]
    flat_index: torch.Tensor  # [B * T], from KVCache.flat_index
    kv_len: int  # attend over positions [0, kv_len) of each slot

    def write_and_read(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        self.cache.write(layer, self.flat_index, k, v)
        return self.cache.read(layer, self.slot_ids, self.kv_len)


class Qwen2Model(nn.Module):
    """Qwen2 decoder stack without ``lm_head``; returns final-normed hidden states."""

    def __init__(self, config: LLMConfig):
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(Qwen2DecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.rotary_emb = RotaryEmbedding(config.head_dim, config.rope_theta)

    def forward(
        self,
        inputs_embeds: torch.Tensor,
        positions: torch.Tensor,
        cache: KVCache,
        slot_ids: torch.Tensor,
        kv_len: int,
    ) -> torch.Tensor:
        """Run ``inputs_embeds [B, T, hidden]`` at ``positions [B, T]`` of slots ``slot_ids [B]``.

        New keys/values are written into ``cache``; each query attends to the cached positions
        ``<=`` its own, within the first ``kv_len`` positions of its slot.
        """
        key_positions = torch.arange(kv_len, device=positions.device)
        allowed = (key_positions <= positions[:, :, None])[:, None]
        access = CacheAccess(cache, slot_ids, cache.flat_index(slot_ids, positions), kv_len)
        return self._run_layers(inputs_embeds, positions, allowed, access)

    def forward_reference(self, inputs_embeds: torch.Tensor) -> torch.Tensor:
        """Plain causal forward over whole sequences ``[B, T, hidden]``, no cache."""
        batch, length, _ = inputs_embeds.shape
        positions = torch.arange(length, device=inputs_embeds.device).expand(batch, length)
        allowed = torch.ones(length, length, dtype=torch.bool, device=inputs_embeds.device).tril()[None, None]
        return self._run_layers(inputs_embeds, positions, allowed, None)

    def _run_layers(
        self, x: torch.Tensor, positions: torch.Tensor, allowed: torch.Tensor, cache: CacheAccess | None
    ) -> torch.Tensor:
        rope = self.rotary_emb(positions, x.dtype)
        group = self.config.num_attention_heads // self.config.num_key_value_heads
        bias = attention_bias(allowed, group, x.dtype)
        for layer in self.layers:
            x = layer(x, rope, bias, cache)
        return self.norm(x)
