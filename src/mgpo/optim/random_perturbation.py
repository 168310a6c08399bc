"""Random weight perturbation: the paper's "LoRA + Random Noise" baseline (Flat-LoRA, Li et al. 2024b).

For every LoRA linear layer with merged weight ``W' = W0 + s B A`` (out x in), the forward of a training step
sees ``W' + noise`` with ``noise_ij ~ N(0, sigma_i^2)``, ``sigma_i = ramp_t * rho / sqrt(in) * ||W'_i,:||`` and
``ramp_t = (1 - cos(pi t / T)) / 2``.

Cost, as the Flat-LoRA authors' code: the noise is drawn once per optimizer step (at the layer's first forward of
the step, from a private generator seeded by ``(seed, step, layer)``), held across the step's micro-batches and
dropped by ``step()``. It is never written into a weight: for a frozen base weight the held tensor is ``W0 + noise``
itself (``W0`` is added into the noise buffer once, at the draw), and the base layer's own matmul uses it in every
forward and backward of the step, so there is no extra matmul and no full-size add per micro-batch, ``W0`` stays
bit-identical and the global RNG (dropout, data order) is untouched. The row norms of ``W'`` come from low-rank
products (``W0`` row norms are cached), never from a dense ``W'``.
"""

from __future__ import annotations

import math
import weakref
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mgpo.optim._base import InstanceOverride, Params, PerturbedOptimizer, check_range, run_eagerly
from mgpo.optim.layers import is_lora_linear, is_plain_lora, is_quantized, noise_targets, weight_of
from mgpo.optim.lowrank import apply_function, lowrank_row_sq_norms

if TYPE_CHECKING:
    from mgpo.optim.layers import LoraLinear


class _NoisyLinear(torch.autograd.Function):
    """``F.linear(x, W0 + noise, b)`` with the held ``W0 + noise`` of a frozen ``W0``: saves only a reference to it.

    Not plain ``F.linear``: under autocast that would save the low-precision copy of the weight for the backward, a
    full-size tensor per layer for the whole forward; here the backward casts it again, as the clean layer's does."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, noisy_weight: Tensor, bias: Tensor | None) -> Tensor:
        ctx.save_for_backward(noisy_weight, bias)
        return F.linear(x, noisy_weight, bias)

    @staticmethod
    def backward(ctx: Any, grad_out: Tensor) -> tuple[Tensor | None, None, Tensor | None]:
        noisy_weight, bias = ctx.saved_tensors
        grad_x = grad_out @ noisy_weight.to(grad_out.dtype) if ctx.needs_input_grad[0] else None
        grad_b = grad_out.reshape(-1, grad_out.shape[-1]).sum(0).to(bias.dtype) if ctx.needs_input_grad[2] else None
        return grad_x, None, grad_b


def merged_weight(module: LoraLinear | nn.Linear) -> torch.Tensor:
    """``W' = W0 + sum of the active adapters' delta weights`` (dense; used by tests and for non-plain adapters)."""
    if not is_lora_linear(module):
        return module.weight
    weight = module.get_base_layer().weight
    for adapter in module.active_adapters:
        if adapter in module.lora_A:
            weight = weight + module.get_delta_weight(adapter).to(weight.dtype)
    return weight


def _lowrank_delta(module: LoraLinear, grads: bool = False) -> tuple[Tensor, Tensor] | Literal["empty"] | None:
    """``(U, V)`` with ``U V = sum_k s_k B_k A_k`` over the active plain adapters (or, with ``grads``, the
    weight-space gradient ``sum_k s_k (B_k gA_k + gB_k A_k)``). None if an adapter is not plain LoRA."""
    us, vs = [], []
    for adapter in module.active_adapters:
        if adapter not in module.lora_A:
            continue
        if not is_plain_lora(module, adapter):
            return None
        a, b, s = weight_of(module.lora_A[adapter]), weight_of(module.lora_B[adapter]), float(module.scaling[adapter])
        if not grads:
            us.append(s * b)
            vs.append(a)
        elif a.grad is not None or b.grad is not None:
            ga = a.grad if a.grad is not None else torch.zeros_like(a)
            gb = b.grad if b.grad is not None else torch.zeros_like(b)
            us += [s * b, s * gb]
            vs += [ga, a]
    if not us:
        return "empty"
    return torch.cat(us, 1), torch.cat(vs, 0)


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

    def __init__(
        self,
        params: Params,
        base_optimizer: type[torch.optim.Optimizer] = torch.optim.AdamW,
        *,
        rho: float = 0.05,
        total_steps: int | None = None,
        seed: int = 0,
        model: nn.Module | None = None,
        auto_perturb: bool = True,
        **base_kwargs: Any,
    ) -> None:
        check_range("rho", rho, 0.0, float("inf"))
        self._init_noise(params, base_optimizer, dict(rho=rho), total_steps, seed, model, auto_perturb, base_kwargs)

    def _init_noise(
        self,
        params: Params,
        base_optimizer: type[torch.optim.Optimizer],
        hparams: dict[str, Any],
        total_steps: int | None,
        seed: int,
        model: nn.Module | None,
        auto_perturb: bool,
        base_kwargs: dict[str, Any],
    ) -> None:
        if total_steps is not None and (
            isinstance(total_steps, bool) or not isinstance(total_steps, int) or total_steps < 1
        ):
            raise ValueError(
                f"total_steps={total_steps!r} is invalid: use a positive int (the run's optimizer "
                "steps) or None for no ramp."
            )
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise ValueError(f"seed={seed!r} is invalid: use an int.")
        if not isinstance(params, nn.Module) and model is None:
            raise TypeError(
                f"{type(self).__name__} adds noise inside the model's forward, so it needs the model: pass it "
                f"as the first argument ({type(self).__name__}(model, ...)) or as model=model."
            )
        super().__init__(
            params,
            base_optimizer,
            dict(hparams, total_steps=total_steps, seed=seed),
            model=model,
            auto_perturb=auto_perturb,
            **base_kwargs,
        )
        trainable = {id(p) for g in self.param_groups for p in g["params"]}
        assert self.model is not None  # refused above without one
        self.targets = noise_targets(self.model, trainable)
        if not self.targets:
            raise ValueError(
                f"{type(self).__name__} found no layer to perturb: the model has no PEFT LoRA linear layer and "
                "no nn.Linear whose weight is being optimized. Wrap the model with peft.get_peft_model first."
            )
        quantized = [name for name, m in self.targets.items() if is_quantized(m)]
        if quantized:
            raise ValueError(
                f"{type(self).__name__} cannot add weight-space noise to quantized base layers ({quantized[0]}"
                f"{' and others' if len(quantized) > 1 else ''}): their weights are packed integers. Load the "
                "base model in bf16/fp16, or use mgpo.MGPO, whose perturbation never touches the base weight."
            )
        self._t = 0  # optimizer steps completed
        self._noise: dict[int, torch.Tensor] = {}  # this step's W0 + noise (or noise) per target, dropped by step()
        self._noise_sq: dict[int, torch.Tensor] = {}
        self._w0_rows: dict[int, torch.Tensor] = {}  # ||W0_i||^2 of each frozen base weight, computed once
        self._install_method_hooks()

    def _install_method_hooks(self) -> None:
        ref = weakref.ref(self)
        for index, module in enumerate(self.targets.values()):
            linear = module.get_base_layer() if is_lora_linear(module) else module
            owner = module if is_lora_linear(module) else None
            self._hooks.append(InstanceOverride(linear, "forward", self._make_forward(ref, index, linear, owner)))

    @staticmethod
    def _make_forward(
        ref: weakref.ref[RandomPerturbation], index: int, linear: nn.Linear, owner: LoraLinear | None
    ) -> Callable[..., Tensor]:
        linear_forward = type(linear).forward

        @run_eagerly  # the noise is drawn per step from the optimizer's state: never baked into a compiled graph
        def forward(x: Tensor, *args: Any, **kwargs: Any) -> Tensor:
            opt = ref()
            if opt is not None and linear.training:
                opt._shared.saw_layer = True  # the hook guard (PerturbedOptimizer._check_hooks_ran): this does run
            if opt is None or not opt._applied or (owner is not None and owner.disable_adapters):
                return linear_forward(linear, x, *args, **kwargs)
            held = opt._noise_for(index, owner or linear, linear.weight)
            if linear.weight.requires_grad:  # full fine-tuning: W's own gradient is needed, so W + noise in the graph
                return F.linear(x, linear.weight + held, linear.bias)
            return apply_function(_NoisyLinear, x, held, linear.bias)  # held is W0 + noise

        return forward

    @torch.no_grad()
    def _noise_for(self, index: int, module: LoraLinear | nn.Linear, weight: torch.Tensor) -> torch.Tensor:
        """This step's noise of the layer whose (base) weight is ``weight``, drawn at the first call of the step:
        ``W0 + noise`` when ``W0`` is frozen (formed once here instead of in every forward and backward), the
        noise alone when ``weight`` is trained (its gradient must flow through the add)."""
        if index not in self._noise:  # once per step: every micro-batch of a step sees the same noise
            sigma = self._row_sigma(index, module)
            seed = ((self.hparams["seed"] * 1_000_003 + self._t + 1) * 10_007 + index) % (2**63)
            gen = torch.Generator(device=weight.device).manual_seed(seed)
            noise = torch.randn(weight.shape, generator=gen, device=weight.device, dtype=torch.float32)
            # rounded to the weight's dtype before the add, as ``weight + noise`` in that dtype would be; in place
            # (``to`` is a no-op for fp32), so the step holds one full-size tensor per layer and allocates no other
            held = noise.mul_(sigma[:, None]).to(weight.dtype)
            self._noise[index] = held if weight.requires_grad else held.add_(weight)
            self._noise_sq[index] = sigma.square().sum() * weight.shape[1]  # E||noise||^2
        return self._noise[index]

    def _merged_row_norms(self, index: int, module: LoraLinear | nn.Linear) -> torch.Tensor:
        """``||W'_i,:||`` without a dense ``W'``: ``||W0_i||^2 + 2 <W0_i, (U V)_i> + ||(U V)_i||^2``."""
        rows: Tensor  # (Tensor.norm is unannotated)
        if not is_lora_linear(module):
            rows = module.weight.float().norm(dim=1)
            return rows
        w0 = module.get_base_layer().weight
        if index not in self._w0_rows:
            self._w0_rows[index] = w0.float().square().sum(1)
        delta = _lowrank_delta(module)
        if delta is None:  # DoRA / AdaLoRA: their delta is not U V; form W' densely
            rows = merged_weight(module).float().norm(dim=1)
            return rows
        if delta == "empty":
            return self._w0_rows[index].sqrt()
        u, v = delta[0].float(), delta[1].float()
        cross = (u * (w0.to(v.dtype) @ v.mT)).sum(1)
        return (self._w0_rows[index] + 2 * cross + lowrank_row_sq_norms(u, v)).clamp_min(0).sqrt()

    def _ramp(self) -> float:
        total: int | None = self.hparams["total_steps"]
        if total is None:
            return 1.0
        return (1 - math.cos(math.pi * min(self._t + 1, total) / total)) / 2

    def _row_sigma(self, index: int, module: LoraLinear | nn.Linear) -> torch.Tensor:
        # sigma_i = ramp_t * rho / sqrt(in) * ||W'_i,:||
        rows = self._merged_row_norms(index, module)
        in_features = (module.get_base_layer() if is_lora_linear(module) else module).weight.shape[1]
        rho: float = self.hparams["rho"]
        return self._ramp() * rho / math.sqrt(in_features) * rows

    def _would_perturb(self) -> bool:
        rho: float = self.hparams["rho"]
        return rho > 0

    def _has_layer_hooks(self) -> bool:
        return True

    def _apply(self) -> None:  # the forwards read self._applied; no weight is touched
        pass

    def _remove(self) -> None:
        pass

    def _update(self, params: list[torch.Tensor], grad_norms: torch.Tensor, ok: torch.Tensor) -> None:
        self._base_step(params, ok)
        self._t += 1
        if self._noise_sq:
            self._stats = {"perturbation_norm": torch.stack(list(self._noise_sq.values())).sum().sqrt()}
        self._noise.clear()
        self._noise_sq.clear()

    def _extra_state(self) -> dict[str, Any]:
        return {**super()._extra_state(), "t": self._t, "seed": self.hparams["seed"]}

    def _load_extra_state(self, extra: dict[str, Any]) -> None:
        super()._load_extra_state(extra)
        self._t, self.hparams["seed"] = extra["t"], extra["seed"]
        self._noise.clear()
        self._noise_sq.clear()
