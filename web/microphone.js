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
  }

  /** Asks for the mic and starts delivering chunks. Throws MicrophoneError. */
  async start() {
    if (!window.isSecureContext || !navigator.mediaDevices?.getUserMedia) {
      throw new MicrophoneError(
        "insecure",
        "The browser only allows the microphone on https:// pages or on http://localhost. " +
          "Open this page over https.",
      );
    }
    try {
      this.stream = await navigator.mediaDevices.getUserMedia({
        audio: { echoCancellation: true, noiseSuppression: true, autoGainControl: true, channelCount: 1 },
      });
    } catch (error) {
      throw explainMediaError(error);
    }
    await this.audioContext.audioWorklet.addModule(WORKLET_URL);
    this.source = this.audioContext.createMediaStreamSource(this.stream);
    this.node = new AudioWorkletNode(this.audioContext, "pcm-capture", {
      numberOfInputs: 1,
      numberOfOutputs: 0,
      processorOptions: { chunkMs: 20 },
    });
    this.node.port.onmessage = ({ data }) => this.onChunk(data.pcm, data.level);
    this.source.connect(this.node);
  }

  stop() {
    this.source?.disconnect();
    this.node?.port.close();
    this.stream?.getTracks().forEach((track) => track.stop());
    this.stream = this.source = this.node = null;
  }
}
