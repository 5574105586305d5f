"""Batched media encoding: each turn's features equal its own encoding; the thread isolates failures."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import soundfile
import torch
from PIL import Image, ImageDraw

from vita.checkpoint import load_model
from vita.media_encoder import MediaEncoder, MediaRequest, encode_turn_media
from vita.model import VitaQwen2ForCausalLM
from shared_data import AUDIO


@pytest.fixture(scope="module")
def model(tiny_checkpoint: Path) -> VitaQwen2ForCausalLM:
    return load_model(tiny_checkpoint, progress=False)


def clip(name: str, seconds: float) -> np.ndarray:
    wave, rate = soundfile.read(AUDIO / name, dtype="float32")
    assert rate == 16000
    return wave[: int(seconds * rate)]


def frame(color: str) -> Image.Image:
    image = Image.new("RGB", (320, 240), "white")
    ImageDraw.Draw(image).rectangle((40, 30, 200, 180), fill=color)
    return image


def requests() -> list[MediaRequest]:
    return [
        MediaRequest(clip("en_hello.wav", 2.0)),
        MediaRequest(clip("zh_weather.wav", 3.3), [frame("red"), frame("blue")]),
        MediaRequest(None, [frame("green")]),
        MediaRequest(clip("en_describe.wav", 0.7)),
    ]


def assert_same(a: torch.Tensor | None, b: torch.Tensor | None) -> None:
    assert (a is None) == (b is None)
    if a is not None:
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_a_batch_encodes_each_turn_as_if_alone(model: VitaQwen2ForCausalLM) -> None:
    batched = encode_turn_media(model, requests())
    alone = [encode_turn_media(model, [request])[0] for request in requests()]
    assert [m.frame_count for m in batched] == [0, 4, 4, 0]  # frames always make a 4-frame video
    assert [None if m.audio is None else m.audio.shape[0] for m in batched] == [
        None if m.audio is None else m.audio.shape[0] for m in alone
    ]
    assert batched[0].audio.shape[0] > batched[3].audio.shape[0]  # different lengths really were padded
    for b, a in zip(batched, alone):
        assert_same(b.audio, a.audio)
        assert_same(b.frames, a.frames)
    whole = model.encode_audio(clip("zh_weather.wav", 3.3))  # the model's own single-clip path
    torch.testing.assert_close(batched[1].audio, whole, rtol=1e-4, atol=1e-5)


def test_thread_encodes_concurrent_turns_and_fails_only_the_bad_one(model: VitaQwen2ForCausalLM) -> None:
    encoder = MediaEncoder(model)
    try:
        too_short = MediaRequest(np.zeros(100, dtype=np.float32))
        futures = [encoder.submit(request) for request in [*requests(), too_short]]
        results = [future.result(timeout=60) for future in futures[:-1]]
        with pytest.raises(ValueError, match="too short"):
            futures[-1].result(timeout=60)
    finally:
        encoder.close()
    for result, expected in zip(results, encode_turn_media(model, requests())):
        assert_same(result.audio, expected.audio)
        assert_same(result.frames, expected.frames)


def test_a_closed_encoder_refuses_new_turns(model: VitaQwen2ForCausalLM) -> None:
    encoder = MediaEncoder(model)
    encoder.close()
    with pytest.raises(RuntimeError, match="closed"):
        encoder.submit(requests()[0])
