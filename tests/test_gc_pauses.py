"""The garbage collector in a serving process: a started worker has frozen what start-up built (and
thaws it when it stops), and the collector's full or slow passes are logged, quiet passes not."""

from __future__ import annotations

import gc
import logging
from collections.abc import Iterator
from pathlib import Path

import pytest

from server.gc_pauses import GcPauses
from server.settings import ServerSettings
from server.worker import ModelWorker


@pytest.fixture
def no_automatic_passes() -> Iterator[None]:
    """Only the test's own `gc.collect` calls run passes."""
    gc.disable()
    try:
        yield
    finally:
        gc.enable()


def test_full_passes_are_logged_with_their_time_and_quiet_young_passes_are_not(
    no_automatic_passes: None, caplog: pytest.LogCaptureFixture
) -> None:
    logger = logging.getLogger("test.gc")
    passes = GcPauses(logger, interval_s=0.0)
    try:
        with caplog.at_level(logging.INFO, logger="test.gc"):
            gc.collect(0)
            passes.check()  # one young pass, far shorter than 10 ms
            gc.collect()
            gc.collect()
            passes.check()
            passes.check()  # no pass since
    finally:
        passes.close()
    gc.collect()  # no longer counted
    lines = [record.getMessage() for record in caplog.records]
    assert len(lines) == 1
    assert "passes=2 full=2 " in lines[0]
    assert float(lines[0].split("longest_ms=")[1].split()[0]) > 0
    assert passes._on_pass not in gc.callbacks


async def test_a_started_worker_freezes_what_start_up_built_and_thaws_it_when_it_stops(
    tiny_checkpoint: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    worker = ModelWorker(ServerSettings(device="cpu", max_sessions=2, cache_dir=tmp_path), tiny_checkpoint, is_tiny=True)
    with caplog.at_level(logging.INFO, logger="vita.worker"):
        await worker._start_up()
    try:
        assert worker.ready, worker.load_error
        frozen = gc.get_freeze_count()
        assert frozen > 10_000  # the model's modules and tensors, the tokenizer, the imports
        assert not any(obj is worker.engine for obj in gc.get_objects())  # no pass walks it
        assert "gc_frozen objects=" in caplog.text
    finally:
        await worker._shutdown()
    assert gc.get_freeze_count() == 0
    assert any(obj is worker.engine for obj in gc.get_objects())
