"""Instruction/response data for causal-LM fine-tuning: loading, prompt templates, tokenization, collation.

Sources (``load_instruct_data(name)``):

* ``arithmetic`` -- the built-in offline generator (:mod:`mgpo.data.arithmetic`);
* a local ``.jsonl`` / ``.json`` / ``.csv`` / ``.parquet`` file, or a folder holding ``train.<ext>``
  and optionally ``test.<ext>``;
* when online, a hub dataset: ``meta-math/MetaMathQA``, ``openai/gsm8k``,
  ``m-a-p/CodeFeedback-Filtered-Instruction``, ``WizardLMTeam/WizardLM_evol_instruct_70k`` (columns
  and template are known), or any other ``owner/name`` with the columns you name.

Every source is normalised to the columns ``prompt`` and ``response`` (plus ``answer``, the final
number, for math data).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import datasets
import torch

from mgpo.data.paths import SPLIT_FILE_STEMS
from mgpo.data.text import FILE_BUILDERS, read_data_file
from mgpo.eval.answers import extract_answer
from mgpo.hub import offline_reason

__all__ = [
    "HUB_DATASETS",
    "TEMPLATES",
    "CausalLMCollator",
    "HubSpec",
    "InstructData",
    "TokenizeStats",
    "format_prompt",
    "load_instruct_data",
    "tokenize_for_causal_lm",
]

TEMPLATES: dict[str, str] = {
    # The LoRA-GA math setup: question after "Q:", the model answers after "A: ".
    "math": "Q: {query}\nA: ",
    # Alpaca-style instruction prompt for code and chat data.
    "alpaca": (
        "Below is an instruction that describes a task. "
        "Write a response that appropriately completes the request.\n\n"
        "### Instruction:\n{query}\n\n### Response:\n"
    ),
}

OFFLINE_ALTERNATIVES = (
    "'arithmetic' (built-in generator) or a local .jsonl/.json/.csv/.parquet file with prompt/response columns"
)


@dataclass(frozen=True)
class HubSpec:
    """How to read one known hub dataset."""

    config: str | None  # dataset configuration name, e.g. "main" for gsm8k
    prompt_column: str
    response_column: str
    template: str  # key of TEMPLATES
    test_split: str | None  # None: split a test set off train


HUB_DATASETS: dict[str, HubSpec] = {
    "meta-math/MetaMathQA": HubSpec(None, "query", "response", "math", None),
    "openai/gsm8k": HubSpec("main", "question", "answer", "math", "test"),
    "m-a-p/CodeFeedback-Filtered-Instruction": HubSpec(None, "query", "answer", "alpaca", None),
    "WizardLMTeam/WizardLM_evol_instruct_70k": HubSpec(None, "instruction", "output", "alpaca", None),
}


@dataclass
class InstructData:
    """Normalised instruction data: ``prompt``/``response`` (and ``answer`` for math) columns."""

    name: str  # the source it came from
    template: str  # the prompt template string (contains "{query}")
    train: datasets.Dataset
    test: datasets.Dataset | None  # None when the source has no test split and n_test was not given
    # the rows the validation loss is taken on: the test split itself, unless the benchmark scores another
    # dataset's rows (:func:`with_eval_data`), when it is the rows held out of the training data (or None)
    validation: datasets.Dataset | None = None


def format_prompt(template: str, query: str) -> str:
    """Fill ``template`` (a key of :data:`TEMPLATES` or a string containing ``{query}``) with ``query``."""
    text = resolve_template(template)
    return text.replace("{query}", query)


def resolve_template(template: str) -> str:
    """The template string for a :data:`TEMPLATES` key, or ``template`` itself when it contains ``{query}``."""
    if template in TEMPLATES:
        return TEMPLATES[template]
    if "{query}" in template:
        return template
    raise ValueError(
        f"unknown prompt template {template!r}: use one of {sorted(TEMPLATES)} or a string containing '{{query}}'"
    )


def _load_file(path: Path) -> datasets.Dataset:
    if path.suffix.lower() not in FILE_BUILDERS:
        raise ValueError(f"unsupported data file {str(path)!r}: use one of {sorted(FILE_BUILDERS)}")
    return read_data_file(path)


def _load_local(path: Path) -> tuple[datasets.Dataset, datasets.Dataset | None]:
    if path.is_file():
        return _load_file(path), None
    found = [p for p in sorted(path.iterdir()) if p.suffix.lower() in FILE_BUILDERS]
    files = {p.stem: p for p in found}
    twice = sorted({p.stem for p in found if sum(q.stem == p.stem for q in found) > 1})
    if twice:
        raise ValueError(
            f"folder {str(path)!r} has several {twice[0]} files "
            f"({', '.join(p.name for p in found if p.stem == twice[0])}); keep one"
        )
    unused = [files[s].name for s in SPLIT_FILE_STEMS["validation"] if s in files]
    if unused:  # causal-lm evaluates on test.*; a validation file would be ignored without a word
        raise ValueError(
            f"folder {str(path)!r} has {unused[0]}, but causal-lm data uses train.* and test.* only (the "
            "test split is also what the validation loss is taken on): rename it to test.<ext>, or "
            "move it out of the folder"
        )
    if "train" not in files:
        raise FileNotFoundError(
            f"folder {str(path)!r} has no train file; put train.jsonl (or .json/.csv/.parquet) there, "
            "optionally with test.<ext>"
        )
    return _load_file(files["train"]), _load_file(files["test"]) if "test" in files else None


def _load_hub(name: str, config: str | None, test_split: str | None, cache_dir: str | None):
    reason = offline_reason(("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"))
    if reason:
        raise RuntimeError(
            f"dataset {name!r} is on the Hugging Face hub, but the hub is offline or unreachable ({reason}); "
            f"use {OFFLINE_ALTERNATIVES}"
        )
    try:
        loaded = datasets.load_dataset(name, config, cache_dir=cache_dir)
    except Exception as err:
        raise RuntimeError(
            f"could not load dataset {name!r} from the Hugging Face hub ({type(err).__name__}: {err}); "
            f"check the name and your connection, or use {OFFLINE_ALTERNATIVES}"
        ) from err
    if "train" not in loaded:
        raise ValueError(f"hub dataset {name!r} has no 'train' split (splits: {list(loaded)})")
    test = loaded[test_split] if test_split and test_split in loaded else None
    return loaded["train"], test


def _normalise_columns(
    ds: datasets.Dataset, prompt_column: str, response_column: str, where: str, math: bool
) -> datasets.Dataset:
    missing = [c for c in (prompt_column, response_column) if c not in ds.column_names]
    if missing:
        raise KeyError(
            f"{where} has no column(s) {missing}; its columns are {ds.column_names}. "
            "Pass prompt_column=... and response_column=... to map them"
        )
    keep_answer = "answer" in ds.column_names and "answer" not in (prompt_column, response_column)

    def convert(batch):
        def text(values):  # csv may parse "12" as a number; keep everything as text
            return [None if v is None else str(v) for v in values]

        out = {"prompt": text(batch[prompt_column]), "response": text(batch[response_column])}
        if keep_answer:
            out["answer"] = [None if a is None else str(a) for a in batch["answer"]]
        elif math:
            out["answer"] = [extract_answer(r) if r else None for r in batch[response_column]]
        return out

    columns = ["prompt", "response"] + (["answer"] if keep_answer or math else [])
    features = datasets.Features({c: datasets.Value("string") for c in columns})
    ds = ds.map(convert, batched=True, remove_columns=ds.column_names, features=features)
    ds = ds.filter(lambda row: bool(row["prompt"]) and bool(row["response"]))
    if len(ds) == 0:
        raise ValueError(f"{where} has no rows with a non-empty {prompt_column!r} and {response_column!r}")
    return ds


def _subsample(ds: datasets.Dataset, n: int | None, seed: int, what: str) -> datasets.Dataset:
    if n is None or n >= len(ds):
        return ds
    if n <= 0:
        raise ValueError(f"{what} must be positive, got {n}")
    return ds.shuffle(seed=seed).select(range(n))


def load_instruct_data(
    name: str,
    *,
    template: str | None = None,
    prompt_column: str = "prompt",
    response_column: str = "response",
    seed: int = 0,
    n_train: int | None = None,
    n_test: int | None = None,
    cache_dir: str | None = None,
) -> InstructData:
    """Load instruction data and normalise it to ``prompt``/``response`` columns.

    Args:
        name: ``"arithmetic"``, a local file/folder path, or a hub dataset name (online only).
        template: prompt template key or string; default: the family's template (``math`` for
            arithmetic, gsm8k, MetaMathQA and local files; ``alpaca`` for code/chat hub data).
        prompt_column / response_column: source column names (known hub datasets map themselves).
        seed: seed for the generator, subsampling and train/test splitting.
        n_train / n_test: cap the number of rows (random subset); for sources without a test split,
            ``n_test`` rows are split off the training data.
        cache_dir: hub download cache.
    """
    test: datasets.Dataset | None
    if name == "arithmetic":
        kwargs: dict[str, Any] = {}
        if n_train is not None:
            kwargs["n_train"] = n_train
        if n_test is not None:
            kwargs["n_test"] = n_test
        from mgpo.data.arithmetic import make_arithmetic

        splits = make_arithmetic(seed=seed, **kwargs)
        return InstructData(name, resolve_template(template or "math"), splits["train"], splits["test"], splits["test"])

    path = Path(name).expanduser()
    if path.exists():
        train, test = _load_local(path)
        default_template = "math"
    elif path.suffix.lower() in FILE_BUILDERS or name.startswith((".", "/", "~")):
        raise FileNotFoundError(f"data file {name!r} does not exist; check the path")
    elif name in HUB_DATASETS:
        spec = HUB_DATASETS[name]
        if prompt_column == "prompt":
            prompt_column = spec.prompt_column
        if response_column == "response":
            response_column = spec.response_column
        default_template = spec.template
        train, test = _load_hub(name, spec.config, spec.test_split, cache_dir)
    elif name.count("/") == 1:
        default_template = "alpaca"
        train, test = _load_hub(name, None, "test", cache_dir)
    else:
        raise ValueError(
            f"unknown dataset {name!r}: use 'arithmetic', a local file, or one of {sorted(HUB_DATASETS)} (online)"
        )

    template_text = resolve_template(template or default_template)
    is_math = template_text == TEMPLATES["math"]  # math data also gets an `answer` column
    train = _normalise_columns(train, prompt_column, response_column, f"{name} (train)", is_math)
    if test is not None:
        test = _normalise_columns(test, prompt_column, response_column, f"{name} (test)", is_math)
    elif n_test:
        if n_test >= len(train):
            raise ValueError(f"n_test={n_test} leaves no training rows: {name!r} has only {len(train)} rows")
        parts = train.train_test_split(test_size=n_test, seed=seed)
        train, test = parts["train"], parts["test"]
    train = _subsample(train, n_train, seed, "n_train")
    if test is not None:
        test = _subsample(test, n_test, seed, "n_test")
    return InstructData(name, template_text, train, test, test)


def with_eval_data(data: InstructData, eval_name: str, *, seed: int = 0, cache_dir: str | None = None) -> InstructData:
    """``data`` with its benchmark rows from ``eval_name`` (its test split; a local file: all its rows), prompted
    with ``data``'s template; the rows held out of ``data`` become the validation split only."""
    other = load_instruct_data(eval_name, template=data.template, seed=seed, cache_dir=cache_dir)
    rows = other.test
    if rows is None and Path(eval_name).expanduser().is_file():
        rows = other.train  # a single file: every row is an evaluation row
    if rows is None:
        raise ValueError(
            f"data.eval_name={eval_name!r} has no test split to score on; name a dataset with one (openai/gsm8k), "
            "a local file (all its rows) or a folder with test.<ext>"
        )
    return InstructData(data.name, data.template, data.train, rows, data.test)


@dataclass
class TokenizeStats:
    """What :func:`tokenize_for_causal_lm` did; report ``n_truncated`` to the user."""

    n_examples: int  # rows kept
    n_truncated: int  # rows cut to max_length (their response, and maybe EOS, is shortened)
    n_dropped: int  # rows removed because the prompt alone filled max_length (no response token left)
    max_length: int
    mean_length: float  # tokens per kept row, after truncation


def tokenize_for_causal_lm(
    dataset: datasets.Dataset,
    tokenizer,
    template: str,
    max_length: int = 512,
) -> tuple[datasets.Dataset, TokenizeStats]:
    """Tokenize ``prompt``/``response`` rows for causal-LM training with loss on the response only.

    ``input_ids`` = prompt tokens (with the tokenizer's special prefix, e.g. BOS) + response tokens + EOS;
    ``labels`` = ``-100`` on the prompt tokens, the token ids elsewhere. Rows longer than ``max_length``
    are truncated from the right; rows whose prompt alone fills ``max_length`` are dropped. No padding
    here: use :func:`CausalLMCollator`.
    """
    for column in ("prompt", "response"):
        if column not in dataset.column_names:
            raise KeyError(
                f"dataset has no {column!r} column (columns: {dataset.column_names}); load it with load_instruct_data"
            )
    if tokenizer.eos_token_id is None:
        raise ValueError("the tokenizer has no eos_token; set tokenizer.eos_token before tokenizing")
    if max_length < 2:
        raise ValueError(f"max_length must be >= 2, got {max_length}")
    template_text = resolve_template(template)
    eos = tokenizer.eos_token_id

    def encode(batch):
        prompts = [format_prompt(template_text, q) for q in batch["prompt"]]
        prompt_ids = tokenizer(prompts, add_special_tokens=True)["input_ids"]
        response_ids = tokenizer(list(batch["response"]), add_special_tokens=False)["input_ids"]
        out = {"input_ids": [], "attention_mask": [], "labels": [], "_truncated": []}
        for p, r in zip(prompt_ids, response_ids):
            ids = (p + r + [eos])[:max_length]
            labels = ([-100] * len(p) + r + [eos])[:max_length]
            out["input_ids"].append(ids)
            out["attention_mask"].append([1] * len(ids))
            out["labels"].append(labels)
            out["_truncated"].append(len(p) + len(r) + 1 > max_length)
        return out

    tokenized = dataset.map(encode, batched=True, remove_columns=dataset.column_names, desc="tokenizing")
    n_truncated = sum(tokenized["_truncated"])
    before = len(tokenized)
    tokenized = tokenized.filter(lambda row: any(label != -100 for label in row["labels"]))
    n_dropped = before - len(tokenized)
    tokenized = tokenized.remove_columns("_truncated")
    if len(tokenized) == 0:
        raise ValueError(
            f"every prompt is at least max_length={max_length} tokens long, so no response token is left; "
            "raise max_length"
        )
    lengths = [len(ids) for ids in tokenized["input_ids"]]
    stats = TokenizeStats(
        n_examples=len(tokenized),
        n_truncated=n_truncated - n_dropped,
        n_dropped=n_dropped,
        max_length=max_length,
        mean_length=sum(lengths) / len(lengths),
    )
    return tokenized, stats


@dataclass
class CausalLMCollator:
    """Pad ``input_ids`` / ``attention_mask`` / ``labels`` on the right to the longest row in the batch.

    ``input_ids`` are padded with the tokenizer's pad token (EOS if it has none), ``attention_mask``
    with 0 and ``labels`` with -100; the length is rounded up to a multiple of ``pad_to_multiple_of``.
    Right padding regardless of ``tokenizer.padding_side`` (generation may have set it to left).
    """

    tokenizer: Any  # transformers' tokenizers: pad_token_id and eos_token_id are not declared attributes
    pad_to_multiple_of: int | None = 8

    def __call__(self, features: list[dict]) -> dict[str, torch.Tensor]:
        if not features:
            raise ValueError("CausalLMCollator got an empty batch")
        pad_id = self.tokenizer.pad_token_id
        if pad_id is None:
            pad_id = self.tokenizer.eos_token_id
        if pad_id is None:
            raise ValueError("the tokenizer has neither a pad_token nor an eos_token; set tokenizer.pad_token")
        length = max(len(f["input_ids"]) for f in features)
        if self.pad_to_multiple_of:
            multiple = self.pad_to_multiple_of
            length = (length + multiple - 1) // multiple * multiple
        batch: dict[str, list[list[int]]] = {"input_ids": [], "attention_mask": [], "labels": []}
        for f in features:
            ids = list(f["input_ids"])
            labels = list(f["labels"]) if "labels" in f else list(ids)
            mask = list(f["attention_mask"]) if "attention_mask" in f else [1] * len(ids)
            pad = length - len(ids)
            batch["input_ids"].append(ids + [pad_id] * pad)
            batch["attention_mask"].append(mask + [0] * pad)
            batch["labels"].append(labels + [-100] * pad)
        return {key: torch.tensor(value, dtype=torch.long) for key, value in batch.items()}
