"""Math word-problem evaluation: answer extraction, numeric comparison, exact-match accuracy."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path

from tqdm.auto import tqdm

from mgpo.data.instruct import format_prompt
from mgpo.eval.answers import SCORER, extract_answer, is_correct, normalize_number

__all__ = ["SCORER", "extract_answer", "evaluate_math", "is_correct", "has_gold", "normalize_number", "rescore"]


def has_gold(example: Mapping) -> bool:
    """Whether ``example`` has a gold answer this rule can read: MetaMathQA's MATH problems end "The answer is:
    \\frac{1}{2}", which is none (read as a number it was 2, and a prediction of 3/2 passed)."""
    try:
        _gold(example)
    except (KeyError, ValueError):
        return False
    return True


def _gold_text(example: Mapping) -> str:
    """The text the gold answer is read from: ``answer``, else ``response``."""
    for key in ("answer", "response"):
        if example.get(key) not in (None, ""):
            return str(example[key])
    raise KeyError(f"example has no 'answer' or 'response' to take the gold answer from: keys {sorted(example)}")


def _gold(example: Mapping) -> str:
    gold = extract_answer(_gold_text(example))
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

    Returns: ``{"accuracy", "correct", "total", "no_answer", "hit_max_new_tokens", "scorer"}``;
    ``hit_max_new_tokens`` counts the outputs that generation's ``max_new_tokens`` ended (a
    :class:`mgpo.eval.generate.Completion` says so), which count only with a marked answer (``####``, "the answer
    is"); ``scorer`` names the rule (:data:`mgpo.eval.answers.SCORER`).
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
    texts = [_gold_text(row) for row in rows]
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
                hit = bool(getattr(output, "hit_max_new_tokens", False))
                extracted = extract_answer(output, complete=not hit)
                ok = is_correct(extracted, gold)
                correct += ok
                no_answer += extracted is None
                cut += hit
                if handle is not None:
                    record = {
                        "prompt": prompt,
                        "output": output,
                        "extracted": extracted,
                        "gold": gold,
                        "gold_text": texts[start + offset],  # what the gold was read from: rescore reads it again
                        "correct": ok,
                        "hit_max_new_tokens": hit,
                    }
                    handle.write(json.dumps(record, ensure_ascii=False) + "\n")
    finally:
        if handle is not None:
            handle.close()
    return _summary(correct, len(rows), no_answer, cut)


def _summary(correct: int, total: int, no_answer: int, cut: int) -> dict:
    return {
        "accuracy": correct / total,
        "correct": correct,
        "total": total,
        "no_answer": no_answer,
        "hit_max_new_tokens": cut,
        "scorer": SCORER,
    }


def rescore(samples: str | Path, write: bool = True) -> dict:
    """Score a per-sample file of :func:`evaluate_math` again with today's rule, without generating again: each
    row's ``extracted`` and ``correct`` are rewritten from its ``output`` and ``hit_max_new_tokens``, and its
    ``gold`` is read again from ``gold_text`` (files written before it was kept keep their golds as first read);
    the file is replaced only once every row is read. Returns what :func:`evaluate_math` returns, with
    ``golds_kept``: the rows whose gold could not be read again. Refuses a file where today's rule reads no number
    in some row's gold text: those rows would leave the score, and a run's score is over the rows it was given.
    ``write=False`` scores without replacing the file."""
    path = Path(samples)
    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    if not rows:
        raise ValueError(f"{path} has no scored samples to score again")
    missing = [k for k in ("output", "gold", "hit_max_new_tokens") if k not in rows[0]]
    if missing:
        raise ValueError(f"{path} is not a math per-sample file of evaluate_math: its rows lack {missing}")
    correct = no_answer = cut = kept = 0
    unread = []
    for i, row in enumerate(rows):
        row["extracted"] = extract_answer(row["output"], complete=not row["hit_max_new_tokens"])
        if "gold_text" in row:
            row["gold"] = extract_answer(row["gold_text"])
            if row["gold"] is None:
                unread.append(i)
        else:
            kept += 1
        row["correct"] = is_correct(row["extracted"], row["gold"])
        correct += row["correct"]
        no_answer += row["extracted"] is None
        cut += bool(row["hit_max_new_tokens"])
    if unread:
        raise ValueError(
            f"{path}: today's rule ({SCORER}) reads no number in the gold answer of {len(unread)} rows (rows "
            f"{', '.join(map(str, unread[:5]))}{', ...' if len(unread) > 5 else ''}); a run is scored over every row "
            "it was given, so it cannot be scored again: evaluate it again (its rows without a gold are then left out "
            "and counted)"
        )
    if write:
        partial = path.with_suffix(path.suffix + ".partial")
        partial.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
        partial.replace(path)
    return {**_summary(correct, len(rows), no_answer, cut), "golds_kept": kept}
