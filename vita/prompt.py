"""VITA-1.5 chat prompt: Qwen2.5 ChatML template, system prompts, per-turn text, reply state.

A conversation grows turn by turn over one KV cache: the first turn carries the system
prompt (VITA's video one when it brings camera frames, else its audio one, unless the session
set its own), later turns carry only their own text. The engine keeps every token of a reply it
yielded, the stop token `<|im_end|>` included; a reply cut short (barge-in, token limit) has
no `<|im_end|>`, so the next turn starts by writing it.

VITA-1.5 starts every reply with a state token (upstream `data_utils_video_audio_neg_patch`):
☞ answers a spoken query (speak it), ☟ marks speech not addressed to the assistant (say
nothing), ☜ answers a typed query.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

from vita.tokenizer import AUDIO_PLACEHOLDER, IM_END, IM_START, IMAGE_PLACEHOLDER

_IDENTITY = (
    "You are an AI robot and your name is VITA. \n"
    "- You are a multimodal large language model developed by the open source community. "
    "Your aim is to be helpful, honest and harmless. \n"
    "- You support the ability to communicate fluently and answer user questions in multiple "
    "languages of the user's choice. \n"
    "- If the user corrects the wrong answer you generated, you will apologize and discuss the "
    "correct answer with the user."
)

# The `qwen2p5_instruct` system prompts of upstream vita/conversation.py ("lang" is "audio"),
# the template VITA-1.5 was fine-tuned with (upstream's web demo spells the name "Vita").
SYSTEM_PROMPTS = {
    "audio": _IDENTITY,
    "image": _IDENTITY
    + " \n- You must answer the question strictly according to the content of the image given by "
    "the user, and it is strictly forbidden to answer the question without the content of the "
    "image. Please note that you are seeing the image, not the video.",
    "video": _IDENTITY
    + " \n- You must answer the question strictly according to the content of the video given by "
    "the user, and it is strictly forbidden to answer the question without the content of the "
    "video. Please note that you are seeing the video, not the image.",
}

ASSISTANT_HEADER = f"{IM_START}assistant\n"
REPLY_END = f"{IM_END}\n"


class ReplyState(enum.Enum):
    """Leading state token of a VITA-1.5 reply."""

    SPOKEN_ANSWER = "☞"
    NOT_ADDRESSED = "☟"
    TEXT_ANSWER = "☜"


def parse_reply_state(text: str) -> tuple[ReplyState | None, str]:
    """Split a reply (or its beginning) into its leading state token and the remaining text.

    Leading whitespace before the token and one space after it are dropped.
    """
    stripped = text.lstrip()
    for state in ReplyState:
        if stripped.startswith(state.value):
            rest = stripped[len(state.value):]
            return state, rest[1:] if rest.startswith(" ") else rest
    return None, text


def system_block(system_prompt: str) -> str:
    """The ChatML system message that opens a conversation."""
    return f"{IM_START}system\n{system_prompt}{REPLY_END}"


def user_block(content: str) -> str:
    """A user message followed by the header the assistant's reply continues."""
    return f"{IM_START}user\n{content}{REPLY_END}{ASSISTANT_HEADER}"


def user_content(num_images: int = 0, audio: bool = False, text: str | None = None) -> str:
    """User message body: image/frame placeholders on their own line, then audio, then text."""
    content = IMAGE_PLACEHOLDER * num_images + ("\n" if num_images else "")
    content += AUDIO_PLACEHOLDER if audio else ""
    return content + (text or "")


@dataclass
class Conversation:
    """Where a conversation stands: which text the next turn must start with.

    `system_prompt` is the session's own; None means VITA-1.5's, picked by the first turn as
    upstream's web demo picks it per request: the video prompt when the turn brings camera frames,
    else the audio one. The cache starts with it, so it stays for the whole conversation
    (`opening_prompt`): after a first turn without frames, later turns with frames keep the audio
    prompt, and after a first turn with frames, later turns without keep the video one (upstream
    rebuilds its whole prompt every request; here the earlier turns' media are gone from all but
    the cache, so their keys and values cannot be recomputed under another system prompt).
    """

    system_prompt: str | None = None
    turns: int = 0
    reply_closed: bool = False  # the cache holds the last reply's `<|im_end|>`
    opening_prompt: str | None = None  # the system prompt the cache starts with, set by the first turn
    _before_last_turn: tuple[int, bool] = field(default=(0, False), repr=False)

    def next_turn_text(self, content: str, video: bool = False) -> str:
        """Prompt text of the next user turn (only what the cache lacks); records the turn.

        `video`: the turn brings camera frames (on a first turn, picks VITA's video prompt).
        """
        if self.turns == 0:
            self.opening_prompt = self.system_prompt
            if self.opening_prompt is None:
                self.opening_prompt = SYSTEM_PROMPTS["video" if video else "audio"]
            prefix = system_block(self.opening_prompt)
        elif self.reply_closed:
            prefix = "\n"
        else:
            prefix = REPLY_END
        self._before_last_turn = (self.turns, self.reply_closed)
        self.turns += 1
        self.reply_closed = False
        return prefix + user_block(content)

    def end_reply(self, closed: bool) -> None:
        """Record how the reply to the last turn ended: with `<|im_end|>` (closed) or cut short."""
        self.reply_closed = closed

    def discard_turn(self) -> None:
        """Forget the last turn: it never reached the cache (cancelled before its first token)."""
        self.turns, self.reply_closed = self._before_last_turn
        if self.turns == 0:
            self.opening_prompt = None
