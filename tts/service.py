"""Push-driven speech synthesis: every utterance of the process, in two threads (decoder, vocoder).

`SpeechService.speak` queues an utterance from any thread and returns a `SpeechHandle` at once; its
audio comes back through callbacks that run in the service's threads (a caller with an event loop
wraps them with `loop.call_soon_threadsafe`). Two threads share the work, sleeping while there is
nothing to do:
- "vita-tts" admits queued utterances, first come first served, into free decoder slots (prefill;
  while others are open, at most every `admit_every_calls` decoder calls), runs decoder steps for
  every open utterance (`DecoderBatch`: on CUDA a CUDA graph of `steps_per_call` steps and one read
  back) and hands each codec window that became ready to the vocoder thread;
- "vita-vocoder" decodes the windows waiting, on CUDA those of all utterances together (a codec
  call per window length, `decode_windows`, replayed from a CUDA graph per batch size, length of
  first and middle windows and frames kept, `CodecGraphs`), and hands out the segments and the ends. On the CPU,
  where batches are no faster and the codec is most of the work, `vocoder_threads` threads
  ("vita-vocoder", "vita-vocoder-1", ...) instead take one window at a time as they come free
  (`next_window`), so the codec uses every core.
So codec work never holds up decoder steps: a new utterance's first window (30 steps) is ready
after 30 quick steps however much audio the others need meanwhile.
On CUDA each thread works on a CUDA stream of its own, so its reads of results wait for its own
kernels only, never for the LLM's; an utterance's embeddings, made on the caller's stream, are
waited for on the device (an event recorded at `speak`).

Callbacks of an utterance: `on_segment` gets its int16 24 kHz segments in order, the same as
`Synthesizer.synthesize` gives for the same generator (up to float rounding); then exactly one
`on_done`: None after the last segment, the exception if the model failed (or a callback raised),
`SpeechServiceClosed` if the service closed first. A cancelled utterance gets no `on_done`: once
`SpeechHandle.cancel` returns, no callback of it runs (one running in a service thread at that moment
has returned first; cancelling from inside its own callback is fine).
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Collection
from dataclasses import dataclass
from typing import TypeVar

import numpy as np
import torch

from layers.shapes import batch_buckets
from tts.activity_log import ActivityLog
from tts.batch import DecoderBatch, Stream, UtteranceText
from tts.codec_graphs import CodecGraphs
from tts.codec_windows import Chunker, CodecWindow, decode_windows, shared_window_keeps, window_lengths
from tts.synthesizer import CHUNK_SIZE, FIRST_SENTENCE_CHUNK_SIZE, PADDING, TOP_K, Synthesizer

log = logging.getLogger("vita.tts")

SegmentCallback = Callable[[np.ndarray], None]
DoneCallback = Callable[[BaseException | None], None]


class SpeechServiceClosed(RuntimeError):
    """The service closed before the utterance ended."""


class SpeechHandle:
    """One utterance's callbacks, guarded so that `cancel` (any thread) silences them for good."""

    def __init__(self, on_segment: SegmentCallback, on_done: DoneCallback) -> None:
        self._on_segment = on_segment
        self._on_done = on_done
        self._lock = threading.RLock()  # held while a callback runs
        self._cancelled = False
        self._done = False

    def cancel(self) -> None:
        """Stop the utterance (its slot is freed at the TTS thread's next step); no callback of it runs
        after this returns, on_done included. Safe from any thread, also from its own callbacks."""
        with self._lock:
            self._cancelled = True

    @property
    def cancelled(self) -> bool:
        return self._cancelled

    @property
    def ended(self) -> bool:
        """Cancelled, or on_done was called."""
        return self._cancelled or self._done

    def _segment(self, segment: np.ndarray) -> None:
        with self._lock:
            if not self.ended:
                self._on_segment(segment)

    def _finish(self, error: BaseException | None) -> None:
        with self._lock:
            if self.ended:
                return
            self._done = True
            try:
                self._on_done(error)
            except Exception:
                log.exception("tts_on_done_failed")


Item = TypeVar("Item")


def next_vocoder_call(
    waiting: deque[tuple[Item, CodecWindow | None]], max_later_windows: int
) -> tuple[list[tuple[Item, CodecWindow | None]], deque[tuple[Item, CodecWindow | None]]]:
    """Split the vocoder's queue of (utterance, window or None for its end) into what the next call
    takes and what waits, in order: every first window, and the other windows and ends in arrival
    order up to `max_later_windows` windows. So an utterance not yet heard never waits behind a long
    call of later windows, whose utterances are already playing with audio queued ahead. Each
    utterance's windows still go in order: a first window has none before it, and the others are
    taken as a prefix of the queue."""
    work: list[tuple[Item, CodecWindow | None]] = []
    left: deque[tuple[Item, CodecWindow | None]] = deque()
    later = 0
    for item in waiting:
        window = item[1]
        if window is not None and window.first == 0:
            work.append(item)
        elif not left and (window is None or later < max_later_windows):
            later += window is not None
            work.append(item)
        else:
            left.append(item)
    return work, left


def next_window(waiting: deque[tuple[Item, CodecWindow | None]], busy: Collection[Item]) -> int | None:
    """Which item of the vocoder's queue a CPU vocoder thread takes next (its index), or None: the
    first window queued earliest (an utterance's first sound), else the earliest item of any
    utterance. An utterance another thread is decoding (`busy`) waits, and so does every item of an
    utterance behind its earlier ones, so each utterance's windows go in order."""
    seen: set[Item] = set()
    earliest = None
    for index, (utterance, window) in enumerate(waiting):
        if utterance in seen:
            continue
        seen.add(utterance)
        if utterance in busy:
            continue
        if window is not None and window.first == 0:
            return index
        if earliest is None:
            earliest = index
    return earliest


@dataclass(eq=False)
class _Utterance:
    text: UtteranceText | None  # dropped once prefilled
    embeddings_ready: torch.cuda.Event | None  # recorded at `speak` on the stream the embeddings were made on (CUDA)
    chunker: Chunker
    handle: SpeechHandle
    timeline: dict[str, float] | None  # the caller's, filled in as its first sound is made
    stream: Stream | None = None  # once admitted


def _mark_first_windows(work: list[tuple[_Utterance, CodecWindow | None]], event: str) -> None:
    """Note `event` now in the timelines of the utterances whose first window is in `work`."""
    now = time.monotonic()
    for utterance, window in work:
        if window is not None and window.first == 0 and utterance.timeline is not None:
            utterance.timeline[event] = now


class SpeechService:
    """Synthesises up to `max_streams` utterances at once (more wait for a slot)."""

    def __init__(self, synthesizer: Synthesizer, *, max_streams: int = 64, capacity: int = 2048,
                 codec_batch_sizes: tuple[int, ...] | None = None,
                 chunk_sizes: tuple[int, ...] = (FIRST_SENTENCE_CHUNK_SIZE, CHUNK_SIZE), padding: int = PADDING,
                 max_later_windows: int = 16, vocoder_threads: int = 1, steps_per_call: int = 1,
                 admit_every_calls: int = 1, prefill_graphs: bool = False) -> None:
        """`capacity`: decoder cache positions per utterance, text rows + 1 + codec tokens (an utterance
        that fills its slot ends there). `codec_batch_sizes` (ascending): how many windows of one length
        a codec call may decode, padded up to one of these; by default `batch_buckets(max_streams)` on
        CUDA, 1 elsewhere (on CPU batches are no faster). Only the first and middle windows of
        `chunk_sizes` with `padding` are batched (the shapes `start` plans); last windows go alone.
        `max_later_windows`: how many windows other than first ones a batched vocoder call takes at
        most (first windows, which make an utterance's first sound, are all taken at once).
        `vocoder_threads`: on the CPU with one window per codec call (the default there), how many
        threads take windows one at a time (with one torch thread per operation each, the cores work
        side by side instead of meeting at every convolution); otherwise one thread makes batched calls.
        `steps_per_call`: decoder steps per call of the decoder thread (`DecoderBatch`: on CUDA one graph
        and one read back for them all); queued utterances are admitted between calls. On an H200 at
        64 clients 10 steps per call took first audio p50 down by about 10 % and its p95 up by a
        quarter (benchmarks/README.md): 1, the default, until fewer steps are measured.
        `admit_every_calls`: while utterances are open, queued ones are prefilled only once this many
        decoder calls have run since the last prefill (with none open, at once). Each prefill stops
        every open utterance's steps, and a larger one costs little more (H200, 64 clients: 15 ms
        for 1.7 sentences, 26 ms for 4.1), so fewer, larger prefills cost less in a burst but make a
        sentence wait longer to start. `prefill_graphs`: on CUDA, prefills replay from CUDA graphs
        (`tts/prefill_graphs.py`; off by default: on H200s they lowered first audio p50 at 64 clients
        but raised its p95, benchmarks/README.md)."""
        self.synthesizer = synthesizer
        device = synthesizer.decoder.embedding.weight.device
        self._on_cuda = device.type == "cuda"
        self.batch = DecoderBatch(synthesizer.decoder, max_streams, capacity, steps_per_call=steps_per_call,
                                  prefill_graphs=prefill_graphs)
        # (CUDA) the decoder's steps, then the vocoder's windows: the decoder's stream goes first when
        # they share the SMs (both below the LLM's, whose stream the worker sets at priority -2)
        self._streams = [None, None]
        if self._on_cuda:
            self._streams = [torch.cuda.Stream(device, priority=-1), torch.cuda.Stream(device)]
        # (CUDA) a stream for callers to make utterance embeddings on: an utterance made on the caller's
        # usual stream waits for everything queued there before it (the LLM's launched steps)
        self.input_stream = torch.cuda.Stream(device) if self._on_cuda else None
        default_batches = batch_buckets(max_streams) if self._on_cuda else (1,)
        self._codec_batches = default_batches if codec_batch_sizes is None else codec_batch_sizes
        self._chunk_sizes, self._padding = chunk_sizes, padding
        self.max_later_windows = max_later_windows
        if admit_every_calls < 1:
            raise ValueError("admit_every_calls must be at least 1")
        self.admit_every_calls = admit_every_calls
        self._batched_lengths = window_lengths(chunk_sizes, padding)[1]
        self._window_vocoders = 0 if self._on_cuda or self._codec_batches != (1,) else vocoder_threads
        self._codec = CodecGraphs(synthesizer.codec)  # graphs of the batched windows' shapes, captured at `start` (CUDA)
        self._fit_lengths: frozenset[int] = frozenset()  # the graphs' window lengths, which last windows fit
        self._wake = threading.Condition()
        self._queued: deque[_Utterance] = deque()  # shared with callers, under _wake
        self._windows: deque[tuple[_Utterance, CodecWindow | None]] = deque()  # for the vocoder, under _wake
        self._vocoding: set[_Utterance] = set()  # utterances a window vocoder is decoding, under _wake
        self._closed = False
        self._open: dict[Stream, _Utterance] = {}  # decoder thread only
        self._threads: list[threading.Thread] = []

    # ------------------------------------------------------------------ any thread

    @property
    def max_text_rows(self) -> int:
        """The most embedding rows an utterance may have (its text, bos and sos fill cache positions)."""
        return self.batch.cache.max_len - 2

    def start(self) -> None:
        """Capture the decoder step graphs (CUDA), start the decoder and vocoder threads and return once
        the vocoder has had cuDNN plan the codec shapes of last windows and captured the codec graphs of
        first and middle windows (CUDA: seconds); from then on last windows take the earlier context
        that makes them one of those graphs' lengths where they can (`Chunker`'s `fit_lengths`). Call
        it while no other thread launches CUDA work (the decoder step captures fail if one does)."""
        if self._threads:
            raise RuntimeError("already started")
        self.batch.capture_graphs()
        planned = threading.Event()
        if self._window_vocoders:
            names = ["vita-vocoder"] + [f"vita-vocoder-{i}" for i in range(1, self._window_vocoders)]
            vocoders = [threading.Thread(target=self._run_window_vocoder, name=name, daemon=True) for name in names]
            planned.set()
        else:
            vocoders = [threading.Thread(target=self._run_vocoder, args=(planned,), name="vita-vocoder", daemon=True)]
        self._threads = [threading.Thread(target=self._run_decoder, name="vita-tts", daemon=True), *vocoders]
        for thread in self._threads:
            thread.start()
        planned.wait()
        self._fit_lengths = frozenset(length for _, length, _ in self._codec.shapes)

    def alive(self) -> bool:
        """Whether all its threads run (False before `start`, once closed, or if one died)."""
        return bool(self._threads) and all(thread.is_alive() for thread in self._threads)

    def close(self, timeout: float = 10.0) -> None:
        """Stop the threads after their current step; utterances not yet ended get
        on_done(SpeechServiceClosed). Later `speak` calls raise RuntimeError."""
        with self._wake:
            self._closed = True
            self._wake.notify_all()
        for thread in self._threads:
            if thread is not threading.current_thread():
                thread.join(timeout)
        self._end_all()

    def speak(
        self,
        embeddings: torch.Tensor,
        *,
        codec_chunk_size: int,
        on_segment: SegmentCallback,
        on_done: DoneCallback,
        padding: int = PADDING,
        top_k: int = TOP_K,
        max_tokens: int = 1000,
        generator: torch.Generator | None = None,
        embeddings_stream: torch.cuda.Stream | None = None,
        timeline: dict[str, float] | None = None,
    ) -> SpeechHandle:
        """Queue the utterance of `embeddings` [N, embedding_dim] and return at once (see the module
        docstring for the callbacks). ValueError for bad arguments or text longer than `capacity - 2`
        rows. `generator` (a CPU generator) makes the token draws reproducible. `embeddings_stream`:
        the CUDA stream the embeddings were made on (default: the caller's current stream); the
        decoder waits for that stream's work up to now, on the device (`input_stream` waits for
        nothing else). `timeline`: the service sets its "prefilled" (prefill launched), "first_window"
        (decoded) and "vocoder_call" (the call that decodes that window began) to `time.monotonic()`."""
        self.synthesizer.check_utterance(embeddings, codec_chunk_size, padding, top_k, max_tokens)
        if len(embeddings) > self.max_text_rows:
            raise ValueError(f"{len(embeddings)} embedding rows do not fit {self.batch.cache.max_len} cache positions")
        handle = SpeechHandle(on_segment, on_done)
        ready = None
        if self._on_cuda and embeddings.is_cuda:
            ready = torch.cuda.Event()
            ready.record(embeddings_stream or torch.cuda.current_stream(embeddings.device))
        utterance = _Utterance(UtteranceText(embeddings, top_k, max_tokens, generator), ready,
                               Chunker(codec_chunk_size, padding, self._fit_lengths), handle, timeline)
        with self._wake:
            if self._closed:
                raise RuntimeError("the speech service is closed")
            self._queued.append(utterance)
            self._wake.notify_all()
        return handle

    # ------------------------------------------------------------------ decoder thread

    def _use_own_stream(self, stream: torch.cuda.Stream | None) -> None:
        if stream is not None:
            torch.cuda.set_device(stream.device)  # graphs replay on this thread's current device
            torch.cuda.set_stream(stream)  # this thread's current stream from now on

    def _run_decoder(self) -> None:
        self._use_own_stream(self._streams[0])
        activity = ActivityLog(log, "vita-tts")
        calls_since_prefill = self.admit_every_calls
        while self._wait(lambda: self._queued or self._open):
            try:
                self._drop_ended()
                started = time.perf_counter()
                due = not self._open or calls_since_prefill >= self.admit_every_calls
                if due and (admitted := self._admit()):
                    activity.add("prefill", time.perf_counter() - started, admitted)
                    calls_since_prefill = 0
                    started = time.perf_counter()
                if rows := self._advance():
                    activity.add("step", time.perf_counter() - started, rows)
                    calls_since_prefill += 1
            except Exception as exc:  # a bug outside the model calls: end everything rather than hang callers
                log.exception("tts_loop_failed")
                for utterance in list(self._open.values()):
                    self._end(utterance, exc)

    def _wait(self, has_work: Callable[[], object]) -> bool:
        """Sleep until `has_work()` or close; False once closed."""
        with self._wake:
            while not (self._closed or has_work()):
                self._wake.wait()
            return not self._closed

    def _drop_ended(self) -> None:
        """Free the slots of utterances cancelled or ended by the vocoder (a failure)."""
        for stream, utterance in list(self._open.items()):
            if utterance.handle.ended:
                self.batch.remove(stream)
                del self._open[stream]

    def _admit(self) -> int:
        """Prefill the queued utterances that fit free slots; how many were taken. On CUDA the prefill
        waits for their embeddings (made on another stream) on the device, not in this thread."""
        with self._wake:
            admitted = []
            while self._queued and len(admitted) < self.batch.free_slots:
                utterance = self._queued.popleft()
                if not utterance.handle.cancelled:
                    admitted.append(utterance)
        if not admitted:
            return 0
        for utterance in admitted:
            if utterance.embeddings_ready is not None:  # made on another stream: keep them alive on this one
                self._streams[0].wait_event(utterance.embeddings_ready)
                utterance.text.text_embeddings.record_stream(self._streams[0])
        self._prefill(admitted)
        return len(admitted)

    def _prefill(self, utterances: list[_Utterance]) -> None:
        """One prefill forward for `utterances`; if it fails, one each, so a bad one fails alone."""
        try:
            streams = self.batch.add_many([u.text for u in utterances])
        except Exception as exc:
            if len(utterances) > 1:
                for utterance in utterances:
                    self._prefill([utterance])
            else:
                utterances[0].handle._finish(exc)
            return
        prefilled = time.monotonic()
        for utterance, stream in zip(utterances, streams):
            utterance.text, utterance.stream = None, stream
            self._open[stream] = utterance
            if utterance.timeline is not None:
                utterance.timeline["prefilled"] = prefilled

    def _advance(self) -> int:
        """One decoder call (`steps_per_call` steps) for all open utterances; their ready windows and
        ends go to the vocoder. Returns how many utterances it advanced."""
        try:
            tokens = self.batch.step()
        except Exception as exc:
            for utterance in list(self._open.values()):
                self._end(utterance, exc)
            return 0
        work: list[tuple[_Utterance, CodecWindow | None]] = []
        for stream, drawn in tokens:
            utterance = self._open[stream]
            for token in drawn:
                if (window := utterance.chunker.push(token)) is not None:
                    work.append((utterance, window))
            if stream.finished:
                if (window := utterance.chunker.finish()) is not None:
                    work.append((utterance, window))
                work.append((utterance, None))  # its end, after its last window
                del self._open[stream]
                self.batch.remove(stream)
        if work:
            _mark_first_windows(work, "first_window")
            with self._wake:
                self._windows.extend(work)
                self._wake.notify_all()
        return len(tokens)

    def _end(self, utterance: _Utterance, error: BaseException) -> None:
        """Take `utterance` out of the batch (decoder thread) and report `error`."""
        if self._open.pop(utterance.stream, None) is not None:
            self.batch.remove(utterance.stream)
        utterance.handle._finish(error)

    # ------------------------------------------------------------------ vocoder thread

    def _run_vocoder(self, planned: threading.Event) -> None:
        self._use_own_stream(self._streams[1])
        try:
            if self._on_cuda:  # PyTorch keeps cuDNN convolution plans per thread: plan and capture in this one
                self.synthesizer.plan_codec_windows(self._chunk_sizes, self._padding)  # last windows, eager
                keeps = shared_window_keeps(self._chunk_sizes, self._padding)
                self._codec.capture((batch, length, keep) for batch in self._codec_batches
                                    for length, length_keeps in keeps.items() for keep in length_keeps)
        except Exception:
            log.exception("codec_graph_capture_failed: the vocoder decodes eagerly")
        finally:
            planned.set()
        activity = ActivityLog(log, "vita-vocoder")
        while self._wait(lambda: self._windows):
            with self._wake:
                work, self._windows = next_vocoder_call(self._windows, self.max_later_windows)
            try:
                started = time.perf_counter()
                self._vocode(work)
                activity.add("vocode", time.perf_counter() - started, len(work))
            except Exception as exc:  # a bug outside the model calls: end these rather than hang callers
                log.exception("tts_vocoder_failed")
                for utterance, _ in work:
                    utterance.handle._finish(exc)

    def _vocode(self, work: list[tuple[_Utterance, CodecWindow | None]]) -> None:
        """Decode the windows (first segments first, each utterance in order) and hand out each
        segment as soon as it and those before it exist; then the ends."""
        ready = [(u, w) for u, w in work if w is not None and not u.handle.ended]
        ready.sort(key=lambda item: item[1].first > 0)  # stable: an utterance keeps its order
        _mark_first_windows(ready, "vocoder_call")
        self._decode_and_hand_out(ready)
        for utterance, window in work:
            if window is None:
                utterance.handle._finish(None)

    def _run_window_vocoder(self) -> None:
        """Take the next window or end (`next_window`), decode or end it, and so on until closed."""
        activity = ActivityLog(log, threading.current_thread().name)
        while True:
            with self._wake:
                while not self._closed and (index := next_window(self._windows, self._vocoding)) is None:
                    self._wake.wait()
                if self._closed:
                    return
                utterance, window = self._windows[index]
                del self._windows[index]
                self._vocoding.add(utterance)
            try:
                if window is None:
                    utterance.handle._finish(None)
                elif not utterance.handle.ended:
                    started = time.perf_counter()
                    _mark_first_windows([(utterance, window)], "vocoder_call")
                    self._decode_and_hand_out([(utterance, window)])
                    activity.add("vocode", time.perf_counter() - started, 1)
            except Exception as exc:  # a bug outside the model calls: end it rather than hang its caller
                log.exception("tts_vocoder_failed")
                utterance.handle._finish(exc)
            finally:
                with self._wake:
                    self._vocoding.discard(utterance)
                    self._wake.notify_all()

    def _decode_and_hand_out(self, ready: list[tuple[_Utterance, CodecWindow]]) -> None:
        """Decode `ready`'s windows, handing out segments in `ready`'s order; a failure ends the
        utterances whose segments were not handed out."""
        decoded: dict[int, np.ndarray] = {}
        emitted = 0
        try:
            windows = [w for _, w in ready]
            for index, segment in decode_windows(self._codec, windows, self._codec_batches,
                                                 self._batched_lengths):
                decoded[index] = segment
                while emitted in decoded:
                    utterance = ready[emitted][0]
                    emitted += 1
                    try:
                        utterance.handle._segment(decoded.pop(emitted - 1))
                    except Exception as exc:
                        log.exception("tts_on_segment_failed")
                        utterance.handle._finish(exc)
        except Exception as exc:
            for utterance, _ in ready[emitted:]:
                utterance.handle._finish(exc)

    # ------------------------------------------------------------------ closing

    def _end_all(self) -> None:
        """After the threads stopped: every utterance not ended gets SpeechServiceClosed."""
        with self._wake:
            waiting, self._queued = list(self._queued), deque()
            vocoding, self._windows = [u for u, _ in self._windows], deque()
        closed = SpeechServiceClosed("the speech service closed")
        for utterance in [*self._open.values(), *waiting, *vocoding]:
            utterance.handle._finish(closed)
        self._open.clear()
