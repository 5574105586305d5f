"""Protocol parsing: every malformed message maps to a precise error code."""

import base64
import json

import pytest

from server.protocol import (
    MAX_AUDIO_FRAME_BYTES,
    ErrorCode,
    GenerationSettings,
    InputAudio,
    ProtocolError,
    SessionStart,
    SessionUpdate,
    VideoFrame,
    decode_audio_segment,
    encode_audio_segment,
    parse_client_event,
)


def test_session_start_round_trip() -> None:
    event = parse_client_event(json.dumps({"type": "session.start", "sample_rate": 44100, "channels": 2}))
    assert isinstance(event, SessionStart)
    assert (event.sample_rate, event.channels, event.format) == (44100, 2, "pcm16")


def test_base64_payloads_are_decoded() -> None:
    raw = bytes(range(256))
    audio = parse_client_event(json.dumps({"type": "input_audio", "audio": base64.b64encode(raw).decode()}))
    image = parse_client_event(json.dumps({"type": "video.frame", "image": base64.b64encode(raw).decode()}))
    assert isinstance(audio, InputAudio) and audio.audio == raw
    assert isinstance(image, VideoFrame) and image.image == raw


def test_generation_defaults_follow_upstream_demos() -> None:
    """Greedy decoding of up to 512 tokens unless the client asks otherwise; sampling knobs stay."""
    event = parse_client_event(json.dumps({"type": "session.start", "sample_rate": 16000, "generation": {}}))
    assert isinstance(event, SessionStart) and event.generation == GenerationSettings()
    assert (event.generation.temperature, event.generation.max_new_tokens) == (0.0, 512)
    sampled = GenerationSettings(temperature=0.7, top_p=0.8, top_k=20)
    assert (sampled.temperature, sampled.top_p, sampled.top_k) == (0.7, 0.8, 20)


def test_session_update_keeps_track_of_given_fields() -> None:
    event = parse_client_event(json.dumps({"type": "session.update", "vad": {"hangover_ms": 800}}))
    assert isinstance(event, SessionUpdate)
    assert event.vad is not None and event.vad.model_dump(exclude_unset=True) == {"hangover_ms": 800}


@pytest.mark.parametrize(
    ("text", "code"),
    [
        ("{not json", ErrorCode.INVALID_JSON),
        ("[1, 2]", ErrorCode.INVALID_JSON),
        ('{"type": "hello"}', ErrorCode.UNKNOWN_EVENT),
        ("{}", ErrorCode.UNKNOWN_EVENT),
        ('{"type": "session.start"}', ErrorCode.INVALID_EVENT),
        ('{"type": "session.start", "sample_rate": 4000}', ErrorCode.INVALID_EVENT),
        ('{"type": "session.start", "sample_rate": 96000}', ErrorCode.INVALID_EVENT),
        ('{"type": "session.start", "sample_rate": 16000, "channels": 3}', ErrorCode.INVALID_EVENT),
        ('{"type": "session.start", "sample_rate": 16000, "format": "f32"}', ErrorCode.INVALID_EVENT),
        ('{"type": "session.start", "sample_rate": 16000, "bogus": 1}', ErrorCode.INVALID_EVENT),
        ('{"type": "input_audio", "audio": "!!not base64!!"}', ErrorCode.INVALID_EVENT),
        ('{"type": "input_audio", "audio": 12}', ErrorCode.INVALID_EVENT),
        ('{"type": "session.update", "vad": {"frame_ms": 25}}', ErrorCode.INVALID_EVENT),
        ('{"type": "session.update", "generation": {"temperature": -1}}', ErrorCode.INVALID_EVENT),
    ],
)
def test_bad_messages_raise_protocol_errors(text: str, code: ErrorCode) -> None:
    with pytest.raises(ProtocolError) as info:
        parse_client_event(text)
    assert info.value.code == code


def test_oversized_base64_audio_is_refused_before_decoding() -> None:
    payload = base64.b64encode(b"\0" * (MAX_AUDIO_FRAME_BYTES + 3)).decode()
    with pytest.raises(ProtocolError) as info:
        parse_client_event(json.dumps({"type": "input_audio", "audio": payload}))
    assert info.value.code == ErrorCode.INVALID_EVENT


def test_audio_segment_header_round_trip() -> None:
    pcm = bytes(range(10))
    frame = encode_audio_segment(7, 3, pcm)
    assert len(frame) == 8 + len(pcm)
    assert int.from_bytes(frame[:4], "little") == 7 and int.from_bytes(frame[4:8], "little") == 3
    assert decode_audio_segment(frame) == (7, 3, pcm)
