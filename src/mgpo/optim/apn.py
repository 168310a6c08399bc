"""The APN rules (``MGPO(apn=...)``): the one place that knows their names and what each one needs.

A rule gives each layer's radius factor ``k_l`` (eq. 4 for the paper's "inverse"), says what it needs (the layers'
weight or update sizes), whether it caps ``k_l`` (and what the cap means), whether it runs under FSDP, and how
reports label it. The optimizer, the configs, the report and the trainer ask :data:`RULES` / :func:`rule`.

Pure Python: importing it loads no torch (the configs import it); the factor functions load the functional core
(:mod:`mgpo.optim.functional`) when first called.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, NamedTuple

if TYPE_CHECKING:
    from torch import Tensor

DEFAULT = "inverse"  # the paper's rule


class FactorInputs(NamedTuple):
    """What a rule's factor may read: the per-layer EMA ``gbar``, which layers have one (``seen``), the layer sizes
    (``"weight"``, ``"update"``: per-layer vectors) and the cap."""

    gbar: Tensor
    seen: Tensor
    sizes: dict[str, Tensor]
    max_scale: float | None


def _inverse(x: FactorInputs) -> tuple[Tensor, Tensor | None]:
    from mgpo.optim.functional import apn_inverse

    return apn_inverse(x.gbar, x.seen, x.max_scale)  # eq. (4)


def _one(x: FactorInputs) -> tuple[Tensor, Tensor | None]:
    return x.gbar.new_ones(x.gbar.shape), None


def _size(name: str) -> Callable[[FactorInputs], tuple[Tensor, Tensor | None]]:
    def factor(x: FactorInputs) -> tuple[Tensor, Tensor | None]:
        return x.sizes[name], None

    return factor


@dataclass(frozen=True)
class APNRule:
    """One APN rule.

    Attributes:
        name: the value of ``apn``.
        factor: ``k_l`` and, for a capping rule, which layers are at the cap (else None).
        label: how reports and plots name it.
        caps: ``k_l`` is capped at ``max_scale`` (the ``apn_capped`` statistic means something).
        cap_meaning: what being at the cap means, for warnings and reports ("" when it does not cap).
        sizes: the per-layer sizes it needs: "weight" (``||W_l||``) and/or "update" (``||W_l(t) - W_l(t-1)||``).
        fsdp: supported when training is sharded with FSDP.
        adaptive: scales each layer's radius (False: no APN; in factor space the radius is then over all tensors,
            Momentum-SAM's).
        reweights: ``u_l = D_l / gbar_l`` at total radius rho, whatever ``norm`` ("normalized").
    """

    name: str
    factor: Callable[[FactorInputs], tuple[Tensor, Tensor | None]]
    label: str
    caps: bool = False
    cap_meaning: str = ""
    sizes: tuple[str, ...] = ()
    fsdp: bool = True
    adaptive: bool = True
    reweights: bool = False

    @property
    def needs_base_weight(self) -> bool:
        """It reads each layer's frozen base weight ``W0`` (refused on a quantized one)."""
        return "weight" in self.sizes


RULES: dict[str, APNRule] = {
    rule.name: rule
    for rule in (
        APNRule(
            "inverse",
            _inverse,
            "APN (the paper)",
            caps=True,
            cap_meaning="k_l = min(1/gbar_l, max_scale) is at max_scale: the layer's gradient norm gbar_l is below "
            "1/max_scale, and it is perturbed at radius max_scale x rho",
        ),
        APNRule("off", _one, "no APN", adaptive=False),
        APNRule("normalized", _one, "1/gbar re-weighting at total radius rho", reweights=True),
        APNRule("weight", _size("weight"), "radius rho x ||W_l||", sizes=("weight",), fsdp=False),
        APNRule("update", _size("update"), "radius rho x ||W_l(t) - W_l(t-1)||", sizes=("update",), fsdp=False),
    )
}
NAMES: tuple[str, ...] = tuple(RULES)


def rule(name: str) -> APNRule:
    """The rule called ``name``; a ValueError naming the valid ones otherwise."""
    if name not in RULES:
        raise ValueError(f"apn={name!r} is invalid: choose one of {', '.join(map(repr, NAMES))}.")
    return RULES[name]


def is_default(name: str | None) -> bool:
    """``apn=name`` is the paper's rule (None: not set, so the default)."""
    return (name or DEFAULT) == DEFAULT


def caps(name: str | None, max_scale: float | None = 10.0) -> bool:
    """Whether a run with ``apn=name`` (None: the default) and this ``max_scale`` has an APN cap at all (its
    ``apn_capped`` statistic means something). An unknown name has none."""
    found = RULES.get(name or DEFAULT)
    return found is not None and found.caps and max_scale is not None


def label(name: str | None) -> str:
    """How reports name the rule ``name`` (None: the default; an unknown name: itself)."""
    found = RULES.get(name or DEFAULT)
    return found.label if found is not None else str(name)


def cap_meaning(name: str | None) -> str:
    """What a layer at the cap of the rule ``name`` means (warnings, reports); "" for a rule without a cap."""
    found = RULES.get(name or DEFAULT)
    return found.cap_meaning if found is not None else ""
