"""Turn media encoding, batched across turns: whale for the audio, InternViT for the video frames.

`encode_turn_media` encodes several turns in one whale forward (padded, with lengths: each
turn's features equal its own encoding) and one InternViT forward over all their tiles.

A turn's camera frames always make a video of `VIDEO_FRAMES`, picked as upstream's web demo picks
them from its recording: `np.linspace(0, n - 1, 4)` truncated to indices, in time order, so fewer
frames repeat, the earliest most (1 -> aaaa, 2 -> aaab, 3 -> aabc).

`MediaEncoder` runs it in a thread of its own, on a CUDA stream of its own: turns that end
together (users who stop talking at the same moment) are encoded as one batch, away from the
engine's loop, where one encode after another would stall every session's decoding.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from contextlib import nullcontext
from collections.abc import Sequence
from concurrent.futures import Future
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image
from torch.nn.utils.rnn import pad_sequence

from layers.host_copy import to_device
from tts.activity_log import ActivityLog
from vita.image_tiles import frames_to_tiles, sample_frames
from vita.model import VitaQwen2ForCausalLM
from vita.whale import MIN_FBANK_FRAMES

VIDEO_FRAMES = 4  # upstream web demo: min_frames = max_frames = 4
MAX_BATCH = 64


@dataclass(frozen=True)
class TurnMedia:
    """A turn's encoded media: audio features `[T', hidden]` and one `[256, hidden]` block per video frame."""

    audio: torch.Tensor | None = None
    frames: torch.Tensor | None = None  # [N, 256, hidden]

    @property
    def frame_count(self) -> int:
        return 0 if self.frames is None else self.frames.shape[0]


@dataclass(frozen=True)
class MediaRequest:
    """What a turn brings: 16 kHz mono float audio in [-1, 1] and camera frames (either may be absent)."""

    audio_16k: np.ndarray | None = None
    frames: Sequence[Image.Image] = ()


@torch.inference_mode()
def encode_turn_media(model: VitaQwen2ForCausalLM, requests: Sequence[MediaRequest]) -> list[TurnMedia]:
    """Encode every request's audio in one whale forward and all their frames in one InternViT forward."""
    audio: list[torch.Tensor | None] = [None] * len(requests)
    with_audio = [i for i, request in enumerate(requests) if request.audio_16k is not None]
    if with_audio:
        encoder = model.model.audio_encoder
        feats = encoder.waveform_features_many([requests[i].audio_16k for i in with_audio])
        if (shortest := min(f.shape[0] for f in feats)) < MIN_FBANK_FRAMES:  # padding would hide it
            raise ValueError(f"audio too short: {shortest} fbank frames, need {MIN_FBANK_FRAMES}")
        lengths = to_device([f.shape[0] for f in feats], feats[0].device)
        hidden, out_lengths = encoder(pad_sequence(feats, batch_first=True), lengths)
        for row, (i, length) in enumerate(zip(with_audio, out_lengths.tolist())):
            audio[i] = hidden[row, :length].to(model.dtype)

    videos = [sample_frames(list(r.frames), min_frames=VIDEO_FRAMES, max_frames=VIDEO_FRAMES) for r in requests]
    frames: list[torch.Tensor | None] = [None] * len(requests)
    if any(videos):
        features = model.encode_images(torch.cat([frames_to_tiles(video) for video in videos if video]))
        start = 0
        for i, video in enumerate(videos):
            if video:
                frames[i] = features[start : start + len(video)]
                start += len(video)
    return [TurnMedia(a, f) for a, f in zip(audio, frames)]


class MediaEncoder:
    """A thread that encodes the media of all waiting turns as one batch (`encode_turn_media`).

    `submit` may be called from any thread; the future's tensors are ready to use on the stream
    that was current in the submitting thread.
    """

    def __init__(self, model: VitaQwen2ForCausalLM, max_batch: int = MAX_BATCH) -> None:
        self.model = model
        self.max_batch = max_batch
        self.on_cuda = model.device.type == "cuda"
        # high priority, as the LLM's stream: a turn's media is on the way to its first token
        self.stream = torch.cuda.Stream(model.device, priority=-2) if self.on_cuda else None
        self._requests: queue.SimpleQueue[tuple[MediaRequest, Future, torch.cuda.Stream | None] | None] = (
            queue.SimpleQueue()
        )
        self._closed = False
        self._thread = threading.Thread(target=self._run, name="vita-media", daemon=True)
        self._thread.start()

    def submit(self, request: MediaRequest) -> Future[TurnMedia]:
        """Queue a turn's media; the future holds its `TurnMedia` or the encoder's exception."""
        if self._closed:
            raise RuntimeError("the media encoder is closed")
        future: Future[TurnMedia] = Future()
        consumer = torch.cuda.current_stream(self.model.device) if self.on_cuda else None
        self._requests.put((request, future, consumer))
        return future

    def alive(self) -> bool:
        """Whether the encoder thread runs (False once closed, or if it died)."""
        return self._thread.is_alive()

    def close(self) -> None:
        """Finish the batch in progress and stop the thread (waiting requests are cancelled)."""
        self._closed = True
        self._requests.put(None)
        self._thread.join()

    def _run(self) -> None:
        activity = ActivityLog(logging.getLogger("vita.media"), "vita-media")
        while (first := self._requests.get()) is not None:
            batch = [first]
            while len(batch) < self.max_batch:
                try:
                    item = self._requests.get_nowait()
                except queue.Empty:
                    break
                if item is None:
                    self._requests.put(None)
                    break
                batch.append(item)
            started = time.perf_counter()
            self._encode([item for item in batch if item[1].set_running_or_notify_cancel()])
            activity.add("encode", time.perf_counter() - started, len(batch))
        while True:  # closed: cancel what is left
            try:
                item = self._requests.get_nowait()
            except queue.Empty:
                return
            if item is not None:
                item[1].cancel()

    def _encode(self, batch: list[tuple[MediaRequest, Future, torch.cuda.Stream | None]]) -> None:
        if not batch:
            return
        try:
            with torch.cuda.stream(self.stream) if self.on_cuda else nullcontext():
                results = encode_turn_media(self.model, [request for request, _, _ in batch])
            if self.stream is not None:
                self.stream.synchronize()
        except Exception as error:
            if len(batch) > 1:  # one bad turn must not fail the others: encode them one by one
                for item in batch:
                    self._encode([item])
                return
            batch[0][1].set_exception(error)
            return
        for (_, future, consumer), media in zip(batch, results):
            if consumer is not None:  # the caching allocator must not reuse these until the consumer is done
                for tensor in (media.audio, media.frames):
                    if tensor is not None:
                        tensor.record_stream(consumer)
            future.set_result(media)

