"""ActivityLog: a thread's busy share per activity, one log line per interval."""

import logging
import time

import pytest

from tts.activity_log import ActivityLog


def test_totals_of_each_interval_are_logged_once_then_start_again(caplog: pytest.LogCaptureFixture) -> None:
    logger = logging.getLogger("test.activity")
    caplog.set_level(logging.INFO, logger="test.activity")
    activity = ActivityLog(logger, "worker", interval_s=0.2)
    activity.add("step", 0.01, 4)
    activity.add("step", 0.03, 8)
    activity.add("prefill", 0.02, 1)
    assert not caplog.records  # the interval has not passed
    time.sleep(0.25)
    activity.add("step", 0.04, 6)
    [record] = caplog.records
    fields = dict(part.split("=") for part in record.getMessage().split()[1:])
    window = float(fields["window_s"])
    assert fields["thread"] == "worker" and 0.2 <= window < 1.0
    assert (fields["step_calls"], fields["step_ms"], fields["step_items_per_call"]) == ("3", "26.67", "6.0")
    assert 0.08 / (window + 0.05) <= float(fields["step_busy"]) <= 0.08 / (window - 0.05)  # window_s has one decimal
    assert (fields["prefill_calls"], fields["prefill_ms"]) == ("1", "20.00")
    activity.add("step", 0.01)
    assert len(caplog.records) == 1  # a new interval began
