// Everything the page shows. The state also goes into data-* attributes of #app
// (data-connection, data-state, data-audio-played, data-underruns, data-latency-ms, data-error) so that
// it can be observed from outside, e.g. by tests.

const STATE_TEXT = {
  idle: "Press Start and talk",
  waiting: "Waiting for the server…",
  listening: "Listening…",
  hearing: "Hearing you…",
  thinking: "Thinking…",
  speaking: "Speaking…",
};

const $ = (id) => document.getElementById(id);

export class View {
  constructor() {
    this.app = $("app");
    this.transcript = $("transcript");
    this.startButton = $("start");
    this.cameraButton = $("camera");
    this.reconnectButton = $("reconnect");
    this.newConversationButton = $("new-conversation");
    this.pendingUserTurn = null;
    this.lastUserTurn = null;
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
   * @param {string} wording a key of STATE_TEXT that says it in more detail (waiting, hearing)
   */
  setState(state, wording = state) {
    this.app.dataset.state = state;
    $("state-text").textContent = STATE_TEXT[wording];
  }

  setRunning(running) {
    this.startButton.textContent = running ? "Stop" : "Start";
    this.startButton.classList.toggle("primary", !running);
    this.cameraButton.disabled = !running;
    if (!running) this.setCamera(false);
  }

  setCamera(on) {
    this.cameraButton.textContent = on ? "Camera off" : "Camera on";
    $("camera-box").hidden = !on;
  }

  /** Mic level as RMS 0..1, shown on a -60..0 dBFS scale. */
  setLevel(level) {
    const decibels = 20 * Math.log10(Math.max(level, 1e-6));
    const fraction = Math.min(1, Math.max(0, (decibels + 60) / 60));
    $("mic-level").style.width = `${(fraction * 100).toFixed(1)}%`;
  }

  /** Seconds of reply audio heard and gaps heard (underruns) of a Player. */
  setPlayback({ heardSeconds, underruns }) {
    this.app.dataset.audioPlayed = heardSeconds.toFixed(3);
    this.app.dataset.underruns = underruns;
    $("audio-played").textContent = `${heardSeconds.toFixed(1)} s` + (underruns ? ` (${underruns} gaps)` : "");
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

  /** Adds a line without a speaker (reconnects, the model in use). */
  addNote(text) {
    this.append("note", text);
  }

  userStartedSpeaking() {
    this.pendingUserTurn ??= this.append("user", "You are speaking…");
  }

  userStoppedSpeaking(durationMs) {
    this.userStartedSpeaking();
    this.pendingUserTurn.textContent = `You spoke for ${(durationMs / 1000).toFixed(1)} s`;
    this.lastUserTurn = this.pendingUserTurn;
    this.pendingUserTurn = null;
  }

  /** The server attached camera frames to the last turn. */
  userTurnHadFrames(count) {
    if (!this.lastUserTurn || count === 0) return;
    this.lastUserTurn.textContent += ` · ${count} camera frame${count > 1 ? "s" : ""}`;
  }

  userSpeechDiscarded() {
    this.pendingUserTurn?.remove();
    this.pendingUserTurn = null;
  }

  /** Adds an empty reply bubble and returns it. */
  addReply() {
    const item = this.append("assistant", "");
    item.append(document.createTextNode(""), meta(""));
    return item;
  }

  appendReplyText(reply, delta) {
    reply.firstChild.appendData(delta);
    this.transcript.lastElementChild?.scrollIntoView({ block: "nearest" });
  }

  /** Latency is measured in the browser (end of speech → first audio heard). */
  setReplyLatency(reply, milliseconds) {
    this.app.dataset.latencyMs = milliseconds.toFixed(0);
    $("latency").textContent = `${milliseconds.toFixed(0)} ms`;
    reply.lastChild.textContent = `first audio ${milliseconds.toFixed(0)} ms after you stopped`;
  }

  finishReply(reply, { state, timings }) {
    if (state === "not_addressed") reply.firstChild.data ||= "(not addressed to the assistant: no reply)";
    const server = timings.end_of_speech_to_first_audio_ms;
    if (server != null) reply.lastChild.textContent += ` · server ${server.toFixed(0)} ms`;
  }

  markInterrupted(reply) {
    reply.classList.add("interrupted");
  }

  append(kind, text) {
    const item = document.createElement("li");
    item.className = kind;
    item.textContent = text;
    this.transcript.append(item);
    item.scrollIntoView({ block: "nearest" });
    return item;
  }
}

function meta(text) {
  const span = document.createElement("span");
  span.className = "meta";
  span.textContent = text;
  return span;
}
