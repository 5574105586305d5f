"""Per-session outgoing message queue: events never dropped, reply audio bounded.

A slow reader cannot make the server buffer unbounded audio: once the queued audio exceeds
the limit, new segments are dropped and one ``response.audio.dropped`` notice per reply
(updated in place while it waits) tells the client how much it missed.

The queue holds the session's native events and audio; an ``Encoding`` turns them into the
messages of the connection's protocol (``NativeEncoding`` for ``/ws``; ``server.realtime`` for
the OpenAI Realtime API): events as they are queued, audio as it is taken.
"""

from __future__ import annotations

import asyncio
from collections import deque
from dataclasses import dataclass
from typing import Protocol

from server.protocol import ResponseAudioDropped, ServerEvent, encode_audio_segment, encode_event


@dataclass
class AudioItem:
    """One queued reply audio segment."""

    response_id: int
    segment: int
    pcm16: bytes


@dataclass
class DropNotice:
    """The ``response.audio.dropped`` notice of one reply, counting up while it waits in the queue."""

    response_id: int
    segments: int
    samples: int


QueueItem = str | AudioItem | DropNotice


class Encoding(Protocol):
    """How a protocol writes the session's events and reply audio."""

    def event(self, event: ServerEvent) -> list[str]:
        """The text messages of one event (none, one or several; exactly one for ``response.audio.dropped``)."""

    def audio(self, response_id: int, segment: int, pcm16: bytes) -> str | bytes:
        """The message of one reply audio segment (PCM16 LE mono 24 kHz)."""


class NativeEncoding:
    """The ``/ws`` protocol: JSON events, audio as binary frames with a header."""

    def event(self, event: ServerEvent) -> list[str]:
        return [encode_event(event)]

    def audio(self, response_id: int, segment: int, pcm16: bytes) -> str | bytes:
        return encode_audio_segment(response_id, segment, pcm16)


@dataclass(frozen=True)
class OutgoingMessage:
    """A message to send; for reply audio, its reply and number of samples (the playback estimate)."""

    data: str | bytes
    response_id: int | None = None
    samples: int = 0


class OutgoingQueue:
    """FIFO of messages for one websocket; ``get`` returns them ready to send."""

    def __init__(self, audio_limit_bytes: int, encoding: Encoding | None = None) -> None:
        self.audio_limit_bytes = audio_limit_bytes
        self.encoding = encoding or NativeEncoding()
        self._items: deque[QueueItem] = deque()
        self._audio_bytes = 0
        self._pending_drops: dict[int, DropNotice] = {}
        self._wakeup = asyncio.Event()
        self._closed = False

    @property
    def queued_audio_bytes(self) -> int:
        return self._audio_bytes

    def put_event(self, event: ServerEvent) -> None:
        for message in self.encoding.event(event):
            self._push(message)

    def put_message(self, text: str) -> None:
        """Queue a text message already in the connection's protocol."""
        self._push(text)

    def put_audio(self, response_id: int, segment: int, pcm16: bytes) -> bool:
        """Queue one reply audio segment; returns False (and records it) when it was dropped."""
        if self._audio_bytes + len(pcm16) > self.audio_limit_bytes:
            notice = self._pending_drops.get(response_id)
            if notice is None:
                notice = self._pending_drops[response_id] = DropNotice(response_id, 0, 0)
                self._push(notice)
            notice.segments += 1
            notice.samples += len(pcm16) // 2
            return False
        self._audio_bytes += len(pcm16)
        self._push(AudioItem(response_id, segment, pcm16))
        return True

    def discard_audio(self, response_id: int) -> int:
        """Remove the queued segments of one reply (it was interrupted); returns how many."""
        kept: deque[QueueItem] = deque()
        removed = 0
        for item in self._items:
            if isinstance(item, AudioItem) and item.response_id == response_id:
                self._audio_bytes -= len(item.pcm16)
                removed += 1
            else:
                kept.append(item)
        self._items = kept
        return removed

    def _push(self, item: QueueItem) -> None:
        self._items.append(item)
        self._wakeup.set()

    def close(self) -> None:
        """No more messages: ``get`` returns None once the queue is empty."""
        self._closed = True
        self._wakeup.set()

    async def get(self) -> OutgoingMessage | None:
        """Next message to send, waiting while the queue is empty; None after ``close``."""
        while not self._items:
            if self._closed:
                return None
            self._wakeup.clear()
            await self._wakeup.wait()
        item = self._items.popleft()
        if isinstance(item, AudioItem):
            self._audio_bytes -= len(item.pcm16)
            data = self.encoding.audio(item.response_id, item.segment, item.pcm16)
            return OutgoingMessage(data, item.response_id, len(item.pcm16) // 2)
        if isinstance(item, DropNotice):
            del self._pending_drops[item.response_id]
            notice = ResponseAudioDropped(response_id=item.response_id, segments=item.segments, samples=item.samples)
            (data,) = self.encoding.event(notice)  # one message in every protocol
            return OutgoingMessage(data)
        return OutgoingMessage(item)
