"""Text normalisation before TTS: drop what cannot be spoken, spell out numbers and simple maths.

Text containing any CJK ideograph is read in Chinese (一百二十三, 百分之五十, 三加四等于七),
anything else in English (one hundred twenty-three, fifty percent, three plus four equals seven).
The result is lower-cased, as upstream VITA feeds lower-case text to its TTS.
"""

from __future__ import annotations

import re

CJK = re.compile(r"[\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff]")
SPECIAL_TOKENS = re.compile(r"<\|[^|<>]*\|>|<unk>|</?s>|<image>|<audio>|<video>|[☞☟☜]")
EMOJI = re.compile(
    "[\U0001f000-\U0001faff\U00002600-\U000027bf\U00002b00-\U00002bff\U0001f1e6-\U0001f1ff"
    "\U000e0020-\U000e007f\ufe0f\u200d\u20e3]"
)
URL = re.compile(r"https?://\S+|www\.\S+")

ENGLISH_ONES = (
    "zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen "
    "fifteen sixteen seventeen eighteen nineteen"
).split()
ENGLISH_TENS = "_ _ twenty thirty forty fifty sixty seventy eighty ninety".split()
ENGLISH_SCALES = ((10**12, "trillion"), (10**9, "billion"), (10**6, "million"), (1000, "thousand"))
ENGLISH_ORDINALS = {"one": "first", "two": "second", "three": "third", "five": "fifth", "eight": "eighth",
                    "nine": "ninth", "twelve": "twelfth"}
CHINESE_DIGITS = "零一二三四五六七八九"
MAX_CARDINAL_DIGITS = 15  # longer digit strings (ids, phone numbers) are read digit by digit

GREEK = {"α": "alpha", "β": "beta", "γ": "gamma", "δ": "delta", "θ": "theta", "λ": "lambda",
         "μ": "mu", "π": "pi", "σ": "sigma", "ω": "omega"}
# operator -> (English, Chinese); longer spellings first so that ">=" wins over ">"
OPERATORS = {
    "<=": ("is less than or equal to", "小于等于"), ">=": ("is greater than or equal to", "大于等于"),
    "!=": ("is not equal to", "不等于"), "≤": ("is less than or equal to", "小于等于"),
    "≥": ("is greater than or equal to", "大于等于"), "≠": ("is not equal to", "不等于"),
    "=": ("equals", "等于"), "+": ("plus", "加"), "×": ("times", "乘"), "÷": ("divided by", "除以"),
    "*": ("times", "乘"), "/": ("divided by", "除以"), "-": ("minus", "减"),
    "<": ("is less than", "小于"), ">": ("is greater than", "大于"),
}
OPERAND = r"(?:\d+(?:\.\d+)?|\b[a-zA-Z]\b|\))"  # a number, a one-letter variable or a closing bracket
NEXT_OPERAND = r"(?=\s*(?:\d|\b[a-zA-Z]\b|\())"
ANYWHERE = ("<=", ">=", "!=", "≤", "≥", "≠", "=", "+", "×", "÷")  # unambiguous: read wherever they stand
BETWEEN_OPERANDS = ("*", "/", "<", ">")  # also markdown, paths or tags: read only between operands


def english_integer(n: int) -> str:
    """Cardinal in words: 1234 -> 'one thousand two hundred thirty-four'."""
    if n < 20:
        return ENGLISH_ONES[n]
    if n < 100:
        tens, ones = divmod(n, 10)
        return ENGLISH_TENS[tens] + (f"-{ENGLISH_ONES[ones]}" if ones else "")
    if n < 1000:
        hundreds, rest = divmod(n, 100)
        return f"{ENGLISH_ONES[hundreds]} hundred" + (f" {english_integer(rest)}" if rest else "")
    for scale, name in ENGLISH_SCALES:
        if n >= scale:
            high, rest = divmod(n, scale)
            return f"{english_integer(high)} {name}" + (f" {english_integer(rest)}" if rest else "")
    raise AssertionError("unreachable")


def english_ordinal(n: int) -> str:
    """1 -> 'first', 22 -> 'twenty-second', 40 -> 'fortieth'."""
    words = english_integer(n)
    head, sep, last = words.rpartition("-") if "-" in words.split(" ")[-1] else words.rpartition(" ")
    if last in ENGLISH_ORDINALS:
        last = ENGLISH_ORDINALS[last]
    elif last.endswith("y"):
        last = last[:-1] + "ieth"
    else:
        last += "th"
    return head + sep + last


def english_clock(hours: int, minutes: int) -> str:
    """10:30 -> 'ten thirty', 9:05 -> 'nine oh five', 7:00 -> "seven o'clock"."""
    if minutes == 0:
        return f"{english_integer(hours)} o'clock"
    return f"{english_integer(hours)} {'oh ' if minutes < 10 else ''}{english_integer(minutes)}"


def _chinese_below_10000(n: int) -> str:
    out, pending_zero = "", False
    for power, unit in ((1000, "千"), (100, "百"), (10, "十"), (1, "")):
        digit = n // power % 10
        if digit == 0:
            pending_zero = bool(out)
            continue
        out += ("零" if pending_zero else "") + CHINESE_DIGITS[digit] + unit
        pending_zero = False
    return out


def _chinese_grouped(n: int) -> str:
    if n < 10**4:
        return _chinese_below_10000(n)
    size, unit = (10**8, "亿") if n >= 10**8 else (10**4, "万")
    high, rest = divmod(n, size)
    out = _chinese_grouped(high) + unit
    if rest:
        out += ("零" if rest < size // 10 else "") + _chinese_grouped(rest)
    return out


def chinese_integer(n: int) -> str:
    """Cardinal in Chinese: 10 -> 十, 105 -> 一百零五, 100010000 -> 一亿零一万."""
    if n == 0:
        return "零"
    out = _chinese_grouped(n)
    return out[1:] if out.startswith("一十") else out


def _digits(text: str, chinese: bool) -> str:
    if chinese:
        return "".join(CHINESE_DIGITS[int(d)] for d in text)
    return " ".join(ENGLISH_ONES[int(d)] for d in text)


def read_number(text: str, chinese: bool) -> str:
    """'1,234.5' -> words; leading zeros or very long integers are read digit by digit."""
    whole, _, fraction = text.replace(",", "").partition(".")
    if (len(whole) > 1 and whole.startswith("0")) or len(whole) > MAX_CARDINAL_DIGITS:
        spoken = _digits(whole, chinese)
    else:
        spoken = chinese_integer(int(whole)) if chinese else english_integer(int(whole))
    if fraction:
        spoken += ("点" if chinese else " point ") + _digits(fraction, chinese)
    return spoken


def strip_markdown(text: str) -> str:
    """Drop code fences, link targets, headings, list and quote markers, emphasis and table bars."""
    text = re.sub(r"```\w*", " ", text)
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", text)
    text = re.sub(r"(?m)^\s{0,3}(?:#{1,6}|>|[-*+](?=\s)|[-*_]{3,}\s*$)", " ", text)
    text = text.replace("**", " ").replace("__", " ").replace("`", "").replace("|", " ")
    return re.sub(r"(?<![\w)])[*_]|[*_](?![\w(])", " ", text)


def _say(words: str, chinese: bool) -> str:
    return words if chinese else f" {words} "


def read_maths(text: str, chinese: bool) -> str:
    """Spell out powers, operators, minus signs and Greek letters."""
    language = 1 if chinese else 0

    def spoken(symbol: str) -> str:
        return _say(OPERATORS[symbol][language], chinese)

    power = (lambda m: f"{m[1]}的{m[2]}次方") if chinese else (lambda m: f"{m[1]} to the power of {m[2]}")
    text = re.sub(rf"({OPERAND})\s*\^\s*\(?(\w+)\)?", power, text)
    for symbol in ANYWHERE:
        text = text.replace(symbol, spoken(symbol))
    for symbol in BETWEEN_OPERANDS:
        text = re.sub(rf"({OPERAND})\s*{re.escape(symbol)}{NEXT_OPERAND}\s*", lambda m: m[1] + spoken(symbol), text)
    # a dash is a minus between operands when spaced ("7 - 2") or inside an equation ("7-2=5")
    dash = rf"({OPERAND})\s*-{NEXT_OPERAND}\s*" if "=" in text or "等于" in text else rf"({OPERAND})\s+-\s+{NEXT_OPERAND}"
    text = re.sub(dash, lambda m: m[1] + spoken("-"), text)
    # a leading minus sign: after no digit/bracket in Chinese (as upstream), after a space or bracket in English
    sign = r"(?<![\d)a-zA-Z])-(?=\d)" if chinese else r"(?:(?<=^)|(?<=[\s(:]))-(?=\d)"
    text = re.sub(sign, _say("负" if chinese else "minus", chinese), text)
    for letter, name in GREEK.items():
        text = text.replace(letter, "派" if chinese and letter == "π" else _say(name, chinese))
    return text


def _as_words(match: re.Match, words: str) -> str:
    """`words` in place of `match`, with a space against an adjacent letter or digit."""
    text = match.string
    before = " " if match.start() > 0 and text[match.start() - 1].isalnum() else ""
    after = " " if match.end() < len(text) and text[match.end()].isalnum() else ""
    return before + words + after


def read_numbers(text: str, chinese: bool) -> str:
    """Clock times, years (Chinese 2024年), ordinals and dollars (English), percentages, numbers."""
    number = r"\d{1,3}(?:,\d{3})+(?:\.\d+)?|\d+(?:\.\d+)?"
    clock = r"(?<!\d)([01]?\d|2[0-3]):([0-5]\d)(?!\d)"
    if chinese:
        text = re.sub(clock, lambda m: chinese_integer(int(m[1])) + "点" +
                      (chinese_integer(int(m[2])) + "分" if int(m[2]) else ""), text)
        text = re.sub(r"(\d{4})(?=年)", lambda m: _digits(m[1], True), text)
        text = re.sub(rf"({number})\s*[%％]", lambda m: "百分之" + read_number(m[1], True), text)
        return re.sub(number, lambda m: read_number(m[0], True), text)
    text = re.sub(clock, lambda m: _as_words(m, english_clock(int(m[1]), int(m[2]))), text)
    text = re.sub(r"\b(\d+)(?:st|nd|rd|th)\b", lambda m: _as_words(m, english_ordinal(int(m[1]))), text)
    text = re.sub(rf"({number})\s*%", lambda m: _as_words(m, read_number(m[1], False) + " percent"), text)
    text = re.sub(rf"\$\s*({number})", lambda m: _as_words(m, read_number(m[1], False) + " dollars"), text)
    return re.sub(number, lambda m: _as_words(m, read_number(m[0], False)), text)


def normalize_for_speech(text: str) -> str:
    """Text ready for the TTS embeddings: no tokens/emoji/markdown/URLs, numbers and maths in words."""
    text = SPECIAL_TOKENS.sub("", text)
    text = EMOJI.sub("", text)
    text = strip_markdown(text)
    text = URL.sub(" ", text)
    chinese = bool(CJK.search(text))
    text = read_numbers(read_maths(text, chinese), chinese)
    text = re.sub(r"\s+", " ", text).strip()
    text = re.sub(r"\s+([,.!?;:，。！？、；：])", r"\1", text)
    return text.lower()
