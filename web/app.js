// The chat page: wires microphone, camera, connection and player to the view.

import { BargeInDetector } from "./barge-in.js";
import { Camera } from "./camera.js";
import { Connection, websocketUrl } from "./connection.js";
import { Microphone, MicrophoneError } from "./microphone.js";
import { Player } from "./player.js";
import { sessionOptionsFromUrl } from "./url-options.js";
import { View } from "./view.js";

const MAX_INPUT_SAMPLE_RATE = 48000; // the server accepts 8..48 kHz

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

class Chat {
  constructor(view) {
    this.view = view;
    this.running = false;
    this.audioContext = null;
    this.microphone = null;
    this.player = null;
    this.connection = null;
    this.camera = new Camera(document.getElementById("camera-preview"), (jpeg) =>
      this.connection?.sendVideoFrame(jpeg),
    );
    this.bargeIn = new BargeInDetector();
    this.resetTurnState();
    setInterval(() => this.player && this.view.setPlayback(this.player), 100);
  }

  /** Per-session bookkeeping, cleared on every (re)connect. */
  resetTurnState() {
    this.hearing = false; // the server's VAD is inside an utterance
    this.turnPending = false; // an utterance ended and its reply has not started yet
    this.response = null; // {id, reply, done, endOfSpeechAt, heardFirstAudio}
    this.droppedResponses = new Set(); // interrupted replies: their late audio is ignored
    this.endOfSpeechAt = null;
    this.sentInputMs = 0; // input stream position, as the server counts it
    this.lastSentAt = 0; // performance.now() when that position was captured
  }

  async start() {
    this.running = true;
    this.view.setRunning(true);
    this.view.clearError();
    try {
      this.audioContext = await openAudioContext();
      this.player = new Player(this.audioContext);
      this.player.onIdle = () => this.refreshState();
      this.microphone = new Microphone(this.audioContext, (pcm, level) => this.onMicChunk(pcm, level));
      await this.microphone.start();
    } catch (error) {
      this.stop();
      if (error instanceof MicrophoneError) this.view.showError(error.code, error.message);
      else this.view.showError("audio_failed", `Audio could not be started in this browser (${error.message}).`);
      return;
    }
    const sessionStart = {
      type: "session.start",
      sample_rate: this.audioContext.sampleRate, // the server resamples to 16 kHz
      channels: 1,
      format: "pcm16",
      ...sessionOptionsFromUrl(),
    };
    this.connection = new Connection(websocketUrl(), sessionStart, {
      onStatus: (status, detail) => this.onStatus(status, detail),
      onEvent: (event) => this.onEvent(event),
      onAudio: (id, segment, pcm) => this.onAudio(id, segment, pcm),
    });
    this.connection.open();
  }

  stop() {
    this.running = false;
    this.view.clearError();
    this.connection?.close();
    this.microphone?.stop();
    this.camera.stop();
    this.player?.stop();
    this.audioContext?.close();
    this.connection = this.microphone = this.audioContext = null;
    this.resetTurnState();
    this.view.setRunning(false);
    this.view.setLevel(0);
    this.refreshState();
  }

  async toggleCamera() {
    if (this.camera.running) {
      this.camera.stop();
      this.view.setCamera(false);
      return;
    }
    try {
      await this.camera.start();
      this.view.setCamera(true);
    } catch (error) {
      const message = `The camera could not be opened (${error.message}). Voice chat still works.`;
      this.view.showError("camera_failed", message);
    }
  }

  /** Stops the reply and asks the server to forget the conversation. */
  newConversation() {
    if (!this.connection?.ready) return;
    this.interrupt();
    this.connection.send({ type: "session.reset" });
    this.sentInputMs = 0; // the server restarts its input stream position with the reset
    this.hearing = this.turnPending = false;
    this.refreshState();
  }

  onMicChunk(pcm, level) {
    this.view.setLevel(level);
    if (!this.connection?.ready) return;
    const chunkMs = (pcm.byteLength / 2 / this.audioContext.sampleRate) * 1000;
    this.connection.sendAudio(pcm);
    this.sentInputMs += chunkMs;
    this.lastSentAt = performance.now();
    if (this.player.busy && this.bargeIn.update(level, chunkMs)) {
      this.interrupt();
      this.connection.send({ type: "response.cancel" });
    }
  }

  onStatus(status, { reason, seconds, message }) {
    if (status === "connected") {
      this.view.clearError();
      this.view.setConnection("connected", "Connected");
    } else if (status === "connecting") {
      this.view.setConnection("connecting", "Connecting…");
    } else if (status === "reconnecting") {
      this.endSession();
      this.view.setConnection("reconnecting", `Reconnecting in ${seconds} s`);
      this.view.showError(reason, `${RECONNECT_TEXT[reason] ?? message} Trying again in ${seconds} s.`);
    } else if (status === "offline" && reason === "idle_timeout") {
      this.stop();
      this.view.showError(reason, "Disconnected because nothing was said for a while. Press Start to talk again.");
    } else {
      this.view.setConnection("offline", "Not connected");
    }
    this.refreshState();
  }

  /** Audio and turn state of a session that has ended (the server forgot it). */
  endSession() {
    this.player?.stop();
    if (this.response && !this.response.done) this.view.markInterrupted(this.response.reply);
    this.resetTurnState();
  }

  onEvent(event) {
    switch (event.type) {
      case "session.ready":
        this.resetTurnState();
        this.view.addNote(`New conversation (model: ${event.model})`);
        break;
      case "session.cleared":
        this.view.addNote("New conversation: the assistant has forgotten what was said");
        break;
      case "vad.speech_started":
        this.hearing = true;
        this.view.userStartedSpeaking();
        if (this.player.busy) this.interrupt(); // the server heard the user talk over the reply
        break;
      case "vad.speech_stopped":
        this.hearing = false;
        this.turnPending = true;
        this.endOfSpeechAt = this.lastSentAt - (this.sentInputMs - event.audio_ms);
        this.view.userStoppedSpeaking(event.duration_ms);
        break;
      case "vad.speech_discarded":
        this.hearing = false;
        this.view.userSpeechDiscarded();
        break;
      case "response.started":
        this.turnPending = false;
        this.view.userTurnHadFrames(event.video_frames);
        this.response = {
          id: event.response_id,
          reply: this.view.addReply(),
          done: false,
          endOfSpeechAt: this.endOfSpeechAt,
          heardFirstAudio: false,
        };
        break;
      case "response.text.delta":
        if (this.response?.id === event.response_id && !this.droppedResponses.has(event.response_id)) {
          this.view.appendReplyText(this.response.reply, event.delta);
        }
        break;
      case "response.done":
        if (this.response?.id === event.response_id) {
          this.response.done = true;
          this.view.finishReply(this.response.reply, event);
        }
        break;
      case "response.interrupted":
        if (this.response?.id === event.response_id) this.interrupt();
        break;
      case "error":
        if (event.code === "internal_error" && this.response) this.response.done = true; // the reply failed
        if (!event.fatal && event.code !== "no_response") this.view.showError(event.code, `Server: ${event.message}`);
        break;
    }
    this.refreshState();
  }

  onAudio(responseId, segment, pcm) {
    if (this.droppedResponses.has(responseId) || !this.player) return;
    const startAt = this.player.enqueue(pcm, segment > 0);
    const response = this.response;
    if (startAt !== null && response?.id === responseId && !response.heardFirstAudio) {
      response.heardFirstAudio = true;
      const { currentTime, outputLatency = 0 } = this.audioContext;
      const heardAt = performance.now() + (startAt - currentTime + outputLatency) * 1000;
      if (response.endOfSpeechAt !== null) this.view.setReplyLatency(response.reply, heardAt - response.endOfSpeechAt);
    }
    this.refreshState();
  }

  /** Stops the current reply at once (audio and text); anything still arriving of it is ignored. */
  interrupt() {
    const wasPlaying = this.player.busy;
    this.player.stop();
    this.bargeIn.reset();
    const response = this.response;
    if (response && (wasPlaying || !response.done)) {
      this.droppedResponses.add(response.id);
      this.view.markInterrupted(response.reply);
      response.done = true;
    }
  }

  refreshState() {
    if (this.player) this.view.setPlayback(this.player);
    if (!this.connection?.ready) this.view.setState("idle", this.running ? "waiting" : "idle");
    else if (this.player.busy) this.view.setState("speaking");
    else if (this.turnPending || (this.response && !this.response.done)) this.view.setState("thinking");
    else this.view.setState("listening", this.hearing ? "hearing" : "listening");
  }
}

const view = new View();
const chat = new Chat(view);
view.startButton.addEventListener("click", () => (chat.running ? chat.stop() : chat.start()));
view.cameraButton.addEventListener("click", () => chat.toggleCamera());
view.reconnectButton.addEventListener("click", () => chat.connection?.reconnectNow());
view.newConversationButton.addEventListener("click", () => chat.newConversation());
