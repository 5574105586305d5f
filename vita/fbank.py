"""Kaldi-style log-mel filterbank in torch, as ``torchaudio.compliance.kaldi.fbank`` computes it.

VITA-1.5 feeds the whale encoder with ``kaldi.fbank(wave * 32768, num_mel_bins=80, frame_length=25,
frame_shift=10, dither=..., energy_floor=0.0)``; every other option is the Kaldi default: povey window,
pre-emphasis 0.97, DC offset removal, snip edges, 512-point power spectrum, mel bins from 20 Hz to
Nyquist, natural log floored at float32 epsilon.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence

import torch

PREEMPHASIS = 0.97
LOW_FREQ_HZ = 20.0
POVEY_EXPONENT = 0.85


def window_samples(sample_rate: int, milliseconds: float) -> int:
    """Number of samples in a window or shift of ``milliseconds``."""
    return int(sample_rate * milliseconds * 0.001)


def num_frames(num_samples: int, sample_rate: int = 16000, frame_length_ms: float = 25.0,
               frame_shift_ms: float = 10.0) -> int:
    """Frames Kaldi produces with ``snip_edges=True`` (only whole windows)."""
    length = window_samples(sample_rate, frame_length_ms)
    shift = window_samples(sample_rate, frame_shift_ms)
    return 0 if num_samples < length else 1 + (num_samples - length) // shift


def mel_scale(hz: torch.Tensor) -> torch.Tensor:
    """Kaldi mel scale ``1127 ln(1 + f / 700)``."""
    return 1127.0 * torch.log1p(hz / 700.0)


def mel_filterbank(num_mel_bins: int, fft_size: int, sample_rate: int) -> torch.Tensor:
    """Triangular filters ``[num_mel_bins, fft_size // 2 + 1]``, triangles in mel space (Kaldi ``MelBanks``)."""
    mel_low = mel_scale(torch.tensor(LOW_FREQ_HZ))
    mel_high = mel_scale(torch.tensor(sample_rate / 2.0))
    mel_step = (mel_high - mel_low) / (num_mel_bins + 1)
    left = mel_low + mel_step * torch.arange(num_mel_bins, dtype=torch.float32)[:, None]
    center = left + mel_step
    right = center + mel_step
    bin_mel = mel_scale(torch.arange(fft_size // 2, dtype=torch.float32) * (sample_rate / fft_size))[None, :]
    rising = (bin_mel - left) / (center - left)
    falling = (right - bin_mel) / (right - center)
    banks = torch.clamp(torch.minimum(rising, falling), min=0.0)
    return torch.nn.functional.pad(banks, (0, 1))  # the Nyquist bin gets no weight


def povey_window(length: int) -> torch.Tensor:
    """Kaldi's povey window: a symmetric Hann window raised to the power 0.85."""
    return torch.hann_window(length, periodic=False).pow(POVEY_EXPONENT)


@functools.lru_cache(maxsize=8)
def device_constants(length: int, num_mel_bins: int, fft_size: int, sample_rate: int,
                     device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """The povey window [length] and the transposed filterbank [fft_size // 2 + 1, num_mel_bins] on
    `device`, made once: each copy to a GPU would wait for the work queued before it."""
    return povey_window(length).to(device), mel_filterbank(num_mel_bins, fft_size, sample_rate).to(device).T


def fbank(waveform: torch.Tensor, *, num_mel_bins: int = 80, sample_rate: int = 16000,
          frame_length_ms: float = 25.0, frame_shift_ms: float = 10.0, dither: float = 0.0,
          generator: torch.Generator | None = None) -> torch.Tensor:
    """Log-mel filterbank ``[frames, num_mel_bins]`` of a 1-D waveform in 16-bit sample units (float32)."""
    return fbank_many([waveform], num_mel_bins=num_mel_bins, sample_rate=sample_rate, frame_length_ms=frame_length_ms,
                      frame_shift_ms=frame_shift_ms, dither=dither, generator=generator)[0]


def fbank_many(waveforms: Sequence[torch.Tensor], *, num_mel_bins: int = 80, sample_rate: int = 16000,
               frame_length_ms: float = 25.0, frame_shift_ms: float = 10.0, dither: float = 0.0,
               generator: torch.Generator | None = None, together: bool | None = None) -> list[torch.Tensor]:
    """`fbank` of each waveform (all on one device). `together` (default: on a GPU) sends the frames of
    all of them through one chain of operations (one FFT, one matrix product) instead of one chain
    each; on the CPU each waveform's frames go alone, where they stay in the cache (together they
    are slower there)."""
    length = window_samples(sample_rate, frame_length_ms)
    shift = window_samples(sample_rate, frame_shift_ms)
    fft_size = 1 << math.ceil(math.log2(length))
    frames = [w.to(torch.float32).unfold(0, length, shift) if w.numel() >= length
              else w.new_zeros(0, length, dtype=torch.float32) for w in waveforms]

    def log_mel(frames: torch.Tensor) -> torch.Tensor:
        if not len(frames):  # no whole window (an FFT of nothing fails)
            return frames.new_zeros(0, num_mel_bins)
        if dither != 0.0:
            noise = torch.randn(frames.shape, generator=generator, device=frames.device, dtype=frames.dtype)
            frames = frames + dither * noise
        window, banks = device_constants(length, num_mel_bins, fft_size, sample_rate, frames.device)
        frames = frames - frames.mean(dim=1, keepdim=True)
        previous = torch.cat([frames[:, :1], frames[:, :-1]], dim=1)
        frames = (frames - PREEMPHASIS * previous) * window
        power = torch.fft.rfft(frames, n=fft_size).abs().pow(2)
        return torch.clamp(power @ banks, min=torch.finfo(torch.float32).eps).log()

    if together is None:
        together = bool(frames) and frames[0].device.type != "cpu"
    if not together:
        return [log_mel(f) for f in frames]
    return list(log_mel(torch.cat(frames)).split([len(f) for f in frames]))
