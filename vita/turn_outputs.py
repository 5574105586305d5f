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
class TurnFinished:
    """The reply is complete: its whole text, whether VITA marked it ☟, and its synthesis figures."""

    text: str
    state: Literal["answer", "not_addressed"]
    synthesis_seconds: float  # the wall time of the sentences, each from its start to its last segment
    audio_samples: int


@dataclass(frozen=True)
class TurnFailed:
    """The turn stopped on an error (`message`: its type and text)."""

    message: str


TurnOutput = TextDelta | AudioSegment | HistoryCleared | TurnFinished | TurnFailed
OutputCallback = Callable[[TurnOutput], None]
