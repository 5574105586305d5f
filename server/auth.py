"""Who may open a websocket (``/ws`` and ``/v1/realtime`` alike): API keys, browser origins and
open connections per client address.

A key comes in an ``Authorization: Bearer <key>`` header, an ``api_key`` query parameter, or,
from browsers (which cannot set headers on a websocket), an ``openai-insecure-api-key.<key>``
websocket subprotocol. Without configured keys every client is let in. Browsers send an
``Origin``: the page's own origin (the same host as the request) is always allowed, others only
when listed (``*``: any). Clients that send no ``Origin`` are not browsers and are not checked.
"""

from __future__ import annotations

import hmac
from collections import Counter
from dataclasses import dataclass
from urllib.parse import urlsplit

from starlette.websockets import WebSocket

from server.metrics import ServerMetrics
from server.protocol import ErrorCode, ProtocolError
from server.settings import ServerSettings

KEY_SUBPROTOCOL_PREFIX = "openai-insecure-api-key."
KEY_QUERY_PARAMETER = "api_key"


@dataclass(eq=False)
class Admission:
    """The verdict on one websocket: the subprotocol to accept it with, and why it is refused (if it is)."""

    client_ip: str
    subprotocol: str | None
    refusal: ProtocolError | None


class Gatekeeper:
    """Checks each websocket before it gets a session and counts the open ones per address."""

    def __init__(self, settings: ServerSettings, metrics: ServerMetrics) -> None:
        self.api_keys = [key.encode() for key in settings.api_keys]
        self.allowed_origins = set(settings.allowed_origins)
        self.max_per_ip = settings.max_connections_per_ip
        self.metrics = metrics
        self._open: Counter[str] = Counter()
        self._held: set[Admission] = set()  # admitted and not yet released

    def admit(self, websocket: WebSocket) -> Admission:
        """The verdict (counted in the metrics when a refusal); an admitted connection holds its
        address's count until ``release``."""
        client_ip = websocket.client.host if websocket.client else "unknown"
        offered: list[str] = list(websocket.scope.get("subprotocols", []))
        refusal = self._origin_refusal(websocket) or self._key_refusal(websocket, offered)
        if refusal is None and self.max_per_ip and self._open[client_ip] >= self.max_per_ip:
            refusal = ProtocolError(ErrorCode.TOO_MANY_CONNECTIONS,
                                    f"at most {self.max_per_ip} connections from one address")
        admission = Admission(client_ip, chosen_subprotocol(offered), refusal)
        if refusal is None:
            self._open[client_ip] += 1
            self._held.add(admission)
            self.metrics.connections_open.inc()
        else:
            self.metrics.connections_refused.labels(refusal.code.value).inc()
        return admission

    def release(self, admission: Admission) -> None:
        """The admitted connection ended (again: nothing happens)."""
        if admission in self._held:
            self._held.remove(admission)
            self.metrics.connections_open.dec()
            self._open[admission.client_ip] -= 1
            if self._open[admission.client_ip] <= 0:
                del self._open[admission.client_ip]

    def _origin_refusal(self, websocket: WebSocket) -> ProtocolError | None:
        origin = websocket.headers.get("origin")
        if origin is None or "*" in self.allowed_origins or origin in self.allowed_origins:
            return None
        if urlsplit(origin).netloc == websocket.headers.get("host"):
            return None
        return ProtocolError(ErrorCode.ORIGIN_NOT_ALLOWED, f"origin {origin[:200]} is not allowed")

    def _key_refusal(self, websocket: WebSocket, offered: list[str]) -> ProtocolError | None:
        if not self.api_keys:
            return None
        given = presented_keys(websocket, offered)
        if not given:
            return ProtocolError(ErrorCode.UNAUTHORIZED, "an API key is required (Authorization: Bearer <key>, "
                                 f"?{KEY_QUERY_PARAMETER}=<key> or the {KEY_SUBPROTOCOL_PREFIX}<key> subprotocol)")
        if any(hmac.compare_digest(key.encode(), known) for key in given for known in self.api_keys):
            return None
        return ProtocolError(ErrorCode.UNAUTHORIZED, "invalid API key")


def presented_keys(websocket: WebSocket, offered: list[str]) -> list[str]:
    """Every key the client brought, wherever it put it."""
    keys = []
    scheme, _, token = websocket.headers.get("authorization", "").partition(" ")
    if scheme.lower() == "bearer" and token.strip():
        keys.append(token.strip())
    if query_key := websocket.query_params.get(KEY_QUERY_PARAMETER):
        keys.append(query_key)
    keys += [p.removeprefix(KEY_SUBPROTOCOL_PREFIX) for p in offered if p.startswith(KEY_SUBPROTOCOL_PREFIX)]
    return keys


def chosen_subprotocol(offered: list[str]) -> str | None:
    """The subprotocol to accept: a browser that offers any must get one back. The first that is
    not a key (e.g. ``realtime``), else the key one (the client knows its own key)."""
    plain = [p for p in offered if not p.startswith(KEY_SUBPROTOCOL_PREFIX)]
    return (plain or offered or [None])[0]
