"""`ReplyTextStream`: the token ids of one reply as clean text deltas, its leading state token (☞ ☟ ☜) split off."""

from __future__ import annotations

from vita.prompt import ReplyState, parse_reply_state
from vita.tokenizer import VitaTokenizer


class ReplyTextStream:
    """Ids of one reply -> text deltas without the leading state token.

    Text is held back until the first non-blank character shows whether the reply starts
    with a state token; `state` is None until then (and stays None if it does not).
    `closed` tells whether the reply ended with a stop id.
    """

    def __init__(self, tokenizer: VitaTokenizer):
        self.tokenizer = tokenizer
        self.decoder = tokenizer.stream_decoder()
        self.token_ids: list[int] = []
        self.state: ReplyState | None = None
        self.state_known = False
        self.pending = ""

    @property
    def closed(self) -> bool:
        return bool(self.token_ids) and self.token_ids[-1] in self.tokenizer.stop_ids

    def push(self, token_id: int) -> str:
        """Add one reply id; returns the text it releases ('' while held back)."""
        self.token_ids.append(token_id)
        return self._release(self.decoder.push(token_id))

    def flush(self) -> str:
        """End of the reply: returns the text still held back, settling `state`."""
        delta = self._release(self.decoder.flush())
        if self.state_known:
            return delta
        self.state, rest = parse_reply_state(self.pending)
        self.state_known, self.pending = True, ""
        return rest

    def _release(self, delta: str) -> str:
        if self.state_known:
            return delta
        self.pending += delta
        if not self.pending.strip():
            return ""
        self.state, rest = parse_reply_state(self.pending)
        if self.state is not None and not rest:
            return ""  # the space that may follow the state token has not arrived yet
        self.state_known, self.pending = True, ""
        return rest
