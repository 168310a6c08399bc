"""``mgpo.clean_loss``: the loss at the clean weights, taken in the middle of a perturbation window."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

import mgpo
from tests.optim.helpers import METHODS, batches, loss_fn, make_model, raw_params, train_step


def eval_loss(model, probe) -> float:
    """The reference: eval mode, the examples of all batches at once."""
    model.eval()
    with torch.no_grad():
        x, y = torch.cat([b[0] for b in probe]), torch.cat([b[1] for b in probe])
        value = torch.nn.functional.cross_entropy(model(x), y).item()
    model.train()
    return value


def test_mgpo_mid_window_gives_the_clean_loss_and_leaves_everything_as_it_was():
    model = make_model()
    opt = mgpo.MGPO(model, torch.optim.AdamW, lr=1e-2, rho=0.5)
    data = batches(5)
    for batch in data[:3]:
        train_step(model, opt, [batch])
    probe = batches(2, seed=7)
    clean = eval_loss(model, probe)  # between steps the perturbation is pending, not applied: clean weights
    model.train()
    loss_fn(model, data[3]).backward()  # a training forward puts the perturbation on: the window is open
    assert opt.is_perturbed
    with torch.no_grad():
        perturbed = sum(loss_fn(model, b).item() for b in probe) / len(probe)
    before, grads = raw_params(model), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    found = mgpo.clean_loss(model, probe, optimizer=opt, loss_fn=loss_fn)

    assert found == pytest.approx(clean, rel=1e-6)
    assert abs(found - perturbed) > 1e-3  # the loss at the perturbed weights is another number
    assert opt.is_perturbed and model.training  # the window and the mode are as they were
    after = raw_params(model)
    assert all(torch.equal(after[n], before[n]) for n in before)
    assert all(torch.equal(p.grad, grads[n]) for n, p in model.named_parameters() if p.grad is not None)
    opt.step()  # and training goes on as usual


@pytest.mark.parametrize("name", list(METHODS))
def test_every_method_gives_the_loss_at_its_clean_weights(name):
    cls, kwargs, _ = METHODS[name]
    model = make_model()
    opt = cls(model, torch.optim.AdamW, lr=1e-2, **kwargs)
    data = batches(3)
    for batch in data[:2]:
        train_step(model, opt, [batch])
    probe = batches(2, seed=7)
    clean = eval_loss(model, probe)
    model.train()
    if not opt.two_pass:
        loss_fn(model, data[2]).backward()  # SAM has no window outside step(); the others open theirs here
    assert mgpo.clean_loss(model, probe, optimizer=opt, loss_fn=loss_fn) == pytest.approx(clean, rel=1e-6)


def test_batches_are_weighted_by_their_examples_and_a_wrapped_optimizer_is_unwrapped():
    model = make_model()
    opt = mgpo.MGPO(model, torch.optim.AdamW, lr=1e-2, rho=0.5)
    train_step(model, opt, batches(1))
    probe = [batches(1, seed=3, size=8)[0], batches(1, seed=4, size=2)[0]]
    clean = eval_loss(model, probe)
    model.train()
    loss_fn(model, batches(1)[0]).backward()
    wrapped = SimpleNamespace(optimizer=opt)  # as accelerate's AcceleratedOptimizer holds it
    assert mgpo.clean_loss(model, probe, optimizer=wrapped, loss_fn=loss_fn) == pytest.approx(clean, rel=1e-6)
    model.eval()
    mgpo.clean_loss(model, probe, loss_fn=loss_fn)
    assert not model.training  # the mode it was in, eval included


def test_hugging_face_style_batches_need_no_loss_fn():
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    model = BertForSequenceClassification(
        BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=24)
    )
    gen = torch.Generator().manual_seed(0)
    batch = {"input_ids": torch.randint(0, 50, (4, 6), generator=gen), "labels": torch.tensor([0, 1, 1, 0])}
    model.eval()
    with torch.no_grad():
        expected = model(**batch).loss.item()
    model.train()
    assert mgpo.clean_loss(model, [batch]) == pytest.approx(expected, rel=1e-6) and model.training


def test_an_adalora_model_gives_its_task_loss_without_the_orthogonality_penalty_and_keeps_its_objective():
    """PEFT's AdaLoRA adds its orthogonality penalty to every loss it computes, in eval mode too; the probe
    measures the task's loss alone, and the penalty's weight is back for training afterwards."""
    from peft import AdaLoraConfig, get_peft_model
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    model = BertForSequenceClassification(
        BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=24)
    )
    model = get_peft_model(
        model,
        AdaLoraConfig(
            task_type="SEQ_CLS",
            init_r=4,
            target_r=2,
            total_step=10,
            orth_reg_weight=0.5,
            target_modules=["query", "value"],
        ),
    )
    gen = torch.Generator().manual_seed(0)
    batch = {"input_ids": torch.randint(0, 50, (4, 6), generator=gen), "labels": torch.tensor([0, 1, 1, 0])}
    model.eval()
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"]).logits
        task = torch.nn.functional.cross_entropy(logits, batch["labels"]).item()
        penalised = model(**batch).loss.item()
    assert penalised > task + 0.1
    assert mgpo.clean_loss(model, [batch]) == pytest.approx(task, rel=1e-6)
    assert model.peft_config["default"].orth_reg_weight == 0.5
    with torch.no_grad():
        assert model(**batch).loss.item() == pytest.approx(penalised)


def test_bad_batches_say_what_to_pass():
    model = make_model()
    with pytest.raises(TypeError, match="loss_fn="):
        mgpo.clean_loss(model, batches(1))  # (x, y) tuples: the model cannot take them as keywords
    with pytest.raises(ValueError, match="no examples"):
        mgpo.clean_loss(model, [], loss_fn=loss_fn)
    assert model.training


def test_clean_loss_imports_no_hugging_face_library():
    src = Path(__file__).resolve().parents[2] / "src"
    code = (
        "import sys, mgpo; mgpo.clean_loss; print(','.join(m for m in ('transformers', 'peft', 'datasets') "
        "if m in sys.modules))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        check=True,
        env={**os.environ, "PYTHONPATH": str(src)},
    )
    assert out.stdout.strip() == ""
