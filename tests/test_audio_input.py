"""Input conversion: decoding, down-mix and streaming resampling against analytic signals."""

import numpy as np
import pytest

from server.audio_input import MODEL_SAMPLE_RATE, InputAudioConverter, InvalidAudio


def sine(rate: int, seconds: float, freq: float = 440.0, amplitude: float = 0.5) -> np.ndarray:
    t = np.arange(int(rate * seconds)) / rate
    return amplitude * np.sin(2 * np.pi * freq * t)


def pcm16(samples: np.ndarray) -> bytes:
    return np.round(samples * 32767).astype("<i2").tobytes()


def stream(converter: InputAudioConverter, data: bytes, chunk_bytes: int) -> np.ndarray:
    parts = [converter.convert(data[i : i + chunk_bytes]) for i in range(0, len(data), chunk_bytes)]
    parts.append(converter.flush())
    return np.concatenate(parts).astype(np.float64) / 32768.0


@pytest.mark.parametrize(("rate", "channels"), [(48_000, 2), (44_100, 1), (8_000, 1), (22_050, 2), (16_000, 1)])
def test_streamed_resampling_matches_the_sine_sampled_at_16k(rate: int, channels: int) -> None:
    seconds = 1.0
    mono = sine(rate, seconds)
    interleaved = np.repeat(mono, channels)  # identical channels
    chunk = 2 * channels * (rate // 50)  # 20 ms frames as a browser would send
    out = stream(InputAudioConverter(rate, channels), pcm16(interleaved), chunk)
    expected = sine(MODEL_SAMPLE_RATE, seconds)
    assert abs(len(out) - len(expected)) <= 1
    n = min(len(out), len(expected))
    middle = slice(800, n - 800)  # filter edges
    assert np.max(np.abs(out[middle] - expected[middle])) < 2e-3


def test_stereo_is_averaged() -> None:
    left, right = sine(16_000, 0.1, 300), sine(16_000, 0.1, 700, 0.25)
    interleaved = np.stack([left, right], axis=1).reshape(-1)
    out = InputAudioConverter(16_000, 2).convert(pcm16(interleaved)).astype(np.float64) / 32768.0
    np.testing.assert_allclose(out, (left + right) / 2, atol=2e-4)


@pytest.mark.parametrize(("channels", "size"), [(1, 3), (2, 6), (2, 1)])
def test_partial_samples_are_rejected(channels: int, size: int) -> None:
    with pytest.raises(InvalidAudio):
        InputAudioConverter(16_000, channels).convert(b"\0" * size)


def test_oversized_frames_and_bad_formats_are_rejected() -> None:
    with pytest.raises(InvalidAudio):
        InputAudioConverter(16_000, 1).convert(b"\0" * (2 << 20))
    with pytest.raises(InvalidAudio):
        InputAudioConverter(4_000, 1)
    with pytest.raises(InvalidAudio):
        InputAudioConverter(16_000, 3)


def test_16k_mono_passes_through_sample_for_sample() -> None:
    samples = np.array([-32768, -1, 0, 1, 12345, 32767] * 50, dtype=np.int16)
    out = InputAudioConverter(16_000, 1).convert(samples.astype("<i2").tobytes())
    np.testing.assert_array_equal(out, samples)
    assert out.dtype == np.int16 and out.flags.writeable  # a copy, not a view of the frame's bytes
