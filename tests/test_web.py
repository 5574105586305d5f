"""The chat page (web/) in real headless Chromium.

End to end: against the real server on the tiny checkpoint, Chromium gets a fake microphone
that plays a speech clip once (then silence) and a fake camera. The page must capture through
its AudioWorklet, the server must detect the turn and answer, and the page must play the reply.
The page's observable state is in data-* attributes of #app.

Audio pieces: the capture worklet and the player run in an OfflineAudioContext (rendered
faster than real time) and are compared with numpy references.
"""

from __future__ import annotations

import functools
import http.server
import json
import shutil
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import uvicorn

from server.app import create_app
from server.background import BackgroundServer
from server.protocol import OUTPUT_SAMPLE_RATE, decode_audio_segment
from server.settings import ServerSettings
from server.worker import ModelWorker
from shared_data import AUDIO

sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed (pip install playwright)")

CHROMIUM = Path(shutil.which("chromium") or "/usr/bin/chromium")
WEB_DIR = Path(__file__).resolve().parent.parent / "web"
SPEECH_WAV = AUDIO / "en_hello.wav"  # 16 kHz mono int16 speech
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
    "--use-fake-device-for-media-stream",
]
REPLY_TIMEOUT_MS = 120_000
APP = "document.getElementById('app').dataset"


@pytest.fixture(scope="module")
def server_url(tiny_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """The page's URL on the real server (uvicorn, loopback, random port) on the tiny checkpoint.

    One session at a time, so that a second page finds it full. The tiny checkpoint's replies
    are random: the URL asks for greedy decoding, a reply of a few seconds and no silent ☟ replies.
    """
    settings = ServerSettings(max_sessions=1, idle_timeout_s=60, cache_dir=tmp_path_factory.mktemp("cache"))
    with BackgroundServer(settings, tiny_checkpoint) as server:
        yield f"{server.http_url}/?temperature=0&max_new_tokens=64&respect_not_addressed=false"


@pytest.fixture(scope="module")
def playwright() -> Iterator[sync_api.Playwright]:
    if not CHROMIUM.exists():
        pytest.skip(f"no Chromium at {CHROMIUM} (Debian: apt-get install chromium)")
    if not SPEECH_WAV.exists():
        pytest.skip(f"speech clip {SPEECH_WAV} is missing")
    with sync_api.sync_playwright() as driver:
        yield driver


def launch(
    playwright: sync_api.Playwright, speech: Path = SPEECH_WAV, grant_media: bool = True, *extra_args: str
) -> sync_api.Browser:
    """Headless Chromium with a fake camera and a fake microphone that plays ``speech`` once,
    then silence. ``grant_media``: mic and camera are granted without asking; otherwise the
    headless permission prompt answers "no"."""
    args = [*CHROMIUM_ARGS, f"--use-file-for-fake-audio-capture={speech}%noloop", *extra_args]
    if grant_media:
        args.append("--use-fake-ui-for-media-stream")
    return playwright.chromium.launch(executable_path=str(CHROMIUM), args=args)


@pytest.fixture(scope="module")
def browser(playwright: sync_api.Playwright) -> Iterator[sync_api.Browser]:
    browser = launch(playwright)
    yield browser
    browser.close()


class Tab:
    """A page in its own browser context, with the script errors it reported, the websocket
    frames it sent (text as str, binary as bytes) and the reply audio it received."""

    def __init__(self, browser: sync_api.Browser) -> None:
        self.context = browser.new_context()
        self.page = self.context.new_page()
        self.errors: list[str] = []
        self.sent: list[str | bytes] = []
        self.page.on("pageerror", lambda error: self.errors.append(str(error)))
        self.page.on("console", lambda message: message.type == "error" and self.errors.append(message.text))
        self.audio_bytes: dict[int, int] = {}  # reply audio received, per response_id
        self.page.on("websocket", self._watch)

    def _watch(self, websocket: sync_api.WebSocket) -> None:
        websocket.on("framesent", lambda frame: self.sent.append(frame))
        websocket.on("framereceived", self._received)

    def _received(self, frame: str | bytes) -> None:
        if isinstance(frame, bytes):
            response_id, _, pcm = decode_audio_segment(frame)
            self.audio_bytes[response_id] = self.audio_bytes.get(response_id, 0) + len(pcm)

    def state(self) -> dict[str, str]:
        """The page's data-* state attributes of #app."""
        return self.page.eval_on_selector("#app", "app => ({...app.dataset})")

    def wait_for(self, condition: str, timeout_ms: float = 10_000) -> None:
        """Waits until the JS expression ``condition`` over ``app`` (the dataset) is true."""
        self.page.wait_for_function(f"(app => {condition})({APP})", timeout=timeout_ms)


@pytest.fixture()
def tab(browser: sync_api.Browser) -> Iterator[Tab]:
    tab = Tab(browser)
    yield tab
    tab.context.close()


@pytest.fixture(scope="module")
def static_url() -> Iterator[str]:
    """web/ served as plain static files (for the audio pieces, which need no server)."""

    class QuietHandler(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args: object) -> None:
            pass

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(QuietHandler, directory=WEB_DIR))
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}/"
    httpd.shutdown()
    httpd.server_close()


# ---------------------------------------------------------------- audio pieces (OfflineAudioContext)

RENDER_CAPTURE = """async ({ channels, rate, chunkMs }) => {
  const context = new OfflineAudioContext(1, channels[0].length, rate);
  await context.audioWorklet.addModule("./mic-worklet.js");
  const buffer = context.createBuffer(channels.length, channels[0].length, rate);
  channels.forEach((samples, i) => buffer.copyToChannel(new Float32Array(samples), i));
  const source = new AudioBufferSourceNode(context, { buffer });
  const node = new AudioWorkletNode(context, "pcm-capture", {
    numberOfInputs: 1, numberOfOutputs: 0, processorOptions: { chunkMs },
  });
  const chunks = [];
  node.port.onmessage = ({ data }) => chunks.push({ pcm: Array.from(new Int16Array(data.pcm)), level: data.level });
  source.connect(node);
  source.start();
  await context.startRendering();
  await new Promise((resolve) => setTimeout(resolve, 200)); // messages still on their way
  return chunks;
}"""


def test_capture_worklet_makes_pcm16_chunks(tab: Tab, static_url: str) -> None:
    rate, chunk = 48_000, 960  # 20 ms chunks
    stereo = np.random.default_rng(0).uniform(-1.3, 1.3, size=(2, 5 * chunk)).astype(np.float32)
    tab.page.goto(static_url)
    chunks = tab.page.evaluate(RENDER_CAPTURE, {"channels": stereo.tolist(), "rate": rate, "chunkMs": 20})

    mono = np.clip(stereo.astype(np.float64).mean(axis=0), -1.0, 1.0)
    expected = np.trunc(np.where(mono < 0, mono * 32768, mono * 32767)).astype(np.int16)
    assert [len(c["pcm"]) for c in chunks] == [chunk] * 5
    np.testing.assert_array_equal(np.concatenate([c["pcm"] for c in chunks]), expected)
    expected_levels = np.sqrt((mono.reshape(5, chunk) ** 2).mean(axis=1))
    np.testing.assert_allclose([c["level"] for c in chunks], expected_levels, rtol=1e-9)


RENDER_PLAYER = """async ({ segments, rate, seconds, stopAt }) => {
  const { Player } = await import("./player.js");
  const context = new OfflineAudioContext(1, Math.round(rate * seconds), rate);
  const player = new Player(context, { sampleRate: rate, jitterSeconds: 0.05 });
  segments.forEach((segment, i) => player.enqueue(new Int16Array(segment).buffer, i > 0));
  if (stopAt !== null) context.suspend(stopAt).then(() => { player.stop(); context.resume(); });
  const rendered = await context.startRendering();
  return { samples: Array.from(rendered.getChannelData(0)), heard: player.heardSeconds, busy: player.busy };
}"""
RATE = 24_000
JITTER = int(0.05 * RATE)  # the player's jitter buffer in samples


def reply_pcm(seconds: float) -> np.ndarray:
    """A 24 kHz int16 tone with a rising pitch (no two segments look alike)."""
    t = np.arange(int(seconds * RATE)) / RATE
    return (12_000 * np.sin(2 * np.pi * (200 + 300 * t) * t)).astype(np.int16)


def test_player_plays_segments_back_to_back(tab: Tab, static_url: str) -> None:
    reply = reply_pcm(0.6)
    segments = np.split(reply, [1_000, 4_321, 9_000])  # uneven sizes, as the TTS makes them
    tab.page.goto(static_url)
    result = tab.page.evaluate(
        RENDER_PLAYER, {"segments": [s.tolist() for s in segments], "rate": RATE, "seconds": 1.0, "stopAt": None}
    )
    played = np.array(result["samples"])
    expected = np.zeros_like(played)
    expected[JITTER : JITTER + len(reply)] = reply / 32768
    np.testing.assert_allclose(played, expected, atol=1e-7)  # no gap, no overlap, nothing lost
    assert result["heard"] == pytest.approx(0.6, abs=1e-6)
    assert not result["busy"]


def test_player_stop_silences_at_once(tab: Tab, static_url: str) -> None:
    reply = reply_pcm(0.8)
    stop_sample = 9_600  # 0.4 s, on a 128-frame render quantum boundary
    tab.page.goto(static_url)
    result = tab.page.evaluate(
        RENDER_PLAYER,
        {"segments": [s.tolist() for s in np.array_split(reply, 4)], "rate": RATE, "seconds": 1.0, "stopAt": 0.4},
    )
    played = np.array(result["samples"])
    np.testing.assert_allclose(played[JITTER:stop_sample], reply[: stop_sample - JITTER] / 32768, atol=1e-7)
    assert not played[stop_sample:].any()
    assert result["heard"] == pytest.approx((stop_sample - JITTER) / RATE, abs=1e-6)
    assert not result["busy"]


# ---------------------------------------------------------------- the page against the real server


def test_spoken_turn_is_answered_with_audio(tab: Tab, server_url: str, tmp_path: Path) -> None:
    tab.page.goto(server_url)
    assert tab.state()["state"] == "idle"
    tab.page.click("#start")
    tab.wait_for("app.connection === 'connected' && app.state === 'listening'")
    tab.page.wait_for_function("parseFloat(document.getElementById('mic-level').style.width) > 30")  # meter moves

    tab.wait_for("app.state === 'speaking'", REPLY_TIMEOUT_MS)
    tab.wait_for("Number(app.audioPlayed) >= 0.5", REPLY_TIMEOUT_MS)
    tab.page.screenshot(path=tmp_path / "chat.png", full_page=True)

    state = tab.state()
    assert state["connection"] == "connected"
    assert state["error"] == ""
    assert 0 < float(state["latencyMs"]) < REPLY_TIMEOUT_MS
    assert tab.page.locator("#transcript li.user").first.inner_text().startswith("You spoke for")
    assert tab.page.locator("#transcript li.assistant").count() == 1
    assert tab.errors == []

    # The audio went out as PCM16 20 ms chunks at the rate the page announced, which is the
    # browser's own AudioContext rate; the URL's options went into session.start.
    session_start = json.loads(tab.sent[0])
    browser_rate = tab.page.evaluate("new AudioContext().sampleRate")
    assert (session_start["type"], session_start["sample_rate"], session_start["channels"]) == (
        "session.start", browser_rate, 1
    )
    assert session_start["generation"] == {"temperature": 0, "max_new_tokens": 64, "respect_not_addressed": False}
    chunk_sizes = {len(frame) for frame in tab.sent if isinstance(frame, bytes)}
    assert chunk_sizes == {2 * round(browser_rate * 0.02)}


def test_camera_frames_go_with_the_turn(tab: Tab, server_url: str, tmp_path: Path) -> None:
    tab.page.goto(server_url)
    tab.page.click("#start")
    tab.page.click("#camera")  # frames go out at ~2 fps while the clip is heard
    user_turn = tab.page.locator("#transcript li.user", has_text="camera frame")
    user_turn.wait_for(timeout=REPLY_TIMEOUT_MS)
    frames = int(user_turn.inner_text().split("·")[1].split()[0])
    assert 1 <= frames <= 4  # the server attaches the frames of the last second, at most 4
    assert tab.page.eval_on_selector("#camera-preview", "video => video.videoWidth > 0 && !video.paused")
    tab.page.screenshot(path=tmp_path / "camera.png", full_page=True)
    assert tab.errors == []


def test_new_conversation_silences_the_reply_at_once(tab: Tab, server_url: str) -> None:
    tab.page.goto(server_url)
    tab.page.click("#start")
    tab.wait_for("app.state === 'speaking' && Number(app.audioPlayed) >= 0.3", REPLY_TIMEOUT_MS)
    tab.page.click("#new-conversation")
    assert tab.state()["state"] != "speaking"
    heard = float(tab.state()["audioPlayed"])
    tab.page.wait_for_timeout(500)
    assert float(tab.state()["audioPlayed"]) == heard  # nothing more was played
    assert tab.page.locator("#transcript li.assistant.interrupted").count() == 1
    tab.page.locator("#transcript li.note", has_text="forgotten").wait_for()  # the server's session.cleared
    assert tab.errors == []


def test_talking_over_the_reply_stops_it_at_once(
    playwright: sync_api.Playwright, server_url: str, tmp_path: Path
) -> None:
    # The clip, 0.5 s of silence, the clip again: the second utterance starts about 1.5 s into
    # the reply to the first one (several seconds of audio).
    clip, rate = sf.read(SPEECH_WAV, dtype="int16")
    sf.write(tmp_path / "twice.wav", np.concatenate([clip, np.zeros(rate // 2, np.int16), clip]), rate)
    browser = launch(playwright, tmp_path / "twice.wav")
    try:
        tab = Tab(browser)
        tab.page.goto(server_url)
        tab.page.click("#start")
        tab.wait_for("app.state === 'speaking'", REPLY_TIMEOUT_MS)
        first_reply = tab.page.locator("#transcript li.assistant").first
        tab.page.locator("#transcript li.assistant.interrupted").wait_for(timeout=10_000)
        assert tab.state()["state"] != "speaking"
        heard = float(tab.state()["audioPlayed"])
        tab.page.wait_for_timeout(300)
        assert float(tab.state()["audioPlayed"]) == heard  # silent at once, not at the end of a segment
        assert first_reply.evaluate("reply => reply.classList.contains('interrupted')")
        assert heard < reply_seconds(tab, response_id=1) - 0.3
        tab.page.locator("#transcript li.assistant").nth(1).wait_for(timeout=REPLY_TIMEOUT_MS)  # 2nd turn
        assert tab.errors == []
    finally:
        browser.close()


def reply_seconds(tab: Tab, response_id: int) -> float:
    """Seconds of reply audio the server sent for ``response_id`` (from the frames received)."""
    return tab.audio_bytes.get(response_id, 0) / 2 / OUTPUT_SAMPLE_RATE


def test_second_user_is_told_the_server_is_full_and_gets_in_later(browser: sync_api.Browser, server_url: str) -> None:
    first, second = Tab(browser), Tab(browser)
    try:
        for tab in (first, second):
            tab.page.goto(server_url)
        first.page.click("#start")
        first.wait_for("app.connection === 'connected'", timeout_ms=30_000)  # after any earlier session closed
        second.page.click("#start")
        second.wait_for("app.error === 'server_full'")
        assert second.state()["connection"] == "reconnecting"
        assert "full" in second.page.inner_text("#error")

        first.context.close()  # a seat frees up
        second.page.click("#reconnect")
        second.wait_for("app.connection === 'connected' && app.error === ''", timeout_ms=30_000)
        assert not second.page.is_visible("#error")
    finally:
        for tab in (first, second):
            tab.context.close()


def test_lost_server_is_reported_and_retried(
    tab: Tab, tiny_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory
) -> None:
    settings = ServerSettings(max_sessions=1, cache_dir=tmp_path_factory.mktemp("cache"))
    with BackgroundServer(settings, tiny_checkpoint) as server:
        tab.page.goto(server.http_url)
        tab.page.click("#start")
        tab.wait_for("app.connection === 'connected'")
    tab.wait_for("app.error === 'lost' && app.connection === 'reconnecting'")
    assert "Lost the connection" in tab.page.inner_text("#error")
    assert tab.state()["state"] == "idle"
    assert tab.page.inner_text("#state-text") == "Waiting for the server…"
    tab.wait_for("app.error === 'unreachable'")  # the retry found nobody
    assert "Cannot reach the server" in tab.page.inner_text("#error")


@pytest.fixture(scope="module")
def https_url(tiny_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """The real app served over TLS (self-signed certificate), as ``vita-server --ssl-certfile``."""
    openssl = shutil.which("openssl")
    if openssl is None:
        pytest.skip("openssl is needed to make a test certificate")
    folder = tmp_path_factory.mktemp("tls")
    cert, key = folder / "cert.pem", folder / "key.pem"
    subprocess.run(
        [openssl, "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=127.0.0.1",
         "-keyout", str(key), "-out", str(cert)],
        check=True, capture_output=True,
    )
    settings = ServerSettings(max_sessions=1, ssl_certfile=cert, ssl_keyfile=key, cache_dir=folder)
    worker = ModelWorker(settings, tiny_checkpoint, is_tiny=True)
    app = create_app(settings, worker)
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(app, ssl_certfile=cert, ssl_keyfile=key, log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [listener]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 300
    while not (server.started and worker.ready):
        assert worker.load_error is None and time.monotonic() < deadline, worker.load_error or "not ready"
        time.sleep(0.05)
    yield f"https://127.0.0.1:{listener.getsockname()[1]}/"
    server.should_exit = True
    thread.join(30)


def test_page_over_https_talks_over_wss(playwright: sync_api.Playwright, https_url: str) -> None:
    browser = launch(playwright, SPEECH_WAV, True, "--ignore-certificate-errors")
    try:
        tab = Tab(browser)
        with tab.page.expect_websocket() as websocket:
            tab.page.goto(https_url)
            tab.page.click("#start")
        assert websocket.value.url == https_url.replace("https://", "wss://") + "ws"
        tab.wait_for("app.connection === 'connected' && app.state === 'listening'")
        assert tab.errors == []
    finally:
        browser.close()


def test_denied_microphone_is_explained(playwright: sync_api.Playwright, static_url: str) -> None:
    browser = launch(playwright, SPEECH_WAV, False)
    try:
        tab = Tab(browser)
        tab.page.goto(static_url)
        tab.page.click("#start")
        tab.wait_for("app.error !== ''")
        state = tab.state()
        assert state["error"] == "mic_denied"
        assert state["connection"] == "offline"
        assert "denied" in tab.page.inner_text("#error")
    finally:
        browser.close()
