"""Text-to-text classification (the paper's T5 setting): label words as targets, accuracy from the first decoder
token over the label words, exact match from generation; end to end on a tiny random T5 (offline)."""

from __future__ import annotations

import json
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from mgpo.pipelines.config import ConfigError, load_config
from mgpo.pipelines.text_to_text import FirstTokenMetrics, first_token_ids, label_words
from mgpo.pipelines.train import train
from tests.pipelines.test_train import WORDS, overrides, sentiment_csv  # noqa: F401  (fixture)


@pytest.fixture(scope="module")
def tiny_t5_dir(tmp_path_factory):
    """A randomly initialised 2-layer T5 and a word-level tokenizer, saved like a hub checkpoint."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast, T5Config, T5ForConditionalGeneration

    folder = tmp_path_factory.mktemp("tiny-t5")
    vocab = {t: i for i, t in enumerate(["<pad>", "</s>", "<unk>", *WORDS, "pos", "neg", "positive", "possible"])}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token="<pad>", eos_token="</s>", unk_token="<unk>"
    ).save_pretrained(folder)
    torch.manual_seed(0)
    config = T5Config(
        vocab_size=len(vocab),
        d_model=32,
        d_kv=8,
        d_ff=48,
        num_layers=2,
        num_decoder_layers=2,
        num_heads=4,
        dropout_rate=0.0,
        pad_token_id=0,
        eos_token_id=1,
        decoder_start_token_id=0,
    )
    T5ForConditionalGeneration(config).save_pretrained(folder)
    return folder


def test_first_token_accuracy_reads_the_label_words_logits():
    metrics = FirstTokenMetrics([7, 3])  # class 0 -> token 7, class 1 -> token 3
    logits = metrics.preprocess(torch.randn(4, 2, 10), None)
    assert logits.shape == (4, 2)
    scores = np.array([[2.0, 1.0], [0.0, 5.0], [1.0, 3.0], [4.0, -1.0]])  # guesses 0, 1, 1, 0
    labels = np.array([[7, 1], [3, 1], [7, 1], [7, -100]])  # gold    0, 1, 0, 0
    result = metrics(SimpleNamespace(predictions=scores, label_ids=labels))
    assert result["accuracy"] == 0.75 and -1 <= result["matthews"] <= 1
    assert result["majority"] == 0.75  # gold 0, 1, 0, 0: always guessing class 0 scores 3 of 4
    # a target that is no label word (token 5) is an example no guess gets right, in accuracy and in chance alike
    odd = metrics(SimpleNamespace(predictions=scores, label_ids=np.array([[7, 1], [3, 1], [5, 1], [5, 1]])))
    assert odd["accuracy"] == 0.5 and odd["majority"] == 0.25


def test_label_words_must_start_differently_and_match_the_classes(tiny_t5_dir):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_t5_dir)
    assert len(set(first_token_ids(tokenizer, ["pos", "neg"]))) == 2
    with pytest.raises(ValueError, match="start with the same token"):
        first_token_ids(tokenizer, ["good movie", "good plot"])
    cfg = load_config(None, ["data.label_words=[yes,no,maybe]"])
    with pytest.raises(ValueError, match="3 words for 2 classes"):
        label_words(cfg, ["neg", "pos"], 2)
    assert label_words(load_config(None, []), ["not_entailment", "entailment"], 2) == ["not entailment", "entailment"]


def test_text_to_text_needs_a_seq2seq_model():
    with pytest.raises(ConfigError, match=r"model\.name='minilm'.*sequence-to-sequence"):
        load_config(None, ["data.task=text-to-text"])


def test_tiny_t5_learns_the_label_words_end_to_end(tiny_t5_dir, sentiment_csv, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForSeq2SeqLM

    out = tmp_path / "run"
    cfg = load_config(
        None,
        overrides(
            tiny_t5_dir,
            sentiment_csv,
            out,
            "data.task=text-to-text",
            "training.max_steps=40",
            "training.lr=1e-2",
            "adapter.rank=4",
        ),
    )
    metrics = train(cfg)
    saved = json.loads((out / "metrics.json").read_text())
    assert saved["label_words"] == ["neg", "pos"]
    assert saved["test_accuracy"] >= 0.9 and saved["test_exact_match"] >= 0.9, saved
    assert metrics["validation_accuracy"] >= 0.9
    assert 0 < metrics["best_clean_loss"] <= metrics["final_clean_loss"]  # the probe, on the label words too
    model = PeftModel.from_pretrained(AutoModelForSeq2SeqLM.from_pretrained(tiny_t5_dir), out / "adapter").eval()
    ids = torch.tensor([[3 + WORDS.index(w) for w in "the movie was great plot".split()]])
    with torch.no_grad():
        first = model(input_ids=ids, decoder_input_ids=torch.zeros(1, 1, dtype=torch.long)).logits[0, 0]
    pos, neg = 3 + len(WORDS), 4 + len(WORDS)
    assert first[pos] > first[neg]  # the saved adapter writes 'pos' for a positive review


def test_logged_loss_with_grad_accum_is_the_mean_per_optimizer_step(tiny_t5_dir, sentiment_csv, tmp_path):
    """T5's forward takes **kwargs, so the Trainer took its loss as already scaled for gradient accumulation (it
    is a plain mean): with grad_accum=2 the logged loss was the sum of two micro-batch means, twice the loss."""
    first = {}
    for accum, batch in ((1, 8), (2, 4)):  # the same 8 examples in the first optimizer step
        out = tmp_path / f"accum{accum}"
        train(
            load_config(
                None,
                overrides(
                    tiny_t5_dir,
                    sentiment_csv,
                    out,
                    "data.task=text-to-text",
                    "training.max_steps=1",
                    "training.lr=1e-9",
                    "training.clean_loss_every=0",
                    f"training.batch_size={batch}",
                    f"training.grad_accum={accum}",
                    "perturbation.preset=lora",
                ),
            )
        )
        rows = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
        first[accum] = next(r["loss"] for r in rows if "loss" in r)
    assert first[2] == pytest.approx(first[1], rel=0.02), first
