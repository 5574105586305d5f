// Session options from the page URL, e.g. ?temperature=0&max_new_tokens=64&system_prompt=...
// They go into session.start (see GenerationSettings in server/protocol.py).

const GENERATION_NUMBERS = ["temperature", "top_p", "top_k", "max_new_tokens"];
const GENERATION_FLAGS = ["speak", "respect_not_addressed"];

/** `{system_prompt?, generation?}` for session.start from a query string. */
export function sessionOptionsFromUrl(search = location.search) {
  const params = new URLSearchParams(search);
  const generation = {};
  for (const name of GENERATION_NUMBERS) {
    if (params.has(name)) generation[name] = Number(params.get(name));
  }
  for (const name of GENERATION_FLAGS) {
    if (params.has(name)) generation[name] = !["0", "false", "no", "off"].includes(params.get(name).toLowerCase());
  }
  const options = {};
  if (params.has("system_prompt")) options.system_prompt = params.get("system_prompt");
  if (Object.keys(generation).length > 0) options.generation = generation;
  return options;
}
