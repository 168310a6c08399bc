"""The text-to-text half of ``mgpo train``: classification as generation, the paper's NLU setting (after LoRA-GA).

A sequence-to-sequence model (T5) reads the text (or the text pair) and is trained to write the label as a word
(``data.label_words``; default: the dataset's label names, ``_`` read as a space: sst2 ``negative`` /
``positive``, mnli ``entailment`` / ``neutral`` / ``contradiction``). Two measures:

* ``accuracy`` (and ``macro_f1``, ``matthews``): the class whose label word's first token has the largest logit
  at the first decoder position, the LoRA-GA evaluation. The label words must start with different tokens.
* ``exact_match``: greedy generation, compared with the label word after stripping spaces and case.
"""

from __future__ import annotations

import numpy as np

from mgpo.pipelines.config import TrainConfig


def label_words(cfg: TrainConfig, label_names: list[str] | None, num_labels: int) -> list[str]:
    """The target word of each class id: ``data.label_words``, else the dataset's label names."""
    words = list(cfg.data.label_words) if cfg.data.label_words else None
    if words is None:
        words = [str(n).replace("_", " ") for n in (label_names or range(num_labels))]
    if len(words) != num_labels:
        raise ValueError(
            f"data.label_words={words!r} has {len(words)} words for {num_labels} classes; give one "
            "word per class, in the order of the class ids."
        )
    return words


def first_token_ids(tokenizer, words: list[str]) -> list[int]:
    """The first token of each label word; ValueError when two words share it."""
    ids = [tokenizer(w, add_special_tokens=False)["input_ids"][0] for w in words]
    if len(set(ids)) != len(ids):
        clash = [w for w, i in zip(words, ids) if ids.count(i) > 1]
        raise ValueError(
            f"the label words {clash} start with the same token, so the first decoder token cannot "
            "tell them apart; set data.label_words to words that start differently."
        )
    return ids


def encode(data, tokenizer, words: list[str], max_length: int):
    """Tokenized splits (input_ids, attention_mask, labels) and per split how many inputs were truncated."""
    targets = []
    for word in words:
        ids = tokenizer(word, add_special_tokens=False)["input_ids"]
        targets.append(ids + [tokenizer.eos_token_id])
    text_columns = [c for c in ("text", "text_pair") if c in data.splits["train"].column_names]

    def encode_batch(batch):
        pair = batch["text_pair"] if "text_pair" in text_columns else None
        full = tokenizer(batch["text"], pair, verbose=False)["input_ids"]
        encoded = tokenizer(batch["text"], pair, truncation=True, max_length=max_length)
        encoded["truncated"] = [len(ids) > max_length for ids in full]
        encoded["labels"] = [targets[label] for label in batch["label"]]
        return encoded

    splits = data.splits.map(encode_batch, batched=True, remove_columns=[*text_columns, "label"])
    truncated = {split: int(sum(ds["truncated"])) for split, ds in splits.items()}
    return splits.remove_columns("truncated"), truncated


class FirstTokenMetrics:
    """``compute_metrics`` for the Trainer, with its ``preprocess`` (``preprocess_logits_for_metrics``): only the
    label words' first-token logits at the first decoder position are kept, not the whole vocabulary."""

    def __init__(self, first_ids: list[int]):
        self.first_ids = list(first_ids)

    def preprocess(self, logits, labels):
        if isinstance(logits, tuple):
            logits = logits[0]
        return logits[:, 0, self.first_ids]

    def __call__(self, pred) -> dict:
        from sklearn.metrics import f1_score, matthews_corrcoef

        from mgpo.pipelines.measures import majority_share

        scores = pred.predictions[0] if isinstance(pred.predictions, tuple) else pred.predictions
        guess = np.asarray(scores).argmax(-1)
        index = {token: i for i, token in enumerate(self.first_ids)}
        gold = np.array([index.get(int(row[0]), -1) for row in np.asarray(pred.label_ids)])
        n = len(self.first_ids)
        return {
            "accuracy": float((guess == gold).mean()),
            "majority": majority_share(gold, n),  # chance: always the most frequent label word
            "macro_f1": float(f1_score(gold, guess, average="macro", labels=list(range(n)), zero_division=0)),
            "matthews": float(matthews_corrcoef(gold, guess)),
        }


def exact_match(model, tokenizer, split, words: list[str], batch_size: int, max_examples: int | None = None) -> dict:
    """Greedy generation on ``split`` (encoded by :func:`encode`), compared with the label words."""
    import torch

    rows = split.select(range(min(len(split), max_examples))) if max_examples else split
    first = {tuple(tokenizer(w, add_special_tokens=False)["input_ids"]): i for i, w in enumerate(words)}
    longest = max(len(k) for k in first) + 1
    wanted = [w.strip().lower() for w in words]
    correct = 0
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    try:
        for start in range(0, len(rows), batch_size):
            batch = rows.select(range(start, min(start + batch_size, len(rows))))
            inputs = tokenizer.pad(
                {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}, return_tensors="pt"
            ).to(device)
            with torch.no_grad():
                out = model.generate(**inputs, max_new_tokens=longest, do_sample=False)
            texts = tokenizer.batch_decode(out, skip_special_tokens=True)
            for text, labels in zip(texts, batch["labels"]):
                gold = first[tuple(t for t in labels if t != tokenizer.eos_token_id)]
                correct += text.strip().lower() == wanted[gold]
    finally:
        model.train(was_training)
    return {"exact_match": correct / max(1, len(rows))}


def prepare_text_to_text(cfg: TrainConfig, tokenizer):
    """Data, tokenized splits, collator, metrics and the label words of a text-to-text run."""
    from transformers import DataCollatorForSeq2Seq

    data = cfg.data.load_text(task="classification")  # the label words replace the class ids
    words = label_words(cfg, data.label_names, data.num_labels)
    metrics = FirstTokenMetrics(first_token_ids(tokenizer, words))
    splits, truncated = encode(data, tokenizer, words, cfg.model.max_length)
    print(
        f"mgpo: label words: {', '.join(f'{i} = {w!r}' for i, w in enumerate(words))} (accuracy from the "
        "first decoder token over these words; exact_match from generation)",
        flush=True,
    )
    collator = DataCollatorForSeq2Seq(tokenizer, label_pad_token_id=-100, pad_to_multiple_of=8)
    info = {
        "data_splits": dict(data.sources),
        "data_rows": {split: len(ds) for split, ds in splits.items()},
        "label_words": words,
        "truncated_examples": truncated["train"],
        "truncated_eval_examples": sum(n for split, n in truncated.items() if split != "train"),
    }
    return data, splits, collator, metrics, words, info
