// The dock at the top of the page: connection, state, meters, controls, errors and hints. The
// state also goes into data-* attributes of #app (data-connection, data-state,
// data-audio-played, data-underruns, data-latency-ms, data-error) so that it can be observed
// from outside, e.g. by tests.

const STATE_TEXT = {
  idle: "Press Start and talk",
  waiting: "Waiting for the server…",
  listening: "Listening…",
  hearing: "Hearing you…",
  muted: "Muted: press Mute again to talk",
  push: "Hold the talk button or the space bar to talk",
  talking: "Talk now; let go when done",
  thinking: "Thinking…",
  speaking: "Speaking…",
};

const $ = (id) => document.getElementById(id);

/** "1 gap", "2 gaps". */
function count(n, noun) {
  return `${n} ${noun}${n === 1 ? "" : "s"}`;
}

/** RMS level 0..1 → 0..100 on a -60..0 dBFS scale. */
function levelPercent(level) {
  const decibels = 20 * Math.log10(Math.max(level, 1e-6));
  return Math.round(Math.min(1, Math.max(0, (decibels + 60) / 60)) * 100);
}

export class View {
  constructor() {
    this.app = $("app");
    this.startButton = $("start");
    this.muteButton = $("mute");
    this.talkButton = $("talk");
    this.cameraButton = $("camera");
    this.reconnectButton = $("reconnect");
    this.newConversationButton = $("new-conversation");
    this.micMeter = $("mic-meter");
    this.voiceMeter = $("voice-meter");
  }

  /** @param {string} status offline | connecting | connected | reconnecting */
  setConnection(status, text) {
    this.app.dataset.connection = status;
    $("connection-text").textContent = text;
    this.reconnectButton.hidden = status !== "reconnecting";
    this.newConversationButton.disabled = status !== "connected";
  }

  /**
   * @param {string} state idle | listening | thinking | speaking
   * @param {string} wording a key of STATE_TEXT that says it in more detail (waiting, hearing, muted)
   */
  setState(state, wording = state) {
    this.app.dataset.state = state;
    const text = STATE_TEXT[wording];
    if ($("state-text").textContent !== text) $("state-text").textContent = text; // announced once
  }

  setRunning(running) {
    this.startButton.textContent = running ? "Stop" : "Start";
    this.startButton.classList.toggle("primary", !running);
    this.cameraButton.disabled = !running;
    if (!running) {
      this.setCamera(false);
      this.setLevels(0, 0);
      this.showHeadphonesHint(false);
    }
  }

  setCamera(on) {
    this.cameraButton.setAttribute("aria-pressed", String(on));
    $("camera-box").hidden = !on;
  }

  /** Push to talk: the talk button and its state. */
  setManualTurns(manual, talking = false) {
    this.talkButton.hidden = !manual;
    this.talkButton.classList.toggle("talking", talking);
  }

  /** The typed-turn box works while a session is ready. */
  setCanType(canType) {
    for (const element of $("text-turn").elements) element.disabled = !canType;
  }

  setMuted(muted) {
    this.muteButton.setAttribute("aria-pressed", String(muted));
  }

  /** Levels as RMS 0..1: the user's (as the server gets it) and the assistant's voice. */
  setLevels(mic, voice) {
    setMeter(this.micMeter, levelPercent(mic));
    setMeter(this.voiceMeter, levelPercent(voice));
  }

  /** Seconds of reply audio heard and gaps heard (underruns) of a Player. */
  setPlayback({ heardSeconds, underruns }) {
    this.app.dataset.audioPlayed = heardSeconds.toFixed(3);
    this.app.dataset.underruns = underruns;
    $("audio-played").textContent = `${heardSeconds.toFixed(1)} s` + (underruns ? ` (${count(underruns, "gap")})` : "");
  }

  /** Browser-measured latency of the last reply (end of speech → first audio heard). */
  setLatency(milliseconds) {
    this.app.dataset.latencyMs = milliseconds.toFixed(0);
    $("latency").textContent = `${milliseconds.toFixed(0)} ms`;
  }

  /** Shows a message a person can act on; `code` names the cause in data-error. */
  showError(code, text) {
    this.app.dataset.error = code;
    $("error").textContent = text;
    $("error").hidden = false;
  }

  clearError() {
    this.app.dataset.error = "";
    $("error").hidden = true;
  }

  showHeadphonesHint(show) {
    $("headphones-hint").hidden = !show;
  }
}

function setMeter(meter, percent) {
  if (meter.getAttribute("aria-valuenow") === String(percent)) return;
  meter.setAttribute("aria-valuenow", percent);
  meter.firstElementChild.style.width = `${percent}%`;
}
