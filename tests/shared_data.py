"""Where the project's shared material (speech clips, reference state dict) lives.

CI clones the repository with ``shared/`` beside it; ``VITA_SHARED_DIR`` overrides that.
"""

from __future__ import annotations

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
