"""Leading-silence trim on synthetic signals."""

import numpy as np
import pytest

from tts.silence import LeadingSilenceTrimmer, trim_leading_silence

RATE = 24000


def tone(seconds: float, amplitude: float) -> np.ndarray:
    t = np.arange(int(seconds * RATE)) / RATE
    return amplitude * np.sin(2 * np.pi * 220 * t + np.pi / 2)  # starts at its peak


def to_int16(x: np.ndarray) -> np.ndarray:
    return np.round(x * 32767).astype(np.int16)


@pytest.mark.parametrize("dtype", ["float", "int16"])
def test_silence_then_tone_starts_at_the_tone(dtype):
    rng = np.random.default_rng(0)
    quiet = 0.01 * rng.uniform(-1, 1, 4800)  # 0.2 s of noise below 0.03
    signal = np.concatenate([quiet, tone(0.5, 0.5)])
    if dtype == "int16":
        signal = to_int16(signal)
    trimmed = trim_leading_silence(signal)
    assert len(trimmed) == len(signal) - 4800
    np.testing.assert_array_equal(trimmed, signal[4800:])
    assert trimmed.dtype == signal.dtype


def test_all_silence_is_kept_whole():
    signal = to_int16(0.02 * np.ones(1000))
    np.testing.assert_array_equal(trim_leading_silence(signal), signal)
    assert len(trim_leading_silence(np.zeros(0, dtype=np.int16))) == 0


def test_no_leading_silence_is_untouched():
    signal = to_int16(tone(0.1, 0.8))
    np.testing.assert_array_equal(trim_leading_silence(signal), signal)


def test_threshold_is_configurable_and_strict():
    signal = np.array([0.0, 0.05, -0.2, 0.5, 0.0])
    assert trim_leading_silence(signal, threshold=0.1)[0] == -0.2
    assert trim_leading_silence(signal, threshold=0.05)[0] == -0.2  # strictly greater
    assert trim_leading_silence(signal, threshold=0.6) is signal
    int_signal = np.array([0, 983, 984, -2000], dtype=np.int16)  # 0.03 * 32768 = 983.04
    np.testing.assert_array_equal(trim_leading_silence(int_signal), [984, -2000])


def test_a_reply_is_trimmed_up_to_its_first_audible_sample_and_no_further():
    """Silence spanning whole segments is dropped; a pause inside the speech is kept."""
    rng = np.random.default_rng(1)
    quiet = to_int16(0.01 * rng.uniform(-1, 1, 12000))
    voice, pause = to_int16(tone(0.2, 0.5)), to_int16(np.zeros(6000))
    segments = [quiet, np.concatenate([quiet[:3000], voice]), np.concatenate([pause, voice]), pause]
    trimmer = LeadingSilenceTrimmer()
    played = [piece for segment in segments for piece in trimmer.push(segment)] + trimmer.flush()
    np.testing.assert_array_equal(np.concatenate(played), np.concatenate([voice, pause, voice, pause]))


def test_a_reply_with_nothing_audible_is_released_whole_at_the_end():
    quiet = to_int16(0.02 * np.ones(2400))
    trimmer = LeadingSilenceTrimmer()
    assert trimmer.push(quiet) == [] and trimmer.push(quiet) == []
    assert [len(s) for s in trimmer.flush()] == [2400, 2400]
