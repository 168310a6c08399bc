"""Math word-problem evaluation: answer extraction, numeric comparison, exact-match accuracy."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path

from tqdm.auto import tqdm

from mgpo.data.instruct import format_prompt
from mgpo.eval.answers import extract_answer, is_correct, normalize_number

__all__ = ["extract_answer", "evaluate_math", "is_correct", "normalize_number"]


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

    Returns: ``{"accuracy", "correct", "total", "no_answer", "hit_max_new_tokens"}``; the last counts the outputs
    that generation's ``max_new_tokens`` ended (a :class:`mgpo.eval.generate.Completion` says so), whose answer
    may be cut short.
    """
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
    correct = no_answer = cut = 0
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
                hit = bool(getattr(output, "hit_max_new_tokens", False))
                cut += hit
                if handle is not None:
                    record = {
                        "prompt": prompt,
                        "output": output,
                        "extracted": extracted,
                        "gold": gold,
                        "correct": ok,
                        "hit_max_new_tokens": hit,
                    }
                    handle.write(json.dumps(record, ensure_ascii=False) + "\n")
    finally:
        if handle is not None:
            handle.close()
    total = len(rows)
    return {
        "accuracy": correct / total,
        "correct": correct,
        "total": total,
        "no_answer": no_answer,
        "hit_max_new_tokens": cut,
    }
