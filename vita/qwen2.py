"""Qwen2 decoder (the VITA-1.5 LLM) attending over a caller-owned, slot-based KV cache.

Key names mirror the checkpoint: ``embed_tokens``, ``layers.N.self_attn.{q,k,v,o}_proj``,
``layers.N.mlp.{gate,up,down}_proj``, ``layers.N.{input,post_attention}_layernorm``, ``norm``.
``lm_head`` lives in the composite model; ``Qwen2Model`` returns final-normed hidden states.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from layers.attention import attention
from layers.kv_cache import KVCache
from layers.norm import RMSNorm


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


def new_kv_cache(
    config: LLMConfig, slots: int, max_len: int, device: torch.device | str, dtype: torch.dtype
) -> KVCache:
    """A zeroed cache of ``slots`` sequences of up to ``max_len`` positions for every layer of ``config``."""
    return KVCache(
        num_layers=config.num_hidden_layers, kv_heads=config.num_key_value_heads, head_dim=config.head_dim,
        slots=slots, max_len=max_len, device=device, dtype=dtype,
    )


def add_rms_norm(x: torch.Tensor, delta: torch.Tensor, weight: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Residual step then norm: ``(x + delta, rms_norm(x + delta))``."""
    x = x + delta
    return x, F.rms_norm(x, weight.shape, weight, eps)


def rotate_heads(x: torch.Tensor, cos: torch.Tensor, signed_sin: torch.Tensor) -> torch.Tensor:
    """Rotate-half RoPE of ``x [B, T, heads, head_dim]``: ``x * cos + [-x2, x1] * sin``.

    ``signed_sin`` has its first half negated, so that rotate-half becomes a plain roll.
    """
    return torch.addcmul(x * cos, x.roll(x.shape[-1] // 2, dims=-1), signed_sin)


def silu_and_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """SwiGLU of the fused ``[gate | up]`` projection."""
    gate, up = gate_up.chunk(2, dim=-1)
    return F.silu(gate) * up


class LayerKernels(NamedTuple):
    """How a layer runs its elementwise steps and one-token attention: eager PyTorch by default."""

    add_rms_norm: Callable = add_rms_norm
    rotate_heads: Callable = rotate_heads
    silu_and_mul: Callable = silu_and_mul
    decode_attention: Callable | None = None  # None: gather the keys, then SDPA


@functools.cache
def fast_kernels() -> LayerKernels:
    """Elementwise steps through ``torch.compile`` (dynamic shapes, compiled on first call) and
    Triton flash-decoding for one-token attention (``vita.decode_attention``)."""
    from vita.decode_attention import decode_attention

    eager = LayerKernels()
    compiled = (torch.compile(step, dynamic=True, fullgraph=True) for step in eager[:3])
    return LayerKernels(*compiled, decode_attention=decode_attention)


class RotaryEmbedding(nn.Module):
    """cos/sin tables for rotate-half RoPE at arbitrary positions."""

    def __init__(self, head_dim: int, theta: float):
        super().__init__()
        exponents = torch.arange(0, head_dim, 2, dtype=torch.float, device="cpu") / head_dim  # real even on meta
        inv_freq = 1.0 / theta**exponents
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    def forward(
        self, positions: torch.Tensor, dtype: torch.dtype, rotated_heads: int, kept_heads: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Tables for ``positions [B, T]`` over ``rotated_heads + kept_heads`` heads: cos and signed
        sin ``[B, T, heads, head_dim]``, the last ``kept_heads`` heads left as they are (cos 1, sin 0)."""
        freqs = positions[..., None].float() * self.inv_freq
        cos = torch.cat((freqs.cos(), freqs.cos()), dim=-1)[:, :, None]
        signed_sin = torch.cat((-freqs.sin(), freqs.sin()), dim=-1)[:, :, None]
        rotated = (*positions.shape, rotated_heads, cos.shape[-1])
        kept = cos.new_zeros(*positions.shape, kept_heads, cos.shape[-1])
        cos = torch.cat((cos.expand(rotated), kept + 1), dim=2)
        signed_sin = torch.cat((signed_sin.expand(rotated), kept), dim=2)
        return cos.to(dtype), signed_sin.to(dtype)


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
    out = attention(folded, k, v, bias)
    out = out.view(batch, kv_heads, group, length, head_dim).permute(0, 3, 1, 2, 4)
    return out.reshape(batch, length, heads * head_dim)


def fuse_linears(*linears: nn.Linear) -> tuple[torch.Tensor, torch.Tensor | None]:
    """One weight (and bias) stacking the outputs of ``linears`` that share an input.

    Each Linear's parameters become views of it: no second copy, and the names and
    ``state_dict`` stay those of the checkpoint. Moving the module afterwards breaks the sharing.
    """
    with torch.no_grad():
        weight = torch.cat([linear.weight for linear in linears])
        has_bias = linears[0].bias is not None
        bias = torch.cat([linear.bias for linear in linears]) if has_bias else None
    start = 0
    for linear in linears:
        rows = slice(start, start + linear.out_features)
        linear.weight = nn.Parameter(weight[rows], requires_grad=False)
        if has_bias:
            linear.bias = nn.Parameter(bias[rows], requires_grad=False)
        start = rows.stop
    return weight, bias


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
        self.fused_qkv: tuple[torch.Tensor, torch.Tensor] | None = None

    def project_qkv(self, x: torch.Tensor) -> torch.Tensor:
        """``[q | k | v]`` of ``x``: one matrix product once fused, else three."""
        if self.fused_qkv is not None:
            return F.linear(x, *self.fused_qkv)
        return torch.cat([self.q_proj(x), self.k_proj(x), self.v_proj(x)], dim=-1)

    def forward(
        self,
        x: torch.Tensor,
        rope: tuple[torch.Tensor, torch.Tensor],
        bias: torch.Tensor,
        cache: CacheAccess | None,
        ops: LayerKernels,
    ) -> torch.Tensor:
        """``rope`` covers all q, k and v heads (the value heads unrotated), so the keys and
        values come out side by side and go into the cache in one write."""
        batch, length, _ = x.shape
        qkv = self.project_qkv(x).view(batch, length, self.num_heads + 2 * self.num_kv_heads, self.head_dim)
        qkv = ops.rotate_heads(qkv, *rope)
        q, kv = qkv[:, :, : self.num_heads], qkv[:, :, self.num_heads :]
        if cache is not None:
            return self.o_proj(cache.attend(self.layer_idx, q, kv, bias, ops.decode_attention))
        kv = kv.transpose(1, 2)
        return self.o_proj(grouped_attention(q, kv[:, : self.num_kv_heads], kv[:, self.num_kv_heads :], bias))


class Qwen2MLP(nn.Module):
    """SwiGLU feed-forward."""

    def __init__(self, config: LLMConfig):
        super().__init__()
        self.gate_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)
        self.fused_gate_up: torch.Tensor | None = None

    def forward(self, x: torch.Tensor, ops: LayerKernels) -> torch.Tensor:
        if self.fused_gate_up is not None:
            gate_up = F.linear(x, self.fused_gate_up)
        else:
            gate_up = torch.cat([self.gate_proj(x), self.up_proj(x)], dim=-1)
        return self.down_proj(ops.silu_and_mul(gate_up))


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
        delta: torch.Tensor,
        rope: tuple[torch.Tensor, torch.Tensor],
        bias: torch.Tensor,
        cache: CacheAccess | None,
        ops: LayerKernels,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Add the previous block's output ``delta`` to the residual stream ``x`` and run the layer.

        Returns the stream and this layer's MLP output, which the next layer (or the final norm)
        adds, so each residual add shares a kernel with the norm after it.
        """
        norm = self.input_layernorm
        x, h = ops.add_rms_norm(x, delta, norm.weight, norm.eps)
        norm = self.post_attention_layernorm
        x, h = ops.add_rms_norm(x, self.self_attn(h, rope, bias, cache, ops), norm.weight, norm.eps)
        return x, self.mlp(h, ops)


@dataclass
class CacheAccess:
    """Where one forward call reads and writes the KV cache."""

    cache: KVCache
    slot_ids: torch.Tensor  # [B]
    flat_index: torch.Tensor  # [B * T], from KVCache.flat_index
    kv_len: int  # attend over positions [0, kv_len) of each slot
    lengths: torch.Tensor  # [B] positions each row's last query attends to (its position + 1)

    def attend(
        self, layer: int, q: torch.Tensor, kv: torch.Tensor, bias: torch.Tensor, decode_attention: Callable | None
    ) -> torch.Tensor:
        """Store this step's ``kv [B, T, 2 * kv_heads, D]``, then attend ``q [B, T, heads, D]`` over
        the slot's cached positions; returns ``[B, T, heads * D]``."""
        self.cache.write(layer, self.flat_index, kv)
        if q.shape[1] == 1 and decode_attention is not None:
            store = self.cache.layers[layer]
            return decode_attention(q[:, 0], store, self.slot_ids, self.lengths, self.kv_len)[:, None]
        k, v = self.cache.read(layer, self.slot_ids, self.kv_len)
        return grouped_attention(q, k, v, bias)


class Qwen2Model(nn.Module):
    """Qwen2 decoder stack without ``lm_head``; returns final-normed hidden states."""

    def __init__(self, config: LLMConfig):
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(Qwen2DecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.rotary_emb = RotaryEmbedding(config.head_dim, config.rope_theta)
        self.kernels = LayerKernels()

    def prepare_for_inference(self, use_fast_kernels: bool = False) -> None:
        """Fuse q/k/v and gate/up into one matrix product each (weights stay where they are, as
        views) and optionally switch to ``fast_kernels`` (CUDA). Call once the weights are final."""
        for layer in self.layers:
            attn, mlp = layer.self_attn, layer.mlp
            if attn.fused_qkv is None:
                attn.fused_qkv = fuse_linears(attn.q_proj, attn.k_proj, attn.v_proj)
                mlp.fused_gate_up = fuse_linears(mlp.gate_proj, mlp.up_proj)[0]
        self.kernels = fast_kernels() if use_fast_kernels else LayerKernels()

    def forward(
        self,
        inputs_embeds: torch.Tensor,
        positions: torch.Tensor,
        cache: KVCache,
        slot_ids: torch.Tensor,
        kv_len: int,
        flat_index: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Run ``inputs_embeds [B, T, hidden]`` at ``positions [B, T]`` of slots ``slot_ids [B]``.

        New keys/values are written into ``cache`` (at each row's slot and positions, or at the rows
        ``flat_index [B * T]`` of ``KVCache.flat_index`` names); each query attends to the cached
        positions ``<=`` its own, within the first ``kv_len`` positions of its slot.
        """
        key_positions = torch.arange(kv_len, device=positions.device)
        allowed = (key_positions <= positions[:, :, None])[:, None]
        if flat_index is None:
            flat_index = cache.flat_index(slot_ids, positions)
        access = CacheAccess(cache, slot_ids, flat_index, kv_len, positions[:, -1] + 1)
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
        config = self.config
        heads, kv_heads = config.num_attention_heads, config.num_key_value_heads
        rope = self.rotary_emb(positions, x.dtype, rotated_heads=heads + kv_heads, kept_heads=kv_heads)
        bias = attention_bias(allowed, heads // kv_heads, x.dtype)
        # Compiled steps check their guards on the host at every call: free for one-token steps
        # replayed from a CUDA graph, but slower than eager ops for a multi-token (prefill) forward.
        kernels = self.kernels if x.shape[1] == 1 else LayerKernels()
        delta = torch.zeros_like(x)
        for layer in self.layers:
            x, delta = layer(x, delta, rope, bias, cache, kernels)
        return kernels.add_rms_norm(x, delta, self.norm.weight, self.norm.eps)[1]
