// The chat page: wires microphone, camera, connection and player to the dock, the transcript,
// the settings and the event log.

import { BargeInDetector } from "./barge-in.js";
import { ApiKey } from "./api-key.js";
import { Camera } from "./camera.js";
import { Connection, websocketUrl } from "./connection.js";
import { Devices } from "./devices.js";
import { download, fileName, ReplyAudio } from "./downloads.js";
import { EventLog } from "./event-log.js";
import { Microphone, MicrophoneError } from "./microphone.js";
import { Player } from "./player.js";
import { Settings } from "./settings.js";
import { Transcript } from "./transcript.js";
import { sessionOptionsFromUrl } from "./url-options.js";
import { View } from "./view.js";

const MAX_INPUT_SAMPLE_RATE = 48000; // the server accepts 8..48 kHz
const VOLUME_KEY = "vita.volume";

const OFFLINE_TEXT = {
  idle_timeout: "Disconnected because nothing was said for a while. Press Start to talk again.",
  unauthorized: "This server asks for an API key: enter it in Settings (Access), then press Start.",
  origin_not_allowed: "This server does not take connections from pages at this address.",
};
const RECONNECT_TEXT = {
  unreachable: "Cannot reach the server.",
  lost: "Lost the connection to the server.",
  server_full: "The server is full right now: every seat is taken.",
  not_ready: "The server is still loading the model.",
};

/** An AudioContext at the device's own rate, or at 48 kHz where the device runs faster. */
async function openAudioContext() {
  let context = new AudioContext({ latencyHint: "interactive" });
  if (context.sampleRate > MAX_INPUT_SAMPLE_RATE) {
    await context.close();
    context = new AudioContext({ latencyHint: "interactive", sampleRate: MAX_INPUT_SAMPLE_RATE });
  }
  await context.resume();
  return context;
}

/** `base` with `override`'s fields, one level deep (`{generation: {...}}` merged field by field). */
function mergeSessionFields(base, override) {
  const merged = { ...base };
  for (const [name, value] of Object.entries(override)) {
    const nested = typeof value === "object" && value !== null && typeof merged[name] === "object";
    merged[name] = nested ? { ...merged[name], ...value } : value;
  }
  return merged;
}

class Chat {
  constructor() {
    this.view = new View();
    this.transcript = new Transcript(document.getElementById("transcript"));
    this.log = new EventLog(document.getElementById("event-log"));
    this.settings = new Settings(document.getElementById("settings"), (fields) => this.applySettings(fields));
    this.apiKey = new ApiKey(document.getElementById("api-key"));
    this.devices = new Devices((kind, deviceId) => this.useDevice(kind, deviceId));
    this.replyAudio = new ReplyAudio();
    this.running = false;
    this.runs = 0; // start() and stop() calls: a start() that is no longer the latest gives up
    this.muted = false;
    this.volume = Number(localStorage.getItem(VOLUME_KEY) ?? 100);
    this.audioContext = null;
    this.microphone = null;
    this.player = null;
    this.connection = null;
    this.micLevel = 0; // level of the last chunk the server got
    this.speak = true; // the session speaks its replies (generation.speak)
    this.manualTurns = false; // push to talk (turn_detection "manual"): audio goes out only while talking
    this.talkingSince = null; // performance.now() when the talk button went down
    this.systemPrompt = null;
    this.retry = null; // {reason, message, at, timer} while waiting to reconnect
    this.camera = new Camera(document.getElementById("camera-preview"), (jpeg) =>
      this.connection?.sendVideoFrame(jpeg),
    );
    this.bargeIn = new BargeInDetector();
    this.resetTurnState();
    setInterval(() => this.showPlayback(), 50);
  }

  /** Per-session bookkeeping, cleared on every (re)connect. */
  resetTurnState() {
    this.hearing = false; // the server's VAD is inside an utterance
    this.turnPending = false; // an utterance ended and its reply has not started yet
    this.response = null; // {id, reply, done, endOfSpeechAt, heardFirstAudio, heardBefore}
    this.droppedResponses = new Set(); // interrupted replies: their late audio is ignored
    this.endOfSpeechAt = null;
    this.sentInputMs = 0; // input stream position, as the server counts it
    this.lastSentAt = 0; // performance.now() when that position was captured
  }

  async start() {
    const run = ++this.runs;
    this.running = true;
    this.view.setRunning(true);
    this.view.clearError();
    try {
      const context = await openAudioContext();
      if (run !== this.runs) {
        context.close();
        return;
      }
      this.audioContext = context;
      this.player = new Player(context);
      this.player.volume = this.volume / 100;
      this.player.onIdle = () => this.refreshState();
      this.useDevice("audiooutput", this.devices.chosenId("audiooutput"));
      this.microphone = new Microphone(context, (pcm, level) => this.onMicChunk(pcm, level));
      this.microphone.setMuted(this.muted);
      if (!(await this.microphone.start(this.devices.chosenId("audioinput")))) return; // stopped meanwhile
    } catch (error) {
      if (run !== this.runs) return; // stopped meanwhile: what failed was being closed
      this.stop();
      if (error instanceof MicrophoneError) this.view.showError(error.code, error.message);
      else this.view.showError("audio_failed", `Audio could not be started in this browser (${error.message}).`);
      return;
    }
    this.view.showHeadphonesHint(!this.microphone.cancelsEcho);
    this.devices.refresh();
    const sessionStart = () => ({
      type: "session.start",
      sample_rate: this.audioContext.sampleRate, // the server resamples to 16 kHz
      channels: 1,
      format: "pcm16",
      ...mergeSessionFields(this.settings.sessionFields, sessionOptionsFromUrl()),
    });
    this.connection = new Connection(websocketUrl(), sessionStart, () => this.apiKey.subprotocols, {
      onStatus: (status, detail) => this.onStatus(status, detail),
      onEvent: (event) => this.onEvent(event),
      onAudio: (id, segment, pcm) => this.onAudio(id, segment, pcm),
    });
    this.connection.open();
  }

  stop() {
    this.runs += 1;
    this.running = false;
    this.stopRetryCountdown();
    this.view.clearError();
    this.endSession();
    this.connection?.close();
    this.microphone?.stop();
    this.camera.stop();
    this.audioContext?.close();
    this.connection = this.microphone = this.audioContext = null;
    this.micLevel = 0;
    this.manualTurns = false; // until the next session says
    this.view.setManualTurns(false);
    this.view.setRunning(false);
    this.refreshState();
  }

  send(event) {
    if (!this.connection?.ready) return false;
    this.connection.send(event);
    this.log.sent(event);
    return true;
  }

  async toggleCamera() {
    if (this.camera.running) {
      this.camera.stop();
      this.view.setCamera(false);
      return;
    }
    try {
      if (await this.camera.start(this.devices.chosenId("videoinput"))) this.view.setCamera(true);
    } catch (error) {
      const message = `The camera could not be opened (${error.message}). Voice chat still works.`;
      this.view.showError("camera_failed", message);
    }
  }

  toggleMute() {
    this.muted = !this.muted;
    this.microphone?.setMuted(this.muted);
    this.view.setMuted(this.muted);
    this.refreshState();
  }

  setVolume(percent) {
    this.volume = percent;
    localStorage.setItem(VOLUME_KEY, String(percent));
    if (this.player) this.player.volume = percent / 100;
  }

  /** The user picked another device in the settings: used at once if it is in use. */
  async useDevice(kind, deviceId) {
    try {
      if (kind === "audioinput" && this.microphone?.stream) {
        await this.microphone.switchTo(deviceId);
        this.view.showHeadphonesHint(!this.microphone.cancelsEcho);
      } else if (kind === "videoinput" && this.camera.running) {
        this.camera.stop();
        await this.toggleCamera();
      } else if (kind === "audiooutput" && this.audioContext?.setSinkId) {
        await this.audioContext.setSinkId(deviceId);
      }
    } catch (error) {
      this.view.showError("device_failed", `That device could not be used (${error.message}).`);
    }
  }

  /** Settings the user changed: the session takes them now (session.start takes them later). */
  applySettings(fields) {
    this.send({ type: "session.update", ...fields });
  }

  /** Stops the reply and asks the server to forget the conversation. */
  newConversation() {
    if (!this.connection?.ready) return;
    this.interrupt();
    this.send({ type: "session.reset" });
    this.sentInputMs = 0; // the server restarts its input stream position with the reset
    this.hearing = this.turnPending = false;
    this.refreshState();
  }

  /** Push to talk pressed: a reply still playing stops, audio from now on is the turn. */
  startTalking() {
    if (!this.manualTurns || this.talkingSince !== null || !this.connection?.ready) return;
    this.stopReplyForNewTurn();
    this.send({ type: "input_audio.clear" });
    this.talkingSince = performance.now();
    this.transcript.userStartedSpeaking();
    this.view.setManualTurns(true, true);
    this.refreshState();
  }

  /** Push to talk released: the audio sent since the press is the turn. */
  stopTalking() {
    if (this.talkingSince === null) return;
    const durationMs = performance.now() - this.talkingSince;
    this.talkingSince = null;
    this.view.setManualTurns(this.manualTurns, false);
    if (this.send({ type: "input_audio.commit" })) {
      this.turnPending = true;
      this.endOfSpeechAt = performance.now();
      this.transcript.userStoppedSpeaking(durationMs);
    } else {
      this.transcript.userSpeechDiscarded();
    }
    this.refreshState();
  }

  /** A typed turn; false when no session is ready to take it. */
  sendText(text) {
    if (!this.connection?.ready) return false;
    this.stopReplyForNewTurn();
    this.send({ type: "input_text", text });
    this.transcript.userTyped(text);
    this.turnPending = true;
    this.endOfSpeechAt = performance.now();
    this.refreshState();
    return true;
  }

  /** A new turn interrupts the reply (the server does too): silent here at once. */
  stopReplyForNewTurn() {
    if (this.player.busy || (this.response && !this.response.done)) this.interrupt();
  }

  onMicChunk(pcm, level) {
    if (!this.connection?.ready || (this.manualTurns && this.talkingSince === null)) {
      this.micLevel = 0; // nobody hears it: the meter must not say otherwise
      return;
    }
    this.micLevel = level;
    const chunkMs = (pcm.byteLength / 2 / this.audioContext.sampleRate) * 1000;
    this.connection.sendAudio(pcm);
    this.sentInputMs += chunkMs;
    this.lastSentAt = performance.now();
    if (this.player.busy && this.bargeIn.update(level, chunkMs)) {
      this.interrupt();
      this.send({ type: "response.cancel" });
    }
  }

  onStatus(status, { reason, seconds, message }) {
    this.stopRetryCountdown();
    this.view.setCanType(status === "connected");
    if (status !== "connected") this.stopTalking();
    this.log.add(`connection ${status}${reason ? ` (${reason})` : ""}`);
    if (status === "connected") {
      this.view.clearError();
      this.view.setConnection("connected", "Connected");
    } else if (status === "connecting") {
      this.view.setConnection("connecting", "Connecting…");
    } else if (status === "reconnecting") {
      this.endSession();
      this.retry = { reason, message, at: performance.now() + seconds * 1000 };
      this.retry.timer = setInterval(() => this.showRetryCountdown(), 250);
      this.showRetryCountdown();
    } else if (status === "offline" && reason in OFFLINE_TEXT) {
      this.stop();
      this.view.showError(reason, OFFLINE_TEXT[reason]);
    } else {
      this.view.setConnection("offline", "Not connected");
    }
    this.refreshState();
  }

  showRetryCountdown() {
    const { reason, message, at } = this.retry;
    const seconds = Math.max(1, Math.ceil((at - performance.now()) / 1000));
    this.view.setConnection("reconnecting", `Reconnecting in ${seconds} s`);
    this.view.showError(reason, `${RECONNECT_TEXT[reason] ?? message} Trying again in ${seconds} s.`);
  }

  stopRetryCountdown() {
    clearInterval(this.retry?.timer);
    this.retry = null;
  }

  /** Audio and turn state of a session that has ended (the server forgot it). */
  endSession() {
    if (this.player) this.interrupt();
    this.resetTurnState();
  }

  onEvent(event) {
    this.log.received(event);
    switch (event.type) {
      case "session.ready":
        this.resetTurnState();
        this.showSessionSettings(event);
        this.transcript.addNote(`New conversation (model: ${event.model})`);
        break;
      case "session.updated":
        if (event.system_prompt !== this.systemPrompt) {
          this.transcript.addNote("New conversation: the instructions changed");
        }
        this.showSessionSettings(event);
        break;
      case "session.cleared":
        this.transcript.addNote("New conversation: the assistant has forgotten what was said");
        break;
      case "vad.speech_started":
        this.hearing = true;
        this.transcript.userStartedSpeaking();
        if (this.player.busy) this.interrupt(); // the server heard the user talk over the reply
        break;
      case "vad.speech_stopped":
        this.hearing = false;
        this.turnPending = true;
        this.endOfSpeechAt = this.lastSentAt - (this.sentInputMs - event.audio_ms);
        this.transcript.userStoppedSpeaking(event.duration_ms);
        break;
      case "vad.speech_discarded":
        this.hearing = false;
        this.transcript.userSpeechDiscarded();
        break;
      case "response.started":
        this.turnPending = false;
        this.transcript.userTurnHadFrames(event.video_frames);
        this.response = {
          id: event.response_id,
          reply: this.transcript.startReply(),
          done: false,
          endOfSpeechAt: this.endOfSpeechAt,
          heardFirstAudio: false,
          heardBefore: this.player.heardSeconds,
          latency: "",
        };
        break;
      case "response.text.delta":
        if (this.response?.id === event.response_id && !this.droppedResponses.has(event.response_id)) {
          this.response.reply.appendText(event.delta);
        }
        break;
      case "response.done":
        if (this.response?.id === event.response_id && !this.response.done) {
          this.response.done = true;
          this.response.reply.finish(event);
          const server = event.timings.end_of_speech_to_first_audio_ms;
          const serverText = server == null ? "" : `server ${server.toFixed(0)} ms`;
          const footnote = [this.response.latency, serverText].filter(Boolean).join(" · ");
          if (footnote) this.response.reply.setFootnote(footnote);
        }
        break;
      case "response.interrupted":
        if (this.response?.id === event.response_id) this.interrupt();
        break;
      case "error":
        if (event.code === "internal_error" && this.response) this.response.done = true; // the reply failed
        if (event.code === "no_audio" && this.turnPending) {
          this.turnPending = false;
          this.transcript.userTurnRefused();
        }
        if (!event.fatal && event.code !== "no_response") this.view.showError(event.code, `Server: ${event.message}`);
        break;
    }
    this.refreshState();
  }

  /** The session's effective settings (session.ready, session.updated) into the form. */
  showSessionSettings(event) {
    this.settings.show(event);
    this.speak = event.generation.speak;
    this.systemPrompt = event.system_prompt;
    this.manualTurns = event.turn_detection === "manual";
    if (!this.manualTurns) this.stopTalking();
    this.view.setManualTurns(this.manualTurns, this.talkingSince !== null);
  }

  onAudio(responseId, segment, pcm) {
    if (this.droppedResponses.has(responseId) || !this.player) return;
    this.replyAudio.add(responseId, pcm);
    const startAt = this.player.enqueue(pcm, segment > 0);
    const response = this.response;
    if (startAt !== null && response?.id === responseId && !response.heardFirstAudio) {
      response.heardFirstAudio = true;
      const { currentTime, outputLatency = 0 } = this.audioContext;
      const heardAt = performance.now() + (startAt - currentTime + outputLatency) * 1000;
      if (response.endOfSpeechAt !== null) {
        const milliseconds = heardAt - response.endOfSpeechAt;
        this.view.setLatency(milliseconds);
        this.log.heard(responseId, milliseconds);
        response.latency = `first audio ${milliseconds.toFixed(0)} ms after you stopped`;
        response.reply.setFootnote(response.latency);
      }
    }
    this.refreshState();
  }

  /**
   * Stops the current reply at once (audio and text); anything still arriving of it is ignored.
   * The transcript and the audio download keep what was heard of it.
   */
  interrupt() {
    const wasPlaying = this.player.busy;
    this.player.stop();
    this.showPlayback(); // what was heard is final now; do not wait for the next 50 ms refresh
    this.bargeIn.reset();
    const response = this.response;
    if (response && (wasPlaying || !response.done)) {
      this.droppedResponses.add(response.id);
      const heardSeconds = this.player.heardSeconds - response.heardBefore;
      response.reply.interrupt(heardSeconds, this.speak);
      this.replyAudio.cut(response.id, heardSeconds);
      response.done = true;
    }
  }

  showPlayback() {
    if (!this.player) return;
    this.view.setPlayback(this.player);
    this.view.setLevels(this.running ? this.micLevel : 0, this.player.level);
  }

  refreshState() {
    const response = this.response;
    if (!this.connection?.ready) this.view.setState("idle", this.running ? "waiting" : "idle");
    // a reply that has been heard is "speaking" until its end, through gaps in its audio too
    else if (this.player.busy || (response && !response.done && response.heardFirstAudio)) this.view.setState("speaking");
    else if (this.turnPending || (response && !response.done)) this.view.setState("thinking");
    else if (this.manualTurns) this.view.setState("listening", this.talkingSince !== null ? "talking" : "push");
    else this.view.setState("listening", this.muted ? "muted" : this.hearing ? "hearing" : "listening");
  }
}

const chat = new Chat();
const { view } = chat;
view.startButton.addEventListener("click", () => (chat.running ? chat.stop() : chat.start()));
view.muteButton.addEventListener("click", () => chat.toggleMute());
view.cameraButton.addEventListener("click", () => chat.toggleCamera());
view.reconnectButton.addEventListener("click", () => chat.connection?.reconnectNow());
view.newConversationButton.addEventListener("click", () => chat.newConversation());
view.talkButton.addEventListener("pointerdown", () => chat.startTalking());
for (const type of ["pointerup", "pointerleave", "pointercancel"]) {
  view.talkButton.addEventListener(type, () => chat.stopTalking());
}
const typing = (event) => event.target.closest("input, textarea, select, [contenteditable]");
addEventListener("keydown", (event) => {
  if (event.code !== "Space" || !chat.manualTurns || typing(event)) return;
  event.preventDefault(); // no scrolling, no button click
  if (!event.repeat) chat.startTalking();
});
addEventListener("keyup", (event) => {
  if (event.code === "Space" && chat.talkingSince !== null) {
    event.preventDefault();
    chat.stopTalking();
  }
});
const textTurn = document.getElementById("text-turn");
textTurn.addEventListener("submit", (event) => {
  event.preventDefault();
  const input = textTurn.elements["text-input"];
  if (input.value.trim() && chat.sendText(input.value.trim())) input.value = "";
});
const volume = document.getElementById("volume");
volume.value = chat.volume;
volume.addEventListener("input", () => chat.setVolume(Number(volume.value)));
document.getElementById("download-text").addEventListener("click", () =>
  download(new Blob([chat.transcript.asText()], { type: "text/plain" }), fileName("txt")),
);
document.getElementById("download-audio").addEventListener("click", () =>
  download(chat.replyAudio.wav(), fileName("wav")),
);
