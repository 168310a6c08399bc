"""The one validator helper: every config and optimizer check raises the same kind of message,
``<field>=<value> is invalid: <what is allowed>.`` (pure Python; imported by the configs and the optimizers)."""

from __future__ import annotations

import math
from typing import Any


def check(ok: bool, name: str, value: Any, allowed: str, error: type[Exception] = ValueError) -> None:
    """Raise ``error`` naming the field, its value and what is allowed, unless ``ok``."""
    if not ok:
        raise error(f"{name}={value!r} is invalid: {allowed}.")


def check_choice(name: str, value: Any, choices, error: type[Exception] = ValueError) -> None:
    """``value`` must be one of ``choices``."""
    choices = tuple(choices)
    if value not in choices:
        named = ", ".join(str(c) for c in choices if c is not None)
        unset = " (or null: leave it unset)" if None in choices else ""  # "None" read like a value to type
        raise error(f"{name}={value!r} is unknown: choose one of {named}{unset}.")


def is_number(value: Any) -> bool:
    """A finite int or float (not a bool)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def check_range(
    name: str,
    value: Any,
    low: float,
    high: float,
    *,
    low_open=False,
    high_open=True,
    error: type[Exception] = ValueError,
) -> None:
    """``value`` must be a finite number in the interval; the message names the field, value and interval."""
    ok = (
        is_number(value)
        and (value > low if low_open else value >= low)
        and (value < high if high_open else value <= high)
    )
    if not ok:
        interval = f"{'(' if low_open else '['}{low}, {high}{')' if high_open else ']'}"
        raise error(f"{name}={value!r} is invalid: {name} must be a finite number in {interval}.")
