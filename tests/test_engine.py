"""Engine (continuous batching over a slot KV cache) against a no-cache greedy loop; batched sampling."""

import asyncio
import logging

import pytest
import torch

from vita.engine import Engine
from vita.qwen2 import LLMConfig, Qwen2Model
from vita.sampling import SamplingBatch, SamplingParams, sample

VOCAB = 300
GREEDY = SamplingParams(temperature=0.0, max_tokens=12)


@pytest.fixture(scope="module")
def model() -> tuple[Qwen2Model, torch.nn.Linear]:
    return tiny_model()


def tiny_model(device: str = "cpu") -> tuple[Qwen2Model, torch.nn.Linear]:
    """Tiny model with weights large enough that greedy output depends on the whole history (a new
    one per device: an engine fuses its projections in place, which moving it afterwards breaks)."""
    torch.manual_seed(0)
    config = LLMConfig.tiny(vocab_size=VOCAB)
    core, lm_head = Qwen2Model(config).eval(), torch.nn.Linear(config.hidden_size, VOCAB, bias=False)
    with torch.no_grad():
        for module in (core, lm_head):
            for name, param in module.named_parameters():
                if "norm" not in name:
                    param.normal_(0, 0.2)
    return core.to(device), lm_head.to(device)


def prompt(model, length: int, seed: int) -> torch.Tensor:
    ids = torch.randint(0, VOCAB, (length,), generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        return model[0].embed_tokens(ids.to(model[0].embed_tokens.weight.device))


def reference_greedy(model, embeds: torch.Tensor, max_tokens: int, stop_ids=()) -> list[int]:
    """Recompute the whole sequence without a cache for every new token."""
    core, lm_head = model
    tokens = []
    with torch.no_grad():
        for _ in range(max_tokens):
            token = int(lm_head(core.forward_reference(embeds[None])[0, -1]).argmax())
            tokens.append(token)
            if token in stop_ids:
                break
            embeds = torch.cat([embeds, core.embed_tokens(torch.tensor([token], device=embeds.device))])
    return tokens


def token_embeds(model, tokens: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return model[0].embed_tokens(torch.tensor(tokens, dtype=torch.long))


def make_engine(model, **overrides) -> Engine:
    options = dict(max_sessions=4, max_len=128, device="cpu", dtype=torch.float32, stop_token_ids=(), prefill_chunk=8)
    return Engine(*model, **(options | overrides))


async def collect(engine: Engine, session_id: str, embeds: torch.Tensor, params=GREEDY, prefix=None) -> list[int]:
    return [token async for token in engine.generate(session_id, embeds, params, prefix)]


async def test_concurrent_sessions_match_reference_greedy(model):
    prompts = {f"s{i}": prompt(model, n, seed=i) for i, n in enumerate((3, 11, 20, 37))}
    stop = reference_greedy(model, prompts["s2"], 12)[5]  # s2 must stop at its 6th token
    engine = make_engine(model, stop_token_ids=[stop])
    results = await asyncio.gather(*(collect(engine, sid, p) for sid, p in prompts.items()))
    await engine.close()
    for (sid, embeds), tokens in zip(prompts.items(), results):
        assert tokens == reference_greedy(model, embeds, 12, stop_ids=[stop]), sid
    assert len(results[2]) <= 6 and results[2][-1] == stop


async def test_second_turn_prefills_only_new_tokens(model):
    engine = make_engine(model)
    first, second = prompt(model, 9, seed=10), prompt(model, 6, seed=11)
    reply1 = await collect(engine, "a", first)
    processed = []
    hook = model[0].register_forward_pre_hook(lambda _, args: processed.append(args[0].shape[:2].numel()))
    try:
        reply2 = await collect(engine, "a", second)
    finally:
        hook.remove()
        await engine.close()
    assert reply1 == reference_greedy(model, first, 12)
    conversation = torch.cat([first, token_embeds(model, reply1), second])
    assert reply2 == reference_greedy(model, conversation, 12)
    # the previous reply's last token + the new prompt, then one token per decode step
    assert sum(processed) == 1 + second.shape[0] + len(reply2) - 1


async def test_cancel_mid_reply_leaves_others_intact_and_frees_the_slot(model):
    engine = make_engine(model, max_sessions=3)
    prompts = {sid: prompt(model, n, seed=20 + i) for i, (sid, n) in enumerate((("a", 5), ("b", 14), ("c", 30)))}

    async def cancelled_after_three() -> list[int]:
        tokens = []
        async for token in engine.generate("b", prompts["b"], GREEDY):
            tokens.append(token)
            if len(tokens) == 3:
                engine.cancel("b")
        return tokens

    a, b, c = await asyncio.gather(
        collect(engine, "a", prompts["a"]), cancelled_after_three(), collect(engine, "c", prompts["c"])
    )
    assert a == reference_greedy(model, prompts["a"], 12)
    assert c == reference_greedy(model, prompts["c"], 12)
    assert b == reference_greedy(model, prompts["b"], 12)[:3]  # stopped within one step

    follow_up = prompt(model, 4, seed=30)
    conversation = torch.cat([prompts["b"], token_embeds(model, b), follow_up])
    assert await collect(engine, "b", follow_up) == reference_greedy(model, conversation, 12)

    with pytest.raises(RuntimeError):
        await collect(engine, "d", prompts["a"])  # all three slots hold conversations
    engine.end_session("b")
    fresh = prompt(model, 7, seed=31)
    assert await collect(engine, "d", fresh) == reference_greedy(model, fresh, 12)
    await engine.close()


async def test_a_failing_model_call_fails_every_open_turn_instead_of_hanging_it(model):
    def device_lost(*_: object) -> None:
        raise RuntimeError("device lost")

    engine = make_engine(model)
    failing = model[1].register_forward_pre_hook(device_lost)
    try:  # the first token's lm_head call fails after the turns' prefill is complete
        results = await asyncio.wait_for(asyncio.gather(
            collect(engine, "a", prompt(model, 5, seed=1)), collect(engine, "b", prompt(model, 9, seed=2)),
            return_exceptions=True), 10)
    finally:
        failing.remove()
    assert [str(r) for r in results] == ["device lost", "device lost"]
    fresh = prompt(model, 6, seed=3)  # the engine serves again once the model does
    assert await collect(engine, "c", fresh) == reference_greedy(model, fresh, 12)
    await engine.close()


async def test_breaking_out_of_the_stream_cancels_the_turn(model):
    engine = make_engine(model)
    embeds, follow_up = prompt(model, 6, seed=40), prompt(model, 3, seed=41)
    stream = engine.generate("a", embeds, GREEDY)
    first_two = [await anext(stream), await anext(stream)]
    for _ in range(5):
        await asyncio.sleep(0)  # let the engine run ahead of this slow consumer
    await stream.aclose()
    reply = await collect(engine, "a", follow_up)  # would raise if the turn were still running
    await engine.close()
    conversation = torch.cat([embeds, token_embeds(model, first_two), follow_up])
    assert reply == reference_greedy(model, conversation, 12)


async def test_cancel_during_prefill_drops_the_turn(model):
    engine = make_engine(model)
    other_prompt = prompt(model, 3, seed=44)
    other = asyncio.ensure_future(collect(engine, "b", other_prompt))
    await asyncio.sleep(0)
    stream = engine.generate("a", prompt(model, 40, seed=42), GREEDY)  # 5 chunks of 8 while "b" decodes
    first = asyncio.ensure_future(anext(stream))
    for _ in range(3):
        await asyncio.sleep(0)
    assert not first.done()
    engine.cancel("a")
    with pytest.raises(StopAsyncIteration):
        await first
    follow_up = prompt(model, 5, seed=43)
    assert await collect(engine, "a", follow_up) == reference_greedy(model, follow_up, 12)
    assert await other == reference_greedy(model, other_prompt, 12)
    await engine.close()


async def test_single_token_turns_keep_the_conversation_consistent(model):
    engine = make_engine(model)
    turns = [prompt(model, n, seed=45 + n) for n in (4, 2, 3)]
    conversation, replies = turns[0][:0], []
    for embeds in turns:
        replies.append(await collect(engine, "a", embeds, SamplingParams(max_tokens=1)))
        conversation = torch.cat([conversation, embeds])
        assert replies[-1] == reference_greedy(model, conversation, 1)
        conversation = torch.cat([conversation, token_embeds(model, replies[-1])])
    await engine.close()


async def test_turn_ended_by_a_stop_token_during_a_launched_step_keeps_the_conversation_exact(model):
    """The step after a stop token is already on its way when the stop is read; its extra token is
    dropped and the next turn continues from the exact conversation, while another session decodes."""
    first, second, other = prompt(model, 7, seed=60), prompt(model, 5, seed=61), prompt(model, 9, seed=62)
    stop = reference_greedy(model, first, 12)[3]
    engine = make_engine(model, stop_token_ids=[stop])
    long_params = SamplingParams(max_tokens=40)
    background = asyncio.ensure_future(collect(engine, "b", other, long_params))
    reply1 = await collect(engine, "a", first)
    reply2 = await collect(engine, "a", second)
    others = await background
    await engine.close()
    assert reply1 == reference_greedy(model, first, 12, stop_ids=[stop]) and reply1[-1] == stop
    conversation = torch.cat([first, token_embeds(model, reply1), second])
    assert reply2 == reference_greedy(model, conversation, 12, stop_ids=[stop])
    assert others == reference_greedy(model, other, 40, stop_ids=[stop])


async def test_named_prefixes_are_prefilled_once_and_equal_full_prefill(model):
    engine = make_engine(model)
    system_x, system_y = prompt(model, 19, seed=50), prompt(model, 13, seed=53)
    users = {sid: prompt(model, n, seed=51 + i) for i, (sid, n) in enumerate((("a", 5), ("b", 8), ("c", 6)))}
    engine.register_prefix("x", system_x)
    engine.register_prefix("y", system_y)
    assert engine.prefilled_tokens == 19 + 13
    assert (engine.prefix_length("x"), engine.prefix_length("y"), engine.prefix_length("z")) == (19, 13, None)
    processed = []
    hook = model[0].register_forward_pre_hook(lambda _, args: processed.append(args[0].shape[:2].numel()))
    try:
        a, b, c = await asyncio.gather(
            collect(engine, "a", users["a"], prefix="x"),
            collect(engine, "b", users["b"], prefix="y"),
            collect(engine, "c", users["c"], prefix="x"),
        )
        follow_up = prompt(model, 4, seed=54)
        a2 = await collect(engine, "a", follow_up)
    finally:
        hook.remove()
        await engine.close()
    assert a == reference_greedy(model, torch.cat([system_x, users["a"]]), 12)
    assert b == reference_greedy(model, torch.cat([system_y, users["b"]]), 12)
    assert c == reference_greedy(model, torch.cat([system_x, users["c"]]), 12)
    assert a2 == reference_greedy(model, torch.cat([system_x, users["a"], token_embeds(model, a), follow_up]), 12)
    # only the turns themselves were prefilled: 5 + 8 + 6, then the last reply token + 4
    assert engine.prefilled_tokens == 19 + 13 + 5 + 8 + 6 + 1 + 4
    decode_steps = len(a) - 1 + len(b) - 1 + len(c) - 1 + len(a2) - 1
    # what the model ran: the three turns in one forward, rows padded to the longest (8)
    assert sum(processed) == 3 * 8 + 1 + 4 + decode_steps


async def test_prefix_misuse_is_refused_and_old_prefixes_are_forgotten(model):
    engine = make_engine(model, max_prefixes=2)
    for i, key in enumerate("pqr"):
        engine.register_prefix(key, prompt(model, 4 + i, seed=55 + i))
        if key == "q":
            await collect(engine, "uses-p", prompt(model, 2, seed=58), prefix="p")  # p is now the newest
    assert (engine.prefix_length("p"), engine.prefix_length("q"), engine.prefix_length("r")) == (4, None, 6)
    with pytest.raises(KeyError):
        await collect(engine, "a", prompt(model, 3, seed=59), prefix="q")
    with pytest.raises(RuntimeError):
        await collect(engine, "uses-p", prompt(model, 3, seed=59), prefix="p")  # not its first turn
    with pytest.raises(ValueError):
        await collect(engine, "b", prompt(model, engine.max_len - 5, seed=60), prefix="r")  # 6 + 123 > 128
    with pytest.raises(ValueError):
        engine.register_prefix("too-long", prompt(model, engine.max_len, seed=61))
    # refused turns took no slot: three sessions still fit beside "uses-p"
    embeds = prompt(model, 3, seed=62)
    for sid in ("c", "d", "e"):
        assert await collect(engine, sid, embeds, prefix="r") == reference_greedy(
            model, torch.cat([prompt(model, 6, seed=57), embeds]), 12
        )
    await engine.close()


async def test_a_first_turn_cancelled_before_its_first_token_forgets_the_session(model):
    engine = make_engine(model, max_sessions=1)
    system, user = prompt(model, 10, seed=63), prompt(model, 30, seed=64)
    engine.register_prefix("s", system)
    stream = engine.generate("a", user, GREEDY, prefix="s")
    first = asyncio.ensure_future(anext(stream))
    await asyncio.sleep(0)
    engine.cancel("a")
    with pytest.raises(StopAsyncIteration):
        await first
    retry = prompt(model, 7, seed=65)
    assert await collect(engine, "b", retry, prefix="s") == reference_greedy(model, torch.cat([system, retry]), 12)
    await engine.close()


@pytest.mark.parametrize("when", ["mid_reply", "after_the_reply"])
async def test_a_discarded_turn_leaves_no_trace_in_the_conversation(model, when):
    """Tokens were yielded (or the whole reply was): discarding still drops the turn entirely."""
    engine = make_engine(model)
    first, dropped, follow_up = prompt(model, 6, seed=80), prompt(model, 9, seed=81), prompt(model, 4, seed=82)
    reply1 = await collect(engine, "a", first)
    received = []
    async for token in engine.generate("a", dropped, GREEDY):
        received.append(token)
        if when == "mid_reply" and len(received) == 3:
            engine.discard("a")
    assert len(received) == (3 if when == "mid_reply" else 12)  # the iterator ended at the discard
    if when == "after_the_reply":
        engine.discard("a")
    engine.discard("a")  # nothing more to drop: the first turn stays
    reply3 = await collect(engine, "a", follow_up)
    await engine.close()
    conversation = torch.cat([first, token_embeds(model, reply1), follow_up])
    assert reply3 == reference_greedy(model, conversation, 12)


async def test_a_discarded_first_turn_forgets_the_session(model):
    engine = make_engine(model, max_sessions=1)
    system, user = prompt(model, 10, seed=83), prompt(model, 5, seed=84)
    engine.register_prefix("s", system)
    await collect(engine, "a", user, prefix="s")
    engine.discard("a")
    retry = prompt(model, 7, seed=85)  # a first turn again (it may name the prefix), in the freed slot
    assert await collect(engine, "b", retry, prefix="s") == reference_greedy(model, torch.cat([system, retry]), 12)
    await engine.close()


async def test_turn_stops_when_cache_is_full_and_oversized_turns_are_refused(model):
    engine = make_engine(model, max_len=20)
    embeds = prompt(model, 15, seed=60)
    tokens = await collect(engine, "a", embeds, SamplingParams(max_tokens=50))
    assert tokens == reference_greedy(model, embeds, 6)  # positions 15..19 written, then one more sampled
    with pytest.raises(ValueError):
        await collect(engine, "a", prompt(model, 1, seed=61))
    await engine.close()


async def test_sampled_generation_is_reproducible_for_a_seed(model):
    params = SamplingParams(temperature=1.0, top_p=0.9, top_k=50, max_tokens=10)
    embeds = prompt(model, 8, seed=70)
    runs = []
    for _ in range(2):
        engine = make_engine(model, seed=123)
        runs.append(await collect(engine, "a", embeds, params))
        await engine.close()
    assert runs[0] == runs[1] and len(runs[0]) == 10


# ----------------------------------------------------------------- sampling

ROWS = 4000


def draw(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """ROWS independent samples from one row of logits."""
    batch = SamplingBatch.from_params([params] * ROWS, "cpu")
    return sample(logits.expand(ROWS, -1), batch, torch.Generator().manual_seed(0))


def frequencies(ids: torch.Tensor, size: int) -> torch.Tensor:
    return torch.bincount(ids, minlength=size).float() / ids.numel()


def test_temperature_sampling_follows_softmax():
    logits = torch.tensor([2.0, 1.0, 0.5, -1.0, 0.0])
    expected = torch.softmax(logits / 2.0, dim=0)
    observed = frequencies(draw(logits, SamplingParams(temperature=2.0)), 5)
    torch.testing.assert_close(observed, expected, atol=0.03, rtol=0)


def test_top_p_keeps_the_smallest_nucleus_renormalised():
    probs = torch.tensor([0.15, 0.5, 0.05, 0.3])
    observed = frequencies(draw(probs.log(), SamplingParams(temperature=1.0, top_p=0.7)), 4)
    # nucleus: 0.5 (< 0.7 before it: 0.0) and 0.3 (0.5 before it); 0.15 has 0.8 before it
    torch.testing.assert_close(observed, torch.tensor([0.0, 0.625, 0.0, 0.375]), atol=0.03, rtol=0)


def test_top_k_restricts_support_to_k_largest():
    logits = torch.tensor([0.1, 3.0, 0.2, 2.9, 0.0, 2.8])
    ids = draw(logits, SamplingParams(temperature=5.0, top_k=2))
    assert set(ids.tolist()) == {1, 3}


def test_rows_use_their_own_parameters():
    logits = torch.randn(3, 50, generator=torch.Generator().manual_seed(1))
    params = [SamplingParams(), SamplingParams(temperature=1.0, top_k=1), SamplingParams(temperature=1.0)]
    ids = sample(logits, SamplingBatch.from_params(params, "cpu"), torch.Generator().manual_seed(2))
    assert ids[:2].tolist() == logits[:2].argmax(dim=-1).tolist()
    spread = sample(logits[2:].expand(500, -1), SamplingBatch.from_params(params[2:] * 500, "cpu"))
    assert len(set(spread.tolist())) > 10  # the unfiltered row really samples


def test_invalid_params_are_rejected():
    for bad in (dict(temperature=-1), dict(top_p=0.0), dict(top_k=-2), dict(max_tokens=0)):
        with pytest.raises(ValueError):
            SamplingParams(**bad)


async def test_waiting_turns_share_prefill_forwards_within_the_token_budget(model):
    """Turns that wait together are prefilled as padded rows of one forward; while others decode a
    forward holds at most ``prefill_tokens`` padded tokens; every reply still equals the reference."""
    engine = make_engine(model, max_sessions=5, prefill_chunk=8, prefill_tokens=16)
    shapes = []
    hook = model[0].register_forward_pre_hook(lambda _, args: shapes.append(tuple(args[0].shape[:2])))
    try:
        early = asyncio.ensure_future(collect(engine, "early", prompt(model, 4, seed=60)))
        while not shapes:
            await asyncio.sleep(0)
        late = {f"s{i}": prompt(model, n, seed=61 + i) for i, n in enumerate((3, 5, 7, 12))}
        results = await asyncio.gather(*(collect(engine, sid, p) for sid, p in late.items()))
        await early
    finally:
        hook.remove()
        await engine.close()
    for (sid, embeds), tokens in zip(late.items(), results):
        assert tokens == reference_greedy(model, embeds, 12), sid
    prefills = [shape for shape in shapes if shape[1] > 1]
    assert max(rows for rows, _ in prefills) > 1  # several sessions in one forward
    assert all(rows * width <= 16 for rows, width in prefills[1:])  # after the first, others were decoding


async def test_rows_are_not_padded_past_the_end_of_a_slot(model):
    """A turn near the end of its slot is prefilled apart from a longer one rather than padded past it."""
    engine = make_engine(model, max_len=40, prefill_chunk=16)
    history = prompt(model, 30, seed=70)
    first = await collect(engine, "near_end", history, SamplingParams(temperature=0.0, max_tokens=4))
    turn, fresh = prompt(model, 3, seed=71), prompt(model, 12, seed=72)
    near_end, other = await asyncio.gather(
        collect(engine, "near_end", turn, SamplingParams(temperature=0.0, max_tokens=2)), collect(engine, "fresh", fresh)
    )
    await engine.close()
    context = torch.cat([history, token_embeds(model, first), turn])
    assert near_end == reference_greedy(model, context, 2)
    assert other == reference_greedy(model, fresh, 12)


def test_a_padded_prefill_writes_only_its_real_inputs_even_past_the_end_of_a_slot(model):
    """Rows padded in width (one past the end of its slot) and a padding row give the real inputs
    the hidden states and cache entries of unpadded forwards, and leave every other position as it was."""
    from vita.model_runner import ModelRunner

    def runner() -> ModelRunner:
        made = ModelRunner(*model, max_sessions=3, max_len=32, device="cpu", dtype=torch.float32)
        with torch.inference_mode():  # slot 1 holds 28 positions: its next 4 inputs fill it
            made._prefill_forward(prompt(model, 28, seed=80)[None], *torch.tensor([[0], [28], [1]]), 32)
        return made

    rows = [(0, 5, 0), (28, 4, 1)]  # start, size, slot
    inputs = [prompt(model, size, seed=81 + row) for row, (_, size, _) in enumerate(rows)]
    reference, padded = runner(), runner()
    embeds = torch.randn(3, 16, model[0].config.hidden_size)  # padding inputs are arbitrary
    for row, part in enumerate(inputs):
        embeds[row, : part.shape[0]] = part
    layout = torch.tensor([[*column, padding] for column, padding in zip(zip(*rows), (0, 0, padded.padding_slot))])
    with torch.inference_mode():
        hidden = padded._prefill_forward(embeds, *layout, 32)
        for row, ((start, size, slot), part) in enumerate(zip(rows, inputs)):
            alone = reference._prefill_forward(part[None], *torch.tensor([[start], [size], [slot]]), 32)
            torch.testing.assert_close(hidden[row, :size], alone[0])
    for ours, theirs in zip(padded.cache.layers, reference.cache.layers):
        torch.testing.assert_close(ours[: reference.padding_slot], theirs[: reference.padding_slot])
        assert not ours[0, 5:].any() and not ours[2].any()  # never written


async def turns_joining_others_match_the_reference(model, device: str) -> Engine:
    """Graph-shaped engine on ``device``: one turn, then five more while it decodes (one of 1100
    tokens, crossing the prefill graphs' attended-length buckets), each against a no-cache greedy loop."""
    engine = make_engine(model, device=device, cuda_graphs=True, max_sessions=6, max_len=2048, prefill_chunk=16,
                         prefill_tokens=16)
    prompts = {f"s{i}": prompt(model, n, seed=90 + i).to(device) for i, n in enumerate((37, 3, 5, 7, 12, 1100))}
    early = asyncio.ensure_future(collect(engine, "s0", prompts["s0"]))
    await asyncio.sleep(0.05)
    results = await asyncio.gather(*(collect(engine, sid, p) for sid, p in list(prompts.items())[1:]))
    results.insert(0, await early)
    await engine.close()
    for (sid, embeds), tokens in zip(prompts.items(), results):
        assert tokens == reference_greedy(model, embeds, 12), sid
    return engine


class RerunGraph:
    """Stands in for a CUDA graph on the CPU: each replay runs the captured function again into the
    same output, so the runner's fixed-shape rows, padding and buckets are what gets tested."""

    def __init__(self, run):
        self.run = run
        self.output = run()

    def replay(self) -> None:
        self.output.copy_(self.run())


async def test_graph_shaped_prefills_and_decodes_give_the_reference_tokens(model, monkeypatch) -> None:
    """On the CPU, with every graph replay re-running its function: padded rows and widths, the
    padding slot and the attended-length buckets give the tokens of a no-cache greedy loop."""
    import vita.model_runner

    monkeypatch.setattr(vita.model_runner, "capture", lambda run, *_: (graph := RerunGraph(run), graph.output))
    monkeypatch.setattr(torch.cuda, "graph_pool_handle", lambda: None)
    engine = await turns_joining_others_match_the_reference(model, "cpu")
    assert {(rows, kv_len) for rows, _, kv_len in engine.runner._prefill_graphs} == {(1, 1024), (2, 1024), (1, 2048)}


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a CUDA device")
async def test_on_cuda_prefills_replayed_from_graphs_give_the_reference_tokens() -> None:
    """The same with real CUDA graphs (and the fast kernels)."""
    engine = await turns_joining_others_match_the_reference(tiny_model("cuda"), "cuda")
    assert {kv_len for _, _, kv_len in engine.runner._prefill_graphs} == {1024, 2048}  # replayed from graphs


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA timing events need a CUDA device")
async def test_on_cuda_the_activity_lines_carry_the_gpu_time_of_prefill_and_decode(
    caplog: pytest.LogCaptureFixture,
) -> None:
    from tts.activity_log import ActivityLog

    model = tiny_model("cuda")
    engine = make_engine(model, device="cuda", cuda_graphs=False)
    engine._activity = ActivityLog(logging.getLogger("test.engine"), "engine", interval_s=0.0)  # a line per step
    with caplog.at_level(logging.INFO, logger="test.engine"):
        await collect(engine, "a", prompt(model, 20, seed=1))
        await engine.close()
    text = caplog.text
    for activity in ("prefill_gpu", "decode_gpu"):
        times = [float(part.split("=")[1]) for part in text.split() if part.startswith(f"{activity}_ms=")]
        assert times and all(ms > 0 for ms in times), activity
