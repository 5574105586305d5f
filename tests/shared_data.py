"""Where the project's shared material (speech clips, reference state dict) lives.

CI clones the repository with ``shared/`` beside it; ``VITA_SHARED_DIR`` overrides that.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

_CANDIDATES = [
    Path(os.environ["VITA_SHARED_DIR"]) if os.environ.get("VITA_SHARED_DIR") else None,
    Path(__file__).resolve().parents[2] / "shared",
    Path("/work/shared"),
]
SHARED = next((p for p in _CANDIDATES if p is not None and (p / "audio").is_dir()), Path("/work/shared"))
AUDIO = SHARED / "audio"
REFERENCE_TSV = SHARED / "reference" / "vita15_state_dict.tsv"


def reference_rows(prefix: str = "") -> list[tuple[str, tuple[int, ...], int]]:
    """Rows ``(name, shape, numel)`` of the reference state dict whose name starts with ``prefix``."""
    rows = []
    for line in REFERENCE_TSV.read_text().splitlines():
        name, shape, numel = line.split("\t")
        if name.startswith(prefix):
            rows.append((name, tuple(json.loads(shape)), int(numel)))
    return rows
