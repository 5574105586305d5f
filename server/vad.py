"""Turn detection on 16 kHz mono audio with webrtcvad: utterance start, pause, end, too short, too long."""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

import numpy as np
import webrtcvad

from server.audio_input import MODEL_SAMPLE_RATE
from server.protocol import VadSettings


@dataclass(frozen=True)
class SpeechStart:
    """Enough voiced audio was heard; ``audio_ms`` is where the voiced run began."""

    audio_ms: int


@dataclass(frozen=True)
class SpeechPaused:
    """``speculative_ms`` of silence in an utterance long enough to answer: the ``SpeechEnd`` that
    follows if speech does not resume carries these same fields and ``audio``."""

    audio_ms: int
    duration_ms: int
    audio: np.ndarray


@dataclass(frozen=True)
class SpeechResumed:
    """Voiced audio at ``audio_ms`` after a ``SpeechPaused``, before the hangover ended the utterance."""

    audio_ms: int


@dataclass(frozen=True)
class SpeechEnd:
    """A complete utterance: 16 kHz int16 ``audio`` (pre-roll included, trailing silence cut)."""

    audio_ms: int
    duration_ms: int
    audio: np.ndarray
    truncated: bool


@dataclass(frozen=True)
class SpeechDiscarded:
    """An utterance shorter than ``min_speech_ms``: no turn."""

    audio_ms: int
    duration_ms: int


VadEvent = SpeechStart | SpeechPaused | SpeechResumed | SpeechEnd | SpeechDiscarded


class TurnDetector:
    """Feeds webrtcvad fixed-size frames and turns its per-frame decisions into utterances.

    Idle: a run of ``start_ms`` consecutive voiced frames starts an utterance (the pre-roll
    before the run is kept). Speaking: ``hangover_ms`` of consecutive unvoiced frames ends it;
    speech reaching ``max_speech_ms`` is cut there and detection starts afresh. ``speculative_ms``
    of them first announce a pause, so that the reply can be prepared while the hangover runs; a
    voiced frame before the hangover ends resumes the utterance.
    """

    def __init__(self, settings: VadSettings) -> None:
        self.settings = settings
        self._vad = webrtcvad.Vad(settings.aggressiveness)
        self._frame_samples = MODEL_SAMPLE_RATE * settings.frame_ms // 1000
        self._pending = np.zeros(0, dtype=np.int16)
        self._frames_seen = 0
        self._preroll: deque[np.ndarray] = deque(maxlen=max(1, settings.preroll_ms // settings.frame_ms))
        self._voiced_run: list[np.ndarray] = []
        self._utterance: list[np.ndarray] | None = None
        self._utterance_start_frame = 0
        self._last_voiced_frame = 0
        self._silent_frames = 0
        self._paused = False

    @property
    def speaking(self) -> bool:
        """Inside an utterance (started, not ended yet)."""
        return self._utterance is not None

    def feed(self, samples: np.ndarray) -> list[VadEvent]:
        """Push 16 kHz int16 samples; returns the events they complete, in order."""
        self._pending = np.concatenate([self._pending, samples.astype(np.int16, copy=False)])
        events: list[VadEvent] = []
        n_frames = len(self._pending) // self._frame_samples
        for i in range(n_frames):
            events += self._step(self._pending[i * self._frame_samples : (i + 1) * self._frame_samples])
        self._pending = self._pending[n_frames * self._frame_samples :].copy()
        return events

    def end_now(self) -> SpeechEnd | SpeechDiscarded | None:
        """End the utterance in progress at once (the client committed its turn); None if there is none."""
        if self._utterance is None:
            return None
        return self._finish(self._last_voiced_frame + 1 - self._utterance_start_frame, truncated=False)

    def _ms(self, frames: int) -> int:
        return frames * self.settings.frame_ms

    def _step(self, frame: np.ndarray) -> list[VadEvent]:
        index = self._frames_seen
        self._frames_seen += 1
        voiced = self._vad.is_speech(frame.tobytes(), MODEL_SAMPLE_RATE)
        if self._utterance is None:
            start = self._step_idle(frame, index, voiced)
            return [] if start is None else [start]
        return self._step_speaking(frame, index, voiced)

    def _step_idle(self, frame: np.ndarray, index: int, voiced: bool) -> SpeechStart | None:
        if not voiced:
            self._preroll.extend(self._voiced_run)
            self._voiced_run = []
            self._preroll.append(frame)
            return None
        self._voiced_run.append(frame)
        if self._ms(len(self._voiced_run)) < self.settings.start_ms:
            return None
        self._utterance = [*self._preroll, *self._voiced_run]
        self._utterance_start_frame = index + 1 - len(self._voiced_run)
        self._last_voiced_frame = index
        self._silent_frames = 0
        self._preroll.clear()
        self._voiced_run = []
        return SpeechStart(audio_ms=self._ms(self._utterance_start_frame))

    def _step_speaking(self, frame: np.ndarray, index: int, voiced: bool) -> list[VadEvent]:
        assert self._utterance is not None
        self._utterance.append(frame)
        events: list[VadEvent] = []
        if voiced:
            self._last_voiced_frame = index
            self._silent_frames = 0
            if self._paused:
                self._paused = False
                events.append(SpeechResumed(audio_ms=self._ms(index)))
        else:
            self._silent_frames += 1
        speech_frames = self._last_voiced_frame + 1 - self._utterance_start_frame
        if self._ms(speech_frames) >= self.settings.max_speech_ms:
            events.append(self._finish(speech_frames, truncated=True))
        elif self._ms(self._silent_frames) >= self.settings.hangover_ms:
            events.append(self._finish(speech_frames, truncated=False))
        elif self._pauses_now(speech_frames):
            self._paused = True
            end_ms, duration_ms = self._span_ms(speech_frames)
            events.append(SpeechPaused(audio_ms=end_ms, duration_ms=duration_ms, audio=self._speech_audio()))
        return events

    def _pauses_now(self, speech_frames: int) -> bool:
        """The silence has just reached ``speculative_ms`` in speech long enough to be a turn."""
        return (
            not self._paused
            and 0 < self.settings.speculative_ms <= self._ms(self._silent_frames)
            and self._ms(speech_frames) >= self.settings.min_speech_ms
        )

    def _span_ms(self, speech_frames: int) -> tuple[int, int]:
        """Where the utterance's speech ends in the input stream, and how long it lasts."""
        return self._ms(self._utterance_start_frame + speech_frames), self._ms(speech_frames)

    def _speech_audio(self) -> np.ndarray:
        """The utterance so far (pre-roll included) without its trailing silence."""
        assert self._utterance is not None
        return np.concatenate(self._utterance[: len(self._utterance) - self._silent_frames])

    def _finish(self, speech_frames: int, truncated: bool) -> SpeechEnd | SpeechDiscarded:
        audio = self._speech_audio()
        self._utterance = None
        self._silent_frames = 0
        self._paused = False
        end_ms, duration_ms = self._span_ms(speech_frames)
        if duration_ms < self.settings.min_speech_ms:
            return SpeechDiscarded(audio_ms=end_ms, duration_ms=duration_ms)
        return SpeechEnd(audio_ms=end_ms, duration_ms=duration_ms, audio=audio, truncated=truncated)
