"""`vita-server` and `vita-client` as processes: banner, a spoken reply saved to WAV, graceful stop."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import shutil
import ssl
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import websockets

from server.client import Turn, read_wav
from server.local_cluster import free_port
from vita.tiny_checkpoint import TINY_CHECKPOINT_VERSION
from shared_data import AUDIO

REPO = Path(__file__).resolve().parent.parent
HELLO = AUDIO / "en_hello.wav"


def wait_ready(url: str, process: subprocess.Popen, context: ssl.SSLContext | None = None) -> None:
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        assert process.poll() is None, process.stdout.read()
        try:
            with urllib.request.urlopen(f"{url}/readyz", timeout=1, context=context) as response:
                if response.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.1)
    raise TimeoutError("vita-server did not become ready")


def start_server(tiny_checkpoint: Path, cache: Path, *flags: str) -> tuple[subprocess.Popen, int]:
    """`vita-server` without --checkpoint: it takes the tiny checkpoint from its cache folder."""
    (cache / f"vita_tiny_ckpt_v{TINY_CHECKPOINT_VERSION}").symlink_to(tiny_checkpoint)  # skip regenerating it
    port = free_port()
    process = subprocess.Popen(
        [sys.executable, "-m", "server.cli", "--port", str(port), "--cache-dir", str(cache), *flags],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env={**os.environ, "VITA_LOG_FORMAT": "json"},
    )
    return process, port


def stop(process: subprocess.Popen) -> None:
    if process.poll() is None:
        process.kill()
        process.wait()


@pytest.fixture(scope="module")
def server_process(tiny_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory):
    process, port = start_server(tiny_checkpoint, tmp_path_factory.mktemp("cache"), "--max-sessions", "4")
    try:
        wait_ready(f"http://127.0.0.1:{port}", process)
        yield process, port
    finally:
        stop(process)


def test_client_saves_the_spoken_reply_and_prints_timings(server_process, tmp_path: Path) -> None:
    _, port = server_process
    out = tmp_path / "reply.wav"
    settings = {"generation": {"respect_not_addressed": False, "temperature": 0, "max_new_tokens": 24}}
    run = subprocess.run(
        [sys.executable, "-m", "server.client", str(HELLO), "--url", f"ws://127.0.0.1:{port}/ws",
         "--out", str(out), "--speed", "3", "--settings", json.dumps(settings)],
        cwd=REPO, capture_output=True, text=True, timeout=120,
    )
    assert run.returncode == 0, run.stderr
    reply, rate = sf.read(out, dtype="int16")
    assert rate == 24_000 and reply.ndim == 1 and len(reply) > 0
    lines = run.stdout.splitlines()
    table_row = next(line for line in lines if line.split()[:1] == ["1"])
    assert table_row.split()[-1] == "answer"
    assert f"({len(reply) / 24_000:.2f} s)" in lines[-1]


def stereo_at(rate: int) -> np.ndarray:
    import soxr

    mono, source_rate = sf.read(HELLO, dtype="float32")
    resampled = soxr.resample(mono, source_rate, rate)
    return np.round(np.stack([resampled, resampled], axis=1) * 32767).astype(np.int16)


def test_client_streams_any_rate_and_channels(server_process, tmp_path: Path) -> None:
    _, port = server_process
    wav = tmp_path / "hello_22k_stereo.wav"
    sf.write(wav, stereo_at(22_050), 22_050, subtype="PCM_16")
    settings = {"generation": {"respect_not_addressed": False, "temperature": 0, "max_new_tokens": 8}}
    run = subprocess.run(
        [sys.executable, "-m", "server.client", str(wav), "--url", f"ws://127.0.0.1:{port}/ws",
         "--out", str(tmp_path / "r.wav"), "--speed", "4", "--settings", json.dumps(settings)],
        cwd=REPO, capture_output=True, text=True, timeout=120,
    )
    assert run.returncode == 0, run.stderr
    assert "error" not in run.stdout
    assert sf.info(tmp_path / "r.wav").frames > 0


@pytest.mark.parametrize("subtype", ["FLOAT", "PCM_24"])
def test_read_wav_scales_float_and_24_bit_files_to_int16(subtype: str, tmp_path: Path) -> None:
    hello, rate = sf.read(HELLO, dtype="int16")
    wav = tmp_path / f"hello_{subtype}.wav"
    sf.write(wav, hello.astype(np.float32) / 32768, rate, subtype=subtype)
    audio, read_rate = read_wav(wav)
    assert read_rate == rate and audio.dtype == np.int16
    assert np.abs(audio.astype(np.int32) - hello).max() <= 1


def test_client_reads_a_float_wav(server_process, tmp_path: Path) -> None:
    _, port = server_process
    hello, rate = sf.read(HELLO, dtype="float32")
    wav = tmp_path / "hello_float.wav"
    sf.write(wav, hello, rate, subtype="FLOAT")
    settings = {"generation": {"respect_not_addressed": False, "temperature": 0, "max_new_tokens": 8}}
    run = subprocess.run(
        [sys.executable, "-m", "server.client", str(wav), "--url", f"ws://127.0.0.1:{port}/ws",
         "--out", str(tmp_path / "r.wav"), "--speed", "4", "--settings", json.dumps(settings)],
        cwd=REPO, capture_output=True, text=True, timeout=120,
    )
    assert run.returncode == 0, run.stdout + run.stderr  # read as int16 the file was silence: no reply
    assert sf.info(tmp_path / "r.wav").frames > 0


def test_client_exits_non_zero_on_a_refused_connection(tmp_path: Path) -> None:
    out = tmp_path / "reply.wav"
    run = subprocess.run(
        [sys.executable, "-m", "server.client", str(HELLO), "--url", f"ws://127.0.0.1:{free_port()}/ws",
         "--out", str(out)],
        cwd=REPO, capture_output=True, text=True, timeout=60,
    )
    assert run.returncode != 0
    assert len(run.stderr.splitlines()) == 1 and run.stderr.startswith("vita-client: cannot talk to"), run.stderr
    assert not out.exists()


def test_sigterm_closes_sessions_and_exits_cleanly(server_process) -> None:
    process, port = server_process

    async def connect_then_stop() -> int | None:
        async with websockets.connect(f"ws://127.0.0.1:{port}/ws") as ws:
            await ws.send(json.dumps({"type": "session.start", "sample_rate": 16_000}))
            await asyncio.wait_for(ws.recv(), 5)
            process.send_signal(signal.SIGTERM)
            with pytest.raises(websockets.ConnectionClosed):
                while True:
                    await asyncio.wait_for(ws.recv(), 15)
            return ws.close_code

    close_code = asyncio.run(connect_then_stop())
    assert close_code in (1001, 1012)
    assert process.wait(timeout=30) in (0, -signal.SIGTERM)  # uvicorn re-raises the signal after its shutdown
    logs = process.stdout.read()
    banner = logs.splitlines()[:3]
    assert any("TINY RANDOM checkpoint" in line and "noise" in line for line in banner)
    json_lines = [json.loads(line) for line in logs.splitlines() if line.startswith("{")]
    assert any(entry["message"].startswith("model_loaded") for entry in json_lines)
    assert any(entry["message"].startswith("session_end") for entry in json_lines)
    assert any(entry["message"] == "worker_stopped" for entry in json_lines)  # lifespan shutdown ran


@pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl command to make a certificate")
def test_tls_options_serve_wss(tiny_checkpoint: Path, tmp_path: Path) -> None:
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=localhost",
         "-addext", "subjectAltName=IP:127.0.0.1", "-keyout", str(key), "-out", str(cert)],
        check=True, capture_output=True,
    )
    (tmp_path / "cache").mkdir()
    tls_flags = ("--ssl-certfile", str(cert), "--ssl-keyfile", str(key))
    process, port = start_server(tiny_checkpoint, tmp_path / "cache", *tls_flags)
    context = ssl.create_default_context(cafile=str(cert))
    try:
        wait_ready(f"https://127.0.0.1:{port}", process, context)

        async def start_session() -> dict:
            async with websockets.connect(f"wss://127.0.0.1:{port}/ws", ssl=context) as ws:
                await ws.send(json.dumps({"type": "session.start", "sample_rate": 16_000}))
                return json.loads(await asyncio.wait_for(ws.recv(), 5))

        assert asyncio.run(start_session())["type"] == "session.ready"
    finally:
        stop(process)
    assert "https://" in process.stdout.read().splitlines()[0]


def test_playback_gaps_are_the_silences_a_listener_would_hear() -> None:
    """24 kHz segments of 0.5 s: the second arrives while the first plays (no gap), the third 0.3 s
    after the second has ended (0.08 s jitter buffer included)."""
    turn = Turn(response_id=1, speech_ended_at=0.0)
    half_second = np.zeros(12_000, dtype=np.int16)
    for arrived in (1.0, 1.2, 2.38):
        turn.audio.append(half_second)
        turn.audio_arrivals.append(arrived)
    # plays 1.08-1.58, 1.58-2.08, then waits until 2.38
    assert turn.playback_gaps_s() == pytest.approx([0.3])
    assert turn.playback_gaps_s(jitter_s=0.4) == []  # a deeper buffer hides it
