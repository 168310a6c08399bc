"""MGPO's equations (paper Section 3.2) as functions over tensors and tensor lists, like ``torch.optim.adam``.

Imports only torch. Every quantity is a device tensor: nothing here reads a value back to the host. Per-layer
quantities are vectors indexed by layer ``l``; ``tiny`` is added to every denominator (docs/method.md).

    n_l    = ||grad of Delta W_l||                                        (eq. 8's input)
    gbar_l = n_l at the layer's first gradient, then beta gbar_l + (1 - beta) n_l           (eq. 8)
    v      = mu v + g                                                     (eq. 5, MGPO's own momentum)
    d_l    = ||D_l||, D_l = s (m_B A + B m_A) or the momentum m           (eq. 6's direction)
    k_l    = min(1 / (gbar_l + tiny), max_scale), 1 before the first EMA value            (eq. 4, APN)
    c_l    = -rho k_l / ||D_l||  (or over all layers), eps_l = c_l D_l                    (eqs. 4, 6)

:class:`~mgpo.optim.mgpo.MGPO` calls them in this order every step (``step()``: :func:`gbar_ema`,
:func:`momentum_`, the direction norms, :func:`mgpo_perturbation`); the entry point :func:`mgpo_perturbation` turns
the direction norms and the APN factors into the next perturbation.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

TINY = 1e-12  # added to every denominator (docs/method.md)

# How the radius is shared between layers (radius_coefficient's ``radius``)
LAYER, GLOBAL, MOMENTUM = "layer", "global", "momentum"


class Direction(NamedTuple):
    """The step's direction per layer: ``norm`` = ||D_l||, ``sq`` = ||D_l||^2, ``has_m``: its momentum exists.
    Saved in state dicts as this plain tuple."""

    norm: Tensor
    sq: Tensor
    has_m: Tensor


class Perturbation(NamedTuple):
    """The pending perturbation: ``coef`` = c_l (eps_l = c_l D_l), ``norm`` = ||eps||, and which layers are
    perturbed."""

    coef: Tensor
    norm: Tensor
    perturbed: Tensor


def gbar_ema(gbar: Tensor, seen: Tensor, n: Tensor, has_grad: Tensor, beta: float) -> tuple[Tensor, Tensor]:
    """eq. (8): ``gbar_l = n_l`` at a layer's first gradient, then ``beta gbar_l + (1 - beta) n_l``; layers without a
    gradient keep theirs. Returns the new ``(gbar, seen)``."""
    ema = torch.where(seen, beta * gbar + (1 - beta) * n, n)  # eq. (8)
    return torch.where(has_grad, ema, gbar), seen | has_grad


def momentum_(moments: list[Tensor], grads: list[Tensor], mu: float, ok: Tensor, dtype: torch.dtype) -> None:
    """eq. (5), in place: ``v = mu v + g``; unchanged on a skipped step (``ok`` False, gradients made finite)."""
    keep = torch.where(ok, torch.full((), mu, dtype=dtype, device=ok.device), 1.0)
    torch._foreach_mul_(moments, keep)  # eq. (5): mu v
    torch._foreach_add_(moments, torch._foreach_mul(grads, ok.to(dtype)))  # eq. (5): + g


def tensor_norms(tensors: list[Tensor], dtype: torch.dtype) -> Tensor:
    """``||t||`` of every tensor, one vector (float32 at least)."""
    return torch.stack(torch._foreach_norm(tensors, dtype=dtype))


def layer_sq_sums(layers: Tensor, norms: Tensor, n_layers: int) -> Tensor:
    """Per-layer ``sum ||t||^2`` of tensors with norms ``norms``, ``layers[j]`` the layer of tensor ``j``."""
    out = torch.zeros(n_layers, device=norms.device, dtype=norms.dtype)
    return out.index_add_(0, layers, norms.square())


def inverse_gbar(gbar: Tensor, seen: Tensor) -> Tensor:
    """``1 / (gbar_l + tiny)``, 1 before the layer's first EMA value (apn="normalized"'s weights)."""
    inv = 1.0 / (gbar + TINY)
    return torch.where(seen, inv, torch.ones_like(inv))


def apn_inverse(gbar: Tensor, seen: Tensor, max_scale: float | None) -> tuple[Tensor, Tensor]:
    """eq. (4): ``k_l = min(1 / (gbar_l + tiny), max_scale)``, 1 before the layer's first EMA value; and which layers
    are at the cap."""
    inv = 1.0 / (gbar + TINY)
    k = inv if max_scale is None else inv.clamp(max=max_scale)  # eq. (4)
    capped = torch.zeros_like(seen) if max_scale is None else seen & (inv >= max_scale)
    return torch.where(seen, k, torch.ones_like(k)), capped


def radius_coefficient(k: Tensor, direction: Direction, rho: float, radius: str) -> Tensor:
    """eqs. (4), (6): ``c_l`` with ``eps_l = c_l D_l`` for the APN factors ``k_l``. ``radius``:
    "layer" each layer its own radius ``rho k_l``; "global" total radius rho, ``-rho k_l / sqrt(sum ||k_l D_l||^2)``;
    "momentum" ``-rho k_l / ||v||_all`` (factor space: Momentum-SAM's norm over all tensors)."""
    d = direction.norm
    if radius == MOMENTUM:
        return -rho * k / (direction.sq.sum().sqrt() + TINY)  # eq. (6): -rho k_l v / ||v||_all
    if radius == GLOBAL:
        return -rho * k / (((k * d) ** 2).sum().sqrt() + TINY)  # eq. (4): -rho k_l D_l / sqrt(sum ||k_l D_l||^2)
    return -rho * k / (d + TINY)  # eq. (4): -rho k_l D_l / ||D_l||


def mgpo_perturbation(k: Tensor, direction: Direction, rho: float, radius: str) -> Perturbation:
    """The next step's perturbation from the direction and the APN factors: ``c_l`` (0 for a layer without momentum,
    with ``||D_l|| <= tiny`` or a non-finite coefficient) and ``||eps||``."""
    coef = radius_coefficient(k, direction, rho, radius)
    perturbed = direction.has_m & (direction.norm > TINY) & torch.isfinite(coef)
    coef = torch.where(perturbed, coef, torch.zeros_like(coef))
    return Perturbation(coef, pending_norm(coef, direction.norm), perturbed)


def pending_norm(coef: Tensor, d: Tensor) -> Tensor:
    """``||eps|| = sqrt(sum_l (c_l ||D_l||)^2)``."""
    return (coef * d).square().sum().sqrt()
