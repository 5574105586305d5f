"""Plain single-stream streaming generation: the reference path, no engine.

`generate_ids` runs one prompt through the LLM with its own KV cache and yields sampled ids
until a stop id (yielded too, as the engine does) or `max_tokens`. `ReplyTextStream` turns
ids into clean text deltas and splits off the reply's leading state token (☞ ☟ ☜).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

import torch

from vita.model import VitaQwen2ForCausalLM
from vita.prompt import ReplyState, parse_reply_state
from vita.qwen2 import KVCache
from vita.sampling import SamplingBatch, SamplingParams, sample
from vita.tokenizer import VitaTokenizer


@torch.inference_mode()
def generate_ids(
    model: VitaQwen2ForCausalLM,
    prompt_embeds: torch.Tensor,
    params: SamplingParams,
    stop_ids: Iterable[int],
    *,
    generator: torch.Generator | None = None,
) -> Iterator[int]:
    """Sample ids after `prompt_embeds [T, hidden]`; a stop id is the last one yielded."""
    llm = model.model
    stop_ids = set(stop_ids)
    prompt_len = prompt_embeds.shape[0]
    device = prompt_embeds.device
    cache = KVCache(llm.config, 1, prompt_len + params.max_tokens, device, prompt_embeds.dtype)
    slot = torch.zeros(1, dtype=torch.long, device=device)
    batch = SamplingBatch.from_params([params], device)
    inputs = prompt_embeds[None]
    positions = torch.arange(prompt_len, device=device)[None]
    for _ in range(params.max_tokens):
        kv_len = int(positions[0, -1]) + 1
        hidden = llm(inputs, positions, cache, slot, kv_len)
        logits = model.lm_head(hidden[:, -1])
        token_id = int(sample(logits, batch, generator)[0])
        yield token_id
        if token_id in stop_ids:
            return
        inputs = llm.embed_tokens(torch.tensor([[token_id]], device=device))
        positions = torch.tensor([[kv_len]], device=device)


class ReplyTextStream:
    """Ids of one reply -> text deltas without the leading state token.

    Text is held back until the first non-blank character shows whether the reply starts
    with a state token; `state` is None until then (and stays None if it does not).
    `closed` tells whether the reply ended with a stop id.
    """

    def __init__(self, tokenizer: VitaTokenizer):
        self.tokenizer = tokenizer
        self.decoder = tokenizer.stream_decoder()
        self.token_ids: list[int] = []
        self.state: ReplyState | None = None
        self.state_known = False
        self.pending = ""

    @property
    def closed(self) -> bool:
        return bool(self.token_ids) and self.token_ids[-1] in self.tokenizer.stop_ids

    def push(self, token_id: int) -> str:
        """Add one reply id; returns the text it releases ('' while held back)."""
        self.token_ids.append(token_id)
        return self._release(self.decoder.push(token_id))

    def flush(self) -> str:
        """End of the reply: returns the text still held back, settling `state`."""
        delta = self._release(self.decoder.flush())
        if self.state_known:
            return delta
        self.state, rest = parse_reply_state(self.pending)
        self.state_known, self.pending = True, ""
        return rest

    def _release(self, delta: str) -> str:
        if self.state_known:
            return delta
        self.pending += delta
        if not self.pending.strip():
            return ""
        self.state, rest = parse_reply_state(self.pending)
        if self.state is not None and not rest:
            return ""  # the space that may follow the state token has not arrived yet
        self.state_known, self.pending = True, ""
        return rest


def generate_text(
    model: VitaQwen2ForCausalLM,
    stream: ReplyTextStream,
    prompt_embeds: torch.Tensor,
    params: SamplingParams,
    *,
    generator: torch.Generator | None = None,
) -> Iterator[str]:
    """Yield the reply's text deltas; `stream` then holds its ids, state and whether it closed."""
    for token_id in generate_ids(model, prompt_embeds, params, stream.tokenizer.stop_ids, generator=generator):
        delta = stream.push(token_id)
        if delta:
            yield delta
    tail = stream.flush()
    if tail:
        yield tail
