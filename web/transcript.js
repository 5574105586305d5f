// The conversation as the page shows it: notes, the user's turns and the replies. A reply that
// was interrupted keeps only what was heard of it (as the OpenAI Realtime API truncates an
// item at the played position): the played time times the reply's speaking rate, to the end
// of the word.

const DEFAULT_CHARS_PER_SECOND = 14; // speaking rate until a reply of this session ends whole

/** The start of `text` heard in `heardSeconds` at `charsPerSecond`, to the end of a word. */
export function heardPart(text, heardSeconds, charsPerSecond) {
  const cut = Math.round(heardSeconds * charsPerSecond);
  if (cut <= 0) return "";
  if (cut >= text.length) return text;
  const wordEnd = text.slice(cut).search(/\s/);
  return text.slice(0, wordEnd < 0 ? text.length : cut + wordEnd).trimEnd();
}

/**
 * Keeps the newest item in view: the page scrolls to its end after each change unless the user
 * has scrolled up (to read back); scrolling to the end again resumes it.
 */
class Follower {
  constructor() {
    this.following = true;
    addEventListener("scroll", () => {
      const root = document.scrollingElement;
      this.following = root.scrollTop + root.clientHeight >= root.scrollHeight - 48;
    });
  }

  /** Runs `change`, then scrolls to the end if following. */
  run(change) {
    const result = change();
    if (this.following) document.scrollingElement.scrollTop = document.scrollingElement.scrollHeight;
    return result;
  }
}

export class Transcript {
  /** @param {HTMLOListElement} list */
  constructor(list) {
    this.list = list;
    this.pendingUserTurn = null;
    this.lastUserTurn = null;
    this.charsPerSecond = DEFAULT_CHARS_PER_SECOND;
    this.follower = new Follower();
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

  /** A typed turn. */
  userTyped(text) {
    this.lastUserTurn = this.append("user typed", text);
  }

  /** The server refused the last turn (a push-to-talk press too short to be a turn). */
  userTurnRefused() {
    this.lastUserTurn?.remove();
    this.lastUserTurn = null;
  }

  userSpeechDiscarded() {
    this.pendingUserTurn?.remove();
    this.pendingUserTurn = null;
  }

  /** A reply; its bubble appears with its first text, audio or end. */
  startReply() {
    return new Reply(this);
  }

  /** The conversation as plain text (what the page shows). */
  asText() {
    const lines = [];
    for (const item of this.list.children) {
      if (item.classList.contains("note")) lines.push(`[${item.textContent}]`);
      else if (item.classList.contains("user")) lines.push(`You: ${item.textContent}`);
      else {
        const interrupted = item.classList.contains("interrupted") ? " (interrupted)" : "";
        lines.push(`VITA: ${item.firstChild.data}${interrupted}`);
      }
    }
    return lines.join("\n\n") + "\n";
  }

  append(kind, text) {
    const item = document.createElement("li");
    item.className = kind;
    item.textContent = text;
    this.follower.run(() => this.list.append(item));
    return item;
  }
}

class Reply {
  constructor(transcript) {
    this.transcript = transcript;
    this.item = null;
    this.text = ""; // all the text received
    this.audioSeconds = null; // the reply's whole audio, known at response.done
  }

  /** The bubble: the reply's text, then a footnote. */
  get element() {
    if (this.item === null) {
      this.item = this.transcript.append("assistant", "");
      this.item.append(document.createTextNode(""), footnote());
    }
    return this.item;
  }

  appendText(delta) {
    this.text += delta;
    this.transcript.follower.run(() => this.element.firstChild.appendData(delta));
  }

  setFootnote(text) {
    this.element.lastChild.textContent = text;
  }

  /** response.done: the reply is complete; its speaking rate is the session's from now on. */
  finish({ state, timings }) {
    if (state === "not_addressed") this.element.firstChild.data ||= "(not addressed to the assistant: no reply)";
    this.audioSeconds = timings.audio_ms / 1000;
    if (this.text && this.audioSeconds > 0) this.transcript.charsPerSecond = this.text.length / this.audioSeconds;
  }

  /**
   * The reply was stopped after `heardSeconds` of its audio were played; `spoken` false: it had
   * no audio (the user read it), so all its text stays.
   */
  interrupt(heardSeconds, spoken) {
    const charsPerSecond =
      this.audioSeconds > 0 && this.text ? this.text.length / this.audioSeconds : this.transcript.charsPerSecond;
    const heard = spoken ? heardPart(this.text, heardSeconds, charsPerSecond) : this.text;
    this.element.firstChild.data = heard + (heard.length < this.text.length && heard ? "…" : "");
    this.element.classList.add("interrupted");
  }
}

function footnote() {
  const span = document.createElement("span");
  span.className = "meta";
  return span;
}
