"""DecoderBatch: streams decoded together give the tokens they give alone; slots come and go."""

import pytest
import torch

from tts.batch import DecoderBatch
from tts.decoder import LLM2TTSCodecAR
from tts.tiny_checkpoint import write_tiny_tts_checkpoint


@pytest.fixture(scope="module")
def decoder(tmp_path_factory) -> LLM2TTSCodecAR:
    path = tmp_path_factory.mktemp("tts")
    write_tiny_tts_checkpoint(path)
    model = LLM2TTSCodecAR.load(path / "decoder")
    with torch.no_grad():  # eos off: every stream lasts exactly max_tokens
        model.out_fnn.bias[model.config.eos_id] = -1e9
    return model


REQUESTS = [  # (text rows, top_k, max_tokens, seed)
    (5, 2, 12, 0), (17, 2, 7, 1), (9, 3, 15, 2), (2, 1, 10, 3), (30, 2, 9, 4),
]


def text(rows: int, seed: int) -> torch.Tensor:
    return torch.randn(rows, 16, generator=torch.Generator().manual_seed(100 + seed))


def open_stream(batch: DecoderBatch, rows: int, top_k: int, max_tokens: int, seed: int):
    return batch.generate(text(rows, seed), top_k=top_k, max_tokens=max_tokens,
                          generator=torch.Generator().manual_seed(seed))


def alone(decoder: LLM2TTSCodecAR, request) -> list[int]:
    return list(open_stream(DecoderBatch(decoder, slots=1), *request))


def test_streams_joining_at_different_times_match_their_solo_tokens(decoder):
    expected = [alone(decoder, r) for r in REQUESTS]
    batch = DecoderBatch(decoder, slots=2, capacity=8)  # grows in slots and in capacity
    streams, got = {}, {i: [] for i in range(len(REQUESTS))}
    for step in range(40):
        if step % 3 == 0 and step // 3 < len(REQUESTS):  # a new stream every third round
            i = step // 3
            streams[i] = open_stream(batch, *REQUESTS[i])
        for i, stream in list(streams.items()):
            token = next(stream, None)
            if token is None:
                del streams[i]
            else:
                got[i].append(token)
    assert [got[i] for i in range(len(REQUESTS))] == expected
    assert batch.cache.slots >= 4 and batch.open_streams == 0


def test_closing_a_stream_frees_its_slot_for_the_next(decoder):
    batch = DecoderBatch(decoder, slots=1)
    first = open_stream(batch, *REQUESTS[0])
    next(first)
    assert batch.open_streams == 1
    first.close()
    assert batch.open_streams == 0
    assert list(open_stream(batch, *REQUESTS[1])) == alone(decoder, REQUESTS[1])
    assert batch.cache.slots == 1


def test_slow_consumer_gets_buffered_tokens(decoder):
    batch = DecoderBatch(decoder)
    fast, slow = open_stream(batch, *REQUESTS[0]), open_stream(batch, *REQUESTS[2])
    first = next(slow)
    assert list(fast) == alone(decoder, REQUESTS[0])  # slow advanced meanwhile, into its buffer
    assert [first, *slow] == alone(decoder, REQUESTS[2])


def test_utterances_queued_together_start_together(decoder):
    batch = DecoderBatch(decoder)
    streams = [open_stream(batch, *r) for r in REQUESTS[:3]]
    first = next(streams[0])
    assert all(batch.streams[i] is not None and batch.streams[i].sampled == 1 for i in range(3))
    assert [first, *streams[0]] == alone(decoder, REQUESTS[0])


def test_a_dropped_unstarted_stream_is_cancelled(decoder):
    batch = DecoderBatch(decoder, slots=1)
    open_stream(batch, *REQUESTS[0])  # dropped at once, never iterated
    assert batch.open_streams == 0
    assert list(open_stream(batch, *REQUESTS[1])) == alone(decoder, REQUESTS[1])
    assert batch.cache.slots == 1


def test_rejects_empty_budgets(decoder):
    for bad in ({"max_tokens": 0}, {"top_k": 0}):
        with pytest.raises(ValueError, match="at least 1"):
            DecoderBatch(decoder).generate(text(3, 0), **bad)
