// Microphone capture: getUserMedia (echo cancellation, noise suppression) → AudioWorklet
// → PCM16 chunks at the AudioContext's own sample rate.

const WORKLET_URL = new URL("./mic-worklet.js", import.meta.url);

/** Error whose message a person can act on; `code` names the cause for the UI. */
export class MicrophoneError extends Error {
  constructor(code, message) {
    super(message);
    this.code = code;
  }
}

/** Maps a getUserMedia failure to a MicrophoneError with a readable message. */
function explainMediaError(error) {
  switch (error?.name) {
    case "NotAllowedError":
    case "SecurityError":
      return new MicrophoneError(
        "mic_denied",
        "Microphone access was denied. Allow the microphone for this site in the browser " +
          "(the icon left of the address) and press Start again.",
      );
    case "NotFoundError":
    case "OverconstrainedError":
      return new MicrophoneError("mic_missing", "No microphone was found. Plug one in and press Start again.");
    case "NotReadableError":
    case "AbortError":
      return new MicrophoneError(
        "mic_busy",
        "The microphone is in use by another program or could not be opened.",
      );
    default:
      return new MicrophoneError("mic_failed", `The microphone could not be started (${error?.message ?? error}).`);
  }
}

/** getUserMedia constraints: voice processing on, the chosen device if any. */
function micConstraints(deviceId) {
  const audio = { echoCancellation: true, noiseSuppression: true, autoGainControl: true, channelCount: 1 };
  if (deviceId) audio.deviceId = { ideal: deviceId };
  return { audio };
}

async function openStream(deviceId) {
  try {
    return await navigator.mediaDevices.getUserMedia(micConstraints(deviceId));
  } catch (error) {
    throw explainMediaError(error);
  }
}

export class Microphone {
  /**
   * @param {AudioContext} audioContext shared context; chunks come at its sample rate
   * @param {(pcm: ArrayBuffer, level: number) => void} onChunk called for every 20 ms chunk
   */
  constructor(audioContext, onChunk) {
    this.audioContext = audioContext;
    this.onChunk = onChunk;
    this.stream = null;
    this.source = null;
    this.node = null;
    this.muted = false;
    this.stopped = false;
  }

  /**
   * Asks for the mic and starts delivering chunks. Throws MicrophoneError. Returns false when
   * stop() came first (e.g. while the permission prompt was open): nothing is left running.
   */
  async start(deviceId = "") {
    if (!window.isSecureContext || !navigator.mediaDevices?.getUserMedia) {
      throw new MicrophoneError(
        "insecure",
        "The browser only allows the microphone on https:// pages or on http://localhost. " +
          "Open this page over https.",
      );
    }
    const stream = await openStream(deviceId);
    if (this.stopped) {
      stopTracks(stream);
      return false;
    }
    this.stream = stream;
    await this.audioContext.audioWorklet.addModule(WORKLET_URL);
    if (this.stopped) return false; // stop() has stopped the stream
    this.node = new AudioWorkletNode(this.audioContext, "pcm-capture", {
      numberOfInputs: 1,
      numberOfOutputs: 0,
      processorOptions: { chunkMs: 20 },
    });
    this.node.port.onmessage = ({ data }) => this.onChunk(data.pcm, data.level);
    this.connect(stream);
    return true;
  }

  /** Captures from another microphone from now on (the chunks go on without a break). */
  async switchTo(deviceId) {
    const stream = await openStream(deviceId);
    if (this.stopped) {
      stopTracks(stream);
      return;
    }
    this.source.disconnect();
    stopTracks(this.stream);
    this.stream = stream;
    this.connect(stream);
  }

  /** Muted: the track delivers silence (chunks keep coming, so the server's turn ends normally). */
  setMuted(muted) {
    this.muted = muted;
    this.stream?.getAudioTracks().forEach((track) => (track.enabled = !muted));
  }

  /** False when the browser does no echo cancellation: the speaker's sound reaches the mic. */
  get cancelsEcho() {
    return this.stream?.getAudioTracks()[0]?.getSettings().echoCancellation === true;
  }

  stop() {
    this.stopped = true;
    this.source?.disconnect();
    this.node?.port.close();
    stopTracks(this.stream);
    this.stream = this.source = this.node = null;
  }

  connect(stream) {
    this.setMuted(this.muted);
    this.source = this.audioContext.createMediaStreamSource(stream);
    this.source.connect(this.node);
  }
}

function stopTracks(stream) {
  stream?.getTracks().forEach((track) => track.stop());
}
