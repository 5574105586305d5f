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


def test_capture_warms_up_and_captures_on_the_owners_stream(monkeypatch):
    """The warm-up run and the capture of one owner's graphs happen on that owner's capture stream,
    and two owners' graphs are captured on different streams (torch.cuda's graph API is faked)."""
    used: list[tuple[str, int]] = []  # (what, stream handle) in order

    class StreamContext:
        def __init__(self, stream) -> None:
            self.stream = stream

        def __enter__(self) -> None:
            used.append(("warm-up", self.stream.cuda_stream))

        def __exit__(self, *exc) -> None:
            pass

    class GraphContext(StreamContext):
        def __init__(self, graph, pool=None, stream=None, capture_error_mode="global") -> None:
            super().__init__(stream)

        def __enter__(self) -> None:
            used.append(("capture", self.stream.cuda_stream))

    monkeypatch.setattr(PooledStream, "wait_stream", lambda self, other: None, raising=False)
    monkeypatch.setattr(torch.cuda, "Stream", PooledStream)
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: PooledStream())
    monkeypatch.setattr(torch.cuda, "stream", StreamContext)
    monkeypatch.setattr(torch.cuda, "graph", GraphContext)
    monkeypatch.setattr(torch.cuda, "CUDAGraph", object)
    monkeypatch.setattr(cuda_graphs, "_capture_streams", {})
    device = torch.device("cuda", 0)
    _, output = cuda_graphs.capture(lambda: "static output", "llm_decode", device, pool=(0, 0))
    cuda_graphs.capture(lambda: None, "tts_decoder", device, pool=(0, 1))
    cuda_graphs.capture(lambda: None, "llm_decode", device, pool=(0, 0))
    assert output == "static output"
    engine, speech = used[0][1], used[2][1]
    assert used == [("warm-up", engine), ("capture", engine), ("warm-up", speech), ("capture", speech),
                    ("warm-up", engine), ("capture", engine)]
    assert engine != speech
