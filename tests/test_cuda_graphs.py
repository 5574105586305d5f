"""Capture streams: one per owner of graphs, never one CUDA stream for two owners."""

import itertools

import torch

from layers import cuda_graphs


class PooledStream:
    """Stands in for `torch.cuda.Stream` on the CPU: streams handed out round-robin from a pool of
    four, as PyTorch hands out its pool of 32."""

    handles = itertools.cycle(range(4))

    def __init__(self, device=None) -> None:
        self.cuda_stream = next(PooledStream.handles)


def test_each_owner_keeps_one_capture_stream_that_no_other_owner_has(monkeypatch):
    monkeypatch.setattr(torch.cuda, "Stream", PooledStream)
    monkeypatch.setattr(cuda_graphs, "_capture_streams", {})
    PooledStream.handles = itertools.cycle(range(4))
    device = torch.device("cuda", 0)
    engine = cuda_graphs.capture_stream("llm_decode", device)
    for _ in range(3):  # other streams taken from the pool meanwhile: its next one is the engine's
        PooledStream()
    speech = cuda_graphs.capture_stream("tts_decoder", device)
    assert engine.cuda_stream == 0 and speech.cuda_stream != engine.cuda_stream
    assert cuda_graphs.capture_stream("llm_decode", device) is engine
    assert cuda_graphs.capture_stream("tts_decoder", device) is speech
    assert cuda_graphs.capture_stream("tts_decoder", torch.device("cuda", 1)) is not speech
