"""Vision path: InternViT tower, pixel shuffle, projector, dynamic tiling and normalisation.

References are independent of the code under test: the checkpoint TSV, transformers' own
InternVL vision model and pixel shuffle, transformers' CLIP image processor, naive loops.
"""

from __future__ import annotations

import json
import math
import random

import numpy as np
import pytest
import torch
from PIL import Image
from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil
from transformers.models.internvl.configuration_internvl import InternVLVisionConfig
from transformers.models.internvl.modeling_internvl import InternVLModel, InternVLVisionModel

from vita.image_tiles import (
    choose_grid,
    frames_to_tiles,
    image_to_tiles,
    normalize,
    sample_frames,
    split_into_tiles,
)
from vita.intern_vit import (
    InternAttention,
    InternViTVisionTower,
    VisionConfig,
    build_mm_projector,
    pixel_shuffle,
)
from shared_data import REFERENCE_TSV, reference_rows

TOWER_PREFIX = "model.vision_tower."
PROJECTOR_PREFIX = "model.mm_projector."
LLM_HIDDEN = 3584


def reference_shapes(prefix: str) -> list[tuple[str, tuple[int, ...]]]:
    return [(name, shape) for name, shape, _ in reference_rows(prefix)]


def named_shapes(module: torch.nn.Module, prefix: str) -> list[tuple[str, tuple[int, ...]]]:
    return [(prefix + name, tuple(t.shape)) for name, t in module.state_dict().items()]


@pytest.mark.skipif(not REFERENCE_TSV.exists(), reason="reference TSV not available")
def test_full_tower_and_projector_match_checkpoint_names_and_shapes():
    with torch.device("meta"):
        tower = InternViTVisionTower(VisionConfig.full())
        projector = build_mm_projector(tower.hidden_size, LLM_HIDDEN)
    expected_tower = reference_shapes(TOWER_PREFIX)
    assert len(expected_tower) == 340
    assert tower.config.tokens_per_tile == 256 and tower.hidden_size == 4096
    assert named_shapes(tower, TOWER_PREFIX) == expected_tower
    assert named_shapes(projector, PROJECTOR_PREFIX) == reference_shapes(PROJECTOR_PREFIX)


# The `vision_config` block shipped with VITA-1.5's vLLM demo (= OpenGVLab InternViT-300M-448px).
UPSTREAM_VISION_CONFIG = {
    "architectures": ["InternVisionModel"],
    "attention_dropout": 0.0,
    "drop_path_rate": 0.1,
    "dropout": 0.0,
    "hidden_act": "gelu",
    "hidden_size": 1024,
    "image_size": 448,
    "initializer_factor": 1.0,
    "initializer_range": 0.02,
    "intermediate_size": 4096,
    "layer_norm_eps": 1e-06,
    "model_type": "intern_vit_6b",
    "norm_type": "layer_norm",
    "num_attention_heads": 16,
    "num_channels": 3,
    "num_hidden_layers": 24,
    "patch_size": 14,
    "qk_normalization": False,
    "qkv_bias": True,
    "torch_dtype": "bfloat16",
    "transformers_version": "4.37.2",
    "use_flash_attn": True,
}


def test_config_reads_upstream_json_and_round_trips(tmp_path):
    source = tmp_path / "upstream.json"
    source.write_text(json.dumps({"vision_config": UPSTREAM_VISION_CONFIG}))
    assert VisionConfig.from_json(source) == VisionConfig.full()

    written = tmp_path / "config.json"
    VisionConfig.tiny().to_json(written)
    assert VisionConfig.from_json(written) == VisionConfig.tiny()
    data = json.loads(written.read_text())
    assert set(UPSTREAM_VISION_CONFIG) - set(data) <= {"torch_dtype", "transformers_version"}
    assert data["model_type"] == "intern_vit_6b"


def test_config_rejects_other_internvit_variants():
    with pytest.raises(ValueError):
        VisionConfig(norm_type="rms_norm")
    with pytest.raises(ValueError):
        VisionConfig(qk_normalization=True)


def test_attention_matches_naive_per_head_softmax():
    torch.manual_seed(0)
    config = VisionConfig(hidden_size=24, num_attention_heads=3, intermediate_size=8)
    attention = InternAttention(config)
    x = torch.randn(2, 7, 24)
    qkv = attention.qkv(x)  # output layout [3 (q, k, v), heads, head_dim]
    head_dim = 24 // 3
    context = torch.zeros(2, 7, 24)
    for b in range(2):
        for h in range(3):
            cols = slice(h * head_dim, (h + 1) * head_dim)
            q = qkv[b, :, 0:24][:, cols]
            k = qkv[b, :, 24:48][:, cols]
            v = qkv[b, :, 48:72][:, cols]
            scores = q @ k.T / math.sqrt(head_dim)
            weights = torch.exp(scores - scores.max(dim=-1, keepdim=True).values)
            weights = weights / weights.sum(dim=-1, keepdim=True)
            context[b, :, cols] = weights @ v
    expected = context @ attention.proj.weight.T + attention.proj.bias
    torch.testing.assert_close(attention(x), expected, atol=1e-5, rtol=1e-5)


def transformers_reference(tower: InternViTVisionTower) -> InternVLVisionModel:
    """transformers' InternVL vision model with the tower's weights (names remapped)."""
    config = tower.config
    reference = InternVLVisionModel(
        InternVLVisionConfig(
            hidden_size=config.hidden_size,
            num_hidden_layers=config.num_hidden_layers,
            num_attention_heads=config.num_attention_heads,
            intermediate_size=config.intermediate_size,
            attention_bias=config.qkv_bias,
            layer_norm_eps=config.layer_norm_eps,
            image_size=config.image_size,
            patch_size=config.patch_size,
            use_mean_pooling=True,  # no final norm, like InternViT-300M
            attn_implementation="eager",
        )
    )
    ours = tower.vision_tower.state_dict()
    mapped = {
        "embeddings.cls_token": ours["embeddings.class_embedding"],
        "embeddings.position_embeddings": ours["embeddings.position_embedding"],
        "embeddings.patch_embeddings.projection.weight": ours["embeddings.patch_embedding.weight"],
        "embeddings.patch_embeddings.projection.bias": ours["embeddings.patch_embedding.bias"],
    }
    renames = {
        "attn.proj": "attention.projection_layer", "mlp.fc1": "mlp.fc1", "mlp.fc2": "mlp.fc2",
        "norm1": "layernorm_before", "norm2": "layernorm_after",
    }
    for i in range(config.num_hidden_layers):
        src, dst = f"encoder.layers.{i}.", f"encoder.layer.{i}."
        for part in ("weight", "bias"):
            for q_k_v, chunk in zip("qkv", ours[src + f"attn.qkv.{part}"].chunk(3)):
                mapped[dst + f"attention.{q_k_v}_proj.{part}"] = chunk
            for ours_name, their_name in renames.items():
                mapped[dst + f"{their_name}.{part}"] = ours[src + f"{ours_name}.{part}"]
        mapped[dst + "lambda_1"] = ours[src + "ls1"]
        mapped[dst + "lambda_2"] = ours[src + "ls2"]
    reference.load_state_dict(mapped, strict=True)
    return reference.eval()


def random_tiny_tower(seed: int) -> InternViTVisionTower:
    torch.manual_seed(seed)
    tower = InternViTVisionTower(VisionConfig.tiny()).eval()
    for layer in tower.vision_tower.encoder.layers:  # non-trivial layer scale and norms
        for param in (layer.ls1, layer.ls2, layer.norm1.weight, layer.norm2.bias):
            param.data.uniform_(0.5, 1.5)
    return tower


@pytest.mark.parametrize("height, width", [(448, 448), (224, 336)])
def test_encoder_matches_transformers_internvl_vision(height, width):
    tower = random_tiny_tower(seed=1)
    reference = transformers_reference(tower)
    pixels = torch.randn(2, 3, height, width)
    with torch.no_grad():
        expected = reference(pixel_values=pixels).last_hidden_state
        actual = tower.vision_tower(pixels)
    assert actual.shape == (2, 1 + (height // 14) * (width // 14), 32)
    torch.testing.assert_close(actual, expected, atol=1e-4, rtol=1e-4)


def test_tower_features_are_halved_shuffled_patch_states():
    tower = random_tiny_tower(seed=2)
    reference = transformers_reference(tower)
    pixels = torch.randn(3, 3, 448, 448)
    features = tower(pixels)
    config = VisionConfig.tiny()
    assert features.shape == (3, config.tokens_per_tile, 4 * config.hidden_size) == (3, 256, 128)
    with torch.no_grad():
        patches = reference(pixel_values=pixels).last_hidden_state[:, 1:]  # CLS dropped
    grid = patches.reshape(3, 32, 32, -1) * 0.5
    expected = InternVLModel.pixel_shuffle(None, grid, scale_factor=0.5).reshape(3, 256, -1)
    torch.testing.assert_close(features, expected, atol=1e-4, rtol=1e-4)


def test_pixel_shuffle_matches_strided_slicing_and_upstream_view_permute():
    grid = torch.randn(2, 6, 6, 5)
    by_slicing = torch.cat(
        [grid[:, 0::2, 0::2], grid[:, 0::2, 1::2], grid[:, 1::2, 0::2], grid[:, 1::2, 1::2]], dim=-1
    ).reshape(2, 9, 20)
    by_view_permute = InternVLModel.pixel_shuffle(None, grid, scale_factor=0.5).reshape(2, 9, 20)
    assert torch.equal(pixel_shuffle(grid), by_slicing)
    assert torch.equal(pixel_shuffle(grid), by_view_permute)


def test_projector_is_linear_exact_gelu_linear():
    torch.manual_seed(3)
    projector = build_mm_projector(16, 8)
    x = torch.randn(4, 16)
    hidden = x @ projector[0].weight.T + projector[0].bias
    hidden = 0.5 * hidden * (1 + torch.erf(hidden / math.sqrt(2)))
    expected = hidden @ projector[2].weight.T + projector[2].bias
    torch.testing.assert_close(projector(x), expected, atol=1e-5, rtol=1e-5)


# --- tiling -----------------------------------------------------------------------------------

def brute_force_grid(width: int, height: int, max_tiles: int = 12, tile: int = 448):
    """Upstream rule restated: closest columns/rows to the aspect ratio; among exact ties the
    smallest grid, unless a larger tied grid has tile area < 2x the image area (then the largest
    such grid)."""
    grids = [(c, r) for c in range(1, 13) for r in range(1, 13) if c * r <= max_tiles]
    distance = {g: abs(width / height - g[0] / g[1]) for g in grids}
    best = min(distance.values())
    tied = sorted((g for g in grids if distance[g] == best), key=lambda g: g[0] * g[1])
    allowed = [g for g in tied[1:] if width * height > 0.5 * tile * tile * g[0] * g[1]]
    return max(allowed, key=lambda g: g[0] * g[1]) if allowed else tied[0]


@pytest.mark.parametrize(
    "size, grid",
    [
        ((448, 448), (1, 1)),  # square, too small for 2x2
        ((896, 896), (2, 2)),  # 2x2 allowed (area > half of 4 tiles), 3x3 not
        ((1000, 1000), (3, 3)),
        ((640, 480), (4, 3)),  # exact 4:3
        ((1920, 1080), (4, 2)),  # 2:1 and 4:2 tie, large image takes 4:2
        ((500, 250), (2, 1)),  # 2:1 and 4:2 tie, small image keeps 2:1
        ((100, 1200), (1, 12)),
        ((4000, 100), (12, 1)),
    ],
)
def test_choose_grid_hand_derived_cases(size, grid):
    assert choose_grid(*size) == grid == brute_force_grid(*size)


def test_choose_grid_matches_brute_force_rule_on_many_sizes():
    rng = random.Random(0)
    sizes = [(rng.randint(16, 5000), rng.randint(16, 5000)) for _ in range(1500)]
    sizes += [(w, h) for w in range(40, 2000, 97) for h in range(40, 2000, 89)]
    for width, height in sizes:
        assert choose_grid(width, height) == brute_force_grid(width, height), (width, height)


def random_image(width: int, height: int, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


def test_tiles_are_row_major_crops_of_the_resized_image_plus_thumbnail():
    image = random_image(900, 600)  # aspect 1.5: 3x2 grid
    cols, rows = choose_grid(900, 600)
    tiles = split_into_tiles(image)
    assert (cols, rows) == (3, 2) and len(tiles) == cols * rows + 1
    resized = np.asarray(image.resize((cols * 448, rows * 448), Image.Resampling.BICUBIC))
    for index, tile in enumerate(tiles[:-1]):
        row, col = divmod(index, cols)
        expected = resized[row * 448:(row + 1) * 448, col * 448:(col + 1) * 448]
        assert np.array_equal(np.asarray(tile), expected)
    thumbnail = image.resize((448, 448), Image.Resampling.BICUBIC)
    assert np.array_equal(np.asarray(tiles[-1]), np.asarray(thumbnail))


def test_tall_image_tiles_go_row_by_row():
    image = Image.new("RGB", (448, 1344))
    for row, color in enumerate([(255, 0, 0), (0, 255, 0), (0, 0, 255)]):
        image.paste(color, (0, row * 448, 448, (row + 1) * 448))
    tiles = split_into_tiles(image)
    assert len(tiles) == 4  # 1x3 grid + thumbnail
    for tile, color in zip(tiles, [(255, 0, 0), (0, 255, 0), (0, 0, 255)]):
        assert np.asarray(tile)[100:300, 100:300].reshape(-1, 3).tolist() == [list(color)] * 40000


def test_single_tile_has_no_thumbnail_and_many_tiles_have_one():
    assert image_to_tiles(random_image(448, 448)).shape == (1, 3, 448, 448)
    assert image_to_tiles(random_image(640, 480)).shape == (13, 3, 448, 448)
    assert image_to_tiles(random_image(640, 480), max_tiles=1).shape == (1, 3, 448, 448)


def test_normalisation_is_imagenet_mean_std():
    image = Image.new("RGB", (448, 448), (255, 0, 128))
    pixels = normalize([image])
    expected = [(255 / 255 - 0.485) / 0.229, (0 - 0.456) / 0.224, (128 / 255 - 0.406) / 0.225]
    for channel, value in enumerate(expected):
        torch.testing.assert_close(pixels[0, channel], torch.full((448, 448), value))
    assert pixels.dtype == torch.float32


def clip_processor() -> CLIPImageProcessorPil:
    """The InternViT-300M-448px preprocessor_config.json, run by transformers."""
    return CLIPImageProcessorPil(
        size=448, crop_size=448, resample=3,
        image_mean=[0.485, 0.456, 0.406], image_std=[0.229, 0.224, 0.225],
    )


def test_tiles_match_clip_processor_on_each_tile():
    image = random_image(1000, 600, seed=4)
    expected = clip_processor()(split_into_tiles(image), return_tensors="pt")["pixel_values"]
    torch.testing.assert_close(image_to_tiles(image), expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("size", [(640, 480), (480, 640), (333, 777), (448, 448), (1280, 720)])
def test_video_frames_match_clip_processor_resize_and_center_crop(size):
    frames = [random_image(*size, seed=s) for s in range(2)]
    expected = clip_processor()(frames, return_tensors="pt")["pixel_values"]
    actual = frames_to_tiles(frames)
    assert actual.shape == (2, 3, 448, 448)
    torch.testing.assert_close(actual, expected, atol=1e-5, rtol=1e-5)


def test_sample_frames_spaces_evenly_and_repeats_when_short():
    frames = [Image.new("RGB", (4, 4), (i, 0, 0)) for i in range(10)]
    red = lambda picked: [f.getpixel((0, 0))[0] for f in picked]  # noqa: E731
    assert red(sample_frames(frames)) == [0, 3, 6, 9]
    assert red(sample_frames(frames[:2])) == [0, 0, 0, 1]
    assert red(sample_frames(frames[:4])) == [0, 1, 2, 3]
    assert red(sample_frames(frames[:6], max_frames=16)) == [0, 1, 2, 3, 4, 5]
    assert sample_frames([]) == []


def test_bfloat16_tower_accepts_float_pixels_and_stays_close_to_float32():
    tower = random_tiny_tower(seed=5)
    pixels = torch.randn(2, 3, 448, 448)
    expected = tower(pixels)
    actual = tower.to(torch.bfloat16)(pixels)
    assert actual.dtype == torch.bfloat16
    torch.testing.assert_close(actual.float(), expected, atol=0.1, rtol=0.05)
