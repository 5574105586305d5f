"""Client audio to 16 kHz mono int16: PCM16 decoding, down-mixing, streaming soxr resampling."""

from __future__ import annotations

import numpy as np
import soxr

from server.protocol import MAX_AUDIO_FRAME_BYTES, MAX_INPUT_SAMPLE_RATE, MIN_INPUT_SAMPLE_RATE

MODEL_SAMPLE_RATE = 16_000


class InvalidAudio(ValueError):
    """A PCM16 frame that cannot be decoded (odd length, partial sample, too large)."""


class InputAudioConverter:
    """Converts one session's stream of PCM16 frames to 16 kHz mono int16, chunk by chunk.

    The soxr stream keeps its filter state between frames, so frame boundaries leave no clicks
    and the output length tracks the input duration exactly.
    """

    def __init__(self, sample_rate: int, channels: int) -> None:
        if not MIN_INPUT_SAMPLE_RATE <= sample_rate <= MAX_INPUT_SAMPLE_RATE:
            raise InvalidAudio(f"sample rate {sample_rate} outside {MIN_INPUT_SAMPLE_RATE}-{MAX_INPUT_SAMPLE_RATE} Hz")
        if channels not in (1, 2):
            raise InvalidAudio(f"{channels} channels: only mono or stereo")
        self.sample_rate = sample_rate
        self.channels = channels
        self._resampler = None
        if sample_rate != MODEL_SAMPLE_RATE:
            self._resampler = soxr.ResampleStream(sample_rate, MODEL_SAMPLE_RATE, 1, dtype="float32")

    def decode(self, frame: bytes) -> np.ndarray:
        """Interleaved PCM16 LE bytes -> mono float32 in [-1, 1] at the input rate."""
        samples = self._samples(frame).astype(np.float32) / 32768.0
        return samples.reshape(-1, self.channels).mean(axis=1)

    def _samples(self, frame: bytes) -> np.ndarray:
        """The frame's interleaved int16 samples (a view of it), checked."""
        if len(frame) > MAX_AUDIO_FRAME_BYTES:
            raise InvalidAudio(f"audio frame of {len(frame)} bytes exceeds {MAX_AUDIO_FRAME_BYTES}")
        if len(frame) % (2 * self.channels):
            raise InvalidAudio(
                f"audio frame of {len(frame)} bytes is not a whole number of {self.channels}-channel PCM16 samples"
            )
        return np.frombuffer(frame, dtype="<i2")

    def convert(self, frame: bytes) -> np.ndarray:
        """One client frame -> the 16 kHz mono int16 samples that are ready now (16 kHz mono input is
        only copied: 64 sessions send 3,200 frames a second to the gateway's loop)."""
        if self.channels == 1 and self._resampler is None:
            return self._samples(frame).astype(np.int16)
        mono = self.decode(frame)
        if self._resampler is not None:
            mono = self._resampler.resample_chunk(mono)
        return to_int16(mono)

    def flush(self) -> np.ndarray:
        """Samples still held by the resampler at the end of the stream."""
        if self._resampler is None:
            return np.zeros(0, dtype=np.int16)
        return to_int16(self._resampler.resample_chunk(np.zeros(0, dtype=np.float32), last=True))


def to_int16(samples: np.ndarray) -> np.ndarray:
    """Float samples in [-1, 1] -> int16 with clipping."""
    return np.clip(np.round(samples * 32768.0), -32768, 32767).astype(np.int16)
