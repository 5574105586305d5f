"""VITA's ☟ state token ("speech not addressed to me") silences the reply, end to end.

The tiny random checkpoint never starts a reply with ☟, so a fixture crafts real weights that
do: with every layer's ``o_proj`` and ``down_proj`` zeroed, the residual stream at a position is
that token's embedding, so the greedy next token is ``argmax(lm_head · norm(embed[last]))``.
``lm_head`` then chains the prompt's last token (the "\\n" after "assistant") to ☟, each reply
token to the next and the last to ``<|im_end|>``. The reply carries words after ☟ so that a
session ignoring the state token has something to speak.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from server.background import BackgroundServer
from server.client import stream_audio
from server.settings import ServerSettings
from test_server import REPLY_SETTINGS, clip
from vita.assistant import VitaAssistant
from vita.checkpoint import INDEX_FILE
from vita.generate import generate_text
from vita.prompt import ASSISTANT_HEADER, ReplyState
from vita.reply_text import ReplyTextStream
from vita.sampling import SamplingParams
from vita.tokenizer import VitaTokenizer

REPLY_WORDS = "Hello."  # what a session ignoring ☟ speaks
NOT_ADDRESSED_REPLY = f"☟ {REPLY_WORDS}"
LOGIT_MARGIN = 20.0  # logit of the chained next token; every other logit is ~0
GREEDY = {"generation": {"temperature": 0.0, "max_new_tokens": 24}}  # respect_not_addressed: default (on)


def reply_chain(tokenizer: VitaTokenizer) -> list[int]:
    """The prompt's last id, then the ids the crafted model must generate, ending with <|im_end|>."""
    chain = [tokenizer.encode(ASSISTANT_HEADER)[-1], *tokenizer.encode(NOT_ADDRESSED_REPLY), tokenizer.im_end_id]
    assert len(set(chain)) == len(chain), "each token of the chain must have one successor"
    return chain


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Qwen2's final RMSNorm, written out."""
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * weight


def craft_not_addressed_weights(checkpoint_dir: Path) -> None:
    """Rewrite the LLM weights in place (same shards, same index) so greedy replies are the chain."""
    weight_map = json.loads((checkpoint_dir / INDEX_FILE).read_text())["weight_map"]
    eps = json.loads((checkpoint_dir / "config.json").read_text())["rms_norm_eps"]
    shards = {shard: load_file(str(checkpoint_dir / shard)) for shard in sorted(set(weight_map.values()))}
    tensors = {name: shards[shard][name] for name, shard in weight_map.items()}

    for name, tensor in tensors.items():
        if re.fullmatch(r"model\.layers\.\d+\.(self_attn\.o_proj|mlp\.down_proj)\.weight", name):
            tensor.zero_()
    chain = reply_chain(VitaTokenizer.from_dir(checkpoint_dir))
    inputs, targets = chain[:-1], chain[1:]
    final_hidden = rms_norm(tensors["model.embed_tokens.weight"][inputs], tensors["model.norm.weight"], eps)
    lm_head = tensors["lm_head.weight"]
    lm_head.zero_()
    # rows such that lm_head[targets] @ final_hidden.T = LOGIT_MARGIN * identity
    lm_head[targets] = LOGIT_MARGIN * torch.linalg.pinv(final_hidden.double().T).float()

    for shard, shard_tensors in shards.items():
        save_file(shard_tensors, str(checkpoint_dir / shard), metadata={"format": "pt"})


@pytest.fixture(scope="module")
def not_addressed_checkpoint(tiny_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A copy of the tiny checkpoint whose model replies "☟ Hello." to any turn."""
    checkpoint_dir = shutil.copytree(tiny_checkpoint, tmp_path_factory.mktemp("not_addressed") / "ckpt")
    craft_not_addressed_weights(checkpoint_dir)
    return checkpoint_dir


def greedy_reply(checkpoint_dir: Path) -> tuple[str, ReplyTextStream]:
    """Text and id stream of the plain single-stream greedy reply to en_hello (no engine)."""
    assistant = VitaAssistant.load(checkpoint_dir)
    audio, _ = clip("en_hello")
    embeds = assistant.turn_embeddings(assistant.new_conversation(), audio_16k=audio / 32768.0)
    stream = ReplyTextStream(assistant.tokenizer)
    text = "".join(generate_text(assistant.model, stream, embeds, SamplingParams(temperature=0.0, max_tokens=24)))
    return text, stream


def test_crafted_model_replies_not_addressed(not_addressed_checkpoint: Path, tiny_checkpoint: Path) -> None:
    text, stream = greedy_reply(not_addressed_checkpoint)
    assert stream.token_ids == reply_chain(stream.tokenizer)[1:]
    assert stream.tokenizer.decode(stream.token_ids) == NOT_ADDRESSED_REPLY
    assert stream.state is ReplyState.NOT_ADDRESSED and stream.closed
    assert text == REPLY_WORDS
    assert greedy_reply(tiny_checkpoint)[1].state is not ReplyState.NOT_ADDRESSED  # the crafting does it


@pytest.fixture(scope="module")
def server(not_addressed_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory):
    settings = ServerSettings(max_sessions=2, idle_timeout_s=60, cache_dir=tmp_path_factory.mktemp("cache"))
    with BackgroundServer(settings, not_addressed_checkpoint) as running:
        yield running


def turns_with_outcome(server: BackgroundServer, outcome: str) -> float:
    match = re.search(rf'^vita_turns_total{{outcome="{outcome}"}} (\S+)$', server.get_text("/metrics"), re.MULTILINE)
    return float(match[1]) if match else 0.0


async def test_not_addressed_reply_says_nothing(server: BackgroundServer) -> None:
    audio, rate = clip("en_hello")
    result = await stream_audio(server.ws_url, audio, rate, speed=4, session_update=GREEDY, expected_turns=1)
    kinds = [e["type"] for e in result.events]
    assert kinds.index("vad.speech_stopped") < kinds.index("response.started") < kinds.index("response.done")
    assert "response.text.delta" not in kinds and "error" not in kinds
    [turn] = result.turns
    assert turn.done["state"] == "not_addressed" and turn.done["text"] == ""
    assert turn.done["audio_segments"] == 0 and turn.audio == [] and result.stray_audio == 0
    assert turns_with_outcome(server, "not_addressed") == 1


async def test_same_turn_is_spoken_when_not_addressed_is_ignored(server: BackgroundServer) -> None:
    audio, rate = clip("en_hello")
    assert REPLY_SETTINGS["generation"]["respect_not_addressed"] is False
    result = await stream_audio(server.ws_url, audio, rate, speed=4, session_update=REPLY_SETTINGS, expected_turns=1)
    [turn] = result.turns
    assert turn.done["state"] == "answer"
    assert turn.text == turn.done["text"] == REPLY_WORDS
    assert turn.audio_samples > 0 and turn.done["audio_segments"] == len(turn.audio)
    assert np.concatenate(turn.audio).any()
