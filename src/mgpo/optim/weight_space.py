"""MGPO's weight-space perturbation on LoRA layers (eq. 6): the pending terms and the forward hook adding them.

For a pair ``l`` the forward of a step runs at ``W0 + s B A + eps_l`` with ``eps_l = c_l D_l``,
``D_l = s (m_B A + B m_A)``: the hook adds ``eps_l x = c_l s (m_B (A x) + B (m_A x))`` to the layer's output
(:class:`~mgpo.optim.lowrank.WeightSpaceTerm`), so no weight is written and nothing out x in is formed. A DoRA layer
gets the same ``eps_l`` in its base weight through its row norms (:func:`dora_scales`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any, NamedTuple

import torch
from torch import Tensor

from mgpo.optim.hooks import HookState
from mgpo.optim.hooks import Terms as Terms  # re-exported: defined with the hooks' state, which holds them
from mgpo.optim.lowrank import WeightSpaceTerm, apply_function, dora_term, frozen_row_sq_norms, row_norms
from mgpo.optim.plan import DeviceConstants, Pair

if TYPE_CHECKING:
    from mgpo.optim.layers import LoraLinear


class Factors(NamedTuple):
    """A pair's ``(A, m_A, B, m_B)``: references (whole, gathered under FSDP), detached from A and B."""

    a: Tensor
    m_a: Tensor
    b: Tensor
    m_b: Tensor


def build_terms(
    pairs: tuple[Pair, ...], factors: list[Factors], with_m: list[int], coef: Tensor, constants: DeviceConstants
) -> Terms:
    """The pending weight-space terms per module: the factors and momenta of every pair in ``with_m`` and
    ``c_l s`` (a device scalar), and DoRA's scales."""
    terms: Terms = {}
    if not factors:
        return terms
    index = constants.index(tuple(pairs[i].layer for i in with_m))
    scale = constants(tuple(pairs[i].scaling for i in with_m), coef.dtype)
    cs = (coef[index] * scale).unbind()  # c_l s, eq. (6)
    for f, i, c in zip(factors, with_m, cs):
        pair = pairs[i]
        dora = dora_scales(pair, f, c) if pair.magnitude is not None else None
        terms.setdefault(id(pair.module), []).append((pair.adapter, (*f, c), dora))
    return terms


def dora_scales(pair: Pair, factors: Factors, c: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """The authors' rule on a DoRA layer: the forward runs at base weight ``W0 + eps``, so DoRA's row norms become
    ``n~ = ||W0 + s B A + eps||_row``. Returns ``(n / n~, 1 / n~, magnitude)`` for :func:`lowrank.dora_term`, with
    ``n~`` from ``W0 + [sB + c s m_B, c s B] [A; m_A]`` (rank 2r, no out x in matrix)."""
    a, m_a, b, m_b = factors
    s = pair.scaling
    w0 = pair.module.get_base_layer().weight
    cs = c.to(b.dtype)
    w0_sq = frozen_row_sq_norms(w0, torch.float64 if torch.float64 in (w0.dtype, b.dtype) else torch.float32)
    n = row_norms(w0, s * b, a, w0_sq)
    n_t = row_norms(w0, torch.cat([s * b + m_b * cs, b * cs], 1), torch.cat([a, m_a]), w0_sq)
    ratio = torch.where(c == 0, torch.ones_like(n), n / n_t)  # unperturbed: exactly DoRA's own output
    assert pair.magnitude is not None
    return ratio, 1.0 / n_t, pair.magnitude


def term_hook(shared: HookState, key: int) -> Callable[..., Any]:
    """The forward hook adding a LoRA module's pending weight-space term. Unlike the model's pre-hook it may be traced
    by torch.compile (one graph for the whole model): it only reads ``shared``, on whose attributes dynamo guards, and
    the term's U, V are graph inputs, new every step. It holds ``shared``, never the optimizer."""

    def hook(module: LoraLinear, args: tuple[Any, ...], kwargs: dict[str, Any], output: Tensor) -> Tensor | None:
        if module.training:
            shared.saw_layer = True  # the hook guard (PerturbedOptimizer._check_hooks_ran): this hook does run
        terms = shared.terms.get(key) if shared.applied and shared.terms else None
        if not terms or getattr(module, "disable_adapters", False):
            return None
        x = args[0] if args else kwargs["x"]
        active = module.active_adapters
        for adapter, factors, dora in terms:
            if adapter not in active:
                continue
            if dora is None:  # eq. (6): eps_l x = c_l s (m_B (A x) + B (m_A x)), before LoRA dropout
                output = apply_function(WeightSpaceTerm, output, x, *factors)
            else:
                if len(active) > 1:
                    raise RuntimeError(
                        f"MGPO: DoRA adapter {adapter!r} is active together with {active} on one layer; the "
                        "weight-space DoRA rule needs it alone. Activate one adapter, or use space='factors'."
                    )
                output = dora_term(output, x, factors, module.get_base_layer().bias, *dora)
        return output

    return hook
