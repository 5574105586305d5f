"""Leading-silence trim for a reply's audio (upstream web demo's threshold, 0.03 of full scale)."""

from __future__ import annotations

import numpy as np

DEFAULT_THRESHOLD = 0.03  # fraction of full scale


def trim_leading_silence(segment: np.ndarray, threshold: float = DEFAULT_THRESHOLD) -> np.ndarray:
    """Drop the samples before the first one with |x| > threshold * full scale.

    Full scale is 32768 for int16 and 1.0 for float audio. A segment with no sample above the
    threshold is returned unchanged, so speech is never cut. Apply it to a reply's first segment only.
    """
    full_scale = 32768.0 if segment.dtype == np.int16 else 1.0
    loud = np.flatnonzero(np.abs(segment.astype(np.float64)) > threshold * full_scale)
    return segment[loud[0] :] if loud.size else segment


class LeadingSilenceTrimmer:
    """A reply's leading silence trimmed across its segments, and nothing else.

    Segments are held back until the first sample above the threshold, which starts the audio;
    everything after it passes untouched, pauses included (upstream trims every segment of the
    first sentence, which also cuts the pauses between its words at segment boundaries: audible
    jumps). A reply with no sample above the threshold is released whole by `flush`.
    """

    def __init__(self, threshold: float = DEFAULT_THRESHOLD) -> None:
        self.threshold = threshold
        self._held: list[np.ndarray] = []
        self._started = False

    def push(self, segment: np.ndarray) -> list[np.ndarray]:
        """The audio to play now for this segment (empty while only silence has come)."""
        if self._started:
            return [segment]
        trimmed = trim_leading_silence(segment, self.threshold)
        full_scale = 32768.0 if segment.dtype == np.int16 else 1.0
        if len(trimmed) == 0 or abs(float(trimmed[0])) <= self.threshold * full_scale:
            self._held.append(segment)  # nothing audible yet
            return []
        self._started, self._held = True, []
        return [trimmed]

    def flush(self) -> list[np.ndarray]:
        """At the end of the reply: held segments if nothing was ever audible (quiet speech is kept)."""
        held, self._held = self._held, []
        return held
