"""Fuzzing with hypothesis: the protocol (JSON events, binary frames, camera images, settings) and the
audio path (sample rates, channels, frame lengths, NaN/inf where floats are accepted).

In-process properties: parsing, audio conversion and turn detection, image checks and the client's
WAV reading raise nothing but their typed errors. Over the wire: generated message sequences go to
a real server (tiny checkpoint, loopback); every answer is a protocol event, every error a typed
``error`` event, the server logs no exception, and a client speaking afterwards is answered.

The CI run is short (``FUZZ_INPUTS`` inputs in all). ``VITA_FUZZ_INPUTS=100000`` scales every test
up; with ``-s`` the module prints the inputs it ran per test, and ``VITA_FUZZ_REPORT=FILE`` writes
them as JSON.
"""

from __future__ import annotations

import base64
import io
import json
import logging
import math
import os
import struct
import uuid
import zlib
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
from hypothesis import HealthCheck, example, given, settings, strategies as st
from PIL import Image
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import connect

from server.audio_input import MODEL_SAMPLE_RATE, InputAudioConverter, InvalidAudio
from server.background import BackgroundServer
from server.client import read_wav, stream_audio
from server.images import decode_image
from server.protocol import (
    CLIENT_EVENT_TYPES,
    MAX_INPUT_TEXT_CHARS,
    MAX_SYSTEM_PROMPT_CHARS,
    ErrorCode,
    ProtocolError,
    ServerEvent,
    VadSettings,
    event_types,
    parse_client_event,
)
from server.settings import ServerSettings
from server.vad import TurnDetector
from shared_data import AUDIO

FUZZ_INPUTS = 3_000  # the CI run; VITA_FUZZ_INPUTS scales it
SCALE = int(os.environ.get("VITA_FUZZ_INPUTS", FUZZ_INPUTS)) / FUZZ_INPUTS
SERVER_EVENT_TYPES = event_types(ServerEvent)
ERROR_CODES = {code.value for code in ErrorCode} - {ErrorCode.INTERNAL_ERROR.value}
inputs: Counter[str] = Counter()  # inputs run per test


def fuzz_settings(examples: int) -> settings:
    """``examples`` scaled by VITA_FUZZ_INPUTS; no example database, no per-example deadline."""
    return settings(max_examples=max(1, round(examples * SCALE)), deadline=None, database=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                           HealthCheck.function_scoped_fixture])


@pytest.fixture(scope="module", autouse=True)
def report_inputs():
    yield
    total = sum(inputs.values())
    print(f"\nfuzz inputs: {dict(inputs)}, total {total}")
    if path := os.environ.get("VITA_FUZZ_REPORT"):
        Path(path).write_text(json.dumps({"inputs": dict(inputs), "total": total}, indent=2))


def assert_clean_message(message: str) -> None:
    """Error messages name no object reprs and no server paths."""
    assert "object at 0x" not in message and "/work/" not in message and ".py" not in message, message


# ---------------------------------------------------------------- strategies

json_scalars = (st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats(allow_nan=True)
                | st.text(max_size=40))
json_values = st.recursive(json_scalars, lambda inner: st.lists(inner, max_size=4)
                           | st.dictionaries(st.text(max_size=10), inner, max_size=4), max_leaves=12)
floats_any = st.floats(allow_nan=True, allow_infinity=True) | st.integers(-5, 5000) | json_values


def image_bytes() -> st.SearchStrategy[bytes]:
    """Small JPEG/PNG images of any mode and size, the same truncated or with flipped bytes, other
    formats, PNG headers claiming huge sizes, and random bytes."""

    def encode(width: int, height: int, mode: str, fmt: str, seed: int) -> bytes:
        """The image in that format, or b"" where PIL cannot write that mode in it."""
        rng = np.random.default_rng(seed)
        buffer = io.BytesIO()
        try:
            Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8)).convert(mode).save(buffer, fmt)
        except (OSError, ValueError, KeyError):
            return b""
        return buffer.getvalue()

    def huge_png(width: int, height: int) -> bytes:
        def chunk(kind: bytes, data: bytes) -> bytes:
            return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

        header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
        return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")

    def damage(data: bytes, cut: float, flips: list[tuple[float, int]]) -> bytes:
        out = bytearray(data[: max(1, int(len(data) * cut))])
        for where, value in flips:
            out[int(where * (len(out) - 1))] = value
        return bytes(out)

    modes = st.sampled_from(["RGB", "L", "RGBA", "P", "1", "CMYK", "I;16"])
    formats = st.sampled_from(["PNG", "JPEG", "GIF", "BMP", "TIFF", "WEBP"])
    sides = st.integers(1, 48)
    encoded = st.builds(encode, sides, sides, modes, formats, st.integers(0, 2**16)).filter(bool)
    return st.one_of(
        encoded,
        st.builds(damage, encoded, st.floats(0.0, 1.0), st.lists(st.tuples(st.floats(0, 1), st.integers(0, 255)),
                                                                 max_size=4)),
        st.builds(huge_png, st.integers(0, 2**31 - 1), st.integers(0, 2**31 - 1)),
        st.binary(max_size=256),
    )


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


vad_dicts = st.fixed_dictionaries({}, optional={
    name: st.integers(-100, 70_000) | json_values
    for name in ("aggressiveness", "frame_ms", "start_ms", "hangover_ms", "speculative_ms", "min_speech_ms",
                 "max_speech_ms", "preroll_ms")
} | {"frame_ms": st.sampled_from([10, 20, 30]) | json_values, "junk": json_values})
generation_dicts = st.fixed_dictionaries({}, optional={
    "temperature": floats_any, "top_p": floats_any, "top_k": st.integers(-3, 10**6) | json_values,
    "max_new_tokens": st.integers(-3, 3000) | json_values, "speak": st.booleans() | json_values,
    "respect_not_addressed": st.booleans() | json_values,
})
prompts = st.text(max_size=50) | st.just("x" * (MAX_SYSTEM_PROMPT_CHARS + 1)) | json_values


def event_fields(kind: str) -> st.SearchStrategy[dict]:
    """The fields an event of ``kind`` may carry, with valid and invalid values."""
    rates = st.sampled_from([8000, 11025, 16000, 22050, 44100, 48000]) | st.integers(-1, 10**6) | json_values
    common = {"junk": json_values}
    turn_detection = st.sampled_from(["vad", "manual"]) | json_values
    fields = {
        "session.start": {"sample_rate": rates, "channels": st.integers(-1, 4) | json_values,
                          "format": st.sampled_from(["pcm16", "f32"]) | json_values, "system_prompt": prompts,
                          "turn_detection": turn_detection, "vad": vad_dicts | json_values,
                          "generation": generation_dicts | json_values},
        "session.update": {"system_prompt": prompts, "turn_detection": turn_detection, "vad": vad_dicts | json_values,
                           "generation": generation_dicts | json_values},
        "input_text": {"text": st.text(max_size=50) | st.just("y" * (MAX_INPUT_TEXT_CHARS + 1)) | json_values},
        "input_audio": {"audio": st.binary(max_size=2048).map(b64) | st.text(max_size=20) | json_values},
        "video.frame": {"image": image_bytes().map(b64) | st.text(max_size=20) | json_values},
    }.get(kind, {})
    return st.fixed_dictionaries({"type": st.just(kind)}, optional=fields | common)


client_events = st.sampled_from(sorted(CLIENT_EVENT_TYPES) + ["nope"]).flatmap(event_fields) | st.builds(
    lambda kind: {"type": kind}, json_values)
text_frames = st.one_of(
    client_events.map(lambda event: json.dumps(event, allow_nan=True)),
    json_values.map(lambda value: json.dumps(value, allow_nan=True)),
    st.text(max_size=100),
)


def speech_chunks() -> st.SearchStrategy[bytes]:
    """Pieces of a real recording (PCM16 bytes, whatever rate or channel count was declared), some
    followed by a silence long enough to end an utterance."""
    speech = sf.read(AUDIO / "en_hello.wav", dtype="int16")[0].tobytes()
    return st.tuples(st.integers(0, len(speech) // 2), st.integers(0, 32_000), st.sampled_from([0, 16_000])).map(
        lambda span: speech[2 * span[0] : 2 * (span[0] + span[1])] + b"\0\0" * span[2])


binary_frames = st.binary(max_size=4096) | speech_chunks() | st.integers(0, 16_000).map(lambda n: b"\0\0" * n)
messages = st.lists(text_frames | binary_frames, max_size=8)


# ---------------------------------------------------------------- in-process properties


@fuzz_settings(600)
@given(text=text_frames)
def test_parsing_any_text_frame_gives_an_event_or_a_protocol_error(text: str) -> None:
    inputs["parse_client_event"] += 1
    try:
        event = parse_client_event(text)
    except ProtocolError as exc:
        assert exc.code in ErrorCode
        assert_clean_message(exc.message)
        return
    assert event.type in CLIENT_EVENT_TYPES
    for value in event.model_dump().values():  # accepted numbers are finite
        if isinstance(value, dict):
            assert all(not isinstance(v, float) or math.isfinite(v) for v in value.values()), event


vad_settings = st.builds(
    VadSettings, aggressiveness=st.integers(0, 3), frame_ms=st.sampled_from([10, 20, 30]),
    start_ms=st.integers(10, 500), hangover_ms=st.integers(50, 800), speculative_ms=st.integers(0, 800),
    min_speech_ms=st.integers(0, 600), max_speech_ms=st.integers(1000, 3000), preroll_ms=st.integers(0, 400),
)


valid_starts = st.fixed_dictionaries({
    "type": st.just("session.start"), "sample_rate": st.integers(8000, 48000), "channels": st.integers(1, 2),
    "turn_detection": st.sampled_from(["vad", "manual"]), "vad": vad_settings.map(lambda vad: vad.model_dump()),
    "generation": st.fixed_dictionaries({"max_new_tokens": st.integers(1, 24), "temperature": st.floats(0, 2),
                                         "speak": st.booleans(), "respect_not_addressed": st.booleans()}),
}).map(json.dumps)


@fuzz_settings(300)
@given(rate=st.integers(1, 100_000) | st.sampled_from([8000, 16000, 44100, 48000]), channels=st.integers(0, 3),
       frames=st.lists(binary_frames, max_size=6), vad=vad_settings)
def test_audio_conversion_and_turn_detection_take_any_rate_channels_and_frames(
    rate: int, channels: int, frames: list[bytes], vad: VadSettings
) -> None:
    inputs["audio_path"] += 1 + len(frames)
    try:
        converter = InputAudioConverter(rate, channels)
    except InvalidAudio as exc:
        assert not (8000 <= rate <= 48000 and channels in (1, 2))
        assert_clean_message(str(exc))
        return
    detector = TurnDetector(vad)
    accepted, produced = 0, 0
    for frame in frames:
        try:
            samples = converter.convert(frame)
        except InvalidAudio as exc:
            assert len(frame) % (2 * channels)
            assert_clean_message(str(exc))
            continue
        assert samples.dtype == np.int16
        accepted += len(frame) // (2 * channels)
        produced += len(samples)
        detector.feed(samples)
    produced += len(converter.flush())
    expected = accepted * MODEL_SAMPLE_RATE / rate
    assert abs(produced - expected) <= 2 + expected * 0.001  # the output length tracks the input duration


@fuzz_settings(300)
@given(data=image_bytes())
@example(data=b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR\x00\x00\x00\x12\x00\x00\x00\x0b\x01\x00\x00\x00\x00Zl\xe0\xa9"
              b"\x00\x00\x00\x00IDAT\x00\x00\x00\x00\x00\x00\x00\x00")  # PIL raised SyntaxError ("broken PNG file")
def test_any_image_bytes_decode_to_rgb_or_give_invalid_image(data: bytes) -> None:
    inputs["decode_image"] += 1
    try:
        image = decode_image(data)
    except ProtocolError as exc:
        assert exc.code is ErrorCode.INVALID_IMAGE
        assert_clean_message(exc.message)
        return
    assert image.mode == "RGB" and image.width * image.height > 0


@fuzz_settings(150)
@given(samples=st.lists(st.floats(allow_nan=True, allow_infinity=True, width=32), min_size=1, max_size=400),
       rate=st.sampled_from([8000, 16000, 24000, 44100, 48000]), channels=st.integers(1, 2),
       subtype=st.sampled_from(["FLOAT", "DOUBLE"]))
def test_float_wavs_with_nan_and_inf_read_as_finite_int16(
    samples: list[float], rate: int, channels: int, subtype: str, tmp_path_factory: pytest.TempPathFactory
) -> None:
    inputs["read_wav"] += 1
    path = tmp_path_factory.mktemp("wav") / "in.wav"
    data = np.repeat(np.asarray(samples, dtype=np.float32)[:, None], channels, axis=1)
    sf.write(path, data, rate, subtype=subtype)
    with np.errstate(invalid="raise"):  # numpy's cast of NaN to int16 is undefined: an error here
        audio, read_rate = read_wav(path)
    assert read_rate == rate and audio.dtype == np.int16 and audio.shape == (len(samples), channels)[: audio.ndim]
    column = audio if audio.ndim == 1 else audio[:, 0]
    expected = np.round(np.clip(np.nan_to_num(data[:, 0], nan=0.0, posinf=1.0, neginf=-1.0), -1, 1) * 32767)
    assert np.array_equal(column, expected)  # numbers as they are (clipped), NaN as silence, inf as full scale


# ---------------------------------------------------------------- over the wire


class ErrorLogs(logging.Handler):
    """Every record at ERROR or above from the server's loggers (uvicorn's, asyncio's, ours)."""

    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@pytest.fixture(scope="module")
def fuzzed_server(tiny_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory):
    handler = ErrorLogs()
    loggers = [logging.getLogger(name) for name in ("", "uvicorn", "uvicorn.error", "asyncio")]
    for logger in loggers:
        logger.addHandler(handler)
    settings = ServerSettings(max_sessions=64, cache_dir=tmp_path_factory.mktemp("cache"))
    try:
        with BackgroundServer(settings, tiny_checkpoint) as server:
            yield server, handler
    finally:
        for logger in loggers:
            logger.removeHandler(handler)


def exchange(url: str, frames: list[str | bytes]) -> tuple[list[dict], int | None]:
    """Send ``frames`` on one connection, then a valid start and an update that marks the end; the
    events received until the marker is echoed (or the server closes), and the close code if it did."""
    marker = uuid.uuid4().hex
    events: list[dict] = []
    with connect(url, max_size=None, open_timeout=10, close_timeout=10) as ws:
        try:
            for frame in frames:
                ws.send(frame)
            ws.send(json.dumps({"type": "session.start", "sample_rate": 16_000}))
            ws.send(json.dumps({"type": "session.update", "system_prompt": marker}))
            while True:
                message = ws.recv(timeout=30)
                if isinstance(message, bytes):
                    continue  # reply audio (a fuzzed utterance was answered)
                events.append(json.loads(message))
                if events[-1]["type"] == "session.updated" and events[-1]["system_prompt"] == marker:
                    return events, None
        except ConnectionClosed:
            return events, ws.protocol.close_code


@fuzz_settings(400)
@given(start=st.none() | valid_starts, frames=messages)
def test_generated_message_sequences_get_typed_errors_and_never_break_the_server(
    fuzzed_server, start: str | None, frames: list[str | bytes]
) -> None:
    server, errors = fuzzed_server
    frames = frames if start is None else [start, *frames]
    inputs["websocket"] += len(frames)
    events, close_code = exchange(server.ws_url, frames)
    assert not errors.records, [r.getMessage() for r in errors.records]
    for event in events:
        assert event["type"] in SERVER_EVENT_TYPES, event
        if event["type"] == "error":
            assert event["code"] in ERROR_CODES, event
            assert_clean_message(event["message"])
            assert not event["fatal"] or event["code"] in ("too_many_errors", "server_full"), event
    if close_code is not None:  # only a fatal error or an oversized message closes the connection
        assert close_code == 1009 or events[-1]["fatal"], (close_code, events)


async def test_a_speaking_client_is_answered_after_the_fuzzing(fuzzed_server) -> None:
    server, errors = fuzzed_server
    audio, rate = sf.read(AUDIO / "en_hello.wav", dtype="int16")
    generation = {"respect_not_addressed": False, "max_new_tokens": 8, "temperature": 0}
    result = await stream_audio(server.ws_url, audio, rate, speed=4, session_update={"generation": generation},
                                expected_turns=1, reply_timeout_s=30)
    assert not result.of_type("error"), result.events
    assert [t.done is not None for t in result.turns] == [True] and result.turns[0].audio_samples > 0
    assert not errors.records, [r.getMessage() for r in errors.records]
