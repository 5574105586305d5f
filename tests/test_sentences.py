"""Streaming sentence chunker in English and Chinese."""

import random

from tts.sentences import SentenceChunker
from tts.speech_text import normalize_for_speech

ENGLISH = ("☞Well, I think so. The answer is 3.14, roughly; it costs $1,234 at 10:30!\n"
           "Next line? Yes: ok. Bye")
CHINESE = "☞好的，我来介绍一下。今天气温是25.5度，湿度80%，适合出门！还有吗？没有了、谢谢\n再见"


def chunk(text: str, pieces: list[str] | None = None, chunker: SentenceChunker | None = None) -> list[str]:
    chunker = chunker or SentenceChunker()
    units = []
    for piece in pieces if pieces is not None else list(text):
        units += chunker.push(piece)
    return units + chunker.flush()


def random_split(text: str, seed: int) -> list[str]:
    rng = random.Random(seed)
    cuts = sorted(rng.sample(range(1, len(text)), rng.randrange(1, len(text) // 3)))
    return [text[a:b] for a, b in zip([0, *cuts], [*cuts, len(text)])]


def test_english_units():
    assert chunk(ENGLISH) == [
        "well.",  # the first unit ends at its first comma, which becomes a full stop
        "i think so.",
        "the answer is three point one four,",  # the decimal point does not cut
        "roughly;",
        "it costs one thousand two hundred thirty-four dollars at ten thirty!",  # nor do 1,234 and 10:30
        "next line?",
        "yes: ok.",  # "yes:" alone is shorter than 5 characters
        "bye",
    ]


def test_chinese_units():
    assert chunk(CHINESE) == [
        "好的。", "我来介绍一下。", "今天气温是二十五点五度，", "湿度百分之八十，", "适合出门！", "还有吗？没有了、", "谢谢 再见",
    ]


def test_units_do_not_depend_on_how_the_text_is_split():
    for text in (ENGLISH, CHINESE):
        expected = chunk(text)
        for seed in range(20):
            assert chunk(text, random_split(text, seed)) == expected


def test_units_cover_the_whole_text():
    for text in (ENGLISH, CHINESE):
        units = chunk(text)
        spoken = normalize_for_speech(text)
        first = units[0]
        assert spoken.replace(" ", "").startswith(first[:-1].replace(" ", ""))
        assert "".join(units[1:]).replace(" ", "") == spoken.replace(" ", "")[len(first):]


def test_short_units_wait_for_five_characters_after_the_first():
    assert chunk("Oh, ok. Yes, I see. No.") == ["oh.", "ok. yes,", "i see.", "no."]


def test_chunker_resets_for_the_next_reply():
    chunker = SentenceChunker()
    assert chunk("Hi, there. Bye", chunker=chunker) == ["hi.", "there.", "bye"]
    assert chunk("Yes, sure.", chunker=chunker) == ["yes.", "sure."]


def test_unspeakable_text_yields_nothing():
    assert chunk("☞ 😀, <|im_end|>") == []


def test_a_long_first_unit_is_cut_at_a_space_and_later_units_are_not():
    words = " ".join(["some", "long", "words"] * 15)  # 224 characters, no punctuation
    first, *rest = chunk(f"{words}. {words}.")
    assert len(first) <= 100 and words.startswith(first) and words[len(first)] == " "
    assert rest == [words[len(first) + 1 :] + ".", words + "."]


def test_a_long_first_unit_is_cut_the_same_however_the_text_arrives():
    text = " ".join(["some", "long", "words"] * 15) + ", and so on."
    expected = chunk(text)
    assert len(expected[0]) <= 100
    for seed in range(20):
        assert chunk(text, random_split(text, seed)) == expected


def test_a_first_unit_without_spaces_waits_for_punctuation():
    text = "很" * 150 + "。好的。"
    assert chunk(text) == ["很" * 150 + "。", "好的。"]
