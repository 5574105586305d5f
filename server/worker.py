"""Model worker: assistant, engine and TTS in a thread with its own event loop.

The gateway's loop never runs model math. It calls the worker's thread-safe methods, which
schedule work on the worker loop; outputs go back through ``loop.call_soon_threadsafe``. Turns
of all sessions run as concurrent tasks on the worker loop, so the engine batches their decode
steps; media encoding (``MediaEncoder``) and speech synthesis (``SpeechService``) run in threads
of their own, batched across sessions, each on its own CUDA stream.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from pathlib import Path
from typing import Callable, Literal

import numpy as np
from PIL import Image
from server.audio_input import MODEL_SAMPLE_RATE
from server.images import decode_image
from server.protocol import GenerationSettings
from server.settings import ServerSettings
from server.turns import (
    AudioSegment,
    HistoryCleared,
    OutputCallback,
    TextDelta,
    TurnFailed,
    TurnFinished,
    TurnOutput,
    TurnRequest,
)
from tts.sentences import SentenceChunker
from tts.silence import LeadingSilenceTrimmer
from tts.service import SpeechService
from tts.synthesizer import CHUNK_SIZE, FIRST_SENTENCE_CHUNK_SIZE, Synthesizer
from vita.assistant import VitaAssistant
from vita.engine import Engine
from vita.generate import ReplyTextStream
from vita.media_encoder import MediaEncoder, MediaRequest, TurnMedia
from vita.prompt import Conversation, ReplyState
from vita.sampling import SamplingParams
from vita.tiny_checkpoint import ensure_tiny_checkpoint

log = logging.getLogger("vita.worker")

TTS_DIR_NAME = "vita_tts_ckpt"
STOP_TIMEOUT_S = 10.0
WARM_UP_SESSION = "warm-up"
WARM_UP_CODES = 60  # 1.5 s of audio: one full codec chunk with its padding


def resolve_checkpoint(settings: ServerSettings) -> tuple[Path, bool]:
    """Checkpoint folder to load and whether it is the tiny random one (generated once)."""
    if settings.checkpoint is not None:
        return settings.checkpoint, False
    return ensure_tiny_checkpoint(settings.cache_dir), True


class ConversationFull(Exception):
    """The engine refused a turn before its first token: the conversation no longer fits."""


class TurnTask:
    """Handle of one turn on the worker loop; ``cancel`` is safe from any thread."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self.task: asyncio.Task[None] | None = None
        self.cancelled = False
        self.undo: Callable[[], None] | None = None  # drops the turn from its conversation, once it has a reply

    def cancel(self, discard: bool = False) -> None:
        self._loop.call_soon_threadsafe(self._cancel_in_loop, discard)

    def _cancel_in_loop(self, discard: bool) -> None:
        self.cancelled = True
        if self.task is None:
            return
        self.task.cancel()
        if discard and self.task.done():
            self._undo(self.task)
        elif discard:  # once the turn has unwound, before the session's next turn starts
            self.task.add_done_callback(self._undo)

    def _undo(self, _: asyncio.Task[None]) -> None:
        if self.undo is not None:
            self.undo()


class ModelWorker:
    """Owns the model; implements ``server.turns.TurnRunner`` for the sessions."""

    assistant: VitaAssistant  # these four are loaded in the worker thread, then ``ready`` turns True
    engine: Engine
    media_encoder: MediaEncoder
    speech: SpeechService

    def __init__(self, settings: ServerSettings, checkpoint: Path, is_tiny: bool) -> None:
        self.settings = settings
        self.checkpoint = checkpoint
        self.is_tiny = is_tiny
        self.model_name = f"{checkpoint}{' (tiny random weights: replies are noise)' if is_tiny else ''}"
        self.ready = False
        self.load_error: str | None = None
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._run_loop, name="vita-worker", daemon=True)
        self._conversations: dict[str, Conversation] = {}
        self._turns: dict[str, asyncio.Task[None]] = {}

    # ------------------------------------------------------------------ lifecycle

    def start(self) -> None:
        """Start the worker thread; the model loads there (``ready`` turns True when done)."""
        self._thread.start()

    def stop(self) -> None:
        """Cancel every turn, stop the engine and the thread."""
        if not self._thread.is_alive():
            return
        future = asyncio.run_coroutine_threadsafe(self._shutdown(), self._loop)
        try:
            future.result(STOP_TIMEOUT_S)
        except Exception:
            log.exception("worker_shutdown_failed")
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(STOP_TIMEOUT_S)
        log.info("worker_stopped")

    def _run_loop(self) -> None:
        asyncio.set_event_loop(self._loop)
        self._loop.create_task(self._start_up())
        self._loop.run_forever()
        self._loop.close()

    async def _start_up(self) -> None:
        try:
            started = time.perf_counter()
            device = self.settings.resolved_device()
            self.assistant = VitaAssistant.load(self.checkpoint, device=device, dtype=self.settings.torch_dtype())
            self.engine = self.assistant.make_engine(
                max_sessions=self.settings.max_sessions, max_len=self.settings.max_context_tokens
            )
            if self.engine.use_graphs:  # capture now: a capture racing TTS kernels of the other thread fails
                self.engine.capture_graphs()
            self.media_encoder = MediaEncoder(self.assistant.model)
            # graphs and codec plans now, while no other thread launches CUDA work
            self.speech = SpeechService(Synthesizer.load(self.checkpoint / TTS_DIR_NAME, device=device),
                                        max_streams=self.settings.max_sessions)
            self.speech.start()
            await self._warm_up()
            self.ready = True
            log.info("model_loaded checkpoint=%s tiny=%s seconds=%.1f", self.checkpoint, self.is_tiny,
                     time.perf_counter() - started)
        except Exception as exc:
            self.load_error = f"{type(exc).__name__}: {exc}"
            log.exception("model_load_failed")

    async def _warm_up(self) -> None:
        """A quiet second of audio and a frame through every model, so the first user does not pay
        for lazy initialisation and a checkpoint that cannot answer fails before /readyz says ready.
        The LLM answers the audio alone: it prefills the audio system prompt once, and four video
        frames (1024 tokens) would not fit a small ``max_context_tokens``."""
        noise = np.random.default_rng(0).normal(0.0, 1e-3, MODEL_SAMPLE_RATE).astype(np.float32)  # 1 s
        frame = Image.new("RGB", (448, 448))
        media = await asyncio.wrap_future(self.media_encoder.submit(MediaRequest(noise, [frame])))
        conversation = self.assistant.new_conversation()
        embeds, prefix = self.assistant.engine_turn(self.engine, conversation, TurnMedia(audio=media.audio))
        async for _ in self.engine.generate(WARM_UP_SESSION, embeds, SamplingParams(max_tokens=2), prefix):
            pass
        self.engine.end_session(WARM_UP_SESSION)
        await self._speak_sentence("hello.", FIRST_SENTENCE_CHUNK_SIZE, lambda segment: None, max_tokens=WARM_UP_CODES)

    async def _shutdown(self) -> None:
        turns = list(self._turns.values())
        for task in turns:
            task.cancel()
        await asyncio.gather(*turns, return_exceptions=True)
        if self.ready:
            await self.engine.close()
            self.media_encoder.close()
            self.speech.close()

    # ------------------------------------------------------------------ sessions (any thread)

    def open_session(self, session_id: str, system_prompt: str | None) -> None:
        self._loop.call_soon_threadsafe(self._open, session_id, system_prompt)

    def reset_session(self, session_id: str, system_prompt: str | None) -> None:
        self._loop.call_soon_threadsafe(self._reset, session_id, system_prompt)

    def close_session(self, session_id: str) -> None:
        self._loop.call_soon_threadsafe(self._close, session_id)

    def start_turn(self, request: TurnRequest, on_output: OutputCallback) -> TurnTask:
        gateway_loop = asyncio.get_running_loop()

        def emit(output: TurnOutput) -> None:
            gateway_loop.call_soon_threadsafe(on_output, output)

        handle = TurnTask(self._loop)
        self._loop.call_soon_threadsafe(self._begin_turn, request, emit, handle)
        return handle

    # ------------------------------------------------------------------ worker loop side

    def _open(self, session_id: str, system_prompt: str | None) -> None:
        self._conversations[session_id] = self.assistant.new_conversation(system_prompt)

    def _restart_conversation(self, session_id: str) -> None:
        """Forget the history (engine cache included) but keep the session's system prompt."""
        system_prompt = self._conversations[session_id].system_prompt
        self.engine.end_session(session_id)
        self._conversations[session_id] = self.assistant.new_conversation(system_prompt)

    def _undo_turn(self, session_id: str, conversation: Conversation) -> None:
        """Drop the session's last turn, its reply included, from the engine and ``conversation``
        (unless the conversation was restarted since)."""
        if self._conversations.get(session_id) is conversation:
            self.engine.discard(session_id)
            self.assistant.end_reply(conversation, [])

    def _reset(self, session_id: str, system_prompt: str | None) -> None:
        self._close(session_id)
        self._open(session_id, system_prompt)

    def _close(self, session_id: str) -> None:
        task = self._turns.pop(session_id, None)
        if task is not None:
            task.cancel()
        self.engine.end_session(session_id)
        self._conversations.pop(session_id, None)

    def _begin_turn(self, request: TurnRequest, emit: OutputCallback, handle: TurnTask) -> None:
        if handle.cancelled:
            return
        session_id = request.session_id
        task = self._loop.create_task(self._run_turn(request, emit, handle, self._turns.get(session_id)))
        handle.task = task
        self._turns[session_id] = task
        task.add_done_callback(lambda done: self._forget_turn(session_id, done))

    def _forget_turn(self, session_id: str, task: asyncio.Task[None]) -> None:
        if self._turns.get(session_id) is task:
            del self._turns[session_id]

    async def _run_turn(
        self, request: TurnRequest, emit: OutputCallback, handle: TurnTask, previous: asyncio.Task[None] | None
    ) -> None:
        if previous is not None:  # the session's previous turn was cancelled: let it unwind first
            previous.cancel()
            await asyncio.gather(previous, return_exceptions=True)
        sentences: asyncio.Queue[str | None] = asyncio.Queue()
        speaker = self._loop.create_task(self._speak(sentences, emit)) if request.generation.speak else None
        try:
            try:
                text, state = await self._generate_reply(request, emit, handle, sentences)
            except ConversationFull as exc:
                log.info("conversation_full session=%s detail=%r", request.session_id, str(exc))
                self._restart_conversation(request.session_id)
                emit(HistoryCleared())
                text, state = await self._generate_reply(request, emit, handle, sentences)
            sentences.put_nowait(None)
            synthesis_s, samples = await speaker if speaker is not None else (0.0, 0)
            emit(TurnFinished(text=text, state=state, synthesis_seconds=synthesis_s, audio_samples=samples))
        except Exception as exc:
            log.exception("turn_failed session=%s response=%d", request.session_id, request.response_id)
            emit(TurnFailed(f"{type(exc).__name__}: {exc}"))
        finally:
            if speaker is not None and not speaker.done():
                speaker.cancel()

    async def _generate_reply(
        self, request: TurnRequest, emit: OutputCallback, handle: TurnTask, sentences: asyncio.Queue[str | None]
    ) -> tuple[str, Literal["answer", "not_addressed"]]:
        """Stream the reply text (to the client and, sentence by sentence, to the speaker).

        A reply VITA marks ☟ (not addressed to it) is stopped at once and says nothing, unless
        the session turned ``respect_not_addressed`` off.
        """
        frames = [decode_image(data) for data in request.frames]
        waveform = request.audio_16k.astype(np.float32) / 32768.0  # the encoder takes floats in [-1, 1]
        media = await asyncio.wrap_future(self.media_encoder.submit(MediaRequest(waveform, frames)))
        conversation = self._conversations[request.session_id]
        embeds, prefix = self.assistant.engine_turn(self.engine, conversation, media)
        reply = ReplyTextStream(self.assistant.tokenizer)
        chunker = SentenceChunker()
        text = ""

        def silenced() -> bool:
            return reply.state is ReplyState.NOT_ADDRESSED and request.generation.respect_not_addressed

        def publish(delta: str) -> None:
            nonlocal text
            text += delta
            emit(TextDelta(delta))
            for sentence in chunker.push(delta):
                sentences.put_nowait(sentence)

        try:
            params = sampling_params(request.generation)
            async for token_id in self.engine.generate(request.session_id, embeds, params, prefix):
                delta = reply.push(token_id)
                if silenced():
                    self.engine.cancel(request.session_id)
                    return "", "not_addressed"
                if delta:
                    publish(delta)
        except ValueError as exc:  # before any token, only the engine's "does not fit" refusal
            if reply.token_ids:
                raise
            raise ConversationFull(str(exc)) from exc
        finally:  # whatever the engine yielded is part of the conversation, even if cancelled
            self.assistant.end_reply(conversation, reply.token_ids)
            if reply.token_ids:  # until the turn is discarded
                handle.undo = lambda: self._undo_turn(request.session_id, conversation)
        tail = reply.flush()
        if silenced():
            return "", "not_addressed"
        if tail:
            publish(tail)
        for sentence in chunker.flush():
            sentences.put_nowait(sentence)
        return text, "answer"

    async def _speak(self, sentences: asyncio.Queue[str | None], emit: OutputCallback) -> tuple[float, int]:
        """Synthesise the sentences one after another as they arrive; every segment is emitted as
        soon as it exists, the reply's leading silence trimmed (``LeadingSilenceTrimmer``).

        Returns the wall time the sentences took from their start to their last segment (waits
        for a free synthesis slot included) and the number of samples made.
        """
        busy_s, samples, first_sentence = 0.0, 0, True
        trimmer = LeadingSilenceTrimmer()

        def play(pieces: list[np.ndarray]) -> None:
            nonlocal samples
            for piece in pieces:
                if len(piece):
                    samples += len(piece)
                    emit(AudioSegment(piece))

        while (sentence := await sentences.get()) is not None:
            chunk_size = FIRST_SENTENCE_CHUNK_SIZE if first_sentence else CHUNK_SIZE
            first_sentence = False
            started = time.perf_counter()
            await self._speak_sentence(sentence, chunk_size, lambda segment: play(trimmer.push(segment)))
            busy_s += time.perf_counter() - started
        play(trimmer.flush())
        return busy_s, samples

    async def _speak_sentence(
        self, sentence: str, chunk_size: int, on_segment: Callable[[np.ndarray], None], max_tokens: int = 1000
    ) -> None:
        """Synthesise one sentence; ``on_segment`` runs on the worker loop for each segment in order.
        Leaving early (cancellation) cancels the synthesis: no segment of it is handled after that."""
        done: asyncio.Future[None] = self._loop.create_future()
        stopped = False

        def segment_in_loop(segment: np.ndarray) -> None:
            if not stopped:
                on_segment(segment)

        def done_in_loop(error: BaseException | None) -> None:
            if done.done():
                return
            if error is None:
                done.set_result(None)
            else:
                done.set_exception(error)

        handle = self.speech.speak(
            self.assistant.speech_embeddings(sentence),
            codec_chunk_size=chunk_size,
            max_tokens=max_tokens,
            on_segment=lambda segment: self._loop.call_soon_threadsafe(segment_in_loop, segment),
            on_done=lambda error: self._loop.call_soon_threadsafe(done_in_loop, error),
        )
        try:
            await done
        finally:
            stopped = True
            handle.cancel()


def sampling_params(generation: GenerationSettings) -> SamplingParams:
    """The engine's sampling parameters for a session's generation settings."""
    return SamplingParams(
        temperature=generation.temperature,
        top_p=generation.top_p,
        top_k=generation.top_k,
        max_tokens=generation.max_new_tokens,
    )
