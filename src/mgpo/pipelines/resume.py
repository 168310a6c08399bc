"""``--resume`` and ``--restart``: which checkpoint a session starts from, what a resumed run may change, and
how a run whose training had finished is evaluated from its checkpoint without training a step."""

from __future__ import annotations

import json
import math
import warnings
from pathlib import Path
from typing import Any, TypeGuard

from mgpo.pipelines import ranks
from mgpo.pipelines.checkpoints import newest_complete, remove_run, rng_mismatch, set_aside
from mgpo.pipelines.config import ConfigError, TrainConfig, changed_fields, said


def start_checkpoint(out: Path, *, resume: bool, restart: bool, main: bool) -> str | None:
    """The checkpoint this session starts from (None: a fresh start), after refusing to overwrite a run.

    ``--resume`` takes the newest *complete* checkpoint; newer ones that are not (a kill during a save) are moved
    aside with one line each. ``--restart`` removes what an earlier run wrote into ``out`` and starts afresh."""
    folder = out / "checkpoints"
    if resume and restart:
        raise ConfigError(
            "--resume and --restart contradict each other: --resume continues the run in "
            f"{out}, --restart discards it. Pass one."
        )
    if restart:
        removed = remove_run(out) if main and out.is_dir() else []
        if removed:
            print(f"mgpo: --restart: removed {', '.join(removed)} from {out}", flush=True)
        return None
    if not resume:
        if folder.is_dir() and any(folder.iterdir()):
            raise FileExistsError(
                f"{out} already holds a run: pass --resume to continue it, --restart to discard "
                "it and start over, or choose another training.output_dir."
            )
        return None
    found, bad = newest_complete(folder)
    if found is None:
        listed = "; ".join(f"{c.name}: {problem}" for c, problem in bad) or "none was written"
        raise FileNotFoundError(
            f"--resume: no complete checkpoint under {folder} ({listed}). Start over with "
            "--restart (removes this run's files), or run without --resume in another "
            "training.output_dir (checkpoints are written every training.save_steps steps)."
        )
    for c, problem in bad:
        if main:  # one process moves them; every rank has already chosen the same complete checkpoint
            moved = set_aside(c)
            print(
                f"mgpo: skipping {c.name}: {problem}; moved to {moved.relative_to(out)} (delete it when you no "
                "longer need it)",
                flush=True,
            )
    if main:
        print(f"mgpo: resuming from {found.name} in {folder}", flush=True)
        mismatch = rng_mismatch(found, ranks.world_size())
        if mismatch:
            warnings.warn(mismatch, RuntimeWarning, stacklevel=2)
    return str(found)


def check_resumed_config(cfg: TrainConfig, out: Path, checkpoint: str | None, *, main: bool) -> None:
    """A resumed run keeps the configuration it started with; only its length (training.max_steps or
    training.epochs) may change, and that is said."""
    changes = changed_fields(out / "config.yaml", cfg) if checkpoint and (out / "config.yaml").is_file() else {}
    length = {k: v for k, v in changes.items() if k in ("training.max_steps", "training.epochs")}
    if len(changes) > len(length):
        raise ConfigError(
            f"--resume: {out} holds a run with another configuration "
            f"({said({k: v for k, v in changes.items() if k not in length})}). Resume it with the "
            "configuration it started with (only its length, training.max_steps or training.epochs, "
            "may change), or start over with --restart."
        )
    if length and main:  # training longer (or shorter) than planned: said, and recorded in config.yaml
        print(
            f"mgpo: --resume with a new length ({said(length)}): the learning-rate schedule follows the "
            "new length from the checkpoint on.",
            flush=True,
        )


def trained_to_the_end(checkpoint: str | None, total_steps: int) -> TypeGuard[str]:
    """Whether ``checkpoint`` holds the whole training (a session stopped, or killed, in the evaluation after it):
    saved at the last step, or where early stopping ended the run."""
    if checkpoint is None:
        return False
    state = json.loads((Path(checkpoint) / "trainer_state.json").read_text())
    counter, patience = _saved_patience(state)
    return state.get("global_step", 0) >= total_steps or counter >= patience


def refuse_finished_under_fsdp(checkpoint: str | None, total_steps: int, fsdp: bool) -> None:
    """evaluate_from() loads the checkpoint into a model the Trainer has not sharded yet; train() would run one
    step past the end (its loop checks the limit after a step) and log, save and count it."""
    if fsdp and trained_to_the_end(checkpoint, total_steps):
        raise ConfigError(
            f"--resume: {checkpoint} holds the whole training of this run (the session that wrote it "
            "stopped in the evaluation after it). Evaluating a finished run from its checkpoint is not "
            "supported under distributed.strategy=fsdp: resuming would train a step past the end. Start "
            "over with --restart."
        )


def _saved_patience(state: Any) -> tuple[int, float]:
    """Early stopping's (counter, patience) as a checkpoint's trainer state saved them; (0, inf) without it."""
    saved = (state.get("stateful_callbacks") if isinstance(state, dict) else state.stateful_callbacks) or {}
    early = saved.get("EarlyStoppingCallback")
    early = early if isinstance(early, dict) else {}
    return (
        early.get("attributes", {}).get("early_stopping_patience_counter", 0),
        early.get("args", {}).get("early_stopping_patience", math.inf),
    )


def evaluate_from(trainer: Any, checkpoint: str) -> None:
    """Resume a run whose training had finished: the checkpoint's weights and state, and no training step.
    ``trainer.train(resume_from_checkpoint=...)`` would train one step past max_steps (its loop checks the limit
    after a step), and log, save and count it. The session's start and end run as for a training session: the
    log is cut to the checkpoint's rows, and with load_best_model the best checkpoint is loaded."""
    from transformers import EarlyStoppingCallback, TrainerState

    from mgpo.integrations import hf_private
    from mgpo.pipelines.callbacks import StepLog
    from mgpo.pipelines.runlog import read_log

    hf_private.load_checkpoint_weights(trainer, checkpoint)
    trainer.state = TrainerState.load_from_json(str(Path(checkpoint) / "trainer_state.json"))
    trainer.state.is_local_process_zero = trainer.is_local_process_zero()
    trainer.state.is_world_process_zero = trainer.is_world_process_zero()
    handler, args = trainer.callback_handler, trainer.args
    counter, _ = _saved_patience(trainer.state)
    for cb in handler.callbacks:  # metrics.json's stopped_early reads it
        if isinstance(cb, EarlyStoppingCallback):
            cb.early_stopping_patience_counter = counter
    log = next((cb.jsonl for cb in handler.callbacks if isinstance(cb, StepLog)), None)
    summary = [r for r in read_log(log) if "train_runtime" in r] if log is not None else []
    trainer.control = handler.on_train_begin(args, trainer.state, trainer.control)  # drops end-of-run rows
    for row in summary[-1:]:  # the training's own summary row, which no session writes again
        trainer.log({k: v for k, v in row.items() if k not in ("step", "epoch")})
    if args.load_best_model_at_end and trainer.state.best_model_checkpoint is not None:
        hf_private.load_best_model(trainer)
    trainer.control = handler.on_train_end(args, trainer.state, trainer.control)
