"""VITA's system prompt follows the first turn's media (video prompt with camera frames, as upstream's
web demo), stays for the whole conversation, and never overrides a session's own prompt."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from PIL import Image

from vita.assistant import VitaAssistant
from vita.engine import Engine
from vita.prompt import SYSTEM_PROMPTS, Conversation, system_block, user_content

AUDIO, VIDEO = SYSTEM_PROMPTS["audio"], SYSTEM_PROMPTS["video"]
PIRATE = "You are a pirate."


@pytest.fixture(scope="module")
def assistant(tiny_checkpoint: Path) -> VitaAssistant:
    return VitaAssistant.load(tiny_checkpoint)


@pytest.fixture
def engine(assistant: VitaAssistant) -> Engine:
    return assistant.make_engine(max_sessions=2, max_len=2048)


def frames() -> list[Image.Image]:
    return [Image.new("RGB", (320, 240), color) for color in ("red", "blue")]


@pytest.mark.parametrize(
    ("session_prompt", "video", "opens_with"),
    [(None, False, AUDIO), (None, True, VIDEO), (PIRATE, True, PIRATE), (PIRATE, False, PIRATE)],
)
def test_the_first_turn_picks_the_system_prompt(session_prompt: str | None, video: bool, opens_with: str) -> None:
    conversation = Conversation(session_prompt)
    text = conversation.next_turn_text(user_content(4 if video else 0, audio=True), video=video)
    assert text.startswith(system_block(opens_with))
    assert (conversation.opening_prompt, conversation.system_prompt) == (opens_with, session_prompt)


@pytest.mark.parametrize(("first_video", "opens_with"), [(False, AUDIO), (True, VIDEO)])
def test_later_turns_keep_the_opening_prompt_whatever_they_bring(first_video: bool, opens_with: str) -> None:
    conversation = Conversation()
    conversation.next_turn_text(user_content(4 if first_video else 0, audio=True), video=first_video)
    conversation.end_reply(True)
    later = conversation.next_turn_text(user_content(0 if first_video else 4, audio=True), video=not first_video)
    assert later.startswith("\n<|im_start|>user\n")
    assert AUDIO not in later  # no second system block: the cache already starts with one
    assert conversation.opening_prompt == opens_with


def test_a_dropped_first_turn_lets_the_next_first_turn_pick_again() -> None:
    conversation = Conversation()
    conversation.next_turn_text(user_content(4, audio=True), video=True)
    conversation.discard_turn()
    assert conversation.opening_prompt is None
    assert conversation.next_turn_text(user_content(audio=True)).startswith(system_block(AUDIO))


def test_frames_on_the_first_turn_open_with_the_video_prefix(assistant: VitaAssistant, engine: Engine) -> None:
    media = assistant.encode_media(frames=frames())
    conversation = assistant.new_conversation()
    embeds, prefix = assistant.engine_turn(engine, conversation, media, "what is this?")
    assert prefix == VIDEO
    system = assistant.model.splice_embeddings(assistant.tokenizer.encode(system_block(VIDEO)))
    assert engine.prefix_length(VIDEO) == system.shape[0]
    full = assistant.turn_embeddings(assistant.new_conversation(), frames=frames(), text="what is this?")
    torch.testing.assert_close(full, torch.cat([system, embeds]), rtol=0, atol=0)

    later = assistant.engine_turn(engine, conversation, assistant.encode_media(frames=frames()[:1]), "and now?")
    assert later.prefix is None and conversation.opening_prompt == VIDEO


def test_frames_after_a_first_turn_without_them_keep_the_audio_prefix(
    assistant: VitaAssistant, engine: Engine
) -> None:
    conversation = assistant.new_conversation()
    assert assistant.engine_turn(engine, conversation, text="hello").prefix == AUDIO
    assistant.end_reply(conversation, [assistant.tokenizer.im_end_id])
    embeds, prefix = assistant.engine_turn(engine, conversation, assistant.encode_media(frames=frames()), "and this?")
    assert prefix is None and conversation.opening_prompt == AUDIO
    assert engine.prefix_length(VIDEO) is None
    restarted = assistant.new_conversation(conversation.system_prompt)  # what a full context restarts with
    assert assistant.engine_turn(engine, restarted, assistant.encode_media(frames=frames()), "hi").prefix == VIDEO
