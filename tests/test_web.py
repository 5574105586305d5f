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
import io
import json
import math
import os
import shutil
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
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
    frames it sent (text as str, binary as bytes), the JSON events and the reply audio it
    received."""

    def __init__(self, browser: sync_api.Browser, init_script: str = "", **context_options: object) -> None:
        self.context = browser.new_context(**context_options)
        if init_script:
            self.context.add_init_script(init_script)
        self.page = self.context.new_page()
        self.errors: list[str] = []
        self.sent: list[str | bytes] = []
        self.received: list[dict] = []  # JSON events
        self.page.on("pageerror", lambda error: self.errors.append(str(error)))
        self.page.on("console", lambda message: message.type == "error" and self.errors.append(message.text))
        self.audio: dict[int, bytearray] = {}  # reply audio received (PCM16 LE), per response_id
        self.page.on("websocket", self._watch)

    def _watch(self, websocket: sync_api.WebSocket) -> None:
        websocket.on("framesent", lambda frame: self.sent.append(frame))
        websocket.on("framereceived", self._received)

    def _received(self, frame: str | bytes) -> None:
        if isinstance(frame, bytes):
            response_id, _, pcm = decode_audio_segment(frame)
            self.audio.setdefault(response_id, bytearray()).extend(pcm)
        else:
            self.received.append(json.loads(frame))

    def sent_events(self, event_type: str) -> list[dict]:
        """The JSON events of ``event_type`` the page sent."""
        events = (json.loads(frame) for frame in self.sent if isinstance(frame, str))
        return [event for event in events if event["type"] == event_type]

    def reply_text(self, response_id: int) -> str:
        """The text the server sent for ``response_id`` (its deltas)."""
        return "".join(
            e["delta"] for e in self.received if e["type"] == "response.text.delta" and e["response_id"] == response_id
        )

    def state(self) -> dict[str, str]:
        """The page's data-* state attributes of #app."""
        return self.page.eval_on_selector("#app", "app => ({...app.dataset})")

    def wait_for(self, condition: str, timeout_ms: float = 10_000) -> None:
        """Waits until the JS expression ``condition`` over ``app`` (the dataset) is true."""
        self.page.wait_for_function(f"(app => {condition})({APP})", timeout=timeout_ms)

    def meter(self, name: str) -> sync_api.Locator:
        return self.page.get_by_role("meter", name=name)


@pytest.fixture()
def tab(browser: sync_api.Browser) -> Iterator[Tab]:
    tab = Tab(browser)
    yield tab
    tab.context.close()


@pytest.fixture()
def open_tab(browser: sync_api.Browser) -> Iterator[Callable[..., Tab]]:
    """Opens Tabs (``Tab``'s arguments after the browser); all are closed after the test."""
    tabs: list[Tab] = []

    def open_tab(init_script: str = "", **context_options: object) -> Tab:
        tabs.append(Tab(browser, init_script, **context_options))
        return tabs[-1]

    yield open_tab
    for tab in tabs:
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


RENDER_PLAYER = """async ({ segments, rate, seconds, stopAt, volume }) => {
  const { Player } = await import("./player.js");
  const context = new OfflineAudioContext(1, Math.round(rate * seconds), rate);
  const player = new Player(context, { sampleRate: rate, jitterSeconds: 0.05 });
  player.volume = volume;
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


def test_player_plays_segments_back_to_back_at_its_volume(tab: Tab, static_url: str) -> None:
    reply = reply_pcm(0.6)
    segments = np.split(reply, [1_000, 4_321, 9_000])  # uneven sizes, as the TTS makes them
    tab.page.goto(static_url)
    result = tab.page.evaluate(
        RENDER_PLAYER,
        {"segments": [s.tolist() for s in segments], "rate": RATE, "seconds": 1.0, "stopAt": None, "volume": 0.5},
    )
    played = np.array(result["samples"])
    expected = np.zeros_like(played)
    expected[JITTER : JITTER + len(reply)] = reply / 32768 * 0.5
    np.testing.assert_allclose(played, expected, atol=1e-7)  # no gap, no overlap, nothing lost
    assert result["heard"] == pytest.approx(0.6, abs=1e-6)
    assert not result["busy"]


def test_player_stop_silences_at_once(tab: Tab, static_url: str) -> None:
    reply = reply_pcm(0.8)
    stop_sample = 9_600  # 0.4 s, on a 128-frame render quantum boundary
    tab.page.goto(static_url)
    result = tab.page.evaluate(
        RENDER_PLAYER,
        {
            "segments": [s.tolist() for s in np.array_split(reply, 4)],
            "rate": RATE, "seconds": 1.0, "stopAt": 0.4, "volume": 1.0,
        },
    )
    played = np.array(result["samples"])
    np.testing.assert_allclose(played[JITTER:stop_sample], reply[: stop_sample - JITTER] / 32768, atol=1e-7)
    assert not played[stop_sample:].any()
    assert result["heard"] == pytest.approx((stop_sample - JITTER) / RATE, abs=1e-6)
    assert not result["busy"]


# ---------------------------------------------------------------- the page against the real server


# Init scripts: they run in the page before its own scripts.
RECORDER = """
window.__seen = { states: [], connection: [], emptyReplies: 0 };
document.addEventListener("DOMContentLoaded", () => {
  const seen = window.__seen, app = document.getElementById("app");
  const note = (list, value) => list[list.length - 1] !== value && list.push(value);
  new MutationObserver(() => note(seen.states, app.dataset.state)).observe(app, { attributeFilter: ["data-state"] });
  const connection = document.getElementById("connection-text");
  new MutationObserver(() => note(seen.connection, connection.textContent))
    .observe(connection, { childList: true, characterData: true, subtree: true });
  new MutationObserver((changes) => {
    for (const change of changes) for (const item of change.addedNodes) {
      if (item.classList?.contains("assistant") && item.textContent === "") seen.emptyReplies += 1;
    }
  }).observe(document.getElementById("transcript"), { childList: true });
});
"""
# The network holds back the first reply's second audio segment (and all after it) for 1.5 s:
# a gap the page must ride out.
HOLD_SECOND_SEGMENT = """
(() => {
  const RealWebSocket = window.WebSocket;
  let held = false;
  window.WebSocket = class extends RealWebSocket {
    set onmessage(handler) {
      let queue = null;
      super.onmessage = (event) => {
        if (!held && event.data instanceof ArrayBuffer && new DataView(event.data).getUint32(4, true) === 1) {
          held = true;
          queue = [];
          setTimeout(() => { queue.forEach(handler); queue = null; }, 1500);
        }
        if (queue) queue.push(event); else handler(event);
      };
    }
  };
})();
"""
# WCAG contrast of every visible piece of text (pseudo-element text included) against the
# backgrounds under it, composited from the computed styles of its ancestors.
CONTRAST_FAILURES = """() => {
  const rgba = (css) => { const [r, g, b, a = 1] = css.match(/[\\d.]+/g).map(Number); return [r, g, b, a]; };
  const over = ([r, g, b, a], [R, G, B]) => [r * a + R * (1 - a), g * a + G * (1 - a), b * a + B * (1 - a)];
  const luminance = (rgb) => {
    const [r, g, b] = rgb.map((v) => { v /= 255; return v <= 0.04045 ? v / 12.92 : ((v + 0.055) / 1.055) ** 2.4; });
    return 0.2126 * r + 0.7152 * g + 0.0722 * b;
  };
  const background = (element) => {
    const chain = [];
    for (let e = element; e; e = e.parentElement) chain.unshift(getComputedStyle(e).backgroundColor);
    return chain.reduce((under, css) => over(rgba(css), under), [255, 255, 255]);
  };
  const failures = [];
  const check = (element, style, what) => {
    const back = background(element);
    const [l1, l2] = [luminance(over(rgba(style.color), back)), luminance(back)].sort((a, b) => b - a);
    const ratio = (l1 + 0.05) / (l2 + 0.05);
    if (ratio < 4.5) failures.push(`${what}: ${ratio.toFixed(2)} (${style.color} on rgb(${back.map(Math.round)}))`);
  };
  for (const element of document.body.querySelectorAll("*")) {
    if (!element.checkVisibility({ visibilityProperty: true }) || element.closest("video")) continue;
    const text = [...element.childNodes].some((n) => n.nodeType === Node.TEXT_NODE && n.data.trim());
    const name = `${element.tagName.toLowerCase()}#${element.id}.${element.className} "${element.textContent.trim().slice(0, 30)}"`;
    if (text || element.matches("input:not([type=range]):not([type=checkbox]), select, textarea")) {
      check(element, getComputedStyle(element), name);
    }
    for (const pseudo of ["::before", "::after"]) {
      const style = getComputedStyle(element, pseudo);
      if (style.content.startsWith('"') && style.content.length > 2) check(element, style, `${name}${pseudo}`);
    }
  }
  return failures;
}"""


def assert_contrast(page: sync_api.Page) -> None:
    """All visible text reads at 4.5:1 or more, in the light and in the dark theme."""
    for scheme in ("light", "dark"):
        page.emulate_media(color_scheme=scheme)
        assert page.evaluate(CONTRAST_FAILURES) == [], scheme
    page.emulate_media(color_scheme="light")


def screenshot(page: sync_api.Page, name: str, tmp_path: Path) -> None:
    """A screenshot of the page; into $VITA_WEB_SCREENSHOTS when set (the README's pictures)."""
    folder = Path(os.environ.get("VITA_WEB_SCREENSHOTS", tmp_path))
    folder.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=folder / f"{name}.png")


def in_viewport(page: sync_api.Page, selector: str) -> bool:
    return page.eval_on_selector(
        selector, "e => { const r = e.getBoundingClientRect(); return r.top >= 0 && r.bottom <= innerHeight; }"
    )


def download(page: sync_api.Page, selector: str) -> bytes:
    with page.expect_download() as info:
        page.click(selector)
    return Path(info.value.path()).read_bytes()


def test_spoken_turn_is_answered_with_audio(open_tab: Callable[..., Tab], server_url: str, tmp_path: Path) -> None:
    """The main flow on a desktop screen, and what the page shows of it: a reply whose audio
    runs dry in the middle, the event log, the downloads, the settings the server echoed,
    roles for assistive technology, contrast in both themes, reduced motion."""
    tab = open_tab(RECORDER + HOLD_SECOND_SEGMENT, viewport={"width": 1366, "height": 768}, accept_downloads=True)
    page = tab.page
    page.goto(server_url)
    assert tab.state()["state"] == "idle"
    page.click("#start")
    tab.wait_for("app.connection === 'connected' && app.state === 'listening'")
    page.wait_for_function("document.getElementById('mic-meter').getAttribute('aria-valuenow') > 30")  # meter moves
    assert not page.is_visible("#headphones-hint")  # Chromium's fake mic is echo-cancelled
    note = page.locator("#transcript li.note").first.inner_text()
    assert "vita_tiny_ckpt" in note and "/" not in note  # the model's name, not its path

    tab.wait_for("app.state === 'speaking'", REPLY_TIMEOUT_MS)
    page.emulate_media(reduced_motion="reduce")
    assert page.eval_on_selector("#state-orb", "orb => getComputedStyle(orb).animationName") == "none"
    page.emulate_media(reduced_motion="no-preference")
    assert page.eval_on_selector("#state-orb", "orb => getComputedStyle(orb).animationName") == "pulse"
    page.wait_for_function(
        "document.getElementById('voice-meter').getAttribute('aria-valuenow') > 30"
    )  # the assistant's voice
    tab.wait_for("app.state === 'listening' && Number(app.audioPlayed) > 0", REPLY_TIMEOUT_MS)  # heard to the end

    state = tab.state()
    assert state["connection"] == "connected"
    assert state["error"] == ""
    assert 0 < float(state["latencyMs"]) < REPLY_TIMEOUT_MS
    # The held segment made one gap; the state stayed "speaking" through it, no empty bubble showed.
    seen = page.evaluate("window.__seen")
    assert seen["states"][seen["states"].index("speaking"):] == ["speaking", "listening"]
    assert seen["emptyReplies"] == 0
    assert state["underruns"] == "1" and page.inner_text("#audio-played").endswith("(1 gap)")

    text = tab.reply_text(1)
    assert text
    assert page.get_by_role("log", name="Conversation").locator("li.assistant").inner_text().startswith(text)
    assert page.locator("#transcript li.user").first.inner_text().startswith("You spoke for")
    assert page.get_by_role("status").filter(has_text="Listening").count() == 1
    assert page.get_by_role("button", name="Camera").get_attribute("aria-pressed") == "false"

    # The event log has the server's timings of the reply.
    done = next(e for e in tab.received if e["type"] == "response.done")
    page.click("#log-panel summary")
    log = page.inner_text("#event-log")
    first_audio_ms = math.floor(done["timings"]["end_of_speech_to_first_audio_ms"] + 0.5)  # JS Math.round
    assert f"→ first audio {first_audio_ms} ms" in log
    assert "reply #1 first audio heard" in log

    # Downloads: the conversation's text, and the reply audio exactly as received.
    assert text in download(page, "#download-text").decode()
    audio, rate = sf.read(io.BytesIO(download(page, "#download-audio")), dtype="int16")
    assert rate == OUTPUT_SAMPLE_RATE
    np.testing.assert_array_equal(audio, np.frombuffer(bytes(tab.audio[1]), "<i2"))

    # The settings panel shows what the session runs with (the URL's options, echoed by the server).
    page.click("#settings-panel summary")
    assert page.input_value("[name=temperature]") == "0"
    assert page.input_value("[name=max_new_tokens]") == "64"
    assert page.is_checked("[name=speak]")

    assert_contrast(page)
    screenshot(page, "desktop", tmp_path)
    assert tab.errors == []

    # The audio went out as PCM16 20 ms chunks at the rate the page announced, which is the
    # browser's own AudioContext rate; the URL's options went into session.start.
    session_start = json.loads(tab.sent[0])
    browser_rate = page.evaluate("new AudioContext().sampleRate")
    assert (session_start["type"], session_start["sample_rate"], session_start["channels"]) == (
        "session.start", browser_rate, 1
    )
    assert session_start["generation"] == {"temperature": 0, "max_new_tokens": 64, "respect_not_addressed": False}
    chunk_sizes = {len(frame) for frame in tab.sent if isinstance(frame, bytes)}
    assert chunk_sizes == {2 * round(browser_rate * 0.02)}


def test_phone_keeps_the_controls_in_view_with_the_camera_on(
    open_tab: Callable[..., Tab], server_url: str, tmp_path: Path
) -> None:
    tab = open_tab(viewport={"width": 390, "height": 844}, is_mobile=True, has_touch=True)
    page = tab.page
    page.goto(server_url)
    page.click("#start")
    camera = page.get_by_role("button", name="Camera")
    camera.click()  # frames go out at ~2 fps while the clip is heard
    page.wait_for_function("document.getElementById('camera').getAttribute('aria-pressed') === 'true'")
    user_turn = page.locator("#transcript li.user", has_text="camera frame")
    user_turn.wait_for(timeout=REPLY_TIMEOUT_MS)
    frames = int(user_turn.inner_text().split("·")[1].split()[0])
    assert 1 <= frames <= 4  # the server attaches the frames of the last second, at most 4
    assert page.eval_on_selector("#camera-preview", "video => video.videoWidth > 0 && !video.paused")

    page.locator("#transcript li.assistant .meta", has_text="server").wait_for(timeout=REPLY_TIMEOUT_MS)  # done
    assert page.evaluate("document.documentElement.scrollHeight > innerHeight + 100")  # the page scrolls
    # The transcript followed the reply, and the state and the Stop button are still on screen.
    screenshot(page, "phone", tmp_path)
    assert page.eval_on_selector("#transcript li.assistant", "e => e.getBoundingClientRect().bottom <= innerHeight")
    assert in_viewport(page, "#start") and in_viewport(page, "#state-text")
    assert page.inner_text("#start") == "Stop"
    screenshot(page, "phone", tmp_path)
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
    # The clip, 1.5 s of silence, the clip again: the second utterance starts about 2.5 s into
    # the reply to the first one (several seconds of audio), so a first reply that starts late on a
    # busy machine is still playing when it is talked over.
    clip, rate = sf.read(SPEECH_WAV, dtype="int16")
    sf.write(tmp_path / "twice.wav", np.concatenate([clip, np.zeros(3 * rate // 2, np.int16), clip]), rate)
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

        # The transcript keeps what was heard: the reply's start, as long as its speaking rate
        # (text length over audio length) makes the time heard, to the end of a word.
        full_text = tab.reply_text(1)
        shown = first_reply.evaluate("reply => reply.firstChild.data").removesuffix("…")
        assert full_text.startswith(shown) and len(shown) < len(full_text)
        if any(e["type"] == "response.done" and e["response_id"] == 1 for e in tab.received):
            expected = len(full_text) * heard / reply_seconds(tab, response_id=1)
            longest_word = max(len(word) for word in full_text.split())
            assert expected - 2 <= len(shown) <= expected + longest_word + 1
        assert_contrast(tab.page)  # the interrupted mark too
        tab.page.locator("#transcript li.assistant").nth(1).wait_for(timeout=REPLY_TIMEOUT_MS)  # 2nd turn
        assert tab.errors == []
    finally:
        browser.close()


def reply_seconds(tab: Tab, response_id: int) -> float:
    """Seconds of reply audio the server sent for ``response_id`` (from the frames received)."""
    return len(tab.audio.get(response_id, b"")) / 2 / OUTPUT_SAMPLE_RATE


MAX_MIC_METER = """() => new Promise((resolve) => {
  const meter = document.getElementById("mic-meter");
  let max = 0;
  const timer = setInterval(() => (max = Math.max(max, Number(meter.getAttribute("aria-valuenow")))), 20);
  setTimeout(() => { clearInterval(timer); resolve(max); }, 1500);
})"""


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
        assert second.page.evaluate(MAX_MIC_METER) == 0  # the clip plays, but nobody hears it

        first.context.close()  # a seat frees up
        second.page.click("#reconnect")
        second.wait_for("app.connection === 'connected' && app.error === ''", timeout_ms=30_000)
        assert not second.page.is_visible("#error")
    finally:
        for tab in (first, second):
            tab.context.close()


def test_lost_server_is_reported_and_retried(
    open_tab: Callable[..., Tab], tiny_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory
) -> None:
    tab = open_tab(RECORDER)
    settings = ServerSettings(max_sessions=1, cache_dir=tmp_path_factory.mktemp("cache"))
    with BackgroundServer(settings, tiny_checkpoint) as server:
        tab.page.goto(server.http_url)
        tab.page.click("#start")
        tab.wait_for("app.connection === 'connected'")
        stopping = threading.Thread(target=server.stop)  # its connections close first, then the worker stops
        stopping.start()
        tab.wait_for("app.error === 'lost' && app.connection === 'reconnecting'")
        assert "Lost the connection" in tab.page.inner_text("#error")
        assert tab.state()["state"] == "idle"
        assert tab.page.inner_text("#state-text") == "Waiting for the server…"
        stopping.join()
    tab.wait_for("app.error === 'unreachable'")  # the retry found nobody
    assert "Cannot reach the server" in tab.page.inner_text("#error")
    assert_contrast(tab.page)  # the error message too
    # The wait before the next try (2 s) counts down.
    tab.page.wait_for_function(
        "(texts => texts.indexOf('Reconnecting in 1 s', texts.lastIndexOf('Reconnecting in 2 s')) > 0)"
        "(window.__seen.connection)",
        timeout=5_000,
    )


# getUserMedia answers only when the test says so, as when the permission prompt is open.
SLOW_PERMISSION = """
window.__media = { streams: [], answer: null, holdMic: true };
const realGetUserMedia = navigator.mediaDevices.getUserMedia.bind(navigator.mediaDevices);
navigator.mediaDevices.getUserMedia = async (constraints) => {
  if (constraints.audio && __media.holdMic) await new Promise((resolve) => (__media.answer = resolve));
  const stream = await realGetUserMedia(constraints);
  __media.streams.push(stream);
  return stream;
};
"""
# The microphone reports no echo cancellation (as some browsers and devices do).
NO_ECHO_CANCELLATION = """
const realGetSettings = MediaStreamTrack.prototype.getSettings;
MediaStreamTrack.prototype.getSettings = function () {
  return { ...realGetSettings.call(this), echoCancellation: false };
};
"""


def test_stop_while_asked_for_the_microphone_leaves_nothing_running(
    open_tab: Callable[..., Tab], static_url: str
) -> None:
    tab = open_tab(SLOW_PERMISSION + NO_ECHO_CANCELLATION)
    page = tab.page
    page.goto(static_url)
    page.click("#start")
    page.wait_for_function("window.__media.answer !== null")  # the prompt is open
    page.click("#start")  # Stop
    page.evaluate("window.__media.answer()")  # the user allows, too late
    page.wait_for_function("window.__media.streams.length === 1")
    page.wait_for_timeout(300)
    assert page.evaluate("window.__media.streams[0].getTracks().every(track => track.readyState === 'ended')")
    assert tab.state()["error"] == "" and not page.is_visible("#error")
    assert (tab.state()["state"], tab.state()["connection"], page.inner_text("#start")) == ("idle", "offline", "Start")
    assert tab.sent == [] and tab.errors == []

    # Started again and allowed at once: a microphone without echo cancellation gets the hint.
    page.evaluate("window.__media.holdMic = false")
    page.click("#start")
    page.wait_for_selector("#headphones-hint", state="visible")
    assert "headphones" in page.inner_text("#headphones-hint")
    assert_contrast(page)
    page.click("#start")  # Stop
    assert not page.is_visible("#headphones-hint")
    assert page.evaluate("window.__media.streams.every(s => s.getTracks().every(t => t.readyState === 'ended'))")


# Records what the page asks of the media APIs: the constraints of each getUserMedia call and
# the speaker of each setSinkId call.
MEDIA_CALLS = """
window.__calls = { getUserMedia: [], setSinkId: [] };
const realGetUserMedia = navigator.mediaDevices.getUserMedia.bind(navigator.mediaDevices);
navigator.mediaDevices.getUserMedia = (constraints) => {
  __calls.getUserMedia.push(constraints);
  return realGetUserMedia(constraints);
};
const realSetSinkId = AudioContext.prototype.setSinkId;
AudioContext.prototype.setSinkId = function (id) {
  __calls.setSinkId.push(id);
  return realSetSinkId.call(this, id);
};
"""


def test_settings_devices_and_mute_are_applied_and_remembered(
    open_tab: Callable[..., Tab], server_url: str
) -> None:
    tab = open_tab(MEDIA_CALLS)
    page = tab.page
    page.goto(server_url.split("?")[0])  # no session options in the URL
    mute = page.get_by_role("button", name="Mute")
    mute.click()  # before Start: the clip is never heard
    assert mute.get_attribute("aria-pressed") == "true"
    page.click("#start")
    tab.wait_for("app.connection === 'connected'")
    assert page.inner_text("#state-text").startswith("Muted")
    page.click("#settings-panel summary")

    page.fill("[name=temperature]", "0.5")
    page.fill("[name=max_new_tokens]", "32")
    page.select_option("[name=aggressiveness]", "3")
    page.uncheck("[name=speak]")
    page.fill("[name=system_prompt]", "Answer in one sentence.")
    page.locator("[name=system_prompt]").blur()
    page.locator("#transcript li.note", has_text="instructions changed").wait_for()
    updates = tab.sent_events("session.update")
    assert [u for u in updates if u.get("generation", {}).get("temperature") == 0.5]
    assert {"type": "session.update", "vad": {"aggressiveness": 3}} in updates
    assert {"type": "session.update", "generation": {"speak": False}} in updates
    assert {"type": "session.update", "system_prompt": "Answer in one sentence."} in updates

    page.select_option("#audioinput", label="Fake Audio Input 2")
    page.select_option("#audiooutput", label="Fake Audio Output 1")
    microphone = page.eval_on_selector("#audioinput", "select => select.value")
    speaker = page.eval_on_selector("#audiooutput", "select => select.value")
    page.wait_for_function(f"window.__calls.setSinkId.includes('{speaker}')")
    page.wait_for_function("window.__calls.getUserMedia.length === 2")
    assert page.evaluate("window.__calls.getUserMedia[1].audio.deviceId") == {"ideal": microphone}
    assert page.get_by_role("meter", name="Your microphone level").get_attribute("aria-valuenow") == "0"
    audio = b"".join(frame for frame in tab.sent if isinstance(frame, bytes))
    assert audio and not any(audio)  # muted: silence went out
    assert not [e for e in tab.received if e["type"] == "vad.speech_started"]

    # A new visit starts with all of it.
    page.click("#start")  # Stop
    tab.sent.clear()
    page.reload()
    page.click("#start")
    tab.wait_for("app.connection === 'connected'")
    session_start = json.loads(tab.sent[0])
    assert session_start["system_prompt"] == "Answer in one sentence."
    assert session_start["generation"] == {"temperature": 0.5, "max_new_tokens": 32, "speak": False}
    assert session_start["vad"] == {"aggressiveness": 3}
    assert page.evaluate("window.__calls.getUserMedia[0].audio.deviceId") == {"ideal": microphone}
    page.wait_for_function(f"window.__calls.setSinkId.includes('{speaker}')")
    page.wait_for_function(f"document.getElementById('audioinput').value === '{microphone}'")
    assert page.input_value("[name=temperature]") == "0.5" and not page.is_checked("[name=speak]")
    assert tab.errors == []


def test_push_to_talk_and_typed_turns(open_tab: Callable[..., Tab], server_url: str) -> None:
    tab = open_tab()
    page = tab.page
    page.goto(server_url)
    page.click("#settings-panel summary")
    page.select_option("[name=turn_detection]", "manual")  # remembered: goes into session.start
    page.click("#start")
    tab.wait_for("app.connection === 'connected'")
    assert json.loads(tab.sent[0])["turn_detection"] == "manual"
    talk = page.get_by_role("button", name="Hold to talk")
    page.wait_for_timeout(300)  # the clip plays: nothing goes out while the button is up
    assert not [frame for frame in tab.sent if isinstance(frame, bytes)]

    talk.hover()
    page.mouse.down()  # during the clip
    page.wait_for_timeout(1_500)
    page.mouse.up()
    page.locator("#transcript li.assistant").first.wait_for(timeout=REPLY_TIMEOUT_MS)
    events = [frame if isinstance(frame, bytes) else json.loads(frame)["type"] for frame in tab.sent[1:]]
    clear, commit = events.index("input_audio.clear"), events.index("input_audio.commit")
    assert clear < commit and all(isinstance(e, bytes) for e in events[clear + 1 : commit])
    assert 1.0 <= 0.02 * (commit - clear - 1) <= 2.0  # ~1.5 s of 20 ms chunks, only while held
    assert page.locator("#transcript li.user").first.inner_text().startswith("You spoke for 1.")

    page.fill("#text-input", "What do you see?")
    page.press("#text-input", "Enter")
    assert tab.sent_events("input_text") == [{"type": "input_text", "text": "What do you see?"}]
    assert page.locator("#transcript li.user.typed").inner_text() == "What do you see?"
    page.locator("#transcript li.assistant").nth(1).wait_for(timeout=REPLY_TIMEOUT_MS)

    # The space bar talks too; a press too short for a turn is refused and leaves no turn behind.
    tab.wait_for("app.state === 'listening'", REPLY_TIMEOUT_MS)
    page.locator("body").click(position={"x": 5, "y": 5})  # focus out of the text box
    page.keyboard.down("Space")
    page.keyboard.up("Space")
    tab.wait_for("app.error === 'no_audio' && app.state === 'listening'")
    assert page.locator("#transcript li.user").count() == 2
    assert tab.sent_events("input_audio.commit") == [{"type": "input_audio.commit"}] * 2
    assert tab.errors == []


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


def test_a_server_with_keys_asks_the_page_for_one_which_it_then_remembers(
    open_tab: Callable[..., Tab], tiny_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory
) -> None:
    settings = ServerSettings(max_sessions=2, api_keys=["page-key"], cache_dir=tmp_path_factory.mktemp("cache"))
    with BackgroundServer(settings, tiny_checkpoint) as server:
        url = f"{server.http_url}/"
        tab = open_tab()
        tab.page.goto(url)
        tab.page.click("#start")
        tab.wait_for("app.error === 'unauthorized'", timeout_ms=30_000)
        assert "API key" in tab.page.inner_text("#error")
        time.sleep(1.5)  # no retry: a refusal for a missing key is final
        assert tab.state()["connection"] == "offline" and len(tab.sent_events("session.start")) == 1

        tab.page.click("#settings-panel summary")
        tab.page.fill("#api-key", "page-key")
        tab.page.dispatch_event("#api-key", "change")
        tab.page.click("#start")
        tab.wait_for("app.connection === 'connected'", timeout_ms=30_000)
        tab.page.click("#start")  # Stop: the seat is free for the next tab

        tab.page.reload()  # remembered in this browser
        assert tab.page.input_value("#api-key") == "page-key"

        linked = open_tab()  # a link that carries the key
        with linked.page.expect_websocket() as websocket:
            linked.page.goto(f"{url}?api_key=page-key")
            linked.page.click("#start")
        assert "api_key" not in websocket.value.url  # the key goes as a subprotocol, not in the URL
        linked.wait_for("app.connection === 'connected'", timeout_ms=30_000)
        assert tab.errors == [] and linked.errors == []
