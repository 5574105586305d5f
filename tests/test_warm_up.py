"""The worker's warm-up runs what the first burst of users will: LLM prefill and decode forwards
with rows of two sessions (``torch.compile`` on CUDA specialises a batch of one), where slots allow."""

from __future__ import annotations

from pathlib import Path

import pytest

from server.settings import ServerSettings
from server.worker import ModelWorker
from vita.model_runner import ModelRunner


@pytest.mark.parametrize("max_sessions", [1, 4])
async def test_warm_up_runs_prefill_and_decode_rows_of_two_sessions(
    monkeypatch: pytest.MonkeyPatch, tiny_checkpoint: Path, tmp_path: Path, max_sessions: int
) -> None:
    prefill_rows: list[int] = []
    decode_rows: list[int] = []
    prefill, launch = ModelRunner.prefill, ModelRunner.launch

    def recorded_prefill(self, rows):
        prefill_rows.append(len(rows))
        return prefill(self, rows)

    def recorded_launch(self, plan, previous):
        decode_rows.append(len(plan.rows))
        return launch(self, plan, previous)

    monkeypatch.setattr(ModelRunner, "prefill", recorded_prefill)
    monkeypatch.setattr(ModelRunner, "launch", recorded_launch)
    settings = ServerSettings(device="cpu", max_sessions=max_sessions, cache_dir=tmp_path)
    worker = ModelWorker(settings, tiny_checkpoint, is_tiny=True)
    await worker._start_up()
    try:
        assert worker.ready, worker.load_error
        assert max(prefill_rows) == max(decode_rows) == min(2, max_sessions)
        assert worker.engine.scheduler.sessions == {}  # the warm-up sessions are gone
    finally:
        await worker._shutdown()
