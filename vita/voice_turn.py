"""The turn pipeline of a voice chat: a turn's media -> reply text -> sentences -> speech.

`VoiceTurn.run` answers one turn of a `Chat` on the running event loop, through an `emit`
callback: text deltas as the engine streams the reply, audio segments as the speech service makes
them (sentence after sentence, the reply's leading silence trimmed across segments), then
`TurnFinished`, or `TurnFailed` on an error. A reply VITA marks ☟ (not addressed to it) is stopped
at once and says nothing, unless the turn ignores the mark; a conversation that outgrew the
context is restarted (`HistoryCleared`) and the turn answered in the new one. Cancelling the task
stops generation and synthesis at once: the task ends with both stopped and nothing is emitted
after that. The media encoder and the speech service bring their own threads; this is plain asyncio.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from contextlib import aclosing
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
from PIL import Image

from tts.async_speech import speak
from tts.sentences import SentenceChunker
from tts.service import SpeechService
from tts.silence import LeadingSilenceTrimmer
from tts.synthesizer import CHUNK_SIZE, FIRST_SENTENCE_CHUNK_SIZE
from vita.chat import Chat, ContextFull
from vita.media_encoder import MediaRequest, TurnMedia
from vita.prompt import Conversation, ReplyState
from vita.reply_text import ReplyTextStream
from vita.sampling import SamplingParams
from vita.turn_outputs import (
    AudioSegment,
    HistoryCleared,
    OutputCallback,
    TextDelta,
    TurnFailed,
    TurnFinished,
    TurnOutput,
    TurnStages,
)

log = logging.getLogger("vita.turn")


@dataclass(frozen=True)
class TurnInput:
    """What a turn brings: 16 kHz mono float audio in [-1, 1], its camera frames, typed text (any of
    the three may be absent, not all), and how to answer."""

    audio_16k: np.ndarray | None
    frames: Sequence[Image.Image] = ()
    text: str | None = None
    params: SamplingParams = field(default_factory=SamplingParams)
    speak: bool = True
    respect_not_addressed: bool = True  # a ☟ reply says nothing


MediaEncoderCall = Callable[[MediaRequest], Awaitable[TurnMedia]]


class VoiceTurn:
    """One turn of `chat`: `run` answers it, `undo` then drops it from the chat (speculative turns)."""

    def __init__(
        self, chat: Chat, turn: TurnInput, *, encode_media: MediaEncoderCall, speech: SpeechService,
        emit: OutputCallback,
    ) -> None:
        self.chat = chat
        self.turn = turn
        self.encode_media = encode_media
        self.speech = speech
        self.emit = emit
        self._ended = False
        self._replied_in: Conversation | None = None  # the conversation that holds this turn's reply
        self._stages: dict[str, float] = {}  # TurnStages fields reached so far -> time.monotonic()

    def _reached(self, stage: str) -> None:
        """Note the first time the turn reaches `stage` (called per audio segment: no clock read after that)."""
        if stage not in self._stages:
            self._stages[stage] = time.monotonic()

    async def run(self) -> None:
        """Answer the turn through `emit`, last with `TurnFinished` or `TurnFailed` (unless cancelled)."""
        self._reached("started")
        sentences: asyncio.Queue[str | None] = asyncio.Queue()
        speaker = asyncio.create_task(self._speak(sentences)) if self.turn.speak else None
        try:
            media = TurnMedia()
            if self.turn.audio_16k is not None or self.turn.frames:
                media = await self.encode_media(MediaRequest(self.turn.audio_16k, self.turn.frames))
            self._reached("media_encoded")
            try:
                text, state, output_tokens = await self._reply(media, sentences)
            except ContextFull as exc:
                log.info("conversation_full session=%s detail=%r", self.chat.session_id, str(exc))
                self.chat.restart()
                self._emit(HistoryCleared())
                text, state, output_tokens = await self._reply(media, sentences)
            sentences.put_nowait(None)
            synthesis_s, samples = await speaker if speaker is not None else (0.0, 0)
            self._emit(TurnFinished(text=text, state=state, synthesis_seconds=synthesis_s, audio_samples=samples,
                                    stages=TurnStages(**self._stages), input_tokens=self.chat.last_input_tokens,
                                    output_tokens=output_tokens))
        except Exception as exc:
            log.exception("turn_failed session=%s", self.chat.session_id)
            self._emit(TurnFailed(f"{type(exc).__name__}: {exc}"))
        finally:
            self._ended = True
            if speaker is not None and not speaker.done():  # cancelled or failed: its synthesis stops too
                speaker.cancel()

    def undo(self) -> None:
        """Drop the turn and its reply from the chat, as if never asked; call it once `run` has ended.
        Nothing to do if it got no reply or the chat restarted since."""
        replied_in, self._replied_in = self._replied_in, None
        if replied_in is not None:
            self.chat.undo(replied_in)

    def _emit(self, output: TurnOutput) -> None:
        if not self._ended:  # a segment arriving as the turn is cancelled goes nowhere
            self.emit(output)

    async def _reply(
        self, media: TurnMedia, sentences: asyncio.Queue[str | None]
    ) -> tuple[str, Literal["answer", "not_addressed"], int]:
        """Stream the reply text to `emit` and, sentence by sentence, to `sentences`; a ☟ reply is
        stopped at once and says nothing, unless the turn ignores the mark. Returns the text, the
        state and how many ids the engine yielded."""
        reply = ReplyTextStream(self.chat.assistant.tokenizer)
        chunker = SentenceChunker()
        text, count = "", 0

        def silenced() -> bool:
            return reply.state is ReplyState.NOT_ADDRESSED and self.turn.respect_not_addressed

        def publish(delta: str) -> None:
            nonlocal text
            text += delta
            self._emit(TextDelta(delta))
            for sentence in chunker.push(delta):
                self._reached("first_sentence")
                sentences.put_nowait(sentence)

        conversation = self.chat.conversation
        async with aclosing(self.chat.reply(media, self.turn.params, self.turn.text)) as token_ids:
            async for token_id in token_ids:
                if self._replied_in is None:
                    self._reached("first_token")
                self._replied_in = conversation
                count += 1
                delta = reply.push(token_id)
                if silenced():
                    return "", "not_addressed", count
                if delta:
                    publish(delta)
        tail = reply.flush()
        if silenced():
            return "", "not_addressed", count
        if tail:
            publish(tail)
        for sentence in chunker.flush():
            self._reached("first_sentence")
            sentences.put_nowait(sentence)
        return text, "answer", count

    async def _speak(self, sentences: asyncio.Queue[str | None]) -> tuple[float, int]:
        """Synthesise the sentences one after another as they arrive; every segment is emitted as soon
        as it exists, the reply's leading silence trimmed (`LeadingSilenceTrimmer`).

        Returns the wall time the sentences took from their start to their last segment (waits for a
        free synthesis slot included) and the number of samples made.
        """
        busy_s, samples, chunk_size = 0.0, 0, FIRST_SENTENCE_CHUNK_SIZE
        rows_per_token = self.chat.assistant.speech_rows_per_token
        max_rows = self.speech.max_text_rows // rows_per_token * rows_per_token
        trimmer = LeadingSilenceTrimmer()
        timeline: dict[str, float] = {}  # the first utterance's, from the speech service

        def heard(segment: np.ndarray) -> None:
            self._reached("speech_first_segment")
            play(trimmer.push(segment))

        def play(pieces: list[np.ndarray]) -> None:
            nonlocal samples
            for piece in pieces:
                if len(piece):
                    self._reached("first_audio")
                    samples += len(piece)
                    self._emit(AudioSegment(piece))

        while (sentence := await sentences.get()) is not None:
            started = time.perf_counter()
            stream = self.speech.input_stream  # CUDA: the TTS waits for this lookup only, not the LLM's queued steps
            embeddings = self.chat.assistant.speech_embeddings(sentence, stream)
            for start in range(0, len(embeddings), max_rows):  # a unit too long for one utterance: cut between tokens
                await speak(self.speech, embeddings[start : start + max_rows], heard,
                            codec_chunk_size=chunk_size, embeddings_stream=stream,
                            timeline=timeline if chunk_size == FIRST_SENTENCE_CHUNK_SIZE else None)
                chunk_size = CHUNK_SIZE
            busy_s += time.perf_counter() - started
        play(trimmer.flush())
        for event, at in timeline.items():  # the service wrote them before the utterance ended
            self._stages[f"speech_{event}"] = at
        return busy_s, samples
