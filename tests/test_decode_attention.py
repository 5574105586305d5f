"""Triton flash-decoding (vita/decode_attention.py) against gather + SDPA: on the GPU if there is
one, else in Triton's CPU interpreter (tests/conftest.py)."""

import pytest
import torch

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

from vita.decode_attention import BLOCK_KEYS, decode_attention, splits_for
from vita.qwen2 import LLMConfig, attention_bias, grouped_attention, new_kv_cache


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("max_keys", [64, 320])
def test_matches_gather_and_sdpa(dtype, max_keys):
    """GQA group 7 as in VITA-1.5, rows of different lengths in scattered slots, one or more splits."""
    config = LLMConfig(vocab_size=8, hidden_size=14 * 16, intermediate_size=8, num_hidden_layers=1,
                       num_attention_heads=14, num_key_value_heads=2, rms_norm_eps=1e-6, rope_theta=1e4,
                       max_position_embeddings=512)
    generator = torch.Generator().manual_seed(max_keys)
    cache = new_kv_cache(config, slots=5, max_len=max_keys, device="cpu", dtype=dtype)
    cache.layers[0].copy_(torch.randn(cache.layers[0].shape, generator=generator))
    slot_ids = torch.tensor([3, 0, 4])
    lengths = torch.tensor([1, max_keys, max_keys // 2 + 5])
    q = torch.randn(3, 1, 14, 16, generator=generator).to(dtype)

    out = decode_attention(q[:, 0].to(DEVICE), cache.layers[0].to(DEVICE), slot_ids.to(DEVICE), lengths.to(DEVICE),
                           max_keys).cpu()

    allowed = (torch.arange(max_keys) < lengths[:, None])[:, None, None]
    k, v = cache.read(0, slot_ids, max_keys)
    expected = grouped_attention(q.float(), k.float(), v.float(), attention_bias(allowed, 7, torch.float32))
    tolerance = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(out.float(), expected[:, 0], atol=tolerance, rtol=tolerance)


def test_splits_fill_the_gpu_without_empty_blocks():
    assert splits_for(rows=1, kv_heads=4, max_keys=1024, processors=132) == 16  # 1024 / 64 caps it
    assert splits_for(rows=1, kv_heads=4, max_keys=8192, processors=132) == 66  # 2 programs per processor
    assert splits_for(rows=64, kv_heads=4, max_keys=4096, processors=132) == 2
    assert splits_for(rows=1, kv_heads=4, max_keys=BLOCK_KEYS, processors=132) == 1
