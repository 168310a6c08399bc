"""The config's precision, memory and optimizer options reach the Trainer (as PerturbationTrainingArguments,
saved with every checkpoint), and a bf16 + gradient-checkpointing run on CPU trains and saves a PEFT adapter."""

from __future__ import annotations

import json
import warnings

import pytest
import torch

from mgpo.integrations.arguments import PerturbationTrainingArguments
from mgpo.pipelines.config import ConfigError, load_config
from mgpo.pipelines.train import train, training_arguments
from tests.pipelines.test_train import overrides, sentiment_csv, tiny_model_dir  # noqa: F401  (fixtures)


@pytest.mark.parametrize("checkpointing", [True, False])
def test_config_maps_onto_the_training_arguments(tmp_path, checkpointing):
    cfg = load_config(
        None,
        [
            "training.mixed_precision=bf16",
            f"training.gradient_checkpointing={checkpointing}",
            "training.optim=adamw_torch_fused",
            "perturbation.profile=nlg",
            "perturbation.rho=0.2",
        ],
    )
    with warnings.catch_warnings():
        # transformers' renamed-argument warnings (gradient_checkpointing -> activation_checkpointing): none from us
        warnings.simplefilter("error", FutureWarning)
        args = training_arguments(cfg, tmp_path, has_eval=False)
    assert isinstance(args, PerturbationTrainingArguments)
    assert args.bf16 and not args.fp16 and args.optim == "adamw_torch_fused"
    assert args.activation_checkpointing is checkpointing
    assert args.activation_checkpointing_kwargs == ({"use_reentrant": False} if checkpointing else None)
    assert args.perturbation_config() == cfg.perturbation


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU-only refusal")
def test_fp16_on_cpu_says_to_use_bf16(tmp_path):
    cfg = load_config(None, ["training.mixed_precision=fp16"])
    with pytest.raises(ValueError, match=r"mixed_precision='fp16' needs a GPU.*bf16"):
        training_arguments(cfg, tmp_path, has_eval=False)


@pytest.mark.parametrize(
    "override, field",
    [("model.dtype=half", "model.dtype"), ("training.mixed_precision=fp8", "training.mixed_precision")],
)
def test_bad_precision_names_the_field(override, field):
    with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
        load_config(None, [override])


def test_bf16_checkpointed_run_saves_arguments_and_a_peft_adapter(tiny_model_dir, sentiment_csv, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification

    out = tmp_path / "run"
    cfg = load_config(
        None,
        overrides(
            tiny_model_dir,
            sentiment_csv,
            out,
            "training.mixed_precision=bf16",
            "training.gradient_checkpointing=true",
            "training.max_steps=4",
            "perturbation.method=mgpo",
        ),
    )
    metrics = train(cfg)
    assert metrics["steps"] == 4
    steps = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in steps if "loss" in r)
    assert all(torch.isfinite(torch.tensor(r["clean_loss"])) for r in steps if "loss" in r)  # under bf16 autocast
    saved = torch.load(out / "checkpoints" / "checkpoint-4" / "training_args.bin", weights_only=False)
    assert saved.bf16 and saved.gradient_checkpointing and saved.perturbation_config() == cfg.perturbation
    base = AutoModelForSequenceClassification.from_pretrained(tiny_model_dir, num_labels=2)
    ids = torch.tensor([[2, 10, 15, 16, 5, 3]])
    with torch.no_grad():
        untrained = base(input_ids=ids).logits
        loaded = PeftModel.from_pretrained(base, out / "adapter").eval()
        assert not torch.allclose(loaded(input_ids=ids).logits, untrained)  # adapter and head were loaded
