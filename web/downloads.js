// Downloads of the conversation: its text, and the reply audio as heard (one WAV file, the
// replies in order with half a second of silence between them).

const SAMPLE_RATE = 24000; // reply audio (server/protocol.py OUTPUT_SAMPLE_RATE)
const PAUSE_SAMPLES = SAMPLE_RATE / 2;

/** Offers `blob` as a file download named `name`. */
export function download(blob, name) {
  const link = document.createElement("a");
  link.href = URL.createObjectURL(blob);
  link.download = name;
  link.click();
  setTimeout(() => URL.revokeObjectURL(link.href), 10_000);
}

/** A file name with the date and time, e.g. vita-chat-2026-12-01-1530.txt */
export function fileName(extension, date = new Date()) {
  const pad = (n) => String(n).padStart(2, "0");
  const stamp = `${date.getFullYear()}-${pad(date.getMonth() + 1)}-${pad(date.getDate())}-${pad(date.getHours())}${pad(date.getMinutes())}`;
  return `vita-chat-${stamp}.${extension}`;
}

/** Every reply's audio of the conversation. */
export class ReplyAudio {
  constructor() {
    this.replies = new Map(); // response_id → {chunks: Uint8Array[] of PCM16 LE, bytes}
  }

  /** Keeps one segment (PCM16 LE bytes, as received) of a reply. */
  add(responseId, pcmBytes) {
    const reply = this.replies.get(responseId) ?? { chunks: [], bytes: 0 };
    reply.chunks.push(new Uint8Array(pcmBytes));
    reply.bytes += pcmBytes.byteLength;
    this.replies.set(responseId, reply);
  }

  /** An interrupted reply keeps only its first `seconds` (what was heard). */
  cut(responseId, seconds) {
    const reply = this.replies.get(responseId);
    if (!reply) return;
    let keep = 2 * Math.round(seconds * SAMPLE_RATE);
    reply.chunks = reply.chunks.map((chunk) => {
      const kept = chunk.subarray(0, Math.max(0, keep));
      keep -= kept.length;
      return kept;
    });
    reply.bytes = reply.chunks.reduce((sum, chunk) => sum + chunk.length, 0);
  }

  /** A 16-bit mono WAV file of all replies. */
  wav() {
    const kept = [...this.replies.values()].filter((reply) => reply.bytes > 0);
    const bytes = kept.reduce((sum, reply) => sum + reply.bytes, 0) + 2 * PAUSE_SAMPLES * Math.max(0, kept.length - 1);
    const header = new DataView(new ArrayBuffer(44));
    const text = (offset, value) => [...value].forEach((c, i) => header.setUint8(offset + i, c.charCodeAt(0)));
    text(0, "RIFF");
    header.setUint32(4, 36 + bytes, true);
    text(8, "WAVEfmt ");
    header.setUint32(16, 16, true); // fmt chunk size
    header.setUint16(20, 1, true); // PCM
    header.setUint16(22, 1, true); // mono
    header.setUint32(24, SAMPLE_RATE, true);
    header.setUint32(28, SAMPLE_RATE * 2, true); // bytes per second
    header.setUint16(32, 2, true); // bytes per frame
    header.setUint16(34, 16, true); // bits per sample
    text(36, "data");
    header.setUint32(40, bytes, true);
    const parts = [header];
    kept.forEach((reply, i) => {
      if (i > 0) parts.push(new Uint8Array(2 * PAUSE_SAMPLES));
      parts.push(...reply.chunks);
    });
    return new Blob(parts, { type: "audio/wav" });
  }
}
