"""The perturbation methods inside transformers.Trainer / trl.SFTTrainer, on tiny random models (no downloads)."""

from __future__ import annotations

import gc
import warnings
from typing import Any

import datasets
import pytest
import torch
import torch.nn.functional as F
from peft import get_peft_model_state_dict
from safetensors.torch import load_file
from transformers import BertConfig, BertForSequenceClassification, Trainer, TrainerCallback, TrainingArguments

import mgpo
from mgpo.factory import decay_groups
from mgpo.integrations.peft_variants import AdapterConfig, apply_adapter
from mgpo.integrations.trainer import (
    METHODS,
    PerturbationConfig,
    PerturbationTrainer,
    PerturbationTrainerMixin,
    build_optimizer,
    perturbed,
    unwrap_optimizer,
)

warnings.filterwarnings("ignore", category=FutureWarning)

SEQ = 8
BATCH = 4


@pytest.fixture(autouse=True, scope="module")
def _fast_gc():
    """Every Trainer.train() runs gc.collect() (accelerate's free_memory); with torch, transformers and TRL
    imported that walks ~0.5 M objects each time. Freezing what exists now keeps the file fast."""
    gc.freeze()
    yield
    gc.unfreeze()


def tiny_bert(adapter: AdapterConfig | None = None, total_steps: int | None = None, seed: int = 0):
    torch.manual_seed(seed)
    config = BertConfig(  # type: ignore[call-arg]  # num_labels: a PretrainedConfig keyword its signature leaves out
        vocab_size=100,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=37,
        max_position_embeddings=32,
        num_labels=2,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )
    model: torch.nn.Module = BertForSequenceClassification(config)
    adapter = adapter or AdapterConfig(rank=4, alpha=8)
    model = apply_adapter(model, adapter, task="classification", total_steps=total_steps)
    with torch.no_grad():  # B != 0 from the start, so every LoRA tensor has a gradient at step 1
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
    return model


def cls_data(n: int = 32, seed: int = 0) -> datasets.Dataset:
    gen = torch.Generator().manual_seed(seed)
    return datasets.Dataset.from_dict(
        dict(
            input_ids=torch.randint(1, 100, (n, SEQ), generator=gen).tolist(),
            attention_mask=[[1] * SEQ] * n,
            labels=torch.randint(0, 2, (n,), generator=gen).tolist(),
        )
    )


def make_args(out, **overrides) -> TrainingArguments:
    settings: dict[str, Any] = dict(
        max_steps=4,
        per_device_train_batch_size=BATCH,
        gradient_accumulation_steps=2,
        learning_rate=1e-2,
        lr_scheduler_type="constant",
        max_grad_norm=0.0,
        train_sampling_strategy="sequential",
        report_to=[],
        use_cpu=True,
        save_strategy="no",
        logging_steps=1,
        disable_tqdm=True,
        seed=0,
        dataloader_num_workers=0,
        optim="adamw_torch",
    )  # the hand loop's AdamW (not the fused one)
    settings.update(overrides)
    return TrainingArguments(str(out), **settings)


def summed_ce(outputs, labels, num_items_in_batch=None):
    """Sum of the micro-batch's losses over the window's example count: the window's gradient is its mean's."""
    return F.cross_entropy(outputs.logits, labels, reduction="sum") / num_items_in_batch


def trainable(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def assert_all_equal(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    bad = [n for n in a if not torch.equal(a[n], b[n])]
    assert not bad, f"{len(bad)} tensors differ, e.g. {bad[:3]}"


def cfg_for(method: str, **kw) -> PerturbationConfig:
    return PerturbationConfig(method=method, rho=0.1, sigma=0.05, beta_g=0.05, **kw)


# ------------------------------------------------------------------------------------------------ configuration
@pytest.mark.parametrize(
    "name, value",
    [
        ("method", "adam"),
        ("rho", -0.1),
        ("rho", float("nan")),
        ("beta", 1.0),
        ("apn", "sqrt"),
        ("momentum", "fast"),
        ("momentum", 1.5),
        ("adaptive", "yes"),
        ("sigma", -1.0),
        ("beta_g", -0.5),
        ("seed", 1.5),
        ("exact_restore", "no"),
        ("space", "dense"),
        ("norm", "row"),
        ("max_scale", 0.0),
        ("preset", "mgpo"),
        ("profile", "glue"),
        ("gbar_update", "epoch"),
        ("perturb_non_lora", "yes"),
    ],
)
def test_invalid_config_names_the_field_and_value(name, value, tmp_path):
    cfg = PerturbationConfig(**{name: value})
    with pytest.raises(ValueError, match=rf"perturbation\.{name}=") as info:
        cfg.validate()
    assert repr(value) in str(info.value)
    with pytest.raises(ValueError, match=rf"perturbation\.{name}="):
        PerturbationTrainer(model=tiny_bert(), args=make_args(tmp_path), perturbation=cfg)


def test_an_unknown_choice_lists_the_values_to_type_and_says_null_leaves_it_unset():
    with pytest.raises(ValueError) as info:
        PerturbationConfig(preset="mgpo").validate()
    msg = str(info.value)
    assert "choose one of lora, mgpo-no-apn, lora-mgpo, msam (or null: leave it unset)." in msg
    assert "None" not in msg


def test_a_field_the_preset_sets_given_otherwise_too_is_refused():
    with pytest.raises(ValueError, match=r"preset='lora-mgpo' sets method='mgpo', but perturbation.method='sam'"):
        PerturbationConfig(preset="lora-mgpo", method="sam").validate()
    with pytest.raises(ValueError, match=r"preset='msam' sets apn='off', but perturbation.apn='weight'"):
        PerturbationConfig(preset="msam", apn="weight").validate()
    PerturbationConfig(preset="lora-mgpo", apn="weight").validate()  # lora-mgpo leaves apn as given: a rule arm
    assert PerturbationConfig(preset="lora-mgpo", apn="weight").resolved().apn == "weight"


@pytest.mark.parametrize("given, expected", [("optimizer", "optimizer"), ("0.9", 0.9), (0.8, 0.8), (0, 0.0)])
def test_momentum_accepts_optimizer_or_a_number(given, expected):
    cfg = PerturbationConfig(momentum=given)
    cfg.validate()
    assert cfg.momentum_value() == expected
    opt = build_optimizer(tiny_bert(), cfg, [{"params": [torch.nn.Parameter(torch.ones(2))]}], lr=0.1)
    assert opt.hparams["momentum"] == expected


def test_build_optimizer_gives_each_method_its_class_and_settings():
    model = tiny_bert()
    groups = decay_groups(model, weight_decay=0.1)
    expected = {
        "adamw": torch.optim.AdamW,
        "mgpo": mgpo.MGPO,
        "msam": mgpo.MSAM,
        "sam": mgpo.SAM,
        "random": mgpo.RandomPerturbation,
        "ggpo": mgpo.GGPO,
    }
    assert set(expected) == set(METHODS)
    for method, cls in expected.items():
        cfg = PerturbationConfig(
            method=method,
            rho=0.2,
            beta=0.5,
            apn="inverse",
            momentum="0.9",
            adaptive=True,
            sigma=0.1,
            beta_g=0.2,
            seed=7,
        )
        opt = build_optimizer(model, cfg, groups, lr=0.01, weight_decay=0.1, total_steps=9, betas=(0.8, 0.9))
        assert type(opt) is cls
        base = opt if method == "adamw" else opt.base_optimizer
        assert type(base) is torch.optim.AdamW and base.defaults["betas"] == (0.8, 0.9)
        assert [g["lr"] for g in opt.param_groups] == [0.01, 0.01]
        assert [g["weight_decay"] for g in opt.param_groups] == [0.1, 0.0]  # HF's rule: none on biases
        if method != "adamw":
            assert opt.model is model
        hp = getattr(opt, "hparams", {})
        if method == "mgpo":
            assert (hp["rho"], hp["beta"], hp["apn"], hp["momentum"]) == (0.2, 0.5, "inverse", 0.9)
        if method == "sam":
            assert (hp["rho"], hp["adaptive"]) == (0.2, True)
        if method == "random":
            assert (hp["rho"], hp["total_steps"], hp["seed"]) == (0.2, 9, 7)
        if method == "ggpo":
            assert (hp["sigma"], hp["beta_g"], hp["seed"]) == (0.1, 0.2, 7)
    assert "initial_lr" not in groups[0] and "betas" not in groups[0]  # the caller's groups are left alone


def test_perturbed_needs_a_trainer_class():
    with pytest.raises(TypeError, match="transformers.Trainer subclass"):
        perturbed(torch.optim.AdamW)
    cls = perturbed(Trainer)
    assert issubclass(cls, Trainer) and issubclass(cls, PerturbationTrainerMixin)
    assert perturbed(cls) is cls


# ------------------------------------------------------------------------------------------------ the training loop
def manual_run(method: str, steps: int, data: datasets.Dataset, accumulation: int = 2) -> dict:
    """The reference: the same optimizer driven by hand, one perturbation per window of micro-batches."""
    model = tiny_bert()
    groups = decay_groups(model, weight_decay=0.0)
    opt = build_optimizer(model, cfg_for(method), groups, lr=1e-2, total_steps=steps)
    rows = data.with_format("torch")
    window = BATCH * accumulation
    for step in range(steps):
        micro = [rows[step * window + i * BATCH : step * window + (i + 1) * BATCH] for i in range(accumulation)]

        def forward_backward():
            for batch in micro:
                out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
                summed_ce(out, batch["labels"], torch.tensor(window)).backward()

        model.train()
        forward_backward()
        if method == "sam":
            opt.step(forward_backward)
        else:
            opt.step()
        opt.zero_grad()
    return trainable(model)


@pytest.mark.parametrize(
    "method, how", [(m, "PerturbationTrainer") for m in METHODS] + [(m, "plain Trainer") for m in ("mgpo", "random")]
)
def test_trainer_with_accumulation_matches_the_hand_loop(method, how, tmp_path):
    steps, data = 3, cls_data(24)
    model = tiny_bert()
    args = make_args(tmp_path, max_steps=steps)
    common = dict(model=model, args=args, train_dataset=data, compute_loss_func=summed_ce)
    if how == "plain Trainer":  # the one-or-two-line usage: our optimizer handed to an unmodified Trainer
        opt = build_optimizer(
            model,
            cfg_for(method),
            [{"params": [p for p in model.parameters() if p.requires_grad]}],
            lr=1e-2,
            total_steps=steps,
        )
        trainer = Trainer(optimizers=(opt, None), **common)
    else:
        trainer = PerturbationTrainer(perturbation=cfg_for(method), **common)
    forwards = []
    model.register_forward_pre_hook(lambda module, _: forwards.append(module.training))
    trainer.train()
    assert_all_equal(trainable(model), manual_run(method, steps, data))
    assert forwards.count(True) == steps * 2 * (2 if method == "sam" else 1)  # SAM replays the whole window
    real = trainer.perturbation_optimizer if how == "PerturbationTrainer" else unwrap_optimizer(trainer.optimizer)
    assert real is not trainer.optimizer and type(real).__name__ != "AcceleratedOptimizer"
    if method != "adamw":
        assert real.last_stats["perturbation_norm"] > 0 and not real.is_perturbed


def test_plain_trainer_with_sam_says_how_to_fix(tmp_path):
    model = tiny_bert()
    trainer = Trainer(
        model=model,
        args=make_args(tmp_path, max_steps=1),
        train_dataset=cls_data(8),
        optimizers=(mgpo.SAM(model, lr=1e-2), None),
    )
    with pytest.raises(RuntimeError, match="two forward/backward"):
        trainer.train()


def test_sam_second_pass_is_clipped_like_the_first(tmp_path):
    model = tiny_bert()
    trainer = PerturbationTrainer(
        model=model,
        args=make_args(tmp_path, max_steps=1, max_grad_norm=1e-3),
        train_dataset=cls_data(8),
        perturbation=cfg_for("sam"),
    )
    trainer.create_optimizer()
    base = trainer.optimizer.base_optimizer
    norms, base_step = [], base.step

    def spy(*args, **kwargs):  # the base step sees the second gradient, clipped
        norms.append(float(torch.stack([p.grad.norm() for g in base.param_groups for p in g["params"]]).norm()))
        return base_step(*args, **kwargs)

    base.step = spy
    trainer.train()
    assert len(norms) == 1 and norms[0] == pytest.approx(1e-3, rel=1e-3)


# ------------------------------------------------------------------------------------------------ clean weights
class CleanProbe(TrainerCallback):
    """At step 2: remember the clean weights, then force the perturbation on before evaluation and before saving."""

    def __init__(self):
        self.events, self.clean, self.clean_saved, self.moved = [], {}, {}, False

    def on_step_end(self, args, state, control, model=None, optimizer=None, **kwargs):
        if state.global_step == 2:
            opt = unwrap_optimizer(optimizer)
            self.clean = trainable(model)
            self.clean_saved = {k: v.clone() for k, v in get_peft_model_state_dict(model).items()}
            opt.perturb()
            self.moved = any(not torch.equal(p, self.clean[n]) for n, p in trainable(model).items())

    def on_evaluate(self, args, state, control, model=None, optimizer=None, **kwargs):
        opt = unwrap_optimizer(optimizer)
        self.events.append(("evaluate", state.global_step, opt.is_perturbed, trainable(model)))
        opt.perturb()  # on again, so that the checkpoint has to take it off

    def on_save(self, args, state, control, optimizer=None, **kwargs):
        self.events.append(("save", state.global_step, unwrap_optimizer(optimizer).is_perturbed, None))


@pytest.mark.parametrize(
    "method, exact", [("mgpo", None), ("mgpo", True), ("sam", None), ("random", None), ("ggpo", None)]
)
def test_evaluation_and_checkpoints_see_clean_weights(method, exact, tmp_path):
    model = tiny_bert()
    probe = CleanProbe()
    args = make_args(
        tmp_path,
        max_steps=3,
        eval_strategy="steps",
        eval_steps=2,
        save_strategy="steps",
        save_steps=2,
        train_sampling_strategy="random",
    )
    # mgpo: the classifier head perturbed too (perturb_non_lora), so that a tensor is moved in place between steps
    extra = {"perturb_non_lora": True} if method == "mgpo" else {}
    trainer = PerturbationTrainer(
        model=model,
        args=args,
        train_dataset=cls_data(24),
        eval_dataset=cls_data(8, seed=1),
        perturbation=cfg_for(method, exact_restore=exact, **extra),
        callbacks=[probe],
    )
    trainer.train()
    # evaluated and saved at step 2 and again at the end of the epoch (step 3), never with a perturbation on
    assert [e[:3] for e in probe.events] == [
        ("evaluate", 2, False),
        ("save", 2, False),
        ("evaluate", 3, False),
        ("save", 3, False),
    ]
    assert probe.moved == (method == "mgpo")  # only MGPO's perturbation lives in the weights between steps
    saved = load_file(str(tmp_path / "checkpoint-2" / "adapter_model.safetensors"))
    assert saved.keys() == probe.clean_saved.keys()
    at_eval = probe.events[0][3]
    if method == "mgpo" and not exact:  # subtracting what was added: exact to a few ulp
        for name in saved:
            torch.testing.assert_close(saved[name], probe.clean_saved[name], rtol=0, atol=1e-6)
        for name in at_eval:
            torch.testing.assert_close(at_eval[name], probe.clean[name], rtol=0, atol=1e-6)
    else:
        assert_all_equal(saved, probe.clean_saved)
        assert_all_equal(at_eval, probe.clean)
    final = {k: v for k, v in get_peft_model_state_dict(model).items()}
    assert any(not torch.equal(final[k], saved[k]) for k in saved)  # step 3 trained on after the checkpoint


# ------------------------------------------------------------------------------------------------ resume
@pytest.mark.parametrize("method", ["mgpo", "sam", "ggpo"])  # ggpo: also the noise methods' step counter
def test_resume_from_checkpoint_is_bit_identical(method, tmp_path):
    common = dict(
        max_steps=4, train_sampling_strategy="random", lr_scheduler_type="cosine", warmup_steps=1, max_grad_norm=1.0
    )
    straight = tiny_bert()
    PerturbationTrainer(
        model=straight,
        args=make_args(tmp_path / "a", save_strategy="steps", save_steps=2, **common),
        train_dataset=cls_data(24),
        perturbation=cfg_for(method),
    ).train()
    resumed = tiny_bert()
    trainer = PerturbationTrainer(
        model=resumed,
        args=make_args(tmp_path / "b", **common),
        train_dataset=cls_data(24),
        perturbation=cfg_for(method),
    )
    trainer.train(resume_from_checkpoint=str(tmp_path / "a" / "checkpoint-2"))
    assert trainer.state.global_step == 4
    assert_all_equal(trainable(resumed), trainable(straight))
    saved = torch.load(tmp_path / "a" / "checkpoint-2" / "optimizer.pt", weights_only=True)
    assert set(saved) == {"base", "own", "extra"}


@pytest.mark.parametrize("saved, resumed", [("mgpo", "adamw"), ("mgpo", "sam"), ("adamw", "mgpo")])
def test_resume_with_another_method_names_both(saved, resumed, tmp_path):
    """resume_from_checkpoint with another method: a plain AdamW given MGPO's state ended in torch's bare
    KeyError: 'param_groups'; MGPO's state in SAM named a setting to change instead of the methods."""
    PerturbationTrainer(
        model=tiny_bert(),
        args=make_args(tmp_path / "a", max_steps=1, save_strategy="steps", save_steps=1),
        train_dataset=cls_data(8),
        perturbation=cfg_for(saved),
    ).train()
    trainer = PerturbationTrainer(
        model=tiny_bert(),
        args=make_args(tmp_path / "b", max_steps=2),
        train_dataset=cls_data(8),
        perturbation=cfg_for(resumed),
    )
    names = {"mgpo": "MGPO", "sam": "SAM", "adamw": "AdamW"}
    with pytest.raises(ValueError, match=rf"(?s)saved by {names[saved]}|{names[resumed]}.*plain optimizer's") as err:
        trainer.train(resume_from_checkpoint=str(tmp_path / "a" / "checkpoint-1"))
    assert "never changes the method" in str(err.value)


# ------------------------------------------------------------------------------------------------ AdaLoRA, logging
def test_adalora_allocates_after_every_step_before_zero_grad(tmp_path):
    steps = 10
    adapter = AdapterConfig(
        method="adalora",
        adalora_init_rank=4,
        adalora_target_rank=2,
        adalora_delta_t=1,
        adalora_tinit_frac=0.1,
        adalora_tfinal_frac=0.2,
    )
    model = tiny_bert(adapter, total_steps=steps)
    calls = []
    allocate = model.base_model.update_and_allocate

    def spy(global_step):
        grads = [p.grad for n, p in model.named_parameters() if "lora_" in n and p.requires_grad]
        calls.append((global_step, all(g is not None for g in grads)))
        return allocate(global_step)

    model.base_model.update_and_allocate = spy
    trainer = PerturbationTrainer(
        model=model,
        args=make_args(tmp_path, max_steps=steps, gradient_accumulation_steps=1),
        train_dataset=cls_data(40),
        perturbation=cfg_for("mgpo"),
        adapter=adapter,
    )
    trainer.train()
    assert calls == [(step, True) for step in range(steps)]
    pattern = model.peft_config["default"].rank_pattern
    assert pattern is not None
    assert sum(sum(keep) for keep in pattern.values()) < 4 * len(pattern)  # ranks were pruned


def test_adalora_clean_and_eval_losses_are_the_task_loss_without_its_orthogonality_penalty(tmp_path):
    """PEFT's AdaLoRA adds its orthogonality penalty to every loss it computes, eval mode included: it trains on
    it, but a probe or test loss that holds it is not the quantity other methods' are (in a 100-step MiniLM run it
    was 1.9 of a 'clean loss' whose task part was 0.69)."""
    adapter = AdapterConfig(method="adalora", adalora_init_rank=4, adalora_target_rank=2)
    model = tiny_bert(adapter, total_steps=4)
    data = cls_data(8)
    trainer = PerturbationTrainer(
        model=model,
        args=make_args(tmp_path, gradient_accumulation_steps=1),
        train_dataset=data,
        eval_dataset=data,
        perturbation=cfg_for("mgpo"),
        adapter=adapter,
        clean_loss_probe=data,
        clean_loss_every=2,
    )
    trainer.train()
    model.eval()
    batch = {k: torch.tensor(data[k]) for k in ("input_ids", "attention_mask", "labels")}
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        task, penalised = F.cross_entropy(logits, batch["labels"]).item(), model(**batch).loss.item()
    assert penalised > task + 0.1  # the model's own loss holds the penalty
    assert trainer.clean_loss() == pytest.approx(task, rel=1e-5)
    assert trainer.evaluate()["eval_loss"] == pytest.approx(task, rel=1e-5)
    assert model.peft_config["default"].orth_reg_weight == 0.5  # training keeps its objective
    logged = [r for r in trainer.state.log_history if "clean_loss" in r]
    assert logged and all(r["clean_loss"] < r["loss"] - 0.1 for r in logged)  # `loss` as trained: with the penalty


class StatsProbe(TrainerCallback):
    def __init__(self):
        self.stats = []

    def on_optimizer_step(self, args, state, control, optimizer=None, **kwargs):
        self.stats.append(dict(unwrap_optimizer(optimizer).last_stats))


def test_statistics_reach_the_logs_and_loraplus_groups_are_used(tmp_path):
    adapter = AdapterConfig(method="loraplus", rank=4, alpha=8, loraplus_lr_ratio=4.0)
    model = tiny_bert(adapter)
    probe = StatsProbe()
    trainer = PerturbationTrainer(
        model=model,
        args=make_args(tmp_path, logging_steps=2, weight_decay=0.01),
        train_dataset=cls_data(32),
        perturbation=cfg_for("mgpo", apn="normalized"),
        adapter=adapter,
        callbacks=[probe],
    )
    trainer.train()
    opt = trainer.perturbation_optimizer
    lrs = sorted({g["lr"] for g in opt.param_groups})
    assert lrs == [pytest.approx(1e-2), pytest.approx(4e-2)]
    assert {g["weight_decay"] for g in opt.param_groups} <= {0.0, 0.01} and opt.param_groups[0]["weight_decay"] == 0.01
    logs = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert [entry["step"] for entry in logs] == [2, 4] and len(probe.stats) == 4
    for i, entry in enumerate(logs):
        window = probe.stats[2 * i : 2 * i + 2]
        for key in ("perturbation_norm", "momentum_norm", "gbar_mean"):
            assert entry[key] == pytest.approx(sum(s[key] for s in window) / 2, rel=1e-6)
        assert entry["skipped_steps"] == 0
    # apn="normalized" keeps the radius at rho; step 1 ran at the clean weights (no momentum yet): steps 1-2 average
    # to rho / 2, steps 3-4 are at rho
    assert [entry["perturbation_norm"] for entry in logs] == [
        pytest.approx(0.05, rel=1e-4),
        pytest.approx(0.1, rel=1e-4),
    ]


def test_gradient_accumulation_gives_the_gradient_of_the_whole_batch(tmp_path):
    """BERT's classifier takes **kwargs but returns a plain mean: transformers then skipped its division by
    gradient_accumulation_steps, and the loss, gradient and MGPO's gbar (the APN radius) came out twice as large
    with 4 x 2 micro-batches as with one batch of 8."""
    logs = {}
    for batch, accum in ((BATCH, 2), (2 * BATCH, 1)):
        trainer = PerturbationTrainer(
            model=tiny_bert(),
            train_dataset=cls_data(32),
            perturbation=cfg_for("mgpo"),
            args=make_args(
                tmp_path / str(accum), per_device_train_batch_size=batch, gradient_accumulation_steps=accum, max_steps=2
            ),
        )
        trainer.train()
        assert trainer.model_accepts_loss_kwargs is False
        logs[accum] = [entry for entry in trainer.state.log_history if "loss" in entry]
    for key in ("loss", "grad_norm", "gbar_mean"):
        assert [e[key] for e in logs[2]] == pytest.approx([e[key] for e in logs[1]], rel=1e-4), key


def test_a_causal_lm_keeps_dividing_its_loss_by_the_token_count():
    from transformers import LlamaForCausalLM

    from mgpo.integrations.trainer import _scales_by_items

    assert _scales_by_items(LlamaForCausalLM.__new__(LlamaForCausalLM))
    assert not _scales_by_items(BertForSequenceClassification.__new__(BertForSequenceClassification))


@pytest.mark.parametrize("max_scale, warns", [(1e-6, True), (None, False)])
def test_a_capped_apn_factor_is_reported_once(max_scale, warns, tmp_path):
    """max_scale=1e-6 puts every layer's APN factor at its cap (1/gbar >= 1e-6 always); no cap: never capped. A run
    shorter than the ~50 steps the README reads apn_capped after is told so, at its end."""
    trainer = PerturbationTrainer(
        model=tiny_bert(),
        args=make_args(tmp_path, logging_steps=1, max_steps=4),
        train_dataset=cls_data(32),
        perturbation=cfg_for("mgpo", max_scale=max_scale),
    )
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.train()
    capped = [w for w in caught if "at the APN cap" in str(w.message)]
    assert len(capped) == int(warns)
    logs = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert [entry["apn_capped"] for entry in logs] == ([1.0] * 4 if warns else [0.0] * 4)
    if warns:
        said = str(capped[0].message)
        assert "at step 4 (early: after 4 of the ~50 steps the README reads it after)" in said
        assert "is at max_scale" in said and "divide rho by ten (rho=0.01)" in said


@pytest.mark.parametrize(
    "rho, advice",
    [(0.05, "divide rho by ten (rho=0.005)"), (0.005, "rho=0.005 is already a tenth of the profile's 0.05 or less")],
)
def test_the_cap_warning_reads_after_fifty_steps_and_gives_the_readmes_advice(rho, advice, tmp_path):
    """The README: read apn_capped after the first fifty or so steps; if most layers are still capped, divide rho
    by ten, once. The warning waits for step 50 and does not ask a run already at rho / 10 to divide again."""
    trainer = PerturbationTrainer(
        model=tiny_bert(),
        args=make_args(tmp_path, logging_steps=5, max_steps=60),
        train_dataset=cls_data(32),
        perturbation=PerturbationConfig(method="mgpo", rho=rho, max_scale=1e-6, profile="nlu"),
    )
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.train()
    capped = [str(w.message) for w in caught if "at the APN cap" in str(w.message)]
    assert len(capped) == 1 and capped[0].startswith("MGPO: at step 50, 100% of the layers") and advice in capped[0]
    assert "early" not in capped[0]


def test_random_ramp_spans_the_runs_steps(tmp_path):
    trainer = PerturbationTrainer(
        model=tiny_bert(),
        args=make_args(tmp_path, max_steps=2),
        train_dataset=cls_data(16),
        perturbation=cfg_for("random"),
    )
    trainer.train()
    assert trainer.perturbation_optimizer.hparams["total_steps"] == 2


# ------------------------------------------------------------------------------------------------ clean loss
class CleanLossCheck(TrainerCallback):
    """At each logged row: the probe's loss recomputed by hand at the clean weights, and at the perturbed ones."""

    def __init__(self, probe: datasets.Dataset):
        self.probe = probe
        self.rows: list[tuple] = []  # (step, logged clean_loss, clean, perturbed)

    def _loss(self, model) -> float:
        with torch.no_grad():
            logits = model(
                input_ids=torch.tensor(self.probe["input_ids"]),
                attention_mask=torch.tensor(self.probe["attention_mask"]),
            ).logits
            return F.cross_entropy(logits, torch.tensor(self.probe["labels"])).item()

    def on_log(self, args, state, control, logs=None, model=None, optimizer=None, **kwargs):
        if "loss" not in logs:
            return
        opt = unwrap_optimizer(optimizer)
        model.eval()
        clean = self._loss(model)  # between steps MGPO's perturbation is pending: these are the clean weights
        model.train()
        opt.perturb()  # the weights the next training forward will see
        perturbed = self._loss(model)
        opt.restore()
        self.rows.append((state.global_step, logs.get("clean_loss"), clean, perturbed))


def test_clean_loss_is_the_probe_at_the_clean_weights_in_the_row_of_the_loss(tmp_path):
    probe = cls_data(12, seed=5)
    check = CleanLossCheck(probe)
    args = make_args(tmp_path, logging_steps=1, max_steps=4, per_device_eval_batch_size=5)
    trainer = PerturbationTrainer(
        model=tiny_bert(),
        args=args,
        train_dataset=cls_data(32),
        perturbation=PerturbationConfig(method="mgpo", rho=0.5, apn="normalized"),
        clean_loss_probe=probe,
        clean_loss_every=2,
        callbacks=[check],
    )
    trainer.train()
    assert [(step, logged is not None) for step, logged, _, _ in check.rows] == [
        (1, False),
        (2, True),
        (3, False),
        (4, True),
    ]
    for step, logged, clean, at_perturbed in check.rows:
        if logged is not None:
            assert logged == pytest.approx(clean, rel=1e-5), step  # 12 examples in batches of 5, 5, 2
            assert abs(logged - at_perturbed) > 1e-4, step
    assert trainer.model.training and not trainer.perturbation_optimizer.is_perturbed


@pytest.mark.parametrize(
    "every, message", [(3, "multiple of logging_steps=2"), (-1, "clean_loss_every=-1"), (1.5, "clean_loss_every=1.5")]
)
def test_clean_loss_every_is_checked(every, message, tmp_path):
    with pytest.raises(ValueError, match=message):
        PerturbationTrainer(
            model=tiny_bert(),
            args=make_args(tmp_path, logging_steps=2),
            train_dataset=cls_data(8),
            clean_loss_probe=cls_data(4),
            clean_loss_every=every,
        )


# ------------------------------------------------------------------------------------------------ TRL
def test_sft_trainer_with_mgpo_on_a_tiny_llama(tmp_path):
    trl = pytest.importorskip("trl")
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    words = "the cat dog sat on mat ran to a big red blue house".split()
    vocab = {w: i for i, w in enumerate(["<pad>", "<unk>", "<s>", "</s>"] + words)}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token="<pad>", unk_token="<unk>", bos_token="<s>", eos_token="</s>"
    )
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(vocab),
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
    model = apply_adapter(LlamaForCausalLM(config), AdapterConfig(rank=4), task="causal-lm")
    gen = torch.Generator().manual_seed(0)
    rows = [" ".join(words[i] for i in torch.randint(0, len(words), (5 + k % 4,), generator=gen)) for k in range(12)]
    before = trainable(model)
    args = trl.SFTConfig(
        str(tmp_path),
        max_steps=2,
        per_device_train_batch_size=4,
        report_to=[],
        use_cpu=True,
        logging_steps=1,
        save_strategy="no",
        disable_tqdm=True,
        max_length=16,
        learning_rate=1e-2,
    )
    trainer = perturbed(trl.SFTTrainer)(
        model=model,
        args=args,
        train_dataset=datasets.Dataset.from_dict({"text": rows}),
        processing_class=tokenizer,
        perturbation=cfg_for("mgpo", apn="normalized"),
    )
    trainer.train()
    opt = trainer.perturbation_optimizer
    assert isinstance(opt, mgpo.MGPO) and not opt.is_perturbed
    logs = [entry for entry in trainer.state.log_history if "loss" in entry]
    # step 1 ran at the clean weights (no momentum yet), step 2 at radius rho
    assert [entry["perturbation_norm"] for entry in logs] == [0.0, pytest.approx(0.1, rel=1e-4)]
    assert all("mean_token_accuracy" in entry for entry in logs)  # TRL's own logging still there
    after = trainable(model)
    assert all(not torch.equal(after[n], before[n]) for n in before)


def test_presets_and_profiles_build_the_papers_arms():
    model = tiny_bert()
    groups = [{"params": [p for p in model.parameters() if p.requires_grad]}]
    lora = build_optimizer(model, PerturbationConfig(preset="lora"), groups, lr=1e-3)
    assert type(lora) is torch.optim.AdamW
    no_apn = build_optimizer(
        model, PerturbationConfig(preset="mgpo-no-apn", profile="nlg"), groups, lr=1e-3, betas=(0.9, 0.95)
    )
    assert isinstance(no_apn, mgpo.MGPO) and no_apn.hparams["apn"] == "off" and no_apn.hparams["space"] == "weight"
    assert (no_apn.hparams["rho"], no_apn.hparams["beta"]) == (0.01, 0.8)
    assert no_apn.base_optimizer.defaults["betas"] == (0.8, 0.95)  # mu is AdamW's beta1, beta2 kept
    # rho or beta given explicitly win over the profile (a sweep arm "rho / 10" on top of profile nlu)
    tuned = build_optimizer(model, PerturbationConfig(preset="lora-mgpo", profile="nlu", rho=0.005), groups, lr=1e-3)
    assert (tuned.hparams["rho"], tuned.hparams["beta"]) == (0.005, 0.9)
    assert tuned.base_optimizer.defaults["betas"][0] == 0.9
    tuned.close()
    full = build_optimizer(model, PerturbationConfig(preset="lora-mgpo"), groups, lr=1e-3)
    assert {k: full.hparams[k] for k in ("apn", "space", "norm", "max_scale")} == dict(
        apn="inverse", space="weight", norm="layer", max_scale=10.0
    )
    msam = build_optimizer(model, PerturbationConfig(preset="msam"), groups, lr=1e-3)
    assert (msam.hparams["space"], msam.hparams["apn"], msam.hparams["norm"]) == ("factors", "off", "global")
    for o in (no_apn, full, msam):
        o.close()


def test_a_given_adam_like_base_optimizer_gets_the_arguments_betas_and_eps(tmp_path):
    """NAdam is no subclass of Adam: it still takes the arguments' adam_beta1/2 and adam_epsilon (they were dropped,
    so it trained at its own defaults while the arguments said otherwise); SGD takes neither."""
    args = make_args(tmp_path, adam_beta1=0.7, adam_beta2=0.95, adam_epsilon=1e-6)
    trainer = PerturbationTrainer(
        model=tiny_bert(), args=args, perturbation=PerturbationConfig(method="mgpo"), base_optimizer=torch.optim.NAdam
    )
    trainer.create_optimizer()
    defaults = trainer.optimizer.base_optimizer.defaults
    assert defaults["betas"] == (0.7, 0.95) and defaults["eps"] == 1e-6


def test_a_profile_with_a_base_optimizer_without_betas_is_refused(tmp_path):
    """The profile's mu is AdamW's beta1: with SGD (or RMSprop, Adagrad) it was dropped without a word (the run
    trained with the profile's rho and beta but SGD's momentum); with NAdam or Adamax, not Adam subclasses, too."""
    model = tiny_bert()
    groups = [{"params": [p for p in model.parameters() if p.requires_grad]}]
    for base in (torch.optim.SGD, torch.optim.RMSprop):
        with pytest.raises(ValueError, match=rf"profile='nlg'.*mu=0\.8.*{base.__name__} has no betas"):
            build_optimizer(
                model, PerturbationConfig(profile="nlg"), groups, lr=1e-3, base_optimizer=base, momentum=0.9
            )
    for base in (torch.optim.NAdam, torch.optim.Adamax):
        opt = build_optimizer(model, PerturbationConfig(profile="nlg"), groups, lr=1e-3, base_optimizer=base)
        assert opt.base_optimizer.defaults["betas"] == (0.8, 0.999)
        opt.close()
    trainer = PerturbationTrainer(
        model=model,
        args=make_args(tmp_path, optim="sgd", max_steps=1),
        train_dataset=cls_data(8),
        perturbation=cfg_for("mgpo", profile="nlg"),
    )
    with pytest.raises(ValueError, match="SGD has no betas"):
        trainer.train()
