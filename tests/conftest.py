"""Shared fixtures: one tiny VITA-1.5 checkpoint per test session.

Without a GPU, Triton kernels run in Triton's CPU interpreter; the switch must be set before triton
is first imported (transformers may import it while tests are collected; ``import torch`` does not).
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Folder of a tiny random checkpoint in the real layout (written once per session)."""
    from vita.tiny_checkpoint import write_tiny_checkpoint

    return write_tiny_checkpoint(tmp_path_factory.mktemp("tiny") / "vita_tiny_ckpt")


@pytest.fixture(scope="session")
def tts_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Folder of a tiny random TTS checkpoint (`vita_tts_ckpt/` layout), written once per session."""
    from tts.tiny_checkpoint import write_tiny_tts_checkpoint

    path = tmp_path_factory.mktemp("tts")
    write_tiny_tts_checkpoint(path)
    return path
