"""``/v1/realtime``: the OpenAI Realtime API as an adapter over the same ``Session`` as ``/ws``.

Client events become the session's native events and calls (``server.realtime_protocol`` reads
them); the session's events go out through ``RealtimeEncoding``. The session runs with 24 kHz
mono PCM16 input. With ``server_vad`` the session's VAD ends turns and answers them, exactly as on
``/ws`` (speculative end of turn and barge-in included). With ``turn_detection: null`` the client
commits the audio buffer; committed audio, typed text and images (``conversation.item.create``)
wait as user items until ``response.create`` makes them one VITA turn: the images are the turn's
video frames.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field

import numpy as np

from server.audio_input import MODEL_SAMPLE_RATE, InputAudioConverter, InvalidAudio
from server.images import decode_image
from server.protocol import (
    MIN_COMMIT_MS,
    ErrorCode,
    InputAudio,
    InputAudioClear,
    InputAudioCommit,
    ProtocolError,
    ResponseCancel,
    SessionStart,
    SessionUpdate,
    VadSettings,
)
from server.realtime_protocol import (
    INPUT_SAMPLE_RATE,
    VOICE,
    AppendEvent,
    AudioConfig,
    ClearEvent,
    CommitEvent,
    Item,
    ItemCreateEvent,
    RealtimeClientEvent,
    RealtimeEncoding,
    RealtimeProtocolError,
    ResponseCancelEvent,
    ResponseCreateEvent,
    ResponseParams,
    SessionConfig,
    SessionUpdateEvent,
    TruncateEvent,
    image_bytes,
    max_new_tokens,
    new_id,
    parse_realtime_event,
)
from server.session import Session

log = logging.getLogger("vita.realtime")

Unsupported = tuple[str, str]  # (param, message)


@dataclass
class PendingInput:
    """User items added since the last response: they make the next turn."""

    audio: list[np.ndarray] = field(default_factory=list)  # 16 kHz int16
    texts: list[str] = field(default_factory=list)
    images: list[bytes] = field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.audio or self.texts or self.images)


class RealtimeConnection:
    """Reads one connection's Realtime client events into its session."""

    def __init__(self, session: Session, encoding: RealtimeEncoding) -> None:
        self.session = session
        self.encoding = encoding
        self.pending = PendingInput()

    @classmethod
    async def open(cls, session: Session, encoding: RealtimeEncoding) -> RealtimeConnection:
        """Start the session at once (``session.created``): the API has no start event."""
        connection = cls(session, encoding)
        await session.handle_event(SessionStart(sample_rate=INPUT_SAMPLE_RATE, channels=1))
        return connection

    async def handle_text(self, text: str) -> None:
        """One client event; a bad one is answered with an ``error`` event carrying its ``event_id``."""
        try:
            event = parse_realtime_event(text)
            self.encoding.event_id = event.event_id
            await self._dispatch(event)
        except RealtimeProtocolError as exc:
            self._error(exc.code, exc.message, exc.param, exc.event_id or self.encoding.event_id)
        except ProtocolError as exc:
            self._error(exc.code, exc.message, event_id=self.encoding.event_id)
        finally:
            self.encoding.event_id = None

    def handle_bytes(self, data: bytes) -> None:
        self._error(ErrorCode.INVALID_EVENT, "binary messages are not part of the Realtime API: send audio "
                    "as input_audio_buffer.append events")

    def _error(self, code: ErrorCode, message: str, param: str | None = None, event_id: str | None = None) -> None:
        """An error the client caused, under the session's error budget."""
        self.encoding.param, self.encoding.event_id = param, event_id
        try:
            self.session.client_error(code, message)
        finally:
            self.encoding.param = None

    async def _dispatch(self, event: RealtimeClientEvent) -> None:
        if isinstance(event, AppendEvent):
            await self.session.handle_event(InputAudio.model_construct(audio=event.audio))
        elif isinstance(event, SessionUpdateEvent):
            await self._update(event.session)
        elif isinstance(event, CommitEvent):
            await self._commit()
        elif isinstance(event, ClearEvent):
            await self.session.handle_event(InputAudioClear())
        elif isinstance(event, ItemCreateEvent):
            await self._add_item(event.item)
        elif isinstance(event, ResponseCreateEvent):
            self._create_response(event.response)
        elif isinstance(event, ResponseCancelEvent):
            await self.session.handle_event(ResponseCancel())
        elif isinstance(event, TruncateEvent):
            await self._truncate(event)

    # ------------------------------------------------------------------ session

    async def _update(self, config: SessionConfig) -> None:
        """Map what VITA can do onto a native ``session.update``; report each part it cannot do."""
        if config.type != "realtime":
            raise RealtimeProtocolError(ErrorCode.UNSUPPORTED, f"{config.type} sessions are not supported",
                                        "session.type")
        update: dict = {}
        generation: dict = {}
        vad: dict = {}
        unsupported: list[Unsupported] = []
        if "instructions" in config.model_fields_set:
            update["system_prompt"] = config.instructions or None
        if config.output_modalities is not None:
            generation["speak"] = "audio" in config.output_modalities
        if config.max_output_tokens is not None:
            generation["max_new_tokens"] = max_new_tokens(config.max_output_tokens)
        if config.audio is not None:
            update.update(self._audio_config(config.audio, vad, unsupported))
        if config.tools:
            unsupported.append(("session.tools", "tools and function calls are not supported"))
        if config.tool_choice not in (None, "auto", "none"):
            unsupported.append(("session.tool_choice", "tools and function calls are not supported"))
        if config.vita is not None:
            if config.vita.vad is not None:
                vad.update(config.vita.vad.model_dump(exclude_unset=True))
            if config.vita.generation is not None:
                generation.update(config.vita.generation.model_dump(exclude_unset=True))
        for param, message in unsupported:
            self._error(ErrorCode.UNSUPPORTED, message, param, self.encoding.event_id)
        try:
            native = SessionUpdate(**update, vad=VadSettings(**vad) if vad else None,
                                   generation=self.session.generation.model_copy(update=generation))
        except ValueError as exc:  # a mapped value out of VITA's range
            raise RealtimeProtocolError(ErrorCode.INVALID_EVENT, f"invalid session: {exc}", "session") from None
        await self.session.handle_event(native)

    def _audio_config(self, audio: AudioConfig, vad: dict, unsupported: list[Unsupported]) -> dict:
        """The native settings of ``session.audio`` (VAD fields into ``vad``)."""
        update: dict = {}
        audio_in, audio_out = audio.input, audio.output
        for name, part in (("input", audio_in), ("output", audio_out)):
            if part is not None and part.format is not None and (
                part.format.type not in (None, "audio/pcm") or part.format.rate not in (None, INPUT_SAMPLE_RATE)
            ):
                unsupported.append((f"session.audio.{name}.format", "only audio/pcm at 24000 Hz is supported"))
        if audio_in is not None:
            if audio_in.transcription:
                unsupported.append(("session.audio.input.transcription", "input transcription is not supported"))
            if audio_in.noise_reduction:
                unsupported.append(("session.audio.input.noise_reduction", "noise reduction is not supported"))
            if "turn_detection" in audio_in.model_fields_set:
                detection = audio_in.turn_detection
                if detection is None:
                    update["turn_detection"] = "manual"
                elif detection.type != "server_vad":
                    unsupported.append(("session.audio.input.turn_detection.type",
                                        f"{detection.type} is not supported: server_vad (webrtcvad) or null"))
                elif detection.create_response is False or detection.interrupt_response is False:
                    unsupported.append(("session.audio.input.turn_detection",
                                        "server_vad always creates a response and interrupts the current one"))
                else:
                    update["turn_detection"] = "vad"
                    if detection.threshold is not None:
                        vad["aggressiveness"] = min(3, int(detection.threshold * 3 + 0.5))
                    if detection.prefix_padding_ms is not None:
                        vad["preroll_ms"] = min(1_000, detection.prefix_padding_ms)
                    if detection.silence_duration_ms is not None:
                        vad["hangover_ms"] = min(5_000, max(50, detection.silence_duration_ms))
        if audio_out is not None:
            if audio_out.voice not in (None, VOICE):
                unsupported.append(("session.audio.output.voice", f"VITA-1.5 has one voice ({VOICE})"))
            if audio_out.speed not in (None, 1.0):
                unsupported.append(("session.audio.output.speed", "only speed 1.0 is supported"))
        return update

    # ------------------------------------------------------------------ user input

    async def _commit(self) -> None:
        """The input audio buffer becomes a user item (manual turns), or the VAD's utterance ends now."""
        if self.session.turn_detection != "manual":
            await self.session.handle_event(InputAudioCommit())
            return
        self.pending.audio.append(self.session.take_buffered_audio())
        for message in self.encoding.committed(new_id("item")):
            self.session.outgoing.put_message(message)

    async def _add_item(self, item: Item) -> None:
        """A user message (text, audio, images) joins the next turn."""
        if item.type != "message":
            raise RealtimeProtocolError(ErrorCode.UNSUPPORTED, f"{item.type} items are not supported", "item.type")
        if item.role != "user":
            raise RealtimeProtocolError(ErrorCode.UNSUPPORTED, "only user messages can be added (VITA keeps its own "
                                        "replies; for a system prompt set session.instructions)", "item.role")
        if not item.content:
            raise RealtimeProtocolError(ErrorCode.INVALID_EVENT, "the message has no content", "item.content")
        added = PendingInput()
        echo = []
        for part in item.content:
            if part.type == "input_text" and part.text:
                added.texts.append(part.text)
                echo.append({"type": "input_text", "text": part.text})
            elif part.type == "input_audio" and part.audio:
                added.audio.append(converted_audio(part.audio))
                echo.append({"type": "input_audio", "transcript": None})
            elif part.type == "input_image" and part.image_url:
                data = image_bytes(part.image_url)
                await asyncio.to_thread(decode_image, data)  # refuse a bad image now, not at the turn
                added.images.append(data)
                echo.append({"type": "input_image"})
            else:
                raise RealtimeProtocolError(ErrorCode.INVALID_EVENT if part.type.startswith("input_")
                                            else ErrorCode.UNSUPPORTED,
                                            f"content part {part.type} without its data, or not supported "
                                            "(input_text, input_audio, input_image)", "item.content")
        self.pending.audio += added.audio
        self.pending.texts += added.texts
        self.pending.images += added.images
        for message in self.encoding.item_added(self.encoding.user_item(new_id("item"), echo)):
            self.session.outgoing.put_message(message)

    def _create_response(self, params: ResponseParams | None) -> None:
        """The pending user items become one VITA turn, answered from now on."""
        generation = self.session.generation
        if params is not None:
            for param, asked in (("response.conversation", params.conversation not in (None, "auto")),
                                 ("response.input", params.input is not None),
                                 ("response.instructions", params.instructions is not None),
                                 ("response.tools", bool(params.tools))):
                if asked:
                    raise RealtimeProtocolError(ErrorCode.UNSUPPORTED, f"{param} is not supported: a response "
                                                "answers the conversation with the session's settings", param)
            voice = params.audio.output.voice if params.audio and params.audio.output else None
            if voice not in (None, VOICE):
                raise RealtimeProtocolError(ErrorCode.UNSUPPORTED, f"VITA-1.5 has one voice ({VOICE})",
                                            "response.audio.output.voice")
            override: dict = {}
            if params.output_modalities is not None:
                override["speak"] = "audio" in params.output_modalities
            if params.max_output_tokens is not None:
                override["max_new_tokens"] = max_new_tokens(params.max_output_tokens)
            generation = generation.model_copy(update=override)
        if not self.pending:
            raise RealtimeProtocolError(ErrorCode.INVALID_EVENT, "nothing to answer: commit the input audio buffer "
                                        "or add a user message first")
        pending, self.pending = self.pending, PendingInput()
        audio = np.concatenate(pending.audio) if pending.audio else None
        self.encoding.next_response_audio = generation.speak
        try:
            self.session.start_user_turn(audio, "\n".join(pending.texts) or None, pending.images, generation)
        finally:
            self.encoding.next_response_audio = None

    async def _truncate(self, event: TruncateEvent) -> None:
        """The client played only ``audio_end_ms`` of a reply: stop what is left of it. (The model's
        history keeps the whole reply: its cache cannot be cut at a point in the audio.)"""
        reply = self.encoding.response_for_item(event.item_id)
        if reply is None:
            raise RealtimeProtocolError(ErrorCode.INVALID_EVENT, f"no assistant item {event.item_id[:64]}",
                                        "item_id")
        if event.content_index != 0:
            raise RealtimeProtocolError(ErrorCode.INVALID_EVENT, "an assistant item has one content part (index 0)",
                                        "content_index")
        if reply is self.encoding.latest_response():
            try:
                await self.session.handle_event(ResponseCancel())
            except ProtocolError:
                pass  # it had already played out
        for message in self.encoding.truncated(event.item_id, event.content_index, event.audio_end_ms):
            self.session.outgoing.put_message(message)


def converted_audio(pcm16: bytes) -> np.ndarray:
    """24 kHz mono PCM16 of an ``input_audio`` part as 16 kHz int16 (at least ``MIN_COMMIT_MS``)."""
    converter = InputAudioConverter(INPUT_SAMPLE_RATE, 1)
    try:
        audio = np.concatenate([converter.convert(pcm16), converter.flush()])
    except InvalidAudio as exc:
        raise RealtimeProtocolError(ErrorCode.INVALID_AUDIO, str(exc), "item.content.audio") from None
    if len(audio) * 1000 < MIN_COMMIT_MS * MODEL_SAMPLE_RATE:
        raise RealtimeProtocolError(ErrorCode.NO_AUDIO, f"an input_audio part needs at least {MIN_COMMIT_MS} ms",
                                    "item.content.audio")
    return audio
