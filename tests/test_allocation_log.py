"""The CUDA allocation log reports the allocators' growth between lines, and stays quiet without any
(torch's statistics stand in for a GPU's: this machine has none)."""

from __future__ import annotations

import logging

import pytest
import torch

from server.allocation_log import AllocationLog


def test_lines_report_growth_since_the_last_line_and_only_when_there_was_some(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    device = {"num_device_alloc": 10, "num_device_free": 1}
    host = {"num_host_alloc": 5, "host_alloc_time.total": 2000}
    monkeypatch.setattr(torch.cuda, "memory_stats", lambda _device: dict(device))
    monkeypatch.setattr(torch.cuda, "host_memory_stats", lambda: dict(host))
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda _device: 3 * 2**30)
    logger = logging.getLogger("test.allocations")
    allocations = AllocationLog(logger, torch.device("cuda"), interval_s=0.0)
    with caplog.at_level(logging.INFO, logger="test.allocations"):
        allocations.check()  # nothing grew
        device["num_device_alloc"] += 4
        host.update({"num_host_alloc": 8, "host_alloc_time.total": 9500})
        allocations.check()
        allocations.check()  # nothing more
    lines = [record.getMessage() for record in caplog.records]
    assert len(lines) == 1
    assert "device_allocs=4 device_frees=0 reserved_gib=3.00 host_allocs=3 host_alloc_ms=7.5" in lines[0]
