"""What the engine runs next, in plain Python: sessions and their cache slots, turns waiting for
prefill, the padded multi-turn prefill within its token budget, the decode batch with its
launch-ahead carry-over, token delivery, cancellation and discard, and the named-prefix LRU.

No tensors here: ``ModelRunner`` (vita/model_runner.py) runs what the scheduler plans, and reads
a turn's input embeddings, which the scheduler only carries. Each turn's tokens go into its
``asyncio.Queue`` (``put_nowait`` from the engine's loop); the ``Engine`` front end awaits them.
"""

from __future__ import annotations

import asyncio
from collections import OrderedDict
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from vita.sampling import SamplingParams

END_OF_TURN = None  # put in a turn's queue after its last token


@dataclass(eq=False)
class Request:
    """One turn of one session: inputs still to prefill, then tokens to stream."""

    inputs: Any  # the turn's input embeddings [prompt_len, hidden] (the runner reads them), the previous turn's last token first
    prompt_len: int
    params: SamplingParams
    start_length: int  # cache length before this turn
    start_pending: int | None  # the session's last token not yet in the cache, restored if the turn is dropped
    opens_session: bool  # the session's first turn: dropping it forgets the session
    queue: asyncio.Queue = field(default_factory=asyncio.Queue)  # tokens, then END_OF_TURN or an exception
    prefilled: int = 0
    tokens: list[int] = field(default_factory=list)  # sampled so far
    consumed: int = 0  # tokens the caller has received
    done: bool = False  # the engine has stopped working on it

    @property
    def prompt_end(self) -> int:
        return self.start_length + self.prompt_len


@dataclass(eq=False)
class Session:
    slot: int
    length: int = 0  # positions of the slot holding this conversation
    pending: int | None = None  # last sampled token, yielded but not yet written to the cache
    request: Request | None = None  # the turn whose iterator is open
    turn: Request | None = None  # the latest turn in the conversation, running or ended (``discard``)


LaunchRows = list[tuple[Session, Request]]  # a decode step's rows: each one's session and the turn it was launched for


@dataclass
class DecodePlan:
    """One decode step: a row per generating session, with its input id, position and slot.

    Rows whose session was in the previous launch on the same turn take their input id from that
    launch's device output (``carried_rows[i]`` from its row ``carried_sources[i]``; their ``ids``
    entry is 0 and their position is one past the session's length).
    """

    rows: LaunchRows
    ids: list[int]
    positions: list[int]
    slots: list[int]
    carried_rows: list[int]
    carried_sources: list[int]


class Scheduler:
    """Sessions in ``max_sessions`` cache slots of ``max_len`` positions, and the work of every step.

    Prefill: while sessions are decoding, one forward per step of at most ``decoding_prefill_tokens``
    padded tokens (default ``prefill_tokens``) and ``prefill_chunk`` per session (so they keep
    streaming: every decoding session waits for that forward); otherwise forwards of at most
    ``prefill_tokens`` until nothing waits (fewest forward calls to the first token).
    """

    def __init__(
        self,
        *,
        max_sessions: int,
        max_len: int,
        stop_token_ids: Iterable[int],
        prefill_chunk: int,
        prefill_tokens: int,
        max_prefixes: int,
        decoding_prefill_tokens: int | None = None,
    ) -> None:
        self.max_sessions = max_sessions
        self.max_len = max_len
        self.stop_token_ids = frozenset(stop_token_ids)
        self.prefill_chunk = prefill_chunk
        self.prefill_tokens = max(prefill_tokens, prefill_chunk)
        self.decoding_prefill_tokens = decoding_prefill_tokens or self.prefill_tokens
        self.max_prefixes = max_prefixes
        self.sessions: dict[str, Session] = {}
        self.free_slots = list(range(max_sessions))
        self.prefill_queue: list[Session] = []
        self.decoding: list[Session] = []
        self.prefixes: OrderedDict[str, int] = OrderedDict()  # key -> length, least recently used first

    @property
    def has_work(self) -> bool:
        return bool(self.prefill_queue or self.decoding)

    # ----------------------------------------------------------------- turns

    def pending_token(self, session_id: str) -> int | None:
        """The session's last sampled token not yet in its cache: its next turn's first input."""
        session = self.sessions.get(session_id)
        return session.pending if session is not None else None

    def submit(
        self, session_id: str, inputs: Any, prompt_len: int, params: SamplingParams, prefix_key: str | None
    ) -> Request:
        """Queue a turn of ``prompt_len`` inputs (``pending_token`` first, if any) for prefill.

        ``RuntimeError`` if the session is generating, names a prefix after its first turn, or no
        slot is free; ``KeyError`` for an unknown prefix; ``ValueError`` if the turn does not fit
        the slot. A first turn takes the lowest free slot, starting from the prefix's length (the
        caller copies the prefix into the slot).
        """
        session = self.sessions.get(session_id)
        if session is not None and session.request is not None and not session.request.done:
            raise RuntimeError(f"session {session_id!r} is already generating")
        if session is not None and prefix_key is not None:
            raise RuntimeError(f"session {session_id!r} has started: only its first turn may name a prefix")
        prefix_length = self._use_prefix(prefix_key) if prefix_key is not None else None
        cached = session.length if session is not None else prefix_length if prefix_length is not None else 0
        if prompt_len == 0 or cached + prompt_len > self.max_len:
            raise ValueError(f"turn of {prompt_len} tokens does not fit after {cached} cached tokens")
        opens_session = session is None
        if opens_session:
            session = self._open_session(session_id, prefix_length or 0)
        session.request = session.turn = Request(inputs, prompt_len, params, session.length, session.pending, opens_session)
        session.pending = None
        self.prefill_queue.append(session)
        return session.request

    def iterator_closed(self, session_id: str, request: Request, received_all: bool) -> None:
        """The turn's iterator ended; one left early cancels the turn."""
        session = self.sessions.get(session_id)
        if session is not None and session.request is request:
            if not received_all:
                self.cancel(session_id)
            session.request = None

    def cancel(self, session_id: str) -> None:
        """Stop the session's current turn now, keeping only the tokens already received.

        A turn cancelled before any was received leaves the conversation as it was before it (a
        first turn: no session at all).
        """
        session = self.sessions.get(session_id)
        if session is None or session.request is None:
            return
        request = session.request
        if request.consumed == 0:
            self.discard(session_id)
            return
        self._end_iterator(session)
        session.length = request.prompt_end + request.consumed - 1
        session.pending = request.tokens[request.consumed - 1]

    def discard(self, session_id: str) -> None:
        """Drop the session's latest turn entirely, running or ended, even after tokens were received.

        The conversation goes back to before the turn (a first turn: no session at all) and the
        turn's iterator, if still open, ends.
        """
        session = self.sessions.get(session_id)
        if session is None or session.turn is None:
            return
        turn, session.turn = session.turn, None
        if session.request is turn:
            self._end_iterator(session)
            session.request = None
        session.length, session.pending = turn.start_length, turn.start_pending
        if turn.opens_session:
            self.release(session_id)

    def release(self, session_id: str) -> None:
        """Forget the session and free its slot."""
        session = self.sessions.pop(session_id, None)
        if session is not None:
            self.free_slots.append(session.slot)

    def fail_all(self, error: BaseException) -> None:
        """End every turn the engine is working on with ``error`` (a step failed), those the failed
        step had already taken off the work lists too (prefilled, or delivered a first token)."""
        for session in self.sessions.values():
            if session.request is not None and not session.request.done:
                self._finish(session)
                session.request.queue.put_nowait(error)

    # ----------------------------------------------------------------- prefixes

    def prefix_length(self, key: str) -> int | None:
        return self.prefixes.get(key)

    def check_prefix(self, length: int) -> None:
        """``ValueError`` unless a prefix of ``length`` tokens leaves room in a slot."""
        if not 0 < length < self.max_len:
            raise ValueError(f"a prefix needs 1 to {self.max_len - 1} tokens, got {length}")

    def add_prefix(self, key: str, length: int) -> list[str]:
        """Record a prefilled prefix as the most recently used; returns the keys it pushed out."""
        self.prefixes[key] = length
        self.prefixes.move_to_end(key)
        evicted = []
        while len(self.prefixes) > self.max_prefixes:
            evicted.append(self.prefixes.popitem(last=False)[0])
        return evicted

    def _use_prefix(self, key: str) -> int:
        if key not in self.prefixes:
            raise KeyError(f"no prefix registered as {key!r}")
        self.prefixes.move_to_end(key)
        return self.prefixes[key]

    # ----------------------------------------------------------------- steps

    def prefill_rows(self, forwards_this_step: int) -> list[tuple[Session, int]]:
        """Waiting sessions (in order) for the next prefill forward and each one's chunk size ([] for
        none): rows are padded to the longest chunk, within the token budget and every row's slot."""
        if not self.prefill_queue or (forwards_this_step and self.decoding):
            return []
        row_limit = self.prefill_chunk if self.decoding else self.max_len
        budget = self.decoding_prefill_tokens if self.decoding else self.prefill_tokens
        rows: list[tuple[Session, int]] = []
        width = 0
        for session in self.prefill_queue:
            request = session.request
            size = min(request.prompt_len - request.prefilled, row_limit, budget)
            grown = max(width, size)
            fits = (len(rows) + 1) * grown <= budget and all(
                s.length + grown <= self.max_len for s, _ in [*rows, (session, size)]
            )
            if rows and not fits:
                break
            rows.append((session, size))
            width = grown
        return rows

    def prefilled(self, rows: list[tuple[Session, int]]) -> list[tuple[int, int, Session]]:
        """Account for a prefill forward over ``rows``; returns the rows whose turn is now fully
        prefilled, as (row, index of its last input in the row, session): each gets its first token."""
        finishing = []
        for row, (session, size) in enumerate(rows):
            session.length += size
            session.request.prefilled += size
            if session.request.prefilled == session.request.prompt_len:
                self.prefill_queue.remove(session)
                finishing.append((row, size - 1, session))
        return finishing

    def plan_decode(self, previous: LaunchRows | None) -> DecodePlan | None:
        """The next decode step, planned before ``previous`` (the step still on its way) is read.

        Sessions in ``previous`` on the same turn continue from its ids. A carried row whose turn
        ends on that token (a stop token) has its extra token dropped by ``deliver_launch``; its cache
        write lands past the conversation's length, where nothing attends until it is overwritten.
        Rows whose turn ends on the previous token by length (``max_tokens``, a full slot) are not
        launched again. None when no session decodes.
        """
        carried: dict[Session, int] = {}
        ending = set()
        if previous is not None:
            for row, (session, request) in enumerate(previous):
                if session.request is request:
                    carried[session] = row
                    if self._last_of_turn(session):
                        ending.add(session)
        sessions = [s for s in self.decoding if s not in ending]
        if not sessions:
            return None
        carried_rows = [row for row, s in enumerate(sessions) if s in carried]
        return DecodePlan(
            rows=[(s, s.request) for s in sessions],
            ids=[0 if s in carried else s.pending for s in sessions],
            positions=[s.length + (s in carried) for s in sessions],
            slots=[s.slot for s in sessions],
            carried_rows=carried_rows,
            carried_sources=[carried[sessions[row]] for row in carried_rows],
        )

    def deliver_launch(self, rows: LaunchRows, tokens: list[int]) -> None:
        """Hand a decode step's tokens to the turns still running."""
        for (session, request), token in zip(rows, tokens):
            if session.request is request and not request.done:
                session.length += 1
                self.deliver(session, token)

    def deliver(self, session: Session, token: int) -> None:
        """Give the session's turn its next token; a stop token, ``max_tokens`` or a full slot ends it."""
        request = session.request
        request.tokens.append(token)
        session.pending = token
        request.queue.put_nowait(token)
        if (
            token in self.stop_token_ids
            or len(request.tokens) >= request.params.max_tokens
            or session.length >= self.max_len
        ):
            self._finish(session)
            request.queue.put_nowait(END_OF_TURN)

    def start_decoding(self, sessions: list[Session]) -> None:
        """Sessions that got their first token from prefill decode from the next step on (unless that ended them)."""
        self.decoding += [session for session in sessions if not session.request.done]

    # ----------------------------------------------------------------- internals

    def _last_of_turn(self, session: Session) -> bool:
        """Whether the session's next token ends its turn by length alone."""
        return len(session.request.tokens) + 1 >= session.request.params.max_tokens or session.length + 1 >= self.max_len

    def _open_session(self, session_id: str, length: int) -> Session:
        """Take the lowest free slot for a new session holding ``length`` positions (a prefix)."""
        if not self.free_slots:
            raise RuntimeError(f"all {self.max_sessions} session slots are in use")
        session = Session(slot=min(self.free_slots), length=length)
        self.free_slots.remove(session.slot)
        self.sessions[session_id] = session
        return session

    def _end_iterator(self, session: Session) -> None:
        """Stop the session's turn and end its iterator after the tokens already received."""
        request = session.request
        self._finish(session)
        while not request.queue.empty():
            request.queue.get_nowait()
        request.queue.put_nowait(END_OF_TURN)

    def _finish(self, session: Session) -> None:
        """Take the session's turn out of the work lists."""
        session.request.done = True
        if session in self.prefill_queue:
            self.prefill_queue.remove(session)
        if session in self.decoding:
            self.decoding.remove(session)
