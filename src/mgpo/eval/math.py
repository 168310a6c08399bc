"""Math word-problem evaluation: answer extraction, numeric comparison, exact-match accuracy."""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterable, Mapping
from decimal import Decimal, InvalidOperation
from pathlib import Path

from tqdm.auto import tqdm

__all__ = ["extract_answer", "evaluate_math", "is_correct", "normalize_number"]

# "1,234.5" (thousands groups) or "1234.5"; a minus sign only when it does not follow a word
# character, so "10-3" yields 10 and 3, not -3.
_NUMBER = re.compile(r"(?<![\w.])-?\d{1,3}(?:,\d{3})+(?:\.\d+)?|(?<![\w.])-?\d+(?:\.\d+)?|(?<=\w)\d+(?:\.\d+)?")


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


def _gold(example: Mapping) -> str:
    if example.get("answer") not in (None, ""):
        gold = extract_answer(str(example["answer"]))
    elif example.get("response") not in (None, ""):
        gold = extract_answer(str(example["response"]))
    else:
        raise KeyError(f"example has no 'answer' or 'response' to take the gold answer from: keys {sorted(example)}")
    if gold is None:
        raise ValueError(f"no number in the gold answer of example {dict(example)!r}; fix the data")
    return gold


def evaluate_math(
    generate: Callable[[list[str]], list[str]],
    examples: Iterable[Mapping],
    template: str,
    out_jsonl: str | Path | None,
    progress: bool = True,
    chunk_size: int = 64,
) -> dict:
    """Exact-match accuracy of ``generate`` on math word problems.

    Args:
        generate: maps a list of prompts to a list of completions, e.g.
            ``functools.partial(mgpo.eval.generate.generate, model, tokenizer, stop=["\\nQ:"])``.
        examples: rows with ``prompt`` (the question) and ``answer`` (or ``response`` ending in ``#### N``).
        template: a key of ``mgpo.data.instruct.TEMPLATES`` (e.g. ``"math"``) or a string with ``{query}``.
        out_jsonl: where to write one row per example (prompt, output, extracted, gold, correct); None: don't write.
        progress: show a progress bar over chunks of prompts.
        chunk_size: prompts handed to ``generate`` at once (rows are written after each chunk).

    Returns: ``{"accuracy", "correct", "total", "no_answer"}``.
    """
    from mgpo.data.instruct import format_prompt  # here: instruct imports this module

    rows = list(examples)
    if not rows:
        raise ValueError("evaluate_math got no examples; pass a non-empty dataset or list of dicts")
    for i, row in enumerate(rows):
        if "prompt" not in row:
            raise KeyError(
                f"example {i} has no 'prompt' key (keys: {sorted(row)}); rename the question column to 'prompt'"
            )
    golds = [_gold(row) for row in rows]
    prompts = [format_prompt(template, str(row["prompt"])) for row in rows]

    handle = None
    if out_jsonl is not None:
        path = Path(out_jsonl)
        path.parent.mkdir(parents=True, exist_ok=True)
        handle = path.open("w", encoding="utf-8")
    correct = no_answer = 0
    try:
        starts = range(0, len(prompts), chunk_size)
        for start in tqdm(starts, desc="math eval", unit="chunk", disable=not progress):
            chunk = prompts[start : start + chunk_size]
            outputs = generate(chunk)
            if len(outputs) != len(chunk):
                raise ValueError(
                    f"generate returned {len(outputs)} outputs for {len(chunk)} prompts; "
                    "it must return exactly one completion per prompt"
                )
            for offset, (prompt, output) in enumerate(zip(chunk, outputs)):
                gold = golds[start + offset]
                extracted = extract_answer(output)
                ok = is_correct(extracted, gold)
                correct += ok
                no_answer += extracted is None
                if handle is not None:
                    record = {"prompt": prompt, "output": output, "extracted": extracted, "gold": gold, "correct": ok}
                    handle.write(json.dumps(record, ensure_ascii=False) + "\n")
    finally:
        if handle is not None:
            handle.close()
    total = len(rows)
    return {"accuracy": correct / total, "correct": correct, "total": total, "no_answer": no_answer}
