"""Every evaluated classification or regression run saves its test split's per-example predictions
(predictions.jsonl: id, target, prediction, correct or error), taken from the evaluation that scores the split:
they reproduce the run's own test metric exactly."""

from __future__ import annotations

import random

import numpy as np
import pytest

from mgpo.pipelines import predictions
from mgpo.pipelines.config import load_config
from mgpo.pipelines.train import train
from tests.pipelines.test_train import WORDS, overrides, sentiment_csv, tiny_model_dir  # noqa: F401 (fixtures)


def test_a_classification_run_saves_its_test_predictions(tiny_model_dir, sentiment_csv, tmp_path):
    out = tmp_path / "run"
    metrics = train(load_config(None, overrides(tiny_model_dir, sentiment_csv, out)))
    rows = predictions.read(out)
    assert rows is not None and len(rows) == metrics["data_rows"]["test"]
    assert [r["id"] for r in rows] == list(range(len(rows)))
    assert {r["target"] for r in rows} <= {0, 1} and all(r["correct"] == (r["target"] == r["prediction"]) for r in rows)
    assert np.mean([r["correct"] for r in rows]) == pytest.approx(metrics["test_accuracy"], abs=1e-12)


@pytest.fixture()
def scores_csv(tmp_path):
    rng = random.Random(0)
    lines = ["review,score"]
    for _ in range(120):
        good = rng.random()
        lines.append(f"the movie was {WORDS[0] if good > 0.5 else WORDS[5]} {rng.choice(WORDS[8:])},{good:.3f}")
    path = tmp_path / "scores.csv"
    path.write_text("\n".join(lines) + "\n")
    return path


def test_a_regression_run_saves_predictions_that_give_its_pearson_r(tiny_model_dir, scores_csv, tmp_path):
    from scipy.stats import pearsonr

    out = tmp_path / "run"
    args = overrides(tiny_model_dir, scores_csv, out, "data.task=regression", "data.label_column=score")
    metrics = train(load_config(None, args))
    rows = predictions.read(out)
    assert rows is not None and len(rows) == metrics["data_rows"]["test"]
    assert all(r["error"] == pytest.approx(r["prediction"] - r["target"]) for r in rows)
    r = pearsonr([x["prediction"] for x in rows], [x["target"] for x in rows])[0]
    assert r == pytest.approx(metrics["test_pearson"], abs=1e-5)


def test_shapes_other_than_one_label_per_example_are_not_written(tmp_path):
    # text-to-text and causal LMs have sequence labels: they keep their own per-sample files
    assert not predictions.write(tmp_path, "classification", np.zeros((4, 3, 5)), np.zeros((4, 3)))
    assert predictions.read(tmp_path) is None
