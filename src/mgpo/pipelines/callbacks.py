"""The train pipeline's Trainer callbacks: the run log, Ctrl-C / SIGTERM, wall time, progress lines,
TensorBoard without duplicated points, and the divergence stop. All are public ``TrainerCallback`` subclasses;
what they need from inside transformers goes through :mod:`mgpo.integrations.hf_private`."""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path
from typing import Any

from transformers import ProgressCallback, TrainerCallback
from transformers.integrations import TensorBoardCallback

from mgpo.integrations.hf_private import tensorboard_writer_class
from mgpo.pipelines.checkpoints import WALL_TIME_FILE, newest_complete, write_json
from mgpo.pipelines.config import TrainConfig
from mgpo.pipelines.runlog import append_row, cut_log, numeric_row, read_log


class StepLog(TrainerCallback):
    """Appends each Trainer log line to ``log.jsonl`` and ``log.csv``. At the start of a session the log is
    rewritten (atomically) to the rows the checkpoint it starts from had seen, so no row is duplicated or lost."""

    def __init__(self, out: Path):
        self.jsonl, self.csv = out / "log.jsonl", out / "log.csv"

    def on_train_begin(self, args, state, control, **kwargs):
        if not state.is_world_process_zero:  # one writer
            return
        cut_log(self.jsonl, self.csv, state.global_step)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not state.is_world_process_zero:
            return
        append_row(self.jsonl, self.csv, numeric_row(state.global_step, logs))


class GracefulStop(TrainerCallback):
    """Ctrl-C / SIGTERM: finish the current step, write a checkpoint, stop. ``--resume`` continues from it.
    A second Ctrl-C stops at once (the last periodic checkpoint is then the one to resume from).

    On several processes a signal reaches one rank (``kill -INT``) or all (Ctrl-C in the terminal): at the end of
    every step the ranks all-reduce (max) the signal number each has seen so far, and all stop at the same step
    on that agreed value alone. A signal that lands after a rank's contribution is picked up at the next step,
    by every rank together, so no rank can stop while another trains on (and waits for it forever)."""

    def __init__(self) -> None:
        self.requested = False
        self.signal: int | None = None  # the signal that asked to stop (this rank, or any rank once agreed)
        self.stopped = False  # training was stopped by a signal, on every rank at the same step
        self._previous: dict[int, Any] = {}
        self._group = None  # the process group of the stop flag (None: one process)

    def _handler(self, signum: int, frame: Any) -> None:
        # Under torchrun a Ctrl-C reaches every worker twice: from the terminal and forwarded by torchrun, which
        # kills the workers itself 30 s later. There a repeat is not "stop at once"; elsewhere it is.
        if self.requested and "TORCHELASTIC_RUN_ID" not in os.environ:
            raise KeyboardInterrupt
        if self.requested:
            return
        self.requested = True
        self.signal = signum
        if "TORCHELASTIC_RUN_ID" in os.environ:
            again = "torchrun stops the workers 30 s after a Ctrl-C"
        else:
            again = (
                "Ctrl-C" if signum == signal.SIGINT else f"{signal.Signals(signum).name} or Ctrl-C"
            ) + " again to stop at once"
        print(f"\nmgpo: stopping after this step and writing a checkpoint ({again})...", flush=True)

    def on_train_begin(self, args, state, control, **kwargs):
        self._group = _cpu_group()
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                self._previous[sig] = signal.signal(sig, self._handler)
            except ValueError:  # not the main thread: leave signals alone
                pass

    def on_step_end(self, args, state, control, **kwargs):
        agreed = self._agree(self.signal or 0)  # decided on the agreed value only, never on a local flag
        if agreed:
            self.requested, self.signal, self.stopped = True, agreed, True
            control.should_save = True
            control.should_training_stop = True

    def _agree(self, value: int) -> int:
        """The largest signal number any rank has seen (``value`` itself in a single process)."""
        return _agree_max(self._group, value)[0]

    def on_train_end(self, args, state, control, **kwargs):
        self.restore()

    def restore(self) -> None:
        """Put the previous handlers back (also called when training raises)."""
        while self._previous:
            sig, handler = self._previous.popitem()
            signal.signal(sig, handler)


class WallClock(TrainerCallback):
    """Wall time of a run over all its sessions: stored with each checkpoint, picked up again by --resume."""

    FILE = WALL_TIME_FILE  # a checkpoint without it is incomplete (mgpo.pipelines.checkpoints)

    def __init__(self, checkpoint: str | None):
        self.started = time.time()
        self.before = json.loads((Path(checkpoint) / self.FILE).read_text())["wall_time_s"] if checkpoint else 0.0

    def elapsed(self) -> float:
        return self.before + time.time() - self.started

    def on_save(self, args, state, control, **kwargs):
        folder = Path(args.output_dir) / f"checkpoint-{state.global_step}"
        if state.is_world_process_zero and folder.is_dir():
            write_json(folder / self.FILE, {"wall_time_s": self.elapsed()})


class QuietProgress(ProgressCallback):
    """tqdm bars on a terminal, without the log dicts Hugging Face prints under them (they are in log.jsonl)."""

    def on_log(self, args, state, control, logs=None, **kwargs):
        pass


class PlainProgress(TrainerCallback):
    """Output to a file or a pipe: one plain line per ~5% of the steps (and the last) instead of carriage-return
    bars. A line shows the loss of its own step when that step is logged (the Trainer logs after ``on_step_end``,
    so such a line waits for ``on_log``), and no loss otherwise."""

    def __init__(self) -> None:
        self.started = time.time()
        self.waiting: int | None = None  # a due step whose line waits for its log row

    def on_step_end(self, args, state, control, **kwargs):
        if not state.is_world_process_zero:
            return
        every = max(1, state.max_steps // 20)
        if state.global_step % every and state.global_step < state.max_steps:
            return
        if control.should_log:  # set by the Trainer's flow callback before ours run
            self.waiting = state.global_step
        else:
            self._print(state, "")

    def on_log(self, args, state, control, logs=None, **kwargs):
        if self.waiting == state.global_step and "loss" in (logs or {}):
            self.waiting = None
            self._print(state, f", loss {logs['loss']:.4f}")

    def _print(self, state: Any, loss: str) -> None:
        print(f"mgpo: step {state.global_step}/{state.max_steps}{loss}, {time.time() - self.started:.0f}s", flush=True)


class RunTensorBoard(TensorBoardCallback):
    """TensorBoard events in ``folder``, with no duplicated point after kills and resumes.

    A session that starts at step N over earlier event files opens its writer with ``purge_step=N``: TensorBoard
    then ignores every earlier point at a step >= N (a killed session's points past its checkpoint, and its
    end-of-run summary). The rows of step N itself that the log kept are written again, so the events end up
    holding what ``log.jsonl`` holds."""

    def __init__(self, folder: Path, log: Path):
        super().__init__()
        self.logging_dir = str(folder)  # instead of the TENSORBOARD_LOGGING_DIR variable (process-wide)
        self.log = log

    def on_train_begin(self, args, state, control, **kwargs):
        folder = Path(self.logging_dir)
        if not state.is_world_process_zero or self.tb_writer is not None or not any(folder.glob("events.*")):
            return super().on_train_begin(args, state, control, **kwargs)
        writer = tensorboard_writer_class(self)
        self.tb_writer = writer(log_dir=self.logging_dir, purge_step=state.global_step)
        for row in read_log(self.log):  # StepLog (an earlier callback) has already cut the log to this step
            if row.get("step") == state.global_step:
                self.on_log(args, state, control, logs={k: v for k, v in row.items() if k != "step"})


class DivergenceStop(TrainerCallback):
    """Ends a run whose training diverged, before a checkpoint, evaluation or log of the diverged weights.

    At the end of every step: the trainable weights must be finite, and the steps that were non-finite (a NaN/Inf
    training loss, counted by the trainer's ``nonfinite_losses``, or a step the perturbation optimizer skipped for
    a non-finite gradient, counted by its ``skipped_steps``) must not pass ``patience``. Plain AdamW cannot skip:
    a non-finite gradient reaches its weights and stops the run at that step. Every rank takes the same decision
    (the values are all-reduced), so no rank stops while another trains on."""

    def __init__(self, patience: int):
        self.patience = patience
        self.trainer: Any = None  # the PerturbationTrainer, for its nonfinite_losses counter
        self.diverged: tuple[int, str] | None = None  # (step, why)
        self.bad_steps = 0
        self._seen = (0, 0)  # (non-finite losses, skipped steps) at the end of the last step
        self._group = None

    def on_train_begin(self, args, state, control, optimizer=None, **kwargs):
        self._group = _cpu_group()
        self._seen = (0, _skipped_steps(optimizer))  # a resumed optimizer brings its earlier sessions' skips

    def on_step_end(self, args, state, control, model=None, optimizer=None, **kwargs):
        losses = int(self.trainer.nonfinite_losses) if self.trainer is not None else 0
        weights_bad, losses, skipped = _agree_max(self._group, _weights_bad(model), losses, _skipped_steps(optimizer))
        self.bad_steps += (losses, skipped) != self._seen
        self._seen = (losses, skipped)
        if weights_bad:
            why = "the trainable weights hold NaN/Inf (a non-finite gradient reached them)"
        elif self.bad_steps > self.patience:
            why = (
                f"{self.bad_steps} steps had a non-finite (NaN/Inf) loss or gradient, more than "
                f"training.max_skipped_steps={self.patience}"
            )
        else:
            return
        self.diverged = (state.global_step, why)
        control.should_training_stop = True
        control.should_save = control.should_evaluate = False

    def message(self, cfg: TrainConfig, out: Path) -> str:
        assert self.diverged is not None  # asked only of a run that diverged
        step, why = self.diverged
        found, _ = newest_complete(out / "checkpoints")
        last = (
            f"the last good checkpoint, {found.relative_to(out)}, is kept (--resume continues from it)"
            if found is not None
            else "no checkpoint was written before it"
        )
        return (
            f"training diverged at step {step}: {why}. Nothing was saved from the diverged weights; {last}. "
            f"Lower training.lr (now {cfg.training.lr:g}) and rerun with --restart, or raise "
            "training.max_skipped_steps if a few non-finite steps are expected."
        )


def _skipped_steps(optimizer: Any) -> int:
    """The steps the perturbation optimizer skipped for a non-finite gradient (0 for a plain optimizer)."""
    from mgpo.integrations.trainer import unwrap_optimizer
    from mgpo.optim._base import PerturbedOptimizer

    opt = unwrap_optimizer(optimizer)
    return opt.skipped_steps if isinstance(opt, PerturbedOptimizer) else 0


def _weights_bad(model: Any) -> int:
    """1 if a trainable weight holds NaN/Inf, else 0: one host read per step (the only one DivergenceStop makes)."""
    import torch

    from mgpo.optim.distributed import local

    trainable = [local(p).detach() for p in model.parameters() if p.requires_grad] if model is not None else []
    return int(not torch.stack(torch._foreach_norm(trainable)).isfinite().all()) if trainable else 0


def _cpu_group() -> Any:
    """A gloo process group for small host-side agreements (None in a single process): agreeing never waits
    for a GPU's queued work. Every rank must call it, in the same order."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
        return None
    return dist.group.WORLD if dist.get_backend() == "gloo" else dist.new_group(backend="gloo")


def _agree_max(group: Any, *values: int) -> list[int]:
    """The largest of each value over the ranks (the values themselves in a single process)."""
    import torch
    import torch.distributed as dist

    if group is None:
        return list(values)
    flags = torch.tensor(values, dtype=torch.int64)
    dist.all_reduce(flags, op=dist.ReduceOp.MAX, group=group)
    return flags.tolist()
