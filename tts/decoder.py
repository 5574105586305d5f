"""LLM2TTSCodecAR: the VITA-1.5 speech decoder from LLM token embeddings to codec tokens.

Inference path (upstream `LLM2TTSCodecAR.infer`):
1. `layers_pre_nn` (L/2 Llama layers, full attention, positions 0..T-1) over the text embeddings.
2. `embedding[bos]` is put in front; `layers` run over [bos, text] with full attention
   (upstream passes no mask to eager attention), filling the KV cache at positions 0..T.
3. Autoregression from `sos`: each step embeds the last token, runs `layers` against the cache,
   then `norm` and `out_fnn`, and samples among the top-k logits; `eos` ends the utterance.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.rnn import pad_sequence

from layers.attention import attention
from layers.host_copy import to_device
from layers.kv_cache import KVCache
from layers.norm import RMSNorm
from tts.config import DecoderConfig
from tts.weights import load_strict, read_checkpoint

def rotary_cos_sin(
    positions: torch.Tensor, head_dim: int, theta: float, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """Default Llama RoPE tables [T, head_dim] for integer `positions` [T] (broadcast over [B, H, T, D])."""
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, device=positions.device).float() / head_dim)
    angles = positions.float()[:, None] * inv_freq[None, :]
    angles = torch.cat([angles, angles], dim=-1)
    return angles.cos().to(dtype), angles.sin().to(dtype)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate [B, H, T, D] by the half-split convention (x1, x2) -> (-x2, x1)."""
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat([-x2, x1], dim=-1) * sin


# (layer, new k, new v) -> keys and values to attend over, and the attention mask (None: attend to all).
KVStore = Callable[[int, torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]]


def new_kv_cache(
    config: DecoderConfig, slots: int, capacity: int, device: torch.device | str, dtype: torch.dtype
) -> KVCache:
    """A zeroed cache for `layers` (not `layers_pre_nn`): `slots` utterances, `capacity` positions each."""
    return KVCache(
        num_layers=config.transformer_num_blocks, kv_heads=config.transformer_attention_heads,
        head_dim=config.head_dim, slots=slots, max_len=capacity, device=device, dtype=dtype,
    )


def _keys_and_values(k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """[B, H, T, D] keys and values side by side as the cache stores them: [B, T, 2 * H, D]."""
    return torch.cat([k, v], dim=1).transpose(1, 2)


def prefill_store(cache: KVCache, slot_ids: torch.Tensor, length: int, mask: torch.Tensor | None) -> KVStore:
    """Store for whole sequences [B, H, length, D] into slots `slot_ids` [B] (on the cache's device) at
    positions 0..length-1; each row attends to the positions `mask` [B, 1, 1, length] allows (None: all)."""
    if length > cache.max_len:
        raise ValueError(f"{length} positions do not fit a cache of {cache.max_len}")
    flat_index = cache.flat_index(slot_ids, torch.arange(length, device=cache.device))

    def store(layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        cache.write(layer, flat_index, _keys_and_values(k, v))
        return k, v, mask

    return store


def step_store(cache: KVCache, positions: torch.Tensor, span: int) -> KVStore:
    """Store for one token per slot 0..n-1 ([n, H, 1, D]) at `positions` [n]; each attends to its
    positions 0..position within the first `span` of its slot (span > every position), read in place.
    The mask is built on the device from `positions`: fixed (n, span) give fixed shapes and no host sync."""
    n = positions.shape[0]
    flat_index = cache.flat_index(torch.arange(n, device=positions.device), positions[:, None])
    mask = (torch.arange(span, device=positions.device)[None, :] <= positions[:, None]).view(n, 1, 1, span)

    def store(layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        cache.write(layer, flat_index, _keys_and_values(k, v))
        return (*cache.leading(layer, n, span), mask)

    return store


class SelfAttention(nn.Module):
    """Multi-head attention without bias: over the sequence itself, or over what a KV store exposes (under its mask)."""

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
        store: KVStore | None = None,
        layer_idx: int = 0,
        mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """`mask` (broadcast to [B, H, T, keys], True = attend) applies without a store; a store brings its own."""
        batch, length, _ = x.shape

        def heads(t: torch.Tensor) -> torch.Tensor:
            return t.view(batch, length, self.num_heads, self.head_dim).transpose(1, 2)

        q = apply_rotary(heads(self.q_proj(x)), cos, sin)
        k = apply_rotary(heads(self.k_proj(x)), cos, sin)
        v = heads(self.v_proj(x))
        if store is not None:
            k, v, mask = store(layer_idx, k, v)
        out = attention(q, k, v, mask)
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
        store: KVStore | None = None,
        layer_idx: int = 0,
        mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, store, layer_idx, mask)
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

    def _rotary(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        return rotary_cos_sin(positions, self.config.head_dim, self.config.rope_theta, dtype)

    @torch.no_grad()
    def prefill(self, text_embeddings: torch.Tensor, cache: KVCache, slot: int) -> int:
        """Run steps 1-2 on `text_embeddings` [T, idim] into cache `slot`; returns its length T + 1."""
        return self.prefill_many([text_embeddings], cache, [slot])[0]

    @torch.no_grad()
    def prefill_many(self, texts: list[torch.Tensor], cache: KVCache, slots: list[int]) -> list[int]:
        """`prefill` of several utterances in one forward: rows zero-padded to the longest, each
        attending to its own positions only (full attention within them, as upstream). Positions
        past a row's length get keys and values too; decoding overwrites them before attending."""
        weight = self.embedding.weight
        lengths = [len(text) for text in texts]
        # one copy to the device, before any kernel (see layers/host_copy.py)
        ends, slot_ids = to_device([lengths, slots], weight.device)
        x = pad_sequence([t.to(device=weight.device, dtype=weight.dtype) for t in texts], batch_first=True)
        self.prefill_padded(x, ends, cache, slot_ids, masked=len(set(lengths)) > 1)
        return [length + 1 for length in lengths]

    @torch.no_grad()
    def prefill_padded(self, x: torch.Tensor, lengths: torch.Tensor, cache: KVCache, slot_ids: torch.Tensor,
                       masked: bool = True) -> None:
        """Steps 1-2 for rows `x` [B, T, idim], row b's text being its first `lengths[b]` rows, into
        cache slots `slot_ids` [B] at positions 0..T. Fixed shapes and no read back to the host, so a
        CUDA graph can replay it. `masked=False` (every row's length is T) attends without masks."""
        rows, width, _ = x.shape
        masks: tuple[torch.Tensor | None, torch.Tensor | None] = (None, None)
        if masked:
            valid = torch.arange(width + 1, device=x.device)[None, :] <= lengths[:, None]  # bos + text
            masks = (valid[:, None, None, 1:], valid[:, None, None, :])
        cos, sin = self._rotary(torch.arange(width, device=x.device), x.dtype)
        for layer in self.layers_pre_nn:
            x = layer(x, cos, sin, mask=masks[0])
        x = torch.cat([self.embedding.weight[self.config.bos_id].expand(rows, 1, -1), x], dim=1)
        cos, sin = self._rotary(torch.arange(width + 1, device=x.device), x.dtype)
        store = prefill_store(cache, slot_ids, width + 1, masks[1])
        for layer_idx, layer in enumerate(self.layers):
            x = layer(x, cos, sin, store, layer_idx)

    @torch.no_grad()
    def step(self, tokens: torch.Tensor, positions: torch.Tensor, cache: KVCache, span: int) -> torch.Tensor:
        """Feed tokens[i] to cache slot i at positions[i] (slots 0..n-1 at once), each attending to its
        positions 0..positions[i] within the first `span`; float32 logits [n, odim + 4]. Shapes depend
        only on (n, span) and nothing is read back to the host, so a CUDA graph can replay it."""
        x = self.embedding(tokens).unsqueeze(1)
        cos, sin = self._rotary(positions, x.dtype)
        cos, sin = cos[:, None, None, :], sin[:, None, None, :]  # one position per row: [n, H, 1, D]
        store = step_store(cache, positions, span)
        for layer_idx, layer in enumerate(self.layers):
            x = layer(x, cos, sin, store, layer_idx)
        return self.out_fnn(self.norm(x))[:, 0].float()

    def sample(self, logits: torch.Tensor, top_k: torch.Tensor, uniforms: torch.Tensor) -> torch.Tensor:
        """Top-k sampling per row (upstream: softmax, keep the k best, renormalise, draw): token ids [n].

        Row i keeps its top_k[i] best logits and inverts their CDF at uniforms[i], a number the caller
        draws on the CPU (from the stream's own generator where it has one, so that its tokens do not
        depend on which other streams share its batch). bos, sos and pad are excluded first: they are no codec codes and the
        codec cannot decode them. All on the device with fixed shapes (graph-safe).
        """
        config = self.config
        logits = logits.clone()
        logits[:, config.bos_id : config.sos_id + 1] = float("-inf")
        logits[:, config.pad_id] = float("-inf")
        ranked, ids = logits.sort(dim=-1, descending=True)
        rank = torch.arange(ranked.shape[-1], device=ranked.device)
        cdf = ranked.masked_fill(rank >= top_k[:, None], float("-inf")).softmax(-1).cumsum(-1)
        choice = torch.minimum((uniforms[:, None] > cdf).sum(-1), top_k - 1)
        return ids.gather(-1, choice[:, None])[:, 0]
