"""Tokenizer, prompt, splicing and generation on the tiny checkpoint, end to end."""

from __future__ import annotations

from pathlib import Path

import pytest
from transformers import AutoTokenizer

from vita.prompt import (
    SYSTEM_PROMPTS,
    Conversation,
    ReplyState,
    parse_reply_state,
    user_content,
)
from vita.tokenizer import AUDIO_TOKEN_INDEX, IMAGE_TOKEN_INDEX, VitaTokenizer

CHATML_TEMPLATE = (
    "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
MIXED_TEXT = "☞ Hello 你好，今天天气怎么样？ 🙂 ok ☜ ☟ done."


@pytest.fixture(scope="module")
def tokenizer(tiny_checkpoint: Path) -> VitaTokenizer:
    return VitaTokenizer.from_dir(tiny_checkpoint)


def test_tokenizer_matches_transformers_on_chat_text(tokenizer: VitaTokenizer, tiny_checkpoint: Path) -> None:
    reference = AutoTokenizer.from_pretrained(tiny_checkpoint)
    text = f"<|im_start|>user\n{MIXED_TEXT}<|im_end|>\n<|im_start|>assistant\n"
    assert tokenizer.encode(text) == reference(text).input_ids
    assert tokenizer.im_end_id == reference.convert_tokens_to_ids("<|im_end|>")
    assert tokenizer.decode(tokenizer.encode(MIXED_TEXT)) == MIXED_TEXT


def test_placeholders_become_negative_ids_between_text_chunks(tokenizer: VitaTokenizer) -> None:
    chunks = ["<|im_start|>user\n", "\nplease look ", "", " and listen<|im_end|>\n"]
    placeholders = ["<image>", "<audio>", "<image>"]
    text = chunks[0] + "".join(p + c for p, c in zip(placeholders, chunks[1:]))
    ids = tokenizer.encode_with_placeholders(text)
    negative = {IMAGE_TOKEN_INDEX: "<image>", AUDIO_TOKEN_INDEX: "<audio>"}
    assert [negative[i] for i in ids if i < 0] == placeholders
    decoded_chunks, current = [], []
    for token_id in ids:
        if token_id < 0:
            decoded_chunks.append(tokenizer.decode(current, skip_special_tokens=False))
            current = []
        else:
            current.append(token_id)
    decoded_chunks.append(tokenizer.decode(current, skip_special_tokens=False))
    assert decoded_chunks == chunks


def test_stream_decoder_yields_clean_deltas(tokenizer: VitaTokenizer) -> None:
    ids = tokenizer.encode(MIXED_TEXT) + [tokenizer.im_end_id]
    decoder = tokenizer.stream_decoder()
    deltas = [decoder.push(token_id) for token_id in ids]
    deltas.append(decoder.flush())
    assert "".join(deltas) == MIXED_TEXT
    assert not any("\ufffd" in delta for delta in deltas)
    assert sum(1 for delta in deltas if delta) > len(MIXED_TEXT.split()) // 2  # streamed, not all at once
    multibyte_pieces = [tokenizer.decode([i]) for i in ids]
    assert any("\ufffd" in piece for piece in multibyte_pieces)  # the text does split characters


def test_state_tokens_are_encodable(tokenizer: VitaTokenizer) -> None:
    for state in ReplyState:
        assert tokenizer.decode(tokenizer.encode(state.value + " hi")) == state.value + " hi"


def test_special_tokens_follow_the_learned_vocabulary(tokenizer: VitaTokenizer) -> None:
    specials = sorted([tokenizer.end_of_text_id, tokenizer.im_start_id, tokenizer.im_end_id])
    assert specials == list(range(tokenizer.vocab_size - 3, tokenizer.vocab_size))
    assert 500 < tokenizer.vocab_size <= 1000


def test_conversation_turns_concatenate_to_the_chatml_template(tiny_checkpoint: Path) -> None:
    reference = AutoTokenizer.from_pretrained(tiny_checkpoint)
    conversation = Conversation(SYSTEM_PROMPTS["video"])
    first, second = user_content(2, audio=True), user_content(text="and now?")
    reply = "☞ I see two frames."
    streamed = conversation.next_turn_text(first) + reply + conversation.next_turn_text(second)
    messages = [
        {"role": "system", "content": SYSTEM_PROMPTS["video"]},
        {"role": "user", "content": first},
        {"role": "assistant", "content": reply},
        {"role": "user", "content": second},
    ]
    expected = reference.apply_chat_template(
        messages, chat_template=CHATML_TEMPLATE, tokenize=False, add_generation_prompt=True
    )
    assert streamed == expected


def test_user_content_orders_frames_audio_text_like_upstream() -> None:
    assert user_content(3, audio=True) == "<image><image><image>\n<audio>"
    assert user_content(audio=True) == "<audio>"
    assert user_content(1, text="what is it?") == "<image>\nwhat is it?"


def test_system_prompts_differ_only_in_their_modality_sentence() -> None:
    audio, image, video = (SYSTEM_PROMPTS[key] for key in ("audio", "image", "video"))
    assert image.startswith(audio) and video.startswith(audio)
    assert image[len(audio):].replace("image", "X").replace("video", "Y") == \
        video[len(audio):].replace("video", "X").replace("image", "Y")


@pytest.mark.parametrize(
    ("text", "state", "rest"),
    [
        ("☞ Hello there", ReplyState.SPOKEN_ANSWER, "Hello there"),
        ("☞Hello", ReplyState.SPOKEN_ANSWER, "Hello"),
        ("☟", ReplyState.NOT_ADDRESSED, ""),
        (" ☜ typed answer", ReplyState.TEXT_ANSWER, "typed answer"),
        ("no state", None, "no state"),
        ("", None, ""),
    ],
)
def test_parse_reply_state(text: str, state: ReplyState | None, rest: str) -> None:
    assert parse_reply_state(text) == (state, rest)
    assert (state or ReplyState.SPOKEN_ANSWER).should_speak == (state is not ReplyState.NOT_ADDRESSED)
