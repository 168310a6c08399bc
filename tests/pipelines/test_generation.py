"""``mgpo train`` with data.task=causal-lm: a tiny random Llama saved locally, the generated arithmetic data,
math accuracy before and after, and every sample written for inspection."""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from mgpo.data.arithmetic import make_arithmetic
from mgpo.pipelines import predictions
from mgpo.pipelines.config import ConfigError, load_config
from mgpo.pipelines.train import train
from tests.tiny import bpe_tokenizer


@pytest.fixture(scope="module")
def tiny_llama_dir(tmp_path_factory) -> Path:
    from transformers import LlamaConfig, LlamaForCausalLM

    corpus = [r["prompt"] + " " + r["response"] for r in make_arithmetic(n_train=200, n_test=20)["train"]]
    fast = bpe_tokenizer(corpus, vocab_size=300)
    folder = tmp_path_factory.mktemp("tiny-llama")
    fast.save_pretrained(folder)
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(fast),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        pad_token_id=fast.pad_token_id,
        eos_token_id=fast.eos_token_id,
        bos_token_id=None,
    )
    LlamaForCausalLM(config).save_pretrained(folder)
    return folder


def tiny_config(model_dir: Path, out: Path, *settings: str):
    """A causal-lm run of the tiny Llama into ``out``, without progress bars, with ``settings``."""
    return load_config(
        None,
        [
            f"model.name={model_dir}",
            "data.task=causal-lm",
            f"training.output_dir={out}",
            "training.progress=false",
            *settings,
        ],
    )


@pytest.mark.parametrize("method", ["mgpo", "sam"])
def test_causal_lm_run_on_arithmetic_with_before_and_after_accuracy(tiny_llama_dir, tmp_path, method, monkeypatch):
    import transformers

    loops = []  # how each evaluation ran: a causal LM's keeps no logits (every token's: 25 GB for 1000 problems)
    loop = transformers.Trainer.evaluation_loop

    def spied(self, *args, **kwargs):
        loops.append((kwargs.get("metric_key_prefix"), kwargs.get("prediction_loss_only")))
        return loop(self, *args, **kwargs)

    monkeypatch.setattr(transformers.Trainer, "evaluation_loop", spied)
    out = tmp_path / "run"
    cfg = tiny_config(
        tiny_llama_dir,
        out,
        "model.max_length=96",
        "data.name=arithmetic",
        "data.max_train_examples=64",
        "data.max_eval_examples=8",
        f"perturbation.method={method}",
        "training.max_steps=4",
        "training.batch_size=8",
        "training.lr=3e-3",
        "generation.max_new_tokens=12",
        "generation.before_training=true",
    )
    metrics = train(cfg)
    assert loops and all(loss_only is True for _, loss_only in loops), loops
    for prefix in ("before", "after"):
        assert 0.0 <= metrics[f"{prefix}_accuracy"] <= 1.0
        rows = [json.loads(line) for line in (out / f"{prefix}_math.jsonl").read_text().splitlines()]
        assert len(rows) == 8 and {"prompt", "output", "extracted", "gold", "correct"} <= set(rows[0])
    # the trained model's answers as per-example predictions (the report's interval over examples and seeds)
    kept = predictions.read(out)
    assert kept is not None and [r["id"] for r in kept] == list(range(8))
    assert [(r["target"], r["prediction"], r["correct"]) for r in kept] == [
        (r["gold"], r["extracted"], r["correct"]) for r in rows
    ]
    assert sum(r["correct"] for r in kept) / 8 == pytest.approx(metrics["after_accuracy"])
    assert metrics["train_examples"] + metrics["dropped_examples"] == 64 and "truncated_examples" in metrics
    assert (out / "adapter").is_dir() and (out / "loss.png").is_file()
    assert metrics["final_clean_loss"] > 0 and metrics["best_clean_loss"] <= metrics["final_clean_loss"]


def test_long_examples_are_truncated_and_counted(tiny_llama_dir, tmp_path):
    data = tmp_path / "long.jsonl"
    data.write_text(
        "".join(
            json.dumps({"prompt": f"Q{i}", "response": "1 + 1 = 2. " * (40 if i % 2 else 1)}) + "\n" for i in range(16)
        )
    )
    cfg = tiny_config(
        tiny_llama_dir,
        tmp_path / "run",
        "model.max_length=32",
        f"data.name={data}",
        "data.template=math",
        "training.max_steps=2",
        "training.batch_size=4",
        "generation.benchmark=none",
    )
    metrics = train(cfg)
    assert metrics["truncated_examples"] == 8


def test_best_checkpoint_needs_a_validation_split_and_says_how_to_get_one(tiny_llama_dir, tmp_path):
    data = tmp_path / "instruct.jsonl"  # no test rows, none held out: causal-lm data without a validation split
    data.write_text("".join(json.dumps({"prompt": f"Say {i}.", "response": f"{i}"}) + "\n" for i in range(16)))
    cfg = tiny_config(
        tiny_llama_dir,
        tmp_path / "run",
        f"data.name={data}",
        "data.template=alpaca",
        "training.max_steps=4",
        "training.batch_size=4",
        "training.eval_steps=2",
        "training.save_steps=2",
        "training.load_best_model=true",
        "generation.benchmark=none",
    )
    with pytest.raises(ConfigError, match="data.max_eval_examples"):
        train(cfg)


def test_a_math_benchmark_without_a_test_split_is_named_before_training(tiny_llama_dir, tmp_path, capsys):
    data = tmp_path / "math.jsonl"  # final answers, no test rows, none held out
    data.write_text(
        "".join(
            json.dumps({"prompt": f"What is {i} + 1?", "response": f"{i} + 1 = {i + 1}. The answer is {i + 1}."}) + "\n"
            for i in range(16)
        )
    )

    def cfg(bench, out):
        return tiny_config(
            tiny_llama_dir,
            out,
            f"data.name={data}",
            "data.template=math",
            "training.max_steps=2",
            "training.batch_size=4",
            f"generation.benchmark={bench}",
        )

    with pytest.raises(ValueError, match="benchmark='math' needs a test split.*data.max_eval_examples"):
        train(cfg("math", tmp_path / "math"))
    assert not (tmp_path / "math" / "checkpoints").exists()  # refused before any training
    metrics = train(cfg("auto", tmp_path / "auto"))
    assert "after_accuracy" not in metrics
    assert "benchmark=auto" in capsys.readouterr().out  # said, not silent


def test_choosing_the_checkpoint_on_the_scored_rows_is_said():
    import datasets

    from mgpo.pipelines.generation import check_benchmark

    rows = datasets.Dataset.from_dict({"prompt": ["1 + 1?"], "response": ["2"], "answer": ["2"]})
    data = SimpleNamespace(train=rows, test=rows, validation=rows)
    with pytest.warns(RuntimeWarning, match="optimistic"):
        check_benchmark(
            load_config(
                None,
                [
                    "model.name=smollm2-135m",
                    "data.task=causal-lm",
                    "training.eval_steps=2",
                    "training.save_steps=2",
                    "training.load_best_model=true",
                ],
            ),
            data,
        )
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        check_benchmark(load_config(None, ["model.name=smollm2-135m", "data.task=causal-lm"]), data)  # last step scored


def test_humaneval_where_the_answers_cannot_be_hidden_is_refused_before_training(monkeypatch):
    import datasets

    from mgpo.eval.sandbox import isolation
    from mgpo.pipelines.generation import check_benchmark

    rows = datasets.Dataset.from_dict({"prompt": ["Write f."], "response": ["def f(): pass"]})
    data = SimpleNamespace(train=rows, test=None)
    base = ["model.name=smollm2-135m", "data.task=causal-lm", "generation.benchmark=humaneval"]
    monkeypatch.setattr(isolation.shutil, "which", lambda name: None)  # no bubblewrap: process isolation
    isolation.runner.cache_clear()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the sandbox's own fallback warning
            with pytest.raises(ValueError, match="answers are on disk.*generation.allow_visible_answers=true"):
                check_benchmark(load_config(None, base), data)
            check_benchmark(load_config(None, [*base, "generation.allow_visible_answers=true"]), data)
    finally:
        isolation.runner.cache_clear()


@pytest.mark.parametrize(
    "bench,extra,expected",
    [
        ("humaneval", ["generation.num_samples=2"], {"after_pass@1", "after_pass@2"}),
        ("mtbench", [], {"after_judged"}),
    ],
)
def test_code_and_dialogue_benchmarks_run_end_to_end(tiny_llama_dir, tmp_path, bench, extra, expected):
    data = tmp_path / "instruct.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"Say {i}.", "response": f"{i}"}) + "\n" for i in range(16)))
    out = tmp_path / "run"
    cfg = tiny_config(
        tiny_llama_dir,
        out,
        "model.max_length=200",
        f"data.name={data}",
        "data.template=alpaca",
        "training.max_steps=2",
        "training.batch_size=4",
        f"generation.benchmark={bench}",
        "generation.max_examples=2",
        "generation.max_new_tokens=8",
        *extra,
    )
    metrics = train(cfg)
    assert expected <= set(metrics), sorted(metrics)
    rows = (out / f"after_{bench}.jsonl").read_text().splitlines()
    assert len(rows) >= 2
    if bench == "mtbench":
        assert metrics["after_judged"] is False and "not judged" in metrics["after_message"]
    else:
        assert metrics["after_answers_visible"] is False and json.loads(rows[0])["answers_visible"] is False


def test_mgpo_rescore_rewrites_a_runs_math_scores_from_its_kept_answers(tmp_path):
    """A run scored by the earlier rule (a cut-off output's last number counted): `mgpo rescore` rewrites its
    per-sample file, the after_* metrics (keeping the samples' path) and predictions.jsonl; it refuses a folder
    without kept answers by name, with exit code 2."""
    from typer.testing import CliRunner

    from mgpo.cli import app

    run = tmp_path / "LoRA-s0"
    run.mkdir()
    rows = [
        {
            "prompt": "a",
            "output": "44 + 4 = 4",
            "extracted": "4",
            "gold": "4",
            "correct": True,
            "hit_max_new_tokens": True,
        },
        {
            "prompt": "b",
            "output": "#### 5",
            "extracted": "5",
            "gold": "5",
            "correct": True,
            "hit_max_new_tokens": False,
        },
    ]
    (run / "after_math.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    kept = {"after_accuracy": 1.0, "after_correct": 2, "after_samples": "runs/x/LoRA-s0/after_math.jsonl", "steps": 30}
    (run / "metrics.json").write_text(json.dumps(kept))
    result = CliRunner().invoke(app, ["rescore", str(run)])
    assert result.exit_code == 0, result.output
    assert "after accuracy 1.0000 -> 0.5000 (1 of 2, 1 without an answer, 1 cut off; math-v2)" in " ".join(
        result.output.split()
    )
    assert "its 2 golds are as the run first read them" in " ".join(result.output.split())
    metrics = json.loads((run / "metrics.json").read_text())
    assert (metrics["after_accuracy"], metrics["after_correct"], metrics["after_no_answer"]) == (0.5, 1, 1)
    assert "after_golds_kept" not in metrics
    assert metrics["after_scorer"] == "math-v2" and metrics["after_samples"] == kept["after_samples"]
    assert metrics["steps"] == 30
    assert [r["correct"] for r in predictions.read(run)] == [False, True]
    sweep = tmp_path / "sweep"  # a sweep folder: its finished runs, one still running (no metrics.json) left alone
    (sweep / "running").mkdir(parents=True)
    (run / "after_math.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))  # scored as before
    run.rename(sweep / "LoRA-s0")
    result = CliRunner().invoke(app, ["rescore", str(sweep)])
    assert result.exit_code == 0 and "LoRA-s0: after accuracy 0.5000 -> 0.5000" in " ".join(result.output.split())
    (tmp_path / "bare").mkdir()
    (tmp_path / "bare" / "metrics.json").write_text("{}")
    result = CliRunner().invoke(app, ["rescore", str(tmp_path / "bare")])
    assert result.exit_code == 2 and "kept no before_math.jsonl or after_math.jsonl" in " ".join(result.output.split())


def test_math_rows_without_a_numeric_gold_are_left_out_of_the_score_and_said_before_training(tmp_path, capsys):
    """MetaMathQA's MATH problems end "The answer is: \\frac{1}{2}": read as a number that gold was 2 (a prediction
    of 3/2 passed). Such rows are left out of the math score, counted, and said before training; a test split with
    none left is refused."""
    from mgpo.data.instruct import load_instruct_data
    from mgpo.pipelines.generation import _scorable, check_benchmark

    lines = [
        {"prompt": f"Q{i}", "response": f"2 + {i} = {2 + i}. The answer is: {2 + i}"}
        if i % 2
        else {"prompt": f"Q{i}", "response": "Halve it. The answer is: \\frac{1}{2}"}
        for i in range(12)
    ]
    path = tmp_path / "mixed.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in lines))
    data = load_instruct_data(str(path), n_test=6, seed=0)
    cfg = load_config(None, ["model.name=smollm2-135m", "data.task=causal-lm", "generation.benchmark=math"])
    check_benchmark(cfg, data)
    kept, unread = _scorable(data.test)
    said = " ".join(capsys.readouterr().out.split())
    assert f"mgpo: math: {len(unread)} of 6 test rows" in said and "\\\\frac{1}{2}" in said and "after_no_gold" in said
    assert len(unread) > 0 and len(kept) > 0 and all("frac" in r["response"] for r in unread)
    latex = [r for r in lines if "frac" in r["response"]]
    (tmp_path / "latex.jsonl").write_text("".join(json.dumps(r) + "\n" for r in latex))
    with pytest.raises(ValueError, match="none of the 3 test rows .* has a gold answer that is a number"):
        check_benchmark(cfg, load_instruct_data(str(tmp_path / "latex.jsonl"), n_test=3, seed=0))


def test_eval_name_scores_another_datasets_rows_and_keeps_the_held_out_rows_for_validation(tmp_path, capsys):
    """As the paper: train on MetaMathQA-like data, score on GSM8K-like problems (data.eval_name); the rows held out
    of the training data are the validation split only, so choosing the checkpoint by them is not an optimistic
    score and is not warned about."""
    import datasets

    from mgpo.data.instruct import load_instruct_data, with_eval_data
    from mgpo.pipelines.generation import check_benchmark

    train = tmp_path / "metamath.jsonl"
    train.write_text(
        "".join(json.dumps({"prompt": f"T{i}", "response": f"So {i}. The answer is: {i}"}) + "\n" for i in range(20))
    )
    gsm = tmp_path / "gsm8k.jsonl"
    gsm.write_text(
        "".join(
            json.dumps({"prompt": f"G{i}", "response": f"{i} + 1 = {i + 1}\n#### {i + 1}"}) + "\n" for i in range(7)
        )
    )
    data = with_eval_data(load_instruct_data(str(train), n_test=5, seed=0), str(gsm))
    assert len(data.train) == 15 and len(data.validation) == 5 and len(data.test) == 7
    assert data.test["prompt"][0] == "G0" and data.test["answer"][0] == "1"  # GSM8K's gold after ####
    assert set(data.validation["prompt"]) <= {f"T{i}" for i in range(20)}
    base = ["model.name=smollm2-135m", "data.task=causal-lm", f"data.name={train}", f"data.eval_name={gsm}"]
    chooses = ["training.eval_steps=2", "training.save_steps=2", "training.load_best_model=true"]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "optimistic score" warning: the checkpoint is chosen on other rows
        check_benchmark(load_config(None, [*base, *chooses]), data)
    folder = tmp_path / "no-test"
    folder.mkdir()
    (folder / "train.jsonl").write_text(gsm.read_text())
    with pytest.raises(ValueError, match="has no test split to score on"):
        with_eval_data(data, str(folder))
    with pytest.raises(ConfigError, match="data.eval_name.*causal-lm"):
        load_config(None, [f"data.eval_name={gsm}"])
    with pytest.raises(ConfigError, match="data.eval_name.*humaneval"):
        load_config(None, [*base, "generation.benchmark=humaneval"])
    assert isinstance(data.test, datasets.Dataset)


def test_a_run_with_eval_name_scores_those_rows_and_validates_on_the_held_out_ones(tiny_llama_dir, tmp_path):
    gsm = tmp_path / "gsm8k.jsonl"
    gsm.write_text("".join(json.dumps({"prompt": f"Ann has {i}.", "response": f"#### {i}"}) + "\n" for i in range(5)))
    out = tmp_path / "run"
    cfg = tiny_config(
        tiny_llama_dir,
        out,
        "model.max_length=96",
        "data.name=arithmetic",
        "data.max_train_examples=32",
        "data.max_eval_examples=8",
        f"data.eval_name={gsm}",
        "training.max_steps=2",
        "training.batch_size=8",
        "generation.max_new_tokens=8",
    )
    metrics = train(cfg)
    rows = [json.loads(line) for line in (out / "after_math.jsonl").read_text().splitlines()]
    assert metrics["after_total"] == 5 and [r["gold"] for r in rows] == ["0", "1", "2", "3", "4"]
    assert rows[0]["prompt"] == "Q: Ann has 0.\nA: "  # the training data's template
    assert metrics["validation_loss"] > 0  # on the 8 arithmetic problems held out
