"""The soak benchmark's short form: two clients talk for 15 s to a server in its own process (tiny
checkpoint); every turn is answered, nothing fails, the report and its plot are written, and the
connections and threads the sessions used are released once they end."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from server.settings import REPO_ROOT
from shared_data import AUDIO

CLIENTS = 2


def test_the_short_soak_answers_every_client_and_releases_what_sessions_used(
    tiny_checkpoint: Path, tmp_path: Path
) -> None:
    out = tmp_path / "soak.json"
    command = [sys.executable, "-m", "benchmarks.soak", "--clients", str(CLIENTS), "--duration-s", "15",
               "--sample-s", "5", "--warm-up-s", "0", "--settle-s", "2", "--gap-s", "3",
               "--checkpoint", str(tiny_checkpoint), "--wav", *map(str, sorted(AUDIO.glob("*.wav"))),
               "--json", str(out)]
    run = subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout + run.stderr
    report = json.loads(out.read_text())
    summary = report["summary"]
    assert summary["turns_done"] >= CLIENTS, summary
    assert (summary["errors"], summary["reconnects"], report["server_log_errors"]) == (0, 0, 0), summary
    before, *during, after = report["samples"]
    assert len(during) == 3 and all(r["rss_mib"] > 0 and r["open_fds"] > 0 for r in during)
    assert summary["client_first_audio_ms"]["p50"] > 0 and summary["loop_lag_ms"]["mean"] is not None
    assert after["threads"] == before["threads"], report["samples"]  # no thread per session left behind
    assert after["open_fds"] <= before["open_fds"], report["samples"]  # nor a socket or pipe
    assert out.with_suffix(".png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
