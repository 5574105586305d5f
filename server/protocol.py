"""Websocket protocol of the real-time server: every event, in one place.

Transport: one websocket per user at ``/ws``. Text frames carry JSON objects with a
``"type"`` field; binary frames carry audio.

Client -> server
    ``session.start``   must come first: input ``sample_rate`` (8000-48000 Hz), ``channels``
                        (1 or 2), ``format`` ("pcm16"); optional ``system_prompt``,
                        ``turn_detection`` ("vad", the default: the server ends turns at
                        pauses; "manual": the client ends them with ``input_audio.commit``),
                        ``vad`` and ``generation`` settings. Answered by ``session.ready``.
    binary frame        raw little-endian PCM16 at the declared rate, channels interleaved.
                        Must hold a whole number of samples (frame length multiple of
                        2 * channels) and be at most ``MAX_AUDIO_FRAME_BYTES``.
    ``input_audio``     the same audio as base64 in JSON (``audio`` field).
    ``video.frame``     one camera image, JPEG or PNG, base64 (``image`` field). Frames of the
                        last second (at most 4) are attached to the next user turn as video.
    ``session.update``  change ``system_prompt``, ``turn_detection``, ``vad`` and/or
                        ``generation`` settings; only the fields present change, the others keep
                        their value. VAD and turn detection changes apply from the next
                        utterance on (audio buffered in manual mode goes to the VAD when it is
                        switched back on); a new system prompt starts a new conversation.
                        Answered by ``session.updated`` with the effective settings.
    ``input_audio.commit``  end the user's turn now (push-to-talk release): in manual mode with
                        the audio received since the last turn (at least ``MIN_COMMIT_MS``),
                        with the VAD with the utterance in progress. Answered like a turn the
                        VAD ended (``response.started`` ...), or ``error`` ``no_audio``.
    ``input_audio.clear``   drop the audio received since the last turn (manual mode) or the
                        utterance in progress (VAD); answered by ``input_audio.cleared``.
    ``input_text``      a typed user turn (``text``), with the camera frames of the last second;
                        answered like a spoken one, with text and speech.
    ``response.cancel`` stop the reply being generated or still playing (answered by
                        ``response.interrupted``, or ``error`` ``no_response`` if there is none).
    ``session.reset``   cancel any reply and forget the conversation history; answered by
                        ``session.cleared``.

Server -> client
    ``session.ready``          session accepted; echoes the effective settings.
    ``session.cleared``        the conversation history is forgotten: ``reason`` "reset" (the
                               client asked) or "context_full" (it outgrew the model's context;
                               the turn that did not fit is answered in the new conversation).
    ``vad.speech_started``     the VAD heard the start of an utterance (``audio_ms`` = position
                               in the session's input stream).
    ``vad.speech_stopped``     the utterance ended (after the silence hangover) and becomes
                               a user turn (``duration_ms``). Too-short utterances are dropped
                               with ``vad.speech_discarded`` instead; overlong ones are cut at
                               ``vad.max_speech_ms`` (``truncated`` = true).
    ``response.started``       a reply to the turn begins (``response_id`` counts from 1 per
                               session).
    ``response.text.delta``    a piece of the reply text.
    binary frame               one reply audio segment: an 8-byte header (uint32 LE
                               ``response_id``, uint32 LE ``segment`` index from 0) followed by
                               PCM16 LE mono samples at 24 kHz (``OUTPUT_SAMPLE_RATE``). Every
                               segment is sent as soon as it is synthesised; dropped segments
                               leave gaps in the index.
    ``response.audio.dropped`` the client read too slowly: this many segments of that reply were
                               not sent (the per-session outgoing queue is bounded).
    ``input_audio.cleared``    the audio of ``input_audio.clear`` was dropped (``audio_ms`` of it).
    ``response.done``          the reply is complete: full ``text``, ``state`` ("answer" or
                               "not_addressed": VITA's ☟ token, nothing is spoken), measured
                               ``timings`` and token ``usage``.
    ``response.interrupted``   the reply was stopped (``reason``: "barge_in", "cancel",
                               "reset"); the client must drop any queued audio of it. No further
                               audio of that ``response_id`` follows. It can also come after
                               ``response.done``: the user spoke while the reply still played.
    ``error``                  ``code`` (one of ``ErrorCode``) and a human ``message``; a reply
                               that failed carries its ``response_id`` (no ``response.done``
                               follows for it). At most ``ERROR_EVENTS_PER_S`` errors a second
                               are sent: ``suppressed`` counts those of the session left out
                               since the previous error event (a summary event reports them
                               when no error follows). Errors are not fatal unless ``fatal`` is
                               true: then the websocket is closed with the code's
                               ``CLOSE_CODES`` close code and the code as reason:
                               ``not_ready`` and ``server_full`` (1013; a seat is taken at
                               ``session.start``), ``handshake_timeout`` (no ``session.start``
                               within the server's handshake timeout, 1008),
                               ``too_many_errors`` (errors kept coming faster than they are
                               reported, 1008), ``idle_timeout`` (no speech, turn or event
                               other than audio and video for the server's idle timeout, 1000)
                               and ``worker_failed`` (the model worker died or hung and is being
                               restarted; the conversation is lost: reconnect shortly, 1013).
                               A connection refused before its session gets one fatal error
                               and close 1008 (``unauthorized``: a missing or wrong API key;
                               ``origin_not_allowed``) or 1013 (``too_many_connections`` from
                               one address). Client-ended turns: ``no_audio`` (nothing, or too
                               little, to commit) and ``audio_buffer_full`` (more than
                               ``MAX_BUFFERED_AUDIO_MS`` uncommitted in manual mode).
                               On server shutdown the websocket is closed with code 1012.
                               Messages over ``MAX_MESSAGE_BYTES`` close it with code 1009.
"""

from __future__ import annotations

import base64
import binascii
import json
import struct
from enum import Enum
from typing import Annotated, Any, Literal, Union, get_args, get_origin

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, TypeAdapter, ValidationError

from tts.config import SAMPLE_RATE

OUTPUT_SAMPLE_RATE = SAMPLE_RATE  # the TTS's 24 kHz
MIN_INPUT_SAMPLE_RATE = 8_000
MAX_INPUT_SAMPLE_RATE = 48_000
MAX_AUDIO_FRAME_BYTES = 1 << 20  # 1 MiB: about 5.5 s of 48 kHz stereo PCM16
MAX_IMAGE_BYTES = 4 << 20  # decoded JPEG/PNG size
MAX_TEXT_FRAME_BYTES = 8 << 20  # whole JSON message (base64 image or audio included)
MAX_MESSAGE_BYTES = 16 << 20  # any larger websocket message closes the connection (code 1009)
MAX_SYSTEM_PROMPT_CHARS = 8_000
MAX_INPUT_TEXT_CHARS = 8_000
MAX_NEW_TOKENS = 2_048
MIN_COMMIT_MS = 100  # a manual turn's audio: the audio encoder needs about 85 ms
MAX_BUFFERED_AUDIO_MS = 60_000  # audio held for a manual turn; more is refused (audio_buffer_full)
ERROR_EVENTS_PER_S = 5  # error events a session is sent per second; more are counted, not sent
AUDIO_HEADER = struct.Struct("<II")  # response_id, segment index


class ErrorCode(str, Enum):
    """Machine-readable error codes of the ``error`` event."""

    INVALID_JSON = "invalid_json"
    UNKNOWN_EVENT = "unknown_event"
    INVALID_EVENT = "invalid_event"
    SESSION_NOT_STARTED = "session_not_started"
    SESSION_ALREADY_STARTED = "session_already_started"
    INVALID_AUDIO = "invalid_audio"
    FRAME_TOO_LARGE = "frame_too_large"
    INVALID_IMAGE = "invalid_image"
    NO_RESPONSE = "no_response"
    NO_AUDIO = "no_audio"
    AUDIO_BUFFER_FULL = "audio_buffer_full"
    UNSUPPORTED = "unsupported"
    NOT_READY = "not_ready"
    SERVER_FULL = "server_full"
    IDLE_TIMEOUT = "idle_timeout"
    HANDSHAKE_TIMEOUT = "handshake_timeout"
    TOO_MANY_ERRORS = "too_many_errors"
    UNAUTHORIZED = "unauthorized"
    ORIGIN_NOT_ALLOWED = "origin_not_allowed"
    TOO_MANY_CONNECTIONS = "too_many_connections"
    WORKER_FAILED = "worker_failed"
    INTERNAL_ERROR = "internal_error"


CLOSE_CODES = {  # websocket close code after each fatal error; 1000 for others
    ErrorCode.NOT_READY: 1013,
    ErrorCode.SERVER_FULL: 1013,
    ErrorCode.HANDSHAKE_TIMEOUT: 1008,
    ErrorCode.TOO_MANY_ERRORS: 1008,
    ErrorCode.UNAUTHORIZED: 1008,
    ErrorCode.ORIGIN_NOT_ALLOWED: 1008,
    ErrorCode.TOO_MANY_CONNECTIONS: 1013,
    ErrorCode.WORKER_FAILED: 1013,
}


class _Event(BaseModel):
    model_config = ConfigDict(extra="forbid")


def base64_bytes(max_bytes: int) -> BeforeValidator:
    """Field validator turning base64 text into at most ``max_bytes`` bytes (``decode_base64``)."""
    return BeforeValidator(lambda value: decode_base64(value, max_bytes))


# ---------------------------------------------------------------- settings carried by events


class VadSettings(_Event):
    """Turn detection with webrtcvad on 16 kHz mono audio."""

    aggressiveness: int = Field(2, ge=0, le=3, description="webrtcvad mode, 3 = most aggressive")
    frame_ms: Literal[10, 20, 30] = 30
    start_ms: int = Field(150, ge=10, le=2_000, description="voiced audio needed to start")
    hangover_ms: int = Field(
        400, ge=50, le=5_000, description="silence that ends an utterance (longer than most pauses within one)"
    )
    speculative_ms: int = Field(
        200, ge=0, le=5_000, description="silence after which the reply is prepared unseen; 0 or >= hangover_ms: off"
    )
    min_speech_ms: int = Field(300, ge=0, le=10_000, description="shorter utterances are ignored")
    max_speech_ms: int = Field(20_000, ge=1_000, le=60_000, description="longer ones are cut")
    preroll_ms: int = Field(300, ge=0, le=1_000, description="audio kept before the start")


class GenerationSettings(_Event):
    """Sampling of the reply and what to do with VITA's state token.

    Greedy decoding and up to 512 tokens by default, as upstream VITA-1.5's demos.
    """

    temperature: float = Field(0.0, ge=0.0, le=2.0, description="0 = greedy")
    top_p: float = Field(0.9, gt=0.0, le=1.0, description="used when temperature > 0")
    top_k: int = Field(0, ge=0, description="used when temperature > 0; 0 = off")
    max_new_tokens: int = Field(512, ge=1, le=MAX_NEW_TOKENS)
    speak: bool = Field(True, description="synthesise reply audio")
    respect_not_addressed: bool = Field(
        True, description="stay silent when VITA answers ☟ (speech not addressed to it)"
    )


TurnDetection = Literal["vad", "manual"]  # the server's VAD ends turns, or the client does (input_audio.commit)


# ---------------------------------------------------------------- client -> server


class SessionStart(_Event):
    type: Literal["session.start"] = "session.start"
    sample_rate: int = Field(ge=MIN_INPUT_SAMPLE_RATE, le=MAX_INPUT_SAMPLE_RATE)
    channels: int = Field(1, ge=1, le=2)
    format: Literal["pcm16"] = "pcm16"
    system_prompt: str | None = Field(None, max_length=MAX_SYSTEM_PROMPT_CHARS)
    turn_detection: TurnDetection | None = None
    vad: VadSettings | None = None
    generation: GenerationSettings | None = None


class InputAudio(_Event):
    type: Literal["input_audio"] = "input_audio"
    audio: Annotated[bytes, base64_bytes(MAX_AUDIO_FRAME_BYTES)] = Field(
        description="base64 PCM16 LE at the session's rate and channels"
    )


class VideoFrame(_Event):
    type: Literal["video.frame"] = "video.frame"
    image: Annotated[bytes, base64_bytes(MAX_IMAGE_BYTES)] = Field(description="base64 JPEG or PNG")


class SessionUpdate(_Event):
    type: Literal["session.update"] = "session.update"
    system_prompt: str | None = Field(None, max_length=MAX_SYSTEM_PROMPT_CHARS)
    turn_detection: TurnDetection | None = None
    vad: VadSettings | None = None
    generation: GenerationSettings | None = None


class InputAudioCommit(_Event):
    type: Literal["input_audio.commit"] = "input_audio.commit"


class InputAudioClear(_Event):
    type: Literal["input_audio.clear"] = "input_audio.clear"


class InputText(_Event):
    type: Literal["input_text"] = "input_text"
    text: str = Field(min_length=1, max_length=MAX_INPUT_TEXT_CHARS)


class ResponseCancel(_Event):
    type: Literal["response.cancel"] = "response.cancel"


class SessionReset(_Event):
    type: Literal["session.reset"] = "session.reset"


ClientEvent = Annotated[
    Union[
        SessionStart, InputAudio, VideoFrame, SessionUpdate, InputAudioCommit, InputAudioClear, InputText,
        ResponseCancel, SessionReset,
    ],
    Field(discriminator="type"),
]


def event_types(events: Any) -> frozenset[str]:
    """The ``type`` values of a union of event models (``Annotated`` with its discriminator or not)."""
    union = get_args(events)[0] if get_origin(events) is Annotated else events
    return frozenset(get_args(model.model_fields["type"].annotation)[0] for model in get_args(union))


CLIENT_EVENT_TYPES = event_types(ClientEvent)
_client_event_adapter: TypeAdapter[ClientEvent] = TypeAdapter(ClientEvent)


# ---------------------------------------------------------------- server -> client


class SessionReady(_Event):
    type: Literal["session.ready"] = "session.ready"
    session_id: str
    input_sample_rate: int
    input_channels: int
    output_sample_rate: int = OUTPUT_SAMPLE_RATE
    system_prompt: str | None
    turn_detection: TurnDetection
    vad: VadSettings
    generation: GenerationSettings
    model: str = Field(description="checkpoint the server runs (tiny = random noise replies)")


class SessionUpdated(_Event):
    type: Literal["session.updated"] = "session.updated"
    system_prompt: str | None
    turn_detection: TurnDetection
    vad: VadSettings
    generation: GenerationSettings


class SessionCleared(_Event):
    type: Literal["session.cleared"] = "session.cleared"
    reason: Literal["reset", "context_full"] = "reset"


class SpeechStarted(_Event):
    type: Literal["vad.speech_started"] = "vad.speech_started"
    audio_ms: int = Field(description="utterance start in the session's input stream")


class SpeechStopped(_Event):
    type: Literal["vad.speech_stopped"] = "vad.speech_stopped"
    audio_ms: int = Field(description="utterance end in the session's input stream")
    duration_ms: int
    truncated: bool = Field(False, description="cut at vad.max_speech_ms")


class SpeechDiscarded(_Event):
    type: Literal["vad.speech_discarded"] = "vad.speech_discarded"
    audio_ms: int
    duration_ms: int = Field(description="shorter than vad.min_speech_ms")


class InputAudioCleared(_Event):
    type: Literal["input_audio.cleared"] = "input_audio.cleared"
    audio_ms: int = Field(description="how much audio was dropped")


class ResponseStarted(_Event):
    type: Literal["response.started"] = "response.started"
    response_id: int
    video_frames: int = Field(0, description="camera frames attached to the turn")


class ResponseTextDelta(_Event):
    type: Literal["response.text.delta"] = "response.text.delta"
    response_id: int
    delta: str


class ResponseAudioDropped(_Event):
    type: Literal["response.audio.dropped"] = "response.audio.dropped"
    response_id: int
    segments: int
    samples: int


class TurnStageTimings(_Event):
    """When the worker's turn pipeline reached each stage, in ms from the end of speech: negative for a
    turn prepared speculatively before the end was confirmed; ``None`` where it never got there."""

    started_ms: float
    media_encoded_ms: float | None = None
    first_token_ms: float | None = None
    first_sentence_ms: float | None = None
    speech_prefilled_ms: float | None = None
    speech_first_window_ms: float | None = None
    speech_vocoder_call_ms: float | None = None
    speech_first_segment_ms: float | None = None
    first_audio_ms: float | None = None


class ResponseTimings(_Event):
    """Milliseconds measured by the server; ``None`` where the event never happened."""

    end_of_speech_to_first_text_ms: float | None = None
    end_of_speech_to_first_audio_ms: float | None = None
    total_ms: float
    audio_ms: float = Field(description="duration of the reply audio")
    real_time_factor: float | None = Field(None, description="synthesis time / audio duration")
    stages: TurnStageTimings | None = None


class ResponseUsage(_Event):
    input_tokens: int = Field(description="the turn's prompt (the system block included on a first turn)")
    output_tokens: int = Field(description="the reply's tokens")


class ResponseDone(_Event):
    type: Literal["response.done"] = "response.done"
    response_id: int
    text: str
    state: Literal["answer", "not_addressed"]
    audio_segments: int
    timings: ResponseTimings
    usage: ResponseUsage


class ResponseInterrupted(_Event):
    type: Literal["response.interrupted"] = "response.interrupted"
    response_id: int
    reason: Literal["barge_in", "cancel", "reset"]


class ErrorEvent(_Event):
    type: Literal["error"] = "error"
    code: ErrorCode
    message: str
    fatal: bool = False
    response_id: int | None = Field(None, description="the reply that failed (internal_error); it ends there")
    suppressed: int = Field(0, description="errors of the session not sent since the previous error event")


ServerEvent = Union[
    SessionReady,
    SessionUpdated,
    SessionCleared,
    SpeechStarted,
    SpeechStopped,
    SpeechDiscarded,
    InputAudioCleared,
    ResponseStarted,
    ResponseTextDelta,
    ResponseAudioDropped,
    ResponseDone,
    ResponseInterrupted,
    ErrorEvent,
]


# ---------------------------------------------------------------- encoding helpers


class ProtocolError(Exception):
    """A client message that cannot be accepted: the ``error`` event's code and message."""

    def __init__(self, code: ErrorCode, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


def decode_base64(value: Any, max_bytes: int) -> bytes:
    """Strict base64 decoding with a size cap (raises ``ValueError`` for pydantic)."""
    if not isinstance(value, str):
        raise ValueError("must be a base64 string")
    if len(value) > (max_bytes * 4) // 3 + 4:
        raise ValueError(f"larger than {max_bytes} bytes")
    try:
        return base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise ValueError(f"not valid base64: {exc}") from None


def parse_json_object(text: str) -> dict[str, Any]:
    """One JSON text frame as an object, or ``ProtocolError`` (too large, not JSON, not an object)."""
    if len(text) > MAX_TEXT_FRAME_BYTES:
        raise ProtocolError(ErrorCode.FRAME_TOO_LARGE, f"text frame over {MAX_TEXT_FRAME_BYTES} bytes")
    try:
        data = json.loads(text)
    except (json.JSONDecodeError, RecursionError) as exc:
        raise ProtocolError(ErrorCode.INVALID_JSON, f"not valid JSON: {exc}") from None
    if not isinstance(data, dict):
        raise ProtocolError(ErrorCode.INVALID_JSON, "a JSON object with a 'type' field is expected")
    return data


def parse_client_event(text: str) -> ClientEvent:
    """Parse one JSON text frame into a client event or raise ``ProtocolError``."""
    data = parse_json_object(text)
    event_type = data.get("type")
    if not isinstance(event_type, str) or event_type not in CLIENT_EVENT_TYPES:
        known = ", ".join(sorted(CLIENT_EVENT_TYPES))
        raise ProtocolError(ErrorCode.UNKNOWN_EVENT, f"unknown event type {event_type!r:.80}; known: {known}")
    try:
        return _client_event_adapter.validate_python(data)
    except ValidationError as exc:
        details = "; ".join(
            f"{'.'.join(str(p) for p in err['loc'][1:]) or 'event'}: {err['msg']}" for err in exc.errors()
        )
        raise ProtocolError(ErrorCode.INVALID_EVENT, f"invalid {event_type}: {details}") from None


def encode_event(event: ServerEvent) -> str:
    """JSON text of a server event."""
    return event.model_dump_json()


def encode_audio_segment(response_id: int, segment: int, pcm16: bytes) -> bytes:
    """Binary frame of one reply audio segment: 8-byte header + PCM16 LE 24 kHz mono."""
    return AUDIO_HEADER.pack(response_id, segment) + pcm16


def decode_audio_segment(frame: bytes) -> tuple[int, int, bytes]:
    """Inverse of ``encode_audio_segment``: (response_id, segment, pcm16 bytes)."""
    if len(frame) < AUDIO_HEADER.size:
        raise ValueError("audio frame shorter than its header")
    response_id, segment = AUDIO_HEADER.unpack_from(frame)
    return response_id, segment, frame[AUDIO_HEADER.size :]
