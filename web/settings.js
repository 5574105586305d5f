// The settings form. Each field is a session setting of server/protocol.py (session.start and
// session.update); what the user changed is remembered in localStorage and sent with every
// session.start, and the form shows the server's effective settings once connected.

const STORAGE_KEY = "vita.settings";

/** form field name → [group of the session event (null: top level), type of value] */
const FIELDS = {
  system_prompt: [null, "text"],
  turn_detection: [null, "text"],
  temperature: ["generation", "number"],
  max_new_tokens: ["generation", "number"],
  aggressiveness: ["vad", "number"],
  speak: ["generation", "boolean"],
};

/** `{name: value}` → the nested fields of a session event, e.g. `{generation: {speak: false}}`. */
function sessionFields(values) {
  const fields = {};
  for (const [name, value] of Object.entries(values)) {
    const [group] = FIELDS[name];
    if (group === null) fields[name] = value;
    else (fields[group] ??= {})[name] = value;
  }
  return fields;
}

function readInput(input, type) {
  if (type === "boolean") return input.checked;
  if (type === "number") return Number(input.value);
  return input.value.trim() || null; // no text: the server's default prompt
}

function loadChanges() {
  try {
    const stored = JSON.parse(localStorage.getItem(STORAGE_KEY) ?? "{}");
    return Object.fromEntries(Object.entries(stored).filter(([name]) => name in FIELDS));
  } catch {
    return {};
  }
}

export class Settings {
  /**
   * @param {HTMLFormElement} form
   * @param {(fields: object) => void} onChange called with the session fields the user just changed
   */
  constructor(form, onChange) {
    this.form = form;
    this.onChange = onChange;
    this.changes = loadChanges(); // {field name: value} of what the user set
    this.show(this.sessionFields);
    form.addEventListener("submit", (event) => event.preventDefault());
    form.addEventListener("change", ({ target }) => this.changed(target));
  }

  /** The session fields of everything the user changed (for session.start). */
  get sessionFields() {
    return sessionFields(this.changes);
  }

  /** Shows session settings as the server echoes them (session.ready, session.updated). */
  show(session) {
    for (const [name, [group, type]] of Object.entries(FIELDS)) {
      const source = group === null ? session : session[group];
      if (source === undefined || !(name in source)) continue;
      const input = this.form.elements[name];
      if (input === document.activeElement) continue; // being edited: the user's value is not sent yet
      if (type === "boolean") input.checked = source[name];
      else input.value = source[name] ?? "";
    }
  }

  changed(input) {
    const field = FIELDS[input.name];
    if (field === undefined) return; // not a session setting (the device choices)
    if (input.value === "" && field[1] === "number") return;
    if (!input.checkValidity()) {
      input.reportValidity();
      return;
    }
    this.changes[input.name] = readInput(input, field[1]);
    localStorage.setItem(STORAGE_KEY, JSON.stringify(this.changes));
    this.onChange(sessionFields({ [input.name]: this.changes[input.name] }));
  }
}
