"""TiCodec decoder: loading, weight-norm folding, output length, locality of each code."""

import dataclasses
import json

import pytest
import torch

from tts.codec import TiCodec
from tts.tiny_checkpoint import tiny_codec_config
from tts.weights import WeightMismatchError, fold_weight_norm


@pytest.fixture(scope="module")
def codec(tts_dir) -> TiCodec:
    return TiCodec.load(tts_dir / "codec")


def test_weight_norm_folding_matches_torch_weight_norm():
    for conv in (torch.nn.Conv1d(6, 4, 5), torch.nn.ConvTranspose1d(6, 4, 7, 3)):
        normed = torch.nn.utils.parametrizations.weight_norm(conv)
        with torch.no_grad():
            normed.parametrizations.weight.original0.uniform_(0.5, 2.0)
        g = normed.parametrizations.weight.original0.detach()
        v = normed.parametrizations.weight.original1.detach()
        folded = fold_weight_norm({"c.weight_g": g, "c.weight_v": v, "c.bias": conv.bias.detach()})
        assert set(folded) == {"c.weight", "c.bias"}
        torch.testing.assert_close(folded["c.weight"], normed.weight.detach())


def test_output_is_600_samples_per_code_in_unit_range(codec):
    for frames in (1, 7, 40):
        codes = torch.randint(0, codec.config.n_codes, (2, frames))
        audio = codec.decode(codes)
        assert audio.shape == (2, frames * 600)
        assert audio.abs().max() <= 1.0
        assert audio.std() > 1e-3


def test_a_bfloat16_codec_differs_from_float32_by_rounding_only(codec, tts_dir):
    """The server runs the codec in bfloat16 on CPUs with bf16 in hardware (`--codec-dtype auto`)."""
    low = TiCodec.load(tts_dir / "codec", dtype=torch.bfloat16)
    assert {p.dtype for p in low.parameters()} == {torch.bfloat16}
    codes = torch.randint(0, codec.config.n_codes, (2, 60), generator=torch.Generator().manual_seed(0))
    reference = codec.decode(codes)
    error = low.decode(codes).float() - reference
    snr_db = 10 * torch.log10(reference.pow(2).mean() / error.pow(2).mean())
    assert 35 < snr_db < 80  # 8 mantissa bits: audibly the same, yet not float32


def test_each_row_of_a_batch_decodes_as_it_does_alone(codec):
    codes = torch.randint(0, codec.config.n_codes, (5, 23), generator=torch.Generator().manual_seed(0))
    batched = codec.decode(codes)
    for row in range(5):
        torch.testing.assert_close(batched[row], codec.decode(codes[row : row + 1])[0], atol=1e-5, rtol=0)


def resblock2_codec() -> TiCodec:
    """A variant with ResBlock2, 2 code groups x 2 residual layers (4 codes per frame)."""
    config = dataclasses.replace(tiny_codec_config(), resblock="2", resblock_kernel_sizes=(3, 7),
                                 resblock_dilation_sizes=((1, 3), (1, 3)), n_code_groups=2, residul_layer=2)
    torch.manual_seed(0)
    return TiCodec(config).eval()


@pytest.mark.parametrize("variant", ["tiny", "resblock2"])
def test_a_code_only_changes_audio_within_the_receptive_field(codec, variant):
    codec = codec if variant == "tiny" else resblock2_codec()
    reach = codec.generator.receptive_field_frames()
    per_frame = codec.config.codes_per_frame
    codes = torch.randint(0, codec.config.n_codes, (1, 4 * reach, per_frame))
    changed = codes.clone()
    j = 2 * reach
    changed[0, j, per_frame - 1] = (codes[0, j, per_frame - 1] + 1) % codec.config.n_codes
    audio = codec.decode(codes)
    assert audio.shape == (1, 4 * reach * 600)
    diff = (audio - codec.decode(changed))[0].abs()
    assert diff[: (j - reach) * 600].max() == 0
    assert diff[(j + reach + 1) * 600 :].max() == 0
    assert diff[j * 600 : (j + 1) * 600].max() > 0


@pytest.mark.parametrize("variant", ["tiny", "resblock2"])
def test_kept_frames_are_the_whole_windows_samples_computed_for_less(codec, variant):
    """`decode(codes, keep)` gives frames [start, stop) of the whole window's audio, while the last
    layer is given only the samples of those frames and its own reach."""
    codec = codec if variant == "tiny" else resblock2_codec()
    generator = torch.Generator().manual_seed(4)
    post_inputs = []
    post = codec.generator.conv_post
    hook = post.register_forward_pre_hook(lambda _, args: post_inputs.append(args[0].shape[-1]))
    try:
        for length, (start, stop) in [(60, (10, 50)), (30, (0, 20)), (40, (10, 30)), (60, (45, 60)), (25, (0, 25)),
                                      (9, (4, 5)), (1, (0, 1))]:
            codes = torch.randint(0, codec.config.n_codes, (2, length, codec.config.codes_per_frame), generator=generator)
            whole = codec.decode(codes)
            kept = codec.decode(codes, (start, stop))
            torch.testing.assert_close(kept, whole[:, start * 600 : stop * 600], atol=1e-6, rtol=0)
            assert post_inputs[-1] <= (stop - start) * 600 + 2 * post.padding[0]
    finally:
        hook.remove()
    for keep in [(0, 0), (5, 3), (-1, 4), (0, 61)]:
        with pytest.raises(ValueError, match="not a range"):
            codec.decode(codes, keep)


def test_multi_code_frames_sum_residual_layers_of_grouped_codebooks():
    codec = resblock2_codec()
    codes = torch.randint(0, codec.config.n_codes, (2, 5, 4))
    q = codec.quantizer
    books = [q.quantizer_modules, q.quantizer_modules2]
    expected = sum(
        torch.cat([books[layer][g].embedding.weight[codes[..., 2 * layer + g]] for g in range(2)], dim=-1)
        for layer in range(2)
    ).transpose(1, 2)
    torch.testing.assert_close(q.embed(codes), expected)
    with pytest.raises(ValueError, match="expected 4 codes per frame"):
        codec.decode(codes[..., :1])


def test_global_tokens_change_the_voice(codec):
    codes = torch.randint(0, codec.config.n_codes, (1, 10))
    audio = codec.decode(codes)
    original = codec.global_tokens.clone()
    try:
        codec.global_tokens[0, 0] = (original[0, 0] + 1) % codec.config.n_codes
        assert (codec.decode(codes) - audio).abs().max() > 1e-4
    finally:
        codec.global_tokens.copy_(original)


def test_mismatched_codec_shape_names_the_tensor(tts_dir, tmp_path):
    (tmp_path / "final.pt").write_bytes((tts_dir / "codec" / "final.pt").read_bytes())
    config = json.loads((tts_dir / "codec" / "model.json").read_text())
    config["upsample_initial_channel"] = 128
    (tmp_path / "model.json").write_text(json.dumps(config))
    with pytest.raises(WeightMismatchError, match=r"\[generator\]: tensor conv_pre\.weight has shape \(256, 512, 7\)"):
        TiCodec.load(tmp_path)
    config = json.loads((tts_dir / "codec" / "model.json").read_text())
    config["n_codes"] = 65
    (tmp_path / "model.json").write_text(json.dumps(config))
    with pytest.raises(WeightMismatchError, match=r"\[quantizer\]: tensor quantizer_modules\.0\.embedding\.weight"):
        TiCodec.load(tmp_path)
    torch.save({"generator": {}}, tmp_path / "final.pt")
    with pytest.raises(WeightMismatchError, match="no 'quantizer' state dict"):
        TiCodec.load(tmp_path)
