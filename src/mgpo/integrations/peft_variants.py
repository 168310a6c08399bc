"""LoRA and its variants, selectable by name, with the paper's defaults.

Defaults follow the LoRA-MGPO paper's setup: rank 8, alpha 16, adapters on every linear layer except
embeddings, norms and the output head (classifier / lm_head). For classification and regression PEFT's
SEQ_CLS task type keeps the freshly initialised head fully trainable (``modules_to_save``).

Methods: ``lora``, ``dora`` (learned magnitudes), ``rslora`` (alpha / sqrt(r) scaling), ``pissa`` (SVD
initialisation from the weights), ``loraplus`` (B learns ``loraplus_lr_ratio`` times faster than A: PEFT's
``create_loraplus_optimizer`` groups, through ``mgpo.create_optimizer(..., loraplus_lr_ratio=...)``),
``adalora`` (rank re-allocation; call ``adapter_step`` every step), ``lora-ga`` (initialisation from a gradient
estimate on a few batches) and ``full`` (no adapter, every
weight trains).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterable
from itertools import islice
from typing import Any, cast

import torch
from peft import AdaLoraConfig, AdaLoraModel, LoraConfig, LoraGAConfig, TaskType, get_peft_model, preprocess_loraga
from peft.tuners.tuners_utils import _maybe_include_all_linear_layers

from mgpo.integrations.adapter_config import METHODS, AdapterConfig  # noqa: F401  (METHODS re-exported)
from mgpo.tasks import check_task

TASK_TYPES = {
    "classification": TaskType.SEQ_CLS,
    "regression": TaskType.SEQ_CLS,
    "causal-lm": TaskType.CAUSAL_LM,
    "text-to-text": TaskType.SEQ_2_SEQ_LM,
}


def apply_adapter(
    model: torch.nn.Module,
    cfg: AdapterConfig,
    *,
    task: str,
    total_steps: int | None = None,
    grad_batches: Callable[[], Iterable[dict]] | None = None,
) -> torch.nn.Module:
    """Wrap ``model`` with the adapter ``cfg.method`` for ``task`` and return the model to train.

    ``total_steps`` (the number of optimizer steps) is required by adalora. ``grad_batches`` is required by
    lora-ga: a callable returning an iterable of model-ready batches (dicts with labels, on the model's
    device); the first ``cfg.loraga_batches`` are used to estimate the full-weight gradient.
    """
    cfg.validate()
    check_task(task)
    if cfg.method == "full":
        for param in model.parameters():
            param.requires_grad_(True)
        return model
    targets = cfg.target_modules if isinstance(cfg.target_modules, str) else list(cfg.target_modules)
    # PEFT annotates lora_alpha as int; it takes a float (the scale is alpha / r)
    common: dict[str, Any] = dict(
        task_type=TASK_TYPES[task], target_modules=targets, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout
    )
    if cfg.method == "adalora":
        if total_steps is None or total_steps < 1:
            raise ValueError(
                f"total_steps={total_steps!r}: method 'adalora' needs the number of training steps "
                "(>= 1) to schedule its rank budget; pass total_steps=..."
            )
        peft_config: LoraConfig = AdaLoraConfig(
            init_r=cfg.adalora_init_rank,
            target_r=cfg.adalora_target_rank,
            total_step=total_steps,
            tinit=int(cfg.adalora_tinit_frac * total_steps),
            tfinal=int(cfg.adalora_tfinal_frac * total_steps),
            deltaT=cfg.adalora_delta_t,
            orth_reg_weight=cfg.adalora_orth_reg_weight,
            **common,
        )
        return get_peft_model(model, peft_config)
    init = {"pissa": f"pissa_niter_{cfg.pissa_niter}" if cfg.pissa_niter else "pissa", "lora-ga": "lora_ga"}
    peft_config = LoraConfig(
        r=cfg.rank,
        use_dora=cfg.method == "dora",
        use_rslora=cfg.method == "rslora",
        # PEFT's Literal lists neither "lora_ga" nor "pissa_niter_<n>", both of which it takes
        init_lora_weights=init.get(cfg.method, True),  # type: ignore[arg-type]
        lora_ga_config=LoraGAConfig() if cfg.method == "lora-ga" else None,
        **common,
    )
    if cfg.method == "lora-ga":
        _estimate_loraga_gradients(model, peft_config, cfg.loraga_batches, grad_batches)
    return get_peft_model(model, peft_config)


def _estimate_loraga_gradients(model, peft_config: LoraConfig, n_batches: int, grad_batches) -> None:
    if grad_batches is None:
        raise ValueError(
            "grad_batches=None: method 'lora-ga' needs a few training batches to estimate gradients; "
            "pass grad_batches=<callable returning an iterable of model-ready batches>."
        )
    # preprocess_loraga runs before get_peft_model, so resolve 'all-linear' (minus the head) the way PEFT will.
    resolved = _maybe_include_all_linear_layers(peft_config, model)
    assert isinstance(resolved, LoraConfig)  # the same config object, its 'all-linear' resolved
    seen = []

    def train_step() -> None:
        for batch in islice(grad_batches(), n_batches):
            loss = model(**batch).loss
            if loss is None:
                raise ValueError("lora-ga: the model returned no loss; grad_batches must yield batches with labels.")
            loss.backward()
            seen.append(1)

    with warnings.catch_warnings():  # PEFT's counting hooks fire on outputs only, as intended
        warnings.filterwarnings("ignore", message="Full backward hook is firing")
        preprocess_loraga(model, resolved, train_step)
    if not seen:
        raise ValueError("lora-ga: grad_batches yielded no batches; it must give at least one training batch.")


def adapter_step(model: torch.nn.Module, cfg: AdapterConfig | None, global_step: int) -> None:
    """Per-step hook of the method. AdaLoRA re-allocates ranks here: call it after ``optimizer.step()`` and
    before ``optimizer.zero_grad()``, with the number of the step just taken. No-op for other methods.
    ``cfg=None``: the model's own PEFT config decides (a model wrapped with ``AdaLoraConfig``, e.g. by
    ``trl.SFTTrainer(peft_config=...)``)."""
    if cfg.method == "adalora" if cfg is not None else is_adalora(model):
        cast(AdaLoraModel, model.base_model).update_and_allocate(global_step)


def is_adalora(model: torch.nn.Module) -> bool:
    """Whether ``model`` is a PEFT model whose active adapter is AdaLoRA."""
    configs = getattr(model, "peft_config", None)
    active = getattr(model, "active_adapter", None)
    return isinstance(configs, dict) and isinstance(configs.get(active), AdaLoraConfig)
