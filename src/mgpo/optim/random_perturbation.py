"""Random weight perturbation: the paper's "LoRA + Random Noise" baseline (Flat-LoRA, Li et al. 2024b).

For every LoRA linear layer with merged weight ``W' = W0 + s B A`` (out x in), the forward of a training step
sees ``W' + noise`` with ``noise_ij ~ N(0, sigma_i^2)``, ``sigma_i = ramp_t * rho / sqrt(in) * ||W'_i,:||`` and
``ramp_t = (1 - cos(pi t / T)) / 2``.

The noise is never written into a weight. A forward hook adds ``x @ noise^T`` to the layer's output, which is
the same function as a forward with ``W' + noise`` but leaves the frozen ``W0`` bit-identical. The noise is
drawn from a private generator seeded by ``(seed, step, layer)``: it is the same for every micro-batch of a
step, is drawn again (not stored) for the backward, and never touches the global RNG used for dropout or
data order.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from mgpo.optim._base import PerturbedOptimizer, check_range
from mgpo.optim.layers import is_lora_linear, noise_targets


def _draw(sigma: torch.Tensor, in_features: int, seed: int, like: torch.Tensor) -> torch.Tensor:
    gen = torch.Generator(device=like.device).manual_seed(seed)
    noise = torch.randn(sigma.numel(), in_features, generator=gen, device=like.device, dtype=torch.float32)
    return (noise * sigma.float()[:, None]).to(like.dtype)


class _NoiseMatmul(torch.autograd.Function):
    """``x @ noise^T`` whose backward draws the noise again from its seed instead of keeping it in memory."""

    @staticmethod
    def forward(ctx, x, sigma, in_features, seed):
        ctx.save_for_backward(sigma)
        ctx.in_features, ctx.seed = in_features, seed
        return F.linear(x, _draw(sigma, in_features, seed, x))

    @staticmethod
    def backward(ctx, grad_out):
        (sigma,) = ctx.saved_tensors
        return grad_out @ _draw(sigma, ctx.in_features, ctx.seed, grad_out), None, None, None


def merged_weight(module: nn.Module) -> torch.Tensor:
    """``W' = W0 + sum of the active adapters' delta weights`` for a PEFT LoRA layer, else the weight itself."""
    if not is_lora_linear(module):
        return module.weight
    weight = module.get_base_layer().weight
    for adapter in module.active_adapters:
        if adapter in module.lora_A:
            weight = weight + module.get_delta_weight(adapter).to(weight.dtype)
    return weight


class RandomPerturbation(PerturbedOptimizer):
    """Gaussian weight-space noise on every LoRA linear layer (or every trained nn.Linear without LoRA).

    Args:
        params: the model, or parameters/param groups together with ``model=``: the noise is added in the
            model's forward, so the model is required.
        base_optimizer: the optimizer class doing the update; ``**base_kwargs`` go to it.
        rho: noise scale relative to the row norm (>= 0). 0 gives exactly the base optimizer.
        total_steps: T of the cosine ramp (the run's optimizer steps). None: no ramp (ramp_t = 1).
        seed: seed of the private noise generator.
    """

    def __init__(self, params, base_optimizer=torch.optim.AdamW, *, rho: float = 0.05,
                 total_steps: int | None = None, seed: int = 0, model: nn.Module | None = None,
                 auto_perturb: bool = True, **base_kwargs):
        check_range("rho", rho, 0.0, float("inf"))
        self._init_noise(params, base_optimizer, dict(rho=rho), total_steps, seed, model, auto_perturb, base_kwargs)

    def _init_noise(self, params, base_optimizer, hparams, total_steps, seed, model, auto_perturb, base_kwargs):
        if total_steps is not None and (isinstance(total_steps, bool) or not isinstance(total_steps, int)
                                        or total_steps < 1):
            raise ValueError(f"total_steps={total_steps!r} is invalid: use a positive int (the run's optimizer "
                             "steps) or None for no ramp.")
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise ValueError(f"seed={seed!r} is invalid: use an int.")
        if not isinstance(params, nn.Module) and model is None:
            raise TypeError(
                f"{type(self).__name__} adds noise inside the model's forward, so it needs the model: pass it "
                f"as the first argument ({type(self).__name__}(model, ...)) or as model=model."
            )
        super().__init__(params, base_optimizer, dict(hparams, total_steps=total_steps, seed=seed),
                         model=model, auto_perturb=auto_perturb, **base_kwargs)
        trainable = {id(p) for g in self.param_groups for p in g["params"]}
        self.targets = noise_targets(self.model, trainable)
        if not self.targets:
            raise ValueError(
                f"{type(self).__name__} found no layer to perturb: the model has no PEFT LoRA linear layer and "
                "no nn.Linear whose weight is being optimized. Wrap the model with peft.get_peft_model first."
            )
        self._t = 0  # optimizer steps completed
        self._noise_sq: dict[int, torch.Tensor] = {}
        self._sigma: dict[int, torch.Tensor] = {}  # per-row std of this step's noise, per target
        for index, module in enumerate(self.targets.values()):
            self._hooks.append(module.register_forward_hook(self._make_hook(index)))

    def _make_hook(self, index: int):
        def hook(module, args, output):
            if not self._applied or not args:
                return None
            sigma = self._sigma.get(index)
            if sigma is None:  # once per step: every micro-batch of a step sees the same weights and noise scale
                with torch.no_grad():
                    sigma = self._sigma[index] = self._row_sigma(index, module, merged_weight(module).detach())
            if not bool(sigma.any()):
                return None
            self._noise_sq[index] = sigma.float().square().sum() * module.in_features
            seed = ((self.hparams["seed"] * 1_000_003 + self._t + 1) * 10_007 + index) % (2**63)
            return output + _NoiseMatmul.apply(args[0], sigma, module.in_features, seed)

        return hook

    def _ramp(self) -> float:
        total = self.hparams["total_steps"]
        if total is None:
            return 1.0
        return (1 - math.cos(math.pi * min(self._t + 1, total) / total)) / 2

    def _row_sigma(self, index: int, module: nn.Module, weight: torch.Tensor) -> torch.Tensor:
        # sigma_i = ramp_t * rho / sqrt(in) * ||W'_i,:||
        return self._ramp() * self.hparams["rho"] / math.sqrt(weight.shape[1]) * weight.float().norm(dim=1)

    def _apply(self) -> None:  # the hooks read self._applied; no weight is touched
        pass

    def _remove(self) -> None:
        pass

    def _update(self, params: list[torch.Tensor], grad_norms: torch.Tensor) -> None:
        self.base_optimizer.step()
        self._t += 1
        self._sigma.clear()
        if self._noise_sq:
            self.last_stats["perturbation_norm"] = float(torch.stack(list(self._noise_sq.values())).sum().sqrt())
            self._noise_sq.clear()

    def _extra_state(self) -> dict:
        return {**super()._extra_state(), "t": self._t, "seed": self.hparams["seed"]}

    def _load_extra_state(self, extra: dict) -> None:
        super()._load_extra_state(extra)
        self._t, self.hparams["seed"] = extra["t"], extra["seed"]
        self._sigma.clear()
