"""GGPO, the paper's first version (LoRA-GGPO): noise guided by weight norms and gradient norms.

*Reading* (docs/method.md): Gaussian noise in the full weight space, added exactly like
:class:`~mgpo.optim.random_perturbation.RandomPerturbation`, with a per-row standard deviation

    sigma_i = (sigma * ||W'_i,:|| + beta_g * gn_i) / sqrt(in)

where ``gn_i`` is the row norm of the approximate gradient of ``Delta W``, ``s (B grad_A + grad_B A)``, from the
previous step (``weight.grad`` for a plain linear layer). ``beta_g=0`` switches the gradient term off and
``sigma=0`` the weight term.
"""

from __future__ import annotations

import math
import warnings
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from mgpo.optim._base import Params, check_range
from mgpo.optim.configs import GGPOConfig
from mgpo.optim.layers import is_lora_linear
from mgpo.optim.lowrank import lowrank_row_sq_norms
from mgpo.optim.random_perturbation import RandomPerturbation, _lowrank_delta

if TYPE_CHECKING:
    from mgpo.optim.layers import LoraLinear


def delta_grad_row_norms(module: LoraLinear | nn.Linear) -> torch.Tensor | None:
    """Row norms of ``s (B grad_A + grad_B A)`` summed over active adapters (or of ``weight.grad``), from
    ``rowsum((U (V V^T)) * U)`` with ``U = [sB, s gB]``, ``V = [gA; A]``: no out x in matrix."""
    if not is_lora_linear(module):
        grad = module.weight.grad
        rows: torch.Tensor | None = None if grad is None else grad.float().norm(dim=1)  # (Tensor.norm: unannotated)
        return rows
    delta = _lowrank_delta(module, grads=True)
    if delta is None or delta == "empty":
        return None  # not a plain A/B pair (e.g. AdaLoRA), or no gradient: no gradient term for this layer
    return lowrank_row_sq_norms(*delta).clamp_min(0).sqrt()


class GGPO(RandomPerturbation):
    """Gradient- and weight-norm guided perturbation (LoRA-GGPO, paper v1); see the module docstring.

    Args:
        params, base_optimizer, seed, model, auto_perturb, **base_kwargs: as for RandomPerturbation.
        sigma: weight-norm coefficient (>= 0, default 0.03).
        beta_g: gradient-norm coefficient (>= 0, default 0.01).
    """

    def __init__(
        self,
        params: Params,
        base_optimizer: type[torch.optim.Optimizer] = torch.optim.AdamW,
        *,
        sigma: float = 0.03,
        beta_g: float = 0.01,
        seed: int = 0,
        model: nn.Module | None = None,
        auto_perturb: bool = True,
        **base_kwargs: Any,
    ) -> None:
        check_range("sigma", sigma, 0.0, float("inf"))
        check_range("beta_g", beta_g, 0.0, float("inf"))
        self.config = GGPOConfig(sigma=sigma, beta_g=beta_g, seed=seed)  # the seed: opt.hparams (restored on load)
        self._init_noise(
            params, base_optimizer, dict(sigma=sigma, beta_g=beta_g), None, seed, model, auto_perturb, base_kwargs
        )
        if self.exchange.sharded:
            self.close()
            raise ValueError(
                "GGPO under FSDP is not supported: its per-row gradient norms of the full weight would "
                "need the sharded gradients gathered whole. Use DDP (distributed.strategy=ddp), or "
                "RandomPerturbation / MGPO, which support FSDP."
            )
        self._grad_rows: dict[int, torch.Tensor] = {}
        self._warned_no_grad_term = False

    def _would_perturb(self) -> bool:
        return self.config.sigma > 0 or self.config.beta_g > 0

    def _row_sigma(self, index: int, module: LoraLinear | nn.Linear) -> torch.Tensor:
        sigma = self.config.sigma * self._merged_row_norms(index, module)
        grad_rows = self._grad_rows.get(index)
        if grad_rows is not None and self.config.beta_g != 0:
            sigma = sigma + self.config.beta_g * grad_rows
        in_features = (module.get_base_layer() if is_lora_linear(module) else module).weight.shape[1]
        return sigma / math.sqrt(in_features)

    def _update(self, params: list[torch.Tensor], grad_norms: torch.Tensor, ok: torch.Tensor) -> None:
        if self.config.beta_g != 0:  # gn_i of this step, used by the next step's noise
            with torch.no_grad():
                for index, module in enumerate(self.targets.values()):
                    rows = delta_grad_row_norms(module)
                    if rows is None:
                        self._grad_rows.pop(index, None)
                        plain_pair = (
                            all(hasattr(module.lora_A[a], "weight") for a in module.lora_A)
                            if is_lora_linear(module)
                            else True
                        )
                        if not plain_pair and not self._warned_no_grad_term:
                            self._warned_no_grad_term = True
                            warnings.warn(
                                "GGPO: a LoRA layer without a plain A/B pair (e.g. AdaLoRA) gets the "
                                "weight-norm term only.",
                                RuntimeWarning,
                                stacklevel=3,
                            )
                    else:  # a skipped (non-finite) step keeps the previous rows
                        prev = self._grad_rows.get(index)
                        self._grad_rows[index] = torch.where(ok, rows, prev if prev is not None else 0.0)
        super()._update(params, grad_norms, ok)

    def _extra_state(self) -> dict[str, Any]:
        return {**super()._extra_state(), "grad_rows": dict(self._grad_rows)}

    def _load_extra_state(self, extra: dict[str, Any]) -> None:
        super()._load_extra_state(extra)
        self._grad_rows = dict(extra["grad_rows"])
