"""The three tasks' data for ``mgpo train``: the model and tokenizer, the tokenized splits, the collator and the
metrics of each task (classification and regression, causal-lm, text-to-text), and what a run records about its
data. After training, the task's own evaluations (generation, exact match)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from mgpo.pipelines.config import TrainConfig


@dataclass
class PreparedTask:
    """What a task hands the trainer: ``info`` goes into metrics.json as it is."""

    model: Any
    tokenizer: Any
    data: Any
    splits: Any  # split name -> tokenized dataset
    collator: Any
    compute_metrics: Callable | None = None
    label_words: Any = None  # text-to-text: the words the labels are generated as
    info: dict = field(default_factory=dict)


def prepare_task(cfg: TrainConfig, out: Path, *, main: bool) -> PreparedTask:
    """Load the model, tokenizer and data of ``cfg.data.task``; rank 0 (``main``) says what it loaded."""
    task = cfg.data.task
    if task == "causal-lm":
        return _prepare_causal_lm(cfg, out, main)
    if task == "text-to-text":  # classification as generation (T5): mgpo.pipelines.text_to_text
        from mgpo.models import load_model_and_tokenizer
        from mgpo.pipelines.text_to_text import prepare_text_to_text

        model, tokenizer = load_model_and_tokenizer(cfg.model.name, task, dtype=cfg.model.dtype)
        data, splits, collator, compute_metrics, label_words, info = prepare_text_to_text(cfg, tokenizer)
        return PreparedTask(model, tokenizer, data, splits, collator, compute_metrics, label_words, info)
    return _prepare_classification(cfg, main)


def _prepare_causal_lm(cfg: TrainConfig, out: Path, main: bool) -> PreparedTask:
    from mgpo.models import load_model_and_tokenizer
    from mgpo.pipelines.generation import check_benchmark, prepare_causal_lm

    model, tokenizer = load_model_and_tokenizer(cfg.model.name, cfg.data.task, dtype=cfg.model.dtype)
    data, splits, collator, info = prepare_causal_lm(cfg, tokenizer)
    check_benchmark(cfg, data, say=main)
    if cfg.generation.before_training:
        from mgpo.pipelines.generation import evaluate_generation

        info.update(evaluate_generation(cfg, model, tokenizer, data, out, prefix="before"))
    return PreparedTask(model, tokenizer, data, splits, collator, None, None, info)


def _prepare_classification(cfg: TrainConfig, main: bool) -> PreparedTask:
    """Classification and regression: an encoder with a head sized to the data's labels."""
    from transformers import DataCollatorWithPadding

    from mgpo.models import load_model_and_tokenizer

    task = cfg.data.task
    data = _load_classification(cfg)  # first, so the model is built with the right head size
    model, tokenizer = load_model_and_tokenizer(cfg.model.name, task, num_labels=data.num_labels, dtype=cfg.model.dtype)
    splits, truncated = _encode_classification(cfg, data, tokenizer)
    if main:
        _describe_data(data, truncated, cfg.model.max_length)
    collator = DataCollatorWithPadding(tokenizer, pad_to_multiple_of=8)
    info = {
        "data_splits": dict(data.sources),
        "data_rows": {split: len(ds) for split, ds in splits.items()},
        "truncated_examples": truncated["train"],
        "truncated_eval_examples": sum(n for split, n in truncated.items() if split != "train"),
    }
    if task == "classification":  # the saved model config (and metrics.json) say what each class id means
        model.config.id2label = dict(enumerate(_label_names(data)))
        model.config.label2id = {name: i for i, name in enumerate(_label_names(data))}
        info["id2label"] = {str(i): name for i, name in enumerate(_label_names(data))}
        info["label2id"] = dict(model.config.label2id)
    return PreparedTask(
        model, tokenizer, data, splits, collator, classification_metrics(task, data.num_labels), None, info
    )


def task_metrics_after(
    cfg: TrainConfig, prepared: PreparedTask, model: Any, out: Path, *, main: bool, fsdp: bool
) -> dict:
    """The task's own evaluations of the trained model: generation (causal-lm), exact match (text-to-text).
    Rank 0 writes; under FSDP every rank takes part in the forwards."""
    task, metrics = cfg.data.task, {}
    if task == "causal-lm" and (main or fsdp):
        import tempfile

        from mgpo.pipelines.generation import evaluate_generation

        where = out if main else Path(tempfile.mkdtemp(prefix="mgpo-rank"))
        metrics.update(evaluate_generation(cfg, model, prepared.tokenizer, prepared.data, where, prefix="after"))
    if task == "text-to-text" and prepared.splits.get("test") is not None and (main or fsdp):
        from mgpo.pipelines.text_to_text import exact_match

        found = exact_match(
            model, prepared.tokenizer, prepared.splits["test"], prepared.label_words, cfg.training.eval_batch_size
        )
        metrics.update({f"test_{k}": v for k, v in found.items()})
    return metrics


def classification_metrics(task: str, num_labels: int) -> Callable:
    from scipy.stats import pearsonr, spearmanr
    from sklearn.metrics import accuracy_score, f1_score, matthews_corrcoef

    from mgpo.pipelines.measures import majority_share

    def compute(pred: Any) -> dict:
        logits, labels = pred.predictions, pred.label_ids
        if isinstance(logits, tuple):
            logits = logits[0]
        if task == "regression":
            scores = np.asarray(logits).reshape(-1)
            return {"pearson": float(pearsonr(scores, labels)[0]), "spearman": float(spearmanr(scores, labels)[0])}
        guess = np.asarray(logits).argmax(-1)
        out = {"accuracy": float(accuracy_score(labels, guess)), "majority": majority_share(labels, num_labels)}
        if num_labels == 2:  # "f1": the positive class (id 1); "macro_f1": the mean over both classes
            out["f1"] = float(f1_score(labels, guess, average="binary", zero_division=0))
        out["macro_f1"] = float(
            f1_score(labels, guess, average="macro", labels=list(range(num_labels)), zero_division=0)
        )
        out["matthews"] = float(matthews_corrcoef(labels, guess))
        return out

    return compute


def _load_classification(cfg: TrainConfig) -> Any:
    return cfg.data.load_text()


def _encode_classification(cfg: TrainConfig, data: Any, tokenizer: Any) -> tuple[Any, dict[str, int]]:
    """Tokenized splits, and per split how many examples were longer than model.max_length (truncated)."""
    text_columns = [c for c in ("text", "text_pair") if c in data.splits["train"].column_names]
    limit = cfg.model.max_length

    def encode(batch: dict) -> Any:
        pair = batch["text_pair"] if "text_pair" in text_columns else None
        full = tokenizer(batch["text"], pair, verbose=False)["input_ids"]
        encoded = tokenizer(batch["text"], pair, truncation=True, max_length=limit)
        encoded["truncated"] = [len(ids) > limit for ids in full]
        return encoded

    splits = data.splits.map(encode, batched=True, remove_columns=text_columns)
    truncated = {split: int(sum(ds["truncated"])) for split, ds in splits.items()}
    return splits.remove_columns("truncated"), truncated


def _describe_data(data: Any, truncated: dict[str, int], max_length: int) -> None:
    """Say which file became which split, how labels map to ids, and how many inputs were cut."""
    print(
        "mgpo: data: "
        + "; ".join(f"{split} <- {data.sources.get(split, '?')} ({len(ds)} rows)" for split, ds in data.splits.items()),
        flush=True,
    )
    if data.task == "classification":
        names = ", ".join(f"{i} = {name!r}" for i, name in enumerate(_label_names(data)))
        f1 = f"f1 is for class 1 ({_label_names(data)[1]!r}), " if data.num_labels == 2 else ""
        print(f"mgpo: labels: {names} ({f1}macro_f1 is the mean over all classes)", flush=True)
    cut = ", ".join(f"{split} {n} of {len(data.splits[split])}" for split, n in truncated.items())
    print(f"mgpo: examples longer than model.max_length={max_length} tokens, truncated: {cut}", flush=True)


def _label_names(data: Any) -> list[str]:
    return list(data.label_names) if data.label_names else [str(i) for i in range(data.num_labels)]


def clean_loss_every(cfg: TrainConfig) -> int:
    """Steps between clean-loss probes (0: off); ``training.clean_loss_every`` null means every logged step."""
    t = cfg.training
    return t.logging_steps if t.clean_loss_every is None else t.clean_loss_every


def clean_loss_probe(cfg: TrainConfig, train_split: Any) -> Any:
    """The clean-loss probe: ``training.clean_loss_examples`` rows of the tokenized train split, drawn with
    ``data.seed`` (so every method and training seed on the same data is probed on the same examples); None when
    the probe is off. Ordered by length, so each probe batch is padded little (on the movie reviews at
    max_length 64: 40 instead of 58 tokens per example in batches of 64)."""
    if not clean_loss_every(cfg):
        return None
    n = min(cfg.training.clean_loss_examples, len(train_split))
    rows = [int(i) for i in np.random.default_rng(cfg.data.seed).choice(len(train_split), size=n, replace=False)]
    lengths = [len(ids) for ids in train_split.select(rows)["input_ids"]]
    return train_split.select([i for _, i in sorted(zip(lengths, rows))])


def grad_batches(train_split: Any, collator: Any, batch_size: int) -> Callable:
    """Model-ready batches for LoRA-GA's gradient estimate (only called when that method is chosen)."""

    def batches() -> Any:
        for start in range(0, len(train_split), batch_size):
            rows = [train_split[i] for i in range(start, min(start + batch_size, len(train_split)))]
            yield collator(
                [
                    {
                        k: v
                        for k, v in r.items()
                        if k in ("input_ids", "attention_mask", "token_type_ids", "labels", "label")
                    }
                    for r in rows
                ]
            )

    return batches
