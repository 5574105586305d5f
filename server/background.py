"""Run the gateway with uvicorn in a background thread on a loopback port (tests, benchmarks)."""

from __future__ import annotations

import socket
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path
from types import TracebackType

import uvicorn

from server.app import WEBSOCKET_OPTIONS, create_app
from server.local_cluster import get_json
from server.settings import ServerSettings
from server.worker_process import new_worker


class BackgroundServer:
    """``with BackgroundServer(settings, checkpoint) as server: server.ws_url ...``"""

    def __init__(self, settings: ServerSettings, checkpoint: Path, is_tiny: bool = True) -> None:
        self.settings = settings
        self.worker = new_worker(settings, checkpoint, is_tiny)
        self.app = create_app(settings, self.worker)
        self._socket = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._socket.bind(("127.0.0.1", 0))
        self.port: int = self._socket.getsockname()[1]
        config = uvicorn.Config(
            self.app, log_level="warning", timeout_graceful_shutdown=2, **WEBSOCKET_OPTIONS
        )
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(target=self._server.run, kwargs={"sockets": [self._socket]}, daemon=True)

    @property
    def http_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def ws_url(self) -> str:
        return f"ws://127.0.0.1:{self.port}/ws"

    def get_json(self, path: str) -> tuple[int, dict]:
        """Status and JSON body of a GET."""
        return get_json(self.http_url + path, timeout_s=5)

    def get_text(self, path: str) -> str:
        """Body of a GET as text."""
        with urllib.request.urlopen(self.http_url + path, timeout=5) as response:
            return response.read().decode()

    def start(self, ready_timeout_s: float = 300.0) -> None:
        """Start uvicorn and wait until the model is loaded (/readyz answers 200)."""
        self._thread.start()
        deadline = time.monotonic() + ready_timeout_s
        while time.monotonic() < deadline:
            if self.worker.load_error:
                raise RuntimeError(f"model failed to load: {self.worker.load_error}")
            try:
                if self.get_json("/readyz")[0] == 200:
                    return
            except (urllib.error.URLError, ConnectionError):
                pass
            time.sleep(0.05)
        raise TimeoutError("server did not become ready")

    def stop(self) -> None:
        """Ask uvicorn to exit (the app stops the worker) and wait for its thread."""
        self._server.should_exit = True
        self._thread.join(30)

    def __enter__(self) -> "BackgroundServer":
        self.start()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()
