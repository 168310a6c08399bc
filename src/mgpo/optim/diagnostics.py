"""MGPO's statistics: the per-step summaries in ``opt.last_stats`` and the per-layer sizes some APN rules and the
diagnostics need (docs/method.md, section 13). All on the device: nothing is read back to the host."""

from __future__ import annotations

import torch
from torch import Tensor

from mgpo.optim.layers import is_quantized
from mgpo.optim.lowrank import lowrank_sq_norms
from mgpo.optim.plan import DeviceConstants, LayerPlan

# The clean tensors before an update: every pair's (A, -B) and the tensors moved in place
Snapshot = tuple[list[tuple[Tensor, Tensor]], list[Tensor]]


def snapshot(plan: LayerPlan) -> Snapshot:
    """Copies of every pair's (A, -B) and of the tensors moved in place (the size of the next update needs them)."""
    return (
        [(pr.a.detach().clone(), pr.b.detach().neg()) for pr in plan.pairs],
        [t.detach().clone() for _, t in plan.inplace],
    )


@torch.no_grad()
def layer_sizes(
    plan: LayerPlan,
    before: Snapshot | None,
    want_weight: bool,
    n_layers: int,
    dtype: torch.dtype,
    constants: DeviceConstants,
    w0_sq: dict[int, Tensor],
) -> dict[str, Tensor]:
    """Per layer, at the clean weights after the update: ``weight`` = ||W_l||_F (``W0 + s B A`` for a pair, the
    tensors themselves for a layer moved in place; with ``want_weight``) and ``update`` = ||W_l - W_l(before)||_F
    (with ``before``). For a pair both come from Gram matrices and one ``W0 A^T`` product (nothing out x in):
    ``||W0 + s B A||^2 = ||W0||^2 + 2 s <W0 A^T, B> + s^2 ||B A||^2``, ``||s (B A - B' A')|| = s ||B A + (-B') A'||``.
    NaN where a quantity is not available (a quantized base weight). ``w0_sq`` caches ``||W0||^2`` per pair."""
    if not (want_weight or before is not None):
        return {}
    device = constants.device
    weight = torch.zeros(n_layers, device=device, dtype=dtype)
    update = torch.zeros(n_layers, device=device, dtype=dtype)
    if plan.pairs:
        index = constants.index(tuple(pr.layer for pr in plan.pairs))
        s_sq = constants(tuple(pr.scaling * pr.scaling for pr in plan.pairs), dtype)
        if want_weight:
            ba = lowrank_sq_norms([((pr.b, pr.a),) for pr in plan.pairs]).to(dtype)  # ||B A||^2
            weight.index_add_(0, index, torch.stack(_near(plan, dtype, device, w0_sq)) + s_sq * ba)
        if before is not None:
            moved = lowrank_sq_norms([((pr.b, pr.a), (nb0, a0)) for pr, (a0, nb0) in zip(plan.pairs, before[0])])
            update.index_add_(0, index, s_sq * moved.to(dtype))
    if plan.inplace:
        index = constants.index(tuple(i for i, _ in plan.inplace))
        ts = [t.detach() for _, t in plan.inplace]
        if want_weight:
            weight.index_add_(0, index, torch.stack(torch._foreach_norm(ts, dtype=dtype)).square())
        if before is not None:
            diffs = torch._foreach_sub(ts, before[1])
            update.index_add_(0, index, torch.stack(torch._foreach_norm(diffs, dtype=dtype)).square())
    out = {}
    if want_weight:
        out["weight"] = weight.clamp_min(0).sqrt()
    if before is not None:
        out["update"] = update.sqrt()
    return out


def _near(plan: LayerPlan, dtype: torch.dtype, device: torch.device, w0_sq: dict[int, Tensor]) -> list[Tensor]:
    """``||W0||^2 + 2 s <W0 A^T, B>`` of every pair: one thin out x in x r product per layer."""
    near = []
    for j, pr in enumerate(plan.pairs):
        if is_quantized(pr.module):
            near.append(torch.full((), float("nan"), device=device, dtype=dtype))
            continue
        w0 = pr.module.get_base_layer().weight
        w0 = w0.T if getattr(pr.module, "fan_in_fan_out", False) else w0
        if j not in w0_sq:
            w0_sq[j] = w0.detach().to(dtype).square().sum()
        cross = ((w0.detach().to(dtype) @ pr.a.detach().to(dtype).T) * pr.b.detach().to(dtype)).sum()
        near.append(w0_sq[j] + 2 * pr.scaling * cross)
    return near


def apn_statistics(gbar: Tensor, seen: Tensor, d_sq: Tensor, capped: Tensor) -> dict[str, Tensor]:
    """The step's momentum norm, gbar's extremes and mean over the layers that have one, and the share of them whose
    APN factor is at its cap."""
    count = seen.sum().clamp_min(1)
    return {
        "momentum_norm": d_sq.sum().sqrt(),
        "gbar_min": torch.where(seen, gbar, torch.full_like(gbar, float("inf"))).min(),
        "gbar_mean": (gbar * seen).sum() / count,
        "gbar_max": (gbar * seen).max(),
        "apn_capped": capped.sum() / count,  # share of layers whose APN factor is at max_scale
    }


def radius_diagnostics(radius: Tensor, k: Tensor, perturbed: Tensor, sizes: dict[str, Tensor]) -> dict[str, Tensor]:
    """Means and extremes over the perturbed layers of ||eps_l|| / ||W_l||, ||eps_l|| / ||last update of W_l|| and
    the APN factor k_l (NaN when no layer is perturbed yet)."""
    out = _summary(radius / sizes["weight"], perturbed, "radius_to_weight", "max")
    out.update(_summary(radius / sizes["update"], perturbed, "radius_to_update", "max"))
    out.update(_summary(k, perturbed, "apn_factor", "min"))
    return out


def _summary(values: Tensor, perturbed: Tensor, name: str, extreme: str) -> dict[str, Tensor]:
    nan = torch.full((), float("nan"), device=values.device, dtype=values.dtype)
    ok = perturbed & torch.isfinite(values)
    n = ok.sum()
    mean = torch.where(n > 0, torch.where(ok, values, 0).sum() / n.clamp_min(1), nan)
    fill = float("-inf") if extreme == "max" else float("inf")
    far = torch.where(ok, values, fill)
    ext = torch.where(n > 0, far.max() if extreme == "max" else far.min(), nan)
    return {f"{name}_mean": mean, f"{name}_{extreme}": ext}
