"""Leading-silence trim for the first audio segment of a reply (upstream web demo, threshold 0.03)."""

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
