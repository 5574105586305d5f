"""Plain single-stream streaming generation: the reference path, no engine.

`generate_ids` runs one prompt through the LLM with its own KV cache and yields sampled ids
until a stop id (yielded too, as the engine does) or `max_tokens`; `generate_text` turns them
into a reply's text deltas through `vita.reply_text.ReplyTextStream`.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

import torch

from vita.model import VitaQwen2ForCausalLM
from vita.qwen2 import new_kv_cache
from vita.reply_text import ReplyTextStream
from vita.sampling import SamplingBatch, SamplingParams, sample


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
    cache = new_kv_cache(llm.config, 1, prompt_len + params.max_tokens, device, prompt_embeds.dtype)
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
