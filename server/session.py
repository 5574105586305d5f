"""One websocket user: protocol state machine, VAD or manual turns, camera frames, barge-in, timings.

The session lives on the gateway's event loop and never runs model math: turns go to the
worker, whose outputs come back through ``_on_output`` on this loop. A turn starts
speculatively at a pause in speech (``vad.speculative_ms``): the client sees nothing of it until
the hangover confirms the end of the utterance, and its work is discarded if speech resumes.

It speaks the native protocol (``server.protocol``): ``handle_text``/``handle_bytes`` parse
``/ws`` frames into ``handle_event``, and every server event goes to ``outgoing``. Another
protocol adapts to it (``server.realtime``: client events in through ``handle_event`` and the
manual-turn methods, the session's events translated on their way out).
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections import deque
from dataclasses import dataclass, field

import numpy as np
from server.audio_input import MODEL_SAMPLE_RATE, InputAudioConverter, InvalidAudio
from server.error_budget import ErrorBudget, Verdict
from server.images import decode_image
from server.metrics import ServerMetrics
from server.outgoing import OutgoingQueue
from server.seats import Seats
from server.protocol import (
    MAX_AUDIO_FRAME_BYTES,
    MAX_BUFFERED_AUDIO_MS,
    MIN_COMMIT_MS,
    OUTPUT_SAMPLE_RATE,
    ClientEvent,
    ErrorCode,
    ErrorEvent,
    GenerationSettings,
    InputAudio,
    InputAudioClear,
    InputAudioCleared,
    InputAudioCommit,
    InputText,
    ProtocolError,
    ResponseCancel,
    ResponseDone,
    ResponseInterrupted,
    ResponseStarted,
    ResponseTextDelta,
    ResponseTimings,
    ResponseUsage,
    ServerEvent,
    SessionCleared,
    SessionReady,
    SessionReset,
    SessionStart,
    SessionUpdate,
    SessionUpdated,
    SpeechDiscarded,
    SpeechStarted,
    SpeechStopped,
    TurnStageTimings,
    TurnDetection,
    VadSettings,
    VideoFrame,
    parse_client_event,
)
from server.turns import TurnHandle, TurnRequest, TurnRunner
from server import vad
from vita.image_tiles import sample_frames
from vita.media_encoder import VIDEO_FRAMES
from vita.turn_outputs import AudioSegment, HistoryCleared, TextDelta, TurnFailed, TurnFinished, TurnOutput

log = logging.getLogger("vita.session")

VIDEO_WINDOW_S = 1.0
MAX_BUFFERED_FRAMES = 30  # a second of 30 fps video; older ones fall out of the window anyway


@dataclass
class ActiveResponse:
    """A reply being generated: its request, worker handle and measured times (monotonic s).

    A speculative one holds its outputs in ``held`` until the end of the turn is confirmed,
    which sets ``end_of_speech``.
    """

    request: TurnRequest
    handle: TurnHandle
    end_of_speech: float = 0.0
    held: list[TurnOutput] = field(default_factory=list)
    first_text: float | None = None
    first_audio: float | None = None
    segments: int = 0

    @property
    def response_id(self) -> int:
        return self.request.response_id


class Session:
    """Protocol state of one connection; ``handle_text``/``handle_bytes`` take client frames.

    ``closing`` is set by a fatal error: the connection is to be closed with that reason.
    """

    def __init__(self, runner: TurnRunner, outgoing: OutgoingQueue, metrics: ServerMetrics, seats: Seats) -> None:
        self.session_id = uuid.uuid4().hex[:12]
        self.runner = runner
        self.outgoing = outgoing
        self.metrics = metrics
        self.seats = seats
        self.started = False
        self.closing: ErrorCode | None = None
        self._errors = ErrorBudget()
        self._last_error = (ErrorCode.INTERNAL_ERROR, "")  # the latest client error, for the summary
        self._summary: asyncio.TimerHandle | None = None  # reports suppressed errors at the window's end
        self._last_activity = time.monotonic()  # speech, a turn, or an event other than audio/video
        self.system_prompt: str | None = None
        self.turn_detection: TurnDetection = "vad"
        self._manual = False  # turn detection in effect: switches between utterances
        self._buffer: list[np.ndarray] = []  # 16 kHz audio since the last turn, in manual mode
        self._buffered_samples = 0
        self.vad_settings = VadSettings()
        self.generation = GenerationSettings()
        self._converter: InputAudioConverter | None = None
        self._detector: vad.TurnDetector | None = None
        self._frames: deque[tuple[float, bytes]] = deque(maxlen=MAX_BUFFERED_FRAMES)
        self._active: ActiveResponse | None = None
        self._speculative: ActiveResponse | None = None  # started at a pause in speech, unseen yet
        self._last_response_id = 0
        self._playing_id: int | None = None  # the reply being generated or played, until interrupted
        self._playback_until = 0.0  # when the client will have played the audio of it sent so far

    # ------------------------------------------------------------------ client input

    async def handle_text(self, text: str) -> None:
        """One JSON text frame; a bad one is answered with an ``error`` event."""
        try:
            await self.handle_event(parse_client_event(text))
        except ProtocolError as exc:
            self.client_error(exc.code, exc.message)

    async def handle_event(self, event: ClientEvent) -> None:
        """One client event; raises ``ProtocolError`` for one that cannot be accepted."""
        if not isinstance(event, (InputAudio, VideoFrame)):
            self._last_activity = time.monotonic()
        if isinstance(event, SessionStart):
            self._start(event)
        elif not self.started:
            raise ProtocolError(ErrorCode.SESSION_NOT_STARTED, f"send session.start before {event.type}")
        elif isinstance(event, InputAudio):
            self._take_audio(event.audio)
        elif isinstance(event, VideoFrame):
            await self._take_frame(event.image)
        elif isinstance(event, SessionUpdate):
            self._update(event)
        elif isinstance(event, InputAudioCommit):
            self._commit()
        elif isinstance(event, InputAudioClear):
            self.send(InputAudioCleared(audio_ms=self.clear_audio()))
        elif isinstance(event, InputText):
            self.start_user_turn(None, event.text, self._recent_frames(time.monotonic()))
        elif isinstance(event, ResponseCancel):
            self._cancel()
        elif isinstance(event, SessionReset):
            self._reset()

    def handle_bytes(self, data: bytes) -> None:
        """One binary frame of PCM16 input audio; a bad one is answered with an ``error`` event."""
        try:
            if not self.started:
                raise ProtocolError(ErrorCode.SESSION_NOT_STARTED, "send session.start before audio")
            if len(data) > MAX_AUDIO_FRAME_BYTES:
                raise ProtocolError(
                    ErrorCode.FRAME_TOO_LARGE, f"audio frame of {len(data)} bytes exceeds {MAX_AUDIO_FRAME_BYTES}"
                )
            self._take_audio(data)
        except ProtocolError as exc:
            self.client_error(exc.code, exc.message)

    def send(self, event: ServerEvent) -> None:
        """Queue an event for the client (events are never dropped)."""
        self.outgoing.put_event(event)

    def send_error(
        self, code: ErrorCode, message: str, fatal: bool = False, response_id: int | None = None, suppressed: int = 0
    ) -> None:
        """Count, log and send an ``error`` event."""
        self.metrics.errors.labels(code.value).inc()
        log.info("error session=%s code=%s message=%r suppressed=%d", self.session_id, code.value, message, suppressed)
        self.send(ErrorEvent(code=code, message=message, fatal=fatal, response_id=response_id, suppressed=suppressed))

    def client_error(self, code: ErrorCode, message: str) -> None:
        """An error caused by what the client sent, under the session's ``ErrorBudget``."""
        verdict = self._errors.admit()
        if verdict is Verdict.SEND:
            self.send_error(code, message, suppressed=self._errors.take_suppressed())
        elif verdict is Verdict.SUPPRESS:
            self.metrics.errors.labels(code.value).inc()
            self._last_error = (code, message)
            if self._summary is None:
                delay = max(0.0, self._errors.window_end - time.monotonic())
                self._summary = asyncio.get_running_loop().call_later(delay, self._report_suppressed)
        else:
            self.metrics.errors.labels(code.value).inc()
            self.fail(ErrorCode.TOO_MANY_ERRORS, f"closing: errors keep coming faster than "
                      f"{self._errors.events_per_s} a second (the last: {message})")

    def _report_suppressed(self) -> None:
        """The summary event of the errors suppressed in the window that ended."""
        self._summary = None
        if self._errors.suppressed and self.closing is None:
            count = self._errors.take_suppressed()
            code, message = self._last_error
            log.info("error_summary session=%s code=%s suppressed=%d", self.session_id, code.value, count)
            self.send(ErrorEvent(code=code, suppressed=count, message=f"{count} more errors were not sent "
                                 f"(at most {self._errors.events_per_s} a second); the last: {message}"))

    def fail(self, code: ErrorCode, message: str) -> None:
        """Send a fatal error (with any suppressed count) and mark the session for closing."""
        if self.closing is None:
            self.closing = code
            self.send_error(code, message, fatal=True, suppressed=self._errors.take_suppressed())

    def idle_since(self) -> float:
        """Monotonic time since which nothing happened (now while speech or a reply is under way)."""
        if self._active is not None or (self._detector is not None and self._detector.speaking):
            return time.monotonic()
        return max(self._last_activity, self._playback_until)

    def _start(self, event: SessionStart) -> None:
        if self.started:
            raise ProtocolError(ErrorCode.SESSION_ALREADY_STARTED, "session.start was already received")
        if not self.seats.take(self.session_id):
            self.fail(ErrorCode.SERVER_FULL, f"server is full ({self.seats.limit} sessions)")
            return
        self._converter = InputAudioConverter(event.sample_rate, event.channels)
        self.system_prompt = event.system_prompt
        self.turn_detection = event.turn_detection or "vad"
        self._manual = self.turn_detection == "manual"
        self.vad_settings = event.vad or VadSettings()
        self.generation = event.generation or GenerationSettings()
        self._detector = vad.TurnDetector(self.vad_settings)
        self.runner.open_session(self.session_id, self.system_prompt)
        self.started = True
        log.info(
            "session_start session=%s rate=%d channels=%d", self.session_id, event.sample_rate, event.channels
        )
        self.send(
            SessionReady(
                session_id=self.session_id,
                input_sample_rate=event.sample_rate,
                input_channels=event.channels,
                system_prompt=self.system_prompt,
                turn_detection=self.turn_detection,
                vad=self.vad_settings,
                generation=self.generation,
                model=self.runner.model_name,
            )
        )

    def _take_audio(self, data: bytes) -> None:
        assert self._converter is not None and self._detector is not None
        try:
            samples = self._converter.convert(data)
        except InvalidAudio as exc:
            raise ProtocolError(ErrorCode.INVALID_AUDIO, str(exc)) from None
        if self._manual:
            if (self._buffered_samples + len(samples)) * 1000 > MAX_BUFFERED_AUDIO_MS * MODEL_SAMPLE_RATE:
                raise ProtocolError(ErrorCode.AUDIO_BUFFER_FULL, f"more than {MAX_BUFFERED_AUDIO_MS} ms of audio "
                                    "since the last turn: commit or clear it")
            self._buffer.append(samples)
            self._buffered_samples += len(samples)
            return
        for event in self._detector.feed(samples):
            self._on_vad(event)
        self._refresh_detector()

    def _refresh_detector(self) -> None:
        """New VAD settings and turn detection take effect between utterances, never cutting one short;
        audio buffered in manual mode goes to the VAD when it is switched back on."""
        assert self._detector is not None
        if self._detector.speaking:
            return
        if self._detector.settings != self.vad_settings:
            self._detector = vad.TurnDetector(self.vad_settings)
        self._manual = self.turn_detection == "manual"
        if not self._manual and self._buffer:
            buffered = np.concatenate(self._buffer)
            self._buffer, self._buffered_samples = [], 0
            for event in self._detector.feed(buffered):
                self._on_vad(event)

    def take_buffered_audio(self) -> np.ndarray:
        """The 16 kHz audio received since the last turn (manual mode), which ends the buffer;
        ``ProtocolError`` ``no_audio`` when there is too little (it stays buffered)."""
        duration_ms = self._buffered_samples * 1000 // MODEL_SAMPLE_RATE
        if duration_ms < MIN_COMMIT_MS:
            raise ProtocolError(ErrorCode.NO_AUDIO, f"{duration_ms} ms of audio since the last turn: "
                                f"a turn needs at least {MIN_COMMIT_MS} ms")
        audio = np.concatenate(self._buffer)
        self._buffer, self._buffered_samples = [], 0
        return audio

    def clear_audio(self) -> int:
        """Drop the audio since the last turn (manual) or the utterance in progress (VAD, its
        speculative reply with it); returns how many ms were dropped."""
        assert self._detector is not None
        dropped_ms = self._buffered_samples * 1000 // MODEL_SAMPLE_RATE
        self._buffer, self._buffered_samples = [], 0
        if self._detector.speaking:
            self._discard_speculation()
            ended = self._detector.end_now()
            dropped_ms += 0 if ended is None else ended.duration_ms
        self._detector = vad.TurnDetector(self.vad_settings)
        self._refresh_detector()
        return dropped_ms

    def _commit(self) -> None:
        """The client ended its turn: the audio buffered (manual) or the utterance in progress (VAD)."""
        assert self._detector is not None
        if self._manual:
            self.start_user_turn(self.take_buffered_audio(), None, self._recent_frames(time.monotonic()))
            return
        ended = self._detector.end_now()
        if ended is None:
            raise ProtocolError(ErrorCode.NO_AUDIO, "input_audio.commit: no speech in progress")
        self._on_vad(ended)
        self._refresh_detector()

    async def _take_frame(self, data: bytes) -> None:
        await asyncio.to_thread(decode_image, data)  # refuse a bad image now, not at the turn
        now = time.monotonic()
        self._frames.append((now, data))
        while self._frames and self._frames[0][0] < now - VIDEO_WINDOW_S:
            self._frames.popleft()

    def _update(self, event: SessionUpdate) -> None:
        if event.turn_detection is not None:
            self.turn_detection = event.turn_detection
        if event.vad is not None:
            self.vad_settings = self.vad_settings.model_copy(update=event.vad.model_dump(exclude_unset=True))
        self._refresh_detector()
        if event.generation is not None:
            self.generation = self.generation.model_copy(update=event.generation.model_dump(exclude_unset=True))
        if "system_prompt" in event.model_fields_set and event.system_prompt != self.system_prompt:
            self.system_prompt = event.system_prompt
            self._discard_speculation()
            self._interrupt("reset")
            self.runner.reset_session(self.session_id, self.system_prompt)
        self.send(SessionUpdated(system_prompt=self.system_prompt, turn_detection=self.turn_detection,
                                 vad=self.vad_settings, generation=self.generation))

    def _cancel(self) -> None:
        if not self._interrupt("cancel"):
            raise ProtocolError(ErrorCode.NO_RESPONSE, "response.cancel: no reply is being generated or played")

    def _reset(self) -> None:
        self._discard_speculation()
        self._interrupt("reset")
        self.runner.reset_session(self.session_id, self.system_prompt)
        self._frames.clear()
        self._buffer, self._buffered_samples = [], 0
        self._detector = vad.TurnDetector(self.vad_settings)
        self._refresh_detector()
        self.send(SessionCleared())

    # ------------------------------------------------------------------ turns

    def _on_vad(self, event: vad.VadEvent) -> None:
        self._last_activity = time.monotonic()
        if isinstance(event, vad.SpeechStart):
            self.send(SpeechStarted(audio_ms=event.audio_ms))
            self._interrupt("barge_in")
        elif isinstance(event, vad.SpeechPaused):
            self._speculate(event.audio)
        elif isinstance(event, vad.SpeechResumed):
            self._discard_speculation()
        elif isinstance(event, vad.SpeechEnd):
            self.send(SpeechStopped(audio_ms=event.audio_ms, duration_ms=event.duration_ms, truncated=event.truncated))
            self._respond(event.audio)
        else:
            assert isinstance(event, vad.SpeechDiscarded)
            self.send(SpeechDiscarded(audio_ms=event.audio_ms, duration_ms=event.duration_ms))

    def _recent_frames(self, now: float) -> list[bytes]:
        """The frames of the last second that the model will see, picked by vita's rule (only
        those are decoded for the turn)."""
        recent = [image for t, image in self._frames if t >= now - VIDEO_WINDOW_S]
        return recent if len(recent) <= VIDEO_FRAMES else sample_frames(recent, min_frames=1, max_frames=VIDEO_FRAMES)

    def _start_turn(
        self, audio_16k: np.ndarray | None, text: str | None = None, frames: list[bytes] | None = None,
        generation: GenerationSettings | None = None,
    ) -> ActiveResponse:
        """Hand the turn to the worker as the next reply; nothing is sent to the client. Without
        ``frames``, those of the last second go with it."""
        if frames is None:
            frames = self._recent_frames(time.monotonic())
        elif len(frames) > VIDEO_FRAMES:
            frames = sample_frames(frames, min_frames=1, max_frames=VIDEO_FRAMES)
        request = TurnRequest(self.session_id, self._last_response_id + 1, audio_16k, frames,
                              generation or self.generation, text)
        reply: ActiveResponse  # the worker calls back later, on this loop
        handle = self.runner.start_turn(request, lambda output: self._on_output(reply, output))
        reply = ActiveResponse(request, handle)
        return reply

    def _speculate(self, audio_16k: np.ndarray) -> None:
        """A pause in speech: prepare the reply to the utterance so far (with the camera frames of
        the second before the pause), holding its outputs."""
        self._speculative = self._start_turn(audio_16k)
        self.metrics.speculative_turns.labels("started").inc()
        log.info("turn_speculative session=%s audio_ms=%d", self.session_id,
                 len(audio_16k) * 1000 // MODEL_SAMPLE_RATE)

    def _discard_speculation(self) -> None:
        """Speech resumed (or the conversation changed): the worker forgets the speculative turn."""
        reply, self._speculative = self._speculative, None
        if reply is None:
            return
        reply.handle.cancel(discard=True)
        self.metrics.speculative_turns.labels("discarded").inc()
        if any(isinstance(output, HistoryCleared) for output in reply.held):
            self.send(SessionCleared(reason="context_full"))
        log.info("turn_speculative_discarded session=%s held=%d", self.session_id, len(reply.held))

    def start_user_turn(
        self, audio_16k: np.ndarray | None, text: str | None, frames: list[bytes],
        generation: GenerationSettings | None = None,
    ) -> None:
        """A turn the client ended itself (audio, typed text and images, any of them): any reply
        still generated or played is interrupted, and this one goes out from now on."""
        self._last_activity = time.monotonic()
        self._discard_speculation()
        self._interrupt("barge_in")
        self._release(self._start_turn(audio_16k, text, frames, generation))

    def _respond(self, audio_16k: np.ndarray) -> None:
        """The VAD confirmed the end of the turn: its reply (the speculative one, unless the
        generation settings changed since the pause) goes out from now on, held outputs first."""
        if self._active is not None:
            self._interrupt("barge_in")
        if self._speculative is not None and self._speculative.request.generation != self.generation:
            self._discard_speculation()
        reply, self._speculative = self._speculative, None
        if reply is None:
            reply = self._start_turn(audio_16k)
        else:
            self.metrics.speculative_turns.labels("confirmed").inc()
        self._release(reply)

    def _release(self, reply: ActiveResponse) -> None:
        """The reply becomes the active one: the client is told, held outputs go out first."""
        audio_16k = reply.request.audio_16k
        self._last_response_id = self._playing_id = reply.response_id
        self._playback_until = 0.0
        self._active = reply
        reply.end_of_speech = time.monotonic()
        self.send(ResponseStarted(response_id=reply.response_id, video_frames=len(reply.request.frames)))
        log.info("turn_start session=%s response=%d audio_ms=%d text_chars=%d frames=%d held=%d", self.session_id,
                 reply.response_id, 0 if audio_16k is None else len(audio_16k) * 1000 // MODEL_SAMPLE_RATE,
                 len(reply.request.text or ""), len(reply.request.frames), len(reply.held))
        held, reply.held = reply.held, []
        for output in held:
            self._on_output(reply, output)

    def _interrupt(self, reason: str) -> bool:
        """Stop the reply being generated or played (if any) and drop its queued audio; the
        client is told to drop what it has queued too. Returns whether there was one."""
        active, self._active = self._active, None
        response_id, self._playing_id = self._playing_id, None
        if active is not None:
            active.handle.cancel()
            self.metrics.turns.labels("interrupted").inc()
        elif response_id is None or time.monotonic() >= self._playback_until:
            return False
        self.outgoing.discard_audio(response_id)
        self.send(ResponseInterrupted(response_id=response_id, reason=reason))
        log.info("turn_interrupted session=%s response=%d reason=%s generating=%s", self.session_id, response_id,
                 reason, active is not None)
        return True

    def _on_output(self, reply: ActiveResponse, output: TurnOutput) -> None:
        if reply is self._speculative:
            reply.held.append(output)
            return
        if isinstance(output, HistoryCleared):  # the worker restarted the conversation, whatever became of the reply
            self.send(SessionCleared(reason="context_full"))
            return
        active = self._active
        if active is not reply:
            return  # a reply interrupted (the client was told) or discarded: nothing more of it goes out
        response_id = active.response_id
        now = time.monotonic()
        if isinstance(output, TextDelta):
            if active.first_text is None:
                active.first_text = now
                self.metrics.first_text_seconds.observe(now - active.end_of_speech)
            self.send(ResponseTextDelta(response_id=response_id, delta=output.text))
        elif isinstance(output, AudioSegment):
            if active.first_audio is None:
                active.first_audio = now
                self.metrics.first_audio_seconds.observe(now - active.end_of_speech)
            if not self.outgoing.put_audio(response_id, active.segments, output.pcm.astype("<i2").tobytes()):
                self.metrics.audio_dropped_segments.inc()
            active.segments += 1
        elif isinstance(output, TurnFinished):
            self._finish(active, output, now)
        else:
            assert isinstance(output, TurnFailed)
            self._active = None
            self._last_activity = now
            self.metrics.turns.labels("error").inc()
            message = f"reply {response_id} failed: {output.message}"
            self.send_error(ErrorCode.INTERNAL_ERROR, message, response_id=response_id)

    def _finish(self, active: ActiveResponse, output: TurnFinished, now: float) -> None:
        self._active = None
        self._last_activity = now
        audio_s = output.audio_samples / OUTPUT_SAMPLE_RATE
        rtf = output.synthesis_seconds / audio_s if audio_s > 0 else None
        if rtf is not None:
            self.metrics.real_time_factor.observe(rtf)
        self.metrics.turns.labels(output.state).inc()

        def ms_since_end(t: float | None) -> float | None:
            return None if t is None else round((t - active.end_of_speech) * 1000, 1)

        timings = ResponseTimings(
            end_of_speech_to_first_text_ms=ms_since_end(active.first_text),
            end_of_speech_to_first_audio_ms=ms_since_end(active.first_audio),
            total_ms=round((now - active.end_of_speech) * 1000, 1),
            audio_ms=round(audio_s * 1000, 1),
            real_time_factor=None if rtf is None else round(rtf, 3),
            stages=TurnStageTimings(**{f"{name}_ms": ms_since_end(t) for name, t in vars(output.stages).items()}),
        )
        self.send(
            ResponseDone(
                response_id=active.response_id,
                text=output.text,
                state=output.state,
                audio_segments=active.segments,
                timings=timings,
                usage=ResponseUsage(input_tokens=output.input_tokens, output_tokens=output.output_tokens),
            )
        )
        log.info("turn_done session=%s response=%d state=%s first_text_ms=%s first_audio_ms=%s rtf=%s",
                 self.session_id, active.response_id, output.state, timings.end_of_speech_to_first_text_ms,
                 timings.end_of_speech_to_first_audio_ms, timings.real_time_factor)

    # ------------------------------------------------------------------ playback and teardown

    def audio_sent(self, response_id: int, samples: int) -> None:
        """The writer sent a reply segment: the client plays it after what it already has."""
        if response_id == self._playing_id:
            now = time.monotonic()
            self._playback_until = max(self._playback_until, now) + samples / OUTPUT_SAMPLE_RATE

    def close(self) -> None:
        """Connection gone: stop any reply (counted as aborted), free the worker's state of this
        session and its seat."""
        active, self._active = self._active, None
        if active is not None:
            active.handle.cancel()
            self.metrics.turns.labels("aborted").inc()
        self._discard_speculation()
        if self._summary is not None:
            self._summary.cancel()
        if self.started:
            self.runner.close_session(self.session_id)
        self.seats.free(self.session_id)
