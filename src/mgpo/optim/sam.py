"""SAM (Foret et al. 2020) and ASAM: the two-pass baseline that MGPO is measured against.

Usage, as in davda54/sam: the first backward is the usual one, then ``step(closure)`` perturbs, runs the
closure (a second forward/backward at ``W + eps``), restores ``W`` and lets the base optimizer step with the
second gradient::

    loss = model(x).loss; loss.backward()
    opt.step(lambda: model(x).loss.backward())
    opt.zero_grad()

Or explicitly: ``first_step()``, second forward/backward, ``second_step()``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from mgpo.optim._base import Params, PerturbedOptimizer, check_range, run_eagerly
from mgpo.optim.configs import SAMConfig
from mgpo.optim.distributed import local, local_grad

_TINY = 1e-12


class SAM(PerturbedOptimizer):
    """Sharpness-aware minimization around any ``torch.optim`` optimizer; ``adaptive=True`` gives ASAM."""

    two_pass = True

    def __init__(
        self,
        params: Params,
        base_optimizer: type[torch.optim.Optimizer] = torch.optim.AdamW,
        *,
        rho: float = 0.05,
        adaptive: bool = False,
        model: nn.Module | None = None,
        **base_kwargs: Any,
    ) -> None:
        check_range("rho", rho, 0.0, float("inf"))
        if not isinstance(adaptive, bool):
            raise ValueError(f"adaptive={adaptive!r} is invalid: use True (ASAM) or False (SAM).")
        self.closure: Callable[[], Any] | None = None  # default second pass, for trainers that call step() bare
        self._clean: tuple[list[torch.Tensor], tuple[torch.Tensor, ...]] | None = None  # (tensors at W + eps, W)
        self.config = SAMConfig(rho=rho, adaptive=adaptive)
        super().__init__(params, base_optimizer, dict(rho=rho, adaptive=adaptive), model=model, **base_kwargs)

    @run_eagerly  # inside a compiled training step too: the state it keeps must not be traced away
    @torch.no_grad()
    def first_step(self, zero_grad: bool = True) -> bool:
        """Move to ``W + eps`` computed from the gradients in ``.grad``. Returns False (and moves nothing) when
        no tensor has a gradient. A non-finite gradient gives ``eps = 0`` (decided on the device)."""
        params = self._params_with_grad()
        if not params:
            return False
        self._check_layout(params)
        # Under FSDP: this rank's shards; the squared norms are summed over the ranks in one all-reduce
        grads = [local_grad(p) for p in params]
        params = [local(p) for p in params]
        # SAM: eps = rho g / ||g||;  ASAM: eps = rho w^2 g / ||w g||
        scaled = torch._foreach_mul(grads, torch._foreach_abs(params)) if self.config.adaptive else grads
        eps = torch._foreach_mul(scaled, torch._foreach_abs(params)) if self.config.adaptive else grads
        dtype = self._norm_dtype(params)  # float32 at least, float64 for float64 tensors
        norm = torch.stack(torch._foreach_norm(scaled, dtype=dtype))
        eps_norm = torch.stack(torch._foreach_norm(eps, dtype=dtype)) if self.config.adaptive else norm
        if self.exchange.sharded:
            both = self.exchange.all_reduce(torch.stack([norm.square().sum(), eps_norm.square().sum()]))
            norm, eps_norm = both.sqrt().unbind()
        else:
            norm, eps_norm = norm.norm(), eps_norm.norm()
        scale = torch.where(torch.isfinite(norm), self.config.rho / (norm + _TINY), 0.0)
        eps = torch._foreach_mul(eps, scale)
        for e in eps:  # NaN * 0 is NaN: a non-finite first gradient must move nothing
            e.nan_to_num_(0.0, 0.0, 0.0)
        self._clean = (params, torch._foreach_mul(params, 1.0))  # exact copies of W
        torch._foreach_add_(params, eps)
        self._applied = True
        self._stats = {"perturbation_norm": torch.nan_to_num(eps_norm * scale, 0.0, 0.0, 0.0)}
        if zero_grad:
            self.zero_grad()
        return True

    @run_eagerly
    @torch.no_grad()
    def second_step(self, zero_grad: bool = False) -> None:
        """Restore ``W`` exactly and step the base optimizer with the gradients at ``W + eps`` (skipped on the
        device when they are not finite)."""
        self.restore()
        params = self._params_with_grad()
        if params:
            _, ok = self._grad_norms(params)
            self._base_step(params, ok)
        if zero_grad:
            self.zero_grad()

    def _remove(self) -> None:
        if self._clean is None:  # perturb() outside step(): SAM has nothing pending
            return
        params, clean = self._clean
        torch._foreach_copy_(params, clean)
        self._clean = None

    def _apply(self) -> None:  # SAM's perturbation only exists inside step(); nothing is pending
        pass

    @run_eagerly
    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """One SAM step. The closure recomputes the loss and calls ``backward()``. If no gradient is present
        yet (no first backward was done), the closure is run first for it, so the torch convention
        ``opt.step(closure)`` alone trains as expected. At ``rho = 0`` it is the base optimizer: the base step on
        the first pass's gradients, no second pass (returns the first pass's loss; None if the caller made it)."""
        closure = closure or self.closure
        if closure is None:
            raise RuntimeError(
                "SAM needs two forward/backward passes per step: call opt.step(closure) with a closure that "
                "recomputes the loss and calls backward(), or set opt.closure, or use the single-pass mgpo.MGPO."
            )
        self._poll_skips()
        first_loss = None
        if not self._params_with_grad():  # no first pass yet: the closure gives it
            with torch.enable_grad():
                first_loss = closure()
        if self.config.rho == 0:  # the base optimizer (spec): no second pass, whose dropout mask would differ
            self.second_step()
            return first_loss
        if not self.first_step(zero_grad=True):
            return first_loss
        with torch.enable_grad():
            loss = closure()
        self.second_step()
        return first_loss if first_loss is not None else loss
