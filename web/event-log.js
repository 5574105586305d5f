// The collapsible event log for people debugging latency: every server event but the text
// deltas, what the page sent, and per reply the server's timings and the latency heard here.

const MAX_ENTRIES = 300;

/** `{a: 1, b: {c: 2}}` → "a=1 b={"c":2}" */
function fields(event) {
  return Object.entries(event)
    .filter(([name]) => name !== "type")
    .map(([name, value]) => `${name}=${typeof value === "object" && value !== null ? JSON.stringify(value) : value}`)
    .join(" ");
}

function ms(value) {
  return value == null ? "–" : `${Math.round(value)} ms`;
}

export class EventLog {
  /** @param {HTMLOListElement} list */
  constructor(list) {
    this.list = list;
    this.startedAt = performance.now();
  }

  add(text) {
    const item = document.createElement("li");
    const seconds = ((performance.now() - this.startedAt) / 1000).toFixed(3);
    item.textContent = `+${seconds} s  ${text}`;
    this.list.append(item);
    while (this.list.childElementCount > MAX_ENTRIES) this.list.firstElementChild.remove();
  }

  received(event) {
    if (event.type === "response.text.delta") return;
    if (event.type === "response.done") {
      const t = event.timings;
      this.add(
        `response.done #${event.response_id} ${event.state}: end of speech → first text ${ms(t.end_of_speech_to_first_text_ms)}, ` +
          `→ first audio ${ms(t.end_of_speech_to_first_audio_ms)}, total ${ms(t.total_ms)}, audio ${ms(t.audio_ms)}, ` +
          `real-time factor ${t.real_time_factor?.toFixed(2) ?? "–"}, ${event.audio_segments} segments` +
          (t.stages ? `; stages ${Object.entries(t.stages).map(([stage, value]) => `${stage} ${ms(value)}`).join(", ")}` : ""),
      );
    } else {
      this.add(`${event.type} ${fields(event)}`);
    }
  }

  sent(event) {
    this.add(`sent ${event.type} ${fields(event)}`);
  }

  /** Latency measured in the browser: end of speech → first reply audio heard. */
  heard(responseId, milliseconds) {
    this.add(`reply #${responseId} first audio heard ${ms(milliseconds)} after the end of speech (browser)`);
  }
}
