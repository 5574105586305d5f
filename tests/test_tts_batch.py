"""DecoderBatch: streams decoded together give the tokens they give alone; the padded static-shape
step gives the logits of the exact one; slots come and go."""

import pytest
import torch

from layers.kv_cache import KVCache
from tts.batch import DecoderBatch, UtteranceText
from tts.decoder import LLM2TTSCodecAR, new_kv_cache
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


def add(batch: DecoderBatch, rows: int, top_k: int, max_tokens: int, seed: int):
    generator = torch.Generator().manual_seed(seed)
    return batch.add(text(rows, seed), top_k=top_k, max_tokens=max_tokens, generator=generator)


def alone(decoder: LLM2TTSCodecAR, request, capacity: int = 64) -> list[int]:
    batch = DecoderBatch(decoder, slots=1, capacity=capacity)
    stream, tokens = add(batch, *request), []
    while not stream.finished:
        [(_, drawn)] = batch.step()
        assert len(drawn) == 1 or stream.finished
        tokens += drawn
    return tokens


@pytest.mark.parametrize("steps_per_call", [1, 4])
def test_streams_joining_at_different_times_match_their_solo_tokens(decoder, steps_per_call):
    """Also with several steps per call: each stream gets the tokens one step per call gives it alone,
    those drawn past its max_tokens dropped."""
    expected = [alone(decoder, r) for r in REQUESTS]
    batch = DecoderBatch(decoder, slots=3, capacity=64, steps_per_call=steps_per_call)
    streams, got = {}, {i: [] for i in range(len(REQUESTS))}
    waiting = list(range(len(REQUESTS)))
    for call in range(60):
        if call % 3 == 0 and waiting and batch.free_slots:  # a new stream every third call, when a slot is free
            i = waiting.pop(0)
            streams[add(batch, *REQUESTS[i])] = i
        for stream, drawn in batch.step():
            assert len(drawn) == steps_per_call or stream.finished
            got[streams[stream]] += drawn
    assert not waiting and batch.free_slots == 3
    assert [got[i] for i in range(len(REQUESTS))] == expected
    assert all(len(tokens) == r[2] for tokens, r in zip(expected, REQUESTS))


def test_removing_a_stream_frees_its_slot_for_the_next(decoder):
    batch = DecoderBatch(decoder, slots=1, capacity=64)
    first = add(batch, *REQUESTS[0])
    batch.step()
    assert batch.free_slots == 0
    with pytest.raises(RuntimeError, match="no free slot"):
        add(batch, *REQUESTS[1])
    batch.remove(first)
    assert batch.free_slots == 1 and first.finished and batch.step() == []
    second, tokens = add(batch, *REQUESTS[1]), []
    while not second.finished:
        tokens += batch.step()[0][1]
    assert tokens == alone(decoder, REQUESTS[1])


@pytest.mark.parametrize("steps_per_call", [1, 4])
def test_a_stream_ends_when_its_slot_is_full(decoder, steps_per_call):
    """It gets a token per free position; with several steps per call the steps past its end stay in
    its own slot: the stream beside it still gets the tokens it gets alone."""
    rows, capacity = 20, 24
    batch = DecoderBatch(decoder, slots=2, capacity=capacity, steps_per_call=steps_per_call)
    full = add(batch, rows, 2, 100, 0)
    beside, tokens = add(batch, 2, 2, 12, 5), {}
    while batch.free_slots < 2:
        for stream, drawn in batch.step():
            tokens.setdefault(stream, []).extend(drawn)
    assert len(tokens[full]) == capacity - (rows + 1)
    assert tokens[beside] == alone(decoder, (2, 2, 12, 5), capacity)


@pytest.mark.parametrize("steps_per_call", [1, 4])
def test_eos_ends_a_stream_without_a_token(decoder, steps_per_call):
    batch = DecoderBatch(decoder, slots=2, capacity=64, steps_per_call=steps_per_call)
    with torch.no_grad():
        decoder.out_fnn.bias[decoder.config.eos_id] = 1e9
    try:
        stream = add(batch, *REQUESTS[0])
        assert batch.step() == [(stream, [])] and stream.finished and batch.free_slots == 2
    finally:
        with torch.no_grad():
            decoder.out_fnn.bias[decoder.config.eos_id] = -1e9


def copy_of_slots(cache: KVCache, slots) -> KVCache:
    """A cache holding a copy of `slots` of `cache`, as its slots 0, 1, ..."""
    copy = KVCache(num_layers=len(cache.layers), kv_heads=cache.kv_heads, head_dim=cache.layers[0].shape[-1],
                   slots=len(slots), max_len=cache.max_len, device=cache.device, dtype=cache.dtype)
    for target, source in zip(copy.layers, cache.layers):
        target.copy_(source[list(slots)])
    return copy


def test_padded_static_step_gives_the_exact_step_logits(decoder):
    """What a CUDA graph replays: a batch of more rows than streams (free slots in between) over a
    span past every position, the mask built from positions, gives each stream the logits of a
    batch of exactly its rows attending exactly its length, and of the stream alone."""
    config = decoder.config
    cache = new_kv_cache(config, slots=8, capacity=64, device="cpu", dtype=torch.float32)
    lengths = {0: decoder.prefill(text(5, 0), cache, 0), 2: decoder.prefill(text(17, 1), cache, 2),
               3: decoder.prefill(text(9, 2), cache, 3)}
    exact = copy_of_slots(cache, range(4))
    solos = {i: copy_of_slots(cache, [i]) for i in lengths}
    tokens = {0: config.sos_id, 2: 7, 3: 40}
    for step in range(3):
        fed = torch.tensor([tokens.get(i, config.pad_id) for i in range(8)])
        positions = torch.tensor([lengths.get(i, 0) + step for i in range(8)])
        padded = decoder.step(fed, positions, cache, span=64)
        exact_logits = decoder.step(fed[:4], positions[:4], exact, span=max(lengths.values()) + step + 1)
        for i, solo in solos.items():
            alone_logits = decoder.step(fed[i : i + 1], positions[i : i + 1], solo, span=lengths[i] + step + 1)
            torch.testing.assert_close(padded[i], exact_logits[i], atol=1e-4, rtol=1e-4)
            torch.testing.assert_close(padded[i], alone_logits[0], atol=1e-4, rtol=1e-4)
        tokens = {i: int(padded[i].argmax()) for i in lengths}
    for i, solo in solos.items():
        for layer, solo_layer in zip(cache.layers, solo.layers):
            torch.testing.assert_close(layer[i], solo_layer[0])


def test_utterances_prefilled_together_decode_as_if_alone(decoder):
    """One padded prefill forward for texts of different lengths gives each stream the tokens it
    gets when prefilled alone."""
    texts = [text(5, 0), text(17, 1), text(9, 2)]
    together = DecoderBatch(decoder, slots=4, capacity=64)
    together.add_many([UtteranceText(t, 2, 12, torch.Generator().manual_seed(i)) for i, t in enumerate(texts)])
    alone = DecoderBatch(decoder, slots=4, capacity=64)
    for i, t in enumerate(texts):
        alone.add(t, top_k=2, max_tokens=12, generator=torch.Generator().manual_seed(i))
    assert [s.length for s in together.streams[:3]] == [s.length for s in alone.streams[:3]] == [6, 18, 10]
    for _ in range(12):
        assert [drawn for _, drawn in together.step()] == [drawn for _, drawn in alone.step()]


def test_a_padded_prefill_with_a_scratch_slot_fills_the_cache_as_prefilling_each_text(decoder):
    """What a prefill CUDA graph replays: texts zero-padded to a fixed width, more rows than texts
    (one row each, into a scratch slot), masks always on: each text's slot gets the keys and values
    its own prefill gives, up to its length, and a slot nobody named stays untouched."""
    texts = [text(5, 0), text(17, 1), text(9, 2)]
    padded_cache = new_kv_cache(decoder.config, slots=5, capacity=64, device="cpu", dtype=torch.float32)
    x = torch.zeros(4, 32, decoder.config.idim)
    for row, t in enumerate(texts):
        x[row, : len(t)] = t
    decoder.prefill_padded(x, torch.tensor([5, 17, 9, 1]), padded_cache, torch.tensor([0, 3, 1, 4]))
    for t, slot in zip(texts, [0, 3, 1]):
        alone = new_kv_cache(decoder.config, slots=1, capacity=64, device="cpu", dtype=torch.float32)
        length = decoder.prefill(t, alone, 0)
        for layer, alone_layer in zip(padded_cache.layers, alone.layers):
            torch.testing.assert_close(layer[slot, :length], alone_layer[0, :length], atol=1e-5, rtol=1e-5)
    assert all(layer[2].abs().sum() == 0 for layer in padded_cache.layers)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a CUDA device")
def test_graphed_prefills_decode_as_eager_ones(tmp_path):
    """On CUDA, utterances prefilled from the prefill graphs get the eager prefill's cache and tokens."""
    write_tiny_tts_checkpoint(tmp_path)
    decoder = LLM2TTSCodecAR.load(tmp_path / "decoder", device="cuda", dtype=torch.float32)
    texts = [text(5, 0).cuda(), text(17, 1).cuda(), text(9, 2).cuda()]
    batches = [DecoderBatch(decoder, slots=4, capacity=128, prefill_graphs=graphs) for graphs in (True, False)]
    for batch in batches:
        batch.capture_graphs()
        batch.add_many([UtteranceText(t, 2, 12, torch.Generator().manual_seed(i)) for i, t in enumerate(texts)])
    for graphed, eager in zip(batches[0].cache.layers, batches[1].cache.layers):
        for slot, t in enumerate(texts):
            torch.testing.assert_close(graphed[slot, : len(t) + 1], eager[slot, : len(t) + 1], atol=1e-4, rtol=1e-4)
    for _ in range(12):
        assert [tokens for _, tokens in batches[0].step()] == [tokens for _, tokens in batches[1].step()]
