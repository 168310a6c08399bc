"""Local data files: which names are local, which file holds which split, and a quick check of their columns and
labels. Pure Python (plus pyarrow for a Parquet file's schema): ``mgpo config`` uses it without loading the data or
ML stack."""

from __future__ import annotations

import csv
import json
import os
from pathlib import Path

from mgpo.data.errors import DataError

FILE_BUILDERS = {".csv": "csv", ".json": "json", ".jsonl": "json", ".parquet": "parquet"}
# A name with one of these suffixes is taken as a local path, never a hub name.
PATH_LIKE_SUFFIXES = set(FILE_BUILDERS) | {".tsv", ".txt", ".gz", ".zip", ".arrow", ".xls", ".xlsx"}


def is_local_name(name: str) -> bool:
    """True when ``name`` is (or looks like) a local file or folder rather than a hub dataset id (``name``,
    ``owner/name``, ``owner/name/config``). A first part that is a local folder (``data/x`` beside a ``data/``
    folder) makes it a path, so a missing one is refused as a missing path."""
    head, sep, _ = name.partition("/")
    return (
        os.path.exists(os.path.expanduser(name))
        or name.startswith((".", "/", "~"))
        or Path(name).suffix.lower() in PATH_LIKE_SUFFIXES
        or bool(sep and head and os.path.isdir(head))
    )


# File stems accepted for each split inside a data directory.
SPLIT_FILE_STEMS = {
    "train": ("train",),
    "validation": ("validation", "valid", "val", "dev"),
    "test": ("test",),
}


def local_split_files(path: Path) -> dict[str, Path]:
    """Which file holds which split: a single file is train; a folder holds train.* and optionally
    validation.* (or valid/val/dev) and test.*."""
    if not path.exists():
        raise DataError(f"no such file or directory: {path}; check the path (built-in corpora: movie-reviews, tweets)")
    if path.is_file():
        return {"train": path}
    files = {}
    for split, stems in SPLIT_FILE_STEMS.items():
        found = sorted(
            p for p in path.iterdir() if p.is_file() and p.stem in stems and p.suffix.lower() in FILE_BUILDERS
        )
        if len(found) > 1:
            raise DataError(f"{path} has several {split} files ({', '.join(p.name for p in found)}); keep one")
        if found:
            files[split] = found[0]
    if "train" not in files:
        present = ", ".join(sorted(p.name for p in path.iterdir())) or "nothing"
        raise DataError(
            f"directory {path} has no train file (found: {present}); add train.csv, train.jsonl or train.parquet"
        )
    return files


def undecodable_line(path: Path, encoding: str) -> str | None:
    """Where ``path`` stops being valid ``encoding`` ("line N (byte 0x..)"), or None if it decodes."""
    for number, line in enumerate(path.read_bytes().split(b"\n"), start=1):
        try:
            line.decode(encoding)
        except UnicodeDecodeError as err:
            return f"line {number} (byte 0x{line[err.start]:02x} at column {err.start + 1})"
    return None


def encoding_error(path: Path, encoding: str) -> DataError | None:
    """The error for a file that is not valid ``encoding``, naming the line and the setting that fixes it."""
    where = undecodable_line(path, encoding)
    if where is None:
        return None
    return DataError(
        f"{path} is not valid {encoding} at {where}; say which encoding the file uses with "
        "data.encoding=<name> (e.g. data.encoding=latin-1 or cp1252)"
    )


def read_columns(path: Path, wanted: list[str], encoding: str = "utf-8") -> tuple[list[str], dict[str, list]]:
    """The column names of a local file and the values of the ``wanted`` columns it has, read with the standard
    library (csv, json) or pyarrow (parquet). Used for checks, not for training."""
    suffix = path.suffix.lower()
    if suffix == ".parquet":
        import pyarrow.parquet as pq

        names = list(pq.read_schema(path).names)
        present = [c for c in wanted if c in names]
        table = pq.read_table(path, columns=present)
        return names, {c: table[c].to_pylist() for c in present}
    error = encoding_error(path, encoding)
    if error is not None:
        raise error
    if suffix == ".csv":
        with path.open(encoding=encoding, newline="") as f:
            reader = csv.DictReader(f)
            names = list(reader.fieldnames or [])
            rows = list(reader)
    else:  # JSON Lines, or one JSON list of objects
        text = path.read_text(encoding=encoding)
        try:
            rows = json.loads(text)
            rows = rows if isinstance(rows, list) else [rows]
        except ValueError:
            rows = [json.loads(line) for line in text.splitlines() if line.strip()]
        names = list(dict.fromkeys(k for row in rows if isinstance(row, dict) for k in row))
    return names, {c: [row.get(c) for row in rows if isinstance(row, dict)] for c in wanted if c in names}


def check_local_data(name: str, task: str, columns: dict[str, str | None], encoding: str = "utf-8") -> None:
    """Before anything is loaded: the named columns exist in every split file, and (classification) no
    validation/test label is missing from train. ``columns`` maps our names (text, text_pair, label, or
    prompt/response for causal-lm) to the user's (None: the default name; text_pair None: optional).
    Raises DataError naming the file, the column and the config key that fixes it."""
    files = local_split_files(Path(name).expanduser())
    required = {ours: theirs or ours for ours, theirs in columns.items() if theirs or ours != "text_pair"}
    key = {
        "text": "text_column",
        "text_pair": "text_pair_column",
        "label": "label_column",
        "prompt": "prompt_column",
        "response": "response_column",
    }
    labels = {}
    for split, path in files.items():
        names, values = read_columns(path, list(required.values()), encoding)
        for ours, theirs in required.items():
            if theirs not in names:
                raise DataError(
                    f"{path} has no column {theirs!r} (columns: {', '.join(names) or 'none'}); set "
                    f"data.{key[ours]}=<name> to the column that holds the {ours}"
                )
        if task == "classification" and "label" in required:
            labels[split] = values.get(required["label"], [])
    check_labels_in_train(labels, files)


def check_labels_in_train(labels: dict[str, list], sources: dict) -> None:
    """A class that occurs in validation or test but never in train cannot be learned: name it and its file."""
    if "train" not in labels:
        return
    known = {_label_key(v) for v in labels["train"]}
    for split in ("validation", "test"):
        for row, value in enumerate(labels.get(split, []), start=1):
            if value is not None and _label_key(value) not in known:
                raise DataError(
                    f"{sources.get(split, split)}: row {row} has label {value!r}, which never occurs in the training "
                    f"data ({sources.get('train', 'train')}); a model trained on it cannot predict that class. Add "
                    "training rows with it, or remove those rows"
                )


def _label_key(value):
    """Labels as the loader sees them: "1" and 1 are the same class in a CSV file."""
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        return value
    try:
        number = float(value)
        return int(number) if number.is_integer() else number
    except ValueError:
        return value
