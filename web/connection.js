// Websocket connection to the server's /ws endpoint (protocol: server/protocol.py),
// with automatic reconnection and back-off.

const AUDIO_HEADER_BYTES = 8; // uint32 LE response_id + uint32 LE segment index
const RETRY_SECONDS = [1, 2, 4, 8, 15];
const SERVER_FULL_RETRY_SECONDS = 10;
const MAX_VIDEO_BACKLOG_BYTES = 256 * 1024; // skip camera frames while the socket is congested
const FINAL = new Set(["idle_timeout", "unauthorized", "origin_not_allowed"]); // retrying would not help

/** `ws(s)://` URL of the endpoint next to the page (works under a reverse-proxy prefix too). */
export function websocketUrl(pageUrl = location.href) {
  const url = new URL("ws", pageUrl);
  url.protocol = url.protocol === "https:" ? "wss:" : "ws:";
  url.hash = url.search = "";
  return url.href;
}

/** Base64 text of a Blob (for the `video.frame` event). */
async function blobToBase64(blob) {
  const bytes = new Uint8Array(await blob.arrayBuffer());
  let binary = "";
  for (let i = 0; i < bytes.length; i += 0x8000) {
    binary += String.fromCharCode(...bytes.subarray(i, i + 0x8000));
  }
  return btoa(binary);
}

export class Connection {
  /**
   * @param {string} url websocket URL
   * @param {() => object} sessionStart makes the `session.start` event sent on every (re)connect
   * @param {() => string[]} subprotocols the subprotocols to offer on every (re)connect (the API key)
   * @param {object} handlers
   *   onStatus(status, detail): status is "connecting" | "connected" | "reconnecting" | "offline";
   *     detail is {reason, seconds?, message?} (reason: "unreachable" | "lost" | "closed" or the
   *     code of the fatal error that came before the close: "server_full" | "not_ready" |
   *     "idle_timeout" | "unauthorized" | "origin_not_allowed" | …; a server shutting down closes
   *     without one, so it reads "lost"; after the FINAL ones the status is "offline", no retry)
   *   onEvent(event): every JSON event from the server (session.ready included)
   *   onAudio(responseId, segment, pcmBytes): every reply audio segment
   */
  constructor(url, sessionStart, subprotocols, { onStatus, onEvent, onAudio }) {
    this.url = url;
    this.sessionStart = sessionStart;
    this.subprotocols = subprotocols;
    this.onStatus = onStatus;
    this.onEvent = onEvent;
    this.onAudio = onAudio;
    this.socket = null;
    this.ready = false; // session.ready received on the current socket
    this.attempt = 0;
    this.retryTimer = null;
    this.fatalError = null; // error event that announced the coming close
    this.wasOpen = false; // the current socket got as far as "open"
  }

  open() {
    clearTimeout(this.retryTimer);
    this.fatalError = null;
    this.onStatus("connecting", {});
    const socket = new WebSocket(this.url, this.subprotocols());
    socket.binaryType = "arraybuffer";
    socket.onopen = () => {
      this.wasOpen = true;
      socket.send(JSON.stringify(this.sessionStart()));
    };
    socket.onmessage = ({ data }) => this.receive(data);
    socket.onclose = () => this.closed(socket);
    this.socket = socket;
    this.wasOpen = false;
  }

  /** Closes for good (the user pressed Stop). */
  close() {
    clearTimeout(this.retryTimer);
    const socket = this.socket;
    this.socket = null;
    this.ready = false;
    socket?.close(1000, "client stopped");
    this.onStatus("offline", { reason: "closed" });
  }

  /** Skips the back-off wait. */
  reconnectNow() {
    if (this.socket === null) this.open();
  }

  send(event) {
    if (this.ready) this.socket.send(JSON.stringify(event));
  }

  /** Sends one chunk of PCM16 microphone audio (dropped while no session is ready). */
  sendAudio(pcm) {
    if (this.ready) this.socket.send(pcm);
  }

  async sendVideoFrame(jpeg) {
    if (!this.ready || this.socket.bufferedAmount > MAX_VIDEO_BACKLOG_BYTES) return;
    const image = await blobToBase64(jpeg);
    this.send({ type: "video.frame", image });
  }

  receive(data) {
    if (typeof data !== "string") {
      const header = new DataView(data, 0, AUDIO_HEADER_BYTES);
      this.onAudio(header.getUint32(0, true), header.getUint32(4, true), data.slice(AUDIO_HEADER_BYTES));
      return;
    }
    const event = JSON.parse(data);
    if (event.type === "session.ready") {
      this.ready = true;
      this.attempt = 0;
      this.onStatus("connected", {});
    } else if (event.type === "error" && event.fatal) {
      this.fatalError = event;
    }
    this.onEvent(event);
  }

  closed(socket) {
    if (socket !== this.socket) return; // closed on purpose, or an older socket
    this.socket = null;
    this.ready = false;
    const reason = this.fatalError?.code ?? (this.wasOpen ? "lost" : "unreachable");
    const message = this.fatalError?.message;
    if (FINAL.has(reason)) {
      this.onStatus("offline", { reason, message });
      return;
    }
    const seconds =
      reason === "server_full"
        ? SERVER_FULL_RETRY_SECONDS
        : RETRY_SECONDS[Math.min(this.attempt, RETRY_SECONDS.length - 1)];
    this.attempt += 1;
    this.retryTimer = setTimeout(() => this.open(), seconds * 1000);
    this.onStatus("reconnecting", { reason, seconds, message });
  }
}
