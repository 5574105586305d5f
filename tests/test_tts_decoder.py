"""LLM2TTSCodecAR against transformers' Llama modules (independent reference of the upstream math)."""

import json

import pytest
import torch
from transformers import LlamaConfig
from transformers.cache_utils import DynamicCache
from transformers.models.llama.modeling_llama import LlamaDecoderLayer, LlamaRMSNorm, LlamaRotaryEmbedding

from reference_cache import CACHE_ARGUMENT
from tts.config import DecoderConfig
from tts.batch import DecoderBatch
from tts.decoder import DecoderLayer, LLM2TTSCodecAR, new_kv_cache, prefill_store, rotary_cos_sin, step_store
from tts.weights import WeightMismatchError


def llama_config(config: DecoderConfig) -> LlamaConfig:
    """The LlamaConfig upstream builds for these shapes, with its eager attention."""
    llama = LlamaConfig(
        vocab_size=config.odim + 4,
        hidden_size=config.transformer_attention_dim,
        intermediate_size=config.transformer_linear_units,
        num_hidden_layers=config.transformer_num_blocks,
        num_attention_heads=config.transformer_attention_heads,
        max_position_embeddings=2048,
    )
    llama._attn_implementation = "eager"
    return llama


def test_decoder_layer_matches_transformers_llama_layer_with_cache():
    config = DecoderConfig(
        idim=32, odim=10, transformer_attention_dim=32, transformer_linear_units=48,
        transformer_attention_heads=4, transformer_num_blocks=1, encoder_output_dim=32,
    )
    torch.manual_seed(0)
    ours = DecoderLayer(config)
    for p in ours.parameters():
        torch.nn.init.normal_(p, std=0.3)
    reference = LlamaDecoderLayer(llama_config(config), layer_idx=0)
    reference.load_state_dict(ours.state_dict(), strict=True)
    rotary = LlamaRotaryEmbedding(llama_config(config))

    prompt, step = torch.randn(1, 7, 32), torch.randn(1, 1, 32)
    ref_cache = DynamicCache()
    ref_prompt = reference(prompt, position_embeddings=rotary(prompt, torch.arange(7)[None]),
                           use_cache=True, **{CACHE_ARGUMENT: ref_cache})
    ref_step = reference(step, position_embeddings=rotary(step, torch.tensor([[7]])),
                         use_cache=True, **{CACHE_ARGUMENT: ref_cache})

    cache = new_kv_cache(config, slots=2, capacity=16, device=torch.device("cpu"), dtype=torch.float32)
    cos, sin = rotary_cos_sin(torch.arange(7), config.head_dim, config.rope_theta, torch.float32)
    out_prompt = ours(prompt, cos, sin, prefill_store(cache, torch.tensor([1]), 7, None))
    positions = torch.tensor([0, 7])
    cos, sin = rotary_cos_sin(positions, config.head_dim, config.rope_theta, torch.float32)
    # slot 0 is idle (position 0), slot 1 continues at position 7; both attend within a span of 16
    out_step = ours(torch.cat([torch.randn(1, 1, 32), step]), cos[:, None, None], sin[:, None, None],
                    step_store(cache, positions, span=16))[1:]

    torch.testing.assert_close(out_prompt, ref_prompt, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out_step, ref_step, atol=1e-5, rtol=1e-5)


def reference_logits(state: dict, config: DecoderConfig, text: torch.Tensor, fed: list[int]) -> list[torch.Tensor]:
    """Upstream `infer` rebuilt from transformers modules: logits after feeding sos then `fed`."""
    llama = llama_config(config)

    def layers(prefix: str, count: int) -> list[LlamaDecoderLayer]:
        built = []
        for i in range(count):
            layer = LlamaDecoderLayer(llama, layer_idx=i)
            layer.load_state_dict({k[len(f"{prefix}.{i}."):]: v for k, v in state.items()
                                   if k.startswith(f"{prefix}.{i}.")})
            built.append(layer)
        return built

    pre_nn, main = layers("layers_pre_nn", config.transformer_num_blocks // 2), layers("layers", config.transformer_num_blocks)
    norm = LlamaRMSNorm(config.transformer_attention_dim, eps=1e-6)
    norm.load_state_dict({"weight": state["norm.weight"]})
    rotary = LlamaRotaryEmbedding(llama)
    embedding = state["embedding.weight"]

    x = text[None]
    pos = rotary(x, torch.arange(x.shape[1])[None])
    for layer in pre_nn:
        x = layer(x, position_embeddings=pos)
    x = torch.cat([embedding[config.bos_id][None, None], x], dim=1)
    cache = DynamicCache()
    pos = rotary(x, torch.arange(x.shape[1])[None])
    for layer in main:
        x = layer(x, position_embeddings=pos, use_cache=True, **{CACHE_ARGUMENT: cache})
    logits = []
    for token in [config.sos_id, *fed]:
        x = embedding[token][None, None]
        pos = rotary(x, torch.tensor([[cache.get_seq_length()]]))
        for layer in main:
            x = layer(x, position_embeddings=pos, use_cache=True, **{CACHE_ARGUMENT: cache})
        logits.append(torch.nn.functional.linear(norm(x), state["out_fnn.weight"], state["out_fnn.bias"])[0, 0])
    return logits


def test_decoder_logits_match_transformers_reference(tts_dir):
    decoder = LLM2TTSCodecAR.load(tts_dir / "decoder")
    state = torch.load(tts_dir / "decoder" / "final.pt")["model"]
    text = torch.randn(9, decoder.config.idim, generator=torch.Generator().manual_seed(1))
    fed = [5, 17, 63, 0]
    expected = reference_logits(state, decoder.config, text, fed)

    cache = new_kv_cache(decoder.config, slots=1, capacity=32, device=torch.device("cpu"), dtype=torch.float32)
    position = decoder.prefill(text, cache, slot=0)
    got = []
    for token in [decoder.config.sos_id, *fed]:
        got.append(decoder.step(torch.tensor([token]), torch.tensor([position]), cache, span=32)[0])
        position += 1
    for g, e in zip(got, expected):
        torch.testing.assert_close(g, e, atol=1e-4, rtol=1e-4)


def test_top_k_sampling_frequencies_follow_softmax_of_the_k_best(tts_dir):
    decoder = LLM2TTSCodecAR.load(tts_dir / "decoder")
    logits = torch.full((decoder.config.odim + 4,), -5.0)
    logits[[3, 7, 11]] = torch.tensor([2.0, 1.0, 0.5])
    logits[decoder.config.sos_id] = 10.0  # never a codec code: must be skipped
    uniforms = torch.rand(4000, generator=torch.Generator().manual_seed(0))
    draws = decoder.sample(logits.expand(4000, -1), torch.full((4000,), 2), uniforms).tolist()
    assert set(draws) == {3, 7}
    p3 = 1 / (1 + torch.exp(torch.tensor(-1.0))).item()
    assert abs(draws.count(3) / len(draws) - p3) < 0.03
    assert set(decoder.sample(logits.expand(20, -1), torch.ones(20, dtype=torch.long), uniforms[:20]).tolist()) == {3}
    # each row keeps its own k: the third-best code only where k = 3 and the draw passes the first two
    top_k = torch.tensor([1, 2, 3, 3])
    draws = decoder.sample(logits.expand(4, -1), top_k, torch.tensor([0.999, 0.999, 0.999, 0.1])).tolist()
    assert draws == [3, 7, 11, 3]


def test_generation_ends_at_eos_and_at_max_tokens(tts_dir):
    decoder = LLM2TTSCodecAR.load(tts_dir / "decoder")
    text = torch.randn(4, decoder.config.idim)
    def tokens() -> list[int]:
        batch = DecoderBatch(decoder, slots=1, capacity=32)
        stream, got = batch.add(text, top_k=1, max_tokens=6, generator=None), []
        while not stream.finished:
            got += batch.step()[0][1]
        return got

    with torch.no_grad():
        decoder.out_fnn.weight.zero_()
        decoder.out_fnn.bias.zero_()
        decoder.out_fnn.bias[9] = 5.0
        assert tokens() == [9] * 6
        decoder.out_fnn.bias[decoder.config.eos_id] = 6.0
        assert tokens() == []  # eos at once: no codec token, and the stream ended


def test_mismatched_decoder_shape_names_the_tensor(tts_dir, tmp_path):
    (tmp_path / "decoder").mkdir()
    (tmp_path / "decoder" / "final.pt").write_bytes((tts_dir / "decoder" / "final.pt").read_bytes())
    idim, odim, args = json.loads((tts_dir / "decoder" / "model.json").read_text())
    args["transformer_linear_units"] += 1
    (tmp_path / "decoder" / "model.json").write_text(json.dumps([idim, odim, args]))
    with pytest.raises(WeightMismatchError, match=r"layers_pre_nn\.0\.mlp\.gate_proj\.weight has shape \(32, 16\)"):
        LLM2TTSCodecAR.load(tmp_path / "decoder")


def test_missing_and_unexpected_decoder_tensors_are_named(tts_dir, tmp_path):
    (tmp_path / "decoder").mkdir()
    (tmp_path / "decoder" / "model.json").write_text((tts_dir / "decoder" / "model.json").read_text())
    state = torch.load(tts_dir / "decoder" / "final.pt")["model"]
    torch.save({k: v for k, v in state.items() if k != "norm.weight"}, tmp_path / "decoder" / "final.pt")
    with pytest.raises(WeightMismatchError, match=r"norm\.weight .* is missing"):
        LLM2TTSCodecAR.load(tmp_path / "decoder")
    torch.save({**state, "layers.2.mlp.up_proj.weight": torch.zeros(1)}, tmp_path / "decoder" / "final.pt")
    with pytest.raises(WeightMismatchError, match=r"unexpected tensor layers\.2\.mlp\.up_proj\.weight"):
        LLM2TTSCodecAR.load(tmp_path / "decoder")


def test_bfloat16_decoder_tracks_float32(tts_dir):
    text = torch.randn(9, 16, generator=torch.Generator().manual_seed(2))
    logits = {}
    for dtype in (torch.float32, torch.bfloat16):
        decoder = LLM2TTSCodecAR.load(tts_dir / "decoder", dtype=dtype)
        cache = new_kv_cache(decoder.config, slots=1, capacity=16, device=torch.device("cpu"), dtype=dtype)
        position = decoder.prefill(text, cache, slot=0)
        logits[dtype] = torch.stack([decoder.step(torch.tensor([t]), torch.tensor([position + i]), cache, span=16)[0]
                                     for i, t in enumerate([decoder.config.sos_id, 4, 8])])
    assert logits[torch.bfloat16].dtype == torch.float32
    torch.testing.assert_close(logits[torch.bfloat16], logits[torch.float32], atol=0.15, rtol=0.05)
