"""The connection gate (``server.auth``) on /ws, and /ws's client-ended turns: manual turn detection,
``input_audio.commit`` / ``.clear`` and ``input_text``. Real uvicorn on loopback, tiny checkpoint,
API keys, an origin allow-list and a per-address connection limit configured."""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import websockets

from server.background import BackgroundServer
from server.cli import banner
from server.settings import ServerSettings
from shared_data import AUDIO
from vita.assistant import VitaAssistant
from vita.generate import generate_text
from vita.reply_text import ReplyTextStream
from vita.sampling import SamplingParams

KEY = "gate-key"
AUTH = {"Authorization": f"Bearer {KEY}"}
GENERATION = {"respect_not_addressed": False, "temperature": 0.0, "max_new_tokens": 12}
PER_IP = 3


@pytest.fixture(scope="module")
def server(tiny_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory):
    settings = ServerSettings(max_sessions=8, api_keys=[KEY], allowed_origins=["https://app.example"],
                              max_connections_per_ip=PER_IP, cache_dir=tmp_path_factory.mktemp("cache"))
    with BackgroundServer(settings, tiny_checkpoint) as running:
        yield running


def hello() -> np.ndarray:
    audio, rate = sf.read(AUDIO / "en_hello.wav", dtype="int16")
    assert rate == 16_000
    return audio


async def receive_json(ws: websockets.ClientConnection, timeout: float = 30) -> dict:
    while True:
        message = await asyncio.wait_for(ws.recv(), timeout)
        if isinstance(message, str):
            return json.loads(message)


async def events_until_done(ws: websockets.ClientConnection) -> tuple[list[dict], int]:
    """Events until ``response.done`` and the number of audio frames among them."""
    events, audio = [], 0
    while not events or events[-1]["type"] != "response.done":
        message = await asyncio.wait_for(ws.recv(), 60)
        if isinstance(message, bytes):
            audio += 1
        else:
            events.append(json.loads(message))
    return events, audio


@contextlib.asynccontextmanager
async def session(server: BackgroundServer, **start: object):
    async with websockets.connect(server.ws_url, additional_headers=AUTH, max_size=None) as ws:
        await ws.send(json.dumps({"type": "session.start", "sample_rate": 16_000, "generation": GENERATION, **start}))
        ready = await receive_json(ws)
        assert ready["type"] == "session.ready"
        yield ws, ready


async def until_no_connection_is_open(server: BackgroundServer) -> None:
    """Wait for the server to have ended every connection the test closed (its side ends a moment
    after the client's close handshake)."""
    for _ in range(100):
        if re.search(r"^vita_connections_open 0\.0$", server.get_text("/metrics"), re.MULTILINE):
            return
        await asyncio.sleep(0.05)
    raise AssertionError("connections still open on the server after 5 s")


def refusals(server: BackgroundServer) -> dict[str, float]:
    text = server.get_text("/metrics")
    return {m[1]: float(m[2]) for m in re.finditer(r'^vita_connections_refused_total\{reason="(\w+)"\} (\S+)$',
                                                    text, re.MULTILINE)}


async def refusal(server: BackgroundServer, **options: object) -> tuple[dict, int, str]:
    """The error event and close code and reason of a refused connection."""
    async with websockets.connect(server.ws_url, **options) as ws:
        error = json.loads(await asyncio.wait_for(ws.recv(), 5))
        with pytest.raises(websockets.ConnectionClosed) as closed:
            await asyncio.wait_for(ws.recv(), 5)
    return error, closed.value.rcvd.code, closed.value.rcvd.reason


async def test_manual_turns_wait_for_commit_and_clear_drops_the_audio(
    server: BackgroundServer, tiny_checkpoint: Path
) -> None:
    audio = hello()
    async with session(server, turn_detection="manual") as (ws, ready):
        assert ready["turn_detection"] == "manual"
        await ws.send(json.dumps({"type": "input_audio.commit"}))
        assert (await receive_json(ws))["code"] == "no_audio"
        await ws.send(np.concatenate([audio, np.zeros(16_000, np.int16)]).tobytes())  # a pause: no VAD turn
        await ws.send(json.dumps({"type": "input_audio.clear"}))
        cleared = await receive_json(ws)
        assert cleared == {"type": "input_audio.cleared", "audio_ms": len(audio) // 16 + 1000}
        await ws.send(audio.tobytes())
        await ws.send(json.dumps({"type": "input_audio.commit"}))
        events, frames = await events_until_done(ws)
    assert [e["type"] for e in events][0] == "response.started"  # no vad.* events in manual mode
    assert not any(e["type"].startswith("vad.") for e in events)
    assert events[-1]["text"] and frames == events[-1]["audio_segments"] > 0
    assistant = VitaAssistant.load(tiny_checkpoint)  # the model asked about exactly the committed audio
    embeds = assistant.turn_embeddings(assistant.new_conversation(), audio_16k=audio / 32768.0)
    params = SamplingParams(temperature=0.0, max_tokens=GENERATION["max_new_tokens"])
    assert events[-1]["text"] == "".join(
        generate_text(assistant.model, ReplyTextStream(assistant.tokenizer), embeds, params))


async def test_commit_ends_the_vads_utterance_and_manual_switches_between_utterances(
    server: BackgroundServer
) -> None:
    audio = hello()
    async with session(server) as (ws, _):
        await ws.send(audio[: len(audio) // 2].tobytes())  # the VAD is still in the utterance
        assert (await receive_json(ws))["type"] == "vad.speech_started"
        await ws.send(json.dumps({"type": "session.update", "turn_detection": "manual"}))
        assert (await receive_json(ws))["turn_detection"] == "manual"
        await ws.send(json.dumps({"type": "input_audio.commit"}))  # push-to-talk release
        events, _ = await events_until_done(ws)
        assert [e["type"] for e in events][:2] == ["vad.speech_stopped", "response.started"]
        await ws.send(np.concatenate([audio, np.zeros(16_000, np.int16)]).tobytes())  # now manual: no VAD turn
        await ws.send(json.dumps({"type": "session.update", "turn_detection": "vad"}))  # buffered audio to the VAD
        events, _ = await events_until_done(ws)
    kinds = [e["type"] for e in events if e["type"] not in ("response.interrupted", "session.updated")]
    assert kinds[:3] == ["vad.speech_started", "vad.speech_stopped", "response.started"]  # reply 1 may still play
    assert "session.updated" in [e["type"] for e in events]


async def test_typed_text_turn_is_answered_with_text_and_speech(server: BackgroundServer) -> None:
    async with session(server) as (ws, _):
        await ws.send(json.dumps({"type": "input_text", "text": ""}))
        assert (await receive_json(ws))["code"] == "invalid_event"
        await ws.send(json.dumps({"type": "input_text", "text": "Hello there."}))
        events, frames = await events_until_done(ws)
    assert events[0] == {"type": "response.started", "response_id": 1, "video_frames": 0}
    done = events[-1]
    assert done["text"] and frames == done["audio_segments"] > 0
    assert done["usage"]["input_tokens"] > 0 and done["usage"]["output_tokens"] > 0


async def test_keys_origins_and_per_address_limits_refuse_cleanly(server: BackgroundServer) -> None:
    before = refusals(server)
    error, code, reason = await refusal(server)
    assert (error["code"], error["fatal"], code, reason) == ("unauthorized", True, 1008, "unauthorized")
    error, code, _ = await refusal(server, additional_headers={"Authorization": "Bearer nope"})
    assert (error["code"], error["message"], code) == ("unauthorized", "invalid API key", 1008)
    error, code, _ = await refusal(server, additional_headers=AUTH, origin="https://evil.example")
    assert (error["code"], code) == ("origin_not_allowed", 1008)
    for origin in ("https://app.example", f"http://127.0.0.1:{server.port}"):  # listed, and the page's own
        async with websockets.connect(server.ws_url, origin=origin,
                                      subprotocols=["vita", f"openai-insecure-api-key.{KEY}"]) as ws:
            assert ws.subprotocol == "vita"
            await ws.send(json.dumps({"type": "session.start", "sample_rate": 16_000}))
            assert (await receive_json(ws))["type"] == "session.ready"
    await until_no_connection_is_open(server)
    open_ones = [await websockets.connect(f"{server.ws_url}?api_key={KEY}") for _ in range(PER_IP)]
    error, code, _ = await refusal(server, additional_headers=AUTH)
    assert (error["code"], code) == ("too_many_connections", 1013)
    assert f"vita_connections_open {float(PER_IP)}" in server.get_text("/metrics").splitlines()  # the refused one not
    for ws in open_ones:
        await ws.close()
    await until_no_connection_is_open(server)
    async with session(server):  # the address's count went down again
        pass
    after = refusals(server)
    assert {reason: after[reason] - before.get(reason, 0) for reason in after} == {
        "unauthorized": 2, "origin_not_allowed": 1, "too_many_connections": 1}


def test_banner_warns_when_public_without_keys(tmp_path: Path) -> None:
    public = banner(ServerSettings(host="0.0.0.0", cache_dir=tmp_path), tmp_path, is_tiny=False)
    assert "WARNING" in public and "VITA_API_KEYS" in public
    assert "WARNING" not in banner(ServerSettings(host="0.0.0.0", api_keys=["k"], cache_dir=tmp_path), tmp_path, False)
    assert "WARNING" not in banner(ServerSettings(host="127.0.0.1", cache_dir=tmp_path), tmp_path, False)
