"""Seats, handshake and idle timeouts, the error budget and aborted turns on a real server
(tiny checkpoint, loopback)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import re
import time
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import websockets

from server.background import BackgroundServer
from server.client import stream_audio
from server.settings import ServerSettings
from shared_data import AUDIO


@pytest.fixture(scope="module")
def small_server(tiny_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory):
    settings = ServerSettings(
        max_sessions=2, idle_timeout_s=2.0, handshake_timeout_s=2.0, cache_dir=tmp_path_factory.mktemp("cache")
    )
    with BackgroundServer(settings, tiny_checkpoint) as running:
        yield running


@pytest.fixture(autouse=True)
async def seats_free(small_server: BackgroundServer) -> None:
    """Each test starts with every seat free (sessions of the previous one end asynchronously)."""
    for _ in range(100):
        if "vita_sessions_active 0.0" in small_server.get_text("/metrics"):
            return
        await asyncio.sleep(0.1)
    raise TimeoutError("seats of earlier sessions were not freed")


async def start_session(url: str, **options: object) -> websockets.ClientConnection:
    ws = await websockets.connect(url)
    await ws.send(json.dumps({"type": "session.start", "sample_rate": 16_000, **options}))
    assert json.loads(await asyncio.wait_for(ws.recv(), 5))["type"] == "session.ready"
    return ws


async def events_until_closed(ws: websockets.ClientConnection, timeout_s: float = 30) -> list[dict]:
    """Every JSON event the server sends until it closes the connection."""

    async def collect() -> list[dict]:
        events = []
        with contextlib.suppress(websockets.ConnectionClosed):  # 1008 and 1013 close with an error
            async for message in ws:
                events.append(json.loads(message))
        return events

    return await asyncio.wait_for(collect(), timeout_s)


async def send_until_closed(ws: websockets.ClientConnection, frame: bytes, pause_s: float) -> int:
    """Send ``frame`` every ``pause_s`` until the connection closes; returns how many went out."""
    sent = 0
    with contextlib.suppress(websockets.ConnectionClosed):
        while True:
            await ws.send(frame)
            sent += 1
            await asyncio.sleep(pause_s)
    return sent


async def test_extra_sessions_get_server_full_and_a_clean_close(small_server: BackgroundServer) -> None:
    first = await start_session(small_server.ws_url)
    second = await start_session(small_server.ws_url)
    async with websockets.connect(small_server.ws_url) as third:
        await third.send(json.dumps({"type": "session.start", "sample_rate": 16_000}))  # the seat is taken here
        error = json.loads(await asyncio.wait_for(third.recv(), 5))
        assert (error["type"], error["code"], error["fatal"]) == ("error", "server_full", True)
        with pytest.raises(websockets.ConnectionClosed):
            await asyncio.wait_for(third.recv(), 5)
        assert (third.close_code, third.close_reason) == (1013, "server_full")  # "try again later"
    assert "vita_sessions_rejected_total 1.0" in small_server.get_text("/metrics")
    await first.close()
    await asyncio.sleep(0.2)
    replacement = await start_session(small_server.ws_url)  # a freed place can be taken again
    await replacement.close()
    await second.close()


async def test_readyz_answers_503_while_every_seat_is_taken(small_server: BackgroundServer) -> None:
    first = await start_session(small_server.ws_url)
    assert small_server.get_json("/readyz")[0] == 200
    second = await start_session(small_server.ws_url)  # max_sessions is 2
    assert small_server.get_json("/readyz") == (503, {"status": "full", "sessions": 2, "max_sessions": 2})
    await second.close()
    for _ in range(50):  # the seat is freed once the server has seen the close
        if small_server.get_json("/readyz")[0] == 200:
            break
        await asyncio.sleep(0.1)
    assert small_server.get_json("/readyz")[0] == 200
    await first.close()


async def test_unstarted_sockets_take_no_seat_and_are_closed_after_the_handshake_timeout(
    small_server: BackgroundServer,
) -> None:
    unstarted = [await websockets.connect(small_server.ws_url) for _ in range(2)]
    started = [await start_session(small_server.ws_url) for _ in range(2)]  # max_sessions is 2
    for ws in unstarted:
        events = await events_until_closed(ws, timeout_s=10)
        assert [(e["code"], e["fatal"]) for e in events] == [("handshake_timeout", True)]
        assert (ws.close_code, ws.close_reason) == (1008, "handshake_timeout")
    for ws in started:
        await ws.close()


async def test_idle_sessions_are_closed(small_server: BackgroundServer) -> None:
    ws = await start_session(small_server.ws_url)
    started = time.monotonic()
    error = json.loads(await asyncio.wait_for(ws.recv(), 5))
    assert (error["code"], error["fatal"]) == ("idle_timeout", True)
    assert 1.8 <= time.monotonic() - started <= 4.0
    with pytest.raises(websockets.ConnectionClosedOK):
        await asyncio.wait_for(ws.recv(), 5)
    assert (ws.close_code, ws.close_reason) == (1000, "idle_timeout")


async def test_a_session_sending_only_silence_is_idle_and_one_that_speaks_is_not(
    small_server: BackgroundServer,
) -> None:
    hello, rate = sf.read(AUDIO / "en_hello.wav", dtype="int16")
    assert rate == 16_000
    generation = {"respect_not_addressed": False, "max_new_tokens": 4, "speak": False}
    silent = await start_session(small_server.ws_url)
    speaking = await start_session(small_server.ws_url, generation=generation)
    silent_events = asyncio.create_task(events_until_closed(silent))
    silence_frames = asyncio.create_task(send_until_closed(silent, b"\0\0" * 320, 0.02))  # 20 ms frames
    speaking_events: list[dict] = []

    async def receive_speaking() -> None:
        async for message in speaking:
            if isinstance(message, str):
                speaking_events.append(json.loads(message))

    receiver = asyncio.create_task(receive_speaking())
    utterance = hello  # back to back: between two replies the session waits well under its 2 s idle timeout
    rounds = 0
    while rounds < 3 or not silent_events.done():  # keeps talking past the silent session's timeout
        assert rounds < 30, "the silent session was never closed"
        for i in range(0, len(utterance), 320):  # real-time pace, 20 ms frames
            await speaking.send(utterance[i : i + 320].tobytes())
            await asyncio.sleep(0.02)
        rounds += 1
    events = await silent_events
    await silence_frames
    assert [(e["code"], e["fatal"]) for e in events] == [("idle_timeout", True)]
    assert (silent.close_code, silent.close_reason) == (1000, "idle_timeout")
    assert not [e for e in speaking_events if e["type"] == "error"]
    assert any(e["type"] == "vad.speech_started" for e in speaking_events)
    assert receiver.done() is False  # the speaking session is still open
    await speaking.close()
    await asyncio.gather(receiver, return_exceptions=True)


async def test_garbage_gets_a_bounded_number_of_errors_then_a_fatal_close(
    small_server: BackgroundServer, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="vita.session")
    hello, rate = sf.read(AUDIO / "en_hello.wav", dtype="int16")
    flooder = await start_session(small_server.ws_url)
    flood = asyncio.create_task(send_until_closed(flooder, b"\x00", 0))  # half a sample: invalid_audio
    generation = {"respect_not_addressed": False, "temperature": 0, "max_new_tokens": 8, "speak": False}
    other = asyncio.create_task(
        stream_audio(small_server.ws_url, hello, rate, speed=4, session_update={"generation": generation},
                     expected_turns=1)
    )
    events = await events_until_closed(flooder)
    sent = await flood
    assert (flooder.close_code, flooder.close_reason) == (1008, "too_many_errors")
    *errors, fatal = events
    assert (fatal["type"], fatal["code"], fatal["fatal"]) == ("error", "too_many_errors", True)
    assert errors and all((e["type"], e["code"], e["fatal"]) == ("error", "invalid_audio", False) for e in errors)
    reported = len(errors) + sum(e["suppressed"] for e in events)  # the fatal one is not an invalid frame
    assert len(errors) <= 20 < reported <= sent  # suppressed errors are counted, not sent
    assert any(e["suppressed"] > 0 for e in events)
    logged = [r for r in caplog.records if re.match(r"error session=\w+ code=invalid_audio", r.getMessage())]
    assert len(logged) <= 20  # logs are sampled the same way
    result = await other  # another session was served meanwhile
    assert [t.done is not None for t in result.turns] == [True], result.events
    assert not result.of_type("error")


async def test_a_client_leaving_mid_reply_is_counted_as_an_aborted_turn(small_server: BackgroundServer) -> None:
    hello, rate = sf.read(AUDIO / "en_hello.wav", dtype="int16")
    utterance = np.concatenate([hello, np.zeros(rate, dtype=np.int16)]).tobytes()
    generation = {"respect_not_addressed": False, "temperature": 0, "max_new_tokens": 512}
    ws = await start_session(small_server.ws_url, generation=generation, vad={"speculative_ms": 0})
    await ws.send(utterance)
    while json.loads(await asyncio.wait_for(ws.recv(), 30))["type"] != "response.started":
        pass
    await ws.close()  # mid-reply: 512 tokens and their speech take far longer than this
    for _ in range(100):
        if 'vita_turns_total{outcome="aborted"} 1.0' in small_server.get_text("/metrics"):
            return
        await asyncio.sleep(0.1)
    raise AssertionError(small_server.get_text("/metrics"))


async def test_a_model_that_cannot_load_is_reported_not_ready(tmp_path: Path) -> None:
    empty = tmp_path / "not_a_checkpoint"
    empty.mkdir()
    server = BackgroundServer(ServerSettings(cache_dir=tmp_path), empty, is_tiny=False)
    with pytest.raises(RuntimeError, match="failed to load"):
        server.start()
    try:
        status, body = server.get_json("/readyz")
        assert status == 503 and body["status"] == "failed" and body["error"]
        assert server.get_json("/healthz")[0] == 200  # the process itself is alive
        async with websockets.connect(server.ws_url) as ws:
            error = json.loads(await asyncio.wait_for(ws.recv(), 5))
            assert (error["code"], error["fatal"]) == ("not_ready", True)
    finally:
        server.stop()


async def test_a_conversation_outgrowing_the_context_restarts_and_the_turn_is_answered(
    tiny_checkpoint: Path, tmp_path: Path
) -> None:
    settings = ServerSettings(max_sessions=1, max_context_tokens=512, cache_dir=tmp_path)
    hello, rate = sf.read(AUDIO / "en_hello.wav", dtype="int16")
    utterance = np.concatenate([hello, np.zeros(rate, dtype=np.int16)]).tobytes()
    generation = {"respect_not_addressed": False, "temperature": 0.0, "max_new_tokens": 16, "speak": False}
    with BackgroundServer(settings, tiny_checkpoint) as server:
        async with websockets.connect(server.ws_url) as ws:
            await ws.send(json.dumps({"type": "session.start", "sample_rate": rate, "generation": generation}))
            await ws.recv()
            events: list[dict] = []
            for _ in range(12):  # each turn adds audio + reply tokens to the 512-token cache
                await ws.send(utterance)
                while (event := json.loads(await asyncio.wait_for(ws.recv(), 30)))["type"] != "response.done":
                    events.append(event)
                events.append(event)
                if any(e["type"] == "session.cleared" for e in events):
                    break
    kinds = [e["type"] for e in events]
    assert "error" not in kinds
    cleared = kinds.index("session.cleared")
    assert events[cleared] == {"type": "session.cleared", "reason": "context_full"}
    assert cleared > kinds.index("response.done")  # earlier turns were answered in the old conversation
    assert kinds[cleared - 1] == "response.started" and kinds[-1] == "response.done"
    assert events[-1]["text"]  # the turn that did not fit is answered after the restart
