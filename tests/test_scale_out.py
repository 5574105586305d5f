"""Scale-out on loopback: HAProxy from Debian's package, running the shipped docker/haproxy.cfg, in
front of two CPU replicas of vita-server on the tiny checkpoint, each in its own process; TLS at
the balancer with a certificate made here."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import ssl
import subprocess
import sys
import time
import urllib.request
from collections import Counter
from pathlib import Path

import pytest
import soundfile as sf
import websockets

from server.local_cluster import LocalCluster, get_json
from server.settings import REPO_ROOT
from shared_data import AUDIO

pytestmark = [
    pytest.mark.skipif(shutil.which("haproxy") is None,
                       reason="haproxy is not installed (Debian: apt-get install haproxy; .ci/run installs it)"),
    pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl command to make a certificate"),
]

SEATS = [4, 8]  # vita-0 fills up in the capacity test; vita-1 has room for the rest


@pytest.fixture(scope="module")
def certificate(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A self-signed certificate for 127.0.0.1, and the PEM HAProxy reads (certificate + key)."""
    folder = tmp_path_factory.mktemp("tls")
    cert, key = folder / "cert.pem", folder / "key.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=127.0.0.1",
         "-addext", "subjectAltName=IP:127.0.0.1", "-keyout", str(key), "-out", str(cert)],
        check=True, capture_output=True,
    )
    pem = folder / "site.pem"
    pem.write_bytes(cert.read_bytes() + key.read_bytes())
    return cert, pem


@pytest.fixture(scope="module")
def cluster(tiny_checkpoint: Path, certificate: tuple[Path, Path], tmp_path_factory: pytest.TempPathFactory):
    with LocalCluster(tiny_checkpoint, SEATS, tmp_path_factory.mktemp("cluster"), tls_pem=certificate[1]) as running:
        yield running


@pytest.fixture(autouse=True)
def whole_idle_cluster(cluster: LocalCluster) -> None:
    """Each test starts with every replica running, seen up by the balancer, and holding no session."""
    for replica in cluster.replicas:
        if replica.process.poll() is not None:  # stopped by an earlier test
            replica.start()
            replica.wait_ready()
    for i, replica in enumerate(cluster.replicas):
        deadline = time.monotonic() + 10
        while replica.sessions() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert replica.sessions() == 0
        cluster.balancer.wait_state(f"vita-{i}", "UP")


async def join(url: str, **options: object) -> tuple[websockets.ClientConnection, str]:
    """A started session through the balancer, and the name of the replica that holds it."""
    ws = await websockets.connect(url, **options)
    await ws.send(json.dumps({"type": "session.start", "sample_rate": 16_000}))
    event = json.loads(await asyncio.wait_for(ws.recv(), 10))
    assert event["type"] == "session.ready", event
    return ws, ws.response.headers["X-Vita-Replica"]


async def close_all(sessions: list[tuple[websockets.ClientConnection, str]]) -> None:
    await asyncio.gather(*(ws.close() for ws, _ in sessions))


async def still_served(ws: websockets.ClientConnection) -> bool:
    """The session answers an update."""
    await ws.send(json.dumps({"type": "session.update", "generation": {"max_new_tokens": 8}}))
    return json.loads(await asyncio.wait_for(ws.recv(), 5))["type"] == "session.updated"


async def closed_within(ws: websockets.ClientConnection, timeout_s: float) -> int | None:
    """Read until the connection closes (TimeoutError if it stays open); its close code."""
    with pytest.raises(websockets.ConnectionClosed):
        while True:
            await asyncio.wait_for(ws.recv(), timeout_s)
    return ws.close_code


async def test_users_spread_about_half_and_half(cluster: LocalCluster) -> None:
    users = 2 * 3
    sessions = await asyncio.gather(*(join(cluster.balancer.ws_url) for _ in range(users)))
    named = Counter(replica for _, replica in sessions)
    held = [replica.sessions() for replica in cluster.replicas]
    assert held == [named["vita-0"], named["vita-1"]]  # the header names the replica that holds the session
    assert all(users // 2 - 1 <= count <= users // 2 + 1 for count in held), held
    await close_all(sessions)


async def test_the_realtime_endpoint_is_balanced_too(cluster: LocalCluster) -> None:
    url = f"ws://127.0.0.1:{cluster.balancer.port}/v1/realtime"
    connections = [await websockets.connect(url) for _ in range(2)]
    events = [json.loads(await asyncio.wait_for(ws.recv(), 10)) for ws in connections]
    assert [event["type"] for event in events] == ["session.created"] * 2  # its session starts at once
    assert sorted(ws.response.headers["X-Vita-Replica"] for ws in connections) == ["vita-0", "vita-1"]
    assert [replica.sessions() for replica in cluster.replicas] == [1, 1]
    await asyncio.gather(*(ws.close() for ws in connections))


async def test_a_full_replica_gets_no_new_users_until_a_seat_frees(cluster: LocalCluster) -> None:
    full, other = cluster.replicas
    url = cluster.balancer.ws_url
    sessions = []
    while sum(replica == "vita-0" for _, replica in sessions) < SEATS[0]:
        sessions.append(await join(url))
        assert len(sessions) <= 2 * SEATS[0]  # least connections: both replicas take users until one is full
    assert get_json(f"{full.http_url}/readyz") == (503, {"status": "full", "sessions": 4, "max_sessions": 4})
    cluster.balancer.wait_state("vita-0", "DOWN", timeout_s=5)

    late = [await join(url) for _ in range(3)]  # join() asserts session.ready: nobody got server_full
    assert [replica for _, replica in late] == ["vita-1"] * 3
    assert other.sessions() == sum(replica == "vita-1" for _, replica in sessions) + 3
    assert get_json(f"{cluster.balancer.http_url}/readyz") == (200, {"status": "ready", "replicas_ready": 1})
    assert all([await still_served(ws) for ws, replica in sessions if replica == "vita-0"])  # kept while full

    first_on_full = next(ws for ws, replica in sessions if replica == "vita-0")
    await first_on_full.close()
    cluster.balancer.wait_state("vita-0", "UP", timeout_s=10)
    again = await join(url)
    assert again[1] == "vita-0"  # it holds fewer users than vita-1
    await close_all(sessions + late + [again])


async def test_a_killed_replica_closes_its_users_and_the_survivor_takes_new_ones(cluster: LocalCluster) -> None:
    victim, survivor = cluster.replicas
    url, balancer_ready = cluster.balancer.ws_url, f"{cluster.balancer.http_url}/readyz"
    sessions = [await join(url) for _ in range(4)]
    on_victim = [ws for ws, replica in sessions if replica == "vita-0"]
    on_survivor = [ws for ws, replica in sessions if replica == "vita-1"]
    assert len(on_victim) == len(on_survivor) == 2

    victim.kill()  # SIGKILL: no close frame, as in a crash
    for ws in on_victim:
        await closed_within(ws, timeout_s=5)  # the balancer ends the client side at once
    assert get_json(balancer_ready)[0] == 200
    newcomers = [await join(url) for _ in range(2)]  # even before a check notices, a refused connect is redispatched
    assert [replica for _, replica in newcomers] == ["vita-1"] * 2
    cluster.balancer.wait_state("vita-0", "DOWN", timeout_s=5)
    assert get_json(balancer_ready) == (200, {"status": "ready", "replicas_ready": 1})
    assert all([await still_served(ws) for ws in on_survivor])

    victim.start()
    victim.wait_ready()
    cluster.balancer.wait_state("vita-0", "UP", timeout_s=10)
    returning = [await join(url) for _ in range(2)]
    assert [replica for _, replica in returning] == ["vita-0"] * 2  # it holds none, the survivor 4
    await close_all([(ws, "") for ws in on_survivor] + newcomers + returning)


def test_tls_at_the_balancer_carries_a_spoken_conversation(
    cluster: LocalCluster, certificate: tuple[Path, Path], tmp_path: Path
) -> None:
    cert, _ = certificate
    https = f"https://127.0.0.1:{cluster.balancer.tls_port}"
    with urllib.request.urlopen(f"{https}/readyz", context=ssl.create_default_context(cafile=str(cert))) as response:
        assert json.loads(response.read())["status"] == "ready"
    out = tmp_path / "reply.wav"
    settings = {"generation": {"respect_not_addressed": False, "temperature": 0, "max_new_tokens": 24}}
    run = subprocess.run(
        [sys.executable, "-m", "server.client", str(AUDIO / "en_hello.wav"), "--url",
         f"wss://127.0.0.1:{cluster.balancer.tls_port}/ws", "--out", str(out), "--speed", "3",
         "--settings", json.dumps(settings)],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=120,
        env={**os.environ, "SSL_CERT_FILE": str(cert)},  # how a client trusts a self-signed certificate
    )
    assert run.returncode == 0, run.stdout + run.stderr
    assert sf.info(out).frames > 0


async def test_stopped_replicas_close_sessions_with_1012_and_an_empty_pool_is_not_ready(
    cluster: LocalCluster,
) -> None:
    sessions = [await join(cluster.balancer.ws_url) for _ in range(2)]
    assert sorted(replica for _, replica in sessions) == ["vita-0", "vita-1"]
    for (ws, name), replica in zip(sorted(sessions, key=lambda s: s[1]), cluster.replicas):
        replica.stop()  # SIGTERM, as docker stop or a rolling restart
        assert await closed_within(ws, timeout_s=10) in (1001, 1012)  # going away / service restart
        cluster.balancer.wait_state(name, "DOWN", timeout_s=5)
    assert get_json(f"{cluster.balancer.http_url}/readyz") == (503, {"status": "no replica ready", "replicas_ready": 0})
