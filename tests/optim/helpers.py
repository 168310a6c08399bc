"""A tiny deterministic LoRA model and a training loop that drives any of the methods the same way."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

import mgpo
from mgpo.optim._base import PerturbedOptimizer

# name -> (class, kwargs giving a real perturbation, kwargs giving none at all)
# name -> (class, keywords with rho on, keywords with rho off)
METHODS: dict[str, tuple[Callable[..., PerturbedOptimizer], dict[str, Any], dict[str, Any]]] = {
    "mgpo": (mgpo.MGPO, dict(rho=0.05), dict(rho=0.0)),  # the paper: weight space, apn inverse, per layer
    "mgpo-global": (mgpo.MGPO, dict(rho=0.05, norm="global", apn="normalized"), dict(rho=0.0, norm="global")),
    "mgpo-mu": (mgpo.MGPO, dict(rho=0.05, momentum=0.9), dict(rho=0.0, momentum=0.9)),
    "mgpo-factors": (mgpo.MGPO, dict(rho=0.05, space="factors"), dict(rho=0.0, space="factors")),
    "msam": (mgpo.MSAM, dict(rho=0.05), dict(rho=0.0)),
    "sam": (mgpo.SAM, dict(rho=0.05), dict(rho=0.0)),
    "asam": (mgpo.SAM, dict(rho=0.5, adaptive=True), dict(rho=0.0, adaptive=True)),
    "random": (mgpo.RandomPerturbation, dict(rho=0.05, total_steps=8), dict(rho=0.0, total_steps=8)),
    "ggpo": (mgpo.GGPO, dict(), dict(sigma=0.0, beta_g=0.0)),
}


class Net(nn.Module):
    def __init__(self, d_in=6, d_hidden=16, d_out=3, dropout=0.0):
        super().__init__()
        self.fc1 = nn.Linear(d_in, d_hidden)
        self.fc2 = nn.Linear(d_hidden, d_hidden)
        self.head = nn.Linear(d_hidden, d_out)
        self.drop = nn.Dropout(dropout) if dropout else nn.Identity()  # dropout draws from the global RNG

    def forward(self, x):
        return self.head(self.drop(torch.tanh(self.fc2(torch.tanh(self.fc1(x))))))


def make_model(seed: int = 0, dropout: float = 0.0) -> nn.Module:
    """Net with LoRA (rank 4) on fc1 and fc2, B initialised non-zero so every tensor gets a gradient; head trained;
    ``dropout`` before the head (a model whose forward draws random numbers)."""
    import peft

    torch.manual_seed(seed)
    config = peft.LoraConfig(
        r=4, lora_alpha=8, target_modules=["fc1", "fc2"], modules_to_save=["head"], init_lora_weights="gaussian"
    )
    model = peft.get_peft_model(Net(dropout=dropout), config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1)
    return model


def batches(n: int, seed: int = 1, size: int = 8):
    gen = torch.Generator().manual_seed(seed)
    return [(torch.randn(size, 6, generator=gen), torch.randint(0, 3, (size,), generator=gen)) for _ in range(n)]


def loss_fn(model, batch):
    x, y = batch
    return nn.functional.cross_entropy(model(x), y)


def train_step(model, opt, micro_batches, *, clip: float | None = None, scheduler=None):
    """One optimizer step over ``micro_batches`` (gradient accumulation), the way users write it."""
    model.train()
    scale = 1.0 / len(micro_batches)
    for mb in micro_batches:
        (loss_fn(model, mb) * scale).backward()
    if clip is not None:
        torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
    if isinstance(opt, mgpo.SAM):

        def closure():
            for mb in micro_batches:
                (loss_fn(model, mb) * scale).backward()
            if clip is not None:
                torch.nn.utils.clip_grad_norm_(model.parameters(), clip)

        opt.step(closure)
    else:
        opt.step()
    opt.zero_grad()
    if scheduler is not None:
        scheduler.step()


def snapshot(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def raw_params(model) -> dict[str, torch.Tensor]:
    """The parameter tensors as they are right now (no state_dict hook runs)."""
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def assert_same(a: dict, b: dict):
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), f"{k} differs"
