"""Tokenizer, prompt, splicing and generation on the tiny checkpoint, end to end."""

from __future__ import annotations

import asyncio
from pathlib import Path

import numpy as np
import pytest
import soundfile
import torch
from PIL import Image, ImageDraw
from transformers import AutoTokenizer

from tts.synthesizer import Synthesizer
from vita.assistant import VitaAssistant
from vita.engine import Engine
from vita.generate import generate_ids, generate_text
from vita.prompt import (
    SYSTEM_PROMPTS,
    Conversation,
    ReplyState,
    parse_reply_state,
    system_block,
    user_content,
)
from vita.reply_text import ReplyTextStream
from vita.sampling import SamplingParams
from vita.tokenizer import AUDIO_TOKEN_INDEX, IMAGE_TOKEN_INDEX, VitaTokenizer
from shared_data import AUDIO

HELLO_WAV = AUDIO / "en_hello.wav"
REPLY_TOKENS = 10
GREEDY = SamplingParams(temperature=0.0, max_tokens=REPLY_TOKENS)

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


@pytest.mark.parametrize("closed", [True, False])
def test_conversation_turns_concatenate_to_the_chatml_template(tiny_checkpoint: Path, closed: bool) -> None:
    reference = AutoTokenizer.from_pretrained(tiny_checkpoint)
    conversation = Conversation(SYSTEM_PROMPTS["video"])
    first, second, third = user_content(2, audio=True), user_content(text="and now?"), user_content(audio=True)
    reply = "☞ I see two frames."
    cache_text = conversation.next_turn_text(first) + reply + ("<|im_end|>" if closed else "")
    conversation.end_reply(closed)
    cache_text += conversation.next_turn_text(second) + "☜ Fine.<|im_end|>"
    conversation.end_reply(True)
    cache_text += conversation.next_turn_text(third)
    messages = [
        {"role": "system", "content": SYSTEM_PROMPTS["video"]},
        {"role": "user", "content": first},
        {"role": "assistant", "content": reply},
        {"role": "user", "content": second},
        {"role": "assistant", "content": "☜ Fine."},
        {"role": "user", "content": third},
    ]
    expected = reference.apply_chat_template(
        messages, chat_template=CHATML_TEMPLATE, tokenize=False, add_generation_prompt=True
    )
    assert cache_text == expected


def test_a_turn_dropped_before_its_first_token_is_forgotten(assistant: VitaAssistant) -> None:
    fresh, dropped = assistant.new_conversation(), assistant.new_conversation()
    expected_first = fresh.next_turn_text(user_content(text="hi"))
    dropped.next_turn_text(user_content(text="cancelled"))
    assistant.end_reply(dropped, [])
    assert dropped.next_turn_text(user_content(text="hi")) == expected_first
    assistant.end_reply(dropped, [assistant.tokenizer.encode("ok")[0], assistant.tokenizer.im_end_id])
    dropped.next_turn_text(user_content(text="cancelled too"))
    assistant.end_reply(dropped, [])
    assert dropped.next_turn_text(user_content(text="again")).startswith("\n<|im_start|>user\nagain")


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


def test_reply_text_stream_splits_off_the_state_token(tokenizer: VitaTokenizer) -> None:
    cases = [
        ("☞ Hello 你好", ReplyState.SPOKEN_ANSWER, "Hello 你好"),
        ("☟", ReplyState.NOT_ADDRESSED, ""),
        ("☜今天", ReplyState.TEXT_ANSWER, "今天"),
        ("plain reply", None, "plain reply"),
    ]
    for text, state, rest in cases:
        stream = ReplyTextStream(tokenizer)
        ids = tokenizer.encode(text) + [tokenizer.im_end_id]
        deltas = [stream.push(token_id) for token_id in ids] + [stream.flush()]
        assert "".join(deltas) == rest and stream.state is state and stream.closed
        assert not any(state_token.value in delta for delta in deltas for state_token in ReplyState)


# ----------------------------------------------------------------- model end to end


@pytest.fixture(scope="module")
def assistant(tiny_checkpoint: Path) -> VitaAssistant:
    return VitaAssistant.load(tiny_checkpoint)


@pytest.fixture(scope="module")
def hello_wave() -> np.ndarray:
    wave, rate = soundfile.read(HELLO_WAV, dtype="float32")
    assert rate == 16000
    return wave


def drawn_image() -> Image.Image:
    image = Image.new("RGB", (640, 480), (30, 60, 200))
    draw = ImageDraw.Draw(image)
    draw.rectangle((100, 100, 300, 300), fill=(220, 20, 20))
    draw.ellipse((380, 200, 560, 380), fill=(20, 200, 40))
    return image


def no_cache_greedy(model, embeds: torch.Tensor, max_tokens: int, stop_ids) -> list[int]:
    """Recompute the whole sequence for every token: no KV cache involved."""
    ids = []
    with torch.inference_mode():
        for _ in range(max_tokens):
            hidden = model.model.forward_reference(embeds[None])
            token_id = int(model.lm_head(hidden[0, -1]).argmax())
            ids.append(token_id)
            if token_id in stop_ids:
                break
            embeds = torch.cat([embeds, model.model.embed_tokens(torch.tensor([token_id]))])
    return ids


TURNS = {
    "audio+image": lambda wave: {"audio_16k": wave, "frames": [drawn_image()]},
    "audio": lambda wave: {"audio_16k": wave},
    "text": lambda wave: {"text": "What is the weather like today?"},
}


@pytest.mark.parametrize("kind", list(TURNS))
def test_greedy_reply_is_reproducible_and_matches_a_no_cache_recompute(
    assistant: VitaAssistant, tiny_checkpoint: Path, hello_wave: np.ndarray, kind: str
) -> None:
    turn = TURNS[kind](hello_wave)
    embeds = assistant.turn_embeddings(assistant.new_conversation(), **turn)
    ids = list(generate_ids(assistant.model, embeds, GREEDY, assistant.tokenizer.stop_ids))
    assert len(ids) == REPLY_TOKENS or ids[-1] in assistant.tokenizer.stop_ids
    assert ids == no_cache_greedy(assistant.model, embeds, REPLY_TOKENS, assistant.tokenizer.stop_ids)

    second_load = VitaAssistant.load(tiny_checkpoint)
    embeds_again = second_load.turn_embeddings(second_load.new_conversation(), **turn)
    torch.testing.assert_close(embeds_again, embeds, rtol=0, atol=0)
    assert list(generate_ids(second_load.model, embeds_again, GREEDY, second_load.tokenizer.stop_ids)) == ids


def test_turn_embeddings_token_count(assistant: VitaAssistant, hello_wave: np.ndarray) -> None:
    frames = [drawn_image()] * 6
    conversation = assistant.new_conversation()
    embeds = assistant.turn_embeddings(conversation, audio_16k=hello_wave, frames=frames)
    text_ids = assistant.tokenizer.encode(
        Conversation(SYSTEM_PROMPTS["video"]).next_turn_text("\n")
    )
    audio_tokens = assistant.model.encode_audio(hello_wave).shape[0]
    assert embeds.shape == (len(text_ids) + 4 * 256 + audio_tokens, assistant.config.llm.hidden_size)
    with pytest.raises(ValueError, match="needs audio, frames or text"):
        assistant.turn_embeddings(conversation)


def test_generate_text_streams_the_decoded_reply(assistant: VitaAssistant, hello_wave: np.ndarray) -> None:
    embeds = assistant.turn_embeddings(assistant.new_conversation(), audio_16k=hello_wave)
    stream = ReplyTextStream(assistant.tokenizer)
    text = "".join(generate_text(assistant.model, stream, embeds, GREEDY))
    ids = list(generate_ids(assistant.model, embeds, GREEDY, assistant.tokenizer.stop_ids))
    assert stream.token_ids == ids
    state, rest = parse_reply_state(assistant.tokenizer.decode(ids))
    assert (stream.state, text) == (state, rest)


def test_sampled_ids_stay_inside_the_tokenizer_vocabulary(assistant: VitaAssistant) -> None:
    assert assistant.model.lm_head.weight.shape[0] == assistant.tokenizer.vocab_size
    embeds = assistant.turn_embeddings(assistant.new_conversation(), text="hi")
    params = SamplingParams(temperature=5.0, max_tokens=100)
    ids = list(generate_ids(assistant.model, embeds, params, (), generator=torch.Generator().manual_seed(0)))
    assert max(ids) < assistant.tokenizer.vocab_size and len(set(ids)) > 30


def test_speech_embeddings_are_token_embeddings_reshaped_for_the_tts(
    assistant: VitaAssistant, tiny_checkpoint: Path
) -> None:
    text = "Hello, 你好!"
    embeddings = assistant.speech_embeddings(text)
    rows = assistant.model.model.embed_tokens.weight[assistant.tokenizer.encode(text)]
    assert embeddings.shape[1] == assistant.tts_dim == Synthesizer.load(tiny_checkpoint / "vita_tts_ckpt").embedding_dim
    torch.testing.assert_close(embeddings.flatten(), rows.flatten(), rtol=0, atol=0)


async def test_engine_conversation_matches_a_no_cache_recompute(
    assistant: VitaAssistant, hello_wave: np.ndarray
) -> None:
    """Two turns through the engine, once from the system prompt's prefix and once prefilling the
    whole first turn; the cache then holds turn 1, every reply id, turn 2."""
    engine = assistant.make_engine(max_sessions=2, max_len=1024)
    from_prefix, full = assistant.new_conversation(), assistant.new_conversation()
    stop_ids = assistant.tokenizer.stop_ids
    history = None
    for turn in ({"text": "Hello there"}, {"audio_16k": hello_wave}):
        media = assistant.encode_media(audio_16k=turn.get("audio_16k"))
        embeds, prefix = assistant.engine_turn(engine, from_prefix, media, turn.get("text"))
        assert prefix == (SYSTEM_PROMPTS["audio"] if history is None else None)
        full_embeds = assistant.turn_embeddings(full, **turn)
        reply, full_reply = await asyncio.gather(
            collect(engine, "prefix", embeds, prefix), collect(engine, "full", full_embeds)
        )
        history = full_embeds if history is None else torch.cat([history, full_embeds])
        assert reply == full_reply == no_cache_greedy(assistant.model, history, REPLY_TOKENS, stop_ids)
        assistant.end_reply(from_prefix, reply)
        assistant.end_reply(full, full_reply)
        with torch.inference_mode():
            history = torch.cat([history, assistant.model.model.embed_tokens(torch.tensor(reply))])
    await engine.close()


async def collect(engine: Engine, session_id: str, embeds: torch.Tensor, prefix: str | None = None) -> list[int]:
    return [token async for token in engine.generate(session_id, embeds, GREEDY, prefix)]


async def test_each_system_prompt_is_prefilled_once_per_engine(
    assistant: VitaAssistant, tiny_checkpoint: Path
) -> None:
    reference_tokenizer = AutoTokenizer.from_pretrained(tiny_checkpoint)
    custom = "You are a pirate. Answer in rhymes."
    engine = assistant.make_engine(max_sessions=3, max_len=1024)
    stop_ids = assistant.tokenizer.stop_ids
    for session_id, system_prompt in (("a", None), ("pirate", custom), ("b", None)):
        conversation = assistant.new_conversation(system_prompt)
        known = engine.prefix_length(system_prompt or SYSTEM_PROMPTS["audio"]) is not None
        before = engine.prefilled_tokens
        embeds, prefix = assistant.engine_turn(engine, conversation, text="hi")
        reply = await collect(engine, session_id, embeds, prefix)

        system_tokens = len(reference_tokenizer(system_block(conversation.opening_prompt)).input_ids)
        assert engine.prefix_length(prefix) == system_tokens
        assert engine.prefilled_tokens - before == (0 if known else system_tokens) + embeds.shape[0]
        full = assistant.turn_embeddings(assistant.new_conversation(system_prompt), text="hi")
        assert full.shape[0] == system_tokens + embeds.shape[0]
        torch.testing.assert_close(full[system_tokens:], embeds, rtol=0, atol=0)
        assert reply == no_cache_greedy(assistant.model, full, REPLY_TOKENS, stop_ids)
    assert [engine.prefix_length(key) is not None for key in (SYSTEM_PROMPTS["audio"], custom)] == [True, True]
    await engine.close()


async def test_reset_and_dropped_first_turns_start_again_from_the_prefix(assistant: VitaAssistant) -> None:
    engine = assistant.make_engine(max_sessions=1, max_len=1024)
    stop_ids = assistant.tokenizer.stop_ids
    conversation = assistant.new_conversation()
    embeds, prefix = assistant.engine_turn(engine, conversation, text="this turn is dropped")
    stream = engine.generate("s", embeds, GREEDY, prefix)
    first_token = asyncio.ensure_future(anext(stream))
    await asyncio.sleep(0)
    engine.cancel("s")
    with pytest.raises(StopAsyncIteration):
        await first_token
    assistant.end_reply(conversation, [])

    for system_prompt in (None, "You are a pirate."):  # the dropped turn's retry, then a reset
        if system_prompt is not None:
            engine.end_session("s")
            conversation = assistant.new_conversation(system_prompt)
        embeds, prefix = assistant.engine_turn(engine, conversation, text="Hello there")
        assert prefix == (system_prompt or SYSTEM_PROMPTS["audio"])
        reply = await collect(engine, "s", embeds, prefix)
        full = assistant.turn_embeddings(assistant.new_conversation(system_prompt), text="Hello there")
        assert reply == no_cache_greedy(assistant.model, full, REPLY_TOKENS, stop_ids)
        assistant.end_reply(conversation, reply)
    await engine.close()
