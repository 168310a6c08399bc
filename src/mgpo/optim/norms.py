"""MGPO's per-layer norms of a step, from the layer plan: eq. (8)'s gradient norms ``n_l`` and eq. (6)'s direction
norms ``||D_l||``. A pair's come from r x r Gram blocks (:func:`mgpo.optim.lowrank.lowrank_sq_norms`, layers of equal
shapes batched), a tensor moved in place contributes its own norm. Under FSDP a pair's gradient part is a per-rank
partial sum (this rank's rows of ``g_B`` and ``B``): the optimizer sums those in its collective before adding them."""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from mgpo.optim import functional as F
from mgpo.optim.distributed import local
from mgpo.optim.lowrank import lowrank_sq_norms
from mgpo.optim.plan import DeviceConstants, LayerPlan, Pair
from mgpo.optim.weight_space import Factors


class GradNorms(NamedTuple):
    """eq. (8)'s inputs of a step: per-layer ``sum ||g||^2`` of the tensors moved in place, which layers have a
    gradient, the pairs with one (``owners``) and their ``||s (g_B A + B g_A)||^2`` (``parts``, not yet added)."""

    grad_sq: Tensor
    has_grad: tuple[bool, ...]
    owners: list[int]
    parts: Tensor | None


def grad_owners(pairs: tuple[Pair, ...]) -> list[int]:
    """The pairs with a gradient."""
    return [i for i, pr in enumerate(pairs) if pr.a.grad is not None or pr.b.grad is not None]


def grad_v(pairs: tuple[Pair, ...], owners: list[int]) -> list[Tensor]:
    """``[A, g_A]`` of every pair in ``owners``, flat; a missing gradient is zero."""
    flat = []
    for i in owners:
        a = pairs[i].a
        flat += [a, a.grad if a.grad is not None else torch.zeros_like(a)]
    return flat


def pair_grad_sq(
    pairs: tuple[Pair, ...],
    owners: list[int],
    whole: list[tuple[Tensor, Tensor]] | None,
    constants: DeviceConstants,
    dtype: torch.dtype,
) -> Tensor:
    """eq. (8) for every pair in ``owners``, in that order: ``||s (g_B A + B g_A)||^2``. ``whole``: the whole
    ``(A, g_A)`` gathered under FSDP (this rank's rows of ``g_B``, ``B`` against them), else None."""
    if whole is None:
        flat = grad_v(pairs, owners)
        whole = list(zip(flat[0::2], flat[1::2]))
    items = []
    for (a, g_a), i in zip(whole, owners):
        b = pairs[i].b
        g_b = local(b.grad) if b.grad is not None else torch.zeros_like(local(b))
        items.append(((g_b, a), (local(b), g_a)))
    scale = constants(tuple(pairs[i].scaling ** 2 for i in owners), dtype)
    return lowrank_sq_norms(items).to(dtype) * scale


def gradient_norms(
    plan: LayerPlan,
    params: list[Tensor],
    grad_norms: Tensor,
    n_layers: int,
    constants: DeviceConstants,
    owners: list[int],
    parts: Tensor | None,
) -> GradNorms:
    """eq. (8)'s inputs from the per-tensor gradient norms ``grad_norms`` (of ``params``) and the pairs' ``parts``."""
    layer_of = plan.layer_of
    sel = [j for j, p in enumerate(params) if id(p) in layer_of]
    layers = [layer_of[id(params[j])] for j in sel]
    norms = grad_norms[constants.index(tuple(sel))] if sel else grad_norms[:0]
    grad_sq = F.layer_sq_sums(constants.index(tuple(layers)), norms, n_layers)
    has_grad = [False] * n_layers
    for i in layers:
        has_grad[i] = True
    for i in owners:
        has_grad[plan.pairs[i].layer] = True
    return GradNorms(grad_sq, tuple(has_grad), owners, parts)


def add_pair_norms(plan: LayerPlan, norms: GradNorms, parts: Tensor | None, constants: DeviceConstants) -> Tensor:
    """``n_l^2``: the pairs' eq. (8) parts (summed over the ranks) added to the per-layer sums."""
    if parts is not None:
        norms.grad_sq.index_add_(0, constants.index(tuple(plan.pairs[i].layer for i in norms.owners)), parts)
    return norms.grad_sq


def direction(
    plan: LayerPlan,
    factors: list[Factors],
    with_m: list[int],
    m_layers: list[int],
    m_norms: Tensor | None,
    n_layers: int,
    constants: DeviceConstants,
    dtype: torch.dtype,
) -> F.Direction:
    """eq. (6)'s direction norms per layer: ``||D_l||^2 = s^2 ||m_B A + B m_A||^2`` for the pairs in ``with_m``
    (``factors``), plus ``sum ||m||^2`` of the tensors moved in place (``m_norms``, their layers ``m_layers``)."""
    d_sq = torch.zeros(n_layers, device=constants.device, dtype=dtype)
    if factors:  # layers of equal shapes batched
        scale = constants(tuple(plan.pairs[i].scaling ** 2 for i in with_m), dtype)
        d_sq.index_add_(
            0,
            constants.index(tuple(plan.pairs[i].layer for i in with_m)),
            lowrank_sq_norms([((f.m_b, f.a), (f.b, f.m_a)) for f in factors]).to(dtype) * scale,
        )
    has_m = [False] * n_layers
    for i in with_m:
        has_m[plan.pairs[i].layer] = True
    if m_norms is not None:
        d_sq += F.layer_sq_sums(constants.index(tuple(m_layers)), m_norms, n_layers)
        for i in m_layers:
            has_m[i] = True
    return F.Direction(d_sq.sqrt(), d_sq, constants(tuple(has_m), torch.bool))
