"""Which tensors form a "layer" (docs/method.md, sections 2-3) and which modules receive weight-space noise.

Pure name/attribute inspection: PEFT is recognised by its naming scheme (``<module>.lora_A.<adapter>...``), so
nothing here imports PEFT.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from mgpo.optim.lowrank import STACK_ELEMENTS as STACK_ELEMENTS  # re-exported: older imports
from mgpo.optim.lowrank import lowrank_row_sq_norms as lowrank_row_sq_norms  # re-exported: older imports
from mgpo.optim.lowrank import lowrank_sq_norms as lowrank_sq_norms  # re-exported: older imports

if TYPE_CHECKING:
    from typing_extensions import TypeIs

    class LoraLinear(nn.Module):
        """A PEFT LoRA layer wrapping an ``nn.Linear`` (``peft.tuners.lora.Linear`` and its kin), as the type checker
        sees it: the attributes mgpo reads. PEFT's modules are untyped ``nn.Module``s and PEFT is never imported
        here, so this class exists for the type checker only; :func:`is_lora_linear` narrows a module to it."""

        lora_A: nn.ModuleDict
        lora_B: nn.ModuleDict
        lora_dropout: nn.ModuleDict
        lora_magnitude_vector: nn.ModuleDict
        scaling: dict[str, float]
        active_adapters: list[str]
        disable_adapters: bool
        get_base_layer: Callable[[], nn.Linear]
        get_delta_weight: Callable[[str], torch.Tensor]


# ``encoder.layer.0.query.lora_A.default.weight`` -> ("encoder.layer.0.query", "default"). Covers lora_A/lora_B,
# DoRA's lora_magnitude_vector, AdaLoRA's lora_E (a ParameterDict, so no ".weight") and lora_embedding_A/B.
_LORA_NAME = re.compile(r"^(?P<module>.*)\.lora_[A-Za-z_]+\.(?P<adapter>[^.]+)(?:\.weight)?$")


def lora_layer_key(param_name: str) -> str | None:
    """The layer a PEFT LoRA tensor belongs to (``module[adapter]``), or None for any other tensor."""
    match = _LORA_NAME.match(param_name)
    return f"{match['module']}[{match['adapter']}]" if match else None


def discover_layers(
    param_groups: list[dict[str, Any]], model: nn.Module | None = None
) -> dict[str, list[torch.Tensor]]:
    """Group the optimizer's tensors into layers, in param-group order.

    With a model, the tensors of one LoRA module and adapter (A, B, DoRA magnitude, AdaLoRA E) form one layer
    and every other tensor is its own layer, named after its parameter. Without a model each tensor is its own
    layer, named ``group<g>.param<i>``.
    """
    names = {}
    if model is not None:
        names = {id(p): n for n, p in model.named_parameters(remove_duplicate=False)}
    layers: dict[str, list[torch.Tensor]] = {}
    for g, group in enumerate(param_groups):
        for i, p in enumerate(group["params"]):
            name = names.get(id(p), f"group{g}.param{i}")
            layers.setdefault(lora_layer_key(name) or name, []).append(p)
    return layers


def is_lora_linear(module: nn.Module) -> TypeIs[LoraLinear]:
    """A PEFT LoRA layer wrapping an ``nn.Linear`` (LoRA, DoRA, rsLoRA, PiSSA, AdaLoRA's SVDLinear...)."""
    return (
        hasattr(module, "lora_A") and hasattr(module, "get_delta_weight") and isinstance(base_layer(module), nn.Linear)
    )


def base_layer(module: nn.Module) -> nn.Module | None:
    """The layer a PEFT layer wraps (``module.get_base_layer()``); None for a module that is no PEFT layer."""
    get = getattr(module, "get_base_layer", None)
    if get is None:
        return None
    base: nn.Module = get()
    return base


def weight_of(layer: nn.Module) -> torch.Tensor:
    """``layer.weight`` of a layer that has one (a LoRA factor, DoRA's magnitude vector), as a tensor."""
    weight = layer.weight
    assert isinstance(weight, torch.Tensor)
    return weight


def noise_targets(model: nn.Module, trainable: set[int]) -> dict[str, LoraLinear | nn.Linear]:
    """Modules whose full weight ``W'`` receives random noise (RandomPerturbation, GGPO).

    Every PEFT LoRA linear layer with a trainable adapter tensor if the model has any; otherwise (full
    fine-tuning) every ``nn.Linear`` whose weight the optimizer trains.
    """
    lora: dict[str, LoraLinear | nn.Linear] = {
        name: m
        for name, m in model.named_modules()
        if is_lora_linear(m) and any(id(p) in trainable for p in m.parameters())
    }
    if lora:
        return lora
    return {name: m for name, m in model.named_modules() if isinstance(m, nn.Linear) and id(m.weight) in trainable}


def is_plain_lora(module: nn.Module, adapter: str) -> bool:
    """``adapter`` of ``module`` is vanilla LoRA: ``W0 + s B A`` with ``A``, ``B`` plain linear weights (not DoRA,
    not AdaLoRA's SVD form), so its weight-space term can be applied as a low-rank addition to the output."""
    if not is_lora_linear(module) or adapter not in module.lora_A:
        return False
    if adapter in getattr(module, "lora_variant", {}) or getattr(module, "use_dora", {}).get(adapter, False):
        return False
    a, b = module.lora_A[adapter], module.lora_B[adapter]
    return isinstance(a, nn.Linear) and isinstance(b, nn.Linear) and hasattr(module, "scaling")


def is_dora(module: nn.Module, adapter: str) -> bool:
    """``adapter`` of ``module`` is a DoRA adapter on a linear layer (PEFT's ``use_dora=True``)."""
    return (
        is_lora_linear(module)
        and adapter in module.lora_A
        and (
            getattr(module, "use_dora", {}).get(adapter, False)
            or type(getattr(module, "lora_variant", {}).get(adapter)).__name__ == "DoraLinearVariant"
        )
    )


def dora_weight_space_refusal(module: LoraLinear, adapter: str) -> str | None:
    """Why the authors' weight-space rule cannot be applied exactly to this DoRA adapter (None: it can)."""
    if not isinstance(module.lora_dropout[adapter], nn.Identity):
        return "lora_dropout > 0 (the rule needs the undropped base output)"
    if getattr(module, "fan_in_fan_out", False):
        return "fan_in_fan_out"
    if is_quantized(module):
        return "a quantized base layer"
    if not (isinstance(module.lora_A[adapter], nn.Linear) and isinstance(module.lora_B[adapter], nn.Linear)):
        return "non-linear factors"
    return None


def lora_pairs(model: nn.Module, trainable: set[int], dora: bool = False) -> list[tuple[str, LoraLinear, str]]:
    """``(layer key, module, adapter)`` of every vanilla LoRA adapter whose A and B are both trained; with ``dora``
    the DoRA adapters whose A and B are both trained instead."""
    pairs = []
    for name, module in model.named_modules():
        if not is_lora_linear(module):
            continue
        for adapter in module.lora_A:
            kind = is_dora(module, adapter) if dora else is_plain_lora(module, adapter)
            if (
                kind
                and id(module.lora_A[adapter].weight) in trainable
                and id(module.lora_B[adapter].weight) in trainable
            ):
                pairs.append((f"{name}[{adapter}]", module, adapter))
    return pairs


def is_quantized(module: nn.Module) -> bool:
    """A bitsandbytes (or other packed) base layer whose weight is not a plain floating tensor."""
    base = base_layer(module)
    base = module if base is None else base
    weight = getattr(base, "weight", None)
    return type(base).__module__.split(".")[0] in ("bitsandbytes", "auto_gptq", "gptqmodel", "awq") or (
        weight is not None and (not weight.is_floating_point() or type(weight).__name__ in ("Params4bit", "Int8Params"))
    )
