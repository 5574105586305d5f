"""Thin wrapper over a Qwen2 `tokenizers.Tokenizer` (tokenizer.json) with VITA placeholders.

`<image>` and `<audio>` in a prompt become the placeholder ids -200 and -500 that
`VitaQwen2ForCausalLM.splice_embeddings` replaces with encoder features.
"""

from __future__ import annotations

import re
from pathlib import Path

from tokenizers import Tokenizer

IMAGE_TOKEN_INDEX = -200
AUDIO_TOKEN_INDEX = -500
IMAGE_PLACEHOLDER = "<image>"
AUDIO_PLACEHOLDER = "<audio>"

IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
END_OF_TEXT = "<|endoftext|>"

_PLACEHOLDER_IDS = {IMAGE_PLACEHOLDER: IMAGE_TOKEN_INDEX, AUDIO_PLACEHOLDER: AUDIO_TOKEN_INDEX}
_PLACEHOLDER_SPLIT = re.compile(f"({re.escape(IMAGE_PLACEHOLDER)}|{re.escape(AUDIO_PLACEHOLDER)})")
_REPLACEMENT_CHAR = "\ufffd"


class VitaTokenizer:
    """Qwen2 byte-level BPE tokenizer plus the special ids VITA needs."""

    def __init__(self, tokenizer: Tokenizer):
        self.tokenizer = tokenizer
        self.im_start_id = self._special_id(IM_START)
        self.im_end_id = self._special_id(IM_END)
        self.end_of_text_id = self._special_id(END_OF_TEXT)

    @classmethod
    def from_dir(cls, checkpoint_dir: Path) -> "VitaTokenizer":
        """Load `tokenizer.json` from a checkpoint folder."""
        path = Path(checkpoint_dir) / "tokenizer.json"
        if not path.is_file():
            raise FileNotFoundError(f"tokenizer file not found: {path}")
        return cls(Tokenizer.from_file(str(path)))

    def _special_id(self, token: str) -> int:
        token_id = self.tokenizer.token_to_id(token)
        if token_id is None:
            raise ValueError(f"tokenizer has no special token {token!r}")
        return token_id

    @property
    def vocab_size(self) -> int:
        """Number of ids the tokenizer can decode (base vocabulary plus added tokens)."""
        return self.tokenizer.get_vocab_size(with_added_tokens=True)

    @property
    def stop_ids(self) -> tuple[int, ...]:
        """Ids that end an assistant reply."""
        return (self.im_end_id, self.end_of_text_id)

    def encode(self, text: str) -> list[int]:
        """Token ids of `text`; special tokens written in the text are recognised, no BOS is added."""
        return self.tokenizer.encode(text, add_special_tokens=False).ids

    def encode_with_placeholders(self, text: str) -> list[int]:
        """Token ids of `text` with each `<image>` -> -200 and each `<audio>` -> -500."""
        ids: list[int] = []
        for chunk in _PLACEHOLDER_SPLIT.split(text):
            if chunk in _PLACEHOLDER_IDS:
                ids.append(_PLACEHOLDER_IDS[chunk])
            elif chunk:
                ids.extend(self.encode(chunk))
        return ids

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        """Text of `ids` (special tokens dropped unless `skip_special_tokens` is False)."""
        return self.tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)

    def stream_decoder(self) -> "StreamDecoder":
        """A fresh incremental decoder for one stream of ids."""
        return StreamDecoder(self)


class StreamDecoder:
    """Turns a stream of token ids into clean text deltas.

    A byte-level token may end in the middle of a UTF-8 character, and may also complete the
    character before it: each push returns every character its bytes complete and holds back
    an incomplete last one, so no delta carries a replacement character that the full decode
    would not have. Special tokens are skipped.
    """

    def __init__(self, tokenizer: VitaTokenizer):
        self.tokenizer = tokenizer
        self.ids: list[int] = []  # ids since the last token that ended on a character boundary
        self.sent = 0  # characters of their decode already returned

    def push(self, token_id: int) -> str:
        """Add one id and return the characters it completes ('' while none is complete)."""
        self.ids.append(token_id)
        text = self.tokenizer.decode(self.ids)
        if text.endswith(_REPLACEMENT_CHAR):  # maybe an incomplete character: hold it back
            delta = text[self.sent:-1]
            self.sent += len(delta)
        else:
            delta = text[self.sent:]
            self.ids, self.sent = [], 0
        return delta

    def flush(self) -> str:
        """The text held back at the end of the stream; an incomplete last character comes out as
        U+FFFD, as in the full decode."""
        delta = self.tokenizer.decode(self.ids)[self.sent:]
        self.ids, self.sent = [], 0
        return delta
