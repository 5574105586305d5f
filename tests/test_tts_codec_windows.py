"""Codec windows: upstream's chunking arithmetic, and windows of many utterances decoded in batches."""


import numpy as np
import pytest
import torch

from tts.codec import TiCodec
from tts.codec_windows import Chunker, CodecWindow, decode_windows, to_int16
from tts.tiny_checkpoint import write_tiny_tts_checkpoint


@pytest.fixture(scope="module")
def codec(tmp_path_factory) -> TiCodec:
    path = tmp_path_factory.mktemp("tts")
    write_tiny_tts_checkpoint(path)
    return TiCodec.load(path / "codec")


def windows_of(codes: list[int], chunk: int, padding: int,
               fit_lengths: tuple[int, ...] = ()) -> list[CodecWindow]:
    chunker = Chunker(chunk, padding, fit_lengths)
    windows = [chunker.push(code) for code in codes] + [chunker.finish()]
    return [w for w in windows if w is not None]


def test_windows_carry_padding_context_each_side_and_cover_every_code_once():
    codes = list(range(30))
    windows = windows_of(codes, chunk=8, padding=3)
    # the first lacks left context, middles have both sides, the last has no look-ahead
    assert [(w.codes[0], w.codes[-1], w.skip, w.frames, w.first) for w in windows] == [
        (0, 10, 0, 8, 0), (5, 18, 3, 8, 8), (13, 26, 3, 8, 16), (21, 29, 3, 6, 24)]
    assert [c for w in windows for c in w.codes[w.skip : w.skip + w.frames]] == codes
    assert windows_of(codes[:5], chunk=8, padding=3) == [CodecWindow(tuple(codes[:5]), 0, 5, 0)]
    assert windows_of([], chunk=8, padding=3) == []


def test_a_last_window_takes_more_context_to_fit_the_shortest_batched_length_it_can(codec):
    codes = list(range(30))
    plain = windows_of(codes, chunk=8, padding=3)
    fitted = windows_of(codes, chunk=8, padding=3, fit_lengths=(14, 10, 7))
    assert fitted[:-1] == plain[:-1]  # only the last window changes
    assert (plain[-1].codes[0], len(plain[-1].codes), plain[-1].skip) == (21, 9, 3)
    assert (fitted[-1].codes[0], len(fitted[-1].codes), fitted[-1].skip, fitted[-1].frames, fitted[-1].first) == (
        20, 10, 4, 6, 24)
    assert windows_of(codes, chunk=8, padding=3, fit_lengths=(8,)) == plain  # no length fits: as it was
    assert windows_of(codes[:5], chunk=8, padding=3, fit_lengths=(10,)) == windows_of(codes[:5], 8, 3)  # too few codes
    # with padding covering the receptive field the fitted last segment still equals the one-shot decode
    reach = codec.generator.receptive_field_frames()
    generator = torch.Generator().manual_seed(3)
    codes = torch.randint(0, codec.config.n_codes, (4 * reach + 1,), generator=generator).tolist()
    windows = windows_of(codes, chunk=reach, padding=reach, fit_lengths=(4 * reach,))
    assert len(windows[-1].codes) == 4 * reach and windows[-1].skip > reach
    one_shot = to_int16(codec.decode(torch.tensor([codes]))[0]).astype(np.int32)
    streamed = np.concatenate([segment for _, segment in decode_windows(codec, windows)])
    assert streamed.shape == one_shot.shape
    assert np.abs(streamed - one_shot).max() <= 1  # float rounding only


def test_batched_windows_equal_one_by_one_decoding(codec):
    generator = torch.Generator().manual_seed(1)
    utterances = [torch.randint(0, codec.config.n_codes, (n,), generator=generator).tolist() for n in (19, 27, 27, 8, 35)]
    windows = [w for codes in utterances for w in windows_of(codes, chunk=6, padding=2)]
    alone = []
    for w in windows:
        audio = codec.decode(torch.tensor([w.codes]))[0, w.skip * 600 : (w.skip + w.frames) * 600]
        alone.append(audio)
    assert len({len(w.codes) for w in windows}) < len(windows)  # some calls decode several rows
    for batch_sizes in ((1,), (2,), (4, 8, 16)):  # one by one; in pairs; all of a length at once, padded
        decoded = list(decode_windows(codec, windows, batch_sizes))
        assert sorted(i for i, _ in decoded) == list(range(len(windows)))
        segments = [segment for _, segment in sorted(decoded, key=lambda item: item[0])]
        assert [len(s) for s in segments] == [w.frames * 600 for w in windows]
        for segment, audio in zip(segments, alone):
            assert segment.dtype == np.int16
            assert np.abs(segment.astype(np.int32) - to_int16(audio)).max() <= 1  # float rounding only


def test_only_the_planned_window_lengths_are_batched(codec):
    """Windows of a length outside `batched_lengths` (last windows) get a codec call each, so cuDNN
    on CUDA meets only the shapes planned at start-up; the others share calls padded to a batch size."""
    shapes = []
    hook = codec.generator.register_forward_pre_hook(lambda _, args: shapes.append(tuple(args[0].shape[::2])))
    generator = torch.Generator().manual_seed(2)
    windows = [CodecWindow(tuple(torch.randint(0, codec.config.n_codes, (n,), generator=generator).tolist()), 0, n, 0)
               for n in (10, 10, 10, 7, 7)]
    try:
        segments = dict(decode_windows(codec, windows, batch_sizes=(2, 4), batched_lengths={10}))
    finally:
        hook.remove()
    assert sorted(shapes) == [(1, 7), (1, 7), (4, 10)]  # (batch, frames): 3 windows padded to 4, two alone
    for i, window in enumerate(windows):
        alone = to_int16(codec.decode(torch.tensor([window.codes]))[0])
        assert np.abs(segments[i].astype(np.int32) - alone).max() <= 1
