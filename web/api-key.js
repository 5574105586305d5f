// The API key the page presents when the server asks for one (VITA_API_KEYS): typed in Settings or
// given once as ?api_key=… in the page's URL, and remembered in this browser. Browsers cannot set
// headers on a websocket, so it travels as the `openai-insecure-api-key.<key>` subprotocol.

const STORAGE_KEY = "vita.apiKey";
const KEY_SUBPROTOCOL_PREFIX = "openai-insecure-api-key."; // server/auth.py

export class ApiKey {
  /** @param {HTMLInputElement} input the Settings field */
  constructor(input) {
    this.input = input;
    const fromUrl = new URLSearchParams(location.search).get("api_key");
    if (fromUrl) localStorage.setItem(STORAGE_KEY, fromUrl);
    input.value = localStorage.getItem(STORAGE_KEY) ?? "";
    input.addEventListener("change", () => {
      const key = input.value.trim();
      if (key) localStorage.setItem(STORAGE_KEY, key);
      else localStorage.removeItem(STORAGE_KEY);
    });
  }

  /** The websocket subprotocols that carry the key (none without one). */
  get subprotocols() {
    const key = this.input.value.trim();
    return key ? ["vita", KEY_SUBPROTOCOL_PREFIX + key] : [];
  }
}
