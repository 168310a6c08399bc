import json

import datasets
import pytest
import torch

from mgpo.data.instruct import (
    TEMPLATES,
    CausalLMCollator,
    format_prompt,
    load_instruct_data,
    tokenize_for_causal_lm,
)
from tests.tiny import bpe_tokenizer

CORPUS = [
    "Q: Ava has 3 marbles. She finds 4 more. How many marbles does Ava have now?\nA: 3 + 4 = 7\n#### 7",
    "Below is an instruction that describes a task. Write a response that appropriately completes the request.",
    "### Instruction:\nWrite a function that adds two numbers.\n\n### Response:\ndef add(a, b): return a + b",
]


@pytest.fixture(scope="module")
def tokenizer():
    return bpe_tokenizer(CORPUS * 5)


def _write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_format_prompt():
    assert format_prompt("math", "What is 2 + 2?") == "Q: What is 2 + 2?\nA: "
    alpaca = format_prompt("alpaca", "Sort a list.")
    assert (
        alpaca.startswith("Below is an instruction") and "### Instruction:\nSort a list.\n\n### Response:\n" in alpaca
    )
    assert format_prompt("<{query}>", "x {y}") == "<x {y}>"  # braces in the query are kept as is
    assert set(TEMPLATES) == {"math", "alpaca"}
    with pytest.raises(ValueError, match="unknown prompt template 'poem'"):
        format_prompt("poem", "x")


def test_load_arithmetic():
    data = load_instruct_data("arithmetic", n_train=30, n_test=7, seed=1)
    assert data.template == TEMPLATES["math"]
    assert (len(data.train), len(data.test)) == (30, 7)
    assert data.train.column_names == ["prompt", "response", "answer"]
    again = load_instruct_data("arithmetic", n_train=30, n_test=7, seed=1)
    assert again.train["prompt"] == data.train["prompt"]


def test_load_local_jsonl_with_mapped_columns_and_split(tmp_path):
    rows = [{"question": f"What is {i} + 1?", "solution": f"{i} + 1 = {i + 1}\n#### {i + 1}"} for i in range(20)]
    _write_jsonl(tmp_path / "d.jsonl", rows)
    data = load_instruct_data(
        str(tmp_path / "d.jsonl"), prompt_column="question", response_column="solution", n_test=5, seed=0
    )
    assert (len(data.train), len(data.test)) == (15, 5)
    assert sorted(data.train.column_names) == ["answer", "prompt", "response"]
    for row in list(data.train) + list(data.test):
        i = int(row["prompt"].split()[2])
        assert row["answer"] == str(i + 1)
    assert not set(data.train["prompt"]) & set(data.test["prompt"])


def test_load_local_csv_parquet_and_folder(tmp_path):
    frame = datasets.Dataset.from_dict({"prompt": ["a", "b", "c"], "response": ["1", "2", "3"]})
    frame.to_csv(tmp_path / "d.csv", index=False)
    frame.to_parquet(tmp_path / "d.parquet")
    for name in ("d.csv", "d.parquet"):
        data = load_instruct_data(str(tmp_path / name), template="alpaca")
        assert data.train["prompt"] == ["a", "b", "c"] and data.test is None
        assert data.train["response"] == ["1", "2", "3"]  # text, even where csv reads numbers
        assert data.template == TEMPLATES["alpaca"]
    folder = tmp_path / "folder"
    folder.mkdir()
    _write_jsonl(folder / "train.jsonl", [{"prompt": "p1", "response": "r1"}, {"prompt": "p2", "response": "r2"}])
    _write_jsonl(folder / "test.jsonl", [{"prompt": "t", "response": "#### 4"}])
    data = load_instruct_data(str(folder), n_train=1)
    assert len(data.train) == 1 and data.test["answer"] == ["4"]
    # files that would be ignored without a word are named: a second train file, a validation file
    frame.to_csv(folder / "train.csv", index=False)
    with pytest.raises(ValueError, match=r"several train files \(train.csv, train.jsonl\)"):
        load_instruct_data(str(folder))
    (folder / "train.csv").unlink()
    _write_jsonl(folder / "validation.jsonl", [{"prompt": "v", "response": "#### 5"}])
    with pytest.raises(ValueError, match="has validation.jsonl, but causal-lm data uses train.* and test.* only"):
        load_instruct_data(str(folder))


def test_load_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.jsonl"):
        load_instruct_data(str(tmp_path / "missing.jsonl"))
    _write_jsonl(tmp_path / "d.jsonl", [{"question": "q", "output": "o"}])
    with pytest.raises(KeyError, match=r"\['prompt', 'response'\].*question.*prompt_column"):
        load_instruct_data(str(tmp_path / "d.jsonl"))
    _write_jsonl(tmp_path / "e.jsonl", [{"prompt": "", "response": "x"}, {"prompt": "q", "response": None}])
    with pytest.raises(ValueError, match="no rows with a non-empty"):
        load_instruct_data(str(tmp_path / "e.jsonl"))
    (tmp_path / "d.txt").write_text("hello")
    with pytest.raises(ValueError, match="unsupported data file"):
        load_instruct_data(str(tmp_path / "d.txt"))
    with pytest.raises(ValueError, match="unknown dataset 'nonsense'"):
        load_instruct_data("nonsense")
    with pytest.raises(ValueError, match="n_test=1 leaves no training rows"):
        load_instruct_data(str(tmp_path / "d.jsonl"), prompt_column="question", response_column="output", n_test=1)


@pytest.mark.parametrize("name", ["openai/gsm8k", "meta-math/MetaMathQA", "someone/some-data"])
def test_hub_names_fail_fast_offline(name, monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    with pytest.raises(RuntimeError, match="offline.*'arithmetic'"):
        load_instruct_data(name)


def test_tokenize_masks_prompt_and_appends_eos(tokenizer):
    ds = datasets.Dataset.from_dict(
        {"prompt": ["Ava has 3 marbles.", "How many?"], "response": ["3 + 4 = 7\n#### 7", "#### 2"]}
    )
    tokenized, stats = tokenize_for_causal_lm(ds, tokenizer, "math", max_length=128)
    assert tokenized.column_names == ["input_ids", "attention_mask", "labels"]
    assert (stats.n_examples, stats.n_truncated, stats.n_dropped) == (2, 0, 0)
    for row, src in zip(tokenized, ds):
        prompt_ids = tokenizer(format_prompt("math", src["prompt"]))["input_ids"]
        response_ids = tokenizer(src["response"], add_special_tokens=False)["input_ids"]
        n = len(prompt_ids)
        assert row["input_ids"] == prompt_ids + response_ids + [tokenizer.eos_token_id]
        assert row["labels"][:n] == [-100] * n
        assert row["labels"][n:] == row["input_ids"][n:]
        assert row["attention_mask"] == [1] * len(row["input_ids"])
        assert tokenizer.decode(row["input_ids"][n:-1]) == src["response"]


def test_tokenize_truncation_is_counted(tokenizer):
    responses = ["#### 1", "3 + 4 = 7\n" * 6 + "#### 7", "3 + 4 = 7\n" * 12 + "#### 7"]
    ds = datasets.Dataset.from_dict({"prompt": ["How many?"] * 2 + ["How many? " * 40], "response": responses})
    max_length = 40
    full = [
        len(tokenizer(format_prompt("math", p))["input_ids"])
        + len(tokenizer(r, add_special_tokens=False)["input_ids"])
        + 1
        for p, r in zip(ds["prompt"], ds["response"])
    ]
    prompt_lengths = [len(tokenizer(format_prompt("math", p))["input_ids"]) for p in ds["prompt"]]
    expected_dropped = sum(p >= max_length for p in prompt_lengths)
    expected_truncated = sum(f > max_length for f in full) - expected_dropped
    assert expected_truncated >= 1 and expected_dropped == 1  # the data really exercises both cases
    tokenized, stats = tokenize_for_causal_lm(ds, tokenizer, "math", max_length=max_length)
    assert stats.n_truncated == expected_truncated
    assert stats.n_dropped == expected_dropped
    assert len(tokenized) == 2
    assert all(len(ids) <= max_length for ids in tokenized["input_ids"])
    assert tokenized[0]["input_ids"][-1] == tokenizer.eos_token_id
    with pytest.raises(ValueError, match="raise max_length"):
        tokenize_for_causal_lm(ds.select([2]), tokenizer, "math", max_length=max_length)


def test_tokenize_bad_input(tokenizer):
    with pytest.raises(KeyError, match="'response'"):
        tokenize_for_causal_lm(datasets.Dataset.from_dict({"prompt": ["x"]}), tokenizer, "math")


def test_collator_pads_right_with_minus_100(tokenizer):
    features = [
        {"input_ids": [5, 6, 7], "attention_mask": [1, 1, 1], "labels": [-100, 6, 7]},
        {
            "input_ids": [5, 6, 7, 8, 9, 10, 11, 12, 13, 14],
            "attention_mask": [1] * 10,
            "labels": [-100] * 4 + list(range(9, 15)),
        },
    ]
    tokenizer.padding_side = "left"  # generation may leave it like this; training still pads right
    try:
        batch = CausalLMCollator(tokenizer, pad_to_multiple_of=8)(features)
    finally:
        tokenizer.padding_side = "right"
    assert set(batch) == {"input_ids", "attention_mask", "labels"}
    assert batch["input_ids"].shape == (2, 16) and batch["input_ids"].dtype == torch.long
    pad = tokenizer.pad_token_id
    assert batch["input_ids"][0].tolist() == [5, 6, 7] + [pad] * 13
    assert batch["attention_mask"][0].tolist() == [1] * 3 + [0] * 13
    assert batch["labels"][0].tolist() == [-100, 6, 7] + [-100] * 13
    assert batch["labels"][1].tolist() == [-100] * 4 + list(range(9, 15)) + [-100] * 6
    assert CausalLMCollator(tokenizer, pad_to_multiple_of=None)(features)["input_ids"].shape == (2, 10)


def test_collator_on_tokenized_dataset(tokenizer):
    ds = datasets.Dataset.from_dict({"prompt": ["a", "Ava has 3 marbles."], "response": ["#### 1", "3 + 4 = 7"]})
    tokenized, _ = tokenize_for_causal_lm(ds, tokenizer, "alpaca", max_length=256)
    batch = CausalLMCollator(tokenizer)(list(tokenized))
    lengths = [len(ids) for ids in tokenized["input_ids"]]
    assert batch["input_ids"].shape[1] % 8 == 0 and batch["input_ids"].shape[1] >= max(lengths)
    assert batch["attention_mask"].sum(1).tolist() == lengths
    assert (batch["labels"] != -100).sum().item() == sum(
        (torch.tensor(l) != -100).sum().item() for l in tokenized["labels"]
    )
