"""Streaming synthesis: segment sizes, equality with one-shot decoding, stopping early, planned shapes."""

from pathlib import Path

import numpy as np
import pytest
import torch

from tts.batch import DecoderBatch
from tts.codec_windows import to_int16
from tts.synthesizer import Synthesizer
from tts.tiny_checkpoint import write_tiny_tts_checkpoint

EMBED_SEED = 3


@pytest.fixture(scope="module")
def synth(tts_dir) -> Synthesizer:
    """The tiny TTS with eos disabled, so every utterance lasts exactly max_tokens codes."""
    synthesizer = Synthesizer.load(tts_dir, "cpu")
    with torch.no_grad():
        synthesizer.decoder.out_fnn.bias[synthesizer.decoder.config.eos_id] = -1e9
    return synthesizer


def embeddings(synth: Synthesizer, n: int = 12) -> torch.Tensor:
    return torch.randn(n, synth.embedding_dim, generator=torch.Generator().manual_seed(EMBED_SEED))


def tokens(synth: Synthesizer, seed: int, max_tokens: int, generator: torch.Generator | None = None) -> list[int]:
    """The codes of one utterance (eos is off); `generator` draws them if given, else seed `seed`."""
    batch = DecoderBatch(synth.decoder, slots=1, capacity=64 + max_tokens)
    stream = batch.add(embeddings(synth), top_k=2, max_tokens=max_tokens,
                       generator=generator or torch.Generator().manual_seed(seed))
    codes = []
    while not stream.finished:
        codes += batch.step()[0][1]
    return codes


def stream(synth: Synthesizer, seed: int, **kwargs) -> list[np.ndarray]:
    return list(synth.synthesize(embeddings(synth), generator=torch.Generator().manual_seed(seed), **kwargs))


def test_tiny_checkpoint_layout_and_determinism(tts_dir, tmp_path):
    for part in ("decoder", "codec"):
        assert (tts_dir / part / "model.json").is_file() and (tts_dir / part / "final.pt").is_file()
    write_tiny_tts_checkpoint(tmp_path / "same")
    write_tiny_tts_checkpoint(tmp_path / "other", seed=1)
    first, same, other = (torch.load(d / "decoder" / "final.pt")["model"] for d in (tts_dir, tmp_path / "same", tmp_path / "other"))
    assert all(torch.equal(first[k], same[k]) for k in first)
    assert not torch.equal(first["out_fnn.weight"], other["out_fnn.weight"])
    assert Synthesizer.load(tts_dir).embedding_dim == 16


@pytest.mark.parametrize("codes, chunk, padding, frames", [
    (30, 8, 3, [8, 8, 8, 6]),  # the 4th chunk lacks its 3 look-ahead codes: decoded at the end
    (27, 8, 3, [8, 8, 8, 3]),
    (10, 4, 0, [4, 4, 2]),
    (5, 8, 3, [5]),
])
def test_segments_are_int16_chunks_of_600_samples_per_code(synth, codes, chunk, padding, frames):
    segments = stream(synth, seed=0, codec_chunk_size=chunk, padding=padding, max_tokens=codes)
    assert synth.sample_rate == 24000
    assert all(s.dtype == np.int16 and s.ndim == 1 for s in segments)
    assert [len(s) for s in segments] == [f * 600 for f in frames]


def test_planned_codec_windows_cover_every_window_synthesis_decodes(synth, monkeypatch):
    shapes: list[tuple[int, int]] = []
    decode = synth.codec.decode

    def recording_decode(codes: torch.Tensor, keep: tuple[int, int] | None = None) -> torch.Tensor:
        shapes.append(tuple(codes.shape))
        return decode(codes, keep)

    monkeypatch.setattr(synth.codec, "decode", recording_decode)
    synth.plan_codec_windows(chunk_sizes=(3, 6), padding=2, batch_sizes=(1, 2, 4))
    planned, shapes[:] = set(shapes), []
    assert {length for batch, length in planned if batch == 4} == {5, 7, 8, 10}  # first and middle windows
    for chunk in (3, 6):
        for codes in range(1, 25):
            stream(synth, seed=codes, codec_chunk_size=chunk, padding=2, max_tokens=codes)
    assert set(shapes) <= planned
    assert max(length for _, length in shapes) == max(length for _, length in planned)  # a middle window of chunk 6


def test_stream_equals_one_shot_decode_when_padding_covers_receptive_field(synth):
    reach = synth.codec.generator.receptive_field_frames()
    codes = tokens(synth, seed=1, max_tokens=40)
    one_shot = to_int16(synth.codec.decode(torch.tensor([codes]))[0])
    streamed = np.concatenate(stream(synth, seed=1, codec_chunk_size=7, padding=reach, max_tokens=40))
    assert streamed.shape == one_shot.shape
    assert np.abs(streamed.astype(np.int32) - one_shot).max() <= 1  # float rounding only


def test_small_padding_only_changes_audio_near_chunk_boundaries(synth):
    reach, chunk, padding = synth.codec.generator.receptive_field_frames(), 12, 2
    codes = tokens(synth, seed=2, max_tokens=40)
    one_shot = to_int16(synth.codec.decode(torch.tensor([codes]))[0]).astype(np.int32)
    streamed = np.concatenate(stream(synth, seed=2, codec_chunk_size=chunk, padding=padding, max_tokens=40))
    far = np.ones(len(codes), dtype=bool)
    for boundary in range(chunk, len(codes), chunk):
        far[max(0, boundary - reach + padding) : boundary + reach - padding] = False
    far_samples = np.repeat(far, 600)
    assert np.abs(streamed - one_shot)[far_samples].max() <= 1
    assert np.abs(streamed - one_shot)[~far_samples].max() > 1


def test_stopping_early_samples_only_the_consumed_tokens(synth):
    chunk, padding = 5, 2
    consumer = torch.Generator().manual_seed(4)
    segments = synth.synthesize(embeddings(synth), codec_chunk_size=chunk, padding=padding,
                                max_tokens=200, generator=consumer)
    next(segments)
    segments.close()
    reference = torch.Generator().manual_seed(4)
    assert len(tokens(synth, 0, chunk + padding, generator=reference)) == chunk + padding
    assert torch.equal(consumer.get_state(), reference.get_state())


def test_rejects_embeddings_of_the_wrong_width(synth):
    for wrong in (torch.zeros(4, 64), torch.zeros(0, 16)):
        with pytest.raises(ValueError, match=r"\[N >= 1, 16\]"):
            next(synth.synthesize(wrong))
    for bad in ({"max_tokens": 0}, {"top_k": 0}):
        with pytest.raises(ValueError, match="at least 1"):
            synth.synthesize(embeddings(synth), **bad)


def test_int16_conversion_clips_and_rounds():
    audio = torch.tensor([0.0, 0.5, -1.0, 1.0, 2.0, -2.0])
    np.testing.assert_array_equal(to_int16(audio), [0, 16384, -32767, 32767, 32767, -32768])
