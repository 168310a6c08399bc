"""Building an optimizer of the mgpo family for a model, the way PEFT and Hugging Face users build theirs.

:func:`create_optimizer` mirrors PEFT's ``create_loraplus_optimizer(model, optimizer_cls, lr=..., ...)``::

    opt = mgpo.create_optimizer(model, torch.optim.AdamW, {"lr": 2e-4, "weight_decay": 0.01}, method="mgpo",
                                rho=0.05)
    opt = mgpo.create_optimizer(model, torch.optim.AdamW, {"lr": 2e-4}, loraplus_lr_ratio=16)  # LoRA+ groups

Parameter groups follow Hugging Face's rule (weight decay on every trainable tensor except biases and norm
weights, as ``Trainer.get_decay_parameter_names``); with ``loraplus_lr_ratio`` they are PEFT's own LoRA+ groups
(``peft.optimizers.create_loraplus_optimizer`` is called, with the method as its optimizer class).
Pure PyTorch except for the LoRA+ path, which imports PEFT.
"""

from __future__ import annotations

import inspect
import re

import torch
from torch import nn

from mgpo.checks import check_choice
from mgpo.optim._base import PerturbedOptimizer
from mgpo.optim.configs import METHOD_CONFIGS, METHODS, PROFILES, PerturbationConfig

# Trainer.get_decay_parameter_names (transformers 5): names matching these get no weight decay, nor does any
# parameter of an nn.LayerNorm.
_NO_DECAY_NAMES = re.compile(r"bias|layernorm|rmsnorm|(?:^|\.)norm(?:$|\.)|_norm(?:$|\.)")


def decay_parameter_names(model: nn.Module) -> set[str]:
    """Names of the parameters that get weight decay: Hugging Face's rule (not biases, not norm weights)."""
    no_decay = {
        f"{prefix}.{name}" if prefix else name
        for prefix, module in model.named_modules()
        if isinstance(module, nn.LayerNorm)
        for name, _ in module.named_parameters(recurse=False)
    }
    return {
        name
        for name, _ in model.named_parameters()
        if name not in no_decay and not _NO_DECAY_NAMES.search(name.lower())
    }


def decay_groups(model: nn.Module, weight_decay: float, decay_names: set[str] | None = None) -> list[dict]:
    """The trainable parameters as two groups, with and without weight decay (empty groups left out)."""
    decay_names = decay_parameter_names(model) if decay_names is None else set(decay_names)
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if not trainable:
        raise ValueError(
            "The model has no trainable parameters: apply an adapter (get_peft_model) or set "
            "requires_grad on the tensors to train."
        )
    groups = [
        {"params": [p for n, p in trainable if n in decay_names], "weight_decay": weight_decay},
        {"params": [p for n, p in trainable if n not in decay_names], "weight_decay": 0.0},
    ]
    return [g for g in groups if g["params"]]


def _method_class(method: str) -> type[PerturbedOptimizer]:
    import mgpo

    return getattr(mgpo, METHOD_CONFIGS[method][1])


def create_optimizer(
    model: nn.Module,
    optimizer_cls: type[torch.optim.Optimizer] = torch.optim.AdamW,
    optimizer_kwargs: dict | None = None,
    method: str = "mgpo",
    *,
    loraplus_lr_ratio: float | None = None,
    decay_names: set[str] | None = None,
    **method_kwargs,
) -> torch.optim.Optimizer:
    """An optimizer of ``method`` (mgpo, msam, sam, random, ggpo; adamw: ``optimizer_cls`` itself) for ``model``.

    Args:
        model: the model to train (a PEFT model, or any module with trainable parameters).
        optimizer_cls: the base optimizer class the method wraps (AdamW).
        optimizer_kwargs: the base optimizer's arguments: ``lr`` (required), ``weight_decay``, ``betas``, ...
        method: the perturbation method.
        loraplus_lr_ratio: use PEFT's LoRA+ groups (B learns this many times faster than A).
        decay_names: names of the parameters with weight decay (default: :func:`decay_parameter_names`; a
            Trainer passes its ``get_decay_parameter_names(model)``).
        **method_kwargs: the method's own settings (``rho``, ``beta``, ...: see ``mgpo.MGPOConfig`` etc.).
    """
    check_choice("method", method, METHODS)
    kwargs = dict(optimizer_kwargs or {})
    if "lr" not in kwargs:
        raise ValueError(
            "optimizer_kwargs has no 'lr': give the base optimizer's learning rate, e.g. optimizer_kwargs={'lr': 2e-4}."
        )
    if method == "adamw" and method_kwargs:
        raise ValueError(
            f"method='adamw' takes no method settings, got {sorted(method_kwargs)}; choose a "
            f"perturbation method ({', '.join(m for m in METHODS if m != 'adamw')}) or drop them."
        )

    def build(param_groups, **base_kwargs):
        param_groups = [group for group in param_groups if group["params"]]  # PEFT's LoRA+ may leave some empty
        if method == "adamw":
            return optimizer_cls(param_groups, **base_kwargs)
        return _method_class(method)(param_groups, optimizer_cls, model=model, base_kwargs=base_kwargs, **method_kwargs)

    build.__name__ = f"{method}_{optimizer_cls.__name__}"  # PEFT looks at the class name (8-bit Adam)
    if loraplus_lr_ratio is not None:
        from peft.optimizers import create_loraplus_optimizer

        lr = kwargs.pop("lr")
        weight_decay = kwargs.pop("weight_decay", 0.0)
        return create_loraplus_optimizer(
            model,  # type: ignore[arg-type]  # PEFT annotates PeftModel: any model with LoRA layers does
            build,  # type: ignore[arg-type]  # PEFT annotates an optimizer class: it calls build(groups, **kwargs)
            lr=lr,
            loraplus_lr_ratio=loraplus_lr_ratio,
            loraplus_weight_decay=weight_decay,
            **kwargs,
        )
    groups = decay_groups(model, kwargs.pop("weight_decay", 0.0), decay_names)
    return build(groups, **kwargs)


def profile_betas(cfg: PerturbationConfig, base_optimizer: type[torch.optim.Optimizer], base_kwargs: dict) -> dict:
    """``base_kwargs`` with the profile's mu as the base optimizer's beta1 (AdamW's, in the authors' code), beta2
    kept (given, else the optimizer's default). A base optimizer without betas (SGD, RMSprop, Adagrad) cannot take
    it: refused by name, rather than training with the profile's rho and beta but another momentum."""
    mu = cfg.adam_beta1
    if mu is None:
        return dict(base_kwargs)
    assert cfg.profile is not None  # mu is the profile's
    if "betas" in base_kwargs:
        return {**base_kwargs, "betas": (mu, base_kwargs["betas"][1])}
    default = inspect.signature(base_optimizer).parameters.get("betas")
    if default is None or not isinstance(default.default, tuple):
        raise ValueError(
            f"perturbation.profile={cfg.profile!r} sets the base optimizer's beta1 to mu={mu:g} (the authors' "
            f"momentum is AdamW's exp_avg), but {base_optimizer.__name__} has no betas, so the profile would be "
            "applied only in part. Use an Adam-like base optimizer (AdamW, Adam, NAdam, RAdam, Adamax; "
            "training.optim=adamw_torch), or drop the profile and set perturbation.rho and perturbation.beta "
            f"yourself (the profile's: rho={PROFILES[cfg.profile]['rho']:g}, beta={PROFILES[cfg.profile]['beta']:g})."
        )
    return {**base_kwargs, "betas": (mu, default.default[1])}


def build_optimizer(
    model: nn.Module,
    cfg: PerturbationConfig,
    param_groups: list[dict],
    *,
    lr: float,
    weight_decay: float = 0.0,
    total_steps: int | None = None,
    base_optimizer: type[torch.optim.Optimizer] = torch.optim.AdamW,
    **base_kwargs,
) -> torch.optim.Optimizer:
    """The optimizer of ``cfg.method`` over ``param_groups`` (e.g. from :func:`decay_groups`).

    ``adamw`` gives ``base_optimizer(param_groups, lr=lr, weight_decay=weight_decay)`` itself; every other method
    wraps ``base_optimizer`` and gets ``model`` (for its forward hooks and LoRA layer grouping). ``total_steps``
    is the run's number of optimizer steps, the length of the random method's noise ramp (None: no ramp).
    ``base_kwargs`` (e.g. ``betas``, ``eps``) go to the base optimizer; a ``profile`` sets AdamW's beta1.
    Group entries override ``lr`` and ``weight_decay``.
    """
    cfg.validate()
    cfg = cfg.resolved()
    groups = [dict(group) for group in param_groups]  # the optimizers add keys; leave the caller's dicts alone
    base = dict(lr=lr, weight_decay=weight_decay, **profile_betas(cfg, base_optimizer, base_kwargs))
    method = cfg.method_config()
    if method is None:  # adamw
        return base_optimizer(groups, **base)
    settings = method.kwargs()
    if cfg.method == "random":
        settings["total_steps"] = total_steps
    return _method_class(cfg.method)(groups, base_optimizer, model=model, base_kwargs=base, **settings)
