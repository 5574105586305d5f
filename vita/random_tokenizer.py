"""Qwen2-style byte-level BPE tokenizers for the random checkpoints.

The tiny tokenizer is trained on a few embedded sentences (about 1000 ids). The full-size one
adds filler pseudo-words up to Qwen2's 151,643 regular ids, with the special tokens at Qwen2's
ids, so embedding and output tables keep the real size. Each filler word has merges that make
it one token, so a reply's text encodes back to about as many tokens as it had (what the TTS
sees, as with real text); twins ending in punctuation make random replies read as sentences of
about ten tokens, which the sentence chunker cuts as it would real text.
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
FILLER_POOL = 145_000  # words drawn (about 150,000 tokens with their pieces); the last are dropped to fit
# A twin (word + ending) for 3 of every 40 ids: one token in about 13 ends a sentence or clause.
TWIN_SHARE = 3 / 40
TWIN_ENDINGS = (".", ",", "?")
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


def filler_words(count: int, seed: int) -> list[str]:
    """`count` distinct byte-level pseudo-words of two or three consonant-vowel syllables (the
    single syllables come in as their pieces), most with a leading space."""
    rng = random.Random(seed)
    syllables = [consonant + vowel for consonant in FILLER_CONSONANTS for vowel in FILLER_VOWELS]
    words: dict[str, None] = {}
    while len(words) < count:
        word = "".join(rng.choices(syllables, k=rng.choice((2, 3, 3, 3))))
        words[(WORD_START if rng.random() < 0.85 else "") + word] = None
    return list(words)


def word_pieces(word: str) -> list[str]:
    """Every syllable of `word` and every prefix of it that ends on a syllable boundary."""
    start = 1 if word.startswith(WORD_START) else 0
    ends = range(start + 2, len(word) + 1, 2)
    return [word[end - 2:end] for end in ends] + [word[:end] for end in ends]


def find_merges(spec: dict, strings: set[str]) -> list[tuple[str, str]]:
    """Merges, in rank order after `spec`'s, that make each of `strings` one token.

    Strings are taken shortest first. A string that the tokenizer so far encodes as several
    tokens gets a merge of its first two, and is encoded again, until it is one token. Each new
    merge ranks after all earlier ones, so it only acts where no earlier merge applies: strings
    that are already one token stay so, and the others get at least one token shorter a pass.
    """
    vocab: dict[str, int] = dict(spec["model"]["vocab"])
    merges: list[list[str]] = list(spec["model"]["merges"])
    trial = dict(spec, model=dict(spec["model"], vocab=vocab, merges=merges))
    found: list[tuple[str, str]] = []
    for length in sorted({len(s) for s in strings}):
        todo = sorted(s for s in strings if len(s) == length and s not in vocab)
        while todo:
            tokenizer = Tokenizer.from_str(json.dumps(trial))
            encodings = tokenizer.encode_batch([s.replace(WORD_START, " ") for s in todo], add_special_tokens=False)
            todo = [s for s, encoding in zip(todo, encodings) if len(encoding.tokens) > 1]
            pairs = list(dict.fromkeys(tuple(e.tokens[:2]) for e in encodings if len(e.tokens) > 1))
            for left, right in pairs:
                vocab.setdefault(left + right, len(vocab))
                merges.append([left, right])
            found.extend(pairs)
    return found


def build_full_size_tokenizer(seed: int = 0) -> Tokenizer:
    """The tiny tokenizer grown to Qwen2's 151,643 regular ids with filler words; the special
    tokens get Qwen2's ids (151643 `<|endoftext|>`, 151644 `<|im_start|>`, 151645 `<|im_end|>`).

    Each filler word encodes to one token, as real words mostly do (the pieces that merge into
    it are tokens too). Some words have a twin ending in punctuation, which encoding never gives
    (text splits punctuation off, as Qwen2's does), so uniformly drawn ids read as sentences.
    """
    spec = json.loads(build_tiny_tokenizer().to_str())
    vocab: dict[str, int] = spec["model"]["vocab"]
    pool = [word for word in filler_words(FILLER_POOL, seed) if word not in vocab]
    merges = find_merges(spec, {piece for word in pool for piece in word_pieces(word)})
    budget = QWEN2_REGULAR_TOKENS - len(vocab)
    room = int(budget * (1 - TWIN_SHARE))
    made = dict.fromkeys(left + right for left, right in merges)
    pieces = {part for pair in merges for part in pair}
    for word in reversed(pool):  # drop words no other token is made from, the last drawn first
        if len(made) <= room:
            break
        if word not in pieces:
            made.pop(word, None)
    if len(made) != room:
        raise RuntimeError(f"{len(made)} filler tokens for {room} places: change FILLER_POOL")
    words = [word for word in pool if word in made]
    twins = budget - room
    for index in range(twins):
        made[words[index * len(words) // twins] + TWIN_ENDINGS[index % len(TWIN_ENDINGS)]] = None
    for token in made:
        vocab[token] = len(vocab)
    spec["model"]["merges"] += [[left, right] for left, right in merges if left + right in made]
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
