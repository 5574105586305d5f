"""FastAPI gateway: /ws and /v1/realtime sessions, /healthz, /readyz, /metrics and the web page at /.

Both websocket endpoints run the same ``Session`` (turns, VAD, barge-in) behind the same gate
(``server.auth``); they differ only in how client messages are read and server events written
(``/ws``: ``server.protocol``; ``/v1/realtime``: ``server.realtime``).
"""

from __future__ import annotations

import asyncio
import logging
import time
from contextlib import asynccontextmanager
from typing import AsyncIterator, Awaitable, Callable, Protocol

from fastapi import FastAPI, Response, WebSocket
from fastapi.responses import JSONResponse
from fastapi.staticfiles import StaticFiles
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.websockets import WebSocketDisconnect, WebSocketState

from server.auth import Gatekeeper
from server.gc_pauses import watch_gc
from server.metrics import ServerMetrics
from server.outgoing import Encoding, NativeEncoding, OutgoingQueue
from server.protocol import CLOSE_CODES, MAX_MESSAGE_BYTES, OUTPUT_SAMPLE_RATE, ErrorCode, ErrorEvent
from server.realtime import RealtimeConnection
from server.realtime_protocol import RealtimeEncoding
from server.seats import Seats
from server.session import Session
from server.settings import ServerSettings
from server.turns import Worker
from server.watchdog import WorkerWatchdog

log = logging.getLogger("vita.app")

# uvicorn's websocket options: the message cap, and no per-message deflate (PCM audio hardly
# compresses; deflating every segment was a visible share of the gateway's time at 32 clients on the H200).
WEBSOCKET_OPTIONS = {"ws_max_size": MAX_MESSAGE_BYTES, "ws_per_message_deflate": False}
CLOSE_NORMAL = 1000
FLUSH_TIMEOUT_S = 2.0


class ClientMessages(Protocol):
    """What reads a connection's client messages into its session (the ``Session`` itself for ``/ws``)."""

    async def handle_text(self, text: str) -> None: ...

    def handle_bytes(self, data: bytes) -> None: ...


async def native_messages(session: Session) -> ClientMessages:
    """``/ws``: the session reads the native protocol itself."""
    return session


def create_app(settings: ServerSettings, worker: Worker) -> FastAPI:
    """The gateway app; ``worker`` is started (model loading) and stopped with the app."""
    metrics = ServerMetrics()
    seats = Seats(settings.max_sessions, metrics)
    gate = Gatekeeper(settings, metrics)
    live: dict[Session, asyncio.Task[None]] = {}  # each open session and its reader task

    def end_sessions(reason: str) -> None:
        """The worker failed: every session gets a fatal error and its connection closes."""
        for session, reader in list(live.items()):
            session.fail(ErrorCode.WORKER_FAILED,
                         f"the model worker failed ({reason}) and is restarting; reconnect in a few seconds")
            reader.cancel()

    worker_watchdog = WorkerWatchdog(worker, metrics, end_sessions, hang_timeout_s=settings.worker_hang_timeout_s,
                                     restart_timeout_s=settings.worker_restart_timeout_s)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        worker.start()
        watching = asyncio.create_task(worker_watchdog.run())
        # the worker freezes and watches its own process: with a worker thread, this one too
        gc_watch = asyncio.create_task(watch_gc(log)) if settings.worker_process else None
        try:
            yield
        finally:
            watching.cancel()
            if gc_watch is not None:
                gc_watch.cancel()
            worker.stop()

    app = FastAPI(title="vita-realtime", lifespan=lifespan)

    @app.get("/healthz")
    async def healthz() -> JSONResponse:
        if worker_watchdog.failed:  # the worker could not be restarted: only a new process can serve again
            return JSONResponse({"status": "failed", "error": worker_watchdog.failed}, status_code=503)
        return JSONResponse({"status": "ok"})

    @app.get("/readyz")
    async def readyz() -> JSONResponse:
        if worker.ready and seats.full:  # a load balancer sends new users elsewhere; open sessions go on
            body = {"status": "full", "sessions": seats.taken, "max_sessions": seats.limit}
            return JSONResponse(body, status_code=503)
        if worker.ready:
            return JSONResponse({"status": "ready", "model": worker.model_name})
        failed = worker.load_error or worker_watchdog.failed
        status = "failed" if failed else "restarting" if worker_watchdog.restarting else "loading"
        body = {"status": status, "error": failed or worker_watchdog.restarting}
        return JSONResponse(body, status_code=503)

    @app.get("/metrics")
    async def metrics_endpoint() -> Response:
        return Response(metrics.render(), media_type=CONTENT_TYPE_LATEST)

    async def serve(
        websocket: WebSocket, encoding: Encoding, open_messages: Callable[[Session], Awaitable[ClientMessages]]
    ) -> None:
        """One connection: the gate, then a session until either side ends it."""
        admission = gate.admit(websocket)
        await websocket.accept(subprotocol=admission.subprotocol)
        try:
            if admission.refusal is not None:
                await refuse(websocket, encoding, admission.refusal.code, admission.refusal.message)
                return
            if not worker.ready:
                metrics.connections_refused.labels(ErrorCode.NOT_READY.value).inc()
                await refuse(websocket, encoding, ErrorCode.NOT_READY, "the model is still loading; retry shortly")
                return
            outgoing = OutgoingQueue(int(settings.outgoing_audio_limit_s * OUTPUT_SAMPLE_RATE * 2), encoding)
            session = Session(worker, outgoing, metrics, seats)
            writer = asyncio.create_task(write_loop(websocket, outgoing, session))
            reader = asyncio.create_task(read_loop(websocket, session, await open_messages(session)))
            live[session] = reader
            deadlines = asyncio.create_task(
                watch_deadlines(session, settings.handshake_timeout_s, settings.idle_timeout_s)
            )
            try:
                await asyncio.wait((reader, deadlines), return_when=asyncio.FIRST_COMPLETED)
            finally:
                live.pop(session, None)
                reader.cancel()
                deadlines.cancel()
                await asyncio.gather(reader, deadlines, return_exceptions=True)
                session.close()
                gate.release(admission)  # with its seat: once a session has ended, its address may connect again
                await flush_and_close(websocket, outgoing, writer, session.closing)
                log.info("session_end session=%s reason=%s", session.session_id,
                         session.closing.value if session.closing else "client")
        finally:
            gate.release(admission)

    @app.websocket("/ws")
    async def websocket_endpoint(websocket: WebSocket) -> None:
        await serve(websocket, NativeEncoding(), native_messages)

    @app.websocket("/v1/realtime")
    async def realtime_endpoint(websocket: WebSocket) -> None:
        encoding = RealtimeEncoding()
        await serve(websocket, encoding, lambda session: RealtimeConnection.open(session, encoding))

    if settings.web_dir.is_dir():
        app.mount("/", StaticFiles(directory=settings.web_dir, html=True), name="web")
    return app


async def refuse(websocket: WebSocket, encoding: Encoding, code: ErrorCode, message: str) -> None:
    """Tell a connection why it cannot have a session (in its protocol), then close it cleanly."""
    log.info("session_refused code=%s", code.value)
    try:
        for text in encoding.event(ErrorEvent(code=code, message=message, fatal=True)):
            await websocket.send_text(text)
        await websocket.close(CLOSE_CODES[code], code.value)
    except Exception:  # the client left first: nothing more to tell it
        log.info("session_refused_client_gone code=%s", code.value)


async def watch_deadlines(session: Session, handshake_timeout_s: float, idle_timeout_s: float) -> None:
    """Fail the session (and return) when it is not started within ``handshake_timeout_s`` or,
    once started, has had no speech, turn or event other than audio and video for ``idle_timeout_s``."""
    connected = time.monotonic()
    while True:
        if session.started:
            deadline = session.idle_since() + idle_timeout_s
            code, message = ErrorCode.IDLE_TIMEOUT, f"no speech or other activity for {idle_timeout_s:g} s"
        else:
            deadline = connected + handshake_timeout_s
            code, message = ErrorCode.HANDSHAKE_TIMEOUT, f"no session.start within {handshake_timeout_s:g} s"
        delay = deadline - time.monotonic()
        if delay <= 0:
            session.fail(code, message)
            return
        await asyncio.sleep(delay)


async def read_loop(websocket: WebSocket, session: Session, messages: ClientMessages) -> None:
    """Feed client frames to the session (through ``messages``) until disconnect or a fatal error."""
    while session.closing is None:
        try:
            message = await websocket.receive()
        except (WebSocketDisconnect, RuntimeError):
            return
        if message["type"] == "websocket.disconnect":
            return
        try:
            if message.get("bytes") is not None:
                messages.handle_bytes(message["bytes"])
            elif message.get("text") is not None:
                await messages.handle_text(message["text"])
        except Exception:  # a bug must not take the server or this session down
            log.exception("session_bug session=%s", session.session_id)
            session.client_error(ErrorCode.INTERNAL_ERROR, "internal error while handling the message")


async def write_loop(websocket: WebSocket, outgoing: OutgoingQueue, session: Session) -> None:
    """Send queued messages in order; awaiting each send is the backpressure."""
    while (message := await outgoing.get()) is not None:
        if isinstance(message.data, bytes):
            await websocket.send_bytes(message.data)
        else:
            await websocket.send_text(message.data)
        if message.response_id is not None:
            session.audio_sent(message.response_id, message.samples)


async def flush_and_close(
    websocket: WebSocket, outgoing: OutgoingQueue, writer: asyncio.Task[None], closing: ErrorCode | None
) -> None:
    """Give the writer a moment to send what is queued (e.g. a fatal error), then close with the
    fatal error's close code and code as reason."""
    outgoing.close()
    try:
        await asyncio.wait_for(writer, FLUSH_TIMEOUT_S)
    except Exception:  # timeout or a connection already gone: nothing more can be sent
        writer.cancel()
    if websocket.client_state == WebSocketState.CONNECTED:
        try:
            await websocket.close(CLOSE_CODES.get(closing, CLOSE_NORMAL), closing.value if closing else None)
        except (RuntimeError, OSError):
            pass
