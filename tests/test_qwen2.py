"""Qwen2Model against transformers' Qwen2ForCausalLM with identical random weights."""

import pytest
import torch
from transformers import Qwen2Config, Qwen2ForCausalLM
from transformers.cache_utils import DynamicCache

from reference_cache import CACHE_ARGUMENT
from vita.qwen2 import LLMConfig, Qwen2Model, new_kv_cache

VOCAB = 300


def hf_config(config: LLMConfig) -> Qwen2Config:
    return Qwen2Config(
        vocab_size=config.vocab_size,
        hidden_size=config.hidden_size,
        intermediate_size=config.intermediate_size,
        num_hidden_layers=config.num_hidden_layers,
        num_attention_heads=config.num_attention_heads,
        num_key_value_heads=config.num_key_value_heads,
        rms_norm_eps=config.rms_norm_eps,
        rope_theta=config.rope_theta,
        max_position_embeddings=config.max_position_embeddings,
        tie_word_embeddings=False,
        attn_implementation="eager",
    )


def randomize(module: torch.nn.Module, seed: int) -> None:
    """Random weights everywhere, norms included, so every parameter matters."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in module.parameters():
            param.copy_(torch.randn(param.shape, generator=generator) * 0.2)
            if param.ndim == 1 and param.shape[0] == module.config.hidden_size:
                param.add_(1.0)


def make_pair(dtype: torch.dtype, fused: bool = False) -> tuple[Qwen2Model, torch.nn.Linear, Qwen2ForCausalLM]:
    """Our model (``fused``: after ``prepare_for_inference``), an lm_head, and transformers' twin."""
    config = LLMConfig.tiny(vocab_size=VOCAB)
    ours = Qwen2Model(config)
    randomize(ours, seed=0)
    lm_head = torch.nn.Linear(config.hidden_size, config.vocab_size, bias=False)
    torch.nn.init.normal_(lm_head.weight, std=0.2, generator=torch.Generator().manual_seed(1))
    reference = Qwen2ForCausalLM(hf_config(config)).eval()
    state = {f"model.{name}": tensor for name, tensor in ours.state_dict().items()}
    state["lm_head.weight"] = lm_head.weight.detach()
    missing, unexpected = reference.load_state_dict(state, strict=True)
    assert not missing and not unexpected
    ours = ours.to(dtype).eval()
    if fused:
        ours.prepare_for_inference()
    return ours, lm_head.to(dtype), reference.to(dtype)


def relative_error(actual: torch.Tensor, exact: torch.Tensor) -> float:
    return ((actual.float() - exact.float()).norm() / exact.float().norm()).item()


class Expected:
    """Logits from transformers: fp32 (the truth) and, for bf16 runs, transformers' own bf16 error."""

    def __init__(self, dtype: torch.dtype, run):
        self.dtype = dtype
        self.exact = run(torch.float32)
        self.hf_error = relative_error(run(dtype), self.exact)

    def check(self, ours: torch.Tensor, index=...) -> None:
        if self.dtype == torch.float32:
            torch.testing.assert_close(ours, self.exact[index], atol=1e-4, rtol=1e-4)
        else:  # bf16: no less accurate than transformers' bf16 forward on the same weights
            assert relative_error(ours, self.exact[index]) <= 1.5 * self.hf_error + 1e-3


def test_state_dict_names_match_checkpoint_layout():
    config = LLMConfig.tiny(vocab_size=VOCAB)
    names = set(Qwen2Model(config).state_dict())
    expected = {"embed_tokens.weight", "norm.weight"}
    for i in range(config.num_hidden_layers):
        for proj in ("q_proj", "k_proj", "v_proj"):
            expected |= {f"layers.{i}.self_attn.{proj}.weight", f"layers.{i}.self_attn.{proj}.bias"}
        expected.add(f"layers.{i}.self_attn.o_proj.weight")
        expected |= {f"layers.{i}.mlp.{p}.weight" for p in ("gate_proj", "up_proj", "down_proj")}
        expected |= {f"layers.{i}.input_layernorm.weight", f"layers.{i}.post_attention_layernorm.weight"}
    assert names == expected


def test_full_config_matches_reference_checkpoint_shapes():
    config = LLMConfig.full()
    assert config.num_key_value_heads * config.head_dim == 512  # k_proj [512, 3584]
    assert (config.vocab_size, config.hidden_size, config.intermediate_size) == (152064, 3584, 18944)


def test_from_hf_config_round_trips_both_rope_styles():
    config = LLMConfig.tiny(vocab_size=VOCAB)
    as_dict = hf_config(config).to_dict()
    assert LLMConfig.from_hf_config(as_dict) == config
    legacy = {k: v for k, v in as_dict.items() if k != "rope_parameters"} | {"rope_theta": config.rope_theta}
    assert LLMConfig.from_hf_config(legacy) == config


@pytest.mark.parametrize("fused", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_prefill_logits_match_transformers(dtype, fused):
    ours, lm_head, _ = make_pair(dtype, fused)
    ids = torch.randint(0, VOCAB, (2, 23), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        expected = Expected(dtype, lambda d: make_pair(d)[2](input_ids=ids).logits)
        embeds = ours.embed_tokens(ids)
        expected.check(lm_head(ours.forward_reference(embeds)))
        cache = new_kv_cache(ours.config, slots=3, max_len=64, device="cpu", dtype=dtype)
        positions = torch.arange(ids.shape[1]).expand_as(ids)
        expected.check(lm_head(ours(embeds, positions, cache, torch.tensor([2, 0]), kv_len=32)))


@pytest.mark.parametrize("fused", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_batched_decode_over_slots_matches_transformers(dtype, fused):
    """Two sequences of different lengths in arbitrary slots, prefilled in chunks, then decoded together."""
    ours, lm_head, _ = make_pair(dtype, fused)
    references = {d: make_pair(d)[2] for d in {torch.float32, dtype}}
    generator = torch.Generator().manual_seed(3)
    prompts = [torch.randint(0, VOCAB, (n,), generator=generator) for n in (9, 17)]
    slots = torch.tensor([3, 1])
    cache = new_kv_cache(ours.config, slots=4, max_len=48, device="cpu", dtype=dtype)
    sequences = [p.tolist() for p in prompts]
    with torch.no_grad():
        for slot, prompt in zip(slots.tolist(), prompts):
            for start in range(0, len(prompt), 5):  # chunked prefill
                chunk = prompt[start : start + 5]
                positions = torch.arange(start, start + len(chunk))[None]
                ours(ours.embed_tokens(chunk)[None], positions, cache, torch.tensor([slot]), kv_len=48)
        for _ in range(6):
            next_ids = [(sum(s) * 7 + len(s)) % VOCAB for s in sequences]  # arbitrary deterministic tokens
            positions = torch.tensor([[len(s)] for s in sequences])
            for s, token in zip(sequences, next_ids):
                s.append(token)
            hidden = ours(ours.embed_tokens(torch.tensor(next_ids))[:, None], positions, cache, slots, kv_len=32)
            logits = lm_head(hidden[:, 0])
            for row, seq in enumerate(sequences):
                expected = Expected(dtype, lambda d: references[d](input_ids=torch.tensor([seq])).logits[0, -1])
                expected.check(logits[row])


def test_cached_step_decode_matches_transformers_cache():
    """Token-by-token decode: our slot cache against transformers' own KV cache."""
    ours, lm_head, reference = make_pair(torch.float32)
    ids = torch.randint(0, VOCAB, (1, 12), generator=torch.Generator().manual_seed(4))
    cache = new_kv_cache(ours.config, slots=1, max_len=16, device="cpu", dtype=torch.float32)
    past = DynamicCache()
    with torch.no_grad():
        for t in range(ids.shape[1]):
            out = reference(input_ids=ids[:, t : t + 1], use_cache=True, **{CACHE_ARGUMENT: past})
            hidden = ours(ours.embed_tokens(ids[:, t : t + 1]), torch.tensor([[t]]), cache, torch.tensor([0]), 16)
            torch.testing.assert_close(lm_head(hidden)[0, 0], out.logits[0, -1], atol=1e-4, rtol=1e-4)


def test_prepare_for_inference_keeps_the_checkpoint_tensors_in_place():
    """Fused q/k/v and gate/up: same state_dict names and values, parameters are views of the fused weights."""
    ours, _, _ = make_pair(torch.float32)
    before = {name: tensor.clone() for name, tensor in ours.state_dict().items()}
    ours.prepare_for_inference()
    after = ours.state_dict()
    assert list(after) == list(before)
    for name, tensor in before.items():
        assert torch.equal(after[name], tensor), name
    attn, mlp = ours.layers[1].self_attn, ours.layers[1].mlp
    fused_qkv, fused_bias = attn.fused_qkv
    assert attn.v_proj.weight.untyped_storage().data_ptr() == fused_qkv.untyped_storage().data_ptr()
    assert attn.q_proj.bias.untyped_storage().data_ptr() == fused_bias.untyped_storage().data_ptr()
    assert mlp.up_proj.weight.untyped_storage().data_ptr() == mlp.fused_gate_up.untyped_storage().data_ptr()


def test_fast_kernels_match_transformers():
    """The kernels CUDA runs (compiled elementwise steps, Triton one-token attention; without a GPU
    in Triton's CPU interpreter) through prefill and cached decode."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    ours, lm_head, reference = make_pair(torch.float32)
    ours, lm_head = ours.to(device), lm_head.to(device)
    ours.prepare_for_inference(use_fast_kernels=True)
    ids = torch.randint(0, VOCAB, (2, 9), generator=torch.Generator().manual_seed(5))
    cache = new_kv_cache(ours.config, slots=3, max_len=32, device=device, dtype=torch.float32)
    slots = torch.tensor([2, 0], device=device)
    with torch.no_grad():
        expected = reference(input_ids=ids).logits
        on_device = ids.to(device)
        positions = torch.arange(8, device=device).expand(2, 8)
        prefill = ours(ours.embed_tokens(on_device[:, :8]), positions, cache, slots, kv_len=32)
        step = ours(ours.embed_tokens(on_device[:, 8:]), torch.tensor([[8], [8]], device=device), cache, slots, kv_len=32)
        torch.testing.assert_close(lm_head(prefill).cpu(), expected[:, :8], atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(lm_head(step).cpu(), expected[:, 8:], atol=1e-4, rtol=1e-4)
