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

import torch

from mgpo.optim._base import PerturbedOptimizer, check_range

_TINY = 1e-12


class SAM(PerturbedOptimizer):
    """Sharpness-aware minimization around any ``torch.optim`` optimizer; ``adaptive=True`` gives ASAM."""

    two_pass = True

    def __init__(self, params, base_optimizer=torch.optim.AdamW, *, rho: float = 0.05, adaptive: bool = False,
                 model=None, **base_kwargs):
        check_range("rho", rho, 0.0, float("inf"))
        if not isinstance(adaptive, bool):
            raise ValueError(f"adaptive={adaptive!r} is invalid: use True (ASAM) or False (SAM).")
        self.closure: Callable | None = None  # default second pass, for trainers that call step() bare
        super().__init__(params, base_optimizer, dict(rho=rho, adaptive=adaptive), model=model, **base_kwargs)

    @torch.no_grad()
    def first_step(self, zero_grad: bool = True) -> bool:
        """Move to ``W + eps`` computed from the gradients in ``.grad``. Returns False (and moves nothing) if
        those gradients are not finite, or there are none."""
        params = self._params_with_grad()
        if not params or self._check_grads(params) is None:
            return False
        grads = [p.grad for p in params]
        adaptive = self.hparams["adaptive"]
        # SAM: eps = rho g / ||g||;  ASAM: eps = rho w^2 g / ||w g||
        scaled = torch._foreach_mul(grads, torch._foreach_abs(params)) if adaptive else grads
        norm = torch.stack(torch._foreach_norm(scaled)).float().norm()
        eps = torch._foreach_mul(scaled, torch._foreach_abs(params)) if adaptive else [g.clone() for g in grads]
        torch._foreach_mul_(eps, self.hparams["rho"] / (float(norm) + _TINY))
        for p, e in zip(params, eps):
            self.state[p]["clean"] = p.detach().clone()
        torch._foreach_add_(params, eps)
        self._applied = True
        self.last_stats["perturbation_norm"] = float(torch.stack(torch._foreach_norm(eps)).float().norm())
        if zero_grad:
            self.zero_grad()
        return True

    @torch.no_grad()
    def second_step(self, zero_grad: bool = False) -> None:
        """Restore ``W`` exactly and step the base optimizer with the gradients at ``W + eps``."""
        self.restore()
        params = self._params_with_grad()
        if self._check_grads(params) is not None:
            self.base_optimizer.step()
        if zero_grad:
            self.zero_grad()

    def _remove(self) -> None:
        for group in self.param_groups:
            for p in group["params"]:
                if p in self.state and "clean" in self.state[p]:
                    p.copy_(self.state[p].pop("clean"))

    def _apply(self) -> None:  # SAM's perturbation only exists inside step(); nothing is pending
        pass

    @torch.no_grad()
    def step(self, closure: Callable | None = None):
        closure = closure or self.closure
        if closure is None:
            raise RuntimeError(
                "SAM needs two forward/backward passes per step: call opt.step(closure) with a closure that "
                "recomputes the loss and calls backward() (the first backward must already be done), or set "
                "opt.closure, or use the single-pass mgpo.MGPO."
            )
        if not self.first_step(zero_grad=True):
            self.last_stats["skipped_steps"] = float(self.skipped_steps)
            return None
        with torch.enable_grad():
            loss = closure()
        self.second_step()
        self.last_stats["skipped_steps"] = float(self.skipped_steps)
        return loss
