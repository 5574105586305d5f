"""The turn pipeline (`vita.voice_turn`) driven directly on the test's event loop: tiny checkpoint,
real engine, real speech service, no websocket and no worker thread.

Replies are greedy, so a chat's text can be compared with the plain single-stream reference
(`vita.generate`) or with another chat given the same turns.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from shared_data import AUDIO
from test_not_addressed import REPLY_WORDS, not_addressed_checkpoint  # noqa: F401 (a fixture)
from tts.sentences import SentenceChunker
from tts.service import SpeechHandle, SpeechService
from tts.synthesizer import Synthesizer
from vita.assistant import VitaAssistant
from vita.chat import Chat
from vita.generate import generate_ids, generate_text
from vita.media_encoder import MediaRequest, TurnMedia
from vita.reply_text import ReplyTextStream
from vita.sampling import SamplingParams
from vita.turn_outputs import (AudioSegment, HistoryCleared, OutputCallback, TextDelta, TurnFailed, TurnFinished,
                               TurnOutput)
from vita.voice_turn import TurnInput, VoiceTurn

GREEDY = SamplingParams(temperature=0.0, max_tokens=24)
QUIET_S = 1.0  # how long a cancelled turn is watched for stray outputs


@pytest.fixture(scope="module")
def assistant(tiny_checkpoint: Path) -> VitaAssistant:
    return VitaAssistant.load(tiny_checkpoint)


@pytest.fixture(scope="module")
def speech(tiny_checkpoint: Path):
    service = SpeechService(Synthesizer.load(tiny_checkpoint / "vita_tts_ckpt"), max_streams=4)
    service.start()
    yield service
    service.close()


def clip(name: str) -> np.ndarray:
    """A speech clip as the pipeline takes it: 16 kHz mono float32 in [-1, 1]."""
    audio, rate = sf.read(AUDIO / f"{name}.wav", dtype="float32")
    assert rate == 16_000
    return audio


def encoder(assistant: VitaAssistant):
    """The pipeline's media encoder: the assistant's, in a thread."""
    return lambda request: asyncio.to_thread(assistant.encode_media, request.audio_16k, request.frames)


def voice_turn(chat: Chat, speech: SpeechService, audio: np.ndarray | None, emit: OutputCallback, **options) -> VoiceTurn:
    """A greedy turn that speaks a ☟ reply too (the tiny checkpoint's replies are random)."""
    turn = TurnInput(audio, **{"params": GREEDY, "respect_not_addressed": False, **options})
    return VoiceTurn(chat, turn, encode_media=encoder(chat.assistant), speech=speech, emit=emit)


async def answer(chat: Chat, speech: SpeechService, audio: np.ndarray | None, **options) -> tuple[list[TurnOutput], VoiceTurn]:
    """Run one turn to its end; its outputs and the turn."""
    outputs: list[TurnOutput] = []
    turn = voice_turn(chat, speech, audio, outputs.append, **options)
    await turn.run()
    return outputs, turn


def reply_text(outputs: list[TurnOutput]) -> str:
    """The text of a finished turn, checked against its deltas."""
    finished = outputs[-1]
    assert isinstance(finished, TurnFinished), outputs
    assert "".join(o.text for o in outputs if isinstance(o, TextDelta)) == finished.text
    return finished.text


def reference_ids(assistant: VitaAssistant, audio: np.ndarray, system_prompt: str | None = None) -> list[int]:
    """Greedy reply ids of plain single-stream generation to a chat's first turn."""
    embeds = assistant.turn_embeddings(assistant.new_conversation(system_prompt), audio_16k=audio)
    return list(generate_ids(assistant.model, embeds, GREEDY, assistant.tokenizer.stop_ids))


def reference_text(assistant: VitaAssistant, audio: np.ndarray, system_prompt: str | None = None) -> str:
    embeds = assistant.turn_embeddings(assistant.new_conversation(system_prompt), audio_16k=audio)
    return "".join(generate_text(assistant.model, ReplyTextStream(assistant.tokenizer), embeds, GREEDY))


async def cancel_at_first(turn_output: type, make_turn) -> tuple[list[TurnOutput], asyncio.Task[None]]:
    """Run the turn `make_turn(emit)` and cancel its task as it emits its first `turn_output`;
    returns once the task has ended, with the list of outputs (where strays would still land)."""
    outputs: list[TurnOutput] = []

    def emit(output: TurnOutput) -> None:
        outputs.append(output)
        if isinstance(output, turn_output) and not task.cancelling():
            task.cancel()

    task = asyncio.create_task(make_turn(emit).run())
    await asyncio.gather(task, return_exceptions=True)
    return outputs, task


async def assert_no_more(outputs: list[TurnOutput]) -> None:
    """Nothing is added to a cancelled turn's outputs for a while."""
    count = len(outputs)
    await asyncio.sleep(QUIET_S)
    assert len(outputs) == count, outputs[count:]


async def test_a_turn_streams_text_then_audio_and_says_what_the_reference_says(
    assistant: VitaAssistant, speech: SpeechService
) -> None:
    engine = assistant.make_engine(max_sessions=2, max_len=1024)
    hello = clip("en_hello")
    outputs, _ = await answer(Chat(assistant, engine, "a"), speech, hello)
    *streamed, finished = outputs
    assert isinstance(finished, TurnFinished) and finished.state == "answer"
    assert all(isinstance(o, (TextDelta, AudioSegment)) for o in streamed)
    assert isinstance(streamed[0], TextDelta)
    assert reply_text(outputs) == reference_text(assistant, hello) != ""
    segments = [o.pcm for o in streamed if isinstance(o, AudioSegment)]
    assert segments and all(s.dtype == np.int16 and len(s) for s in segments)
    assert sum(map(len, segments)) == finished.audio_samples
    assert finished.synthesis_seconds > 0
    stages = finished.stages  # every stage reached, in pipeline order
    times = [stages.started, stages.media_encoded, stages.first_token, stages.first_sentence, stages.speech_prefilled,
             stages.speech_first_window, stages.speech_vocoder_call, stages.speech_first_segment, stages.first_audio]
    assert None not in times and times == sorted(times)
    await engine.close()


async def test_a_typed_turn_is_answered_as_the_reference_answers_the_same_text(
    assistant: VitaAssistant, speech: SpeechService
) -> None:
    engine = assistant.make_engine(max_sessions=2, max_len=1024)
    chat = Chat(assistant, engine, "typed")
    outputs, _ = await answer(chat, speech, None, text="What is on the table?")
    embeds = assistant.turn_embeddings(assistant.new_conversation(), text="What is on the table?")
    expected = "".join(generate_text(assistant.model, ReplyTextStream(assistant.tokenizer), embeds, GREEDY))
    assert reply_text(outputs) == expected != ""
    finished = outputs[-1]
    reference_ids = list(generate_ids(assistant.model, embeds, GREEDY, assistant.tokenizer.stop_ids))
    assert (finished.input_tokens, finished.output_tokens) == (embeds.shape[0], len(reference_ids))
    assert any(isinstance(o, AudioSegment) for o in outputs)  # spoken like a spoken turn
    await engine.close()


async def test_a_reply_marked_not_addressed_says_nothing_unless_the_turn_ignores_the_mark(
    not_addressed_checkpoint: Path, speech: SpeechService  # noqa: F811
) -> None:
    assistant = VitaAssistant.load(not_addressed_checkpoint)  # replies "☟ Hello." to anything
    engine = assistant.make_engine(max_sessions=2, max_len=1024)
    hello = clip("en_hello")
    respecting = Chat(assistant, engine, "respecting")
    outputs, _ = await answer(respecting, speech, hello, respect_not_addressed=True)
    [finished] = outputs
    assert (finished.text, finished.state, finished.synthesis_seconds, finished.audio_samples) == ("", "not_addressed", 0, 0)
    assert finished.stages.first_token is not None and finished.stages.first_sentence is finished.stages.first_audio is None
    prompt_tokens = assistant.turn_embeddings(assistant.new_conversation(), audio_16k=hello).shape[0]
    assert (finished.input_tokens, finished.output_tokens) == (prompt_tokens, 1)  # the ☟ alone
    assert respecting.conversation.turns == 1 and not respecting.conversation.reply_closed  # stopped at ☟

    ignoring = Chat(assistant, engine, "ignoring")
    outputs, _ = await answer(ignoring, speech, hello, respect_not_addressed=False)
    assert reply_text(outputs) == REPLY_WORDS and outputs[-1].state == "answer"
    assert any(isinstance(o, AudioSegment) for o in outputs)
    assert ignoring.conversation.reply_closed
    await engine.close()


async def test_a_conversation_outgrowing_the_context_restarts_and_the_turn_is_answered(
    assistant: VitaAssistant, speech: SpeechService
) -> None:
    system_prompt = "You are a helpful voice assistant."
    # a first turn of en_hello fits (19 system + 81 turn + 24 reply tokens), a second one (84 more) does not
    engine = assistant.make_engine(max_sessions=2, max_len=160)
    chat = Chat(assistant, engine, "a", system_prompt)
    hello = clip("en_hello")
    first_outputs, first_turn = await answer(chat, speech, hello, speak=False)
    expected = reference_text(assistant, hello, system_prompt)
    assert reply_text(first_outputs) == expected

    outputs, _ = await answer(chat, speech, hello)
    assert isinstance(outputs[0], HistoryCleared) and not any(isinstance(o, HistoryCleared) for o in outputs[1:])
    assert reply_text(outputs) == expected  # the history is gone, the system prompt kept
    assert any(isinstance(o, AudioSegment) for o in outputs)
    assert chat.conversation.turns == 1 and chat.conversation.system_prompt == system_prompt
    first_turn.undo()  # its conversation is gone: nothing happens
    assert chat.conversation.turns == 1
    outputs, _ = await answer(chat, speech, hello, speak=False)  # the chat still holds the second turn
    assert isinstance(outputs[0], HistoryCleared) and reply_text(outputs) == expected
    await engine.close()


async def test_a_system_prompt_too_long_for_the_context_fails_each_turn_and_leaves_the_chat_unchanged(
    assistant: VitaAssistant, speech: SpeechService
) -> None:
    engine = assistant.make_engine(max_sessions=2, max_len=64)
    chat = Chat(assistant, engine, "long", "Answer briefly. " * 40)
    hello = clip("en_hello")
    for _ in range(2):  # the chat stays as it was: the next turn is refused the same way
        outputs, _ = await answer(chat, speech, hello, speak=False)
        assert [type(o) for o in outputs] == [TurnFailed], outputs
        assert "system prompt" in outputs[0].message and "64" in outputs[0].message
        assert chat.conversation.turns == 0
    fitting = Chat(assistant, engine, "short", "Answer briefly.")  # the engine serves other chats meanwhile
    outputs, _ = await answer(fitting, speech, None, speak=False, text="hi")
    assert isinstance(outputs[-1], TurnFinished)
    await engine.close()


async def test_cancelling_a_turn_at_its_first_text_stops_it_and_keeps_the_chat_consistent(
    assistant: VitaAssistant, speech: SpeechService
) -> None:
    """The chat keeps the reply tokens it got until the cancel: its next reply equals that of a
    chat whose first reply ended after as many tokens."""
    engine = assistant.make_engine(max_sessions=2, max_len=1024)
    hello, describe = clip("en_hello"), clip("en_describe")
    chat = Chat(assistant, engine, "cancelled")
    outputs, task = await cancel_at_first(TextDelta, lambda emit: voice_turn(chat, speech, hello, emit))
    await assert_no_more(outputs)
    assert task.cancelled() and [type(o) for o in outputs] == [TextDelta]
    assert chat.conversation.turns == 1 and not chat.conversation.reply_closed

    stream = ReplyTextStream(assistant.tokenizer)  # the tokens the reply had until its first text
    kept = next(i + 1 for i, token in enumerate(reference_ids(assistant, hello)) if stream.push(token))
    reference = Chat(assistant, engine, "cut")
    cut_outputs, _ = await answer(reference, speech, hello, speak=False, params=SamplingParams(max_tokens=kept))
    assert reply_text(cut_outputs).startswith(outputs[0].text)
    next_reply = reply_text((await answer(chat, speech, describe, speak=False))[0])
    assert next_reply == reply_text((await answer(reference, speech, describe, speak=False))[0])
    await engine.close()


async def test_cancelling_a_turn_while_it_speaks_stops_its_synthesis_at_once(
    assistant: VitaAssistant, speech: SpeechService, monkeypatch: pytest.MonkeyPatch
) -> None:
    engine = assistant.make_engine(max_sessions=2, max_len=1024)
    hello = clip("en_hello")
    chat = Chat(assistant, engine, "a")
    utterances: list[SpeechHandle] = []
    speak = speech.speak

    def recording_speak(*args, **kwargs) -> SpeechHandle:
        utterances.append(speak(*args, **kwargs))
        return utterances[-1]

    monkeypatch.setattr(speech, "speak", recording_speak)
    long_reply = SamplingParams(max_tokens=400)  # its text still streams when its first audio comes

    def make_turn(emit: OutputCallback) -> VoiceTurn:
        return voice_turn(chat, speech, hello, emit, params=long_reply)

    outputs, task = await cancel_at_first(AudioSegment, make_turn)
    assert task.cancelled() and utterances[-1].cancelled  # stopped by the time the task ended
    await assert_no_more(outputs)
    assert isinstance(outputs[-1], AudioSegment) and [type(o) for o in outputs].count(AudioSegment) == 1
    assert reply_text((await answer(chat, speech, hello))[0])  # the chat answers on
    await engine.close()


@pytest.mark.parametrize("when", ["after_its_reply", "mid_reply", "before_its_first_token"])
async def test_an_undone_turn_leaves_no_trace(assistant: VitaAssistant, speech: SpeechService, when: str) -> None:
    """A chat that undoes its second turn answers the third as a chat never asked the second."""
    engine = assistant.make_engine(max_sessions=2, max_len=1024)
    hello, describe, weather = clip("en_hello"), clip("en_describe"), clip("zh_weather")
    chat, reference = Chat(assistant, engine, "undoing"), Chat(assistant, engine, "reference")
    for each in (chat, reference):
        await answer(each, speech, hello, speak=False)

    if when == "after_its_reply":
        outputs, turn = await answer(chat, speech, describe)
        assert isinstance(outputs[-1], TurnFinished)
    elif when == "mid_reply":
        turns: list[VoiceTurn] = []

        def make_turn(emit: OutputCallback) -> VoiceTurn:
            turns.append(voice_turn(chat, speech, describe, emit))
            return turns[-1]

        await cancel_at_first(TextDelta, make_turn)
        [turn] = turns
    else:
        async def encode_then_cancel(request: MediaRequest) -> TurnMedia:  # the reply is cancelled during prefill
            media = await encoder(assistant)(request)
            asyncio.current_task().cancel()
            return media

        outputs = []
        turn = VoiceTurn(chat, TurnInput(describe, params=GREEDY), encode_media=encode_then_cancel, speech=speech,
                         emit=outputs.append)
        with pytest.raises(asyncio.CancelledError):
            await asyncio.create_task(turn.run())
        assert outputs == [] and chat.conversation.turns == 1
    turn.undo()

    assert chat.conversation.turns == 1
    third = reply_text((await answer(chat, speech, weather, speak=False))[0])
    assert third == reply_text((await answer(reference, speech, weather, speak=False))[0])
    await engine.close()


async def test_a_unit_longer_than_an_utterance_is_spoken_in_pieces(tiny_checkpoint: Path, assistant: VitaAssistant) -> None:
    rows_per_token = assistant.speech_rows_per_token
    hello = clip("en_hello")
    units = SentenceChunker().push(reference_text(assistant, hello)) + SentenceChunker().flush()
    longest = max(len(assistant.speech_embeddings(unit)) for unit in units) if units else 0
    capacity = 3 * rows_per_token + 2  # three tokens of text per utterance (and few codes)
    assert longest > capacity - 2, "the reply needs a unit of more than three tokens"
    small = SpeechService(Synthesizer.load(tiny_checkpoint / "vita_tts_ckpt"), max_streams=2, capacity=capacity)
    small.start()
    engine = assistant.make_engine(max_sessions=2, max_len=1024)
    try:
        outputs, _ = await answer(Chat(assistant, engine, "pieces"), small, hello)
        assert reply_text(outputs) == reference_text(assistant, hello)
        assert outputs[-1].audio_samples > 0
    finally:
        small.close()
        await engine.close()
