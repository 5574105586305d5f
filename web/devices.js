// Which microphone, camera and speaker: <select>s filled from enumerateDevices (their names are
// known once the page may use the microphone), the choice remembered in localStorage. On phones
// the cameras are listed by the browser as front and back.

const STORAGE_KEY = "vita.devices";
const KINDS = ["audioinput", "videoinput", "audiooutput"];
const SYSTEM_DEFAULT_IDS = new Set(["", "default", "communications"]); // shown as "Default"

export class Devices {
  /** @param {(kind: string, deviceId: string) => void} onChange the user picked another device */
  constructor(onChange) {
    try {
      this.chosen = JSON.parse(localStorage.getItem(STORAGE_KEY) ?? "{}");
    } catch {
      this.chosen = {};
    }
    this.selects = Object.fromEntries(KINDS.map((kind) => [kind, document.getElementById(kind)]));
    for (const [kind, select] of Object.entries(this.selects)) {
      select.addEventListener("change", () => {
        this.chosen[kind] = select.value;
        localStorage.setItem(STORAGE_KEY, JSON.stringify(this.chosen));
        onChange(kind, select.value);
      });
    }
    const canPickSpeaker = typeof AudioContext !== "undefined" && "setSinkId" in AudioContext.prototype;
    document.getElementById("speaker-choice").hidden = !canPickSpeaker;
    navigator.mediaDevices?.addEventListener("devicechange", () => this.refresh());
  }

  /** The remembered device of a kind ("" = the system's default). */
  chosenId(kind) {
    return this.chosen[kind] ?? "";
  }

  /** Lists the devices present now; a remembered one that is missing shows as Default. */
  async refresh() {
    const devices = await navigator.mediaDevices.enumerateDevices();
    for (const [kind, select] of Object.entries(this.selects)) {
      const options = [new Option("Default", "")];
      for (const device of devices) {
        if (device.kind !== kind || SYSTEM_DEFAULT_IDS.has(device.deviceId)) continue;
        options.push(new Option(device.label || `${kind} ${options.length}`, device.deviceId));
      }
      select.replaceChildren(...options);
      select.value = options.some((option) => option.value === this.chosenId(kind)) ? this.chosenId(kind) : "";
    }
  }
}
