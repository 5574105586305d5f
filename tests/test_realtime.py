"""/v1/realtime with the official ``openai`` SDK as the client: real uvicorn on loopback, tiny
checkpoint, an API key configured. Every server event received is parsed with the SDK's
``RealtimeServerEvent`` type. Replies are compared with what ``/ws`` answers to the same input:
both endpoints run the same turn pipeline, so greedy replies agree.
"""

from __future__ import annotations

import asyncio
import base64
import io
import json
import re
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import soundfile as sf
import soxr
import websockets
from openai import AsyncOpenAI
from openai.types.realtime import RealtimeServerEvent
from PIL import Image
from pydantic import TypeAdapter

from server.background import BackgroundServer
from server.settings import ServerSettings
from shared_data import AUDIO

KEY = "test-key-1"
VITA_GENERATION = {"respect_not_addressed": False, "temperature": 0.0, "max_new_tokens": 24}
SERVER_EVENT: TypeAdapter[Any] = TypeAdapter(RealtimeServerEvent)


@pytest.fixture(scope="module")
def server(tiny_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory):
    settings = ServerSettings(max_sessions=8, api_keys=[KEY, "other-key"], cache_dir=tmp_path_factory.mktemp("cache"))
    with BackgroundServer(settings, tiny_checkpoint) as running:
        yield running


def client(server: BackgroundServer, key: str = KEY) -> AsyncOpenAI:
    return AsyncOpenAI(api_key=key, websocket_base_url=f"ws://127.0.0.1:{server.port}/v1")


def hello_24k(tail_silence_s: float = 1.0) -> np.ndarray:
    """en_hello.wav as 24 kHz PCM16 (the Realtime API's rate), silence after it."""
    audio, rate = sf.read(AUDIO / "en_hello.wav", dtype="float32")
    at_24k = soxr.resample(audio, rate, 24_000)
    return np.round(np.concatenate([at_24k, np.zeros(int(24_000 * tail_silence_s))]) * 32767).astype(np.int16)


def png_data_url(color: tuple[int, int, int]) -> str:
    buffer = io.BytesIO()
    Image.new("RGB", (64, 48), color).save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


async def next_event(connection: Any, timeout: float = 60) -> Any:
    """The next server event, parsed strictly with the SDK's type (a wrong shape fails here)."""
    raw = await asyncio.wait_for(connection.recv_bytes(), timeout)
    event = SERVER_EVENT.validate_json(raw)
    assert event.type == json.loads(raw)["type"]
    return event


async def events_until(connection: Any, last_type: str, timeout: float = 60) -> list[Any]:
    events = [await next_event(connection, timeout)]
    while events[-1].type != last_type:
        events.append(await next_event(connection, timeout))
    return events


async def open_session(connection: Any, **session: Any) -> Any:
    """Check ``session.created``, apply ``session`` (with VITA's generation settings for the tiny
    checkpoint's random replies), return ``session.updated``."""
    created = await next_event(connection)
    assert created.type == "session.created" and created.session.type == "realtime"
    assert created.session.audio.input.format.rate == 24_000
    await connection.session.update(session={"type": "realtime", "vita": {"generation": VITA_GENERATION}, **session})
    updated = await next_event(connection)
    assert updated.type == "session.updated", updated
    return updated


async def append(connection: Any, audio: np.ndarray, chunk_ms: int = 100) -> None:
    step = 24 * chunk_ms
    for start in range(0, len(audio), step):
        await connection.input_audio_buffer.append(audio=base64.b64encode(audio[start : start + step].tobytes()).decode())


def response_text(events: list[Any], delta_type: str, done_type: str, field: str) -> str:
    """A response's text from its deltas, checked against its ``.done`` event."""
    text = "".join(e.delta for e in events if e.type == delta_type)
    assert [getattr(e, field) for e in events if e.type == done_type] == [text]
    return text


async def ws_reply(server: BackgroundServer, *messages: str | bytes, manual: bool = False) -> dict:
    """``response.done`` of ``/ws`` after ``messages`` (24 kHz input, same generation settings)."""
    async with websockets.connect(server.ws_url, additional_headers={"Authorization": f"Bearer {KEY}"},
                                  max_size=None) as ws:
        await ws.send(json.dumps({"type": "session.start", "sample_rate": 24_000, "generation": VITA_GENERATION,
                                  "turn_detection": "manual" if manual else "vad"}))
        for message in messages:
            await ws.send(message)
        while True:
            message = await asyncio.wait_for(ws.recv(), 60)
            if isinstance(message, str) and (event := json.loads(message))["type"] == "response.done":
                return event


async def test_server_vad_turn_streams_audio_and_its_transcript(server: BackgroundServer) -> None:
    audio = hello_24k()
    async with client(server).realtime.connect(model="vita-1.5") as connection:
        await open_session(connection)
        await append(connection, audio)
        events = await events_until(connection, "response.done")
    kinds = [e.type for e in events]
    assert kinds[:4] == ["input_audio_buffer.speech_started", "input_audio_buffer.speech_stopped",
                         "input_audio_buffer.committed", "conversation.item.added"]
    user_item = events[3].item
    assert user_item.role == "user" and user_item.id == events[0].item_id == events[2].item_id
    started = kinds.index("response.created")
    assert kinds[started:started + 4] == ["response.created", "response.output_item.added",
                                          "conversation.item.added", "response.content_part.added"]
    assert kinds[-6:] == ["response.output_audio.done", "response.output_audio_transcript.done",
                          "response.content_part.done", "response.output_item.done", "conversation.item.done",
                          "response.done"]
    transcript = response_text(events, "response.output_audio_transcript.delta",
                               "response.output_audio_transcript.done", "transcript")
    pcm = b"".join(base64.b64decode(e.delta) for e in events if e.type == "response.output_audio.delta")
    assert transcript and len(pcm) > 0 and len(pcm) % 2 == 0
    done = events[-1].response
    assert done.status == "completed" and done.output[0].content[0].transcript == transcript
    assert done.usage.input_tokens > 0 and done.usage.output_tokens > 0
    assert {e.response_id for e in events if hasattr(e, "response_id")} == {done.id}
    native = await ws_reply(server, audio.tobytes())  # the same audio on /ws: the same reply
    assert native["text"] == transcript
    assert (native["usage"]["input_tokens"], native["usage"]["output_tokens"]) == (
        done.usage.input_tokens, done.usage.output_tokens)


async def test_manual_turn_commit_then_response_create(server: BackgroundServer) -> None:
    audio = hello_24k(tail_silence_s=0.0)
    async with client(server).realtime.connect(model="vita-1.5") as connection:
        updated = await open_session(connection, audio={"input": {"turn_detection": None}})
        assert updated.session.audio.input.turn_detection is None
        await append(connection, audio)
        await connection.input_audio_buffer.commit(event_id="commit-1")
        committed = await events_until(connection, "conversation.item.done")
        assert [e.type for e in committed] == ["input_audio_buffer.committed", "conversation.item.added",
                                               "conversation.item.done"]  # no VAD events, no response yet
        await connection.response.create()
        events = await events_until(connection, "response.done")
    assert events[0].type == "response.created"
    transcript = response_text(events, "response.output_audio_transcript.delta",
                               "response.output_audio_transcript.done", "transcript")
    assert any(e.type == "response.output_audio.delta" for e in events)
    native = await ws_reply(server, audio.tobytes(), json.dumps({"type": "input_audio.commit"}), manual=True)
    assert native["text"] == transcript


async def test_text_item_gets_a_text_only_reply(server: BackgroundServer) -> None:
    async with client(server).realtime.connect(model="vita-1.5") as connection:
        updated = await open_session(connection, output_modalities=["text"])
        assert updated.session.output_modalities == ["text"]
        await connection.conversation.item.create(
            item={"type": "message", "role": "user", "content": [{"type": "input_text", "text": "Hello, who are you?"}]}
        )
        added = await events_until(connection, "conversation.item.done")
        assert added[0].item.content[0].text == "Hello, who are you?"
        await connection.response.create()
        events = await events_until(connection, "response.done")
    text = response_text(events, "response.output_text.delta", "response.output_text.done", "text")
    assert text and not any("audio" in e.type for e in events)
    assert events[-1].response.output_modalities == ["text"]
    native = await ws_reply(server, json.dumps({"type": "input_text", "text": "Hello, who are you?"}))
    assert native["text"] == text and native["audio_segments"] > 0  # /ws speaks a typed turn


async def test_image_parts_are_the_turns_video_frames(server: BackgroundServer) -> None:
    colors = [(255, 0, 0), (0, 0, 255)]
    content = [{"type": "input_text", "text": "What do you see?"},
               *[{"type": "input_image", "image_url": png_data_url(c)} for c in colors]]
    async with client(server).realtime.connect(model="vita-1.5") as connection:
        await open_session(connection, output_modalities=["text"])
        await connection.conversation.item.create(item={"type": "message", "role": "user", "content": content})
        await events_until(connection, "conversation.item.done")
        await connection.response.create()
        events = await events_until(connection, "response.done")
    text = response_text(events, "response.output_text.delta", "response.output_text.done", "text")
    frames = [json.dumps({"type": "video.frame", "image": png_data_url(c).partition(",")[2]}) for c in colors]
    with_frames = await ws_reply(server, *frames, json.dumps({"type": "input_text", "text": "What do you see?"}))
    without = await ws_reply(server, json.dumps({"type": "input_text", "text": "What do you see?"}))
    assert text == with_frames["text"] != without["text"]  # the images reached the model, as video frames


async def test_barge_in_and_response_cancel_end_replies_as_cancelled(server: BackgroundServer) -> None:
    audio = hello_24k()
    async with client(server).realtime.connect(model="vita-1.5") as connection:
        await open_session(connection, vita={"generation": {**VITA_GENERATION, "max_new_tokens": 400}})
        await append(connection, audio)
        while (await next_event(connection)).type != "response.output_audio.delta":
            pass  # reply 1 is speaking
        await append(connection, audio)  # the user talks over it
        events = await events_until(connection, "response.done")
        first = events[-1].response
        assert "input_audio_buffer.speech_started" in [e.type for e in events]
        assert (first.status, first.status_details.reason) == ("cancelled", "turn_detected")
        while (event := await next_event(connection)).type != "response.output_audio.delta":
            assert getattr(event, "response_id", None) != first.id  # nothing more of reply 1
        second_id = event.response_id
        await connection.response.cancel()
        events = await events_until(connection, "response.done")
        second = events[-1].response
        assert (second.id, second.status, second.status_details.reason) == (second_id, "cancelled", "client_cancelled")
        await connection.conversation.item.create(
            item={"type": "message", "role": "user", "content": [{"type": "input_text", "text": "Again."}]})
        await connection.response.create(response={"max_output_tokens": 24})
        events = await events_until(connection, "response.done")
    assert events[-1].response.status == "completed"
    stray = {getattr(e, "response_id", None) for e in events} & {first.id, second.id}
    assert not stray  # no delta of a cancelled reply came after its response.done


async def test_bad_events_get_errors_with_their_event_id_and_the_session_goes_on(server: BackgroundServer) -> None:
    async with client(server).realtime.connect(model="vita-1.5") as connection:
        await open_session(connection, audio={"input": {"turn_detection": None}})
        bad = [
            ("{oops", "invalid_json", None),
            (json.dumps({"type": "teleport", "event_id": "e1"}), "unknown_event", "type"),
            (json.dumps({"type": "input_audio_buffer.append", "audio": "***", "event_id": "e2"}), "invalid_event",
             "audio"),
            (json.dumps({"type": "conversation.item.delete", "item_id": "x", "event_id": "e3"}), "unsupported", "type"),
            (json.dumps({"type": "conversation.item.create", "event_id": "e4",
                         "item": {"type": "message", "role": "assistant", "content": []}}), "unsupported", "item.role"),
            (json.dumps({"type": "conversation.item.create", "event_id": "e5", "item": {"type": "message", "role": "user",
                         "content": [{"type": "input_image", "image_url": "data:image/png;base64,AAAA"}]}}),
             "invalid_image", None),
            (json.dumps({"type": "input_audio_buffer.commit", "event_id": "e6"}), "no_audio", None),
            (json.dumps({"type": "response.create", "event_id": "e7"}), "invalid_event", None),
            (json.dumps({"type": "response.cancel", "event_id": "e8"}), "no_response", None),
            (json.dumps({"type": "conversation.item.truncate", "event_id": "e9", "item_id": "nope",
                         "content_index": 0, "audio_end_ms": 10}), "invalid_event", "item_id"),
        ]
        for message, code, param in bad:
            await asyncio.sleep(0.25)  # under the 5 error events a second a session is sent
            await connection.send_raw(message)
            error = await next_event(connection)
            assert error.type == "error" and error.error.code == code, (message, error)
            assert error.error.event_id == (json.loads(message).get("event_id") if message != "{oops" else None)
            assert param is None or error.error.param == param
        await asyncio.sleep(0.25)
        await connection.session.update(session={"type": "realtime", "tools": [{"type": "function", "name": "f"}],
                                                 "audio": {"output": {"voice": "alloy"}}, "instructions": "Be brief."})
        errors = [await next_event(connection) for _ in range(2)]
        assert {(e.error.code, e.error.param) for e in errors} == {
            ("unsupported", "session.tools"), ("unsupported", "session.audio.output.voice")}
        updated = await next_event(connection)  # the rest of the update applies
        assert updated.type == "session.updated" and updated.session.instructions == "Be brief."
        await connection.conversation.item.create(
            item={"type": "message", "role": "user", "content": [{"type": "input_text", "text": "Hi."}]})
        await connection.response.create()
        events = await events_until(connection, "response.done")
    assert events[-1].response.status == "completed"


def refused(server: BackgroundServer) -> float:
    match = re.search(r'^vita_connections_refused_total\{reason="unauthorized"\} (\S+)$',
                      server.get_text("/metrics"), re.MULTILINE)
    return float(match[1]) if match else 0.0


async def test_a_wrong_or_missing_key_is_refused_and_browser_keys_work(server: BackgroundServer) -> None:
    before = refused(server)
    async with client(server, "wrong-key").realtime.connect(model="vita-1.5") as connection:
        error = await next_event(connection)
        assert (error.type, error.error.code, error.error.message) == ("error", "unauthorized", "invalid API key")
        with pytest.raises(websockets.ConnectionClosed) as closed:
            await connection.recv_bytes()
        assert closed.value.rcvd.code == 1008
    url = f"ws://127.0.0.1:{server.port}/v1/realtime?model=vita-1.5"
    async with websockets.connect(url) as keyless:
        error = SERVER_EVENT.validate_json(await keyless.recv())
        assert (error.type, error.error.code) == ("error", "unauthorized") and "required" in error.error.message
    assert refused(server) == before + 2
    async with websockets.connect(url, subprotocols=["realtime", f"openai-insecure-api-key.{KEY}"]) as browser:
        assert browser.subprotocol == "realtime"
        assert json.loads(await browser.recv())["type"] == "session.created"
    async with websockets.connect(f"{url}&api_key=other-key") as query:
        assert json.loads(await query.recv())["type"] == "session.created"
