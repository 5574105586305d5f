"""InternViT-300M-448px vision tower of VITA-1.5, its feature selection, the mlp2x_gelu projector.

Module and parameter names mirror the checkpoint: inside the VITA checkpoint the tower lives at
`model.vision_tower.vision_tower.*` (`InternViTVisionTower.vision_tower` = `InternVisionModel`)
and the projector at `model.mm_projector.{0,2}.*`.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from layers.attention import attention
from vita.plain_conv import conv_without_cudnn

PIXEL_SHUFFLE_SCALE = 0.5
"""VITA keeps 1/4 of the patch tokens: 2x2 neighbours are stacked along channels."""


@dataclass
class VisionConfig:
    """Fields of OpenGVLab's InternViT `config.json` (model_type `intern_vit_6b`)."""

    hidden_size: int = 1024
    num_attention_heads: int = 16
    intermediate_size: int = 4096
    num_hidden_layers: int = 24
    patch_size: int = 14
    image_size: int = 448
    num_channels: int = 3
    layer_norm_eps: float = 1e-6
    qkv_bias: bool = True
    norm_type: str = "layer_norm"
    qk_normalization: bool = False
    hidden_act: str = "gelu"
    initializer_factor: float = 1.0
    initializer_range: float = 0.02
    drop_path_rate: float = 0.1
    dropout: float = 0.0
    attention_dropout: float = 0.0
    use_flash_attn: bool = True

    def __post_init__(self) -> None:
        if self.norm_type != "layer_norm" or self.qk_normalization or self.hidden_act != "gelu":
            raise ValueError(
                "only the InternViT-300M variant is supported: layer_norm, gelu, no qk norm"
            )
        if self.hidden_size % self.num_attention_heads:
            raise ValueError("hidden_size must be divisible by num_attention_heads")

    @classmethod
    def full(cls) -> VisionConfig:
        """InternViT-300M-448px as used by VITA-1.5."""
        return cls()

    @classmethod
    def tiny(cls) -> VisionConfig:
        """Small test dims; 448 px tiles and 14 px patches are kept so token counts stay real."""
        return cls(hidden_size=32, num_attention_heads=4, intermediate_size=64, num_hidden_layers=2)

    @property
    def grid_size(self) -> int:
        """Patches per side of one tile."""
        return self.image_size // self.patch_size

    @property
    def tokens_per_tile(self) -> int:
        """LLM tokens one tile becomes after CLS removal and pixel shuffle (256 for 448 px)."""
        return int(self.grid_size * PIXEL_SHUFFLE_SCALE) ** 2

    @property
    def output_size(self) -> int:
        """Feature width after pixel shuffle (`mm_hidden_size`, 4096 for the full tower)."""
        return int(self.hidden_size / PIXEL_SHUFFLE_SCALE**2)

    @classmethod
    def from_dict(cls, data: dict) -> VisionConfig:
        """Reads an InternViT config dict; a multimodal config's `vision_config` is unwrapped."""
        data = data.get("vision_config", data)
        names = {field.name for field in dataclasses.fields(cls)}
        return cls(**{key: value for key, value in data.items() if key in names})

    @classmethod
    def from_json(cls, path: str | Path) -> VisionConfig:
        return cls.from_dict(json.loads(Path(path).read_text()))

    def to_dict(self) -> dict:
        return {
            "architectures": ["InternVisionModel"],
            "model_type": "intern_vit_6b",
            **dataclasses.asdict(self),
        }

    def to_json(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2) + "\n")


class InternVisionEmbeddings(nn.Module):
    """Conv patch embedding, a learned CLS token and learned absolute positions."""

    def __init__(self, config: VisionConfig):
        super().__init__()
        self.grid_size = config.grid_size
        self.class_embedding = nn.Parameter(torch.randn(1, 1, config.hidden_size))
        self.position_embedding = nn.Parameter(
            torch.randn(1, self.grid_size**2 + 1, config.hidden_size)
        )
        self.patch_embedding = nn.Conv2d(
            config.num_channels, config.hidden_size, config.patch_size, stride=config.patch_size
        )

    def patch_positions(self, height: int, width: int) -> torch.Tensor:
        """Position embeddings of the patches, bicubically resized when the patch grid differs."""
        positions = self.position_embedding[:, 1:]
        if (height, width) == (self.grid_size, self.grid_size):
            return positions
        grid = positions.float().reshape(1, self.grid_size, self.grid_size, -1).permute(0, 3, 1, 2)
        grid = F.interpolate(grid, size=(height, width), mode="bicubic", align_corners=False)
        return grid.flatten(2).transpose(1, 2).to(positions.dtype)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """[B, 3, H, W] -> [B, 1 + (H/14)*(W/14), hidden]."""
        patches = conv_without_cudnn(self.patch_embedding, pixel_values.to(self.patch_embedding.weight.dtype))
        batch, _, height, width = patches.shape
        patches = patches.flatten(2).transpose(1, 2)
        cls = self.class_embedding.expand(batch, 1, -1).to(patches.dtype)
        positions = torch.cat(
            [self.position_embedding[:, :1], self.patch_positions(height, width)], dim=1
        )
        return torch.cat([cls, patches], dim=1) + positions.to(patches.dtype)


class InternAttention(nn.Module):
    """Bidirectional multi-head self-attention with a fused qkv projection."""

    def __init__(self, config: VisionConfig):
        super().__init__()
        self.num_heads = config.num_attention_heads
        self.qkv = nn.Linear(config.hidden_size, 3 * config.hidden_size, bias=config.qkv_bias)
        self.proj = nn.Linear(config.hidden_size, config.hidden_size)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        batch, length, width = hidden_states.shape
        qkv = self.qkv(hidden_states).view(batch, length, 3, self.num_heads, -1)
        query, key, value = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each [B, heads, T, head_dim]
        context = attention(query, key, value)
        return self.proj(context.transpose(1, 2).reshape(batch, length, width))


class InternMLP(nn.Module):
    def __init__(self, config: VisionConfig):
        super().__init__()
        self.fc1 = nn.Linear(config.hidden_size, config.intermediate_size)
        self.fc2 = nn.Linear(config.intermediate_size, config.hidden_size)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(hidden_states)))


class InternVisionEncoderLayer(nn.Module):
    """Pre-norm transformer block with per-channel layer scale (`ls1`, `ls2`) on both branches."""

    def __init__(self, config: VisionConfig):
        super().__init__()
        self.attn = InternAttention(config)
        self.mlp = InternMLP(config)
        self.norm1 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.norm2 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.ls1 = nn.Parameter(config.initializer_factor * torch.ones(config.hidden_size))
        self.ls2 = nn.Parameter(config.initializer_factor * torch.ones(config.hidden_size))

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        hidden_states = hidden_states + self.attn(self.norm1(hidden_states)) * self.ls1
        return hidden_states + self.mlp(self.norm2(hidden_states)) * self.ls2


class InternVisionEncoder(nn.Module):
    def __init__(self, config: VisionConfig):
        super().__init__()
        self.layers = nn.ModuleList(
            InternVisionEncoderLayer(config) for _ in range(config.num_hidden_layers)
        )

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            hidden_states = layer(hidden_states)
        return hidden_states


class InternVisionModel(nn.Module):
    """InternViT: embeddings + encoder, no final norm. Returns the last hidden state, CLS first."""

    def __init__(self, config: VisionConfig):
        super().__init__()
        self.config = config
        self.embeddings = InternVisionEmbeddings(config)
        self.encoder = InternVisionEncoder(config)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """[B, 3, H, W] -> [B, 1 + patches, hidden]."""
        return self.encoder(self.embeddings(pixel_values))


def pixel_shuffle(grid: torch.Tensor) -> torch.Tensor:
    """[N, S, S, C] patch grid -> [N, (S/2)^2, 4C] tokens.

    Output token (i, j) (row-major) holds the channels of patches (2i, 2j), (2i, 2j+1),
    (2i+1, 2j), (2i+1, 2j+1), in that order: the layout of upstream's view/permute pixel shuffle.
    """
    batch, rows, cols, channels = grid.shape
    blocks = grid.reshape(batch, rows // 2, 2, cols // 2, 2, channels)
    return blocks.permute(0, 1, 3, 2, 4, 5).reshape(batch, (rows // 2) * (cols // 2), 4 * channels)


class InternViTVisionTower(nn.Module):
    """VITA's wrapper: last hidden state, CLS dropped, features halved, 2x2 pixel shuffle."""

    def __init__(self, config: VisionConfig):
        super().__init__()
        self.config = config
        self.vision_tower = InternVisionModel(config)

    @property
    def hidden_size(self) -> int:
        return self.config.output_size

    @torch.no_grad()
    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """[N, 3, 448, 448] tiles -> [N, 256, 4 * hidden] features for the projector."""
        patches = self.vision_tower(pixel_values)[:, 1:]
        side = int(patches.shape[1] ** 0.5)
        if side * side != patches.shape[1] or side % 2:
            raise ValueError(f"tiles must give an even square patch grid, got {patches.shape[1]}")
        # Upstream multiplies the features by the shuffle scale (0.5) before shuffling; the
        # projector was trained on those halved features.
        grid = patches.reshape(patches.shape[0], side, side, -1) * PIXEL_SHUFFLE_SCALE
        return pixel_shuffle(grid)


def build_mm_projector(input_size: int, llm_hidden_size: int) -> nn.Sequential:
    """`mlp2x_gelu` projector: Linear(input, llm) -> GELU -> Linear(llm, llm); keys `0.*`, `2.*`."""
    return nn.Sequential(
        nn.Linear(input_size, llm_hidden_size),
        nn.GELU(),
        nn.Linear(llm_hidden_size, llm_hidden_size),
    )
