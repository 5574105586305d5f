"""Whale audio encoder: checkpoint layout, fbank, lengths, attention, masks, padding, config files.

References are independent of vita/: the reference TSV, kaldi-native-fbank, upstream's mask-slicing
length rule, a per-element loop of the attention formula, and plain numpy statistics.
"""

import json
import math
from dataclasses import replace

import kaldi_native_fbank as knf
import numpy as np
import pytest
import soundfile as sf
import torch
import torch.nn.functional as F
import yaml

import vita.fbank
from vita.fbank import fbank, fbank_many, num_frames
from vita.whale import (
    AudioEncoderConfig,
    RelPositionMultiHeadedAttention,
    WhaleAudioEncoder,
    attention_mask,
    output_lengths,
    read_global_cmvn,
    sinusoid_positions,
    write_global_cmvn,
)
from shared_data import AUDIO, reference_rows

PREFIX = "model.audio_encoder."


def read_clip(name: str) -> np.ndarray:
    wave, rate = sf.read(AUDIO / f"{name}.wav", dtype="float32")
    assert rate == 16000
    return wave


def tiny_model(seed: int = 0, **overrides) -> WhaleAudioEncoder:
    torch.manual_seed(seed)
    model = WhaleAudioEncoder(replace(AudioEncoderConfig.tiny(llm_hidden_size=48), **overrides)).eval()
    with torch.no_grad():
        model.encoder.global_cmvn.mean.uniform_(10.0, 16.0)
        model.encoder.global_cmvn.istd.uniform_(0.25, 0.35)
    return model


def test_full_state_dict_matches_reference_tsv():
    expected = [(name[len(PREFIX):], list(shape)) for name, shape, _ in reference_rows(PREFIX)]
    assert len(expected) == 476
    with torch.device("meta"):
        model = WhaleAudioEncoder(AudioEncoderConfig.full())
    actual = [(name, list(tensor.shape)) for name, tensor in model.state_dict().items()]
    assert actual == expected


def kaldi_native_fbank(wave: np.ndarray) -> np.ndarray:
    options = knf.FbankOptions()
    options.frame_opts.samp_freq = 16000
    options.frame_opts.dither = 0.0
    options.mel_opts.num_bins = 80
    options.mel_opts.high_freq = 0.0  # Nyquist, as torchaudio's default
    extractor = knf.OnlineFbank(options)
    extractor.accept_waveform(16000, (wave * 32768.0).tolist())
    extractor.input_finished()
    return np.stack([extractor.get_frame(i) for i in range(extractor.num_frames_ready)])


# float32 round-off in windowing, FFT and mel sums leaves every mel amplitude sqrt(E) an absolute error
# of a few eps times its frame's amplitude sqrt(sum of E), however quiet the bin itself is. In log(E)
# that is 2 * k * eps * sqrt(frame / E): 3e-5 for a bin holding the frame's energy, unbounded for a
# bin e^28 below it (the issue-12 bin near -4.5), where float32 resolves nothing. Measured between
# kaldi-native-fbank and vita.fbank on the three clips: k <= 26 (a numpy or plain-DFT float32 FFT
# gives the same); the wrong windows, pre-emphasis and mel edges tried give k >= 3.7e4.
FBANK_ROUNDOFF_EPS = 128


def assert_fbank_close(actual: np.ndarray, expected: np.ndarray) -> None:
    """Log-mel frames agree within float32 round-off, judged on amplitudes against each frame's amplitude."""
    amplitude, reference = np.exp(actual.astype(np.float64) / 2), np.exp(expected.astype(np.float64) / 2)
    frame_amplitude = np.sqrt((reference**2).sum(axis=1, keepdims=True))
    error = np.abs(amplitude - reference) / (np.finfo(np.float32).eps * frame_amplitude)
    frame, mel_bin = np.unravel_index(error.argmax(), error.shape)
    assert error.max() <= FBANK_ROUNDOFF_EPS, (
        f"frame {frame} bin {mel_bin}: {actual[frame, mel_bin]:.4f} vs {expected[frame, mel_bin]:.4f}, "
        f"{error.max():.0f} eps of the frame amplitude (allowed {FBANK_ROUNDOFF_EPS})")


@pytest.mark.parametrize("name", ["en_hello", "zh_weather", "en_describe"])
def test_fbank_matches_kaldi_native_fbank(name):
    wave = read_clip(name)
    expected = kaldi_native_fbank(wave)
    actual = fbank(torch.from_numpy(wave) * 32768.0).numpy()
    assert actual.shape == expected.shape == (num_frames(len(wave)), 80)
    assert_fbank_close(actual, expected)


def test_fbank_comparison_catches_a_periodic_window(monkeypatch):
    """The subtlest bug tried (periodic instead of symmetric window) is still ~1e5 eps off."""
    monkeypatch.setattr(vita.fbank, "povey_window",
                        lambda length: torch.hann_window(length, periodic=True).pow(vita.fbank.POVEY_EXPONENT))
    vita.fbank.device_constants.cache_clear()  # made from the window, once per device
    wave = read_clip("zh_weather")
    try:
        with pytest.raises(AssertionError, match="eps of the frame amplitude"):
            assert_fbank_close(fbank(torch.from_numpy(wave) * 32768.0).numpy(), kaldi_native_fbank(wave))
    finally:
        vita.fbank.device_constants.cache_clear()


@pytest.mark.parametrize("together", [True, False])
def test_fbank_of_several_waveforms_is_each_ones_fbank(together):
    """With one chain of operations over all their frames (a GPU's way) or one each (a clip too short
    for a frame gets none)."""
    waves = [torch.from_numpy(read_clip(name)) * 32768.0 for name in ("en_hello", "zh_weather", "en_describe")]
    waves.insert(1, waves[0][:100])
    together = fbank_many(waves, together=together)
    assert [len(f) for f in together] == [num_frames(len(w)) for w in waves] and len(together[1]) == 0
    for got, wave in zip(together, waves):
        torch.testing.assert_close(got, fbank(wave), atol=1e-4, rtol=1e-5)


def test_fbank_dither_scales_noise_power():
    """Dither is per-sample noise times ``dither``: on silence, doubling it adds exactly ln 4 to every bin."""
    silence = torch.zeros(16000)
    assert torch.all(fbank(silence) == math.log(torch.finfo(torch.float32).eps))
    once = fbank(silence, dither=1.0, generator=torch.Generator().manual_seed(0))
    twice = fbank(silence, dither=2.0, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(twice - once, torch.full_like(once, math.log(4.0)), atol=1e-4, rtol=0)
    assert once.std() > 0.1


@pytest.mark.parametrize("frames", [7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 50, 101, 560])
def test_output_lengths_follow_upstream_mask_slicing(frames):
    upstream_count = torch.ones(frames)[2::2][2::2][0::2].numel()  # audioEncoderProcessor.process
    assert output_lengths(torch.tensor([frames])).item() == upstream_count
    model = tiny_model()
    with torch.no_grad():
        features, lengths = model(torch.randn(1, frames, 80) + 13.0, torch.tensor([frames]))
    assert features.shape == (1, upstream_count, 48)
    assert lengths.tolist() == [upstream_count]


def test_too_short_audio_is_rejected():
    with pytest.raises(ValueError, match="too short"):
        tiny_model()(torch.zeros(1, 6, 80), torch.tensor([6]))


def test_sinusoid_table_formula():
    table = sinusoid_positions(9, 6)[0]
    for pos in range(9):
        for i in range(3):
            angle = pos / 10000 ** (2 * i / 6)
            assert table[pos, 2 * i].item() == pytest.approx(math.sin(angle), abs=1e-6)
            assert table[pos, 2 * i + 1].item() == pytest.approx(math.cos(angle), abs=1e-6)


def loop_chunk_mask(length: int, chunk: int, left: int) -> torch.Tensor:
    """Row i may see [start, end): its own chunk and ``left`` chunks before it (all if left < 0)."""
    mask = torch.zeros(length, length, dtype=torch.bool)
    for i in range(length):
        start = 0 if left < 0 else max((i // chunk - left) * chunk, 0)
        end = min((i // chunk + 1) * chunk, length)
        mask[i, start:end] = True
    return mask


@pytest.mark.parametrize("chunk,left", [(4, 16), (4, 2), (3, 0), (5, -1), (-1, -1)])
def test_attention_mask_matches_chunk_windows(chunk, left):
    lengths = torch.tensor([23, 11])
    valid = torch.arange(23)[None, :] < lengths[:, None]
    mask = attention_mask(valid, chunk, left)
    windows = loop_chunk_mask(23, chunk, left) if chunk > 0 else torch.ones(23, 23, dtype=torch.bool)
    for b, n in enumerate(lengths.tolist()):
        expected = windows.clone()
        expected[:, n:] = False
        assert torch.equal(mask[b], expected)


def loop_attention(module: RelPositionMultiHeadedAttention, x, pos_emb, mask) -> torch.Tensor:
    """score(i, j) = ((q_i + u) . k_j + (q_i + v) . p_j) / sqrt(d) over allowed j, one element at a time."""
    batch, length, hidden = x.shape
    heads, dim = module.heads, module.head_dim
    q = module.linear_q(x).view(batch, length, heads, dim)
    k = module.linear_k(x).view(batch, length, heads, dim)
    v = module.linear_v(x).view(batch, length, heads, dim)
    p = module.linear_pos(pos_emb[0]).view(length, heads, dim)
    out = torch.zeros(batch, length, heads, dim, dtype=torch.float64)
    for b in range(batch):
        for h in range(heads):
            for i in range(length):
                keys = [j for j in range(length) if mask[b, i, j]]
                scores = torch.tensor([
                    (torch.dot(q[b, i, h] + module.pos_bias_u[h], k[b, j, h])
                     + torch.dot(q[b, i, h] + module.pos_bias_v[h], p[j, h])).item() / math.sqrt(dim)
                    for j in keys
                ], dtype=torch.float64)
                weights = torch.softmax(scores, dim=0)
                for weight, j in zip(weights, keys):
                    out[b, i, h] += weight * v[b, j, h].double()
    return module.linear_out(out.view(batch, length, hidden).float())


def test_relative_attention_matches_loop_formula():
    torch.manual_seed(0)
    module = RelPositionMultiHeadedAttention(hidden=16, heads=4)
    x = torch.randn(2, 10, 16)
    pos_emb = sinusoid_positions(10, 16)
    valid = torch.arange(10)[None, :] < torch.tensor([10, 7])[:, None]
    mask = attention_mask(valid, 3, 1)
    with torch.no_grad():
        actual = module(x, pos_emb, mask)
        expected = loop_attention(module, x, pos_emb, mask)
    torch.testing.assert_close(actual[0], expected[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(actual[1, :7], expected[1, :7], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("chunk_size,left_chunks,dynamic", [(4, 2, False), (-1, -1, False), (4, 16, True)])
def test_batch_padding_does_not_change_each_clip(chunk_size, left_chunks, dynamic):
    model = tiny_model(chunk_size=chunk_size, left_chunks=left_chunks, dynamic_chunks=dynamic)
    clips = [model.waveform_features(read_clip("en_hello")), model.waveform_features(read_clip("en_describe"))]
    lengths = torch.tensor([len(c) for c in clips])
    batch = torch.nn.utils.rnn.pad_sequence(clips, batch_first=True)
    with torch.no_grad():
        batched, batched_lengths = model(batch, lengths)
        alone = [model(c[None], torch.tensor([len(c)]))[0][0] for c in clips]
    for b, single in enumerate(alone):
        assert batched_lengths[b].item() == single.shape[0]
        torch.testing.assert_close(batched[b, : single.shape[0]], single, atol=2e-5, rtol=1e-4)


def test_chunk_window_limits_what_a_frame_sees():
    """Changing audio far in the future must not change early outputs when chunked, and must when not."""
    feats = torch.randn(1, 200, 80) + 13.0
    changed = feats.clone()
    changed[:, 150:] += 5.0
    lengths = torch.tensor([200])
    for chunk_size, expect_same in [(4, True), (-1, False)]:
        model = tiny_model(chunk_size=chunk_size, left_chunks=2)
        with torch.no_grad():
            before, _ = model(feats, lengths)
            after, _ = model(changed, lengths)
        # adapter frame j covers encoder frames 2j..2j+4, encoder frame t covers fbank frames 4t..4t+6
        assert torch.equal(before[0, :10], after[0, :10]) == expect_same


def functional_reference(state: dict, feats: torch.Tensor, config: AudioEncoderConfig) -> torch.Tensor:
    """One clip through upstream's steps, written with torch.nn.functional on checkpoint keys."""
    w = {name.removeprefix("encoder.enc."): tensor for name, tensor in state.items()}
    hidden, heads = config.hidden_size, config.num_attention_heads
    x = (feats - w["encoder.global_cmvn.mean"]) * w["encoder.global_cmvn.istd"]
    x = F.relu(F.conv2d(x[None, None], w["0.core.conv.0.weight"], w["0.core.conv.0.bias"], stride=2))
    x = F.relu(F.conv2d(x, w["0.core.conv.2.weight"], w["0.core.conv.2.bias"], stride=2))
    x = F.linear(x[0].permute(1, 0, 2).flatten(1), w["0.core.out.0.weight"], w["0.core.out.0.bias"])
    x = F.linear(x, w["1.embed.0.weight"], w["1.embed.0.bias"])
    x = F.relu(F.layer_norm(x, (hidden,), w["1.embed.1.weight"], w["1.embed.1.bias"])) * math.sqrt(hidden)
    length = x.shape[0]
    positions = torch.arange(length, dtype=torch.float32)[:, None]
    pe = torch.zeros(length, hidden)
    pe[:, 0::2] = torch.sin(positions / 10000 ** (torch.arange(0, hidden, 2) / hidden))
    pe[:, 1::2] = torch.cos(positions / 10000 ** (torch.arange(0, hidden, 2) / hidden))
    allowed = loop_chunk_mask(length, config.chunk_size, config.left_chunks)
    for n in range(config.num_blocks):
        b = {k.removeprefix(f"1.encoders.{n}."): v for k, v in w.items() if k.startswith(f"1.encoders.{n}.")}
        y = F.layer_norm(x, (hidden,), b["norm1.weight"], b["norm1.bias"])
        q, k, v = (F.linear(y, b[f"self_attn.linear_{c}.weight"], b[f"self_attn.linear_{c}.bias"]).view(length, heads, -1)
                   for c in "qkv")
        p = F.linear(pe, b["self_attn.linear_pos.weight"]).view(length, heads, -1)
        scores = (torch.einsum("ihd,jhd->hij", q + b["self_attn.pos_bias_u"], k)
                  + torch.einsum("ihd,jhd->hij", q + b["self_attn.pos_bias_v"], p)) / math.sqrt(hidden // heads)
        attn = torch.softmax(scores.masked_fill(~allowed, -torch.inf), dim=-1)
        out = torch.einsum("hij,jhd->ihd", attn, v).flatten(1)
        x = x + F.linear(out, b["self_attn.linear_out.weight"], b["self_attn.linear_out.bias"])
        y = F.layer_norm(x, (hidden,), b["norm2.weight"], b["norm2.bias"])
        y = F.linear(F.relu(F.linear(y, b["feed_forward.w_1.weight"], b["feed_forward.w_1.bias"])),
                     b["feed_forward.w_2.weight"], b["feed_forward.w_2.bias"])
        x = x + y
    x = F.layer_norm(x, (hidden,), w["1.after_norm.weight"], w["1.after_norm.bias"])
    kernel = config.adapter_kernel_size
    x = F.conv1d(F.pad(x.T[None], (0, kernel - 1)), w["adpter.conv1d2.weight"], w["adpter.conv1d2.bias"], stride=2)
    x = F.layer_norm(x[0].T, (2 * hidden,), w["adpter.bn2.weight"], w["adpter.bn2.bias"], eps=1e-3)
    return F.linear(F.gelu(x), w["adpter.project.weight"], w["adpter.project.bias"])


@pytest.mark.parametrize("chunk_size,left_chunks", [(4, 2), (3, -1)])
def test_forward_matches_functional_reference(chunk_size, left_chunks):
    model = tiny_model(seed=1, chunk_size=chunk_size, left_chunks=left_chunks)
    feats = torch.from_numpy(kaldi_native_fbank(read_clip("en_hello")[:24000])).float()
    with torch.no_grad():
        actual, _ = model(feats[None], torch.tensor([len(feats)]))
        expected = functional_reference(model.state_dict(), feats, model.config)
    torch.testing.assert_close(actual[0], expected, atol=1e-4, rtol=1e-4)


def test_encode_waveform_equals_forward_on_fbank():
    model = tiny_model()
    wave = read_clip("en_describe")
    feats = torch.from_numpy(kaldi_native_fbank(wave)).float()
    with torch.no_grad():
        expected, _ = model(feats[None], torch.tensor([len(feats)]))
    torch.testing.assert_close(model.encode_waveform(wave), expected[0], atol=2e-4, rtol=1e-3)


def test_bf16_encoder_normalises_in_float32_then_casts():
    """The first layer of a bf16 encoder sees the float32 CMVN output rounded once to bf16 (relative error
    <= 2**-8); rounding the fbank (near 13) to bf16 first would be off by up to 0.03 * istd."""
    model = tiny_model().to(torch.bfloat16)
    feats = model.waveform_features(read_clip("zh_weather"))
    seen = []
    model.encoder.enc[0].register_forward_pre_hook(lambda module, args: seen.append(args[0]))
    with torch.no_grad():
        model(feats[None], torch.tensor([len(feats)]))
    cmvn = model.encoder.global_cmvn
    reference = (feats.double() - cmvn.mean.double()) * cmvn.istd.double()
    assert feats.dtype == torch.float32 and seen[0].dtype == torch.bfloat16
    torch.testing.assert_close(seen[0][0].double(), reference, rtol=2**-8, atol=1e-5)


def test_global_cmvn_json_and_kaldi_files(tmp_path):
    rng = np.random.default_rng(0)
    feats = rng.normal(14.0, 3.0, size=(500, 80))
    mean, istd = feats.mean(axis=0), 1.0 / feats.std(axis=0)
    sums, squares = feats.sum(axis=0), (feats**2).sum(axis=0)
    (tmp_path / "cmvn.json").write_text(
        json.dumps({"mean_stat": sums.tolist(), "var_stat": squares.tolist(), "frame_num": 500}))
    row1 = " ".join(f"{s:.10f}" for s in sums) + " 500"
    row2 = " ".join(f"{s:.10f}" for s in squares) + " 0"
    (tmp_path / "cmvn.kaldi").write_text(f" [\n {row1}\n {row2} ]\n")
    for path, is_json in [(tmp_path / "cmvn.json", True), (tmp_path / "cmvn.kaldi", False)]:
        got_mean, got_istd = read_global_cmvn(path, is_json=is_json)
        np.testing.assert_allclose(got_mean.numpy(), mean, rtol=1e-6)
        np.testing.assert_allclose(got_istd.numpy(), istd, rtol=1e-5)
    write_global_cmvn(tmp_path / "written", torch.from_numpy(mean).float(), torch.from_numpy(istd).float(), 500)
    written = json.loads((tmp_path / "written").read_text())
    np.testing.assert_allclose(written["mean_stat"], sums, rtol=1e-6)
    np.testing.assert_allclose(written["var_stat"], squares, rtol=1e-5)
    assert written["frame_num"] == 500


@pytest.mark.parametrize("config", [AudioEncoderConfig.full(), AudioEncoderConfig.tiny(llm_hidden_size=96)])
def test_train_yaml_round_trip_with_upstream_keys(tmp_path, config):
    path = tmp_path / "train.yaml"
    config.to_train_yaml(path)
    assert AudioEncoderConfig.from_train_yaml(path) == config
    raw = yaml.safe_load(path.read_text())  # the keys upstream init_model / whaleEncoder / Transformer read
    transformer = raw["encoder_conf"]["para_conf"]["transformer"]
    assert raw["encoder_conf"]["overview_conf"]["encoder-layer-config"] == "subsampling-transformer"
    assert raw["encoder_conf"]["para_conf"]["subsampling"]["subsampling-output-dim"] == config.hidden_size
    assert transformer["transformer-attention-heads"] == config.num_attention_heads
    assert transformer["transformer-pos-enc-class"] == "rel-enc"
    assert raw["model_conf"]["llm_embed_dim"] == config.llm_hidden_size
    assert raw["model_conf"]["adpter_type"] == "subsampling"
    assert raw["dataset_conf"]["fbank_conf"]["num_mel_bins"] == 80


def test_train_yaml_keys_with_underscores_read_alike(tmp_path):
    path = tmp_path / "train.yaml"
    config = AudioEncoderConfig.tiny()
    config.to_train_yaml(path)
    raw = yaml.safe_load(path.read_text())
    encoder_conf = raw["encoder_conf"]
    encoder_conf["overview_conf"] = {k.replace("-", "_"): v for k, v in encoder_conf["overview_conf"].items()}
    for name, values in encoder_conf["para_conf"].items():
        encoder_conf["para_conf"][name] = {k.replace("-", "_"): v for k, v in values.items()}
    path.write_text(yaml.safe_dump(raw))
    assert AudioEncoderConfig.from_train_yaml(path) == config


def test_encode_waveform_rejects_multichannel_audio():
    with pytest.raises(ValueError, match="mono"):
        tiny_model().encode_waveform(np.zeros((2, 16000), dtype=np.float32))


def test_train_yaml_missing_keys_take_upstream_defaults(tmp_path):
    path = tmp_path / "train.yaml"
    AudioEncoderConfig.full().to_train_yaml(path)
    raw = yaml.safe_load(path.read_text())
    transformer = raw["encoder_conf"]["para_conf"]["transformer"]
    for key in ["transformer-chunk_size", "transformer-left_chunks", "transformer-dynamic-chunks"]:
        del transformer[key]
    path.write_text(yaml.safe_dump(raw))
    config = AudioEncoderConfig.from_train_yaml(path)
    assert (config.chunk_size, config.left_chunks, config.dynamic_chunks) == (-1, -1, True)
    transformer["transformer-pos-enc-class"] = "abs-enc"
    path.write_text(yaml.safe_dump(raw))
    with pytest.raises(ValueError, match="pos-enc"):
        AudioEncoderConfig.from_train_yaml(path)
