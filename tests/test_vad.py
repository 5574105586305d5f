"""Turn detection on the real speech clips and synthetic silence/noise.

The reference for where speech is: frame energy of the clip (speech frames are > 40 dB above
the digital silence around them), computed independently of webrtcvad.
"""


import numpy as np
import pytest
import soundfile as sf

from server.protocol import VadSettings
from server.vad import (
    SpeechDiscarded,
    SpeechEnd,
    SpeechPaused,
    SpeechResumed,
    SpeechStart,
    TurnDetector,
    VadEvent,
)
from shared_data import AUDIO

RATE = 16_000
FRAME_MS = 30


def clip(name: str) -> np.ndarray:
    data, rate = sf.read(AUDIO / f"{name}.wav", dtype="int16")
    assert rate == RATE
    return data


def silence(seconds: float) -> np.ndarray:
    return np.zeros(int(RATE * seconds), dtype=np.int16)


def feed(settings: VadSettings, audio: np.ndarray, chunk: int = 320) -> list[VadEvent]:
    detector = TurnDetector(settings)
    events: list[VadEvent] = []
    for i in range(0, len(audio), chunk):
        events += detector.feed(audio[i : i + chunk])
    return events


def turns(events: list[VadEvent]) -> list[VadEvent]:
    """The events without the speculative pauses."""
    return [e for e in events if not isinstance(e, (SpeechPaused, SpeechResumed))]


def energy_speech_frames(audio: np.ndarray) -> np.ndarray:
    """Indices of 30 ms frames whose energy is above 30 dB (int16 scale)."""
    n = len(audio) // 480
    frames = audio[: n * 480].reshape(n, 480).astype(np.float64)
    energy_db = 10 * np.log10((frames**2).mean(axis=1) + 1.0)
    return np.flatnonzero(energy_db > 30)


@pytest.mark.parametrize("name", ["en_hello", "en_describe", "zh_weather"])
def test_one_utterance_per_clip_where_the_energy_is(name: str) -> None:
    audio = np.concatenate([silence(0.5), clip(name), silence(1.0)])
    events = turns(feed(VadSettings(), audio))
    assert [type(e) for e in events] == [SpeechStart, SpeechEnd]
    start, end = events
    speech = energy_speech_frames(audio)
    onset_ms, offset_ms = speech[0] * FRAME_MS, (speech[-1] + 1) * FRAME_MS
    assert abs(start.audio_ms - onset_ms) <= 2 * FRAME_MS
    assert abs(end.audio_ms - offset_ms) <= 4 * FRAME_MS
    assert end.duration_ms == end.audio_ms - start.audio_ms
    assert not end.truncated
    # the utterance audio holds the speech with its pre-roll, without the trailing hangover
    preroll = VadSettings().preroll_ms
    assert abs(len(end.audio) / RATE * 1000 - (end.duration_ms + preroll)) <= FRAME_MS
    assert np.array_equal(end.audio[-480:], audio[end.audio_ms * 16 - 480 : end.audio_ms * 16])


def test_short_hangover_splits_at_the_pauses() -> None:
    """en_hello has two pauses of ~360-390 ms: a 200 ms hangover ends an utterance at each."""
    audio = np.concatenate([silence(0.5), clip("en_hello"), silence(1.0)])
    speech = energy_speech_frames(audio)
    gaps_ms = np.diff(speech) * FRAME_MS - FRAME_MS
    long_pauses = int(np.sum(gaps_ms >= 300))
    events = feed(VadSettings(hangover_ms=200, min_speech_ms=0), audio)
    ends = [e for e in events if isinstance(e, SpeechEnd)]
    assert long_pauses == 2
    assert len(ends) == long_pauses + 1
    assert all(isinstance(e, SpeechStart) for e in events[0::2])


def test_two_utterances_give_two_turns() -> None:
    audio = np.concatenate([silence(0.3), clip("en_describe"), silence(1.2), clip("zh_weather"), silence(1.0)])
    events = feed(VadSettings(), audio, chunk=480)
    assert [type(e) for e in events] == [SpeechStart, SpeechPaused, SpeechEnd] * 2


@pytest.mark.parametrize("aggressiveness", [0, 3])
@pytest.mark.parametrize("frame_ms", [10, 20, 30])
def test_silence_and_low_noise_never_start_a_turn(aggressiveness: int, frame_ms: int) -> None:
    rng = np.random.default_rng(0)
    noise = np.round(rng.normal(0, 30, RATE * 3)).astype(np.int16)  # about -60 dBFS
    audio = np.concatenate([silence(2.0), noise])
    settings = VadSettings(aggressiveness=aggressiveness, frame_ms=frame_ms)
    assert feed(settings, audio) == []


def test_too_short_utterance_is_discarded() -> None:
    speech = clip("en_hello")
    onset = energy_speech_frames(speech)[0] * 480
    burst = speech[onset : onset + int(0.25 * RATE)]  # 250 ms of the first word
    events = feed(VadSettings(min_speech_ms=400), np.concatenate([silence(0.5), burst, silence(1.0)]))
    assert [type(e) for e in events] == [SpeechStart, SpeechDiscarded]
    assert events[1].duration_ms < 400


def test_overlong_utterance_is_cut_at_max_speech() -> None:
    audio = np.concatenate([silence(0.5), clip("zh_weather"), silence(1.0)])
    events = feed(VadSettings(max_speech_ms=1_500), audio)
    first_end = next(e for e in events if isinstance(e, SpeechEnd))
    assert first_end.truncated
    assert first_end.duration_ms == 1_500
    assert first_end.audio_ms == events[0].audio_ms + 1_500


def test_chunking_does_not_change_decisions() -> None:
    audio = np.concatenate([silence(0.4), clip("en_hello"), silence(1.0)])
    by_sample_chunks = [feed(VadSettings(frame_ms=20), audio, chunk=c) for c in (77, 320, 4096)]
    summary = [[(type(e), e.audio_ms) for e in events] for events in by_sample_chunks]
    assert summary[0] == summary[1] == summary[2]


def speech(name: str) -> np.ndarray:
    """The clip from its first to its last speech frame (by energy)."""
    audio = clip(name)
    frames = energy_speech_frames(audio)
    return audio[frames[0] * 480 : (frames[-1] + 1) * 480]


def test_a_pause_announces_the_end_and_resumed_speech_takes_it_back() -> None:
    """Speech, 300 ms of silence (more than speculative_ms, less than the hangover), speech, silence."""
    first, second = speech("en_describe"), speech("zh_weather")
    audio = np.concatenate([silence(0.5), first, silence(0.3), second, silence(0.8)])
    events = feed(VadSettings(), audio)
    assert [type(e) for e in events] == [SpeechStart, SpeechPaused, SpeechResumed, SpeechPaused, SpeechEnd]
    start, pause, resumed, last_pause, end = events
    assert pause.audio_ms < resumed.audio_ms < last_pause.audio_ms
    assert (last_pause.audio_ms, last_pause.duration_ms) == (end.audio_ms, end.duration_ms)
    assert np.array_equal(last_pause.audio, end.audio)
    # the first pause carries what the end would have been, had the speech not resumed
    alone = feed(VadSettings(), np.concatenate([silence(0.5), first, silence(1.0)]))
    assert [type(e) for e in alone] == [SpeechStart, SpeechPaused, SpeechEnd]
    assert (pause.audio_ms, pause.duration_ms) == (alone[2].audio_ms, alone[2].duration_ms)
    assert np.array_equal(pause.audio, alone[2].audio)

    without = feed(VadSettings(speculative_ms=0), audio)
    assert [type(e) for e in without] == [SpeechStart, SpeechEnd]
    assert without[1].audio_ms == end.audio_ms and np.array_equal(without[1].audio, end.audio)
