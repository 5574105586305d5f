"""The codec replayed from CUDA graphs gives the eager codec's audio (CUDA only: graphs need a GPU)."""

import pytest
import torch

from tts.codec import TiCodec
from tts.codec_graphs import CodecGraphs
from tts.tiny_checkpoint import write_tiny_tts_checkpoint

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a CUDA device")


def test_graph_replays_equal_eager_decoding_and_other_shapes_stay_eager(tmp_path):
    write_tiny_tts_checkpoint(tmp_path)
    codec = TiCodec.load(tmp_path / "codec", device="cuda")
    graphs = CodecGraphs(codec)
    graphs.capture([(1, 12), (4, 12), (4, 20)])
    assert graphs.shapes == {(1, 12), (4, 12), (4, 20)}
    generator = torch.Generator().manual_seed(0)
    for shape in [(4, 12), (4, 20), (4, 12), (1, 12), (3, 12)]:  # a shape again: the static input is refilled
        codes = torch.randint(0, codec.config.n_codes, shape, generator=generator)
        expected = codec.decode(codes)
        audio = graphs.decode(codes).clone()
        torch.testing.assert_close(audio, expected, rtol=1e-4, atol=1e-4)
