"""Scheduler without tensors: driven step by step as the engine drives it, with a token rule in place
of the model, so that every decode row's input can be checked against the conversation."""

import pytest

from vita.sampling import SamplingParams
from vita.scheduler import END_OF_TURN, DecodePlan, Scheduler


def token_at(slot: int, position: int) -> int:
    """The 'model': the token sampled to occupy ``position`` of ``slot``."""
    return 1000 * slot + position


class Driver:
    """Runs scheduler steps the way ``Engine._step`` does: prefill forwards, launch the next decode
    step, then deliver the previous one. Checks that every decode row feeds the token at its position."""

    def __init__(self, scheduler: Scheduler) -> None:
        self.scheduler = scheduler
        self.in_flight: tuple[DecodePlan, list[int]] | None = None
        self.prefill_forwards: list[list[tuple[int, int, int]]] = []  # per forward: (slot, start, size) rows
        self.plans: list[DecodePlan] = []

    def step(self) -> None:
        scheduler, started, forwards = self.scheduler, [], 0
        while rows := scheduler.prefill_rows(forwards):
            self.prefill_forwards.append([(session.slot, session.length, size) for session, size in rows])
            forwards += 1
            for _, _, session in scheduler.prefilled(rows):
                scheduler.deliver(session, token_at(session.slot, session.length))
                started.append(session)
        previous, self.in_flight = self.in_flight, None
        plan = scheduler.plan_decode(previous[0].rows if previous else None)
        if plan is not None:
            self.check_inputs(plan, previous)
            self.plans.append(plan)
            self.in_flight = (plan, [token_at(slot, position + 1) for slot, position in zip(plan.slots, plan.positions)])
        if previous is not None:
            scheduler.deliver_launch(previous[0].rows, previous[1])
        scheduler.start_decoding(started)

    @staticmethod
    def check_inputs(plan: DecodePlan, previous: tuple[DecodePlan, list[int]] | None) -> None:
        ids = list(plan.ids)
        for row, source in zip(plan.carried_rows, plan.carried_sources):
            assert ids[row] == 0
            ids[row] = previous[1][source]  # what the device copies from the previous launch's output
        assert ids == [token_at(slot, position) for slot, position in zip(plan.slots, plan.positions)]

    def run(self, steps: int = 200) -> None:
        for _ in range(steps):
            if not self.scheduler.has_work and self.in_flight is None:
                return
            self.step()
        raise AssertionError("the scheduler never went idle")


def received(request) -> list:
    items = []
    while not request.queue.empty():
        items.append(request.queue.get_nowait())
    return items


def make_scheduler(**overrides) -> Scheduler:
    options = dict(max_sessions=4, max_len=64, stop_token_ids=(), prefill_chunk=8, prefill_tokens=16, max_prefixes=2)
    return Scheduler(**(options | overrides))


def submit(scheduler: Scheduler, session_id: str, prompt_len: int, max_tokens: int = 5, prefix: str | None = None):
    return scheduler.submit(session_id, None, prompt_len, SamplingParams(max_tokens=max_tokens), prefix)


def test_turns_joining_and_leaving_the_decode_batch_get_the_tokens_at_their_positions():
    """Turns end by max_tokens, by a stop token (whose extra launched token is dropped) and by a
    full slot, while others keep decoding; carried rows come from the right row of the previous launch."""
    stop = token_at(1, 10 + 2)  # slot 1's third token
    scheduler = make_scheduler(stop_token_ids=[stop], max_len=40)
    driver = Driver(scheduler)
    first = {sid: submit(scheduler, sid, n, max_tokens=m) for sid, n, m in (("a", 5, 12), ("b", 10, 9), ("c", 3, 6))}
    driver.step()
    driver.step()
    late = submit(scheduler, "d", 36, max_tokens=20)  # slot 3: room for 4 more positions, then 1 token
    driver.run()
    assert received(first["a"]) == [token_at(0, 5 + i) for i in range(12)] + [END_OF_TURN]
    assert received(first["b"]) == [token_at(1, 10 + i) for i in range(3)] + [END_OF_TURN]
    assert received(first["c"]) == [token_at(2, 3 + i) for i in range(6)] + [END_OF_TURN]
    assert received(late) == [token_at(3, 36 + i) for i in range(5)] + [END_OF_TURN]
    # every conversation holds its prompt and all but its last token, which waits for the next turn
    for sid, request in (*first.items(), ("d", late)):
        session = scheduler.sessions[sid]
        assert session.length == request.prompt_end + len(request.tokens) - 1
        assert session.pending == request.tokens[-1]
    # a decode row per token after the first; the stop-token turn had one more on its way when the stop was read
    launched = {sid: sum(request is r for plan in driver.plans for _, r in plan.rows) for sid, request in (*first.items(), ("d", late))}
    assert launched == {"a": 11, "b": 3, "c": 5, "d": 4}
    assert all(max(plan.positions) < scheduler.max_len for plan in driver.plans)
    assert any(plan.carried_rows != plan.carried_sources for plan in driver.plans)  # a session left mid-batch
    assert any(plan.carried_rows and len(plan.carried_rows) < len(plan.rows) for plan in driver.plans)  # one joined


def test_a_next_turn_starts_with_the_last_token_and_the_launched_token_past_it_is_forgotten():
    scheduler = make_scheduler()
    driver = Driver(scheduler)
    submit(scheduler, "a", 4, max_tokens=3)
    driver.run()
    assert scheduler.pending_token("a") == token_at(0, 6)
    second = submit(scheduler, "a", 1 + 2, max_tokens=2)  # the pending token, then two new inputs
    assert (second.start_length, second.start_pending) == (6, token_at(0, 6))
    driver.run()
    assert received(second) == [token_at(0, 9), token_at(0, 10), END_OF_TURN]
    assert driver.prefill_forwards[-1] == [(0, 6, 3)]


def test_prefill_shares_padded_forwards_within_the_budget_and_the_slot():
    scheduler = make_scheduler(max_sessions=5, prefill_chunk=8, prefill_tokens=16)
    driver = Driver(scheduler)
    submit(scheduler, "early", 4, max_tokens=30)
    driver.step()  # idle: the whole turn in one forward
    assert driver.prefill_forwards == [[(0, 0, 4)]]
    for sid, n in (("p", 3), ("q", 5), ("r", 7), ("s", 12)):
        submit(scheduler, sid, n)
    driver.step()  # "early" decodes: one forward, rows of at most 8, 16 padded tokens
    assert driver.prefill_forwards[1] == [(1, 0, 3), (2, 0, 5)]
    driver.step()
    assert driver.prefill_forwards[2] == [(3, 0, 7), (4, 0, 8)]
    driver.step()
    assert driver.prefill_forwards[3] == [(4, 8, 4)]

    idle = make_scheduler(prefill_chunk=8, prefill_tokens=16)
    for sid, n in (("x", 20), ("y", 6)):
        submit(idle, sid, n)
    Driver(idle).step()  # nothing decodes: forwards until nothing waits, rows beyond the chunk size
    assert idle.prefill_queue == []


def test_while_sessions_decode_prefill_forwards_keep_to_their_own_budget():
    scheduler = make_scheduler(max_sessions=4, prefill_chunk=8, prefill_tokens=16, decoding_prefill_tokens=6)
    driver = Driver(scheduler)
    submit(scheduler, "early", 12, max_tokens=30)
    driver.step()  # nothing decodes: 12 tokens in one forward (within 16)
    assert driver.prefill_forwards == [[(0, 0, 12)]]
    submit(scheduler, "p", 5)
    submit(scheduler, "q", 4)
    for _ in range(3):
        driver.step()  # "early" decodes: forwards of at most 6 padded tokens, one a step
    assert driver.prefill_forwards[1:] == [[(1, 0, 5)], [(2, 0, 4)]]


def test_a_row_is_not_padded_past_the_end_of_its_slot():
    scheduler = make_scheduler(max_len=40, prefill_chunk=16, prefill_tokens=64)
    driver = Driver(scheduler)
    submit(scheduler, "near_end", 30, max_tokens=4)
    driver.run()
    submit(scheduler, "near_end", 4, max_tokens=2)  # from position 33: 7 positions left
    submit(scheduler, "fresh", 12)
    driver.step()
    assert driver.prefill_forwards[-2:] == [[(0, 33, 4)], [(1, 0, 12)]]


def test_cancel_keeps_the_received_tokens_and_a_turn_without_any_leaves_no_trace():
    scheduler = make_scheduler(max_sessions=2)
    driver = Driver(scheduler)
    request = submit(scheduler, "a", 5, max_tokens=10)
    for _ in range(4):
        driver.step()
    request.consumed = 2
    scheduler.cancel("a")
    assert received(request)[-1] is END_OF_TURN and request.done
    assert (scheduler.sessions["a"].length, scheduler.pending_token("a")) == (5 + 1, token_at(0, 6))
    driver.run()  # the step in flight is dropped

    first_turn = submit(scheduler, "b", 30)
    scheduler.cancel("b")  # before its first token: the session is forgotten, its slot free again
    assert "b" not in scheduler.sessions and sorted(scheduler.free_slots) == [1]
    assert received(first_turn) == [END_OF_TURN] and scheduler.prefill_queue == []


def test_discard_drops_the_latest_turn_even_after_it_ended():
    scheduler = make_scheduler()
    driver = Driver(scheduler)
    submit(scheduler, "a", 5, max_tokens=3)
    driver.run()
    before = (scheduler.sessions["a"].length, scheduler.pending_token("a"))
    submit(scheduler, "a", 4, max_tokens=3)
    driver.run()
    scheduler.discard("a")
    assert (scheduler.sessions["a"].length, scheduler.pending_token("a")) == before
    scheduler.discard("a")  # nothing more to drop: the first turn stays
    assert scheduler.sessions["a"].length == before[0]


def test_prefixes_are_kept_least_recently_used_and_misuse_is_refused():
    scheduler = make_scheduler(max_sessions=2, max_len=32, max_prefixes=2)
    assert scheduler.add_prefix("p", 4) == [] and scheduler.add_prefix("q", 5) == []
    request = submit(scheduler, "a", 3, prefix="p")  # p is now the most recently used
    assert (scheduler.sessions["a"].length, request.start_length) == (4, 4)
    assert scheduler.add_prefix("r", 6) == ["q"]
    assert (scheduler.prefix_length("p"), scheduler.prefix_length("q")) == (4, None)
    with pytest.raises(KeyError):
        submit(scheduler, "b", 3, prefix="q")
    with pytest.raises(RuntimeError):
        submit(scheduler, "a", 3)  # still generating
    with pytest.raises(ValueError):
        submit(scheduler, "b", 32 - 5, prefix="r")  # 6 + 27 > 32
    with pytest.raises(ValueError):
        scheduler.check_prefix(32)
    submit(scheduler, "b", 3, prefix="r")  # refused turns took no slot
    with pytest.raises(RuntimeError):
        submit(scheduler, "c", 3)  # both slots hold conversations
    scheduler.fail_all(error := RuntimeError("step failed"))
    assert received(request) == [error] and not scheduler.has_work
    with pytest.raises(RuntimeError):
        submit(scheduler, "a", 3, prefix="p")  # only a first turn may name a prefix
