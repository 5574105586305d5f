"""The codec replayed from CUDA graphs gives the eager codec's audio (CUDA only: graphs need a GPU)."""

import pytest
import torch

from tts.codec import TiCodec
from tts.codec_graphs import CodecGraphs
from tts.tiny_checkpoint import write_tiny_tts_checkpoint

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a CUDA device")


def test_graph_replays_equal_eager_decoding_and_other_shapes_stay_eager(tmp_path, monkeypatch):
    # float32 convolutions, not TF32: a kept range changes the shapes and so cuDNN's algorithms,
    # which in TF32 moved samples by up to 3e-4 (H200)
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    write_tiny_tts_checkpoint(tmp_path)
    codec = TiCodec.load(tmp_path / "codec", device="cuda")
    graphs = CodecGraphs(codec)
    shapes = {(1, 12, (0, 12)), (4, 12, (0, 12)), (4, 12, (3, 9)), (4, 20, (5, 15))}
    graphs.capture(shapes)
    assert graphs.shapes == shapes
    generator = torch.Generator().manual_seed(0)
    # a shape again refills the static input; (4, 12) keeping (4, 8) replays the narrowest graph
    # holding it, (3, 9); (4, 20) keeping all and (3, 12) have no graph: eager, the whole window, cut
    for batch, length, keep in [(4, 12, (3, 9)), (4, 20, (5, 15)), (4, 12, None), (1, 12, (0, 12)),
                                (4, 12, (4, 8)), (4, 20, None), (3, 12, (2, 7))]:
        codes = torch.randint(0, codec.config.n_codes, (batch, length), generator=generator)
        start, stop = keep or (0, length)
        expected = codec.decode(codes)[:, start * 600 : stop * 600]
        audio = graphs.decode(codes, keep).clone()
        torch.testing.assert_close(audio, expected, rtol=1e-4, atol=1e-4)
