"""What the gateway hands the worker for one user turn; what comes back is `vita.turn_outputs`."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

import numpy as np
from server.protocol import GenerationSettings
from vita.turn_outputs import OutputCallback


@dataclass(frozen=True)
class TurnRequest:
    """One user turn: an utterance (16 kHz mono int16, as the VAD or the client cut it), typed text,
    or both, with camera frames (JPEG/PNG: those of its last second, or the images the client sent)."""

    session_id: str
    response_id: int
    audio_16k: np.ndarray | None
    frames: list[bytes] = field(default_factory=list)
    generation: GenerationSettings = field(default_factory=GenerationSettings)
    text: str | None = None


class TurnHandle(Protocol):
    def cancel(self, discard: bool = False) -> None:
        """Stop generation and synthesis of this turn as soon as possible; ``discard``: the
        conversation forgets the turn too, as if it had never been asked."""


class TurnRunner(Protocol):
    """The worker as the session sees it."""

    model_name: str

    def open_session(self, session_id: str, system_prompt: str | None) -> None:
        """Start the session's conversation (``None``: VITA's default system prompt)."""

    def reset_session(self, session_id: str, system_prompt: str | None) -> None:
        """Stop its turn and start its conversation afresh."""

    def close_session(self, session_id: str) -> None:
        """Stop its turn and forget the session."""

    def start_turn(self, request: TurnRequest, on_output: OutputCallback) -> TurnHandle:
        """Answer one turn; ``on_output`` is called on the caller's event loop, last with
        ``TurnFinished`` or ``TurnFailed`` unless the turn is cancelled."""


class Worker(TurnRunner, Protocol):
    """The worker as the app and its watchdog see it: `server.worker.ModelWorker` (a thread of this
    process) or `server.worker_process.ProcessWorker` (a child process)."""

    ready: bool
    load_error: str | None
    beat_lag_s: float | None

    def start(self) -> None:
        """Start loading the model (``ready`` turns True when done, else ``load_error`` says why)."""

    def stop(self) -> None:
        """End every turn and the worker."""

    def heartbeat(self) -> None:
        """Ask the worker to answer (``failure`` judges how long ago it last did)."""

    def failure(self, hang_timeout_s: float) -> str | None:
        """Why the worker cannot serve, or None."""

    def restart(self) -> None:
        """Replace a dead or hung worker (its sessions are gone); ``ready`` again once loaded."""
