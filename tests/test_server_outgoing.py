"""Outgoing queue: order kept, events never dropped, audio bounded with a drop notice."""

import asyncio
import json

from server.outgoing import OutgoingQueue
from server.protocol import ResponseStarted, decode_audio_segment


async def drain(queue: OutgoingQueue) -> list[str | bytes]:
    queue.close()
    out = []
    while (message := await queue.get()) is not None:
        out.append(message.data)
    return out


async def test_messages_keep_their_order() -> None:
    queue = OutgoingQueue(audio_limit_bytes=1_000)
    queue.put_event(ResponseStarted(response_id=1))
    queue.put_audio(1, 0, b"\x01\x00" * 10)
    queue.put_event(ResponseStarted(response_id=2))
    out = await drain(queue)
    assert json.loads(out[0])["response_id"] == 1
    assert decode_audio_segment(out[1]) == (1, 0, b"\x01\x00" * 10)
    assert json.loads(out[2])["response_id"] == 2


async def test_audio_over_the_limit_is_dropped_and_reported_once_per_reply() -> None:
    queue = OutgoingQueue(audio_limit_bytes=100)
    accepted = [queue.put_audio(1, i, b"\0" * 40) for i in range(5)]
    for _ in range(50):
        queue.put_event(ResponseStarted(response_id=9))  # events are never dropped
    assert accepted == [True, True, False, False, False]
    assert queue.queued_audio_bytes == 80
    out = await drain(queue)
    notices = [json.loads(m) for m in out if isinstance(m, str) and "dropped" in m]
    assert notices == [{"type": "response.audio.dropped", "response_id": 1, "segments": 3, "samples": 60}]
    assert sum(isinstance(m, str) and "response.started" in m for m in out) == 50
    assert queue.queued_audio_bytes == 0


async def test_space_frees_up_as_the_client_reads() -> None:
    queue = OutgoingQueue(audio_limit_bytes=100)
    assert queue.put_audio(1, 0, b"\0" * 80)
    assert not queue.put_audio(1, 1, b"\0" * 80)
    await queue.get()
    assert queue.put_audio(1, 2, b"\0" * 80)


async def test_discarding_a_reply_removes_only_its_audio() -> None:
    queue = OutgoingQueue(audio_limit_bytes=1_000)
    queue.put_audio(1, 0, b"\0" * 10)
    queue.put_audio(2, 0, b"\0" * 10)
    queue.put_event(ResponseStarted(response_id=3))
    queue.put_audio(1, 1, b"\0" * 10)
    assert queue.discard_audio(1) == 2
    out = await drain(queue)
    assert [decode_audio_segment(m)[0] for m in out if isinstance(m, bytes)] == [2]
    assert len(out) == 2


async def test_get_waits_for_a_message() -> None:
    queue = OutgoingQueue(audio_limit_bytes=1_000)
    getter = asyncio.create_task(queue.get())
    await asyncio.sleep(0.01)
    assert not getter.done()
    queue.put_event(ResponseStarted(response_id=4))
    assert json.loads((await asyncio.wait_for(getter, 1)).data)["response_id"] == 4
