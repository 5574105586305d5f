"""Streaming sentence chunker: LLM text deltas -> normalised units to synthesise one at a time."""

from __future__ import annotations

from tts.speech_text import normalize_for_speech

CUT_AFTER = frozenset(",.!?;:。，！？、；：\n")
NUMBER_PUNCTUATION = frozenset(",.:")  # inside 1,234 / 3.14 / 10:30 they do not end a unit
MIN_CHARS = 5
FIRST_UNIT_MAX_CHARS = 100  # a first unit without punctuation is cut at a space from here (about 18 English words)


def speakable(unit: str) -> bool:
    """True if `unit` holds a letter or digit (something the TTS can say)."""
    return any(ch.isalnum() for ch in unit)


class SentenceChunker:
    """Cuts after punctuation or a newline once the unit has `min_chars` speakable characters.

    The first unit of a reply is cut at its first punctuation mark whatever its length, so speech
    starts early; a trailing comma there becomes a full stop (upstream does the same to end the
    first sentence with a falling tone). A first unit that reaches `first_max_chars` characters
    without punctuation is cut at its last space before there (text without spaces waits for
    punctuation or a space), so a long opening clause does not hold back the first audio.
    `flush()` ends the reply; the next `push` starts a new one.
    Units come out normalised by `normalize_for_speech`; text without letters or digits is
    never a unit on its own.
    """

    def __init__(self, min_chars: int = MIN_CHARS, first_max_chars: int = FIRST_UNIT_MAX_CHARS) -> None:
        self.min_chars = min_chars
        self.first_max_chars = first_max_chars
        self._text = ""
        self._scanned = 0
        self._first = True

    def push(self, delta: str) -> list[str]:
        """Add a text delta; return the units it completes."""
        self._text += delta
        units = []
        i = self._scanned
        while i < len(self._text):
            if self._text[i] in CUT_AFTER:
                if self._inside_number(i):
                    if i + 1 == len(self._text):
                        break  # wait for the next character to decide
                else:
                    unit = normalize_for_speech(self._text[: i + 1])
                    if speakable(unit) and len(unit) >= (1 if self._first else self.min_chars):
                        units.append(self._finish(unit))
                        self._text = self._text[i + 1 :]
                        i = 0
                        continue
            if self._first and i + 1 >= self.first_max_chars and (space := self._space_cut(i)):
                units.append(self._finish(normalize_for_speech(self._text[:space])))
                self._text = self._text[space + 1 :]
                i -= space  # the character after i, in the text left
                continue
            i += 1
        self._scanned = i
        return units

    def _space_cut(self, i: int) -> int:
        """Where a long first unit is cut, scanned up to `i`: its last space there, if what comes before
        it is speakable (else 0: no cut yet)."""
        space = self._text.rfind(" ", 0, i + 1)
        return space if space > 0 and speakable(normalize_for_speech(self._text[:space])) else 0

    def flush(self) -> list[str]:
        """End the reply: return what is left as a last unit (if speakable) and reset."""
        unit = normalize_for_speech(self._text)
        units = [self._finish(unit)] if speakable(unit) else []
        self._text, self._scanned, self._first = "", 0, True
        return units

    def _inside_number(self, i: int) -> bool:
        """True if the mark at i follows a digit and is, or may be, followed by one."""
        text = self._text
        if text[i] not in NUMBER_PUNCTUATION or i == 0 or not text[i - 1].isdigit():
            return False
        return i + 1 == len(text) or text[i + 1].isdigit()

    def _finish(self, unit: str) -> str:
        if self._first and unit[-1] in ",，":
            unit = unit[:-1] + ("。" if unit[-1] == "，" else ".")
        self._first = False
        return unit
