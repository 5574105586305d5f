"""The OpenAI Realtime API (GA) as ``/v1/realtime`` speaks it: client events parsed, the session's
native events (``server.protocol``) written as Realtime server events.

Names and shapes follow the official ``openai`` package's ``openai.types.realtime`` types (the
tests parse every server event with its ``RealtimeServerEvent``). Client events are read
leniently, as the API asks: unknown optional fields are ignored. Server events are built here as
plain JSON objects (the server does not depend on the ``openai`` package).
"""

from __future__ import annotations

import base64
import itertools
import json
import uuid
from dataclasses import dataclass, field
from typing import Annotated, Any, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError

from server.protocol import (
    MAX_AUDIO_FRAME_BYTES,
    MAX_IMAGE_BYTES,
    MAX_INPUT_TEXT_CHARS,
    MAX_NEW_TOKENS,
    MAX_SYSTEM_PROMPT_CHARS,
    OUTPUT_SAMPLE_RATE,
    ErrorCode,
    ErrorEvent,
    GenerationSettings,
    InputAudioCleared,
    ProtocolError,
    ResponseAudioDropped,
    ResponseDone,
    ResponseInterrupted,
    ResponseStarted,
    ResponseTextDelta,
    ServerEvent,
    SessionReady,
    SessionUpdated,
    SpeechDiscarded,
    SpeechStarted,
    SpeechStopped,
    VadSettings,
    base64_bytes,
    decode_base64,
    event_types,
    parse_json_object,
)

INPUT_SAMPLE_RATE = 24_000  # audio/pcm: 24 kHz mono PCM16 LE, as the API defines it
VOICE = "vita"  # VITA-1.5's TTS has one voice
SERVER_ERROR_CODES = {ErrorCode.INTERNAL_ERROR, ErrorCode.NOT_READY, ErrorCode.SERVER_FULL}


class _In(BaseModel):
    model_config = ConfigDict(extra="ignore")


# ---------------------------------------------------------------- client -> server


class AudioFormat(_In):
    type: str | None = None
    rate: int | None = None


class TurnDetection(_In):
    type: str
    threshold: float | None = Field(None, ge=0.0, le=1.0)
    prefix_padding_ms: int | None = Field(None, ge=0)
    silence_duration_ms: int | None = Field(None, ge=0)
    create_response: bool | None = None
    interrupt_response: bool | None = None


class AudioInput(_In):
    format: AudioFormat | None = None
    turn_detection: TurnDetection | None = None
    transcription: dict[str, Any] | None = None
    noise_reduction: dict[str, Any] | None = None


class AudioOutput(_In):
    format: AudioFormat | None = None
    voice: str | dict[str, Any] | None = None
    speed: float | None = None


class AudioConfig(_In):
    input: AudioInput | None = None
    output: AudioOutput | None = None


class VitaOptions(_In):
    """Extension: VITA's own settings (``server.protocol``) inside ``session``, under ``vita``."""

    vad: VadSettings | None = None
    generation: GenerationSettings | None = None


class SessionConfig(_In):
    type: Literal["realtime", "transcription"] = "realtime"
    instructions: str | None = Field(None, max_length=MAX_SYSTEM_PROMPT_CHARS)
    output_modalities: list[Literal["text", "audio"]] | None = Field(None, min_length=1)
    audio: AudioConfig | None = None
    max_output_tokens: int | Literal["inf"] | None = None
    tools: list[Any] | None = None
    tool_choice: Any = None
    vita: VitaOptions | None = None


class ContentPart(_In):
    type: str
    text: str | None = Field(None, max_length=MAX_INPUT_TEXT_CHARS)
    audio: Annotated[bytes, base64_bytes(MAX_AUDIO_FRAME_BYTES)] | None = None
    image_url: str | None = None


class Item(_In):
    type: str = "message"
    role: str | None = None
    content: list[ContentPart] = Field(default_factory=list)


class ResponseParams(_In):
    output_modalities: list[Literal["text", "audio"]] | None = Field(None, min_length=1)
    max_output_tokens: int | Literal["inf"] | None = None
    instructions: str | None = None
    tools: list[Any] | None = None
    conversation: str | None = None
    input: list[Any] | None = None
    audio: AudioConfig | None = None


class _ClientEvent(_In):
    event_id: str | None = None


class SessionUpdateEvent(_ClientEvent):
    type: Literal["session.update"]
    session: SessionConfig


class AppendEvent(_ClientEvent):
    type: Literal["input_audio_buffer.append"]
    audio: Annotated[bytes, base64_bytes(MAX_AUDIO_FRAME_BYTES)]


class CommitEvent(_ClientEvent):
    type: Literal["input_audio_buffer.commit"]


class ClearEvent(_ClientEvent):
    type: Literal["input_audio_buffer.clear"]


class ItemCreateEvent(_ClientEvent):
    type: Literal["conversation.item.create"]
    item: Item
    previous_item_id: str | None = None


class TruncateEvent(_ClientEvent):
    type: Literal["conversation.item.truncate"]
    item_id: str
    content_index: int = Field(ge=0)
    audio_end_ms: int = Field(ge=0)


class ResponseCreateEvent(_ClientEvent):
    type: Literal["response.create"]
    response: ResponseParams | None = None


class ResponseCancelEvent(_ClientEvent):
    type: Literal["response.cancel"]
    response_id: str | None = None


RealtimeClientEvent = Annotated[
    Union[
        SessionUpdateEvent, AppendEvent, CommitEvent, ClearEvent, ItemCreateEvent, TruncateEvent,
        ResponseCreateEvent, ResponseCancelEvent,
    ],
    Field(discriminator="type"),
]
CLIENT_EVENT_TYPES = event_types(RealtimeClientEvent)
UNSUPPORTED_EVENT_TYPES = frozenset(
    ["conversation.item.delete", "conversation.item.retrieve", "output_audio_buffer.clear",
     "transcription_session.update"]
)
_client_event_adapter: TypeAdapter[RealtimeClientEvent] = TypeAdapter(RealtimeClientEvent)


class RealtimeProtocolError(ProtocolError):
    """A client event that cannot be accepted, with the Realtime error's ``param``."""

    def __init__(self, code: ErrorCode, message: str, param: str | None = None, event_id: str | None = None) -> None:
        super().__init__(code, message)
        self.param = param
        self.event_id = event_id


def parse_realtime_event(text: str) -> RealtimeClientEvent:
    """One JSON text message into a client event, or ``RealtimeProtocolError``."""
    try:
        data = parse_json_object(text)
    except ProtocolError as exc:
        raise RealtimeProtocolError(exc.code, exc.message) from None
    event_type = data.get("type")
    event_id = data.get("event_id") if isinstance(data.get("event_id"), str) else None
    if event_type in UNSUPPORTED_EVENT_TYPES:
        raise RealtimeProtocolError(ErrorCode.UNSUPPORTED, f"{event_type} is not supported by this server", "type",
                                    event_id)
    if event_type not in CLIENT_EVENT_TYPES:
        known = ", ".join(sorted(CLIENT_EVENT_TYPES))
        raise RealtimeProtocolError(ErrorCode.UNKNOWN_EVENT, f"unknown event type {event_type!r}; known: {known}",
                                    "type", event_id)
    try:
        return _client_event_adapter.validate_python(data)
    except ValidationError as exc:
        param = ".".join(str(p) for p in exc.errors()[0]["loc"][1:]) or None
        details = "; ".join(f"{'.'.join(str(p) for p in e['loc'][1:]) or 'event'}: {e['msg']}" for e in exc.errors())
        raise RealtimeProtocolError(ErrorCode.INVALID_EVENT, f"invalid {event_type}: {details}", param,
                                    event_id) from None


def max_new_tokens(value: int | Literal["inf"]) -> int:
    """``max_output_tokens`` as VITA's ``max_new_tokens`` (``inf``: the most VITA allows)."""
    return MAX_NEW_TOKENS if value == "inf" else max(1, min(MAX_NEW_TOKENS, value))


def image_bytes(url: str) -> bytes:
    """The JPEG/PNG bytes of an ``input_image`` data URL (remote URLs are not fetched)."""
    header, comma, payload = url.partition(",")
    if not (url.startswith("data:image/") and comma and header.endswith(";base64")):
        raise RealtimeProtocolError(ErrorCode.INVALID_IMAGE, "image_url must be a data:image/...;base64, URL",
                                    "item.content.image_url")
    try:
        return decode_base64(payload, MAX_IMAGE_BYTES)
    except ValueError as exc:
        raise RealtimeProtocolError(ErrorCode.INVALID_IMAGE, f"image_url: {exc}", "item.content.image_url") from None


# ---------------------------------------------------------------- server -> client


def new_id(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex[:20]}"


@dataclass
class ResponseState:
    """A reply as the Realtime client sees it: its ids, modalities and text so far."""

    id: str
    item_id: str
    audio: bool
    text: str = ""
    done: bool = False


@dataclass
class RealtimeEncoding:
    """Writes the session's native events as Realtime server events (``server.outgoing.Encoding``),
    and the events the connection adapter makes itself (user items, commits).

    ``event_id``/``param`` are the client event being handled, for the ``error`` events it causes;
    ``next_response_audio`` the output modality of the reply the adapter is about to start.
    """

    model: str = "vita-1.5"
    event_id: str | None = None
    param: str | None = None
    next_response_audio: bool | None = None
    speak: bool = True  # the session's output modality: audio (with its transcript) or text
    last_item_id: str | None = None
    _user_item_id: str | None = None  # the utterance the VAD is hearing
    _responses: dict[int, ResponseState] = field(default_factory=dict)
    _event_ids: itertools.count = field(default_factory=itertools.count)
    session_id: str = field(default_factory=lambda: new_id("sess"))

    def _json(self, type_: str, **fields: Any) -> str:
        return json.dumps({"type": type_, "event_id": f"event_{next(self._event_ids)}", **fields})

    # ------------------------------------------------------------------ session

    def session_config(self, event: SessionReady | SessionUpdated) -> dict[str, Any]:
        vad = event.vad
        turn_detection = None if event.turn_detection == "manual" else {
            "type": "server_vad", "threshold": vad.aggressiveness / 3, "prefix_padding_ms": vad.preroll_ms,
            "silence_duration_ms": vad.hangover_ms, "create_response": True, "interrupt_response": True,
        }
        pcm = {"type": "audio/pcm", "rate": INPUT_SAMPLE_RATE}
        return {
            "type": "realtime", "object": "realtime.session", "id": self.session_id, "model": self.model,
            "instructions": event.system_prompt or "",
            "output_modalities": ["audio"] if event.generation.speak else ["text"],
            "max_output_tokens": event.generation.max_new_tokens,
            "audio": {"input": {"format": pcm, "turn_detection": turn_detection},
                      "output": {"format": pcm, "voice": VOICE}},
            "tools": [], "tool_choice": "auto",
            "vita": {"vad": vad.model_dump(), "generation": event.generation.model_dump()},
        }

    # ------------------------------------------------------------------ items the adapter adds

    def user_item(self, item_id: str, content: list[dict[str, Any]]) -> dict[str, Any]:
        return {"id": item_id, "object": "realtime.item", "type": "message", "role": "user",
                "status": "completed", "content": content}

    def item_added(self, item: dict[str, Any]) -> list[str]:
        """``conversation.item.added`` and ``.done`` of a complete item."""
        previous, self.last_item_id = self.last_item_id, item["id"]
        return [self._json("conversation.item.added", previous_item_id=previous, item=item),
                self._json("conversation.item.done", previous_item_id=previous, item=item)]

    def committed(self, item_id: str) -> list[str]:
        """The input audio buffer became a user item."""
        previous = self.last_item_id
        return [self._json("input_audio_buffer.committed", previous_item_id=previous, item_id=item_id),
                *self.item_added(self.user_item(item_id, [{"type": "input_audio", "transcript": None}]))]

    def truncated(self, item_id: str, content_index: int, audio_end_ms: int) -> list[str]:
        return [self._json("conversation.item.truncated", item_id=item_id, content_index=content_index,
                           audio_end_ms=audio_end_ms)]

    def response_for_item(self, item_id: str) -> ResponseState | None:
        return next((r for r in self._responses.values() if r.item_id == item_id), None)

    def latest_response(self) -> ResponseState | None:
        return self._responses[max(self._responses)] if self._responses else None

    def error(self, code: str, message: str, error_type: str = "invalid_request_error") -> list[str]:
        return [self._json("error", error={"type": error_type, "code": code, "message": message,
                                           "param": self.param, "event_id": self.event_id})]

    # ------------------------------------------------------------------ the session's events

    def event(self, event: ServerEvent) -> list[str]:  # noqa: C901 (one branch per native event)
        if isinstance(event, SessionReady):
            self.speak = event.generation.speak
            return [self._json("session.created", session=self.session_config(event))]
        if isinstance(event, SessionUpdated):
            self.speak = event.generation.speak
            return [self._json("session.updated", session=self.session_config(event))]
        if isinstance(event, SpeechStarted):
            self._user_item_id = new_id("item")
            return [self._json("input_audio_buffer.speech_started", audio_start_ms=event.audio_ms,
                               item_id=self._user_item_id)]
        if isinstance(event, (SpeechStopped, SpeechDiscarded)):
            item_id, self._user_item_id = self._user_item_id or new_id("item"), None
            stopped = [self._json("input_audio_buffer.speech_stopped", audio_end_ms=event.audio_ms, item_id=item_id)]
            return stopped + (self.committed(item_id) if isinstance(event, SpeechStopped) else [])
        if isinstance(event, InputAudioCleared):
            return [self._json("input_audio_buffer.cleared")]
        if isinstance(event, ResponseStarted):
            return self._response_started(event)
        if isinstance(event, ResponseTextDelta):
            return self._text_delta(event)
        if isinstance(event, ResponseDone):
            return self._response_ended(event.response_id, "completed", usage={
                "input_tokens": event.usage.input_tokens, "output_tokens": event.usage.output_tokens,
                "total_tokens": event.usage.input_tokens + event.usage.output_tokens})
        if isinstance(event, ResponseInterrupted):
            reason = "turn_detected" if event.reason == "barge_in" else "client_cancelled"
            return self._response_ended(event.response_id, "cancelled", details={"type": "cancelled", "reason": reason})
        if isinstance(event, ResponseAudioDropped):
            return self.error("audio_dropped", f"the client read too slowly: {event.segments} audio deltas "
                              f"({event.samples} samples) of a response were not sent", "server_error")
        if isinstance(event, ErrorEvent):
            error_type = "server_error" if event.code in SERVER_ERROR_CODES else "invalid_request_error"
            messages = self.error(event.code.value, event.message, error_type)
            if event.response_id is not None:
                messages += self._response_ended(event.response_id, "failed", details={
                    "type": "failed", "error": {"type": "server_error", "code": event.code.value}})
            return messages
        return []  # session.cleared (context full): the Realtime API has no such event

    def _response_started(self, event: ResponseStarted) -> list[str]:
        audio = self.speak if self.next_response_audio is None else self.next_response_audio
        state = ResponseState(new_id("resp"), new_id("item"), audio)
        self._responses[event.response_id] = state
        for old in [k for k in self._responses if k < event.response_id - 8]:
            del self._responses[old]
        item = self._assistant_item(state, "in_progress", [])
        previous, self.last_item_id = self.last_item_id, state.item_id
        ids = {"response_id": state.id, "item_id": state.item_id, "output_index": 0}
        part = {"type": "audio", "transcript": ""} if audio else {"type": "text", "text": ""}
        return [
            self._json("response.created", response=self._response(state, "in_progress", [])),
            self._json("response.output_item.added", response_id=state.id, output_index=0, item=item),
            self._json("conversation.item.added", previous_item_id=previous, item=item),
            self._json("response.content_part.added", **ids, content_index=0, part=part),
        ]

    def _text_delta(self, event: ResponseTextDelta) -> list[str]:
        state = self._responses.get(event.response_id)
        if state is None or state.done:
            return []
        state.text += event.delta
        kind = "response.output_audio_transcript.delta" if state.audio else "response.output_text.delta"
        return [self._json(kind, response_id=state.id, item_id=state.item_id, output_index=0, content_index=0,
                           delta=event.delta)]

    def audio(self, response_id: int, segment: int, pcm16: bytes) -> str:
        state = self._responses.get(response_id)
        return self._json("response.output_audio.delta", response_id=state.id if state else "",
                          item_id=state.item_id if state else "", output_index=0, content_index=0,
                          delta=base64.b64encode(pcm16).decode())

    def _response_ended(
        self, response_id: int, status: str, usage: dict[str, int] | None = None, details: dict | None = None
    ) -> list[str]:
        state = self._responses.get(response_id)
        if state is None or state.done:
            return []  # already ended (a reply interrupted while its audio still played)
        state.done = True
        ids = {"response_id": state.id, "item_id": state.item_id, "output_index": 0}
        if state.audio:
            content = [{"type": "output_audio", "transcript": state.text}]
            part = {"type": "audio", "transcript": state.text}
            messages = [self._json("response.output_audio.done", **ids, content_index=0),
                        self._json("response.output_audio_transcript.done", **ids, content_index=0,
                                   transcript=state.text)]
        else:
            content = [{"type": "output_text", "text": state.text}]
            part = {"type": "text", "text": state.text}
            messages = [self._json("response.output_text.done", **ids, content_index=0, text=state.text)]
        item = self._assistant_item(state, "completed" if status == "completed" else "incomplete", content)
        response = self._response(state, status, [item])
        if usage is not None:
            response["usage"] = usage
        if details is not None:
            response["status_details"] = details
        return messages + [
            self._json("response.content_part.done", **ids, content_index=0, part=part),
            self._json("response.output_item.done", response_id=state.id, output_index=0, item=item),
            self._json("conversation.item.done", item=item),
            self._json("response.done", response=response),
        ]

    def _assistant_item(self, state: ResponseState, status: str, content: list[dict[str, Any]]) -> dict[str, Any]:
        return {"id": state.item_id, "object": "realtime.item", "type": "message", "role": "assistant",
                "status": status, "content": content}

    def _response(self, state: ResponseState, status: str, output: list[dict[str, Any]]) -> dict[str, Any]:
        return {"id": state.id, "object": "realtime.response", "status": status, "output": output,
                "conversation_id": self.session_id, "output_modalities": ["audio"] if state.audio else ["text"],
                "audio": {"output": {"format": {"type": "audio/pcm", "rate": OUTPUT_SAMPLE_RATE}, "voice": VOICE}}}
