"""LoRA and its variants, selectable by name, with the paper's defaults.

Defaults follow the LoRA-MGPO paper's setup: rank 8, alpha 16, adapters on every linear layer except
embeddings, norms and the output head (classifier / lm_head). For classification and regression PEFT's
SEQ_CLS task type keeps the freshly initialised head fully trainable (``modules_to_save``).

Methods: ``lora``, ``dora`` (learned magnitudes), ``rslora`` (alpha / sqrt(r) scaling), ``pissa`` (SVD
initialisation from the weights), ``loraplus`` (B learns ``loraplus_lr_ratio`` times faster than A; see
``optimizer_param_groups``), ``adalora`` (rank re-allocation; call ``adapter_step`` every step),
``lora-ga`` (initialisation from a gradient estimate on a few batches) and ``full`` (no adapter, every
weight trains).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from itertools import islice

import torch
from peft import AdaLoraConfig, LoraConfig, LoraGAConfig, TaskType, get_peft_model, preprocess_loraga
from peft.optimizers import create_loraplus_optimizer
from peft.tuners.tuners_utils import _maybe_include_all_linear_layers

METHODS = ("lora", "dora", "rslora", "pissa", "loraplus", "adalora", "lora-ga", "full")

TASK_TYPES = {
    "classification": TaskType.SEQ_CLS,
    "regression": TaskType.SEQ_CLS,
    "causal-lm": TaskType.CAUSAL_LM,
}


@dataclass
class AdapterConfig:
    """Which parameter-efficient method to apply, and its hyper-parameters."""

    method: str = field(default="lora", metadata={"help": f"Adapter method, one of: {', '.join(METHODS)}."})
    rank: int = field(default=8, metadata={"help": "LoRA rank r (for adalora see adalora_* instead)."})
    alpha: float = field(default=16.0, metadata={"help": "LoRA alpha; updates are scaled by alpha / r "
                                                         "(alpha / sqrt(r) for rslora)."})
    dropout: float = field(default=0.0, metadata={"help": "Dropout on the LoRA input, in [0, 1)."})
    target_modules: str | list[str] = field(
        default="all-linear",
        metadata={"help": "Modules that get adapters: 'all-linear' (every linear layer except the output head), "
                          "a list of module-name suffixes, or a regex matched against full module names."},
    )
    pissa_niter: int = field(default=4, metadata={"help": "PiSSA: subspace iterations of the fast randomized SVD; "
                                                          "0 = exact (slow) SVD."})
    loraplus_lr_ratio: float = field(default=16.0, metadata={"help": "LoRA+: learning rate of B = ratio * learning "
                                                                     "rate of A (>= 1)."})
    adalora_init_rank: int = field(default=12, metadata={"help": "AdaLoRA: starting rank of every adapter."})
    adalora_target_rank: int = field(default=8, metadata={"help": "AdaLoRA: average rank after budget pruning."})
    adalora_tinit_frac: float = field(default=0.1, metadata={"help": "AdaLoRA: fraction of total steps of warm-up "
                                                                     "before pruning starts."})
    adalora_tfinal_frac: float = field(default=0.2, metadata={"help": "AdaLoRA: fraction of total steps at the end "
                                                                      "with the final ranks fixed."})
    adalora_delta_t: int = field(default=10, metadata={"help": "AdaLoRA: steps between two rank re-allocations."})
    adalora_orth_reg_weight: float = field(default=0.5, metadata={"help": "AdaLoRA: weight of the orthogonality "
                                                                          "penalty added to the loss."})
    loraga_batches: int = field(default=8, metadata={"help": "LoRA-GA: training batches used to estimate the "
                                                             "gradient that initialises the adapters."})

    def validate(self) -> None:
        """Raise ValueError naming the first field whose value is out of range."""
        if self.method not in METHODS:
            raise ValueError(f"method={self.method!r} is unknown; choose one of {', '.join(METHODS)}.")
        checks = [
            ("rank", self.rank >= 1, "an integer >= 1"),
            ("alpha", self.alpha > 0, "> 0"),
            ("dropout", 0.0 <= self.dropout < 1.0, "in [0, 1)"),
            ("pissa_niter", self.pissa_niter >= 0, ">= 0"),
            ("loraplus_lr_ratio", self.loraplus_lr_ratio >= 1.0, ">= 1"),
            ("adalora_target_rank", self.adalora_target_rank >= 1, "an integer >= 1"),
            ("adalora_init_rank", self.adalora_init_rank >= self.adalora_target_rank,
             f">= adalora_target_rank ({self.adalora_target_rank})"),
            ("adalora_tinit_frac", 0.0 <= self.adalora_tinit_frac < 1.0, "in [0, 1)"),
            ("adalora_tfinal_frac", 0.0 <= self.adalora_tfinal_frac < 1.0 - self.adalora_tinit_frac,
             f"in [0, 1 - adalora_tinit_frac) = [0, {1.0 - self.adalora_tinit_frac:g})"),
            ("adalora_delta_t", self.adalora_delta_t >= 1, "an integer >= 1"),
            ("adalora_orth_reg_weight", self.adalora_orth_reg_weight >= 0, ">= 0"),
            ("loraga_batches", self.loraga_batches >= 1, "an integer >= 1"),
        ]
        for name, ok, allowed in checks:
            if not ok:
                raise ValueError(f"{name}={getattr(self, name)!r} is out of range; it must be {allowed}.")
        targets = self.target_modules
        if not targets or (not isinstance(targets, str) and not all(isinstance(t, str) and t for t in targets)):
            raise ValueError(f"target_modules={targets!r} is invalid; give 'all-linear', a regex, "
                             "or a non-empty list of module names.")


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
    if task not in TASK_TYPES:
        raise ValueError(f"task={task!r} is unknown; choose one of {', '.join(TASK_TYPES)}.")
    if cfg.method == "full":
        for param in model.parameters():
            param.requires_grad_(True)
        return model
    targets = cfg.target_modules if isinstance(cfg.target_modules, str) else list(cfg.target_modules)
    common = dict(task_type=TASK_TYPES[task], target_modules=targets, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout)
    if cfg.method == "adalora":
        if total_steps is None or total_steps < 1:
            raise ValueError(f"total_steps={total_steps!r}: method 'adalora' needs the number of training steps "
                             "(>= 1) to schedule its rank budget; pass total_steps=...")
        peft_config = AdaLoraConfig(
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
        init_lora_weights=init.get(cfg.method, True),
        lora_ga_config=LoraGAConfig() if cfg.method == "lora-ga" else None,
        **common,
    )
    if cfg.method == "lora-ga":
        _estimate_loraga_gradients(model, peft_config, cfg.loraga_batches, grad_batches)
    return get_peft_model(model, peft_config)


def _estimate_loraga_gradients(model, peft_config: LoraConfig, n_batches: int, grad_batches) -> None:
    if grad_batches is None:
        raise ValueError("grad_batches=None: method 'lora-ga' needs a few training batches to estimate gradients; "
                         "pass grad_batches=<callable returning an iterable of model-ready batches>.")
    # preprocess_loraga runs before get_peft_model, so resolve 'all-linear' (minus the head) the way PEFT will.
    peft_config = _maybe_include_all_linear_layers(peft_config, model)
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
        preprocess_loraga(model, peft_config, train_step)
    if not seen:
        raise ValueError("lora-ga: grad_batches yielded no batches; it must give at least one training batch.")


class _GroupCapture:
    """Stands in for an optimizer class so that PEFT's LoRA+ grouping can be reused as plain param groups."""

    def __init__(self, param_groups: list[dict], **defaults):
        self.param_groups = param_groups


def optimizer_param_groups(model: torch.nn.Module, cfg: AdapterConfig, lr: float,
                           weight_decay: float = 0.0) -> list[dict]:
    """Parameter groups (with ``lr`` and ``weight_decay`` set) for any torch optimizer.

    loraplus: PEFT's own LoRA+ grouping (``create_loraplus_optimizer``): A matrices and 2-D head weights at
    ``lr``, B matrices and 1-D parameters at ``lr * cfg.loraplus_lr_ratio``. Other methods: one group of all
    trainable parameters. Empty groups are left out.
    """
    if cfg.method == "loraplus":
        captured = create_loraplus_optimizer(
            model, _GroupCapture, lr=lr, loraplus_lr_ratio=cfg.loraplus_lr_ratio, loraplus_weight_decay=weight_decay
        )
        return [group for group in captured.param_groups if group["params"]]
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("The model has no trainable parameters; call apply_adapter first.")
    return [{"params": params, "lr": lr, "weight_decay": weight_decay}]


def adapter_step(model: torch.nn.Module, cfg: AdapterConfig, global_step: int) -> None:
    """Per-step hook of the method. AdaLoRA re-allocates ranks here: call it after ``optimizer.step()`` and
    before ``optimizer.zero_grad()``, with the number of the step just taken. No-op for other methods."""
    if cfg.method == "adalora":
        model.base_model.update_and_allocate(global_step)
