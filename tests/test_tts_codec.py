"""TiCodec decoder: loading, weight-norm folding, output length, locality of each code."""

import json
from pathlib import Path

import pytest
import torch

from tts.codec import TiCodec
from tts.tiny_checkpoint import write_tiny_tts_checkpoint
from tts.weights import WeightMismatchError, fold_weight_norm


@pytest.fixture(scope="module")
def tts_dir(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("tts")
    write_tiny_tts_checkpoint(path)
    return path


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


def test_a_code_only_changes_audio_within_the_receptive_field(codec):
    reach = codec.generator.receptive_field_frames()
    codes = torch.randint(0, codec.config.n_codes, (1, 4 * reach))
    changed = codes.clone()
    j = 2 * reach
    changed[0, j] = (codes[0, j] + 1) % codec.config.n_codes
    diff = (codec.decode(codes) - codec.decode(changed))[0].abs()
    assert diff[: (j - reach) * 600].max() == 0
    assert diff[(j + reach + 1) * 600 :].max() == 0
    assert diff[j * 600 : (j + 1) * 600].max() > 0


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
