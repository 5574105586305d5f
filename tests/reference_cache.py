"""transformers' name for a forward's KV-cache argument: `cache` in newer releases (5.24 warns that
`past_key_values` goes in 5.40), `past_key_values` before. The reference models in the tests pass
their `DynamicCache` under it."""

from __future__ import annotations

import inspect

from transformers.models.llama.modeling_llama import LlamaDecoderLayer

CACHE_ARGUMENT = "cache" if "cache" in inspect.signature(LlamaDecoderLayer.forward).parameters else "past_key_values"
