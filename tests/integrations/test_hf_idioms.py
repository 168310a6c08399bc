"""The Hugging Face / PEFT / TRL idioms: create_optimizer, optimizer_cls_and_kwargs, SFTTrainer(peft_config=...),
TrainingArguments fields, args.optim, bf16, gradient checkpointing, a gradient scaler, saved adapters.
Tiny random models, offline."""

from __future__ import annotations

import dataclasses
import gc
import pickle
import warnings

import datasets
import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import (
    BertConfig,
    BertForSequenceClassification,
    HfArgumentParser,
    LlamaConfig,
    LlamaForCausalLM,
    Trainer,
    TrainerCallback,
)

import mgpo
from mgpo.factory import create_optimizer, decay_parameter_names
from mgpo.integrations.arguments import PerturbationTrainingArguments
from mgpo.integrations.peft_variants import AdapterConfig, apply_adapter
from mgpo.integrations.trainer import PerturbationTrainer, base_optimizer_from_args, unwrap_optimizer
from tests.integrations import test_trainer as base

warnings.filterwarnings("ignore", category=FutureWarning)


@pytest.fixture(autouse=True, scope="module")
def _fast_gc():
    gc.freeze()
    yield
    gc.unfreeze()


def tiny_llama(seed: int = 0, vocab: int = 40) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=vocab,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=64,
        pad_token_id=0,
        bos_token_id=2,
        eos_token_id=3,
    )
    return LlamaForCausalLM(config)


def lm_data(n: int = 16, seq: int = 8, vocab: int = 40) -> datasets.Dataset:
    ids = torch.randint(4, vocab, (n, seq), generator=torch.Generator().manual_seed(1)).tolist()
    return datasets.Dataset.from_dict({"input_ids": ids, "attention_mask": [[1] * seq] * n, "labels": ids})


def word_tokenizer(vocab: int = 40):
    """A word-level tokenizer over the words w4 ... w{vocab-1} (ids 4 ...), no downloads."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = {w: i for i, w in enumerate(["<pad>", "<unk>", "<s>", "</s>"] + [f"w{i}" for i in range(4, vocab)])}
    backend = Tokenizer(models.WordLevel(words, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token="<pad>", unk_token="<unk>", bos_token="<s>", eos_token="</s>"
    )


def lora_llama(seed: int = 0) -> torch.nn.Module:
    model = apply_adapter(tiny_llama(seed), AdapterConfig(rank=4, alpha=8), task="causal-lm")
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
    return model


def names_of(model, params) -> set[str]:
    ids = {id(p) for p in params}
    return {n for n, p in model.named_parameters() if id(p) in ids}


# ------------------------------------------------------------------------------------------------ create_optimizer
@pytest.mark.parametrize(
    "make",
    [
        lambda: BertForSequenceClassification(
            BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=20)
        ),
        tiny_llama,
    ],
)
def test_decay_rule_is_hugging_faces(make, tmp_path):
    model = make()  # full fine-tuning: biases, LayerNorm and RMSNorm weights are all trainable
    trainer = Trainer(model=model, args=base.make_args(tmp_path))
    expected = set(trainer.get_decay_parameter_names(model))
    assert decay_parameter_names(model) == expected
    assert any("norm" in n.lower() for n, _ in model.named_parameters() if n not in expected)
    opt = create_optimizer(model, torch.optim.AdamW, {"lr": 1e-3, "weight_decay": 0.1}, method="mgpo")
    decayed = {n for g in opt.param_groups if g["weight_decay"] == 0.1 for n in names_of(model, g["params"])}
    assert decayed == expected


def test_create_optimizer_with_loraplus_uses_peft_groups():
    from peft.optimizers import create_loraplus_optimizer

    model = lora_llama()
    opt = create_optimizer(
        model, torch.optim.AdamW, {"lr": 1e-3, "weight_decay": 0.01}, method="mgpo", loraplus_lr_ratio=8.0, rho=0.1
    )
    reference = create_loraplus_optimizer(
        model, torch.optim.AdamW, lr=1e-3, loraplus_lr_ratio=8.0, loraplus_weight_decay=0.01
    )
    ours = sorted((g["lr"], g["weight_decay"], tuple(sorted(names_of(model, g["params"])))) for g in opt.param_groups)
    peft = sorted(
        (g["lr"], g["weight_decay"], tuple(sorted(names_of(model, g["params"]))))
        for g in reference.param_groups
        if g["params"]
    )
    assert ours == peft and {g["lr"] for g in opt.param_groups} == {1e-3, 8e-3}
    assert isinstance(opt, mgpo.MGPO) and type(opt.base_optimizer) is torch.optim.AdamW
    assert opt.hparams["rho"] == 0.1 and opt.model is model
    batch = lm_data(4).with_format("torch")[:4]
    for _ in range(2):
        model(**batch).loss.backward()
        opt.step()
        opt.zero_grad()
    assert opt.last_stats["perturbation_norm"] > 0 and opt.skipped_steps == 0


def test_create_optimizer_errors_name_the_value():
    model = lora_llama()
    with pytest.raises(ValueError, match="'lr'"):
        create_optimizer(model, torch.optim.AdamW, {}, method="mgpo")
    with pytest.raises(ValueError, match=r"method='mpgo' is unknown: choose one of adamw, mgpo"):
        create_optimizer(model, torch.optim.AdamW, {"lr": 1e-3}, method="mpgo")
    with pytest.raises(ValueError, match="rho"):
        create_optimizer(model, torch.optim.AdamW, {"lr": 1e-3}, method="adamw", rho=0.1)
    with pytest.raises(TypeError, match=r"^GGPO got an unexpected keyword argument 'rho'.*sigma, beta_g"):
        create_optimizer(model, torch.optim.AdamW, {"lr": 1e-3}, method="ggpo", rho=0.05)


@pytest.mark.parametrize("method", ["mgpo", "msam", "sam", "random", "ggpo"])
def test_each_method_config_builds_its_optimizer(method):
    from mgpo.optim.configs import METHOD_CONFIGS

    config_cls, class_name = METHOD_CONFIGS[method]
    assert all(f.metadata.get("help") for f in dataclasses.fields(config_cls))
    settings = config_cls().kwargs()
    opt = getattr(mgpo, class_name)(lora_llama(), lr=1e-3, **settings)
    assert type(opt).__name__ == class_name
    held = {k: opt.hparams[k] for k in settings if k in opt.hparams}
    assert held and held == {k: settings[k] for k in held}
    first = dataclasses.fields(config_cls)[0].name  # rho, or ggpo's sigma: must be >= 0
    with pytest.raises(ValueError, match=rf"^x\.{first}=-1.0 is invalid"):
        config_cls(**{first: -1.0}).validate("x.")


# ------------------------------------------------------------------------------------------------ Trainer idioms
def test_optimizer_cls_and_kwargs_with_the_model(tmp_path):
    model = lora_llama()
    trainer = Trainer(
        model=model,
        args=base.make_args(tmp_path, max_steps=2),
        train_dataset=lm_data(),
        optimizer_cls_and_kwargs=(mgpo.MGPO, {"model": model, "lr": 1e-2, "rho": 0.1}),
    )
    trainer.train()
    opt = unwrap_optimizer(trainer.optimizer)
    assert isinstance(opt, mgpo.MGPO) and opt.model is model and opt.hparams["rho"] == 0.1
    assert names_of(model, [p for g in opt.param_groups for p in g["params"]]) == {
        n for n, p in model.named_parameters() if p.requires_grad
    }
    assert opt.last_stats["perturbation_norm"] > 0 and not opt.is_perturbed


def perturbation_args(out, **fields) -> PerturbationTrainingArguments:
    return PerturbationTrainingArguments(
        str(out),
        max_steps=1,
        per_device_train_batch_size=4,
        learning_rate=1e-2,
        report_to=[],
        use_cpu=True,
        save_strategy="no",
        disable_tqdm=True,
        **fields,
    )


def test_a_given_optimizer_must_be_the_method_the_arguments_name(tmp_path):
    """PerturbationTrainer(args naming mgpo, optimizers=(AdamW, None)) trained as plain AdamW, its saved arguments
    saying mgpo; an optimizer of the method with other settings trained with those. Both are refused by name."""
    model = lora_llama()
    trainable = [p for p in model.parameters() if p.requires_grad]
    args = perturbation_args(tmp_path, perturbation_method="mgpo", perturbation_rho=0.1)
    cases = [
        (
            args,
            lambda: dict(optimizers=(torch.optim.AdamW(trainable, lr=1e-2), None)),
            r"perturbation_method='mgpo'.*AdamW",
        ),
        (
            args,
            lambda: dict(optimizer_cls_and_kwargs=(torch.optim.AdamW, {"lr": 1e-2})),
            r"perturbation_method='mgpo'.*AdamW",
        ),
        (args, lambda: dict(optimizers=(mgpo.MGPO(model, lr=1e-2, rho=0.05), None)), r"perturbation_rho=0.1.*rho=0.05"),
        (
            args,
            lambda: dict(optimizers=(mgpo.MSAM(model, lr=1e-2, rho=0.1), None)),
            r"perturbation_apn='inverse'.*apn='off'",
        ),
        (
            perturbation_args(tmp_path, perturbation_method="adamw"),
            lambda: dict(optimizers=(mgpo.MGPO(model, lr=1e-2), None)),
            r"perturbation_method='adamw'.*MGPO",
        ),
    ]
    for case_args, given, message in cases:
        trainer = PerturbationTrainer(model=model, args=case_args, train_dataset=lm_data(), **given())
        with pytest.raises(ValueError, match=message):
            trainer.train()
        opt = trainer.perturbation_optimizer
        if hasattr(opt, "close"):  # its hooks off the shared model
            opt.close()
    opt = mgpo.MGPO(model, lr=1e-2, rho=0.1)  # the named method with the named settings: used as given
    trainer = PerturbationTrainer(model=model, args=args, train_dataset=lm_data(), optimizers=(opt, None))
    trainer.train()
    assert trainer.perturbation_optimizer is opt


@pytest.mark.parametrize("method", ["mgpo", "mgpo-factors", "random"])
def test_generate_inside_the_window_is_at_the_clean_weights(method):
    """PEFT's generate() runs the wrapped model without the PeftModel's forward, so an eval-mode generation between
    a training backward and step() (the window open) used to run at the perturbed weights; an eval forward did not."""
    model = lora_llama()
    kwargs = {"mgpo": dict(rho=0.5), "mgpo-factors": dict(rho=0.5, space="factors")}.get(method)
    opt = (
        mgpo.MGPO(model, lr=1e-2, **kwargs)
        if kwargs
        else mgpo.RandomPerturbation(model, lr=1e-2, rho=0.5, total_steps=4)
    )
    ids = torch.tensor(lm_data()["input_ids"][:4])
    for step in range(3):
        model.train()
        model(input_ids=ids, labels=ids).loss.backward()
        if step < 2:
            opt.step()
            opt.zero_grad()
    assert opt.is_perturbed  # the window of step 3 is open

    def last_logits():
        out = model.generate(
            ids[:, :4], max_new_tokens=1, do_sample=False, output_logits=True, return_dict_in_generate=True
        )
        return out.logits[0]

    model.eval()
    with torch.no_grad():
        in_window = last_logits()
        assert not opt.is_perturbed
        clean = model(input_ids=ids[:, :4]).logits[:, -1]
    torch.testing.assert_close(in_window, clean, rtol=0, atol=1e-6)
    model.train()
    model(input_ids=ids, labels=ids).loss.backward()  # the window open again
    with opt.unperturbed():
        clean_weights = {n: p.detach().clone() for n, p in model.get_base_model().named_parameters()}
    saved = model.get_base_model().state_dict()  # a save of the wrapped model itself, inside the window
    assert all(torch.equal(saved[n], w) for n, w in clean_weights.items())


def test_sft_trainer_builds_the_optimizer_after_peft_wraps_the_model(tmp_path):
    trl = pytest.importorskip("trl")
    from mgpo.integrations.sft import PerturbationSFTConfig, PerturbationSFTTrainer

    model = tiny_llama()  # a plain model: the trainer applies peft_config itself
    args = PerturbationSFTConfig(
        str(tmp_path),
        max_steps=2,
        per_device_train_batch_size=4,
        report_to=[],
        use_cpu=True,
        logging_steps=1,
        save_strategy="no",
        disable_tqdm=True,
        learning_rate=1e-2,
        perturbation_method="mgpo",
        perturbation_rho=0.1,
        perturbation_apn="normalized",
    )
    assert isinstance(args, trl.SFTConfig)
    peft_config = LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", task_type="CAUSAL_LM")
    text = datasets.Dataset.from_dict({"text": [" ".join(f"w{i}" for i in row) for row in lm_data()["input_ids"]]})
    trainer = PerturbationSFTTrainer(
        model=model, args=args, train_dataset=text, peft_config=peft_config, processing_class=word_tokenizer()
    )
    trainer.train()
    opt = trainer.perturbation_optimizer
    assert isinstance(opt, mgpo.MGPO) and opt.model is trainer.model
    trained = {n for n, p in trainer.model.named_parameters() if p.requires_grad}
    assert trained and all("lora_" in n for n in trained)
    assert names_of(trainer.model, [p for g in opt.param_groups for p in g["params"]]) == trained
    logs = [e for e in trainer.state.log_history if "loss" in e]
    assert [e["perturbation_norm"] for e in logs] == [0.0, pytest.approx(0.1, rel=1e-4)]  # step 1: no momentum yet


# ------------------------------------------------------------------------------------------------ arguments
def test_training_arguments_hold_the_method_and_are_saved(tmp_path):
    (args,) = HfArgumentParser(PerturbationTrainingArguments).parse_args_into_dataclasses(
        [
            "--output_dir",
            str(tmp_path),
            "--use_cpu",
            "true",
            "--perturbation_method",
            "msam",
            "--perturbation_rho",
            "0.2",
            "--perturbation_profile",
            "nlu",
            "--report_to",
            "none",
        ]
    )
    cfg = args.perturbation_config()
    assert (cfg.method, cfg.rho, cfg.profile) == ("msam", 0.2, "nlu")
    assert pickle.loads(pickle.dumps(args)).perturbation_config() == cfg
    assert '"perturbation_method": "msam"' in args.to_json_string()
    trainer = PerturbationTrainer(model=base.tiny_bert(), args=args, train_dataset=base.cls_data(8))
    assert trainer.perturbation == cfg
    with pytest.raises(ValueError, match="given twice"):
        PerturbationTrainer(model=base.tiny_bert(), args=args, perturbation=base.cfg_for("sam"))
    trainer.save_model(str(tmp_path / "saved"))
    saved = torch.load(tmp_path / "saved" / "training_args.bin", weights_only=False)
    assert saved.perturbation_config() == cfg
    with pytest.raises(ValueError, match=r"perturbation_apn='sqrt'"):
        PerturbationTrainingArguments(str(tmp_path), use_cpu=True, perturbation_apn="sqrt")


def test_loraplus_and_adalora_without_the_adapter_keyword(tmp_path):
    """LoRA+ from the arguments, AdaLoRA from the model's own PEFT config (as TRL's peft_config gives it)."""
    from peft import AdaLoraConfig

    args = PerturbationTrainingArguments(
        str(tmp_path / "plus"),
        use_cpu=True,
        report_to="none",
        max_steps=1,
        learning_rate=1e-3,
        loraplus_lr_ratio=4.0,
        save_strategy="no",
        lr_scheduler_type="constant",
    )
    trainer = PerturbationTrainer(model=lora_llama(), args=args, train_dataset=lm_data())
    trainer.train()
    assert sorted({g["lr"] for g in trainer.perturbation_optimizer.param_groups}) == pytest.approx([1e-3, 4e-3])
    with pytest.raises(ValueError, match=r"loraplus_lr_ratio=0.5 is invalid"):
        PerturbationTrainingArguments(str(tmp_path), use_cpu=True, loraplus_lr_ratio=0.5)

    torch.manual_seed(0)
    bert = BertForSequenceClassification(
        BertConfig(
            vocab_size=100,
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=2,
            intermediate_size=37,
            num_labels=2,
        )
    )
    model = get_peft_model(
        bert,
        AdaLoraConfig(
            init_r=6,
            target_r=2,
            total_step=20,
            tinit=2,
            tfinal=4,
            deltaT=1,
            task_type="SEQ_CLS",
            target_modules=["query", "value"],
        ),
    )
    trainer = PerturbationTrainer(
        model=model,
        args=base.make_args(tmp_path / "ada", max_steps=20, gradient_accumulation_steps=1),
        train_dataset=base.cls_data(80),
        perturbation=base.cfg_for("mgpo"),
    )
    trainer.train()
    ranks = [int(torch.count_nonzero(p)) for n, p in model.named_parameters() if "lora_E" in n]
    assert ranks and sum(ranks) < 6 * len(ranks)  # singular values were masked: the budget was allocated


def test_args_optim_is_the_base_optimizer(tmp_path):
    trainer = PerturbationTrainer(
        model=base.tiny_bert(),
        args=base.make_args(tmp_path, optim="sgd", max_steps=1),
        train_dataset=base.cls_data(8),
        perturbation=base.cfg_for("mgpo", momentum="0.9"),
    )
    trainer.train()
    assert type(trainer.perturbation_optimizer.base_optimizer) is torch.optim.SGD
    cls, kwargs = base_optimizer_from_args(base.make_args(tmp_path, optim="adamw_torch_fused", adam_beta1=0.7))
    assert cls is torch.optim.AdamW and kwargs["fused"] and kwargs["betas"][0] == 0.7
    for unsupported in ("galore_adamw", "lomo"):
        with pytest.raises(ValueError, match=rf"args.optim='{unsupported}'.*adamw_torch"):
            base_optimizer_from_args(base.make_args(tmp_path, optim=unsupported, optim_target_modules=["query"]))


# ------------------------------------------------------------------------------------------------ precision, memory
def test_mgpo_trains_in_bf16_on_cpu(tmp_path):
    model = base.tiny_bert()
    model.to(torch.bfloat16)  # model.dtype=bfloat16: frozen weights in bf16, LoRA factors too
    autocast = []  # seen inside the model (accelerate wraps the outer forward in autocast)
    model.get_base_model().bert.encoder.register_forward_pre_hook(
        lambda m, _: autocast.append(torch.is_autocast_enabled("cpu"))
    )
    before = base.trainable(model)
    trainer = PerturbationTrainer(
        model=model,
        args=base.make_args(tmp_path, max_steps=3, bf16=True),
        train_dataset=base.cls_data(24),
        perturbation=base.cfg_for("mgpo"),
    )
    trainer.train()
    opt = trainer.perturbation_optimizer
    assert autocast and all(autocast)
    assert all(torch.isfinite(torch.tensor(e["loss"])) for e in trainer.state.log_history if "loss" in e)
    assert opt.last_stats["perturbation_norm"] > 0 and not opt.is_perturbed and opt.skipped_steps == 0
    after = base.trainable(model)
    assert all(not torch.equal(after[n], before[n]) for n in before)
    with opt.unperturbed():  # clean weights are the weights themselves: nothing was left on them
        assert all(torch.equal(after[n], p) for n, p in model.named_parameters() if p.requires_grad)


@pytest.mark.parametrize("method", ["mgpo", "sam"])
def test_gradient_checkpointing_gives_the_same_training(method, tmp_path):
    runs = []
    for checkpointing in (False, True):
        model = lora_llama()
        args = base.make_args(
            tmp_path / str(checkpointing),
            max_steps=2,
            gradient_checkpointing=checkpointing,
            gradient_checkpointing_kwargs={"use_reentrant": False},
        )
        PerturbationTrainer(model=model, args=args, train_dataset=lm_data(), perturbation=base.cfg_for(method)).train()
        runs.append(base.trainable(model))
    for name in runs[0]:
        torch.testing.assert_close(runs[1][name], runs[0][name], rtol=1e-5, atol=1e-6)


class CountingScaler(torch.amp.GradScaler):
    """A real CPU gradient scaler that counts how often the gradients are unscaled."""

    def __init__(self):
        super().__init__("cpu", init_scale=2.0**12)
        self.unscaled = 0

    def unscale_(self, optimizer):
        self.unscaled += 1
        return super().unscale_(optimizer)


class _Fp16Scaling(TrainerCallback):
    """fp16's loss scaling on CPU, with fp32 compute: accelerate keeps no scaler on CPU, so one is put in before
    the optimizer is prepared, and the fp16 flag that makes it unscale before clipping after the model is."""

    def __init__(self, trainer):
        self.trainer = trainer
        trainer.accelerator.scaler = CountingScaler()

    def on_train_begin(self, args, state, control, **kwargs):
        self.trainer.accelerator.native_amp = True  # after prepare(): the model's forward stays fp32


@pytest.mark.parametrize("method", ["mgpo", "random", "sam"])
def test_a_gradient_scaler_unscales_once_and_matches_the_unscaled_run(method, tmp_path):
    """fp16's GradScaler: the gradients are unscaled once per step (before clipping); SAM's second gradient is
    unscaled by the trainer without a second unscale_, and clipped like the first. The loss scale is a power of
    two, so with fp32 compute the run must match the one without a scaler."""
    runs, scalers = [], []
    for scaled in (False, True):
        model = base.tiny_bert()
        args = base.make_args(tmp_path / str(scaled), max_steps=3, max_grad_norm=0.5, fp16=scaled)
        trainer = PerturbationTrainer(
            model=model, args=args, train_dataset=base.cls_data(24), perturbation=base.cfg_for(method)
        )
        if scaled:
            callback = _Fp16Scaling(trainer)
            trainer.add_callback(callback)
            scalers.append(trainer.accelerator.scaler)
        trainer.train()
        runs.append(base.trainable(model))
        runs[-1]["grad_norms"] = torch.tensor([e["grad_norm"] for e in trainer.state.log_history if "grad_norm" in e])
    assert scalers[0].unscaled == 3 and scalers[0].get_scale() == 2.0**12  # once per step; no overflow
    for name in runs[0]:
        torch.testing.assert_close(runs[1][name], runs[0][name], rtol=1e-5, atol=1e-7)


# ------------------------------------------------------------------------------------------------ saved adapters
def test_saved_adapter_loads_with_peft(tmp_path):
    torch.manual_seed(0)
    base_model = tiny_llama()
    base_model.save_pretrained(tmp_path / "base")
    model = get_peft_model(
        base_model, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", task_type="CAUSAL_LM")
    )
    trainer = PerturbationTrainer(
        model=model,
        args=base.make_args(tmp_path / "run", max_steps=3),
        train_dataset=lm_data(),
        perturbation=base.cfg_for("mgpo"),
    )
    trainer.train()
    trainer.save_model(str(tmp_path / "adapter"))
    ids = torch.tensor([[5, 9, 11, 20, 7]])
    model.eval()
    with torch.no_grad():
        expected = model(input_ids=ids).logits
    fresh = LlamaForCausalLM.from_pretrained(tmp_path / "base").eval()
    with torch.no_grad():
        untrained = fresh(input_ids=ids).logits
        loaded = PeftModel.from_pretrained(fresh, tmp_path / "adapter").eval()
        got = loaded(input_ids=ids).logits
    assert not torch.allclose(untrained, expected, atol=1e-4)  # the adapter changed the model
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
