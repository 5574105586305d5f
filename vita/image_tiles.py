"""VITA-1.5 image preprocessing: dynamic 448 px tiling, video frames, ImageNet normalisation.

Images (upstream `dynamic_preprocess`, max 12 tiles, thumbnail on): the image is resized to the
tile grid whose aspect ratio is closest to its own and cut into 448 px tiles, row by row; when
there is more than one tile, the whole image resized to 448x448 is appended as a thumbnail.
Video frames (upstream video path, `image_aspect_ratio` "square"): one tile per frame, the
shortest edge resized to 448 then a centred 448x448 crop (the CLIP image processor's steps).
Every tile is then scaled to [0, 1] and normalised with the ImageNet mean/std.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TypeVar

import numpy as np
import torch
from PIL import Image

Frame = TypeVar("Frame")

TILE_SIZE = 448
MAX_TILES = 12
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
RESAMPLE = Image.Resampling.BICUBIC


def choose_grid(
    width: int,
    height: int,
    *,
    min_tiles: int = 1,
    max_tiles: int = MAX_TILES,
    tile_size: int = TILE_SIZE,
) -> tuple[int, int]:
    """(columns, rows) of the tile grid for an image, following upstream's rule.

    Grids are scanned by increasing tile count; the one whose columns/rows is closest to
    width/height wins. On an exact tie a larger grid replaces the current one only when the
    image area exceeds half the grid's pixel area (so small images are not blown up).
    """
    aspect = width / height
    area = width * height
    grids = sorted(
        (
            (cols, rows)
            for cols in range(1, max_tiles + 1)
            for rows in range(1, max_tiles + 1)
            if min_tiles <= cols * rows <= max_tiles
        ),
        key=lambda grid: grid[0] * grid[1],
    )
    best, best_distance = (1, 1), float("inf")
    for cols, rows in grids:
        distance = abs(aspect - cols / rows)
        if distance < best_distance:
            best, best_distance = (cols, rows), distance
        elif distance == best_distance and area > 0.5 * tile_size * tile_size * cols * rows:
            best = (cols, rows)
    return best


def split_into_tiles(
    image: Image.Image,
    *,
    max_tiles: int = MAX_TILES,
    tile_size: int = TILE_SIZE,
    use_thumbnail: bool = True,
) -> list[Image.Image]:
    """Tiles of one image, row-major, followed by the thumbnail when there are several tiles."""
    cols, rows = choose_grid(*image.size, max_tiles=max_tiles, tile_size=tile_size)
    resized = image.resize((cols * tile_size, rows * tile_size), RESAMPLE)
    tiles = [
        resized.crop((left, top, left + tile_size, top + tile_size))
        for top in range(0, rows * tile_size, tile_size)
        for left in range(0, cols * tile_size, tile_size)
    ]
    if use_thumbnail and len(tiles) > 1:
        tiles.append(image.resize((tile_size, tile_size), RESAMPLE))
    return tiles


def center_square(image: Image.Image, *, size: int = TILE_SIZE) -> Image.Image:
    """Shortest edge resized to `size` (long edge truncated), then a centred size x size crop."""
    width, height = image.size
    short, long = min(width, height), max(width, height)
    new_long = int(size * long / short)
    new_size = (size, new_long) if width <= height else (new_long, size)
    resized = image.resize(new_size, RESAMPLE)
    left, top = (new_size[0] - size) // 2, (new_size[1] - size) // 2
    return resized.crop((left, top, left + size, top + size))


def normalize(tiles: Sequence[Image.Image]) -> torch.Tensor:
    """RGB tiles -> [N, 3, H, W] float32, (pixel / 255 - mean) / std."""
    pixels = np.stack([np.asarray(tile.convert("RGB"), dtype=np.float32) for tile in tiles]) / 255
    mean = np.asarray(IMAGENET_MEAN, dtype=np.float32)
    std = np.asarray(IMAGENET_STD, dtype=np.float32)
    return torch.from_numpy((pixels - mean) / std).permute(0, 3, 1, 2).contiguous()


def image_to_tiles(image: Image.Image, *, max_tiles: int = MAX_TILES) -> torch.Tensor:
    """One image -> [N, 3, 448, 448]; N = 1, or grid tiles + thumbnail (3..13)."""
    return normalize(split_into_tiles(image.convert("RGB"), max_tiles=max_tiles))


def frames_to_tiles(frames: Sequence[Image.Image]) -> torch.Tensor:
    """Video frames -> [F, 3, 448, 448], one centre-cropped tile per frame."""
    return normalize([center_square(frame.convert("RGB")) for frame in frames])


def sample_frames(frames: Sequence[Frame], *, min_frames: int = 4, max_frames: int = 4) -> list[Frame]:
    """Frames (images, or their encoded bytes) evenly spaced from first to last, as upstream's video
    reader picks them: the count is clamped to [min_frames, max_frames] (frames repeat when there
    are too few)."""
    if not frames:
        return []
    count = min(max(len(frames), min_frames), max_frames)
    return [frames[index] for index in np.linspace(0, len(frames) - 1, num=count, dtype=int)]
