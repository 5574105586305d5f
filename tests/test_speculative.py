"""Speculative end of turn, end to end: real uvicorn on loopback, real websocket clients, real
webrtcvad on the real speech clips, tiny checkpoint.

A reply prepared at a pause in speech must be the reply the confirmed turn would have had, and a
reply prepared at a pause that speech then continued must leave no trace. Every test compares a
session with speculation (the default ``vad.speculative_ms``) to one without it, given the same
audio; the client waits at each pause so that the speculative turn has time to work.
"""

from __future__ import annotations

import asyncio
import json
import re
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import websockets

from server.background import BackgroundServer
from server.protocol import VadSettings, decode_audio_segment
from server.settings import ServerSettings
from shared_data import AUDIO

RATE = 16_000
GENERATION = {"respect_not_addressed": False, "temperature": 0.0, "max_new_tokens": 24}
WORK_TIME_S = 1.0  # the client waits this long at a pause: the speculative turn runs meanwhile
HANGOVER_MS = 500
PAUSE_S = 0.4  # webrtcvad hears 300-400 ms of it: more than speculative_ms (200), less than HANGOVER_MS


@pytest.fixture(scope="module")
def server(tiny_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory):
    settings = ServerSettings(max_sessions=4, idle_timeout_s=60, cache_dir=tmp_path_factory.mktemp("cache"))
    with BackgroundServer(settings, tiny_checkpoint) as running:
        yield running


def speech(name: str) -> np.ndarray:
    """The clip without its leading and trailing digital silence."""
    audio, rate = sf.read(AUDIO / f"{name}.wav", dtype="int16")
    assert rate == RATE
    loud = np.flatnonzero(np.abs(audio) > 300)
    return audio[loud[0] : loud[-1] + 1]


def silence(seconds: float) -> np.ndarray:
    return np.zeros(int(RATE * seconds), dtype=np.int16)


def speculative_turns(server: BackgroundServer) -> dict[str, float]:
    """The server's ``vita_speculative_turns_total`` by step."""
    counts = dict.fromkeys(("started", "confirmed", "discarded"), 0.0)
    for step, value in re.findall(r'^vita_speculative_turns_total\{step="(\w+)"\} (\S+)$', server.get_text("/metrics"),
                                  re.MULTILINE):
        counts[step] = float(value)
    return counts


async def receive_until_done(ws: websockets.ClientConnection) -> tuple[list[dict], list[bytes]]:
    events: list[dict] = []
    audio: list[bytes] = []
    while not events or events[-1]["type"] not in ("response.done", "error"):
        message = await asyncio.wait_for(ws.recv(), 60)
        if isinstance(message, bytes):
            audio.append(message)
        else:
            events.append(json.loads(message))
    return events, audio


async def converse(server: BackgroundServer, turns: list[list[np.ndarray]], speculative_ms: int) -> list[list[dict]]:
    """One session; each turn is sent as its pieces with a wait of ``WORK_TIME_S`` after each but
    the last, then its reply is received and played out. Returns each turn's events."""
    vad = VadSettings(speculative_ms=speculative_ms, hangover_ms=HANGOVER_MS).model_dump()
    async with websockets.connect(server.ws_url, max_size=None) as ws:
        await ws.send(json.dumps({"type": "session.start", "sample_rate": RATE, "vad": vad, "generation": GENERATION}))
        assert json.loads(await ws.recv())["type"] == "session.ready"
        replies = []
        for pieces in turns:
            for piece in pieces[:-1]:
                await ws.send(piece.tobytes())
                await asyncio.sleep(WORK_TIME_S)
            await ws.send(pieces[-1].tobytes())
            events, audio = await receive_until_done(ws)
            done = events[-1]
            assert done["type"] == "response.done", events
            assert {decode_audio_segment(a)[0] for a in audio} == {done["response_id"]}
            assert len(audio) == done["audio_segments"]
            replies.append(events)
            await asyncio.sleep(done["timings"]["audio_ms"] / 1000 + 0.3)  # the user listens to it
    return replies


def kinds(events: list[dict]) -> list[str]:
    """Event types, a run of text deltas as one."""
    types = [e["type"] for e in events]
    return [t for i, t in enumerate(types) if t != "response.text.delta" or types[i - 1] != t]


ONE_REPLY = ["vad.speech_started", "vad.speech_stopped", "response.started", "response.text.delta", "response.done"]


async def test_a_reply_prepared_during_the_hangover_is_released_once_the_turn_ends(server: BackgroundServer) -> None:
    """Speech, then silence sent in two parts: the reply is prepared at the pause, shown only at the end."""
    turn = [np.concatenate([speech("en_describe"), silence(PAUSE_S)]), silence(0.6)]
    before = speculative_turns(server)
    [events] = await converse(server, [turn], speculative_ms=200)
    after = speculative_turns(server)
    [reference] = await converse(server, [turn], speculative_ms=0)

    assert kinds(events) == ONE_REPLY  # nothing of the reply before the end of the turn
    assert events[-1]["response_id"] == 1
    assert events[-1]["text"] and events[-1]["text"] == reference[-1]["text"]
    assert "".join(e["delta"] for e in events if e["type"] == "response.text.delta") == events[-1]["text"]
    assert events[1] == reference[1]  # vad.speech_stopped: the same utterance
    assert {step: after[step] - before[step] for step in after} == {"started": 1, "confirmed": 1, "discarded": 0}


async def test_speech_resumed_after_a_pause_discards_the_prepared_reply(server: BackgroundServer) -> None:
    """Speech, a pause, more speech, silence: one turn, answered as if the pause had prepared
    nothing (the conversation holds no trace of the discarded reply)."""
    resumed = np.concatenate([speech("en_hello"), silence(1.0)])
    turn = [np.concatenate([speech("en_describe"), silence(PAUSE_S)]), resumed]
    before = speculative_turns(server)
    [events] = await converse(server, [turn], speculative_ms=200)
    after = speculative_turns(server)
    [reference] = await converse(server, [turn], speculative_ms=0)

    assert kinds(events) == ONE_REPLY  # no response.interrupted
    assert events[-1]["response_id"] == 1
    assert events[-1]["text"] and events[-1]["text"] == reference[-1]["text"]
    assert events[1] == reference[1]
    # the pause in the middle (discarded) and the one at the end (confirmed); en_hello's own pauses
    # (270-300 ms of unvoiced frames) are discarded too
    steps = {step: after[step] - before[step] for step in after}
    assert steps["confirmed"] == 1 and steps["discarded"] >= 1 and steps["started"] == steps["discarded"] + 1


async def test_a_discarded_reply_later_in_the_conversation_leaves_no_trace(server: BackgroundServer) -> None:
    """The same in a second turn: the conversation goes back to the end of the first reply."""
    first = [np.concatenate([speech("zh_weather"), silence(1.0)])]
    describe = speech("en_describe")
    second = [np.concatenate([describe, silence(PAUSE_S)]), np.concatenate([describe, silence(1.0)])]
    replies = await converse(server, [first, second], speculative_ms=200)
    reference = await converse(server, [first, second], speculative_ms=0)

    for events, expected in zip(replies, reference):
        assert kinds(events) == ONE_REPLY
        assert events[-1]["text"] and events[-1]["text"] == expected[-1]["text"]
    assert [events[-1]["response_id"] for events in replies] == [1, 2]
