"""SpeechService: concurrent utterances in one thread give synthesize's segments; cancel, failures, close."""

import threading
import time
from collections import deque

import numpy as np
import pytest
import torch

from tts.codec_windows import CodecWindow
from tts.service import SpeechService, SpeechServiceClosed, next_vocoder_call, next_window
from tts.synthesizer import Synthesizer

WAIT_S = 20.0


@pytest.fixture(scope="module")
def synth(tts_dir) -> Synthesizer:
    """Utterances end at eos, after ~25 codes."""
    return Synthesizer.load(tts_dir)


@pytest.fixture(scope="module")
def endless(tts_dir) -> Synthesizer:
    """eos off: every utterance lasts max_tokens codes."""
    synthesizer = Synthesizer.load(tts_dir)
    with torch.no_grad():
        synthesizer.decoder.out_fnn.bias[synthesizer.decoder.config.eos_id] = -1e9
    return synthesizer


class Recorder:
    """An utterance's callbacks: what arrived, in which thread, and when it ended."""

    def __init__(self) -> None:
        self.segments: list[np.ndarray] = []
        self.done: list[BaseException | None] = []
        self.threads: set[str] = set()
        self.first_segment = threading.Event()
        self.finished = threading.Event()

    def on_segment(self, segment: np.ndarray) -> None:
        assert not self.done
        self.threads.add(threading.current_thread().name)
        self.segments.append(segment)
        if not self.first_segment.is_set():
            self.first_segment_at = time.monotonic()
        self.first_segment.set()

    def on_done(self, error: BaseException | None) -> None:
        self.threads.add(threading.current_thread().name)
        self.done.append(error)
        self.finished.set()


def text(rows: int, seed: int) -> torch.Tensor:
    return torch.randn(rows, 16, generator=torch.Generator().manual_seed(100 + seed))


def speak(service: SpeechService, rows: int, seed: int, **options) -> tuple[Recorder, object]:
    recorder = Recorder()
    options = {"codec_chunk_size": 6, "padding": 2, **options}
    handle = service.speak(text(rows, seed), on_segment=recorder.on_segment, on_done=recorder.on_done,
                           generator=torch.Generator().manual_seed(seed), **options)
    return recorder, handle


def reference(synth: Synthesizer, rows: int, seed: int, **options) -> list[np.ndarray]:
    options = {"codec_chunk_size": 6, "padding": 2, **options}
    return list(synth.synthesize(text(rows, seed), generator=torch.Generator().manual_seed(seed), **options))


@pytest.fixture
def started():
    services = []

    def start(synthesizer: Synthesizer, **options) -> SpeechService:
        service = SpeechService(synthesizer, **options)
        service.start()
        services.append(service)
        return service

    yield start
    for service in services:
        service.close()


REQUESTS = [  # (text rows, seed, options)
    (5, 0, {}), (17, 1, {"codec_chunk_size": 4}), (9, 2, {"top_k": 3}), (30, 3, {"padding": 0}),
    (12, 4, {"max_tokens": 9}), (7, 5, {"codec_chunk_size": 10, "padding": 3}),
]


@pytest.mark.parametrize("batching", [{}, {"codec_batch_sizes": (2, 4), "chunk_sizes": (4, 6), "padding": 2},
                                      {"steps_per_call": 3}])
def test_concurrent_utterances_get_the_segments_synthesize_gives(synth, started, batching):
    """CPU's one window per codec call, CUDA's batches of the first and middle windows, and CUDA's
    several decoder steps per call (utterances reaching eos in the middle of a call)."""
    expected = [reference(synth, rows, seed, **options) for rows, seed, options in REQUESTS]
    assert len({len(e) for e in expected}) > 1  # utterances end at eos after different numbers of codes
    service = started(synth, max_streams=4, capacity=128, **batching)  # 2 wait for a slot
    recorders = [speak(service, rows, seed, **options)[0] for rows, seed, options in REQUESTS]
    for recorder, segments in zip(recorders, expected):
        assert recorder.finished.wait(WAIT_S)
        assert recorder.done == [None] and recorder.threads == {"vita-vocoder"}
        assert [len(s) for s in recorder.segments] == [len(s) for s in segments]
        for got, want in zip(recorder.segments, segments):
            assert got.dtype == np.int16 and np.abs(got.astype(np.int32) - want).max() <= 1  # float rounding only


def test_two_window_vocoders_decode_utterances_side_by_side_with_the_same_segments(synth, started):
    """vocoder_threads=2 on the CPU: two threads take windows as they come free; nothing changes but
    which thread decodes (the codec is held up a little so that windows of several utterances wait)."""
    requests = [(9, seed, {}) for seed in range(4)]
    expected = [reference(synth, rows, seed, **options) for rows, seed, options in requests]
    decoding_threads: set[str] = set()

    def slow_codec(*_):
        decoding_threads.add(threading.current_thread().name)
        time.sleep(0.03)

    hook = synth.codec.generator.register_forward_pre_hook(slow_codec)
    try:
        service = started(synth, max_streams=4, capacity=128, vocoder_threads=2)
        recorders = [speak(service, rows, seed, **options)[0] for rows, seed, options in requests]
        for recorder, segments in zip(recorders, expected):
            assert recorder.finished.wait(WAIT_S) and recorder.done == [None]
            assert [len(s) for s in recorder.segments] == [len(s) for s in segments]
            for got, want in zip(recorder.segments, segments):
                assert np.abs(got.astype(np.int32) - want).max() <= 1
    finally:
        hook.remove()
    assert decoding_threads == {"vita-vocoder", "vita-vocoder-1"}


def test_a_window_vocoder_takes_first_windows_first_and_each_utterance_in_order():
    def window(first: int) -> CodecWindow:
        return CodecWindow(codes=(1, 2, 3), skip=0, frames=3, first=first)

    # a and b are playing, c is new, d is new but another thread decodes its first window
    waiting = deque([("a", window(20)), ("a", window(40)), ("a", None), ("b", window(20)), ("c", window(0)),
                     ("d", window(20))])
    assert next_window(waiting, busy=set()) == 4  # c's first sound before the others' next windows
    assert next_window(waiting, busy={"c"}) == 0  # c taken: a's earliest item
    assert next_window(waiting, busy={"c", "a"}) == 3  # a is being decoded: its items wait; b's next
    assert next_window(waiting, busy={"a", "b", "c", "d"}) is None
    assert next_window(deque([("a", None)]), busy=set()) == 0  # an end is taken like a window


def test_a_timeline_says_when_the_first_sound_passed_each_stage(synth, started):
    service = started(synth, max_streams=2, capacity=128)
    timeline: dict[str, float] = {}
    queued = time.monotonic()
    recorder, _ = speak(service, 9, 0, timeline=timeline)
    assert recorder.finished.wait(WAIT_S) and recorder.done == [None]
    heard = recorder.first_segment_at
    assert list(timeline) == ["prefilled", "first_window", "vocoder_call"]
    assert queued <= timeline["prefilled"] <= timeline["first_window"] <= timeline["vocoder_call"] <= heard


def test_cancel_stops_the_callbacks_and_frees_the_slot(endless, started):
    service = started(endless, max_streams=1, capacity=1100)
    first, handle = speak(service, 8, 0, max_tokens=1000)
    assert first.first_segment.wait(WAIT_S)
    handle.cancel()
    seen = len(first.segments)
    second, _ = speak(service, 8, 1, max_tokens=20)  # needs the only slot
    assert second.finished.wait(WAIT_S) and second.done == [None]
    assert len(first.segments) == seen and first.done == [] and not first.finished.is_set()
    assert np.concatenate(second.segments).tolist() == np.concatenate(reference(endless, 8, 1, max_tokens=20)).tolist()


def test_an_utterance_cancelled_in_its_own_callback_gets_no_more(endless, started):
    service = started(endless, max_streams=2, capacity=128)
    recorder, calls = Recorder(), []

    def on_segment(segment: np.ndarray) -> None:
        calls.append(segment)
        handle.cancel()

    handle = service.speak(text(6, 0), codec_chunk_size=3, padding=1, on_segment=on_segment,
                           on_done=recorder.on_done, max_tokens=100)
    other, _ = speak(service, 6, 1, max_tokens=40)  # still served afterwards
    assert other.finished.wait(WAIT_S) and other.done == [None]
    assert len(calls) == 1 and recorder.done == []


def test_a_cancelled_utterance_gets_no_segment_even_if_already_decoded(endless):
    """Two utterances queued before the thread starts are admitted together, so their first windows
    are decoded in the same codec call; the first one's callback cancels the second before its turn."""
    service = SpeechService(endless, max_streams=2, capacity=128)
    first, handles = Recorder(), []

    def cancel_second(segment: np.ndarray) -> None:
        handles[0].cancel()
        first.on_segment(segment)

    service.speak(text(6, 0), codec_chunk_size=6, padding=2, on_segment=cancel_second, on_done=first.on_done,
                  max_tokens=30)
    second, second_handle = speak(service, 6, 1, max_tokens=30)
    handles.append(second_handle)
    service.start()
    try:
        assert first.finished.wait(WAIT_S) and first.done == [None]
    finally:
        service.close()
    assert second.segments == [] and second.done == []


def test_a_model_failure_reaches_on_done_and_the_service_goes_on(endless, started):
    service = started(endless, max_streams=4, capacity=128)
    decoder = endless.decoder
    failing = {"prefill": decoder.layers_pre_nn[0], "step": decoder.norm, "codec": endless.codec.generator.conv_post}
    for part, module in failing.items():
        error = RuntimeError(f"{part} failed")

        def fail(*_):
            raise error

        hook = module.register_forward_hook(fail)
        try:
            recorder, _ = speak(service, 7, 0, max_tokens=30)
            assert recorder.finished.wait(WAIT_S)
        finally:
            hook.remove()
        assert recorder.done == [error] and recorder.segments == []
    recorder, _ = speak(service, 7, 0, max_tokens=30)
    assert recorder.finished.wait(WAIT_S) and recorder.done == [None]
    assert len(np.concatenate(recorder.segments)) == 30 * 600


def test_a_failing_prefill_ends_only_its_utterance(endless, started):
    service = started(endless, max_streams=4, capacity=512)
    running, _ = speak(service, 7, 0, max_tokens=300)
    assert running.first_segment.wait(WAIT_S)
    error = RuntimeError("prefill failed")

    def fail(*_):
        raise error

    hook = endless.decoder.layers_pre_nn[0].register_forward_hook(fail)
    try:
        failed, _ = speak(service, 7, 1, max_tokens=30)
        assert failed.finished.wait(WAIT_S)
    finally:
        hook.remove()
    assert failed.done == [error]
    assert running.finished.wait(WAIT_S) and running.done == [None]
    assert len(np.concatenate(running.segments)) == 300 * 600


def test_close_with_utterances_open_returns_promptly(endless):
    service = SpeechService(endless, max_streams=2, capacity=1100)
    service.start()
    recorders = [speak(service, 8, seed, max_tokens=1000)[0] for seed in range(3)]  # the third waits for a slot
    assert recorders[0].first_segment.wait(WAIT_S)
    started = time.perf_counter()
    service.close()
    assert time.perf_counter() - started < 1.0
    for recorder in recorders:
        assert recorder.finished.is_set() and len(recorder.done) == 1
        assert isinstance(recorder.done[0], SpeechServiceClosed)
    with pytest.raises(RuntimeError, match="closed"):
        speak(service, 8, 0)


def test_speak_rejects_bad_utterances_at_once(synth):
    service = SpeechService(synth, max_streams=1, capacity=32)
    recorder = Recorder()
    for embeddings, options, match in [
        (torch.zeros(4, 64), {}, r"\[N >= 1, 16\]"),
        (torch.zeros(31, 16), {}, "31 embedding rows do not fit 32"),
        (torch.zeros(4, 16), {"top_k": 0}, "at least 1"),
        (torch.zeros(4, 16), {"codec_chunk_size": 0}, "codec_chunk_size"),
    ]:
        with pytest.raises(ValueError, match=match):
            service.speak(embeddings, **{"codec_chunk_size": 4, **options}, on_segment=recorder.on_segment,
                          on_done=recorder.on_done)
    service.close()


def test_a_vocoder_call_takes_every_first_window_and_later_ones_in_order_up_to_its_limit():
    def window(first: int) -> CodecWindow:
        return CodecWindow(codes=(1, 2, 3), skip=0, frames=3, first=first)

    # a and b are playing (later windows queued), c and d are new; ends are None
    waiting = deque([("a", window(20)), ("b", window(20)), ("c", window(0)), ("a", window(40)), ("a", None),
                     ("b", window(40)), ("d", window(0)), ("d", None)])
    work, left = next_vocoder_call(waiting, max_later_windows=2)
    assert [(u, w and w.first) for u, w in work] == [("a", 20), ("b", 20), ("c", 0), ("d", 0)]
    assert [(u, w and w.first) for u, w in left] == [("a", 40), ("a", None), ("b", 40), ("d", None)]
    work, left = next_vocoder_call(left, max_later_windows=2)
    assert [(u, w and w.first) for u, w in work] == [("a", 40), ("a", None), ("b", 40), ("d", None)] and not left


@pytest.mark.parametrize("every", [1, 4])
def test_while_utterances_speak_new_ones_are_prefilled_at_most_every_few_calls(endless, started, every):
    """Every prefill stops the open utterances' steps: with `admit_every_calls` = 4 a sentence that
    arrives just after a prefill waits for 4 decoder calls and joins the next prefill."""
    service = started(endless, max_streams=4, capacity=1100, admit_every_calls=every)
    events: list[str] = []  # "step" or "prefill", in the decoder thread's order
    prefilled = threading.Event()
    add_many, step = service.batch.add_many, service.batch.step

    def recorded_add_many(texts):
        streams = add_many(texts)
        events.append("prefill")
        prefilled.set()
        return streams

    def recorded_step():
        tokens = step()
        events.append("step")
        return tokens

    service.batch.add_many, service.batch.step = recorded_add_many, recorded_step
    speaking, _ = speak(service, 8, 0, max_tokens=1000)
    assert speaking.first_segment.wait(WAIT_S)
    prefilled.clear()
    later = [speak(service, 8, 1, max_tokens=40)[0]]
    assert prefilled.wait(WAIT_S)
    later.append(speak(service, 8, 2, max_tokens=40)[0])  # right after a prefill
    for recorder in later:
        assert recorder.finished.wait(WAIT_S) and recorder.done == [None]
    prefills = [i for i, event in enumerate(events) if event == "prefill"]
    steps_between = [events[a:b].count("step") for a, b in zip(prefills, prefills[1:])]
    assert len(prefills) == 3 and min(steps_between) >= every, steps_between
    if every == 1:
        assert min(steps_between) < 4  # the sentence right after a prefill did not wait (so 4 can fail)
