"""Session cap and idle timeout on a real server (tiny checkpoint, loopback)."""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import websockets

from server.background import BackgroundServer
from server.settings import ServerSettings
from shared_data import AUDIO


@pytest.fixture(scope="module")
def small_server(tiny_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory):
    settings = ServerSettings(max_sessions=2, idle_timeout_s=2.0, cache_dir=tmp_path_factory.mktemp("cache"))
    with BackgroundServer(settings, tiny_checkpoint) as running:
        yield running


async def start_session(url: str) -> websockets.ClientConnection:
    ws = await websockets.connect(url)
    await ws.send(json.dumps({"type": "session.start", "sample_rate": 16_000}))
    assert json.loads(await asyncio.wait_for(ws.recv(), 5))["type"] == "session.ready"
    return ws


async def test_extra_sessions_get_server_full_and_a_clean_close(small_server: BackgroundServer) -> None:
    first = await start_session(small_server.ws_url)
    second = await start_session(small_server.ws_url)
    async with websockets.connect(small_server.ws_url) as third:
        error = json.loads(await asyncio.wait_for(third.recv(), 5))
        assert (error["type"], error["code"], error["fatal"]) == ("error", "server_full", True)
        with pytest.raises(websockets.ConnectionClosed):
            await asyncio.wait_for(third.recv(), 5)
        assert third.close_code == 1013  # closing handshake done, "try again later"
    assert "vita_sessions_rejected_total 1.0" in small_server.get_text("/metrics")
    await first.close()
    await asyncio.sleep(0.2)
    replacement = await start_session(small_server.ws_url)  # a freed place can be taken again
    await replacement.close()
    await second.close()


async def test_idle_sessions_are_closed(small_server: BackgroundServer) -> None:
    ws = await start_session(small_server.ws_url)
    started = time.monotonic()
    error = json.loads(await asyncio.wait_for(ws.recv(), 5))
    assert (error["code"], error["fatal"]) == ("idle_timeout", True)
    assert 1.8 <= time.monotonic() - started <= 4.0
    with pytest.raises(websockets.ConnectionClosedOK):
        await asyncio.wait_for(ws.recv(), 5)
    assert ws.close_code == 1000


async def test_messages_keep_a_session_alive(small_server: BackgroundServer) -> None:
    ws = await start_session(small_server.ws_url)
    for _ in range(6):  # 3 s of silence frames, each within the 2 s idle limit
        await ws.send(b"\0\0" * 8000)
        await asyncio.sleep(0.5)
    await ws.send(json.dumps({"type": "response.cancel"}))
    reply = json.loads(await asyncio.wait_for(ws.recv(), 5))
    assert reply["code"] == "no_response"  # still the same live session
    await ws.close()


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
