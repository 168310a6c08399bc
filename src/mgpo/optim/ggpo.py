"""GGPO, the paper's first version (LoRA-GGPO): noise guided by weight norms and gradient norms.

*Reading* (method-spec): Gaussian noise in the full weight space, added exactly like
:class:`~mgpo.optim.random_perturbation.RandomPerturbation`, with a per-row standard deviation

    sigma_i = (sigma * ||W'_i,:|| + beta_g * gn_i) / sqrt(in)

where ``gn_i`` is the row norm of the approximate gradient of ``Delta W``, ``s (B grad_A + grad_B A)``, from the
previous step (``weight.grad`` for a plain linear layer). ``beta_g=0`` switches the gradient term off and
``sigma=0`` the weight term.
"""

from __future__ import annotations

import math
import warnings

import torch
from torch import nn

from mgpo.optim._base import check_range
from mgpo.optim.layers import is_lora_linear
from mgpo.optim.random_perturbation import RandomPerturbation


def delta_grad_row_norms(module: nn.Module) -> torch.Tensor | None:
    """Row norms of ``s (B grad_A + grad_B A)`` summed over active adapters (or of ``weight.grad``)."""
    if not is_lora_linear(module):
        grad = module.weight.grad
        return None if grad is None else grad.float().norm(dim=1)
    total = None
    for adapter in module.active_adapters:
        if adapter not in module.lora_A:
            continue
        a, b = module.lora_A[adapter], module.lora_B[adapter]
        if not (hasattr(a, "weight") and hasattr(b, "weight")):
            return None  # not a plain A/B pair (e.g. AdaLoRA): no gradient term for this layer
        ga, gb = a.weight.grad, b.weight.grad
        if ga is None or gb is None:
            continue
        delta = module.scaling[adapter] * (b.weight.float() @ ga.float() + gb.float() @ a.weight.float())
        total = delta if total is None else total + delta
    return None if total is None else total.norm(dim=1)


class GGPO(RandomPerturbation):
    """Gradient- and weight-norm guided perturbation (LoRA-GGPO, paper v1); see the module docstring.

    Args:
        params, base_optimizer, seed, model, auto_perturb, **base_kwargs: as for RandomPerturbation.
        sigma: weight-norm coefficient (>= 0, default 0.03).
        beta_g: gradient-norm coefficient (>= 0, default 0.01).
    """

    def __init__(self, params, base_optimizer=torch.optim.AdamW, *, sigma: float = 0.03, beta_g: float = 0.01,
                 seed: int = 0, model: nn.Module | None = None, auto_perturb: bool = True, **base_kwargs):
        check_range("sigma", sigma, 0.0, float("inf"))
        check_range("beta_g", beta_g, 0.0, float("inf"))
        self._init_noise(params, base_optimizer, dict(sigma=sigma, beta_g=beta_g), None, seed, model,
                         auto_perturb, base_kwargs)
        self._grad_rows: dict[int, torch.Tensor] = {}
        self._warned_no_grad_term = False

    def _row_sigma(self, index: int, module: nn.Module, weight: torch.Tensor) -> torch.Tensor:
        sigma = self.hparams["sigma"] * weight.float().norm(dim=1)
        grad_rows = self._grad_rows.get(index)
        if grad_rows is not None and self.hparams["beta_g"] != 0:
            sigma = sigma + self.hparams["beta_g"] * grad_rows
        return sigma / math.sqrt(weight.shape[1])

    def _update(self, params: list[torch.Tensor], grad_norms: torch.Tensor) -> None:
        if self.hparams["beta_g"] != 0:  # gn_i of this step, used by the next step's noise
            with torch.no_grad():
                for index, module in enumerate(self.targets.values()):
                    rows = delta_grad_row_norms(module)
                    if rows is None:
                        self._grad_rows.pop(index, None)
                        plain_pair = all(hasattr(module.lora_A[a], "weight") for a in module.lora_A) \
                            if is_lora_linear(module) else True
                        if not plain_pair and not self._warned_no_grad_term:
                            self._warned_no_grad_term = True
                            warnings.warn("GGPO: a LoRA layer without a plain A/B pair (e.g. AdaLoRA) gets the "
                                          "weight-norm term only.", RuntimeWarning, stacklevel=3)
                    else:
                        self._grad_rows[index] = rows
        super()._update(params, grad_norms)

    def _extra_state(self) -> dict:
        return {**super()._extra_state(), "grad_rows": dict(self._grad_rows)}

    def _load_extra_state(self, extra: dict) -> None:
        super()._load_extra_state(extra)
        self._grad_rows = dict(extra["grad_rows"])
