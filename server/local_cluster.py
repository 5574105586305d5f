"""vita-server replicas behind HAProxy on loopback, each replica a process of its own (scale-out
tests and benchmarks). HAProxy runs the shipped docker/haproxy.cfg, configured by its environment."""

from __future__ import annotations

import csv
import io
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from types import TracebackType

from server.settings import REPO_ROOT

HAPROXY_CONFIG = REPO_ROOT / "docker" / "haproxy.cfg"


def free_port() -> int:
    """A loopback port nothing listens on now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def get_json(url: str, timeout_s: float = 2.0) -> tuple[int, dict]:
    """Status and JSON body of a GET (HTTP errors included)."""
    try:
        with urllib.request.urlopen(url, timeout=timeout_s) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


class Replica:
    """``vita-server`` in its own process on a fixed loopback port; it can be killed, stopped and
    started again on the same port (``flags`` go to vita-server as given; ``cores``: the CPU cores
    it may run on, all when None)."""

    def __init__(self, flags: list[str], log_path: Path, cores: set[int] | None = None) -> None:
        self.port = free_port()
        self.flags = flags
        self.log_path = log_path
        self.cores = cores
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def http_url(self) -> str:
        return f"http://{self.address}"

    def start(self) -> None:
        """Start the process (returns at once; ``wait_ready`` waits for the model)."""
        command = [sys.executable, "-m", "server.cli", "--host", "127.0.0.1", "--port", str(self.port), *self.flags]
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(command, cwd=REPO_ROOT, stdout=log, stderr=subprocess.STDOUT,
                                            preexec_fn=None if self.cores is None else self._pin)

    def _pin(self) -> None:
        """In the child before exec: every thread the server starts inherits these cores."""
        os.sched_setaffinity(0, self.cores)

    def wait_ready(self, timeout_s: float = 120.0) -> None:
        """Until /readyz answers 200; a process that exits first fails with its log's end."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process is None or self.process.poll() is not None:
                raise RuntimeError(f"replica on {self.address} exited:\n{self.log_tail()}")
            try:
                if get_json(f"{self.http_url}/readyz")[0] == 200:
                    return
            except OSError:
                pass
            time.sleep(0.1)
        raise TimeoutError(f"replica on {self.address} did not become ready:\n{self.log_tail()}")

    def sessions(self) -> int:
        """Sessions holding a seat now, from the replica's /metrics."""
        with urllib.request.urlopen(f"{self.http_url}/metrics", timeout=2) as response:
            for line in response.read().decode().splitlines():
                if line.startswith("vita_sessions_active "):
                    return int(float(line.split()[1]))
        raise ValueError("vita_sessions_active is missing from /metrics")

    def kill(self) -> None:
        """SIGKILL, as a crash would: no close frames, no shutdown."""
        self._signal(signal.SIGKILL)

    def stop(self) -> None:
        """SIGTERM: a graceful stop (open sessions are closed with 1012)."""
        self._signal(signal.SIGTERM)

    def _signal(self, signum: int) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signum)
            self.process.wait(30)

    def log_tail(self, lines: int = 30) -> str:
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])


class Balancer:
    """HAProxy with docker/haproxy.cfg in front of ``replicas`` (host:port each), plain http on
    ``port``, https on ``tls_port`` when a ``tls_pem`` (certificate + key) is given, stats on
    ``stats_port``."""

    def __init__(self, replicas: list[str], log_path: Path, tls_pem: Path | None = None,
                 haproxy: str = "haproxy") -> None:
        self.port, self.stats_port = free_port(), free_port()
        self.tls_port = free_port() if tls_pem else None
        self.log_path = log_path
        self.env = {
            **os.environ,
            "VITA_LB_BIND": f"127.0.0.1:{self.port}",
            "VITA_LB_STATS_BIND": f"127.0.0.1:{self.stats_port}",
            **{f"VITA_REPLICA_{i}": address for i, address in enumerate(replicas)},
        }
        if tls_pem:
            self.env |= {"VITA_LB_TLS_BIND": f"127.0.0.1:{self.tls_port}", "VITA_LB_TLS_PEM": str(tls_pem)}
        self.command = [haproxy, "-db", "-f", str(HAPROXY_CONFIG)]
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def http_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def ws_url(self) -> str:
        return f"ws://127.0.0.1:{self.port}/ws"

    def start(self, timeout_s: float = 30.0) -> None:
        """Start HAProxy and wait until it reports every replica up."""
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(self.command, env=self.env, stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"haproxy exited:\n{self.log_path.read_text(errors='replace')}")
            try:
                states = self.server_states()
                if states and all(state == "UP" for state in states.values()):
                    return
            except OSError:
                pass
            time.sleep(0.1)
        raise TimeoutError(f"haproxy did not see every replica up: {self.server_states()}")

    def server_states(self) -> dict[str, str]:
        """Each replica's state as the balancer's health checks see it (UP, DOWN, ...)."""
        url = f"http://127.0.0.1:{self.stats_port}/stats;csv"
        with urllib.request.urlopen(url, timeout=2) as response:
            rows = csv.DictReader(io.StringIO(response.read().decode().lstrip("# ")))
            return {row["svname"]: row["status"].split()[0] for row in rows
                    if row["pxname"] == "vita" and row["svname"] not in ("FRONTEND", "BACKEND")}

    def wait_state(self, server: str, state: str, timeout_s: float = 15.0) -> None:
        """Until the balancer reports ``server`` in ``state``."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.server_states().get(server) == state:
                return
            time.sleep(0.05)
        raise TimeoutError(f"{server} is not {state}: {self.server_states()}")

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            self.process.wait(10)


class LocalCluster:
    """``with LocalCluster(checkpoint, [4, 8], work_dir) as cluster:`` one CPU replica per entry
    (that many seats each) on ``checkpoint``, all ready, with the balancer in front; with
    ``pin_cores`` replica i runs on CPU core i alone (a device of its own, as a GPU per replica)."""

    def __init__(self, checkpoint: Path, max_sessions: list[int], work_dir: Path,
                 flags: list[str] | None = None, tls_pem: Path | None = None, pin_cores: bool = False) -> None:
        self.replicas = [
            Replica(["--checkpoint", str(checkpoint), "--device", "cpu", "--max-sessions", str(seats), *(flags or [])],
                    work_dir / f"replica-{i}.log", cores={i} if pin_cores else None)
            for i, seats in enumerate(max_sessions)
        ]
        self.balancer = Balancer([r.address for r in self.replicas], work_dir / "haproxy.log", tls_pem)

    def start(self) -> None:
        for replica in self.replicas:
            replica.start()
        for replica in self.replicas:
            replica.wait_ready()
        self.balancer.start()

    def stop(self) -> None:
        self.balancer.stop()
        for replica in self.replicas:
            replica.kill()

    def __enter__(self) -> "LocalCluster":
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()
