"""A run's log: ``log.jsonl`` (every logged row) and ``log.csv`` (the training rows, fixed columns).

Read by ``mgpo report`` and written by :class:`mgpo.pipelines.callbacks.StepLog` during training. This module
imports no machine-learning library (``mgpo report`` reads runs without transformers or torch)."""

from __future__ import annotations

import csv
import io
import json
import warnings
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from mgpo.pipelines.checkpoints import write_atomic

LOG_FIELDS = (
    "step",
    "epoch",
    "loss",
    "clean_loss",
    "learning_rate",
    "grad_norm",
    "perturbation_norm",
    "momentum_norm",
    "gbar_mean",
    "skipped_steps",
    "eval_loss",
)

# Keys of the rows logged once training is over (the Trainer's summary, the final evaluations): a resumed run
# logs them again, so a rewrite of the log drops them.
END_OF_RUN_KEYS = ("train_runtime", "validation_", "test_")

# Methods whose training forwards run at perturbed weights: their logged `loss` is not the clean loss.
PERTURBED_FORWARD = ("mgpo", "msam", "random", "ggpo")


def _end_of_run(row: dict[str, Any]) -> bool:
    return any(k.startswith(END_OF_RUN_KEYS) for k in row)


def _has_csv_column(row: dict[str, Any]) -> bool:
    """The final summary and test metrics have no CSV column."""
    return any(k in row for k in LOG_FIELDS[2:])


def read_log(path: Path) -> list[dict]:
    """The rows of a ``log.jsonl``. A last line cut short (a kill while it was written) is dropped with a warning
    naming the file; a damaged line before it is an error naming the file and the line."""
    if not path.is_file():
        return []
    lines = path.read_text(errors="replace").splitlines()
    rows = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError as err:
            if number == len(lines):
                warnings.warn(
                    f"{path}: its last line is incomplete (a write was interrupted) and is ignored: {line[:80]!r}",
                    RuntimeWarning,
                    stacklevel=2,
                )
                continue
            raise ValueError(
                f"{path}, line {number}, is not a JSON row ({err.msg}): {line[:80]!r}. Delete that "
                "line (or the file) to go on."
            ) from None
    return rows


def cut_log(jsonl: Path, csv_path: Path, step: int) -> None:
    """Rewrite both files (atomically) to the rows up to ``step`` that a checkpoint at that step had seen: no
    row past it, and no end-of-run row (a resumed session logs those again)."""
    kept = [r for r in read_log(jsonl) if r.get("step", 0) <= step and not _end_of_run(r)]
    write_atomic(jsonl, "".join(json.dumps(r) + "\n" for r in kept))
    table = io.StringIO()
    writer = csv.DictWriter(table, LOG_FIELDS, extrasaction="ignore")
    writer.writeheader()
    writer.writerows(r for r in kept if _has_csv_column(r))
    write_atomic(csv_path, table.getvalue())


def append_row(jsonl: Path, csv_path: Path, row: dict[str, Any]) -> None:
    """One logged row: always in ``log.jsonl``, in ``log.csv`` when it has a column there."""
    with jsonl.open("a") as f:
        f.write(json.dumps(row) + "\n")
    if _has_csv_column(row):
        with csv_path.open("a", newline="") as f:
            csv.DictWriter(f, LOG_FIELDS, extrasaction="ignore").writerow(row)


def numeric_row(step: int, logs: dict[str, Any] | None) -> dict[str, Any]:
    """A Trainer log line as a row: its step and its numbers."""
    return {"step": step, **{k: v for k, v in (logs or {}).items() if isinstance(v, (int, float))}}


def final_losses(rows: Iterable[dict[str, Any]]) -> dict[str, float | None]:
    """``final_``/``best_`` of the loss the steps saw (perturbed for MGPO) and of the clean probe."""
    rows = list(rows)
    found: dict[str, float | None] = {}
    for key in ("loss", "clean_loss"):
        values = [r[key] for r in rows if key in r]
        found[f"final_{key}"] = values[-1] if values else None
        found[f"best_{key}"] = min(values) if values else None
    return found


def as_trained_label(method: str) -> str:
    """What the logged `loss` of a run with this perturbation method is, for plot labels."""
    return "training loss at the perturbed weights" if method in PERTURBED_FORWARD else "training loss as trained"
