"""The composite model's layout against the reference state_dict, and multimodal splicing."""

from __future__ import annotations

import math

import pytest
import torch

from vita.checkpoint import build_on_meta, state_shapes
from vita.config import VitaConfig
from vita.model import VitaQwen2ForCausalLM
from vita.tokenizer import AUDIO_TOKEN_INDEX, IMAGE_TOKEN_INDEX
from shared_data import REFERENCE_TSV, reference_rows

# Component totals from shared/reference/README.md ("Parameter totals").
COMPONENT_TOTALS = {
    "llm": (339, 7_615_616_512),
    "model.vision_tower.vision_tower.": (340, 304_012_288),
    "model.mm_projector.": (4, 27_532_288),
    "model.audio_encoder.encoder.": (470, 357_950_624),
    "model.audio_encoder.adpter.": (6, 17_835_520),
}


@pytest.fixture(scope="module")
def full_shapes() -> dict[str, tuple[int, ...]]:
    return state_shapes(build_on_meta(VitaConfig.full()))


@pytest.mark.skipif(not REFERENCE_TSV.is_file(), reason="reference TSV not available")
def test_full_model_state_dict_equals_reference_names_shapes_and_order(full_shapes) -> None:
    reference = reference_rows()
    assert list(full_shapes) == [name for name, _, _ in reference]
    assert list(full_shapes.values()) == [shape for _, shape, _ in reference]
    assert len(full_shapes) == 1159
    assert sum(math.prod(shape) for shape in full_shapes.values()) == 8_322_947_232


def test_full_model_component_totals(full_shapes) -> None:
    def component(name: str) -> str:
        prefixes = [prefix for prefix in COMPONENT_TOTALS if name.startswith(prefix)]
        return prefixes[0] if prefixes else "llm"

    totals = {key: [0, 0] for key in COMPONENT_TOTALS}
    for name, shape in full_shapes.items():
        totals[component(name)][0] += 1
        totals[component(name)][1] += math.prod(shape)
    assert {key: tuple(value) for key, value in totals.items()} == COMPONENT_TOTALS


def test_full_model_parameters_stay_on_meta_and_cost_no_memory() -> None:
    model = build_on_meta(VitaConfig.full())
    assert all(param.is_meta for param in model.parameters())
    assert not model.model.rotary_emb.inv_freq.is_meta  # computed, never loaded: real from the start
    assert all(buffer.is_meta for name, buffer in model.named_buffers() if name in model.state_dict())


@pytest.fixture(scope="module")
def tiny_model() -> VitaQwen2ForCausalLM:
    torch.manual_seed(0)
    return VitaQwen2ForCausalLM(VitaConfig.tiny()).eval()


def naive_splice(model: VitaQwen2ForCausalLM, ids: list[int], images: torch.Tensor, audios: list[torch.Tensor]):
    """Token by token: a text id gives its embedding row, a placeholder the next feature block."""
    rows, image_index, audio_index = [], 0, 0
    weight = model.model.embed_tokens.weight
    for token_id in ids:
        if token_id == IMAGE_TOKEN_INDEX:
            rows.extend(images[image_index])
            image_index += 1
        elif token_id == AUDIO_TOKEN_INDEX:
            rows.extend(audios[audio_index])
            audio_index += 1
        else:
            rows.append(weight[token_id])
    return torch.stack(rows)


def test_splice_replaces_each_placeholder_by_one_feature_block(tiny_model: VitaQwen2ForCausalLM) -> None:
    hidden = tiny_model.config.llm.hidden_size
    generator = torch.Generator().manual_seed(1)
    images = torch.randn(3, 256, hidden, generator=generator)
    audios = [torch.randn(7, hidden, generator=generator), torch.randn(5, hidden, generator=generator)]
    ids = [5, 6, IMAGE_TOKEN_INDEX, IMAGE_TOKEN_INDEX, 7, AUDIO_TOKEN_INDEX, IMAGE_TOKEN_INDEX,
           AUDIO_TOKEN_INDEX, 8, 9]
    spliced = tiny_model.splice_embeddings(ids, images, audios)
    with torch.no_grad():
        expected = naive_splice(tiny_model, ids, images, audios)
    assert spliced.shape == (5 + 3 * 256 + 7 + 5, hidden) == expected.shape
    torch.testing.assert_close(spliced, expected, rtol=0, atol=0)


def test_splice_of_text_only_is_the_embedding_lookup(tiny_model: VitaQwen2ForCausalLM) -> None:
    ids = [1, 2, 3, 500]
    with torch.no_grad():
        expected = torch.nn.functional.embedding(torch.tensor(ids), tiny_model.model.embed_tokens.weight)
    torch.testing.assert_close(tiny_model.splice_embeddings(ids), expected, rtol=0, atol=0)


@pytest.mark.parametrize(("num_images", "num_audios"), [(1, 1), (2, 0), (3, 1), (2, 2)])
def test_splice_rejects_feature_count_mismatch(tiny_model, num_images: int, num_audios: int) -> None:
    hidden = tiny_model.config.llm.hidden_size
    ids = [1, IMAGE_TOKEN_INDEX, IMAGE_TOKEN_INDEX, AUDIO_TOKEN_INDEX]
    with pytest.raises(ValueError, match="placeholders"):
        tiny_model.splice_embeddings(
            ids, torch.zeros(num_images, 256, hidden), [torch.zeros(4, hidden)] * num_audios
        )


def test_encode_images_gives_256_projected_tokens_per_tile(tiny_model: VitaQwen2ForCausalLM) -> None:
    pixels = torch.randn(2, 3, 448, 448, generator=torch.Generator().manual_seed(2))
    features = tiny_model.encode_images(pixels)
    assert features.shape == (2, 256, tiny_model.config.llm.hidden_size)
    single = tiny_model.encode_images(pixels[1:])
    torch.testing.assert_close(features[1:], single, rtol=1e-4, atol=1e-5)  # tiles are independent
