"""Chunked vocoding: which windows of codec codes to decode as tokens arrive, decoded in batches.

Chunking follows upstream `llm2TTS.run`: once `chunk_size` new codes plus `padding` look-ahead codes
exist, the codec decodes them together with up to `padding` earlier codes and only the audio of the
new chunk is kept; the rest is decoded when the decoder stops. Concatenated segments equal a
one-shot decode of all codes exactly when `padding` covers the codec's receptive field
(`TiCodec.generator.receptive_field_frames()`); with less, samples near chunk boundaries differ
slightly, which upstream accepts for latency.

A last window may take more earlier codes as context than `padding` (`Chunker`'s `fit_lengths`), so
that its length is one the vocoder batches and replays from a CUDA graph: more context only brings
its audio closer to the one-shot decode, and the odd-length eager codec call it replaces costs as
much as a whole batch.

Upstream also re-cuts the audio at quiet points (`find_min_sum_index`) because its web demo plays
each segment as a separate clip; the samples are the same, so this streams plain chunks.

`decode_windows` decodes the windows of many utterances together: a codec call per window length
on a [B, T] stack (rows are independent, so each equals its one-by-one decode up to float rounding),
asking only for the frames its rows keep: the codec's later, high-rate layers then skip the context
and look-ahead (a middle window of 40 frames with 10 each side cost 28 % less on the 2-core CPU).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Collection, Iterator
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import torch

from layers.shapes import padded
from tts.config import CODEC_FRAME_SAMPLES


class CodecDecoder(Protocol):
    """`TiCodec`, or `CodecGraphs` replaying it: codes [B, T] -> float audio of frames `keep` [start,
    stop), [B, (stop - start) * 600]."""

    def decode(self, codes: torch.Tensor, keep: tuple[int, int] | None = None) -> torch.Tensor: ...


@dataclass(frozen=True)
class CodecWindow:
    """Codes to decode (context included) and which of their frames make the segment."""

    codes: tuple[int, ...]
    skip: int  # leading context frames whose audio is dropped
    frames: int  # frames kept after them
    first: int  # the utterance's frame where the kept audio starts


class Chunker:
    """The windows of one utterance, in order, as its codes arrive. A last window takes more earlier
    codes as context where that makes its length the shortest of `fit_lengths` that it fits."""

    def __init__(self, chunk_size: int, padding: int, fit_lengths: Collection[int] = ()) -> None:
        self.chunk_size = chunk_size
        self.padding = padding
        self.fit_lengths = sorted(fit_lengths)
        self.codes: list[int] = []
        self.emitted = 0  # frames already covered by windows

    def push(self, code: int) -> CodecWindow | None:
        """Add a code; the window it completes, if any (`chunk_size` frames with their look-ahead)."""
        self.codes.append(code)
        if len(self.codes) - self.emitted < self.chunk_size + self.padding:
            return None
        return self._window(self.emitted + self.chunk_size)

    def finish(self) -> CodecWindow | None:
        """The window of the codes left when the decoder stops (none if nothing is left)."""
        end = len(self.codes)
        if end <= self.emitted:
            return None
        length = end - max(0, self.emitted - self.padding)
        fitting = next((n for n in self.fit_lengths if length <= n <= end), length)
        return self._window(end, context=fitting - (end - self.emitted))

    def _window(self, end: int, context: int | None = None) -> CodecWindow:
        """Frames [emitted, end), decoded with up to `padding` frames of look-ahead and up to `context`
        (default `padding`) frames of earlier context."""
        first = self.emitted
        start = max(0, first - (self.padding if context is None else context))
        self.emitted = end
        return CodecWindow(tuple(self.codes[start : end + self.padding]), first - start, end - first, first)


def to_int16(audio: torch.Tensor) -> np.ndarray:
    """Float audio in [-1, 1] -> int16 (scaled by 32767, rounded, clipped), converted on its device."""
    return (audio.float() * 32767.0).round().clamp(-32768, 32767).to(torch.int16).cpu().numpy()


def window_lengths(chunk_sizes: tuple[int, ...], padding: int) -> tuple[range, set[int]]:
    """Every window length chunking can ask for, and those of the first and middle windows (the
    ones many utterances share; only last windows have other lengths)."""
    every = range(1, max(chunk_sizes) + 2 * padding + 1)
    return every, set(shared_window_keeps(chunk_sizes, padding))


def shared_window_keeps(chunk_sizes: tuple[int, ...], padding: int) -> dict[int, set[tuple[int, int]]]:
    """Per length of first and middle windows, the frames [start, stop) its codec calls keep: a first
    window's chunk (before its look-ahead), a middle window's (between context and look-ahead), and
    the whole window, for last windows fitted to that length and calls that mix them with others."""
    keeps: dict[int, set[tuple[int, int]]] = defaultdict(set)
    for chunk in chunk_sizes:
        keeps[chunk + padding] |= {(0, chunk), (0, chunk + padding)}
        keeps[chunk + 2 * padding] |= {(padding, padding + chunk), (0, chunk + 2 * padding)}
    return dict(keeps)


def decode_windows(
    codec: CodecDecoder,
    windows: list[CodecWindow],
    batch_sizes: tuple[int, ...] = (1,),
    batched_lengths: Collection[int] | None = None,
) -> Iterator[tuple[int, np.ndarray]]:
    """(index, int16 24 kHz segment) of every window, yielded after each codec call. Windows of one
    length (one of `batched_lengths`, default any) are decoded together, up to the largest of
    `batch_sizes` (ascending) per call, each call's batch padded up to one of those sizes with rows
    of code 0; other windows go one per call. On CUDA, cuDNN then meets only the shapes planned at
    start-up (a new shape costs a 60 to 100 ms plan). Calls go in the order of their first window.
    (On CUDA a batch of 64 windows takes 0.8 ms per window against 4.6 ms alone; on CPU batches are
    no faster, so the default decodes one window per call.)"""
    by_length: dict[int, list[int]] = defaultdict(list)
    for i, window in enumerate(windows):
        by_length[len(window.codes)].append(i)
    calls = sorted(
        indices[begin : begin + size]
        for length, indices in by_length.items()
        for size in [batch_sizes[-1] if batched_lengths is None or length in batched_lengths else 1]
        for begin in range(0, len(indices), size)
    )
    for call in calls:
        length = len(windows[call[0]].codes)
        batch = padded(len(call), batch_sizes) if batched_lengths is None or length in batched_lengths else 1
        codes = torch.zeros(batch, length, dtype=torch.long)
        codes[: len(call)] = torch.tensor([windows[i].codes for i in call])
        start = min(windows[i].skip for i in call)
        stop = max(windows[i].skip + windows[i].frames for i in call)
        audio = to_int16(codec.decode(codes, (start, stop))[: len(call)])
        for row, i in enumerate(call):
            skip, frames = windows[i].skip - start, windows[i].frames
            yield i, audio[row, skip * CODEC_FRAME_SAMPLES : (skip + frames) * CODEC_FRAME_SAMPLES]
