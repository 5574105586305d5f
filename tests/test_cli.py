"""vita-server settings from flags and the environment."""

import pytest

from server.cli import parse_args
from server.settings import ServerSettings


def test_cpu_threads_default_to_one_and_follow_the_flag_and_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    assert ServerSettings(**parse_args([])).cpu_threads == 1
    assert ServerSettings(**parse_args(["--cpu-threads", "3"])).cpu_threads == 3
    monkeypatch.setenv("VITA_CPU_THREADS", "2")
    assert ServerSettings(**parse_args([])).cpu_threads == 2
    with pytest.raises(ValueError):
        ServerSettings(**parse_args(["--cpu-threads", "0"]))


def test_the_worker_runs_in_a_process_unless_told_otherwise(monkeypatch: pytest.MonkeyPatch) -> None:
    assert ServerSettings(**parse_args([])).worker_process is True
    assert ServerSettings(**parse_args(["--no-worker-process"])).worker_process is False
    monkeypatch.setenv("VITA_WORKER_PROCESS", "false")
    assert ServerSettings(**parse_args([])).worker_process is False
    assert ServerSettings(**parse_args(["--worker-process"])).worker_process is True  # the flag wins
