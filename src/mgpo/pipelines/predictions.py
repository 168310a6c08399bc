"""Per-example test predictions of a run (``predictions.jsonl`` in its folder): what a verdict over examples as well
as seeds needs (issue 33). One row per test example, in the test split's order (the same rows for every run that
shares ``data.name``, ``data.seed`` and ``data.max_eval_examples``): ``id`` (its index in that split), ``target``,
``prediction`` and, for classification, ``correct``; for regression, ``error`` (prediction - target). A causal-lm
run scored on math problems writes the same file after training from its scored samples (:func:`write_math`):
``target`` the gold answer, ``prediction`` the answer extracted from the output (None for none), ``correct`` as the
benchmark scored it.

No ML library is imported here: the report reads these files too.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

FILE = "predictions.jsonl"


class PredictionRecorder:
    """Wraps a Trainer's ``compute_metrics``: computes the same metrics and keeps the last call's predictions and
    labels, so the test split's predictions are had from the evaluation that scores it (no second pass)."""

    def __init__(self, compute_metrics: Callable[[Any], dict] | None):
        self.compute_metrics = compute_metrics
        self.last: tuple[Any, Any] | None = None

    def __call__(self, pred: Any) -> dict:
        logits = pred.predictions[0] if isinstance(pred.predictions, tuple) else pred.predictions
        self.last = (logits, pred.label_ids)
        return self.compute_metrics(pred) if self.compute_metrics is not None else {}


def rows(task: str, logits: Any, labels: Any) -> list[dict] | None:
    """The rows of ``predictions.jsonl`` for a classification or regression split; None for a shape this does not
    cover (text-to-text's sequence labels, a causal LM's tokens: those tasks keep their own per-sample files)."""
    import numpy as np

    logits, labels = np.asarray(logits), np.asarray(labels)
    if labels.ndim != 1 or len(labels) != len(logits):
        return None
    if task == "regression":
        scores = logits.reshape(len(labels), -1)[:, 0]
        return [
            {"id": i, "target": float(t), "prediction": float(p), "error": float(p - t)}
            for i, (t, p) in enumerate(zip(labels, scores))
        ]
    if logits.ndim != 2:
        return None
    guess = logits.argmax(-1)
    return [
        {"id": i, "target": int(t), "prediction": int(g), "correct": bool(g == t)}
        for i, (t, g) in enumerate(zip(labels, guess))
    ]


def write(out: Path, task: str, logits: Any, labels: Any) -> bool:
    """Write ``out/predictions.jsonl``; False (nothing written) for a shape :func:`rows` does not cover."""
    found = rows(task, logits, labels)
    if found is None:
        return False
    (out / FILE).write_text("".join(json.dumps(r) + "\n" for r in found))
    return True


def write_math(out: Path, samples: Path) -> None:
    """``out/predictions.jsonl`` from the math benchmark's per-sample file (prompts and outputs stay in that file)."""
    with samples.open(encoding="utf-8") as f:
        scored = [json.loads(line) for line in f if line.strip()]
    found = [
        {"id": i, "target": r["gold"], "prediction": r["extracted"], "correct": bool(r["correct"])}
        for i, r in enumerate(scored)
    ]
    (out / FILE).write_text("".join(json.dumps(r) + "\n" for r in found))


def read(run: Path) -> list[dict] | None:
    """A run's per-example predictions, or None when it has none (runs from before they were saved)."""
    path = Path(run) / FILE
    if not path.is_file():
        return None
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
