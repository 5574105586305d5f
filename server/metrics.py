"""Prometheus metrics of one server instance (own registry, so several apps can coexist)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

LATENCY_BUCKETS = (0.05, 0.1, 0.2, 0.3, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 5.0, 10.0, 30.0)
LOOP_LAG_BUCKETS = (0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0)
RTF_BUCKETS = (0.05, 0.1, 0.2, 0.3, 0.5, 0.75, 1.0, 1.5, 2.0, 5.0, 10.0)


class ServerMetrics:
    """Sessions, turns, speculative turns, errors, dropped audio, end-of-speech latencies and the TTS
    real-time factor."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.sessions_active = Gauge("vita_sessions_active", "Started sessions (seats taken)", registry=self.registry)
        self.sessions_total = Counter("vita_sessions_total", "Sessions started", registry=self.registry)
        self.sessions_rejected = Counter(
            "vita_sessions_rejected_total", "session.start refused because every seat was taken", registry=self.registry
        )
        self.connections_open = Gauge(
            "vita_connections_open", "Websockets let in and not yet ended (each counts against its address's limit)",
            registry=self.registry,
        )
        self.connections_refused = Counter(
            "vita_connections_refused_total",
            "Websockets refused before a session, by reason: unauthorized, origin_not_allowed, "
            "too_many_connections, not_ready",
            ["reason"],
            registry=self.registry,
        )
        self.turns = Counter("vita_turns_total", "User turns by outcome (aborted: the client left while the reply was generated)", ["outcome"], registry=self.registry)
        self.speculative_turns = Counter(
            "vita_speculative_turns_total",
            "Turns started at a pause in speech, by step: started, confirmed (the pause ended the utterance), "
            "discarded (speech resumed, or the session changed)",
            ["step"],
            registry=self.registry,
        )
        self.errors = Counter("vita_errors_total", "Error events sent, by code", ["code"], registry=self.registry)
        self.worker_failures = Counter(
            "vita_worker_failures_total", "Model worker found dead or hung by the watchdog", registry=self.registry
        )
        self.worker_restarts = Counter(
            "vita_worker_restarts_total", "In-process restarts of the model worker, by outcome (ok, failed)",
            ["outcome"], registry=self.registry,
        )
        self.loop_lag_seconds = Histogram(
            "vita_event_loop_lag_seconds", "How late the gateway's event loop woke the watchdog (once a second)",
            buckets=LOOP_LAG_BUCKETS, registry=self.registry,
        )
        self.worker_loop_lag_seconds = Histogram(
            "vita_worker_loop_lag_seconds",
            "How long the model worker's event loop took to answer the watchdog's heartbeat (once a second)",
            buckets=LOOP_LAG_BUCKETS, registry=self.registry,
        )
        self.audio_dropped_segments = Counter(
            "vita_audio_dropped_segments_total", "Reply audio segments dropped for slow readers", registry=self.registry
        )
        self.first_text_seconds = Histogram(
            "vita_end_of_turn_to_first_text_seconds",
            "End of user speech to first reply text delta",
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.first_audio_seconds = Histogram(
            "vita_end_of_turn_to_first_audio_seconds",
            "End of user speech to first reply audio segment",
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.real_time_factor = Histogram(
            "vita_tts_real_time_factor",
            "Speech synthesis time divided by the duration of the audio produced",
            buckets=RTF_BUCKETS,
            registry=self.registry,
        )

    def render(self) -> bytes:
        """Text exposition format for /metrics."""
        return generate_latest(self.registry)
