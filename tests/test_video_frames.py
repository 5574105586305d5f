"""A turn's camera frames always make a 4-frame video, picked in upstream's order (repeats earliest first)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from PIL import Image

from vita.checkpoint import load_model
from vita.image_tiles import frames_to_tiles
from vita.media_encoder import VIDEO_FRAMES, MediaRequest, encode_turn_media
from vita.model import VitaQwen2ForCausalLM

COLORS = ["red", "green", "blue", "yellow", "white", "black"]


@pytest.fixture(scope="module")
def model(tiny_checkpoint: Path) -> VitaQwen2ForCausalLM:
    return load_model(tiny_checkpoint, progress=False)


def frame(color: str) -> Image.Image:
    return Image.new("RGB", (320, 240), color)


# upstream web_demo/server.py `_process_video(max_frames=4, min_frames=4)`:
# np.linspace(0, n - 1, num=4, dtype=int) over the recorded frames
@pytest.mark.parametrize(
    ("arrived", "picked"),
    [(1, [0, 0, 0, 0]), (2, [0, 0, 0, 1]), (3, [0, 0, 1, 2]), (4, [0, 1, 2, 3]), (6, [0, 1, 3, 5])],
)
def test_frames_become_four_in_upstream_order(model: VitaQwen2ForCausalLM, arrived: int, picked: list[int]) -> None:
    frames = [frame(color) for color in COLORS[:arrived]]
    media = encode_turn_media(model, [MediaRequest(None, frames)])[0]
    assert media.frame_count == VIDEO_FRAMES == 4
    with torch.inference_mode():
        expected = model.encode_images(frames_to_tiles([frames[i] for i in picked]))
    torch.testing.assert_close(media.frames, expected, rtol=1e-4, atol=1e-5)

