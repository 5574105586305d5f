"""Model worker: assistant, engine and TTS in a thread with its own event loop.

The gateway's loop never runs model math. It calls the worker's thread-safe methods, which
schedule work on the worker loop; outputs go back in batches (``LoopBridge``: one wake-up of the
gateway loop per worker loop iteration, not one per text delta). Each
session is a ``vita.chat.Chat``; each turn a ``vita.voice_turn.VoiceTurn`` run as a task on the
worker loop, so the engine batches the decode steps of all sessions; media encoding
(``MediaEncoder``) and speech synthesis (``SpeechService``) run in threads of their own, batched
across sessions, each on its own CUDA stream.

A dead or hung worker loop (``failure``, polled by ``server.watchdog.WorkerWatchdog``) is replaced
by ``restart``: a fresh loop and thread, engine, media encoder and speech service over the weights
already loaded. Calls still queued on the abandoned loop do nothing if it ever runs them.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import threading
import time
from collections.abc import Callable
from contextlib import aclosing
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from server.allocation_log import AllocationLog
from server.audio_input import MODEL_SAMPLE_RATE
from server.gc_pauses import GcPauses, freeze_start_up_objects
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
CLEANUP_TIMEOUT_S = 5.0  # what a restart waits for the abandoned media encoder and speech service to stop
WARM_UP_SESSION = "warm-up"
WARM_UP_CODES = 60  # 1.5 s of audio: one full codec chunk with its padding


def resolve_checkpoint(settings: ServerSettings) -> tuple[Path, bool]:
    """Checkpoint folder to load and whether it is the tiny random one (generated once)."""
    if settings.checkpoint is not None:
        return settings.checkpoint, False
    return ensure_tiny_checkpoint(settings.cache_dir), True


class WorkerIdentity:
    """What every worker (this thread's `ModelWorker`, `server.worker_process.ProcessWorker`) holds:
    its settings and checkpoint, the model's name as users see it, and whether it can serve."""

    def __init__(self, settings: ServerSettings, checkpoint: Path, is_tiny: bool) -> None:
        self.settings = settings
        self.checkpoint = checkpoint
        self.is_tiny = is_tiny
        # the folder's name only: users see it, the path stays in the server log
        self.model_name = f"{checkpoint.name}{' (tiny random weights: replies are noise)' if is_tiny else ''}"
        self.ready = False
        self.load_error: str | None = None


class TurnTask:
    """Handle of one turn on the worker loop; ``cancel`` is safe from any thread."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self.task: asyncio.Task[None] | None = None
        self.cancelled = False
        self.turn: VoiceTurn | None = None  # once the session's previous turn has unwound

    def cancel(self, discard: bool = False) -> None:
        try:
            self._loop.call_soon_threadsafe(self._cancel_in_loop, discard)
        except RuntimeError:  # the loop is closed: the worker it ran on was restarted, the turn is gone
            pass

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


class ModelWorker(WorkerIdentity):
    """Owns the model; implements ``server.turns.TurnRunner`` for the sessions."""

    assistant: VitaAssistant  # these four are loaded in the worker thread, then ``ready`` turns True
    engine: Engine
    media_encoder: MediaEncoder
    speech: SpeechService

    def __init__(self, settings: ServerSettings, checkpoint: Path, is_tiny: bool) -> None:
        super().__init__(settings, checkpoint, is_tiny)
        self._synthesizer: Synthesizer | None = None  # with ``assistant``: the weights, loaded once
        self._fresh_loop()

    def _fresh_loop(self) -> None:
        """A new worker loop and thread (not started) with no sessions."""
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._run_loop, args=(self._loop,), name="vita-worker", daemon=True)
        self._chats: dict[str, Chat] = {}
        self._turns: dict[str, asyncio.Task[None]] = {}
        self._bridge: LoopBridge | None = None  # outputs to the gateway loop
        self._last_beat = time.monotonic()  # when the loop last answered ``heartbeat``
        self.beat_lag_s: float | None = None  # the longest answer since the watchdog last took it: the loop's lag
        self._device_error: str | None = None  # the last heartbeat's device check failed with this
        self._allocations: AllocationLog | None = None  # CUDA: the allocators' growth, logged at heartbeats
        self._gc_passes: GcPauses | None = None  # the garbage collector's passes, logged at heartbeats

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

    def _run_loop(self, loop: asyncio.AbstractEventLoop) -> None:
        asyncio.set_event_loop(loop)
        loop.create_task(self._start_up())
        try:
            loop.run_forever()
        except BaseException:  # the thread ends here; the watchdog sees it and restarts the worker
            log.exception("worker_loop_died")
        finally:
            self._cancel_tasks(loop)
            loop.close()

    @staticmethod
    def _cancel_tasks(loop: asyncio.AbstractEventLoop) -> None:
        """Cancel the tasks left on a stopped loop and let them unwind, as ``asyncio.run`` does."""
        tasks = asyncio.all_tasks(loop)
        for task in tasks:
            task.cancel()
        try:
            loop.run_until_complete(asyncio.gather(*tasks, return_exceptions=True))
        except BaseException:
            log.exception("worker_loop_cleanup_failed")

    async def _start_up(self) -> None:
        try:
            started = time.perf_counter()
            device = self.settings.resolved_device()
            if device.startswith("cuda"):  # the LLM's kernels first when the SMs are shared (the loop thread's stream)
                torch.cuda.set_stream(torch.cuda.Stream(device, priority=-2))
            if self._synthesizer is None:  # the first start; a restart reuses the weights
                self.assistant = VitaAssistant.load(self.checkpoint, device=device, dtype=self.settings.torch_dtype())
                self._synthesizer = Synthesizer.load(self.checkpoint / TTS_DIR, device=device,
                                                     codec_dtype=self.settings.codec_torch_dtype())
            self.engine = self.assistant.make_engine(
                max_sessions=self.settings.max_sessions, max_len=self.settings.max_context_tokens,
                decoding_prefill_tokens=self.settings.prefill_tokens_while_decoding,
            )
            if self.engine.use_graphs:  # capture now: a capture racing TTS kernels of the other thread fails
                self.engine.capture_graphs()
            self.media_encoder = MediaEncoder(self.assistant.model)
            # graphs and codec plans now, while no other thread launches CUDA work
            self.speech = SpeechService(self._synthesizer, max_streams=self.settings.max_sessions,
                                        vocoder_threads=self.settings.vocoder_threads,
                                        steps_per_call=self.settings.tts_steps_per_call,
                                        admit_every_calls=self.settings.tts_admit_every_calls,
                                        prefill_graphs=self.settings.tts_prefill_graphs)
            self.speech.start()
            await self._warm_up()
            if self.engine.device.type == "cuda":
                self._allocations = AllocationLog(log, self.engine.device)
            freeze_start_up_objects(log)
            self._gc_passes = GcPauses(log)
            self._last_beat = time.monotonic()
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
        if self._gc_passes is not None:
            self._gc_passes.close()
            self._gc_passes = None
            gc.unfreeze()  # what the next start-up does not keep can be collected again
        if self.ready:
            await self.engine.close()
            self.media_encoder.close()
            self.speech.close()

    # ------------------------------------------------------------------ health and restart

    def heartbeat(self) -> None:
        """Ask the worker loop to answer (any thread); ``failure`` judges how long ago it last did,
        ``beat_lag_s`` holds the longest time an answer took since it was last taken."""
        self._call(self._beat, time.monotonic())

    def _beat(self, asked: float) -> None:
        self._last_beat = time.monotonic()
        self.beat_lag_s = max(self.beat_lag_s or 0.0, self._last_beat - asked)
        if self._gc_passes is not None:
            self._gc_passes.check()
        if self.engine.device.type == "cuda":  # a launch on a device that hit a CUDA error raises it again
            try:
                torch.empty(1, device=self.engine.device).fill_(0)
                if self._allocations is not None:
                    self._allocations.check()
            except RuntimeError as exc:
                self._device_error = str(exc).splitlines()[0]

    def failure(self, hang_timeout_s: float) -> str | None:
        """Why the worker cannot serve (its loop died or has not answered a heartbeat for
        ``hang_timeout_s``, a model thread died, the device failed), or None."""
        if not self._thread.is_alive():
            return "the worker thread died"
        if not self.ready:
            return None  # starting: the loop is busy loading for a while
        silent_s = time.monotonic() - self._last_beat
        if silent_s > hang_timeout_s:
            return f"the worker loop did not answer for {silent_s:.0f} s"
        if not self.media_encoder.alive():
            return "the media encoder thread died"
        if not self.speech.alive():
            return "a speech synthesis thread died"
        if self._device_error is not None:
            return f"the device failed: {self._device_error}"
        return None

    def restart(self) -> None:
        """Abandon the worker loop (dead or hung: its sessions are gone) and start a fresh one with a
        new engine, media encoder and speech service over the loaded weights; ``ready`` turns True
        once it has warmed up, or ``load_error`` says why it could not. Blocks for up to
        ``CLEANUP_TIMEOUT_S`` while the old media encoder and speech service stop."""
        self.ready = False
        old_loop = self._loop
        with contextlib.suppress(RuntimeError):  # closed already if its thread died
            old_loop.call_soon_threadsafe(old_loop.stop)  # should a hung loop ever come back
        models = [vars(self).get(name) for name in ("media_encoder", "speech")]  # absent if it never started
        cleanup = threading.Thread(target=self._close_models, args=models, name="vita-worker-cleanup", daemon=True)
        cleanup.start()
        cleanup.join(CLEANUP_TIMEOUT_S)  # a thread that stays hung is left behind
        self._fresh_loop()
        self._thread.start()

    @staticmethod
    def _close_models(*models: MediaEncoder | SpeechService | None) -> None:
        for model in models:
            try:
                if model is not None:
                    model.close()
            except Exception:  # callbacks into the closed loop of a dead worker
                log.exception("worker_cleanup_failed")

    def _call(self, function: Callable[..., Any], *args: Any) -> None:
        """Run ``function(*args)`` on the worker loop (any thread); nothing happens if the worker is
        restarted before the loop gets to it."""
        loop = self._loop

        def if_current() -> None:
            if self._loop is loop:
                function(*args)

        with contextlib.suppress(RuntimeError):  # a closed loop: that worker is gone
            loop.call_soon_threadsafe(if_current)

    # ------------------------------------------------------------------ sessions (any thread)

    def open_session(self, session_id: str, system_prompt: str | None) -> None:
        self._call(self._open, session_id, system_prompt)

    def reset_session(self, session_id: str, system_prompt: str | None) -> None:
        self._call(self._reset, session_id, system_prompt)

    def close_session(self, session_id: str) -> None:
        self._call(self._close, session_id)

    def start_turn(self, request: TurnRequest, on_output: OutputCallback) -> TurnTask:
        gateway_loop = asyncio.get_running_loop()
        if self._bridge is None or self._bridge.target is not gateway_loop:
            self._bridge = LoopBridge(self._loop, gateway_loop)
        bridge = self._bridge

        def emit(output: TurnOutput) -> None:  # on the worker loop
            bridge.call(on_output, output)

        handle = TurnTask(self._loop)
        self._call(self._begin_turn, request, emit, handle)
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
            # camera frames are decoded in a pool thread (PIL lets go of the GIL), not on this loop
            inputs = await asyncio.to_thread(turn_input, request) if request.frames else turn_input(request)
            handle.turn = VoiceTurn(
                self._chats[request.session_id], inputs, emit=emit, speech=self.speech,
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
