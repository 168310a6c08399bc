"""``mgpo train``: fine-tune a pretrained model with a LoRA variant and an optimizer of the mgpo family.

One plain function, :func:`train`, drives the HF Trainer (through :class:`PerturbationTrainer`) and writes into
``training.output_dir``:

- ``config.yaml``            the resolved configuration
- ``log.jsonl``, ``log.csv`` one row per logged step (loss, clean_loss, learning rate, grad norm, perturbation
                             statistics)
- ``tensorboard/``           TensorBoard events
- ``checkpoints/``           Trainer checkpoints (model, optimizer with its full perturbation state, RNG);
                             ``--resume`` continues from the newest complete one (mgpo.pipelines.checkpoints)
- ``adapter/``               the trained adapter (PEFT ``save_pretrained``, safetensors)
- ``metrics.json``           validation and test metrics (and generation metrics for causal-lm)
- ``loss.png``               the training loss curves: clean (probe) and as trained

Two training losses are logged. ``loss`` is what the training forwards returned, averaged over the steps since
the last log: for MGPO, MSAM and the noise methods (random, ggpo) the loss at the perturbed weights (MGPO's
perturbation is a look-ahead along the update, so it is lower than the clean loss), for SAM its first, clean
pass, for plain AdamW the clean loss (all in train mode, dropout on). ``clean_loss`` (every
``training.clean_loss_every`` steps) is the mean loss of a fixed probe set of ``training.clean_loss_examples``
training examples at the clean weights, in eval mode without gradients, the same measurement for every method.
``metrics.json`` has both: ``final_loss``/``best_loss`` (the loss the steps saw) and ``final_clean_loss``/
``best_clean_loss``.

Under ``torchrun --nproc_per_node N -m mgpo train ...`` (or ``accelerate launch``) every process trains its share
(``distributed.strategy``: DDP or FSDP2) and only rank 0 writes these files; checkpoints hold what every rank
needs (docs/distributed.md).
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path
from typing import Any

from transformers import EarlyStoppingCallback, PrinterCallback, set_seed

from mgpo.pipelines import predictions, ranks
from mgpo.pipelines.callbacks import (
    DivergenceStop,
    GracefulStop,
    PlainProgress,
    QuietProgress,
    RunTensorBoard,
    StepLog,
    WallClock,
    _agree_max,
    _cpu_group,
)
from mgpo.pipelines.checkpoints import write_json
from mgpo.pipelines.config import TrainConfig, to_yaml, unusable_folder
from mgpo.pipelines.prepare import (
    PreparedTask,
    _describe_data,
    _encode_classification,
    _label_names,
    _load_classification,
    classification_metrics,
    clean_loss_every,
    clean_loss_probe,
    grad_batches,
    prepare_task,
    task_metrics_after,
)
from mgpo.pipelines.ranks import process_rank, world_size
from mgpo.pipelines.resume import (
    _saved_patience,
    check_resumed_config,
    evaluate_from,
    refuse_finished_under_fsdp,
    start_checkpoint,
    trained_to_the_end,
)
from mgpo.pipelines.runlog import (
    END_OF_RUN_KEYS,
    LOG_FIELDS,
    PERTURBED_FORWARD,
    _end_of_run,
    as_trained_label,
    final_losses,
    read_log,
)
from mgpo.pipelines.training_args import (
    _checkpointing_arguments,
    check_evaluations,
    check_strategy,
    fsdp_arguments,
    total_optimizer_steps,
    training_arguments,
)

# Names this module held before it was split by concern, kept importable from here.
_grad_batches, _check_evaluations = grad_batches, check_evaluations
__all__ = [
    "DivergenceStop",
    "END_OF_RUN_KEYS",
    "GracefulStop",
    "LOG_FIELDS",
    "PERTURBED_FORWARD",
    "PlainProgress",
    "PreparedTask",
    "QuietProgress",
    "RunTensorBoard",
    "StepLog",
    "TrainingDiverged",
    "WallClock",
    "_agree_max",
    "_checkpointing_arguments",
    "_cpu_group",
    "_describe_data",
    "_encode_classification",
    "_end_of_run",
    "_label_names",
    "_load_classification",
    "_saved_patience",
    "as_trained_label",
    "best_model_metrics",
    "classification_metrics",
    "clean_loss_every",
    "clean_loss_probe",
    "cost_metrics",
    "evaluate_from",
    "fsdp_arguments",
    "process_rank",
    "read_log",
    "start_checkpoint",
    "total_optimizer_steps",
    "train",
    "trained_to_the_end",
    "training_arguments",
    "world_size",
]


class TrainingDiverged(RuntimeError):
    """Training produced non-finite weights, or more non-finite steps than ``training.max_skipped_steps``."""


def train(cfg: TrainConfig, *, resume: bool = False, restart: bool = False) -> dict:
    """Run one fine-tuning job end to end; returns the metrics written to ``metrics.json``.

    Interrupted by SIGINT/SIGTERM, it writes a checkpoint and returns ``{"interrupted": True, "signal": N, ...}``.
    A run whose weights become non-finite (or that skips more than ``training.max_skipped_steps`` non-finite steps)
    stops without saving them and raises :class:`TrainingDiverged`, naming the step and the last good checkpoint.
    A start that fails before training begins removes the folder it created.
    """
    out = Path(cfg.training.output_dir)
    created = not out.exists()
    started: list[bool] = []  # set once trainer.train() has begun: from then on the folder holds a run
    try:
        return _train(cfg, out, resume=resume, restart=restart, started=started)
    except BaseException:
        if created and not started and ranks.process_rank() == 0 and out.is_dir():
            import shutil

            shutil.rmtree(out, ignore_errors=True)
        raise


def _train(cfg: TrainConfig, out: Path, *, resume: bool, restart: bool, started: list) -> dict:
    """The session in order: where it starts, the task's data, the trainer, training, the results."""
    main = ranks.process_rank() == 0  # only rank 0 writes files
    check_strategy(cfg)
    checkpoint = start_checkpoint(out, resume=resume, restart=restart, main=main)
    check_resumed_config(cfg, out, checkpoint, main=main)
    _write_config(cfg, out, main)
    set_seed(cfg.training.seed)
    clock = WallClock(checkpoint)
    prepared = prepare_task(cfg, out, main=main)
    total_steps = total_optimizer_steps(cfg, len(prepared.splits["train"]))
    probe = clean_loss_probe(cfg, prepared.splits["train"])
    check_evaluations(cfg, total_steps)
    refuse_finished_under_fsdp(checkpoint, total_steps, bool(fsdp_arguments(cfg)))
    if checkpoint and main and not trained_to_the_end(checkpoint, total_steps):
        _supersede_results(out)
    trainer = _build_trainer(cfg, out, prepared, total_steps, probe, clock, main)
    train_started = time.time()
    started.append(True)
    stopper, divergence = _callback(trainer, GracefulStop), _callback(trainer, DivergenceStop)
    _run(trainer, checkpoint, total_steps, stopper, main)
    if divergence.diverged:
        raise TrainingDiverged(divergence.message(cfg, out))
    cost = cost_metrics(trainer, checkpoint, time.time() - train_started)
    if stopper.stopped:
        return {"interrupted": True, "step": trainer.state.global_step, "signal": stopper.signal}
    return _finish(cfg, out, trainer, prepared, cost, clock, main)


def _supersede_results(out: Path) -> None:
    """A finished run resumed to train further (a longer training.max_steps) is no finished run until this session
    ends: its earlier metrics.json, which sweeps and reports read as "done", is moved aside (the new one replaces
    its predictions and answers files when it is written)."""
    old = out / "metrics.json"
    if old.is_file():
        old.replace(out / "metrics.superseded.json")
        print(
            "mgpo: this run had finished, and trains further now: its earlier metrics.json is moved to "
            "metrics.superseded.json, and the run counts as unfinished until this session writes its results",
            flush=True,
        )


def _write_config(cfg: TrainConfig, out: Path, main: bool) -> None:
    """The run folder and its config.yaml (rank 0 writes it)."""
    try:  # a path through a file, an existing file, a folder we may not write to: the field and the fix, no traceback
        out.mkdir(parents=True, exist_ok=True)
        if main:
            (out / "config.yaml").write_text(to_yaml(cfg))
    except OSError as err:
        raise unusable_folder(out, "training.output_dir", err) from None


def _build_trainer(
    cfg: TrainConfig, out: Path, prepared: PreparedTask, total_steps: int, probe: Any, clock: WallClock, main: bool
) -> Any:
    """The adapter on the model, and the PerturbationTrainer with the pipeline's callbacks."""
    from mgpo.integrations.peft_variants import apply_adapter
    from mgpo.integrations.trainer import PerturbationTrainer

    batches = grad_batches(prepared.splits["train"], prepared.collator, cfg.training.batch_size)
    model = apply_adapter(
        prepared.model, cfg.adapter, task=cfg.data.task, total_steps=total_steps, grad_batches=batches
    )
    eval_split = prepared.splits.get("validation")
    metrics = prepared.compute_metrics
    trainer = PerturbationTrainer(
        model=model,
        args=training_arguments(cfg, out, eval_split is not None),
        perturbation=cfg.perturbation,
        adapter=cfg.adapter,
        train_dataset=prepared.splits["train"],
        eval_dataset=eval_split,
        data_collator=prepared.collator,
        compute_metrics=metrics,
        preprocess_logits_for_metrics=getattr(metrics, "preprocess", None),
        callbacks=[
            StepLog(out),
            GracefulStop(),
            clock,
            RunTensorBoard(out / "tensorboard", out / "log.jsonl"),
            DivergenceStop(cfg.training.max_skipped_steps),
        ],
        clean_loss_probe=probe,
        clean_loss_every=clean_loss_every(cfg),
    )
    if cfg.training.early_stopping_patience:
        trainer.add_callback(EarlyStoppingCallback(early_stopping_patience=cfg.training.early_stopping_patience))
    trainer.remove_callback(PrinterCallback)  # Hugging Face's printed log dicts: the numbers are in log.jsonl
    if cfg.training.progress and main:
        trainer.add_callback(QuietProgress() if sys.stdout.isatty() else PlainProgress())
    _callback(trainer, DivergenceStop).trainer = trainer
    return trainer


def _callback(trainer: Any, kind: type) -> Any:
    return next(cb for cb in trainer.callback_handler.callbacks if isinstance(cb, kind))


def _run(trainer: Any, checkpoint: str | None, total_steps: int, stopper: GracefulStop, main: bool) -> None:
    """Train (or evaluate a finished run from its checkpoint); every rank leaves together."""
    try:
        if trained_to_the_end(checkpoint, total_steps):  # (refused above under FSDP)
            evaluate_from(trainer, checkpoint)
        else:
            trainer.train(resume_from_checkpoint=checkpoint)
        if stopper.stopped and main:  # before the barrier: once a rank exits 130, torchrun stops the others
            print(
                f"mgpo: interrupted at step {trainer.state.global_step}; checkpoint written. Continue with "
                f"the same command and --resume.",
                flush=True,
            )
        # every rank waits until rank 0 has finished writing the last checkpoint: a rank that exited first
        # would have torchrun kill rank 0 in the middle of it
        trainer.accelerator.wait_for_everyone()
    finally:
        stopper.restore()


def _finish(
    cfg: TrainConfig, out: Path, trainer: Any, prepared: PreparedTask, cost: dict, clock: WallClock, main: bool
) -> dict:
    """Evaluations, the adapter, metrics.json and loss.png (rank 0 writes them)."""
    from mgpo.pipelines.plots import plot_loss_curves

    early = trainer.pop_callback(EarlyStoppingCallback)  # None when off; it would warn at every evaluate() below
    metrics: dict = {
        "steps": trainer.state.global_step,
        **prepared.info,
        **cost,
        **best_model_metrics(cfg, trainer, early, out),
    }
    # only where there are metrics to compute: a causal LM has none, and with any compute_metrics the Trainer keeps
    # every token's logits of the split (1000 arithmetic problems x 128 tokens x SmolLM2's 49152: 25 GB, OOM)
    recorder = None
    if trainer.compute_metrics is not None:
        recorder = trainer.compute_metrics = predictions.PredictionRecorder(trainer.compute_metrics)
    for split in ("validation", "test"):
        if prepared.splits.get(split) is not None:
            metrics.update(trainer.evaluate(prepared.splits[split], metric_key_prefix=split))
            if split == "test" and main and recorder is not None and recorder.last is not None:  # per example
                predictions.write(out, cfg.data.task, *recorder.last)
    fsdp = bool(fsdp_arguments(cfg))
    metrics.update(task_metrics_after(cfg, prepared, trainer.model, out, main=main, fsdp=fsdp))
    # FSDP: the sharded weights are gathered whole (every rank takes part); DDP: trainer.model is the plain model
    state = trainer.accelerator.get_state_dict(trainer.model) if fsdp else None
    if not main:
        return metrics
    trainer.model.save_pretrained(str(out / "adapter"), **({"state_dict": state} if fsdp else {}))
    prepared.tokenizer.save_pretrained(str(out / "adapter"))
    if not (out / "adapter" / "config.json").exists():  # the base model's config: id2label/label2id, head size
        trainer.model.config.save_pretrained(str(out / "adapter"))
    metrics.update(final_losses(read_log(out / "log.jsonl")))
    metrics["wall_time_s"] = round(clock.elapsed(), 1)  # all sessions of the run, resumed ones included
    write_json(out / "metrics.json", metrics)
    method = cfg.perturbation.resolved().method  # a preset names its method (perturbation.preset=lora: adamw)
    plot_loss_curves(
        {method: out / "log.jsonl"},
        out / "loss.png",
        title=f"{cfg.model.name} on {cfg.data.name}",
        as_trained=as_trained_label(method),
    )
    return metrics


def best_model_metrics(cfg: TrainConfig, trainer, early: EarlyStoppingCallback | None, out: Path) -> dict:
    """Which checkpoint was loaded as the best (load_best_model), and whether early stopping ended the run."""
    t, state = cfg.training, trainer.state
    found: dict[str, Any] = {}
    if t.load_best_model:
        best = state.best_model_checkpoint  # None: no checkpoint was saved at an evaluation
        found["best_checkpoint"] = os.path.relpath(best, out) if best else None
    if early is not None:
        found["stopped_early"] = early.early_stopping_patience_counter >= early.early_stopping_patience
    if state.is_world_process_zero:
        if found.get("stopped_early"):
            print(
                f"mgpo: stopped early at step {state.global_step} of {state.max_steps}: no lower validation "
                f"loss in {t.early_stopping_patience} evaluation(s)",
                flush=True,
            )
        if found.get("best_checkpoint"):
            print(
                f"mgpo: loaded the checkpoint with the lowest validation loss, {found['best_checkpoint']}", flush=True
            )
    return found


def cost_metrics(trainer, checkpoint: str | None, train_seconds: float) -> dict:
    """What a run costs (the report's cost table): parameters, peak memory, seconds per optimizer step.

    ``time_per_step_s`` is the wall time of ``trainer.train`` (checkpoint writes and periodic evaluation
    included) over the steps run in this invocation (after a ``--resume``, only the resumed part).
    ``peak_memory_mb``: ``torch.cuda.max_memory_allocated`` on a GPU, else the process's peak resident set size.
    Both None when the invocation trained no step (``--resume`` of a run whose training had finished).
    ``load_average`` (1, 5, 15 min, at the end) and ``cpus``: how busy the machine was, since wall time per step
    also counts the time other processes held the cores.
    """
    import resource

    import torch

    first = int(checkpoint.rstrip("/").rsplit("-", 1)[1]) if checkpoint else 0
    steps_run = trainer.state.global_step - first
    if torch.cuda.is_available():
        peak_mb, source = torch.cuda.max_memory_allocated() / 2**20, "cuda_max_allocated"
    else:  # ru_maxrss is in KiB on Linux
        peak_mb, source = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "cpu_peak_rss"
    params = list(trainer.model.parameters())
    return {
        "trainable_params": sum(p.numel() for p in params if p.requires_grad),
        "total_params": sum(p.numel() for p in params),
        # a session that trained no step (resumed after its training had finished) measured no training
        "peak_memory_mb": round(peak_mb, 1) if steps_run > 0 else None,
        "peak_memory_source": source if steps_run > 0 else None,
        "time_per_step_s": round(train_seconds / steps_run, 4) if steps_run > 0 else None,
        "steps_timed": steps_run,  # fewer than the run's steps after a --resume: timed over its last session only
        "load_average": [round(x, 2) for x in os.getloadavg()] if hasattr(os, "getloadavg") else None,
        "cpus": os.cpu_count(),
    }
