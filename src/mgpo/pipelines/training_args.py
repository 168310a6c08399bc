"""The run's configuration as Hugging Face ``TrainingArguments`` (:class:`PerturbationTrainingArguments`), the
number of optimizer steps it trains, and the checks on the configuration that need them."""

from __future__ import annotations

import math
from pathlib import Path

from transformers import TrainingArguments

from mgpo.checks import check
from mgpo.pipelines import ranks
from mgpo.pipelines.config import ConfigError, TrainConfig


def total_optimizer_steps(cfg: TrainConfig, n_train: int) -> int:
    """The optimizer steps the Trainer takes: per epoch, each process's micro-batches over grad_accum, rounded up
    (the last step of an epoch takes the micro-batches left over)."""
    t = cfg.training
    if t.max_steps > 0:
        return t.max_steps
    batches = math.ceil(math.ceil(n_train / t.batch_size) / ranks.world_size())
    per_epoch = max(1, math.ceil(batches / t.grad_accum))
    return max(1, math.ceil(per_epoch * t.epochs))


def fsdp_arguments(cfg: TrainConfig) -> dict:
    """``distributed.strategy=fsdp`` as TrainingArguments: PyTorch FSDP2 (``fully_shard``) on each transformer
    block (the model's ``_no_split_modules``) and on the root, through accelerate's FSDP plugin. Empty for DDP
    or a single process."""
    if cfg.distributed.strategy != "fsdp" or ranks.world_size() == 1:
        return {}
    return {
        "fsdp": True,
        "fsdp_config": {
            "version": 2,
            "auto_wrap_policy": "TRANSFORMER_BASED_WRAP",
            "reshard_after_forward": cfg.distributed.reshard_after_forward,
            "state_dict_type": "FULL_STATE_DICT",
        },
    }


def check_strategy(cfg: TrainConfig) -> None:
    """FSDP needs GPUs; asked for in a single process it is ignored, and said."""
    if fsdp_arguments(cfg) and not ranks.cuda_available():
        raise ConfigError(
            "distributed.strategy=fsdp needs GPUs: accelerate (which the Trainer uses) applies FSDP on "
            "accelerators only, and on CPU would silently fall back to DDP. Use distributed.strategy="
            "ddp on CPU (the mgpo optimizers themselves also run under FSDP on CPU, see "
            "docs/distributed.md)."
        )
    if cfg.distributed.strategy == "fsdp" and ranks.world_size() == 1:  # fsdp_arguments is empty: said
        print(
            "mgpo: distributed.strategy=fsdp is ignored in a single process: this run "
            "trains the whole model in one process. Launch it with torchrun --nproc_per_node N (docs/"
            "distributed.md) to shard.",
            flush=True,
        )


def check_evaluations(cfg: TrainConfig, total_steps: int) -> None:
    """A best checkpoint or early stop needs an evaluation (and, for the checkpoint, a save) before the end."""
    t = cfg.training
    if t.load_best_model:
        check(
            t.save_steps <= total_steps,
            "training.save_steps",
            t.save_steps,
            f"training.load_best_model=true picks among checkpoints saved during training, and this run has "
            f"{total_steps} optimizer steps; use training.eval_steps and training.save_steps <= {total_steps}",
            ConfigError,
        )
    if t.early_stopping_patience:
        check(
            t.eval_steps <= total_steps,
            "training.eval_steps",
            t.eval_steps,
            f"early stopping needs evaluations during training, and this run has {total_steps} optimizer "
            f"steps; use training.eval_steps <= {total_steps}",
            ConfigError,
        )


def _check_arguments(cfg: TrainConfig, has_eval: bool) -> None:
    t = cfg.training
    best = t.load_best_model or t.early_stopping_patience > 0
    if best and not has_eval:
        name = "load_best_model" if t.load_best_model else "early_stopping_patience"
        raise ConfigError(
            f"training.{name} needs a validation split, and data {cfg.data.name!r} has none: set "
            "data.max_eval_examples (causal-lm: that many rows are held out of the training data), "
            "or give data with a test split."
        )
    if t.mixed_precision == "fp16" and not ranks.cuda_available():
        raise ValueError(
            "training.mixed_precision='fp16' needs a GPU (its loss scaling is CUDA's); on CPU use "
            "training.mixed_precision=bf16 or no."
        )


def training_arguments(cfg: TrainConfig, out: Path, has_eval: bool) -> TrainingArguments:
    """The config as :class:`PerturbationTrainingArguments` (saved with each checkpoint in training_args.bin)."""
    from mgpo.integrations.arguments import PerturbationTrainingArguments, arguments_from_config

    _check_arguments(cfg, has_eval)
    t = cfg.training
    eval_every = t.eval_steps > 0 and has_eval
    best = t.load_best_model or t.early_stopping_patience > 0
    return arguments_from_config(
        PerturbationTrainingArguments,
        cfg.perturbation,
        output_dir=str(out / "checkpoints"),
        per_device_train_batch_size=t.batch_size,
        per_device_eval_batch_size=t.eval_batch_size,
        gradient_accumulation_steps=t.grad_accum,
        learning_rate=t.lr,
        weight_decay=t.weight_decay,
        warmup_steps=t.warmup_ratio,  # transformers 5: a float in [0, 1) is a ratio of the total steps
        lr_scheduler_type=t.lr_scheduler,
        num_train_epochs=t.epochs,
        max_steps=t.max_steps if t.max_steps > 0 else -1,  # 0 means epochs, as the help says (HF: -1)
        max_grad_norm=t.max_grad_norm,
        logging_steps=t.logging_steps,
        report_to="none",  # TensorBoard is added by train() with its folder set explicitly
        save_strategy="steps",
        save_steps=t.save_steps,
        save_total_limit=2,
        eval_strategy="steps" if eval_every else "no",
        eval_steps=t.eval_steps if eval_every else None,
        load_best_model_at_end=t.load_best_model,
        metric_for_best_model="eval_loss" if best else None,  # early stopping compares through it as well
        greater_is_better=False if best else None,
        # a resumed run's early stopping counts on from the checkpoint's patience counter (HF's default restarts it
        # at 0, so a run resumed mid-way stopped later than the same run uninterrupted)
        restore_callback_states_from_checkpoint=t.early_stopping_patience > 0,
        seed=t.seed,
        data_seed=t.seed,
        disable_tqdm=True,  # train() chooses the progress display
        dataloader_num_workers=0,
        use_cpu=not ranks.cuda_available(),
        optim=t.optim,
        loraplus_lr_ratio=cfg.adapter.loraplus_lr_ratio if cfg.adapter.method == "loraplus" else None,
        bf16=t.mixed_precision == "bf16",
        fp16=t.mixed_precision == "fp16",
        **_checkpointing_arguments(t.gradient_checkpointing),
        **fsdp_arguments(cfg),
    )


def _checkpointing_arguments(on: bool) -> dict:
    """Activation checkpointing for TrainingArguments. transformers 5 renamed gradient_checkpointing(_kwargs) to
    activation_checkpointing(_kwargs), and the old names raise a FutureWarning on every run, even when off; an
    earlier 5.x has only the old names."""
    name = "activation_checkpointing"
    if name not in TrainingArguments.__dataclass_fields__:
        name = "gradient_checkpointing"
    return {name: on, f"{name}_kwargs": {"use_reentrant": False} if on else None}
