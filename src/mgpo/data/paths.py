"""Which data names are local files (pure Python: the config check uses it without loading the data stack)."""

from __future__ import annotations

import os
from pathlib import Path

FILE_BUILDERS = {".csv": "csv", ".json": "json", ".jsonl": "json", ".parquet": "parquet"}
# A name with one of these suffixes is taken as a local path, never a hub name.
PATH_LIKE_SUFFIXES = set(FILE_BUILDERS) | {".tsv", ".txt", ".gz", ".zip", ".arrow", ".xls", ".xlsx"}


def is_local_name(name: str) -> bool:
    """True when ``name`` is (or looks like) a local file or folder rather than a hub dataset id."""
    return (
        os.path.exists(os.path.expanduser(name))
        or name.startswith((".", "/", "~"))
        or Path(name).suffix.lower() in PATH_LIKE_SUFFIXES
    )
