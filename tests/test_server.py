"""End-to-end: real uvicorn on loopback, real websocket clients, real webrtcvad, tiny checkpoint.

The tiny checkpoint's replies are random, so every session turns ``respect_not_addressed``
off (a ☟ reply would otherwise be silent) and decodes greedily with a short token budget.
"""

from __future__ import annotations

import asyncio
import base64
import io
import json
import re
import socket
import time
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import soxr
import websockets
from PIL import Image

from server.background import BackgroundServer
from server.client import ClientResult, stream_audio
from server.protocol import AUDIO_HEADER, OUTPUT_SAMPLE_RATE, VadSettings, decode_audio_segment
from server.settings import ServerSettings
from server.vad import SpeechEnd, TurnDetector
from vita.assistant import VitaAssistant
from vita.generate import generate_text
from vita.reply_text import ReplyTextStream
from vita.sampling import SamplingParams
from shared_data import AUDIO

REPLY_SETTINGS = {"generation": {"respect_not_addressed": False, "temperature": 0.0, "max_new_tokens": 24}}


def replies_of(max_new_tokens: int) -> dict:
    return {"generation": {**REPLY_SETTINGS["generation"], "max_new_tokens": max_new_tokens}}


def clip(name: str) -> tuple[np.ndarray, int]:
    audio, rate = sf.read(AUDIO / f"{name}.wav", dtype="int16")
    return audio, rate


def silence(seconds: float, rate: int = 16_000) -> np.ndarray:
    return np.zeros(int(rate * seconds), dtype=np.int16)


@pytest.fixture(scope="module")
def server(tiny_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory):
    settings = ServerSettings(max_sessions=12, idle_timeout_s=60, cache_dir=tmp_path_factory.mktemp("cache"))
    with BackgroundServer(settings, tiny_checkpoint) as running:
        yield running


def assert_complete_reply(result: ClientResult, response_id: int = 1) -> None:
    """A reply with text deltas, 24 kHz audio and server timings that agree with what arrived."""
    turn = next(t for t in result.turns if t.response_id == response_id)
    assert turn.done is not None, result.events
    assert turn.done["state"] == "answer"
    assert turn.text and turn.done["text"] == turn.text
    assert turn.audio_samples > 0
    assert turn.done["audio_segments"] == len(turn.audio)
    timings = turn.done["timings"]
    assert timings["audio_ms"] == pytest.approx(turn.audio_samples / OUTPUT_SAMPLE_RATE * 1000, abs=0.1)
    # 0 when the reply was prepared during the hangover (vad.speculative_ms) and released at its end
    assert 0 <= timings["end_of_speech_to_first_text_ms"] <= timings["total_ms"]
    assert 0 <= timings["end_of_speech_to_first_audio_ms"] <= timings["total_ms"]
    assert timings["real_time_factor"] > 0
    assert turn.late_segments == 0


async def test_en_hello_in_real_time_gets_a_spoken_reply(server: BackgroundServer) -> None:
    audio, rate = clip("en_hello")
    result = await stream_audio(server.ws_url, audio, rate, session_update=REPLY_SETTINGS, expected_turns=1)
    kinds = [e["type"] for e in result.events]
    assert kinds[:3] == ["session.ready", "session.updated", "vad.speech_started"]
    assert kinds.index("vad.speech_stopped") < kinds.index("response.started") < kinds.index("response.text.delta")
    assert kinds[-1] == "response.done"
    assert len(result.of_type("response.text.delta")) >= 2
    assert result.stray_audio == 0
    stopped = result.of_type("vad.speech_stopped")[0]
    assert 3_000 <= stopped["duration_ms"] <= audio.size / rate * 1000
    assert_complete_reply(result)


async def test_scheduling_settings_reach_the_engine_and_the_speech_service(tiny_checkpoint: Path, tmp_path: Path) -> None:
    """--prefill-tokens-while-decoding, --tts-steps-per-call, --tts-admit-every-calls and
    --tts-prefill-graphs (VITA_...): the engine and the speech service run with them (prefill graphs
    only on CUDA) and a spoken reply still comes, complete (worker in a thread here, so the test can look)."""
    settings = ServerSettings(worker_process=False, prefill_tokens_while_decoding=96, tts_steps_per_call=4,
                              tts_admit_every_calls=3, tts_prefill_graphs=True, cache_dir=tmp_path)
    with BackgroundServer(settings, tiny_checkpoint) as running:
        assert running.worker.engine.scheduler.decoding_prefill_tokens == 96
        speech = running.worker.speech
        assert speech.batch.steps_per_call == 4 and speech.admit_every_calls == 3 and speech.batch.prefill_graphs
        audio, rate = clip("en_hello")
        result = await stream_audio(running.ws_url, audio, rate, speed=4, session_update=REPLY_SETTINGS,
                                    expected_turns=1)
    assert_complete_reply(result)


async def test_silence_and_low_noise_start_no_turn(server: BackgroundServer) -> None:
    rng = np.random.default_rng(1)
    noise = np.round(rng.normal(0, 30, 16_000 * 2)).astype(np.int16)
    audio = np.concatenate([silence(1.0), noise])
    result = await stream_audio(server.ws_url, audio, 16_000, speed=4, tail_silence_s=0.5, reply_timeout_s=0.5)
    assert [e["type"] for e in result.events] == ["session.ready"]


async def test_two_utterances_get_two_replies(server: BackgroundServer) -> None:
    """The user waits for each reply to be played (as the client estimates it) before speaking."""
    hello, rate = clip("en_hello")
    describe, _ = clip("en_describe")
    async with websockets.connect(server.ws_url, max_size=None) as ws:
        await start_session(ws, rate, replies_of(6))
        replies = []
        for utterance in (hello, describe):
            await ws.send(np.concatenate([utterance, silence(1.0)]).tobytes())
            events, audio = await collect_until_done(ws)
            replies.append((events, audio))
            await asyncio.sleep(events[-1]["timings"]["audio_ms"] / 1000 + 0.3)  # listening to it
    for response_id, (events, audio) in enumerate(replies, start=1):
        kinds = [e["type"] for e in events]
        assert kinds[:3] == ["vad.speech_started", "vad.speech_stopped", "response.started"]
        assert kinds[-1] == "response.done" and "response.interrupted" not in kinds
        done = events[-1]
        assert done["response_id"] == response_id and done["text"]
        assert {decode_audio_segment(a)[0] for a in audio} <= {response_id}
        assert len(audio) == done["audio_segments"]


async def receive_reply_and_playback_end(ws: websockets.ClientConnection) -> tuple[dict, float]:
    """The reply's last event, and when a client playing its audio as it arrives would finish."""
    playback_end = 0.0
    while True:
        message = await asyncio.wait_for(ws.recv(), 60)
        now = time.monotonic()
        if isinstance(message, bytes):
            playback_end = max(playback_end, now) + (len(message) - AUDIO_HEADER.size) / 2 / OUTPUT_SAMPLE_RATE
        elif (event := json.loads(message))["type"] in ("response.done", "response.interrupted"):
            return event, playback_end


async def test_speaking_over_a_reply_still_playing_interrupts_it(server: BackgroundServer) -> None:
    """Generation is over but the client is still playing the audio: barge-in stops that too."""
    hello, rate = clip("en_hello")
    async with websockets.connect(server.ws_url, max_size=None) as ws:
        await start_session(ws, rate)
        for _ in range(5):  # the tiny TTS makes random lengths: until a second or more is left to play
            await ws.send(np.concatenate([hello, silence(1.0)]).tobytes())
            done, playback_end = await receive_reply_and_playback_end(ws)
            assert done["type"] == "response.done"
            if playback_end - time.monotonic() >= 1.0:
                break
            await asyncio.sleep(max(0.0, playback_end - time.monotonic()) + 0.3)  # let it play out
        else:
            pytest.fail("no reply with a second left to play in 5 tries")
        await ws.send(hello.tobytes())
        events = [await receive_json(ws) for _ in range(2)]
    assert events == [
        {"type": "vad.speech_started", "audio_ms": events[0]["audio_ms"]},
        {"type": "response.interrupted", "response_id": done["response_id"], "reason": "barge_in"},
    ]


async def test_barge_in_interrupts_the_reply_and_stops_its_audio(server: BackgroundServer) -> None:
    hello, rate = clip("en_hello")
    describe, _ = clip("en_describe")
    async with websockets.connect(server.ws_url, max_size=None) as ws:
        await start_session(ws, rate, replies_of(400))
        await ws.send(np.concatenate([hello, silence(1.0)]).tobytes())
        while not isinstance(await asyncio.wait_for(ws.recv(), 30), bytes):
            pass  # until reply 1 is speaking
        await ws.send(json.dumps({"type": "session.update", **REPLY_SETTINGS}))  # short reply 2
        await ws.send(np.concatenate([describe, silence(1.0)]).tobytes())  # the user talks over reply 1
        events: list[dict] = []
        audio_after_interrupt: list[int] = []
        while not events or events[-1]["type"] != "response.done":
            message = await asyncio.wait_for(ws.recv(), 60)
            if isinstance(message, bytes):
                if any(e["type"] == "response.interrupted" for e in events):
                    audio_after_interrupt.append(decode_audio_segment(message)[0])
            else:
                events.append(json.loads(message))
    kinds = [e["type"] for e in events if e["type"] != "session.updated"]
    speech_start = kinds.index("vad.speech_started")
    assert kinds[speech_start + 1] == "response.interrupted"  # at once, on speech start
    interrupted = [e for e in events if e["type"] == "response.interrupted"]
    assert interrupted == [{"type": "response.interrupted", "response_id": 1, "reason": "barge_in"}]
    after = events[events.index(interrupted[0]) + 1 :]
    assert all(e.get("response_id") != 1 for e in after)  # no more text of reply 1 either
    assert [e["response_id"] for e in events if e["type"] == "response.done"] == [2]
    assert audio_after_interrupt and set(audio_after_interrupt) == {2}  # nothing more of reply 1


async def test_48k_stereo_input_is_resampled(server: BackgroundServer) -> None:
    hello, rate = clip("en_hello")
    at_48k = soxr.resample(hello.astype(np.float32) / 32768, rate, 48_000)
    stereo = np.round(np.stack([at_48k, 0.5 * at_48k], axis=1) * 32767).astype(np.int16)
    result = await stream_audio(server.ws_url, stereo, 48_000, speed=3, session_update=REPLY_SETTINGS, expected_turns=1)
    reference = await stream_audio(server.ws_url, hello, rate, speed=4, session_update=REPLY_SETTINGS, expected_turns=1)
    assert result.events[0]["input_sample_rate"] == 48_000 and result.events[0]["input_channels"] == 2
    for kind in ("vad.speech_started", "vad.speech_stopped"):
        assert abs(result.of_type(kind)[0]["audio_ms"] - reference.of_type(kind)[0]["audio_ms"]) <= 60
    assert_complete_reply(result)


async def test_ten_concurrent_sessions_each_get_their_own_reply(server: BackgroundServer) -> None:
    hello, rate = clip("en_hello")
    results = await asyncio.gather(
        *[
            stream_audio(server.ws_url, hello, rate, speed=4, session_update=REPLY_SETTINGS, expected_turns=1)
            for _ in range(10)
        ]
    )
    session_ids = {r.events[0]["session_id"] for r in results}
    assert len(session_ids) == 10
    for result in results:
        assert_complete_reply(result)
        assert result.stray_audio == 0
    greedy_texts = {r.turns[0].text for r in results}
    assert len(greedy_texts) == 1  # same input, greedy, own conversations: batching changes nothing


async def receive_json(ws: websockets.ClientConnection, timeout: float = 10.0) -> dict:
    while True:
        message = await asyncio.wait_for(ws.recv(), timeout)
        if isinstance(message, str):
            return json.loads(message)


async def test_bad_input_gets_errors_and_the_session_survives(server: BackgroundServer) -> None:
    async with websockets.connect(server.ws_url, max_size=None) as ws:
        await ws.send(b"\0\0" * 160)
        assert (await receive_json(ws))["code"] == "session_not_started"
        await ws.send(json.dumps({"type": "input_audio", "audio": ""}))
        assert (await receive_json(ws))["code"] == "session_not_started"
        await ws.send(json.dumps({"type": "session.start", "sample_rate": 96_000}))
        assert (await receive_json(ws))["code"] == "invalid_event"
        await ws.send(json.dumps({"type": "session.start", "sample_rate": 16_000}))
        assert (await receive_json(ws))["type"] == "session.ready"
        await ws.send(json.dumps({"type": "session.update", **REPLY_SETTINGS}))
        assert (await receive_json(ws))["type"] == "session.updated"
        bad = [
            ("{oops", "invalid_json"),
            ('"just a string"', "invalid_json"),
            (json.dumps({"type": "teleport"}), "unknown_event"),
            (json.dumps({"type": "session.start", "sample_rate": 16_000}), "session_already_started"),
            (json.dumps({"type": "input_audio", "audio": "***"}), "invalid_event"),
            (json.dumps({"type": "input_audio", "audio": base64.b64encode(b"\1\2\3").decode()}), "invalid_audio"),
            (json.dumps({"type": "video.frame", "image": base64.b64encode(b"not an image").decode()}), "invalid_image"),
            (json.dumps({"type": "response.cancel"}), "no_response"),
            (b"\1\2\3", "invalid_audio"),
            (np.random.default_rng(0).bytes(2 * 1024 * 1024), "frame_too_large"),
            (json.dumps({"type": "input_audio", "audio": "A" * (9 << 20)}), "frame_too_large"),
        ]
        for message, code in bad:
            await asyncio.sleep(0.3)  # under the 5 error events a second a session is sent
            await ws.send(message)
            error = await receive_json(ws)
            assert (error["type"], error["code"], error["fatal"]) == ("error", code, False), message[:40]
            assert "object at 0x" not in error["message"]
        hello, _ = clip("en_hello")
        for chunk in np.array_split(np.concatenate([hello, silence(1.0)]), 40):
            await ws.send(json.dumps({"type": "input_audio", "audio": base64.b64encode(chunk.tobytes()).decode()}))
        events = []
        while not events or events[-1]["type"] != "response.done":
            events.append(await receive_json(ws, timeout=60))
        assert [e["type"] for e in events][:3] == ["vad.speech_started", "vad.speech_stopped", "response.started"]
        assert events[-1]["text"]


async def test_vad_update_mid_utterance_applies_to_the_next_one(server: BackgroundServer) -> None:
    hello, rate = clip("en_hello")
    half = len(hello) // 2
    async with websockets.connect(server.ws_url, max_size=None) as ws:
        await start_session(ws, rate)
        await ws.send(hello[:half].tobytes())
        assert (await receive_json(ws))["type"] == "vad.speech_started"
        await ws.send(json.dumps({"type": "session.update", "vad": {"hangover_ms": 200, "min_speech_ms": 0}}))
        updated = await receive_json(ws)
        assert (updated["vad"]["hangover_ms"], updated["vad"]["aggressiveness"]) == (200, 2)  # others kept
        await ws.send(np.concatenate([hello[half:], silence(1.0)]).tobytes())
        events, _ = await collect_until_done(ws)
        stops = [e for e in events if e["type"] == "vad.speech_stopped"]
        assert len(stops) == 1 and stops[0]["duration_ms"] >= 3_000  # not split at the ~370 ms pauses
        await ws.send(np.concatenate([hello, silence(1.0)]).tobytes())
        events = [await receive_json(ws, timeout=60) for _ in range(4)]
        assert [e["type"] for e in events if e["type"].startswith("vad.")][:2] == [
            "vad.speech_started", "vad.speech_stopped"
        ]
        assert next(e for e in events if e["type"] == "vad.speech_stopped")["duration_ms"] < 3_000  # split now


async def start_session(ws: websockets.ClientConnection, rate: int, settings: dict = REPLY_SETTINGS) -> None:
    await ws.send(json.dumps({"type": "session.start", "sample_rate": rate, **settings}))
    assert (await receive_json(ws))["type"] == "session.ready"


def png(color: tuple[int, int, int]) -> str:
    buffer = io.BytesIO()
    Image.new("RGB", (64, 48), color).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


async def collect_until_done(ws: websockets.ClientConnection, timeout: float = 60.0) -> tuple[list[dict], list[bytes]]:
    events: list[dict] = []
    audio: list[bytes] = []
    while not events or events[-1]["type"] not in ("response.done", "response.interrupted"):
        message = await asyncio.wait_for(ws.recv(), timeout)
        if isinstance(message, bytes):
            audio.append(message)
        else:
            events.append(json.loads(message))
    return events, audio


async def test_recent_camera_frames_join_the_turn_and_reset_clears_them(server: BackgroundServer) -> None:
    hello, rate = clip("en_hello")
    async with websockets.connect(server.ws_url, max_size=None) as ws:
        await start_session(ws, rate)
        for color in [(255, 0, 0), (0, 255, 0), (0, 0, 255), (9, 9, 9), (200, 200, 0), (0, 90, 90)]:
            await ws.send(json.dumps({"type": "video.frame", "image": png(color)}))
        await ws.send(np.concatenate([hello, silence(1.0)]).tobytes())  # all within a second
        events, audio = await collect_until_done(ws)
        started = next(e for e in events if e["type"] == "response.started")
        assert started["video_frames"] == 4
        assert events[-1]["type"] == "response.done" and audio
        assert all(decode_audio_segment(a)[0] == 1 for a in audio)

        await ws.send(json.dumps({"type": "session.reset"}))
        reply = await receive_json(ws)
        if reply["type"] == "response.interrupted":  # reply 1 was still playing: reset stops it too
            assert (reply["response_id"], reply["reason"]) == (1, "reset")
            reply = await receive_json(ws)
        assert reply["type"] == "session.cleared"
        await ws.send(np.concatenate([hello, silence(1.0)]).tobytes())
        events, _ = await collect_until_done(ws)
        started = next(e for e in events if e["type"] == "response.started")
        assert (started["response_id"], started["video_frames"]) == (2, 0)
        assert events[-1]["type"] == "response.done"


async def test_response_cancel_stops_the_reply(server: BackgroundServer) -> None:
    hello, rate = clip("en_hello")
    async with websockets.connect(server.ws_url, max_size=None) as ws:
        await start_session(ws, rate, replies_of(400))
        await ws.send(np.concatenate([hello, silence(1.0)]).tobytes())
        while True:
            message = await asyncio.wait_for(ws.recv(), 30)
            if isinstance(message, bytes):
                break  # the reply is speaking
        await ws.send(json.dumps({"type": "response.cancel"}))
        events, _ = await collect_until_done(ws)
        assert events[-1] == {"type": "response.interrupted", "response_id": 1, "reason": "cancel"}
        # nothing of reply 1 follows: the next message is the answer to a new request
        await ws.send(json.dumps({"type": "response.cancel"}))
        while isinstance(message := await asyncio.wait_for(ws.recv(), 10), bytes):
            assert decode_audio_segment(message)[0] != 1
        assert json.loads(message)["code"] == "no_response"


def metric(server: BackgroundServer, name: str) -> float:
    match = re.search(rf"^{re.escape(name)} (\S+)$", server.get_text("/metrics"), re.MULTILINE)
    return float(match[1]) if match else 0.0


async def test_slow_reader_gets_bounded_queue_and_a_drop_notice(tiny_checkpoint: Path, tmp_path: Path) -> None:
    settings = ServerSettings(max_sessions=2, outgoing_audio_limit_s=0.25, cache_dir=tmp_path)
    hello, rate = clip("en_hello")
    with BackgroundServer(settings, tiny_checkpoint) as small:
        tiny_window = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        tiny_window.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # before connect: small TCP window
        tiny_window.connect(("127.0.0.1", small.port))
        async with websockets.connect(small.ws_url, sock=tiny_window, max_size=None, max_queue=1) as ws:
            await ws.send(json.dumps({"type": "session.start", "sample_rate": rate, **replies_of(120)}))
            for turn in range(1, 6):  # random reply lengths: until one outgrows the buffers
                await ws.send(np.concatenate([hello, silence(1.0)]).tobytes())
                for _ in range(600):  # not reading while the whole reply is produced
                    await asyncio.sleep(0.1)
                    if metric(small, 'vita_turns_total{outcome="answer"}') == turn:
                        break
                if metric(small, "vita_audio_dropped_segments_total") > 0:
                    break
                done, playback_end = await receive_reply_and_playback_end(ws)  # short: read it, play it out
                await asyncio.sleep(max(0.0, playback_end - time.monotonic()) + 0.3)
            events, audio = await collect_until_done(ws)
    dropped = [e for e in events if e["type"] == "response.audio.dropped"]
    done = events[-1]
    assert done["type"] == "response.done"
    assert dropped and dropped[0]["segments"] > 0
    assert len(audio) + sum(d["segments"] for d in dropped) == done["audio_segments"]
    samples = sum((len(a) - AUDIO_HEADER.size) // 2 for a in audio)
    assert samples + sum(d["samples"] for d in dropped) == round(done["timings"]["audio_ms"] * 24)


async def test_early_disconnects_leave_the_server_healthy(server: BackgroundServer) -> None:
    hello, rate = clip("en_hello")
    async with websockets.connect(server.ws_url) as ws:  # gone before session.start
        pass
    async with websockets.connect(server.ws_url) as ws:  # gone in the middle of a reply
        await start_session(ws, rate)
        await ws.send(np.concatenate([hello, silence(1.0)]).tobytes())
        while (await receive_json(ws))["type"] != "response.started":
            pass
    result = await stream_audio(server.ws_url, hello, rate, speed=4, session_update=REPLY_SETTINGS, expected_turns=1)
    assert_complete_reply(result)
    await asyncio.sleep(0.2)
    assert 'vita_sessions_active 0.0' in server.get_text("/metrics")


def test_health_ready_metrics_and_page(server: BackgroundServer) -> None:
    assert server.get_json("/healthz") == (200, {"status": "ok"})
    status, body = server.get_json("/readyz")
    assert status == 200 and "tiny random weights" in body["model"]
    metrics = server.get_text("/metrics")
    for name in (
        "vita_sessions_active",
        "vita_turns_total",
        "vita_errors_total",
        "vita_end_of_turn_to_first_text_seconds_bucket",
        "vita_end_of_turn_to_first_audio_seconds_bucket",
        "vita_tts_real_time_factor_bucket",
    ):
        assert name in metrics
    page = server.get_text("/")
    assert page == (Path(__file__).resolve().parent.parent / "web" / "index.html").read_text()


@pytest.fixture(scope="module")
def assistant(tiny_checkpoint: Path) -> VitaAssistant:
    return VitaAssistant.load(tiny_checkpoint)


def reference_reply(assistant: VitaAssistant, client_audio: np.ndarray, frames: list[Image.Image] = ()) -> str:
    """Greedy reply of plain single-stream generation on the utterance the VAD cuts from
    ``client_audio`` (16 kHz), encoded by the assistant directly (floats in [-1, 1])."""
    detector = TurnDetector(VadSettings())
    utterance = next(e for e in detector.feed(client_audio) if isinstance(e, SpeechEnd))
    embeds = assistant.turn_embeddings(
        assistant.new_conversation(), audio_16k=utterance.audio / 32768.0, frames=list(frames)
    )
    params = SamplingParams(temperature=0.0, max_tokens=REPLY_SETTINGS["generation"]["max_new_tokens"])
    return "".join(generate_text(assistant.model, ReplyTextStream(assistant.tokenizer), embeds, params))


async def test_reply_equals_the_reference_pipeline_on_the_same_utterance(
    server: BackgroundServer, assistant: VitaAssistant
) -> None:
    """Websocket, VAD, worker and engine add nothing to what the model is asked."""
    hello, rate = clip("en_hello")
    result = await stream_audio(server.ws_url, hello, rate, speed=4, session_update=REPLY_SETTINGS, expected_turns=1)
    expected = reference_reply(assistant, np.concatenate([hello, silence(1.5)]))
    assert expected and result.turns[0].text == expected


async def test_camera_frames_reach_the_model(server: BackgroundServer, assistant: VitaAssistant) -> None:
    hello, rate = clip("en_hello")
    colors = [(255, 0, 0), (0, 255, 0), (0, 0, 255), (250, 250, 250)]
    async with websockets.connect(server.ws_url, max_size=None) as ws:
        await start_session(ws, rate)
        for color in colors:
            await ws.send(json.dumps({"type": "video.frame", "image": png(color)}))
        await ws.send(np.concatenate([hello, silence(1.0)]).tobytes())
        events, _ = await collect_until_done(ws)
    frames = [Image.open(io.BytesIO(base64.b64decode(png(color)))) for color in colors]
    with_frames = reference_reply(assistant, np.concatenate([hello, silence(1.0)]), frames)
    assert events[-1]["text"] == with_frames
    assert with_frames != reference_reply(assistant, np.concatenate([hello, silence(1.0)]))  # frames matter
