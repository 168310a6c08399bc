"""The two peers the overhead benchmark measures us against, written here from their published descriptions.

* :class:`DenseMGPO` — the LoRA-MGPO authors' approach (llm172/LoRA-MGPO, ``lora_mgpo/trainer.py``, as the issue
  describes it): per LoRA layer, materialise ``D_l = s (m_B A + B m_A)`` as a dense fp32 out x in matrix before
  the forward, normalise it, scale it by ``min(1/gbar_l, 10)``, add it in place to the frozen base weight, and
  subtract it again after the backward; ``gbar_l`` from the dense weight-space gradient ``s (g_B A + B g_A)``.
* :class:`FusedMSAM` — Momentum-SAM's AdamW variant (Becker et al. 2024): the weights live at the perturbed
  point between steps; ``step()`` undoes the old perturbation and does the Adam update in one vectorised pass
  per tensor list, computes the new global momentum norm, and re-perturbs.

Benchmark code only: not part of the package, not tested for training quality.
"""

from __future__ import annotations

import math

import torch


class DenseMGPO:
    """Weight-space MGPO the dense way (the authors'): +1 dense fp32 matrix per LoRA layer while perturbed."""

    def __init__(
        self,
        model: torch.nn.Module,
        lr: float,
        rho: float = 0.05,
        beta: float = 0.9,
        max_scale: float = 10.0,
        foreach: bool | None = None,
    ):
        self.model, self.rho, self.beta, self.max_scale = model, rho, beta, max_scale
        params = [p for p in model.parameters() if p.requires_grad]
        self.base = torch.optim.AdamW(params, lr=lr, foreach=foreach)
        self.layers = [
            (m, m.lora_A["default"].weight, m.lora_B["default"].weight, float(m.scaling["default"]))
            for m in model.modules()
            if hasattr(m, "lora_A") and "default" in getattr(m, "lora_A", {})
        ]
        self.gbar: list[float | None] = [None] * len(self.layers)
        self.eps: list[torch.Tensor] = []
        model.register_forward_pre_hook(lambda module, args: self.perturb() if module.training else None)

    @torch.no_grad()
    def perturb(self) -> None:
        if self.eps or self.gbar[0] is None:
            return
        state = self.base.state
        for (m, a, b, s), g in zip(self.layers, self.gbar):
            d = s * (state[b]["exp_avg"].float() @ a.float() + b.float() @ state[a]["exp_avg"].float())
            k = min(1.0 / (g + 1e-12), self.max_scale)
            eps = d.mul_(-self.rho * k / (float(d.norm()) + 1e-12))
            m.base_layer.weight.add_(eps.to(m.base_layer.weight.dtype))
            self.eps.append(eps)  # held until restore: one dense matrix per layer

    @torch.no_grad()
    def restore(self) -> None:
        for (m, *_), eps in zip(self.layers, self.eps):
            m.base_layer.weight.sub_(eps.to(m.base_layer.weight.dtype))
        self.eps = []

    @torch.no_grad()
    def step(self) -> None:
        self.restore()
        for i, (_, a, b, s) in enumerate(self.layers):
            n = float((s * (b.grad.float() @ a.float() + b.float() @ a.grad.float())).norm())
            self.gbar[i] = n if self.gbar[i] is None else self.beta * self.gbar[i] + (1 - self.beta) * n
        self.base.step()

    def zero_grad(self) -> None:
        self.base.zero_grad()


class FusedMSAM(torch.optim.Optimizer):
    """Momentum-SAM's fused AdamW update (weight decay 0): undo, Adam, global momentum norm, re-perturb."""

    def __init__(self, params, lr: float, rho: float = 0.05, betas=(0.9, 0.999), eps: float = 1e-8):
        super().__init__(params, dict(lr=lr, rho=rho, betas=betas, eps=eps))
        self.old_norm: float | None = None

    @torch.no_grad()
    def step(self, closure=None):
        group = self.param_groups[0]
        (b1, b2), lr, rho, eps = group["betas"], group["lr"], group["rho"], group["eps"]
        ps = [p for p in group["params"] if p.grad is not None]
        for p in ps:
            if not self.state[p]:
                self.state[p].update(step=0, exp_avg=torch.zeros_like(p), exp_avg_sq=torch.zeros_like(p))
        ms = [self.state[p]["exp_avg"] for p in ps]
        vs = [self.state[p]["exp_avg_sq"] for p in ps]
        grads = [p.grad for p in ps]
        if self.old_norm:  # undo: W = W~ + rho m_old / ||m_old||
            torch._foreach_add_(ps, ms, alpha=rho / self.old_norm)
        t = self.state[ps[0]]["step"] + 1
        for p in ps:
            self.state[p]["step"] = t
        torch._foreach_lerp_(ms, grads, 1 - b1)
        torch._foreach_mul_(vs, b2)
        torch._foreach_addcmul_(vs, grads, grads, 1 - b2)
        denom = torch._foreach_sqrt(vs)
        torch._foreach_div_(denom, math.sqrt(1 - b2**t))
        torch._foreach_add_(denom, eps)
        torch._foreach_addcdiv_(ps, ms, denom, -lr / (1 - b1**t))
        self.old_norm = float(torch.stack(torch._foreach_norm(ms)).norm())
        torch._foreach_add_(ps, ms, alpha=-rho / self.old_norm)  # re-perturb: W~ = W - rho m / ||m||
