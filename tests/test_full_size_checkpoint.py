"""The full-size random checkpoint: Qwen2-sized tokenizer, stored precisions, TTS dims, loadable."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from tts.synthesizer import Synthesizer
from tts.tiny_checkpoint import full_size_decoder_config
from tts.sentences import SentenceChunker
from vita.checkpoint import INDEX_FILE, load_model
from vita.config import VitaConfig
from vita.random_tokenizer import QWEN2_REGULAR_TOKENS, build_full_size_tokenizer
from vita.tiny_checkpoint import write_full_size_checkpoint
from vita.tokenizer import VitaTokenizer

QWEN2_VOCAB_ROWS = 152_064


@pytest.fixture(scope="module")
def tokenizer() -> VitaTokenizer:
    return VitaTokenizer(build_full_size_tokenizer())


def test_tokenizer_has_qwen2_size_and_special_ids(tokenizer: VitaTokenizer) -> None:
    assert tokenizer.vocab_size == QWEN2_REGULAR_TOKENS + 3
    assert (tokenizer.end_of_text_id, tokenizer.im_start_id, tokenizer.im_end_id) == (151643, 151644, 151645)
    text = "<|im_start|>user\nHello, can you hear me? 你好！<|im_end|>"
    ids = tokenizer.tokenizer.encode(text).ids
    assert ids[0] == tokenizer.im_start_id and ids[-1] == tokenizer.im_end_id
    assert tokenizer.tokenizer.decode(ids, skip_special_tokens=False) == text


def test_random_replies_read_as_sentences(tokenizer: VitaTokenizer) -> None:
    """64 uniformly drawn ids decode to words that the chunker cuts into several units."""
    rng = random.Random(0)
    units_per_reply = []
    for _ in range(20):
        chunker = SentenceChunker()
        text = tokenizer.tokenizer.decode([rng.randrange(QWEN2_REGULAR_TOKENS) for _ in range(64)])
        units_per_reply.append(len(chunker.push(text)) + len(chunker.flush()))
    assert 3 <= sum(units_per_reply) / len(units_per_reply) <= 8


def test_replies_encode_back_to_about_as_many_tokens(tokenizer: VitaTokenizer) -> None:
    """Filler words are one token each, so a reply's text (what the TTS encodes again) has about
    as many tokens as the reply had ids, as real text has; punctuation splits off as in Qwen2."""
    rng = random.Random(1)
    vocab = tokenizer.tokenizer.get_vocab()
    fillers = [token.replace("\u0120", " ") for token, i in vocab.items() if i >= 1000 and token.isalpha()]
    words = rng.sample(fillers, 2000)
    assert all(len(tokenizer.tokenizer.encode(word, add_special_tokens=False).ids) == 1 for word in words)
    ids = [rng.randrange(QWEN2_REGULAR_TOKENS) for _ in range(2000)]
    text = tokenizer.tokenizer.decode(ids)
    assert len(tokenizer.tokenizer.encode(text, add_special_tokens=False).ids) <= 1.3 * len(ids)


def test_writer_round_trips_with_stored_precisions(tmp_path: Path) -> None:
    """The full-size writer with small LLM dims but Qwen2's vocabulary: loads strictly, whale is
    stored fp32 and the rest bf16, the TTS has the full-size decoder."""
    config = VitaConfig.tiny().with_vocab_size(QWEN2_VOCAB_ROWS)
    folder = write_full_size_checkpoint(tmp_path / "ckpt", config=config)
    weight_map = json.loads((folder / INDEX_FILE).read_text())["weight_map"]
    assert {shard.split("-of-")[1] for shard in weight_map.values()} == {"00004.safetensors"}
    dtypes = {}
    for shard in set(weight_map.values()):
        with safe_open(folder / shard, "pt") as opened:
            dtypes.update({name: opened.get_slice(name).get_dtype() for name in opened.keys()})
    assert {d for n, d in dtypes.items() if n.startswith("model.audio_encoder.")} == {"F32"}
    assert {d for n, d in dtypes.items() if not n.startswith("model.audio_encoder.")} == {"BF16"}
    model = load_model(folder, progress=False)
    assert model.lm_head.weight.shape == (QWEN2_VOCAB_ROWS, config.llm.hidden_size)
    assert model.lm_head.weight.dtype == torch.float32
    synthesizer = Synthesizer.load(folder / "vita_tts_ckpt")
    assert synthesizer.decoder.config == full_size_decoder_config()
