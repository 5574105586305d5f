"""Incremental detokenizer: a reply streamed id by id equals its full decode, with no U+FFFD sent early.

The tokenizer is a Qwen2-style byte-level BPE (Qwen2 split regex, byte-level pre-tokenizer and
decoder) trained here on Chinese and emoji text with few merges, so that many characters span
several tokens, as rare characters do in Qwen2's real vocabulary.
"""

import random

import pytest

from vita.random_tokenizer import build_tiny_tokenizer
from vita.tokenizer import VitaTokenizer

TRAINING_TEXT = [
    "你好！今天天气怎么样？今天天气晴朗，气温二十五度，适合出去散步。😀🎉",
    "我是一个开源的多模态大语言模型，我可以听、看，也可以和你对话。👍🏽",
    "图片里有一个红色的正方形和一个绿色的圆形，背景是蓝色的。🌈☀️",
    "好的，谢谢你。再见！明天见。我们一起学习，一起进步。👨‍👩‍👧 🐼",
]
# Seen and unseen characters, emoji with a skin tone, a ZWJ family, a variation selector, 4-byte CJK.
REPLY = "☞ 你好！北京明天多云转晴，最高气温二十八度🌤️，记得带伞☂。熊猫🐼很可爱👍🏽👨‍👩‍👧 𠀋𠀀 OK!"


@pytest.fixture(scope="module")
def tokenizer() -> VitaTokenizer:
    return VitaTokenizer(build_tiny_tokenizer(TRAINING_TEXT, vocab_size=323))  # 320 learned + 3 special


def stream(tokenizer: VitaTokenizer, ids: list[int]) -> tuple[list[str], str]:
    """Deltas of each push, and the flush."""
    decoder = tokenizer.stream_decoder()
    return [decoder.push(token_id) for token_id in ids], decoder.flush()


def test_characters_really_split_across_tokens(tokenizer: VitaTokenizer) -> None:
    ids = tokenizer.encode(REPLY)
    split = [tokenizer.decode([token_id]) for token_id in ids if "\ufffd" in tokenizer.decode([token_id])]
    assert len(split) > 10
    merged = [token_id for token_id in ids if len(tokenizer.decode([token_id]).encode()) > 3]
    assert merged  # and some merges span a whole character or more


def test_streamed_reply_equals_full_decode_without_replacement_characters(tokenizer: VitaTokenizer) -> None:
    ids = tokenizer.encode(REPLY) + [tokenizer.im_end_id]
    deltas, tail = stream(tokenizer, ids)
    assert "".join(deltas) + tail == tokenizer.decode(ids) == REPLY
    assert not any("\ufffd" in delta for delta in [*deltas, tail])


def test_text_is_released_as_soon_as_its_characters_are_complete(tokenizer: VitaTokenizer) -> None:
    """After each id, the text sent is the decode so far without its incomplete last character."""
    ids = tokenizer.encode(REPLY)
    decoder = tokenizer.stream_decoder()
    sent = ""
    for count, token_id in enumerate(ids, start=1):
        sent += decoder.push(token_id)
        assert sent == tokenizer.decode(ids[:count]).removesuffix("\ufffd")


def test_incomplete_tail_is_flushed_as_the_full_decode_has_it(tokenizer: VitaTokenizer) -> None:
    """A reply cut inside a character (max_new_tokens) ends with U+FFFD, sent only by the flush."""
    ids = tokenizer.encode(REPLY)
    cut = next(n for n in range(1, len(ids)) if tokenizer.decode(ids[:n]).endswith("\ufffd"))
    deltas, tail = stream(tokenizer, ids[:cut])
    assert not any("\ufffd" in delta for delta in deltas)
    assert tail.endswith("\ufffd")
    assert "".join(deltas) + tail == tokenizer.decode(ids[:cut])


@pytest.mark.parametrize("seed", range(20))
def test_random_ids_stream_to_their_full_decode(tokenizer: VitaTokenizer, seed: int) -> None:
    """Any id sequence (invalid byte runs, special ids) streams to exactly its full decode."""
    rng = random.Random(seed)
    ids = [rng.randrange(tokenizer.vocab_size) for _ in range(rng.randrange(1, 60))]
    deltas, tail = stream(tokenizer, ids)
    assert "".join(deltas) + tail == tokenizer.decode(ids)
