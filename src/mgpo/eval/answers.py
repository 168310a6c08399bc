"""Reading a final number out of a model's answer, and comparing numbers (no mgpo imports: data and eval use it).

The rule (``SCORER``, recorded with every score): the number after the first ``####``, else after the first "the
answer is"; with neither, the last number of the output, unless generation's ``max_new_tokens`` cut the output
short, when there is no answer (the last number of a cut-off chain is a half-written step, not an answer). A marked
answer that is not a number ("the answer is: \\frac{1}{2}") is no answer, not the last digit in it. Numbers
compare exactly, as fractions ("12.0" = "12", "7/2" = "3.5"), never within a tolerance.
"""

from __future__ import annotations

import re
from fractions import Fraction

__all__ = ["SCORER", "extract_answer", "is_correct", "normalize_number"]

SCORER = "math-v2"  # v1 (until 2026-12-07): the last "####", a cut-off output's last number, a 1e-6 tolerance

# "1,234.5" (thousands groups), "1234.5", "1e3", "7/2"; a minus sign only when it does not follow a word character,
# so "10-3" yields 10 and 3, not -3; "-$5" is -5 (the "$" is dropped by normalize_number). A number glued to a word
# ("x12") is still read, without a sign.
_DIGITS = r"(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?(?:[eE][+-]?\d+)?"
_NUMBER = re.compile(
    rf"(?<![\w.])(?:-\$?)?{_DIGITS}(?:/\d+(?![\d.]))?|(?<=[^\W\d])\d+(?:\.\d+)?"  # a/b only with a whole divisor
)
_MARKERS = (re.compile(r"####"), re.compile(r"the answer is\s*:?", re.IGNORECASE))
_MINUS = str.maketrans({"\u2212": "-", "\u2013": "-"})  # the Unicode minus and en dash some tokenizers emit


def _value(text: str) -> Fraction | None:
    cleaned = text.strip().translate(_MINUS).replace(",", "").replace("$", "").rstrip(".")
    try:
        return Fraction(cleaned)
    except (ValueError, ZeroDivisionError):
        return None


def normalize_number(text: str) -> str | None:
    """Canonical text of a number, or None if ``text`` is not one.

    ``"1,234"`` -> ``"1234"``, ``"$5"`` -> ``"5"``, ``"5.0"`` -> ``"5"``, ``"7."`` -> ``"7"``, ``"7/2"`` ->
    ``"3.5"``, ``"1/3"`` -> ``"1/3"`` (no finite decimal), ``"1e3"`` -> ``"1000"``.
    """
    value = _value(text)
    if value is None:
        return None
    if value.denominator == 1:
        return str(value.numerator)
    d = value.denominator
    while d % 2 == 0:
        d //= 2
    while d % 5 == 0:
        d //= 5
    if d != 1:
        return f"{value.numerator}/{value.denominator}"
    places = 0
    while (value * 10**places).denominator != 1:
        places += 1
    return f"{float(value):.{places}f}" if places < 15 else f"{value.numerator}/{value.denominator}"


def extract_answer(text: str | None, *, complete: bool = True) -> str | None:
    """The answer ``text`` gives (see the module's rule), normalised; None for none.

    ``complete=False``: generation's ``max_new_tokens`` ended the output, so only a marked answer counts."""
    if not text:
        return None
    text = text.translate(_MINUS)
    for marker in _MARKERS:
        found = marker.search(text)
        if found is None:
            continue
        rest = text[found.end() :].lstrip(" \t*:")
        match = _NUMBER.match(rest.lstrip("$"))
        if match:
            return normalize_number(match.group())
        if rest.split("\n", 1)[0].strip():  # an answer that is not a number ("\\frac{1}{2}", "none"): none we can read
            return None
    if not complete:
        return None
    numbers = _NUMBER.findall(text)
    return normalize_number(numbers[-1]) if numbers else None


def _as_number(value: object) -> Fraction | None:
    if value is None or isinstance(value, bool):
        return None
    if isinstance(value, int):
        return Fraction(value)
    text = normalize_number(str(value)) or extract_answer(str(value))
    return None if text is None else _value(text)


def is_correct(pred: object, gold: object) -> bool:
    """Exact numeric equality of two answers (strings like ``"$1,234.0"``, ints); False if either is missing."""
    a, b = _as_number(pred), _as_number(gold)
    return a is not None and b is not None and a == b
