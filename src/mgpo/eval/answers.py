"""Reading a final number out of a model's answer, and comparing numbers (no mgpo imports: data and eval use it)."""

from __future__ import annotations

import re
from decimal import Decimal, InvalidOperation

__all__ = ["extract_answer", "is_correct", "normalize_number"]

# "1,234.5" (thousands groups) or "1234.5"; a minus sign only when it does not follow a word
# character, so "10-3" yields 10 and 3, not -3; "-$5" is -5 (the "$" is dropped by normalize_number).
_NUMBER = re.compile(
    r"(?<![\w.])(?:-\$?)?\d{1,3}(?:,\d{3})+(?:\.\d+)?|(?<![\w.])(?:-\$?)?\d+(?:\.\d+)?"
    r"|(?<=\w)\d+(?:\.\d+)?"
)


def normalize_number(text: str) -> str | None:
    """Canonical text of a number, or None if ``text`` is not one.

    ``"1,234"`` -> ``"1234"``, ``"$5"`` -> ``"5"``, ``"5.0"`` -> ``"5"``, ``"7."`` -> ``"7"``.
    """
    cleaned = text.strip().replace(",", "").replace("$", "").rstrip(".")
    try:
        value = Decimal(cleaned)
    except InvalidOperation:
        return None
    if not value.is_finite():
        return None
    if value == value.to_integral_value():
        return str(int(value))
    return format(value.normalize(), "f")


def extract_answer(text: str | None) -> str | None:
    """The number after the last ``####`` if present, else the last number in ``text`` (normalised)."""
    if not text:
        return None
    if "####" in text:
        tail = text.rsplit("####", 1)[1]
        match = _NUMBER.search(tail)
        if match:
            return normalize_number(match.group())
    numbers = _NUMBER.findall(text)
    if not numbers:
        return None
    return normalize_number(numbers[-1])


def _as_number(value: object) -> Decimal | None:
    if value is None:
        return None
    text: str | None
    if isinstance(value, (int, float, Decimal)) and not isinstance(value, bool):
        text = str(value)
    else:
        text = normalize_number(str(value)) or extract_answer(str(value))
    if text is None:
        return None
    try:
        return Decimal(text)
    except InvalidOperation:
        return None


def is_correct(pred: object, gold: object) -> bool:
    """Numeric equality of two answers (strings like ``"$1,234.0"``, ints, floats); False if either is missing."""
    a, b = _as_number(pred), _as_number(gold)
    if a is None or b is None:
        return False
    return abs(a - b) <= Decimal("1e-6") * max(Decimal(1), abs(b))
