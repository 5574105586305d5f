"""Normalisation for speech; number readings checked against num2words (English) and cn2an (Chinese)."""

import random

import cn2an
import pytest
from num2words import num2words

from tts.speech_text import chinese_integer, english_integer, english_ordinal, normalize_for_speech, read_number


def american(words: str) -> str:
    """num2words writes British 'one hundred and five, ...'; we read without 'and' and commas."""
    return words.replace(",", "").replace(" and ", " ")


def sample_numbers(seed: int) -> list[int]:
    rng = random.Random(seed)
    return list(range(0, 1100)) + [rng.randrange(10**k) for k in range(2, 16) for _ in range(100)] + \
        [10**k + j for k in range(2, 15) for j in (0, 1, 10)]


def test_english_cardinals_match_num2words():
    for n in sample_numbers(0):
        assert english_integer(n) == american(num2words(n)), n


def test_english_ordinals_match_num2words():
    for n in list(range(1, 200)) + [1000, 1001, 123456]:
        assert english_ordinal(n) == american(num2words(n, to="ordinal")), n


def test_chinese_cardinals_match_cn2an():
    for n in sample_numbers(1):
        assert chinese_integer(n) == cn2an.an2cn(n), n
        assert cn2an.cn2an(chinese_integer(n), "strict") == n


def test_decimals_and_digit_strings():
    assert read_number("3.14", chinese=False) == "three point one four"
    assert read_number("3.14", chinese=True) == "三点一四"
    assert read_number("1,234", chinese=False) == "one thousand two hundred thirty-four"
    assert read_number("007", chinese=False) == "zero zero seven"
    assert read_number("2024", chinese=True) == "二千零二十四"


@pytest.mark.parametrize("raw, spoken", [
    ("☞Hello **world** 😀!<|im_end|>", "hello world!"),
    ("☟<|im_start|>I'm fine 👍🏽, thanks.", "i'm fine, thanks."),
    ("## Steps\n- Open the [docs](https://example.com).\n- Run `make`.", "steps open the docs. run make."),
    ("It's 25% off and costs $1,234.50.", "it's twenty-five percent off and costs one thousand two hundred "
                                          "thirty-four point five zero dollars."),
    ("2+3=5 and 10 / 2 = 5", "two plus three equals five and ten divided by two equals five"),
    ("x^2 - 4 = 0, so x = -2", "x to the power of two minus four equals zero, so x equals minus two"),
    ("Meet on the 21st, not the 3rd.", "meet on the twenty-first, not the third."),
    ("At 9:05 or 10:00.", "at nine oh five or ten o'clock."),
    ("会议在10:30开始，9:00结束", "会议在十点三十分开始，九点结束"),
    ("It is -5 degrees and/or 2-3 days", "it is minus five degrees and/or two-three days"),
    ("今天气温25度，湿度80%。", "今天气温二十五度，湿度百分之八十。"),
    ("3+4=7，x^2，负数-5。", "三加四等于七，x的二次方，负数负五。"),
    ("2024年我们有12345个用户😊", "二零二四年我们有一万二千三百四十五个用户"),
    ("圆周率π约等于3.14", "圆周率派约等于三点一四"),
])
def test_normalize_for_speech(raw, spoken):
    assert normalize_for_speech(raw) == spoken


def test_nothing_speakable_becomes_empty():
    assert normalize_for_speech("☞ 😀🎉 <|im_end|> **") == ""
