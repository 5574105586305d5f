"""`speak`: one `SpeechService` utterance awaited on an asyncio loop, its segments handed over on that loop."""

from __future__ import annotations

import asyncio
from typing import Any

import numpy as np
import torch

from tts.service import SegmentCallback, SpeechService


async def speak(
    service: SpeechService, embeddings: torch.Tensor, on_segment: SegmentCallback, *, codec_chunk_size: int,
    **options: Any,
) -> None:
    """Synthesise `embeddings` (`options`: `SpeechService.speak`'s others); `on_segment` runs on the
    running loop for each segment in order. Leaving early (cancellation) cancels the utterance: no
    segment of it is handled after that."""
    loop = asyncio.get_running_loop()
    done: asyncio.Future[None] = loop.create_future()
    stopped = False

    def segment_in_loop(segment: np.ndarray) -> None:
        if not stopped:
            on_segment(segment)

    def done_in_loop(error: BaseException | None) -> None:
        if done.done():
            return
        if error is None:
            done.set_result(None)
        else:
            done.set_exception(error)

    handle = service.speak(
        embeddings,
        codec_chunk_size=codec_chunk_size,
        on_segment=lambda segment: loop.call_soon_threadsafe(segment_in_loop, segment),
        on_done=lambda error: loop.call_soon_threadsafe(done_in_loop, error),
        **options,
    )
    try:
        await done
    finally:
        stopped = True
        handle.cancel()
