"""Which tensors form a "layer" (method-spec, Notation) and which modules receive weight-space noise.

Pure name/attribute inspection: PEFT is recognised by its naming scheme (``<module>.lora_A.<adapter>...``), so
nothing here imports PEFT.
"""

from __future__ import annotations

import re

import torch
from torch import nn

# ``encoder.layer.0.query.lora_A.default.weight`` -> ("encoder.layer.0.query", "default"). Covers lora_A/lora_B,
# DoRA's lora_magnitude_vector, AdaLoRA's lora_E (a ParameterDict, so no ".weight") and lora_embedding_A/B.
_LORA_NAME = re.compile(r"^(?P<module>.*)\.lora_[A-Za-z_]+\.(?P<adapter>[^.]+)(?:\.weight)?$")


def lora_layer_key(param_name: str) -> str | None:
    """The layer a PEFT LoRA tensor belongs to (``module[adapter]``), or None for any other tensor."""
    match = _LORA_NAME.match(param_name)
    return f"{match['module']}[{match['adapter']}]" if match else None


def discover_layers(param_groups: list[dict], model: nn.Module | None = None) -> dict[str, list[torch.Tensor]]:
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


def is_lora_linear(module: nn.Module) -> bool:
    """A PEFT LoRA layer wrapping an ``nn.Linear`` (LoRA, DoRA, rsLoRA, PiSSA, AdaLoRA's SVDLinear...)."""
    return (
        hasattr(module, "lora_A")
        and hasattr(module, "get_base_layer")
        and hasattr(module, "get_delta_weight")
        and isinstance(module.get_base_layer(), nn.Linear)
    )


def noise_targets(model: nn.Module, trainable: set[int]) -> dict[str, nn.Module]:
    """Modules whose full weight ``W'`` receives random noise (RandomPerturbation, GGPO).

    Every PEFT LoRA linear layer with a trainable adapter tensor if the model has any; otherwise (full
    fine-tuning) every ``nn.Linear`` whose weight the optimizer trains.
    """
    lora = {
        name: m
        for name, m in model.named_modules()
        if is_lora_linear(m) and any(id(p) in trainable for p in m.parameters())
    }
    if lora:
        return lora
    return {
        name: m for name, m in model.named_modules() if isinstance(m, nn.Linear) and id(m.weight) in trainable
    }
