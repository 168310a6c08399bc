"""MGPO's layer plan: which layer is perturbed how (docs/method.md, sections 2-5), decided once at construction.

A LoRA layer whose factors can carry the weight-space rule is a :class:`Pair` (its ``eps_l`` is added to the layer's
output by a hook); every other perturbed tensor is :class:`InPlace` (moved along its momentum and restored).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from functools import cached_property
from typing import TYPE_CHECKING, NamedTuple

import torch
from torch import Tensor, nn

from mgpo.optim.layers import dora_weight_space_refusal, is_dora, is_quantized, lora_pairs, weight_of

if TYPE_CHECKING:
    from mgpo.optim.layers import LoraLinear


class Pair(NamedTuple):
    """A LoRA layer perturbed in weight space: ``W0 + s B A`` (one module and adapter)."""

    layer: int  # index into ``opt.layers``
    module: LoraLinear
    adapter: str
    a: Tensor  # r x in
    b: Tensor  # out x r
    scaling: float  # s
    magnitude: Tensor | None  # DoRA's magnitude vector (the authors' rule: eps in the base weight), else None


class InPlace(NamedTuple):
    """A tensor moved in place along its momentum (factor space, DoRA/AdaLoRA fallbacks, heads, full fine-tuning)."""

    layer: int
    tensor: Tensor


@dataclass(frozen=True)
class LayerPlan:
    """Every perturbed layer and how; read-only (``opt.plan``).

    Attributes:
        pairs: the layers perturbed in weight space.
        inplace: the tensors moved in place.
        unperturbed: the keys of trained layers left clean (non-LoRA tensors next to LoRA layers, by default).
        exact: tensors moved in place are restored from a copy (else the perturbation is subtracted again).
        quantized: the keys of pairs whose base weight is quantized.
    """

    pairs: tuple[Pair, ...]
    inplace: tuple[InPlace, ...]
    unperturbed: tuple[str, ...]
    exact: bool
    quantized: tuple[str, ...]

    @property
    def dora(self) -> tuple[Pair, ...]:
        return tuple(pair for pair in self.pairs if pair.magnitude is not None)

    @cached_property
    def layer_of(self) -> dict[int, int]:
        """id of a tensor moved in place -> its layer."""
        return {id(t): i for i, t in self.inplace}

    @cached_property
    def perturbable(self) -> set[int]:
        """ids of every tensor whose gradient drives a perturbation."""
        return {id(t) for pair in self.pairs for t in (pair.a, pair.b)} | set(self.layer_of)


def build_plan(
    model: nn.Module | None,
    layers: dict[str, list[Tensor]],
    *,
    weight_space: bool,
    perturb_non_lora: bool,
    exact: bool | None,
    sharded: bool,
) -> LayerPlan:
    """The plan of an optimizer over ``layers`` (``opt.layers``), warning about layers that cannot get the
    weight-space rule (``weight_space``: ``space="weight"`` with a model)."""
    index = {key: i for i, key in enumerate(layers)}
    trainable = {id(p) for ps in layers.values() for p in ps}
    found = lora_pairs(model, trainable) if weight_space and model is not None else []
    doras = lora_pairs(model, trainable, dora=True) if weight_space and model is not None else []
    refused = {key: why for key, m, a in doras if (why := dora_weight_space_refusal(m, a))}
    if weight_space and model is not None:
        _warn_fallbacks(model, trainable, refused)
    if doras and sharded:
        raise ValueError(
            "MGPO: DoRA layers under FSDP are not supported in weight space (their row norms need "
            "the whole base weight); pass space='factors'."
        )
    chosen = [pr for pr in found if pr[0] in index] + [pr for pr in doras if pr[0] in index and pr[0] not in refused]
    pairs = tuple(
        Pair(
            index[key],
            m,
            a,
            weight_of(m.lora_A[a]),
            weight_of(m.lora_B[a]),
            float(m.scaling[a]),
            weight_of(m.lora_magnitude_vector[a]) if is_dora(m, a) else None,
        )
        for key, m, a in chosen
    )
    in_pairs = {id(t) for pr in pairs for t in (pr.a, pr.b)} | {
        id(pr.magnitude) for pr in pairs if pr.magnitude is not None
    }
    lora = bool(pairs) or any("[" in key for key in layers)  # "module[adapter]": a LoRA layer
    # Next to LoRA layers in weight space, only LoRA tensors (DoRA, AdaLoRA factors) are moved in place, unless
    # perturb_non_lora: the authors perturb nothing else.
    keep_all = not weight_space or perturb_non_lora or not lora
    inplace = tuple(
        InPlace(index[key], p)
        for key, ps in layers.items()
        for p in ps
        if id(p) not in in_pairs and (keep_all or "[" in key)
    )
    full_ft = model is not None and not lora
    if exact is None:
        exact = not (full_ft and all(t.dtype in (torch.float32, torch.float64) for _, t in inplace))
    return LayerPlan(
        pairs,
        inplace,
        tuple(key for key in layers if not (keep_all or "[" in key)),
        exact,
        tuple(key for key, m, _ in chosen if is_quantized(m)),
    )


def _warn_fallbacks(model: nn.Module, trainable: set[int], refused: dict[str, str]) -> None:
    """Layers perturbed in factor space although the weight space was asked for: said once each kind."""
    if refused:  # these DoRA layers keep the factor-space rule (A, B, magnitude moved in place): say so
        key, why = next(iter(refused.items()))
        warnings.warn(
            f"MGPO: {len(refused)} DoRA layer(s) ({key}: {why}) cannot get the authors' weight-space rule exactly "
            "and are perturbed in factor space instead (A, B and the magnitude moved along their momentum); "
            "docs/method.md, section 5.",
            RuntimeWarning,
            stacklevel=5,
        )
    # LoRA on a layer that is no nn.Linear (GPT-2's Conv1D, Conv2d): the factor-space rule
    other = [
        f"{name} ({type(m.get_base_layer()).__name__})"
        for name, m in model.named_modules()
        if hasattr(m, "lora_A")
        and hasattr(m, "get_base_layer")
        and not isinstance(m.get_base_layer(), (nn.Linear, nn.Embedding))
        and any(id(p) in trainable for p in m.parameters())
    ]
    if other:
        warnings.warn(
            f"MGPO: {len(other)} LoRA layer(s) wrap a base layer that is not an nn.Linear (e.g. {other[0]}) "
            "and cannot get the weight-space rule; they are perturbed in factor space instead (A and B moved "
            "along their momentum); docs/method.md, section 5.",
            RuntimeWarning,
            stacklevel=5,
        )


class DeviceConstants:
    """Python tuples as device tensors, each made once: no host-to-device copy (a wait on a GPU) in later steps."""

    def __init__(self, device: torch.device):
        self.device = device
        self._made: dict[tuple[tuple[object, ...], torch.dtype], Tensor] = {}

    def __call__(self, values: tuple[object, ...], dtype: torch.dtype) -> Tensor:
        key = (values, dtype)
        if key not in self._made:
            if len(self._made) >= 256:  # layers whose gradients come and go (MoE): keep it bounded
                self._made.clear()
            self._made[key] = torch.tensor(values, dtype=dtype, device=self.device)
        return self._made[key]

    def index(self, values: tuple[int, ...]) -> Tensor:
        return self(values, torch.long)

    def clear(self) -> None:
        self._made.clear()
