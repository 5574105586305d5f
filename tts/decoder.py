"""LLM2TTSCodecAR: the VITA-1.5 speech decoder from LLM token embeddings to codec tokens.

Inference path (upstream `LLM2TTSCodecAR.infer`):
1. `layers_pre_nn` (L/2 Llama layers, full attention, positions 0..T-1) over the text embeddings.
2. `embedding[bos]` is put in front; `layers` run over [bos, text] with full attention
   (upstream passes no mask to eager attention), filling the KV cache at positions 0..T.
3. Autoregression from `sos`: each step embeds the last token, runs `layers` against the cache,
   then `norm` and `out_fnn`, and samples among the top-k logits; `eos` ends the utterance.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from tts.config import DecoderConfig
from tts.weights import load_strict, read_checkpoint
from vita.qwen2 import RMSNorm, apply_rotary  # Llama and Qwen2 share RMSNorm and rotate-half RoPE


def rotary_cos_sin(
    positions: torch.Tensor, head_dim: int, theta: float, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """Default Llama RoPE tables [T, head_dim] for integer `positions` [T] (broadcast over [B, H, T, D])."""
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, device=positions.device).float() / head_dim)
    angles = positions.float()[:, None] * inv_freq[None, :]
    angles = torch.cat([angles, angles], dim=-1)
    return angles.cos().to(dtype), angles.sin().to(dtype)


class KVCache:
    """Per-utterance keys and values of every layer of `layers`, preallocated to `capacity`."""

    def __init__(self, config: DecoderConfig, capacity: int, device: torch.device, dtype: torch.dtype) -> None:
        shape = (config.transformer_num_blocks, 1, config.transformer_attention_heads, capacity, config.head_dim)
        self.keys = torch.empty(shape, device=device, dtype=dtype)
        self.values = torch.empty(shape, device=device, dtype=dtype)
        self.length = 0


class SelfAttention(nn.Module):
    """Multi-head attention without bias and without mask (full attention over what it sees)."""

    def __init__(self, config: DecoderConfig) -> None:
        super().__init__()
        dim = config.transformer_attention_dim
        self.num_heads = config.transformer_attention_heads
        self.head_dim = config.head_dim
        self.q_proj = nn.Linear(dim, dim, bias=False)
        self.k_proj = nn.Linear(dim, dim, bias=False)
        self.v_proj = nn.Linear(dim, dim, bias=False)
        self.o_proj = nn.Linear(dim, dim, bias=False)

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        cache: KVCache | None = None,
        layer_idx: int = 0,
    ) -> torch.Tensor:
        batch, length, _ = x.shape

        def heads(t: torch.Tensor) -> torch.Tensor:
            return t.view(batch, length, self.num_heads, self.head_dim).transpose(1, 2)

        q = apply_rotary(heads(self.q_proj(x)), cos, sin)
        k = apply_rotary(heads(self.k_proj(x)), cos, sin)
        v = heads(self.v_proj(x))
        if cache is not None:
            end = cache.length + length
            cache.keys[layer_idx, :, :, cache.length : end] = k
            cache.values[layer_idx, :, :, cache.length : end] = v
            k = cache.keys[layer_idx, :, :, :end]
            v = cache.values[layer_idx, :, :, :end]
        out = F.scaled_dot_product_attention(q, k, v)
        return self.o_proj(out.transpose(1, 2).reshape(batch, length, -1))


class MLP(nn.Module):
    """SwiGLU feed-forward: down(silu(gate(x)) * up(x))."""

    def __init__(self, config: DecoderConfig) -> None:
        super().__init__()
        dim, hidden = config.transformer_attention_dim, config.transformer_linear_units
        self.gate_proj = nn.Linear(dim, hidden, bias=False)
        self.up_proj = nn.Linear(dim, hidden, bias=False)
        self.down_proj = nn.Linear(hidden, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    """Pre-norm Llama decoder layer (same key names as transformers' LlamaDecoderLayer)."""

    def __init__(self, config: DecoderConfig) -> None:
        super().__init__()
        self.self_attn = SelfAttention(config)
        self.mlp = MLP(config)
        self.input_layernorm = RMSNorm(config.transformer_attention_dim, config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.transformer_attention_dim, config.rms_norm_eps)

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        cache: KVCache | None = None,
        layer_idx: int = 0,
    ) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, cache, layer_idx)
        return x + self.mlp(self.post_attention_layernorm(x))


class LLM2TTSCodecAR(nn.Module):
    """Autoregressive codec-token decoder conditioned on LLM token embeddings."""

    def __init__(self, config: DecoderConfig) -> None:
        super().__init__()
        self.config = config
        self.embedding = nn.Embedding(config.odim + 4, config.idim)
        self.layers_pre_nn = nn.ModuleList(DecoderLayer(config) for _ in range(config.transformer_num_blocks // 2))
        self.layers = nn.ModuleList(DecoderLayer(config) for _ in range(config.transformer_num_blocks))
        self.norm = RMSNorm(config.transformer_attention_dim, config.rms_norm_eps)
        self.out_fnn = nn.Linear(config.encoder_output_dim, config.odim + 4)

    @classmethod
    def load(cls, decoder_dir: Path, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32) -> "LLM2TTSCodecAR":
        """Build from `decoder/model.json` and load `decoder/final.pt` strictly.

        `layers_prefix.*` (present when kv_cache_prefix_finetune is set) is not loaded:
        VITA-1.5 always decodes with prefix=None, so those layers never run.
        """
        decoder_dir = Path(decoder_dir)
        config = DecoderConfig.from_model_json(decoder_dir / "model.json")
        snapshot = read_checkpoint(decoder_dir / "final.pt")
        state_dict = snapshot.get("model", snapshot)
        with torch.device("meta"):
            model = cls(config)
        load_strict(
            model,
            state_dict,
            where=str(decoder_dir / "final.pt"),
            ignore=lambda name: name.startswith("layers_prefix.") or name.endswith("inv_freq"),
        )
        return model.to(device=device, dtype=dtype).eval()

    def _rotary(self, start: int, length: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        positions = torch.arange(start, start + length, device=self.embedding.weight.device)
        return rotary_cos_sin(positions, self.config.head_dim, self.config.rope_theta, dtype)

    def _run_layers(self, x: torch.Tensor, cache: KVCache) -> torch.Tensor:
        cos, sin = self._rotary(cache.length, x.shape[1], x.dtype)
        for layer_idx, layer in enumerate(self.layers):
            x = layer(x, cos, sin, cache, layer_idx)
        cache.length += x.shape[1]
        return x

    @torch.no_grad()
    def prefill(self, text_embeddings: torch.Tensor, capacity: int) -> KVCache:
        """Run steps 1-2 on `text_embeddings` [T, idim] and return the filled cache."""
        weight = self.embedding.weight
        x = text_embeddings.to(device=weight.device, dtype=weight.dtype).unsqueeze(0)
        cos, sin = self._rotary(0, x.shape[1], x.dtype)
        for layer in self.layers_pre_nn:
            x = layer(x, cos, sin)
        bos = self.embedding.weight[self.config.bos_id].view(1, 1, -1)
        x = torch.cat([bos, x], dim=1)
        cache = KVCache(self.config, capacity=x.shape[1] + capacity, device=weight.device, dtype=weight.dtype)
        self._run_layers(x, cache)
        return cache

    @torch.no_grad()
    def next_token_logits(self, token: int, cache: KVCache) -> torch.Tensor:
        """Feed one token id at the next cache position; float32 logits [odim + 4]."""
        ids = torch.tensor([[token]], device=self.embedding.weight.device)
        x = self._run_layers(self.embedding(ids), cache)
        return self.out_fnn(self.norm(x))[0, -1].float()

    def sample(self, logits: torch.Tensor, top_k: int, generator: torch.Generator | None) -> int:
        """Top-k sampling (upstream: softmax, keep the k best, renormalise, multinomial).

        bos, sos and pad are excluded first: they are no codec codes and the codec cannot decode them.
        """
        logits = logits.clone()
        logits[[self.config.bos_id, self.config.sos_id, self.config.pad_id]] = float("-inf")
        top_logits, top_ids = logits.topk(top_k)
        choice = torch.multinomial(top_logits.softmax(-1), 1, generator=generator)
        return int(top_ids[choice])

    def generate(
        self,
        text_embeddings: torch.Tensor,
        *,
        top_k: int = 2,
        max_tokens: int = 1000,
        generator: torch.Generator | None = None,
    ) -> Iterator[int]:
        """Yield codec tokens until eos or `max_tokens`; all state lives in this generator."""
        cache = self.prefill(text_embeddings, capacity=max_tokens)
        token = self.config.sos_id
        for _ in range(max_tokens):
            token = self.sample(self.next_token_logits(token, cache), top_k, generator)
            if token == self.config.eos_id:
                return
            yield token
