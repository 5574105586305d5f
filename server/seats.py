"""Seats: at most ``max_sessions`` started sessions, counted in the metrics."""

from __future__ import annotations

from server.metrics import ServerMetrics


class Seats:
    """A seat is taken at ``session.start`` and freed when the connection ends."""

    def __init__(self, limit: int, metrics: ServerMetrics) -> None:
        self.limit = limit
        self.metrics = metrics
        self._taken: set[str] = set()

    @property
    def taken(self) -> int:
        return len(self._taken)

    @property
    def full(self) -> bool:
        """Every seat is taken: the next ``session.start`` would be refused."""
        return len(self._taken) >= self.limit

    def take(self, session_id: str) -> bool:
        """Take a seat for the session; False (counted as rejected) when all are taken."""
        if self.full:
            self.metrics.sessions_rejected.inc()
            return False
        self._taken.add(session_id)
        self.metrics.sessions_total.inc()
        self.metrics.sessions_active.inc()
        return True

    def free(self, session_id: str) -> None:
        """Give the session's seat back (if it had one)."""
        if session_id in self._taken:
            self._taken.remove(session_id)
            self.metrics.sessions_active.dec()
