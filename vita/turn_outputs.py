"""What a turn of the voice pipeline (`vita.voice_turn`) hands out, in order: text deltas and audio
segments as they come, then `TurnFinished` or `TurnFailed`; `HistoryCleared` before them if the
conversation was restarted."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import numpy as np


@dataclass(frozen=True)
class TextDelta:
    """The next piece of the reply text."""

    text: str


@dataclass(frozen=True)
class AudioSegment:
    """Reply audio, int16 mono 24 kHz."""

    pcm: np.ndarray


@dataclass(frozen=True)
class HistoryCleared:
    """The conversation outgrew the context: it was restarted before answering this turn."""


@dataclass(frozen=True)
class TurnStages:
    """When (``time.monotonic()``) the turn reached each stage of the pipeline; None if it never did."""

    started: float  # the turn's task began
    media_encoded: float | None = None  # audio and frames through the encoders
    first_token: float | None = None  # the engine's first reply token
    first_sentence: float | None = None  # the first unit handed to speech synthesis
    speech_prefilled: float | None = None  # its utterance admitted to the speech decoder (prefill launched)
    speech_first_window: float | None = None  # its first codec window decoded, waiting for the vocoder
    speech_vocoder_call: float | None = None  # the vocoder call that decodes that window began
    speech_first_segment: float | None = None  # its first segment reached the turn, before the leading-silence trim
    first_audio: float | None = None  # the first audio segment made


@dataclass(frozen=True)
class TurnFinished:
    """The reply is complete: its whole text, whether VITA marked it ☟, its synthesis figures and
    token counts (the turn's prompt, the reply's ids)."""

    text: str
    state: Literal["answer", "not_addressed"]
    synthesis_seconds: float  # the wall time of the sentences, each from its start to its last segment
    audio_samples: int
    stages: TurnStages
    input_tokens: int = 0
    output_tokens: int = 0


@dataclass(frozen=True)
class TurnFailed:
    """The turn stopped on an error (`message`: its type and text)."""

    message: str


TurnOutput = TextDelta | AudioSegment | HistoryCleared | TurnFinished | TurnFailed
OutputCallback = Callable[[TurnOutput], None]
