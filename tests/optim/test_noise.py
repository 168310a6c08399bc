"""RandomPerturbation and GGPO: the noise has the specified per-row standard deviation, is functional (frozen
weights bit-identical), is the same for every micro-batch of a step, and leaves the global RNG alone."""

from __future__ import annotations

import math

import peft
import pytest
import torch
from torch import nn

import mgpo
from mgpo.optim.ggpo import delta_grad_row_norms
from mgpo.optim.random_perturbation import merged_weight

IN, OUT = 512, 48


def lora_layer(seed=0):
    torch.manual_seed(seed)
    net = nn.Sequential(nn.Linear(IN, OUT))
    with torch.no_grad():  # rows of very different norms, so a wrong per-row scale shows
        net[0].weight.mul_(torch.linspace(0.2, 5.0, OUT)[:, None])
    model = peft.get_peft_model(
        net, peft.LoraConfig(r=4, lora_alpha=8, target_modules=["0"], init_lora_weights="gaussian")
    )
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.05)
    return model


def observed_noise(model, opt) -> torch.Tensor:
    """Forward the identity matrix: output(perturbed) - output(clean) = noise^T."""
    eye = torch.eye(IN)
    model.eval()
    with torch.no_grad():
        clean = model(eye)
    model.train()
    opt.perturb()
    with torch.no_grad():
        noisy = model(eye)  # no_grad train-mode forward: the applied perturbation stays as it is
    opt.restore()
    return (noisy - clean).T  # OUT x IN


def test_random_noise_has_the_specified_row_std():
    model = lora_layer()
    opt = mgpo.RandomPerturbation(model, lr=1e-3, rho=0.1, total_steps=4, seed=3)
    layer = next(iter(opt.targets.values()))
    noise = observed_noise(model, opt)
    ramp = (1 - math.cos(math.pi * 1 / 4)) / 2  # step 1 of 4
    expected = ramp * 0.1 / math.sqrt(IN) * merged_weight(layer).detach().norm(dim=1)
    ratio = noise.std(dim=1) / expected
    # per row: 512 samples give a relative std error of about 1/sqrt(2*512) = 3%; allow 5 of them
    assert bool(((ratio - 1).abs() < 0.15).all()), ratio
    assert float(ratio.mean()) == pytest.approx(1.0, abs=0.02)
    assert abs(float(noise.mean())) < 0.05 * float(expected.mean())


def test_ggpo_noise_uses_weight_and_gradient_row_norms():
    model = lora_layer()
    opt = mgpo.GGPO(model, lr=1e-3, sigma=0.03, beta_g=5.0, seed=1)
    layer = next(iter(opt.targets.values()))
    x = torch.randn(16, IN)
    model(x).pow(2).mean().backward()
    grad_rows = delta_grad_row_norms(layer).clone()
    opt.step()  # records gn_i of this step for the next step's noise
    opt.zero_grad()
    noise = observed_noise(model, opt)
    with torch.no_grad():
        w_rows = merged_weight(layer).norm(dim=1)
    # the step changed A and B slightly; the gradient rows are from before the step, as the spec says
    expected = (0.03 * w_rows + 5.0 * grad_rows) / math.sqrt(IN)
    ratio = noise.std(dim=1) / expected
    assert bool(((ratio - 1).abs() < 0.15).all()), ratio
    # the gradient term matters here: the weight term alone would be a poor fit
    assert float((grad_rows * 5.0 / (0.03 * w_rows)).max().detach()) > 0.5


def test_ggpo_gradient_row_norms_follow_the_formula():
    model = lora_layer()
    layer = model.base_model.model[0]
    model(torch.randn(8, IN)).sum().backward()
    a, b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    s = layer.scaling["default"]
    expected = (s * (b @ a.grad + b.grad @ a)).norm(dim=1)
    torch.testing.assert_close(delta_grad_row_norms(layer), expected)


@pytest.mark.parametrize("cls", [mgpo.RandomPerturbation, mgpo.GGPO])
def test_frozen_weights_bit_identical_and_global_rng_untouched(cls):
    model = lora_layer()
    opt = cls(model, lr=1e-2, seed=0)
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    x = torch.randn(8, IN)
    torch.manual_seed(1234)
    expected_rng = torch.get_rng_state()
    for _ in range(3):
        model.train()
        model(x).pow(2).mean().backward()
        opt.step()
        opt.zero_grad()
    assert torch.equal(torch.get_rng_state(), expected_rng)
    for n, p in model.named_parameters():
        if not p.requires_grad:
            assert torch.equal(p, frozen[n]), n


def test_the_layers_own_matmul_sees_w_plus_noise():
    """The custom autograd function's gradient equals that of an explicit x @ noise^T."""
    model = lora_layer()
    opt = mgpo.RandomPerturbation(model, lr=1e-3, rho=0.2, seed=5)
    noise = observed_noise(model, opt)  # OUT x IN
    x = torch.randn(4, IN, requires_grad=True)
    model.train()
    out = model(x)
    (grad_x,) = torch.autograd.grad(out.sum(), x)
    x2 = x.detach().clone().requires_grad_()
    with opt.unperturbed():
        out2 = model(x2) + x2 @ noise.T
    (grad_x2,) = torch.autograd.grad(out2.sum(), x2)
    torch.testing.assert_close(grad_x, grad_x2, rtol=1e-4, atol=1e-5)


def test_full_fine_tuning_targets_trainable_linears():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 2))
    opt = mgpo.RandomPerturbation(net, lr=1e-3)
    assert set(opt.targets) == {"0", "2"}


def test_no_target_layer_is_a_clear_error():
    with pytest.raises(ValueError, match="found no layer to perturb"):
        mgpo.RandomPerturbation(nn.Sequential(nn.Conv1d(2, 2, 1)), lr=1e-3)


class OpCounter(torch.utils._python_dispatch.TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.ops: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(func.overloadpacket.__name__)
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("cls", [mgpo.RandomPerturbation, mgpo.GGPO])
def test_one_draw_per_step_and_no_extra_matmul(cls):
    """3 micro-batches: the noise is drawn once for the step, and each forward/backward runs as many matrix
    products as the clean one (W0 + noise goes through the layer's own matmul)."""
    model = lora_layer()
    opt = cls(model, lr=1e-3, seed=0)
    x = torch.randn(4, IN)
    model.train()
    model(x).pow(2).mean().backward()  # step 1: learn gradient rows (GGPO)
    opt.step()
    opt.zero_grad()

    def matmuls(ops):
        return sum(op in ("mm", "addmm", "bmm", "matmul", "linear") for op in ops)

    with opt.unperturbed():
        model(x).pow(2).mean().backward()
        with OpCounter() as clean:  # a clean micro-batch that accumulates into .grad, like micro-batches 2 and 3
            model(x).pow(2).mean().backward()
    opt.zero_grad()
    counters = []
    for _ in range(3):
        with OpCounter() as counter:
            model(x).pow(2).mean().backward()
        counters.append(counter)
    assert opt.is_perturbed
    draws = [sum(op in ("randn", "normal", "normal_") for op in c.ops) for c in counters]
    assert draws == [1, 0, 0], draws  # drawn at the step's first forward, held for the others
    # after the draw, a micro-batch costs exactly the clean number of matrix products
    assert [matmuls(c.ops) for c in counters[1:]] == [matmuls(clean.ops)] * 2
    # and of additions: W0 + noise is formed once, at the draw, not again in every forward and backward
    assert [adds(c.ops) for c in counters[1:]] == [adds(clean.ops)] * 2


def adds(ops):
    return sum(op in ("add", "add_") for op in ops)
