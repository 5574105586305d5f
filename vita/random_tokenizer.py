"""Qwen2-style byte-level BPE tokenizers for the random checkpoints.

The tiny tokenizer is trained on a few embedded sentences (about 1000 ids). The full-size one
adds filler pseudo-words up to Qwen2's 151,643 regular ids, with the special tokens at Qwen2's
ids, so embedding and output tables keep the real size. Fillers are never produced by encoding
(no merges lead to them); they decode to words, some ending in punctuation, so random replies
read as sentences of about ten tokens and the sentence chunker cuts them as it would real text.
"""

from __future__ import annotations

import json
import random
from collections.abc import Sequence
from pathlib import Path

from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

from vita.prompt import SYSTEM_PROMPTS
from vita.tokenizer import END_OF_TEXT, IM_END, IM_START

TINY_VOCAB_SIZE = 1000
QWEN2_REGULAR_TOKENS = 151_643  # Qwen2's <|endoftext|> id: the regular vocabulary ends before it
SPECIAL_TOKENS = (END_OF_TEXT, IM_START, IM_END)

# Qwen2's pre-tokenizer split pattern (tokenizer.json of Qwen2.5).
QWEN2_SPLIT_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)

TRAINING_TEXT = [
    *SYSTEM_PROMPTS.values(),
    "☞ Hello! How can I help you today? ☞ Sure, I can describe what I see in the picture.",
    "☟ ☜ The weather today is sunny and warm, with a light breeze from the west.",
    "Hello, can you hear me? Please describe the image. What is the weather like today?",
    "The picture shows a red square on a blue background, next to a small green circle.",
    "I am VITA, an open source multimodal assistant. I can listen, look and talk with you.",
    "Numbers: 0 1 2 3 4 5 6 7 8 9 10 100 2024. Punctuation: , . ! ? ; : ( ) - ' \"",
    "☞ 你好！今天天气怎么样？今天天气晴朗，气温二十五度，适合出去散步。",
    "☞ 我是VITA，一个开源的多模态大语言模型。我可以听、看，也可以和你对话。",
    "☜ 图片里有一个红色的正方形和一个绿色的圆形，背景是蓝色的。请问还有什么问题？",
    "☟ 好的，谢谢你。再见！明天见。我们一起学习，一起进步。",
]

FILLER_CONSONANTS = "bdfgklmnprstvz"
FILLER_VOWELS = "aeiou"
# Every 40 fillers: two end a sentence and one has a comma (about one token in 13 ends a unit).
FILLER_ENDINGS = {0: ".", 13: ",", 26: "?"}
FILLER_ENDING_PERIOD = 40
WORD_START = "\u0120"  # byte-level BPE's picture of a leading space


def build_tiny_tokenizer(text: Sequence[str] = TRAINING_TEXT, vocab_size: int = TINY_VOCAB_SIZE) -> Tokenizer:
    """Train a Qwen2-style byte-level BPE (NFC, Qwen2 split regex) on `text` (the embedded text).

    The special tokens come after the learned vocabulary, as in Qwen2. Byte-level BPE
    can encode any text, so ☞ ☟ ☜ always tokenize (they are in the training text too).
    """
    tokenizer = Tokenizer(models.BPE())
    tokenizer.normalizer = normalizers.NFC()
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN2_SPLIT_PATTERN), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size - len(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(list(text) * 4, trainer)
    tokenizer.add_special_tokens(list(SPECIAL_TOKENS))
    return tokenizer


def filler_words(count: int, taken: set[str], seed: int) -> list[str]:
    """`count` distinct byte-level pseudo-words not in `taken` (most with a leading space, some
    ending in punctuation as `FILLER_ENDINGS` says)."""
    rng = random.Random(seed)
    words: list[str] = []
    seen = set(taken)
    while len(words) < count:
        syllables = rng.choice((1, 2, 2, 3))
        word = "".join(rng.choice(FILLER_CONSONANTS) + rng.choice(FILLER_VOWELS) for _ in range(syllables))
        word = (WORD_START if rng.random() < 0.85 else "") + word
        word += FILLER_ENDINGS.get(len(words) % FILLER_ENDING_PERIOD, "")
        if word not in seen:
            seen.add(word)
            words.append(word)
    return words


def build_full_size_tokenizer(seed: int = 0) -> Tokenizer:
    """The tiny tokenizer grown to Qwen2's 151,643 regular ids with filler words; the special
    tokens get Qwen2's ids (151643 `<|endoftext|>`, 151644 `<|im_start|>`, 151645 `<|im_end|>`)."""
    spec = json.loads(build_tiny_tokenizer().to_str())
    vocab: dict[str, int] = spec["model"]["vocab"]
    learned = len(vocab)
    for offset, word in enumerate(filler_words(QWEN2_REGULAR_TOKENS - learned, set(vocab), seed)):
        vocab[word] = learned + offset
    for offset, added in enumerate(spec["added_tokens"]):
        added["id"] = QWEN2_REGULAR_TOKENS + offset
    return Tokenizer.from_str(json.dumps(spec))


def tokenizer_config(tokenizer: Tokenizer) -> dict:
    """A Qwen2-style `tokenizer_config.json`."""
    special = {
        str(tokenizer.token_to_id(token)): {
            "content": token, "lstrip": False, "normalized": False,
            "rstrip": False, "single_word": False, "special": True,
        }
        for token in SPECIAL_TOKENS
    }
    return {
        "add_bos_token": False,
        "add_prefix_space": False,
        "added_tokens_decoder": special,
        "additional_special_tokens": [IM_START, IM_END],
        "bos_token": None,
        "clean_up_tokenization_spaces": False,
        "eos_token": IM_END,
        "errors": "replace",
        "model_max_length": 4096,
        "pad_token": END_OF_TEXT,
        "split_special_tokens": False,
        "tokenizer_class": "Qwen2Tokenizer",
        "unk_token": None,
    }


def write_tokenizer(out_dir: Path, tokenizer: Tokenizer) -> None:
    """tokenizer.json, vocab.json, merges.txt and tokenizer_config.json, as a Qwen2 checkpoint has."""
    tokenizer.save(str(out_dir / "tokenizer.json"))
    tokenizer.model.save(str(out_dir))
    (out_dir / "tokenizer_config.json").write_text(
        json.dumps(tokenizer_config(tokenizer), indent=2, ensure_ascii=False) + "\n"
    )
