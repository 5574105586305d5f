"""`Chat`: one user's conversation with the assistant through an engine session, kept in step.

The `Conversation` (which text the next turn starts with) and the engine's session (the KV cache
holding that text) must agree after every turn: a reply keeps every token the engine yielded,
also when it is stopped early; a turn that got no token is forgotten by both; a restart or an
undo changes both. `Chat` is the only place that changes either.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import aclosing

from vita.assistant import VitaAssistant
from vita.engine import Engine
from vita.media_encoder import TurnMedia
from vita.prompt import Conversation
from vita.sampling import SamplingParams


class ContextFull(Exception):
    """The engine refused a turn before its first token: the conversation no longer fits its context."""


class Chat:
    """The conversation of engine session `session_id`."""

    def __init__(
        self, assistant: VitaAssistant, engine: Engine, session_id: str, system_prompt: str | None = None
    ) -> None:
        self.assistant = assistant
        self.engine = engine
        self.session_id = session_id
        self.conversation = assistant.new_conversation(system_prompt)
        self.closed = False
        self.last_input_tokens = 0

    async def reply(self, media: TurnMedia, params: SamplingParams, text: str | None = None) -> AsyncIterator[int]:
        """Add a turn of encoded `media` and typed `text` and stream its reply's token ids;
        `last_input_tokens` is the turn's prompt length (the system block included on a first turn).

        The conversation keeps every id yielded, also when the caller stops early or its task is
        cancelled (iterate under `contextlib.aclosing`, so that the engine stops at once); a turn
        that got no id is forgotten. Raises `ContextFull` before the first id if the turn does not fit.
        """
        embeds, prefix = self.assistant.engine_turn(self.engine, self.conversation, media, text)
        self.last_input_tokens = embeds.shape[0] + (0 if prefix is None else self.engine.prefix_length(prefix) or 0)
        conversation, token_ids = self.conversation, []
        try:
            async with aclosing(self.engine.generate(self.session_id, embeds, params, prefix)) as ids:
                async for token_id in ids:
                    token_ids.append(token_id)
                    yield token_id
        except ValueError as exc:  # before any token, only the engine's "does not fit" refusal
            if token_ids:
                raise
            raise ContextFull(str(exc)) from exc
        finally:
            self.assistant.end_reply(conversation, token_ids)

    def restart(self) -> None:
        """Forget the history (the engine session included) but keep the system prompt."""
        self.engine.end_session(self.session_id)
        self.conversation = self.assistant.new_conversation(self.conversation.system_prompt)

    def undo(self, conversation: Conversation) -> None:
        """Drop the last turn of `conversation`, its reply included (a speculative turn thrown away),
        unless the chat restarted or closed since. Call it once that turn's reply has ended."""
        if conversation is self.conversation and not self.closed:
            self.engine.discard(self.session_id)
            self.assistant.end_reply(conversation, [])

    def close(self) -> None:
        """Stop any reply and free the engine session."""
        self.engine.end_session(self.session_id)
        self.closed = True
