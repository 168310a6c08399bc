"""What the optimizers refuse: set-ups they would train wrongly (at construction), and a state saved by another
method or with other settings (at loading); and which state entry of a base optimizer holds its momentum."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from mgpo.optim.distributed import check_placements


def check_same_method(extra: dict[str, Any], name: str, hparams: dict[str, Any]) -> None:
    """Raise ValueError if the state ``extra`` (a state dict's "extra") was saved by another method than ``name``,
    or with settings other than ``hparams`` (those in NOT_COMPARED aside), naming the method or the setting."""
    saved = extra.get("hparams")
    # Saved before the method was recorded: the names of its settings tell (an older version of the same
    # method lacks a few of them, another method has others).
    by = extra.get("method")
    theirs, ours = set(saved or {}) - NOT_COMPARED, set(hparams) - NOT_COMPARED
    if by is None and saved is not None and not (theirs <= ours or ours <= theirs):
        by = f"another method (its settings: {', '.join(sorted(saved))})"
    if by is not None and by != name:
        raise ValueError(
            f"{name}.load_state_dict: the state was saved by {by}, not by {name}: a resume never changes the "
            f"method. Resume with the method that wrote it{_method_hint(by)}, or start a new run without "
            "loading this state."
        )
    if saved is not None:
        for key in sorted(set(saved) | set(hparams)):
            if key in NOT_COMPARED:
                continue
            if saved.get(key) != hparams.get(key):
                raise ValueError(
                    f"{name}.load_state_dict: the state was saved with {key}="
                    f"{saved.get(key)!r} but this optimizer has {key}={hparams.get(key)!r}. Build the "
                    f"optimizer with {key}={saved.get(key)!r} to resume that run (a resume never changes the "
                    "method silently)."
                )


# Base optimizers whose first moment MGPO can reuse, by the name of the state entry holding it.
_ADAM_MOMENT = "exp_avg"  # Adam, AdamW, NAdam, RAdam, Adamax
_SGD_MOMENT = "momentum_buffer"  # SGD / RMSprop with momentum > 0


# Settings two optimizers of one run may differ in: the noise seed is state (restored, not compared), and
# diagnostics only add statistics (the trajectory is the same).
NOT_COMPARED = frozenset({"seed", "diagnostics"})


def _method_hint(class_name: str) -> str:
    """' (mgpo.SAM, perturbation method 'sam')' for an optimizer class name of ours, else ''."""
    from mgpo.optim.configs import METHOD_CONFIGS

    method = next((m for m, (_, cls) in METHOD_CONFIGS.items() if cls == class_name), None)
    return f" (mgpo.{class_name}, perturbation method {method!r})" if method else ""


def refuse_unsupported(param_groups: list[dict[str, Any]], model: nn.Module | None) -> None:
    """Refuse, at construction, set-ups the optimizers would train wrongly (docs/method.md, section 12 "Known gaps")."""
    if model is not None and (type(model).__name__ == "DeepSpeedEngine" or hasattr(model, "zero_optimization")):
        raise ValueError(
            "DeepSpeed is not supported: ZeRO shards parameters and optimizer state behind its own engine, so the "
            "perturbation's norms and momenta would be per-rank fragments. Use PyTorch DDP or FSDP "
            "(torch.distributed.fsdp.fully_shard), e.g. through accelerate, instead."
        )
    if model is not None and any(type(m).__name__ == "FullyShardedDataParallel" for m in model.modules()):
        raise ValueError(
            "FSDP1 (FullyShardedDataParallel) is not supported: its flattened parameters hide the LoRA layers and "
            "their shards. Use FSDP2 instead: torch.distributed.fsdp.fully_shard, or fsdp_config version 2 in the "
            "HF Trainer / accelerate (mgpo train: distributed.strategy=fsdp); or DDP."
        )
    params = [p for g in param_groups for p in g["params"]]
    if any(hasattr(p, "ds_id") or hasattr(p, "ds_tensor") for p in params):
        raise ValueError(
            "These parameters are partitioned by DeepSpeed ZeRO, which is not supported; use PyTorch "
            "DDP or FSDP (fully_shard) instead."
        )
    check_placements(params)  # FSDP2 on a 1-D mesh only; tensor parallelism and mixed layouts are refused
    devices = sorted({str(p.device) for p in params})
    if len(devices) > 1:
        raise ValueError(
            f"The parameters are on several devices ({', '.join(devices)}), e.g. from device_map='auto'. The "
            "optimizer computes its norms on one device and does not support this; load the model on one device "
            "(device_map={'': 0}) or shard it with FSDP."
        )


def moment_key(base: torch.optim.Optimizer) -> str:
    """The state entry of ``base`` that holds its momentum, or a TypeError naming the fix."""
    if "betas" in base.defaults:
        return _ADAM_MOMENT
    if all(g.get("momentum", 0) > 0 for g in base.param_groups):
        return _SGD_MOMENT
    raise TypeError(
        f"momentum='optimizer' reuses the base optimizer's momentum, but {type(base).__name__} with these "
        "settings keeps none. Fix: use an optimizer with momentum (AdamW, Adam, or SGD with momentum>0, given as "
        "base_kwargs={'momentum': 0.9}: a momentum= keyword is MGPO's own setting, not SGD's), or pass "
        "momentum=0.9 so MGPO keeps its own momentum buffer (paper eq. 5; the base optimizer then has none)."
    )
