"""Fixtures for the data tests: cache directories and a small stand-in for the vaderSentiment sdist."""

from __future__ import annotations

import hashlib
import io
import tarfile
from pathlib import Path

import pytest

from mgpo.data import sentiment


@pytest.fixture(scope="session")
def session_cache_dir(tmp_path_factory) -> Path:
    """One mgpo cache for the whole test session, so the real sdist is downloaded at most once."""
    return tmp_path_factory.mktemp("mgpo-cache")


@pytest.fixture(autouse=True)
def _private_default_cache(tmp_path, monkeypatch):
    """Code that falls back to the default cache writes into the test's tmp dir, never into ~/.cache."""
    monkeypatch.setenv("MGPO_CACHE", str(tmp_path / "default-cache"))


def _tar_gz(files: dict[str, bytes]) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


def ground_truth(rows: list[tuple[int, float, str]]) -> str:
    """Text in the corpora's format: ID<TAB>MEAN<TAB>TEXT, CRLF line ends, no final newline."""
    return "\r\n".join(f"{i}\t{score}\t{text}" for i, score, text in rows)


def sample_rows(n: int, prefix: str) -> list[tuple[int, float, str]]:
    """n rows whose scores cycle through positive, negative and exactly zero."""
    scores = [1.5, -2.25, 0.0, 0.4, -0.1]
    return [(i + 1, scores[i % len(scores)], f"{prefix} sentence number {i + 1}") for i in range(n)]


@pytest.fixture
def fake_sdist(tmp_path, monkeypatch):
    """Factory: write a fake vaderSentiment sdist (same layout, our own corpus text) and trust its hash.

    Call it with ``movie=..., tweets=...``, each a file text or a list of (id, mean, text) rows
    (defaults: 60 and 40 sample rows); it returns the sdist's path, by default inside a fresh cache
    directory ``tmp_path / "cache"``.
    """

    def make(movie=None, tweets=None, dest: Path | None = None) -> Path:
        movie = sample_rows(60, "movie") if movie is None else movie
        tweets = sample_rows(40, "tweet") if tweets is None else tweets
        files = {
            sentiment.CORPORA["movie-reviews"]: movie if isinstance(movie, str) else ground_truth(movie),
            sentiment.CORPORA["tweets"]: tweets if isinstance(tweets, str) else ground_truth(tweets),
        }
        inner = _tar_gz({name: text.encode("utf-8") for name, text in files.items()})
        outer = _tar_gz({sentiment.INNER_TARBALL: inner, "vaderSentiment-3.3.2/setup.py": b"# fake\n"})
        monkeypatch.setattr(sentiment, "SDIST_SHA256", hashlib.sha256(outer).hexdigest())
        path = (dest or tmp_path / "cache") / sentiment.SDIST_NAME
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(outer)
        return path

    return make
