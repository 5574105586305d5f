"""Model worker: assistant, engine and TTS in a thread with its own event loop.

The gateway's loop never runs model math. It calls the worker's thread-safe methods, which
schedule work on the worker loop; outputs go back in batches (``LoopBridge``: one wake-up of the
gateway loop per worker loop iteration, not one per text delta). Each
session is a ``vita.chat.Chat``; each turn a ``vita.voice_turn.VoiceTurn`` run as a task on the
worker loop, so the engine batches the decode steps of all sessions; media encoding
(``MediaEncoder``) and speech synthesis (``SpeechService``) run in threads of their own, batched
across sessions, each on its own CUDA stream.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from contextlib import aclosing
from pathlib import Path

import numpy as np
from PIL import Image
from server.audio_input import MODEL_SAMPLE_RATE
from server.images import decode_image
from server.loop_bridge import LoopBridge
from server.protocol import GenerationSettings
from server.settings import ServerSettings
from server.turns import TurnRequest
from tts.async_speech import speak
from tts.config import TTS_DIR
from tts.service import SpeechService
from tts.synthesizer import FIRST_SENTENCE_CHUNK_SIZE, Synthesizer
from vita.assistant import VitaAssistant
from vita.chat import Chat
from vita.engine import Engine
from vita.media_encoder import MediaEncoder, MediaRequest, TurnMedia
from vita.sampling import SamplingParams
from vita.tiny_checkpoint import ensure_tiny_checkpoint
from vita.turn_outputs import OutputCallback, TurnFailed, TurnOutput
from vita.voice_turn import TurnInput, VoiceTurn

log = logging.getLogger("vita.worker")

STOP_TIMEOUT_S = 10.0
WARM_UP_SESSION = "warm-up"
WARM_UP_CODES = 60  # 1.5 s of audio: one full codec chunk with its padding


def resolve_checkpoint(settings: ServerSettings) -> tuple[Path, bool]:
    """Checkpoint folder to load and whether it is the tiny random one (generated once)."""
    if settings.checkpoint is not None:
        return settings.checkpoint, False
    return ensure_tiny_checkpoint(settings.cache_dir), True


class TurnTask:
    """Handle of one turn on the worker loop; ``cancel`` is safe from any thread."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self.task: asyncio.Task[None] | None = None
        self.cancelled = False
        self.turn: VoiceTurn | None = None  # once the session's previous turn has unwound

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
        if self.turn is not None:
            self.turn.undo()


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
        # the folder's name only: users see it, the path stays in the server log
        self.model_name = f"{checkpoint.name}{' (tiny random weights: replies are noise)' if is_tiny else ''}"
        self.ready = False
        self.load_error: str | None = None
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._run_loop, name="vita-worker", daemon=True)
        self._chats: dict[str, Chat] = {}
        self._turns: dict[str, asyncio.Task[None]] = {}
        self._bridge: LoopBridge | None = None  # outputs to the gateway loop

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
            self.speech = SpeechService(Synthesizer.load(self.checkpoint / TTS_DIR, device=device),
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
        chat = Chat(self.assistant, self.engine, WARM_UP_SESSION)
        async with aclosing(chat.reply(TurnMedia(audio=media.audio), SamplingParams(max_tokens=2))) as token_ids:
            async for _ in token_ids:
                pass
        chat.close()
        await speak(self.speech, self.assistant.speech_embeddings("hello."), lambda segment: None,
                    codec_chunk_size=FIRST_SENTENCE_CHUNK_SIZE, max_tokens=WARM_UP_CODES)

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
        if self._bridge is None or self._bridge.target is not gateway_loop:
            self._bridge = LoopBridge(self._loop, gateway_loop)
        bridge = self._bridge

        def emit(output: TurnOutput) -> None:  # on the worker loop
            bridge.call(on_output, output)

        handle = TurnTask(self._loop)
        self._loop.call_soon_threadsafe(self._begin_turn, request, emit, handle)
        return handle

    # ------------------------------------------------------------------ worker loop side

    def _open(self, session_id: str, system_prompt: str | None) -> None:
        self._chats[session_id] = Chat(self.assistant, self.engine, session_id, system_prompt)

    def _reset(self, session_id: str, system_prompt: str | None) -> None:
        self._close(session_id)
        self._open(session_id, system_prompt)

    def _close(self, session_id: str) -> None:
        task = self._turns.pop(session_id, None)
        if task is not None:
            task.cancel()
        chat = self._chats.pop(session_id, None)
        if chat is not None:
            chat.close()

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
        try:
            handle.turn = VoiceTurn(
                self._chats[request.session_id], turn_input(request), emit=emit, speech=self.speech,
                encode_media=lambda media: asyncio.wrap_future(self.media_encoder.submit(media)),
            )
        except Exception as exc:
            log.exception("turn_failed session=%s response=%d", request.session_id, request.response_id)
            emit(TurnFailed(f"{type(exc).__name__}: {exc}"))
            return
        await handle.turn.run()


def turn_input(request: TurnRequest) -> TurnInput:
    """The pipeline's input for a gateway turn: audio as floats in [-1, 1], the frames decoded."""
    return TurnInput(
        audio_16k=None if request.audio_16k is None else request.audio_16k.astype(np.float32) / 32768.0,
        frames=[decode_image(data) for data in request.frames],
        text=request.text,
        params=sampling_params(request.generation),
        speak=request.generation.speak,
        respect_not_addressed=request.generation.respect_not_addressed,
    )


def sampling_params(generation: GenerationSettings) -> SamplingParams:
    """The engine's sampling parameters for a session's generation settings."""
    return SamplingParams(
        temperature=generation.temperature,
        top_p=generation.top_p,
        top_k=generation.top_k,
        max_tokens=generation.max_new_tokens,
    )
