"""Answer extraction from free-form generations: GSM8K-style final numbers and CSQA-style choice letters.

Numbers come back normalised ("$1,234.50" → "1234.5", "5.00" → "5", "+3" → "3") so that string equality is
already meaningful; fractions stay fractions ("3/4") and ``numbers_equal`` compares them by value.
"""

from __future__ import annotations

import re
from fractions import Fraction

# A number as models write it. The sign only counts where it cannot be a binary minus ("5-3" ends in 3, not -3);
# "$" may sit before or after the sign; units, "%" and sentence-final "." glued after it are left out.
_NUMBER = re.compile(
    r"""
    (?:(?<![\w)\]])(?P<sign>[-+\u2212]))?   # "-3", "+3", "−3" (unicode minus)
    (?:\$\s*)?                              # "$42", "$ 42", "-$5"; no space after a bare sign ("5 - 3")
    (?<![\d.])                              # not the tail of "1.2.3" or of a failed "1,0000"
    (?P<body>
        (?:\d{1,3}(?:,\d{3})+(?!\d) | \d+ | (?=\.\d))   # "1,234,567", "42", or nothing before ".5"
        (?:\.\d+)?
        (?:\s*/\s*\d+)?                     # "3/4", "3 / 4"
    )
    """,
    re.VERBOSE,
)
_HASHES = re.compile(r"####")
_ANSWER_IS = re.compile(r"answer\s*(?:is\b\s*:?|:)", re.IGNORECASE)
# After "The answer is" the number has to follow closely and in the same sentence; otherwise "Answer: Tom had 5
# apples ... so 12 in all" would report 5, and the last number is the better guess.
_MAX_FILLER = 40
_SENTENCE_END = re.compile(r"[.!?](?:\s|$)")


def _plain_decimal(digits: str) -> str:
    """ "007" → "7", "5.00" → "5", "2.50" → "2.5", ".5" → "0.5"."""
    whole, _, frac = digits.partition(".")
    whole, frac = whole.lstrip("0") or "0", frac.rstrip("0")
    return f"{whole}.{frac}" if frac else whole


def _normalise(match: re.Match[str]) -> str:
    body = re.sub(r"[\s,]", "", match["body"])
    num, slash, den = body.partition("/")
    value = _plain_decimal(num) + (slash + _plain_decimal(den) if slash else "")
    negative = match["sign"] in ("-", "\u2212") and value.strip("0./") != ""  # no "-0"
    return ("-" if negative else "") + value


def _number_after_last(marker: re.Pattern[str], text: str, max_filler: int | None) -> str | None:
    """The first number after the last ``marker``, if it follows within ``max_filler`` chars (None: anywhere)."""
    markers = list(marker.finditer(text))
    if not markers:
        return None
    last = markers[-1]
    found = _NUMBER.search(text, last.end())  # search(text, pos) keeps the look-behind context
    if found is None:
        return None
    if max_filler is not None:
        filler = text[last.end() : found.start()]
        if len(filler) > max_filler or _SENTENCE_END.search(filler):
            return None
    return _normalise(found)


def extract_number(text: str) -> str | None:
    """The final numeric answer of a generation, normalised; None when the text holds no number.

    Priority: the number after the last "####"; else the one right after the last "The answer is" / "Answer:"
    (case-insensitive, same sentence, within 40 chars); else the last number in the text. Normalisation drops "$",
    thousands commas, "%", a leading "+", trailing zeros of decimals and glued units ("42kg" → "42"); "-" is kept
    for negatives. A fraction "3/4" is returned as "3/4" (``numbers_equal`` compares it by value).
    """
    for marker, max_filler in ((_HASHES, None), (_ANSWER_IS, _MAX_FILLER)):
        answer = _number_after_last(marker, text, max_filler)
        if answer is not None:
            return answer
    matches = list(_NUMBER.finditer(text))
    return _normalise(matches[-1]) if matches else None


def _as_fraction(number: str) -> Fraction | None:
    try:
        return Fraction(number)
    except (ValueError, ZeroDivisionError):
        return None


def numbers_equal(pred: str | None, gold: str) -> bool:
    """Whether a predicted answer matches the gold one.

    Both sides go through ``extract_number`` (idempotent on its own output, so raw text works too), then compare by
    value when both parse (|diff| < 1e-6; "3/4" equals "0.75"), else as stripped strings.
    """
    if pred is None:
        return False
    p, g = extract_number(pred), extract_number(gold)
    if p is None or g is None:
        return pred.strip() == gold.strip()
    fp, fg = _as_fraction(p), _as_fraction(g)
    if fp is not None and fg is not None:
        return abs(float(fp - fg)) < 1e-6
    return p == g


# "A" or "I" followed by a lowercase word is an English word ("A person", "I think"), not a label ("C is right" is
# one); "E.g." is an abbreviation. "A.", "A:", "A\n", "(A)" still count.
_NOT_A_WORD = r"(?!(?<=[AI])[ \t]+[a-z])(?!\.[A-Za-z])"


def _choice_patterns(labels: str) -> list[tuple[re.Pattern[str], bool]]:
    """(pattern, use the last match) in priority order; group 1 is the label."""
    upper = "[" + re.escape(labels) + "]"
    either = "[" + re.escape(labels + labels.lower()) + "]"
    return [
        # An explicit statement beats a listing of options, and the last statement is the final one.
        (re.compile(rf"(?i:answer)\s*(?:(?i:is)\b\s*:?|:)\s*\(?({upper})(?![\w']){_NOT_A_WORD}"), True),
        (re.compile(rf"\(({either})\)"), False),  # "(C)", "(c)"
        (re.compile(rf"(?<![\w(])({upper})\)"), False),  # "C) store"
        # A standalone label; the first one, which is the one at the start (" C", "C.", "C:") when there is one.
        (re.compile(rf"(?<![\w'])({upper})(?![\w']){_NOT_A_WORD}"), False),
    ]


def extract_choice(text: str, labels: str = "ABCDE") -> str | None:
    """The option letter a multiple-choice generation picks (upper case), or None.

    In order: the last "answer is C" / "Answer: (C)"; the first "(C)"; the first "C)"; the first standalone label
    letter (at the start or anywhere, word-bounded). "A" as an article ("A person ...") is not a label.
    """
    for pattern, use_last in _choice_patterns(labels):
        matches = list(pattern.finditer(text))
        if matches:
            return matches[-1 if use_last else 0][1].upper()
    return None
