"""MGPO inside the HF Trainer follows the authors' code where it does not say otherwise: gbar from the gradients
before clipping, their per-micro-batch schedule on request, and the traps around it (hooks after training, an
adapter switched under the optimizer, the APN warning at rho=0, TRL missing)."""

from __future__ import annotations

import copy
import importlib
import sys
import warnings

import pytest
import torch
from transformers import TrainingArguments

import mgpo
from mgpo.integrations.trainer import PerturbationConfig, PerturbationTrainer
from tests.optim.test_weight_space import max_relative_error, reference, tiny_llama

warnings.filterwarnings("ignore", category=FutureWarning)
PAPER = dict(rho=0.05, beta=0.9, apn="inverse", norm="layer", momentum="optimizer")
ROWS = 4


def rows(n=ROWS, seed=3):
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 48, (n, 8), generator=gen)
    return [{"input_ids": r, "labels": r} for r in ids]


def hf_train(model, out, *, steps, accum, clip, gbar_update="step"):
    args = TrainingArguments(
        str(out),
        max_steps=steps,
        per_device_train_batch_size=ROWS // accum,
        gradient_accumulation_steps=accum,
        learning_rate=1e-2,
        lr_scheduler_type="constant",
        weight_decay=0.0,
        max_grad_norm=clip,
        train_sampling_strategy="sequential",
        report_to=[],
        use_cpu=True,
        save_strategy="no",
        logging_steps=1,
        disable_tqdm=True,
        seed=0,
        dataloader_num_workers=0,
        optim="adamw_torch",
    )
    trainer = PerturbationTrainer(
        model=model, args=args, train_dataset=rows(), perturbation=PerturbationConfig(gbar_update=gbar_update)
    )
    trainer.train()
    return trainer


def trained(model):
    return [[p.detach().clone() for p in model.parameters() if p.requires_grad]]


@pytest.mark.parametrize("clip", [0.1, 0.05])
def test_hf_trainer_with_clipping_takes_gbar_before_clipping(tmp_path, clip):
    """HF Trainer clips at max_grad_norm before optimizer.step(); the authors' gbar EMA (and ours, by default)
    sees the gradients before that. Against the dense float64 re-computation with clipping."""
    model = tiny_llama()
    batch = torch.stack([r["input_ids"] for r in rows()])
    ref = reference(copy.deepcopy(model), [[batch]] * 6, clip=clip, **PAPER)
    trainer = hf_train(model, tmp_path, steps=6, accum=1, clip=clip)
    assert max_relative_error(trained(model), ref[-1:]) < 1e-9
    assert trainer.perturbation_optimizer.last_stats["perturbation_norm"] > 0


def test_hf_trainer_per_micro_batch_schedule_is_the_authors(tmp_path):
    """gbar_update='micro_batch' with 2 micro-batches and clipping: gbar after every micro-batch from the partial
    sum and the perturbation re-scaled with it, as the authors' training_step does."""
    model = tiny_llama()
    data = rows()
    micro = [torch.stack([r["input_ids"] for r in data[:2]]), torch.stack([r["input_ids"] for r in data[2:]])]
    ref = reference(copy.deepcopy(model), [micro] * 4, clip=0.1, per_micro_batch=True, **PAPER)
    per_step = reference(copy.deepcopy(model), [micro] * 4, clip=0.1, **PAPER)
    hf_train(model, tmp_path, steps=4, accum=2, clip=0.1, gbar_update="micro_batch")
    assert max_relative_error(trained(model), ref[-1:]) < 1e-9
    assert max_relative_error(per_step[-1:], ref[-1:]) > 1e-6  # the two schedules are distinguishable here


def test_hooks_are_closed_after_training_and_reopened_by_train(tmp_path):
    """After trainer.train() a train-mode forward with gradients runs at the clean weights; train() again
    perturbs again."""
    model = tiny_llama()
    trainer = hf_train(model, tmp_path, steps=3, accum=1, clip=0.0)
    opt = trainer.perturbation_optimizer
    assert opt.closed and not opt.is_perturbed and opt.coef is not None
    ids = rows()[0]["input_ids"][None]
    model.train()
    with torch.enable_grad():
        after = model(input_ids=ids).logits
    model.eval()
    with torch.no_grad():
        clean = model(input_ids=ids).logits
    torch.testing.assert_close(after.detach(), clean, rtol=0, atol=0)
    trainer.args.max_steps = 5
    trainer.train()
    assert opt.closed  # closed again at the end, after perturbing in between
    assert trainer.state.global_step == 5 and opt.last_stats["perturbation_norm"] > 0


def test_a_switched_adapter_is_named_not_trained_silently():
    model = tiny_llama()
    opt = mgpo.MGPO(model, lr=1e-2)
    model.add_adapter("other", copy.deepcopy(model.peft_config["default"]))
    model.set_adapter("other")
    ids = rows()[0]["input_ids"][None]
    model.train()
    model(input_ids=ids, labels=ids).loss.backward()
    with pytest.warns(RuntimeWarning, match=r"set_adapter.*build the optimizer after"):
        opt.step()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        opt.step()  # once


def test_apn_cap_warning_is_silent_at_rho_zero(tmp_path):
    def capped_warnings(rho):
        with warnings.catch_warnings(record=True) as seen:
            warnings.simplefilter("always")
            args = TrainingArguments(
                str(tmp_path / str(rho)),
                max_steps=3,
                per_device_train_batch_size=ROWS,
                report_to=[],
                use_cpu=True,
                save_strategy="no",
                logging_steps=1,
                disable_tqdm=True,
                learning_rate=1e-2,
            )
            PerturbationTrainer(
                model=tiny_llama(),
                args=args,
                train_dataset=rows(),
                perturbation=PerturbationConfig(rho=rho, max_scale=0.5),
            ).train()
        return [w for w in seen if "at the APN cap" in str(w.message)]

    assert capped_warnings(0.05)  # gbar < 2 everywhere: every factor at the cap 0.5, and said so
    assert not capped_warnings(0.0)


def test_sft_without_trl_names_the_install_command(monkeypatch):
    monkeypatch.setitem(sys.modules, "trl", None)  # what an environment without TRL looks like to an import
    monkeypatch.delitem(sys.modules, "mgpo.integrations.sft", raising=False)
    with pytest.raises(ModuleNotFoundError, match=r'pip install -e "\.\[hf,trl\]"'):
        importlib.import_module("mgpo.integrations.sft")
