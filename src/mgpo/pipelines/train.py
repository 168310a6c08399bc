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

import csv
import io
import json
import math
import os
import signal
import sys
import time
import warnings
from pathlib import Path

import numpy as np
from transformers import (DataCollatorWithPadding, EarlyStoppingCallback, TrainerCallback, TrainingArguments,
                          set_seed)
from transformers.integrations import TensorBoardCallback
from transformers.trainer_callback import PrinterCallback, ProgressCallback

from mgpo.checks import check
from mgpo.pipelines.checkpoints import (WALL_TIME_FILE, newest_complete, remove_run, rng_mismatch, set_aside,
                                        write_atomic, write_json)
from mgpo.pipelines.config import ConfigError, TrainConfig, changed_fields, said, to_yaml, unusable_folder

def process_rank() -> int:
    """This process's rank under torchrun / accelerate launch (0 in a single process)."""
    return int(os.environ.get("RANK", "0"))


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


LOG_FIELDS = ("step", "epoch", "loss", "clean_loss", "learning_rate", "grad_norm", "perturbation_norm", "momentum_norm",
              "gbar_mean", "skipped_steps", "eval_loss")


# Keys of the rows logged once training is over (the Trainer's summary, the final evaluations): a resumed run
# logs them again, so a rewrite of the log drops them.
END_OF_RUN_KEYS = ("train_runtime", "validation_", "test_")


def _end_of_run(row: dict) -> bool:
    return any(k.startswith(END_OF_RUN_KEYS) for k in row)


class StepLog(TrainerCallback):
    """Appends each Trainer log line to ``log.jsonl`` and ``log.csv``. At the start of a session the log is
    rewritten (atomically) to the rows the checkpoint it starts from had seen, so no row is duplicated or lost."""

    def __init__(self, out: Path):
        self.jsonl, self.csv = out / "log.jsonl", out / "log.csv"

    def on_train_begin(self, args, state, control, **kwargs):
        if not state.is_world_process_zero:  # one writer
            return
        rows = read_log(self.jsonl)
        kept = [r for r in rows if r.get("step", 0) <= state.global_step and not _end_of_run(r)]
        write_atomic(self.jsonl, "".join(json.dumps(r) + "\n" for r in kept))
        table = io.StringIO()
        writer = csv.DictWriter(table, LOG_FIELDS, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(r for r in kept if any(k in r for k in LOG_FIELDS[2:]))
        write_atomic(self.csv, table.getvalue())

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not state.is_world_process_zero:
            return
        row = {"step": state.global_step, **{k: v for k, v in (logs or {}).items() if isinstance(v, (int, float))}}
        with self.jsonl.open("a") as f:
            f.write(json.dumps(row) + "\n")
        if any(k in row for k in LOG_FIELDS[2:]):  # the final summary and test metrics have no CSV column
            with self.csv.open("a", newline="") as f:
                csv.DictWriter(f, LOG_FIELDS, extrasaction="ignore").writerow(row)


class GracefulStop(TrainerCallback):
    """Ctrl-C / SIGTERM: finish the current step, write a checkpoint, stop. ``--resume`` continues from it.
    A second Ctrl-C stops at once (the last periodic checkpoint is then the one to resume from).

    On several processes a signal reaches one rank (``kill -INT``) or all (Ctrl-C in the terminal): at the end of
    every step the ranks all-reduce (max) the signal number each has seen so far, and all stop at the same step
    on that agreed value alone. A signal that lands after a rank's contribution is picked up at the next step,
    by every rank together, so no rank can stop while another trains on (and waits for it forever)."""

    def __init__(self):
        self.requested = False
        self.signal: int | None = None  # the signal that asked to stop (this rank, or any rank once agreed)
        self.stopped = False  # training was stopped by a signal, on every rank at the same step
        self._previous = {}
        self._group = None  # the process group of the stop flag (None: one process)

    def _handler(self, signum, frame):
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
            again = ("Ctrl-C" if signum == signal.SIGINT else f"{signal.Signals(signum).name} or Ctrl-C") + \
                " again to stop at once"
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

    def __init__(self):
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

    def _print(self, state, loss: str) -> None:
        print(f"mgpo: step {state.global_step}/{state.max_steps}{loss}, {time.time() - self.started:.0f}s",
              flush=True)


def read_log(path: Path) -> list[dict]:
    """The rows of a ``log.jsonl``. A last line cut short (a kill while it was written) is dropped with a warning
    naming the file; a damaged line before it is an error naming the file and the line."""
    if not path.is_file():
        return []
    lines = path.read_text(errors="replace").splitlines()
    rows = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError as err:
            if number == len(lines):
                warnings.warn(f"{path}: its last line is incomplete (a write was interrupted) and is ignored: "
                              f"{line[:80]!r}", RuntimeWarning, stacklevel=2)
                continue
            raise ValueError(f"{path}, line {number}, is not a JSON row ({err.msg}): {line[:80]!r}. Delete that "
                             "line (or the file) to go on.") from None
    return rows


def classification_metrics(task: str, num_labels: int):
    from scipy.stats import pearsonr, spearmanr
    from sklearn.metrics import accuracy_score, f1_score, matthews_corrcoef

    from mgpo.pipelines.measures import majority_share

    def compute(pred):
        logits, labels = pred.predictions, pred.label_ids
        if isinstance(logits, tuple):
            logits = logits[0]
        if task == "regression":
            scores = np.asarray(logits).reshape(-1)
            return {"pearson": float(pearsonr(scores, labels)[0]), "spearman": float(spearmanr(scores, labels)[0])}
        guess = np.asarray(logits).argmax(-1)
        out = {"accuracy": float(accuracy_score(labels, guess)), "majority": majority_share(labels, num_labels)}
        if num_labels == 2:  # "f1": the positive class (id 1); "macro_f1": the mean over both classes
            out["f1"] = float(f1_score(labels, guess, average="binary", zero_division=0))
        out["macro_f1"] = float(f1_score(labels, guess, average="macro", labels=list(range(num_labels)),
                                         zero_division=0))
        out["matthews"] = float(matthews_corrcoef(labels, guess))
        return out

    return compute


def _load_classification(cfg: TrainConfig):
    from mgpo.data.text import load_text_data

    d = cfg.data
    return load_text_data(d.name, task=d.task, text_column=d.text_column, text_pair_column=d.text_pair_column,
                          label_column=d.label_column, encoding=d.encoding, seed=d.seed,
                          val_fraction=d.val_fraction, test_fraction=d.test_fraction,
                          max_train_examples=d.max_train_examples, max_eval_examples=d.max_eval_examples)


def _encode_classification(cfg: TrainConfig, data, tokenizer):
    """Tokenized splits, and per split how many examples were longer than model.max_length (truncated)."""
    text_columns = [c for c in ("text", "text_pair") if c in data.splits["train"].column_names]
    limit = cfg.model.max_length

    def encode(batch):
        pair = batch["text_pair"] if "text_pair" in text_columns else None
        full = tokenizer(batch["text"], pair, verbose=False)["input_ids"]
        encoded = tokenizer(batch["text"], pair, truncation=True, max_length=limit)
        encoded["truncated"] = [len(ids) > limit for ids in full]
        return encoded

    splits = data.splits.map(encode, batched=True, remove_columns=text_columns)
    truncated = {split: int(sum(ds["truncated"])) for split, ds in splits.items()}
    return splits.remove_columns("truncated"), truncated


def _describe_data(data, truncated: dict[str, int], max_length: int) -> None:
    """Say which file became which split, how labels map to ids, and how many inputs were cut."""
    print("mgpo: data: " + "; ".join(f"{split} <- {data.sources.get(split, '?')} ({len(ds)} rows)"
                                     for split, ds in data.splits.items()), flush=True)
    if data.task == "classification":
        names = ", ".join(f"{i} = {name!r}" for i, name in enumerate(_label_names(data)))
        f1 = f"f1 is for class 1 ({_label_names(data)[1]!r}), " if data.num_labels == 2 else ""
        print(f"mgpo: labels: {names} ({f1}macro_f1 is the mean over all classes)", flush=True)
    cut = ", ".join(f"{split} {n} of {len(data.splits[split])}" for split, n in truncated.items())
    print(f"mgpo: examples longer than model.max_length={max_length} tokens, truncated: {cut}", flush=True)


def _label_names(data) -> list[str]:
    return list(data.label_names) if data.label_names else [str(i) for i in range(data.num_labels)]


def total_optimizer_steps(cfg: TrainConfig, n_train: int) -> int:
    """The optimizer steps the Trainer takes: per epoch, each process's micro-batches over grad_accum, rounded up
    (the last step of an epoch takes the micro-batches left over)."""
    t = cfg.training
    if t.max_steps > 0:
        return t.max_steps
    batches = math.ceil(math.ceil(n_train / t.batch_size) / world_size())
    per_epoch = max(1, math.ceil(batches / t.grad_accum))
    return max(1, math.ceil(per_epoch * t.epochs))


def fsdp_arguments(cfg: TrainConfig) -> dict:
    """``distributed.strategy=fsdp`` as TrainingArguments: PyTorch FSDP2 (``fully_shard``) on each transformer
    block (the model's ``_no_split_modules``) and on the root, through accelerate's FSDP plugin. Empty for DDP
    or a single process."""
    if cfg.distributed.strategy != "fsdp" or world_size() == 1:
        return {}
    return {"fsdp": True, "fsdp_config": {"version": 2, "auto_wrap_policy": "TRANSFORMER_BASED_WRAP",
                                          "reshard_after_forward": cfg.distributed.reshard_after_forward,
                                          "state_dict_type": "FULL_STATE_DICT"}}


def training_arguments(cfg: TrainConfig, out: Path, has_eval: bool) -> TrainingArguments:
    """The config as :class:`PerturbationTrainingArguments` (saved with each checkpoint in training_args.bin)."""
    from mgpo.integrations.arguments import PerturbationTrainingArguments, arguments_from_config

    t = cfg.training
    eval_every = t.eval_steps > 0 and has_eval
    best = t.load_best_model or t.early_stopping_patience > 0
    if best and not has_eval:
        name = "load_best_model" if t.load_best_model else "early_stopping_patience"
        raise ConfigError(f"training.{name} needs a validation split, and data {cfg.data.name!r} has none: set "
                          "data.max_eval_examples (causal-lm: that many rows are held out of the training data), "
                          "or give data with a test split.")
    if t.mixed_precision == "fp16" and not _cuda():
        raise ValueError("training.mixed_precision='fp16' needs a GPU (its loss scaling is CUDA's); on CPU use "
                         "training.mixed_precision=bf16 or no.")
    return arguments_from_config(
        PerturbationTrainingArguments, cfg.perturbation,
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
        use_cpu=not _cuda(),
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


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


class TrainingDiverged(RuntimeError):
    """Training produced non-finite weights, or more non-finite steps than ``training.max_skipped_steps``."""


def start_checkpoint(out: Path, *, resume: bool, restart: bool, main: bool) -> str | None:
    """The checkpoint this session starts from (None: a fresh start), after refusing to overwrite a run.

    ``--resume`` takes the newest *complete* checkpoint; newer ones that are not (a kill during a save) are moved
    aside with one line each. ``--restart`` removes what an earlier run wrote into ``out`` and starts afresh."""
    folder = out / "checkpoints"
    if resume and restart:
        raise ConfigError("--resume and --restart contradict each other: --resume continues the run in "
                          f"{out}, --restart discards it. Pass one.")
    if restart:
        removed = remove_run(out) if main and out.is_dir() else []
        if removed:
            print(f"mgpo: --restart: removed {', '.join(removed)} from {out}", flush=True)
        return None
    if not resume:
        if folder.is_dir() and any(folder.iterdir()):
            raise FileExistsError(f"{out} already holds a run: pass --resume to continue it, --restart to discard "
                                  "it and start over, or choose another training.output_dir.")
        return None
    found, bad = newest_complete(folder)
    if found is None:
        listed = "; ".join(f"{c.name}: {problem}" for c, problem in bad) or "none was written"
        raise FileNotFoundError(f"--resume: no complete checkpoint under {folder} ({listed}). Start over with "
                                "--restart (removes this run's files), or run without --resume in another "
                                "training.output_dir (checkpoints are written every training.save_steps steps).")
    for c, problem in bad:
        if main:  # one process moves them; every rank has already chosen the same complete checkpoint
            moved = set_aside(c)
            print(f"mgpo: skipping {c.name}: {problem}; moved to {moved.relative_to(out)} (delete it when you no "
                  "longer need it)", flush=True)
    if main:
        print(f"mgpo: resuming from {found.name} in {folder}", flush=True)
        mismatch = rng_mismatch(found, world_size())
        if mismatch:
            warnings.warn(mismatch, RuntimeWarning, stacklevel=2)
    return str(found)


def train(cfg: TrainConfig, *, resume: bool = False, restart: bool = False) -> dict:
    """Run one fine-tuning job end to end; returns the metrics written to ``metrics.json``.

    Interrupted by SIGINT/SIGTERM, it writes a checkpoint and returns ``{"interrupted": True, "signal": N, ...}``.
    A run whose weights become non-finite (or that skips more than ``training.max_skipped_steps`` non-finite steps)
    stops without saving them and raises :class:`TrainingDiverged`, naming the step and the last good checkpoint.
    A start that fails before training begins removes the folder it created.
    """
    out = Path(cfg.training.output_dir)
    created = not out.exists()
    started = []  # set once trainer.train() has begun: from then on the folder holds a run
    try:
        return _train(cfg, out, resume=resume, restart=restart, started=started)
    except BaseException:
        if created and not started and process_rank() == 0 and out.is_dir():
            import shutil

            shutil.rmtree(out, ignore_errors=True)
        raise


def _train(cfg: TrainConfig, out: Path, *, resume: bool, restart: bool, started: list) -> dict:
    from mgpo.integrations.peft_variants import apply_adapter
    from mgpo.integrations.trainer import PerturbationTrainer
    from mgpo.models import load_model_and_tokenizer
    from mgpo.pipelines.plots import plot_loss_curves

    main = process_rank() == 0  # only rank 0 writes files
    if fsdp_arguments(cfg) and not _cuda():
        raise ConfigError("distributed.strategy=fsdp needs GPUs: accelerate (which the Trainer uses) applies FSDP on "
                          "accelerators only, and on CPU would silently fall back to DDP. Use distributed.strategy="
                          "ddp on CPU (the mgpo optimizers themselves also run under FSDP on CPU, see "
                          "docs/distributed.md).")
    if cfg.distributed.strategy == "fsdp" and world_size() == 1:  # fsdp_arguments is empty: said, not silently
        print("mgpo: distributed.strategy=fsdp is ignored in a single process: this run "
              "trains the whole model in one process. Launch it with torchrun --nproc_per_node N (docs/"
              "distributed.md) to shard.", flush=True)
    checkpoint = start_checkpoint(out, resume=resume, restart=restart, main=main)
    changes = changed_fields(out / "config.yaml", cfg) if checkpoint and (out / "config.yaml").is_file() else {}
    length = {k: v for k, v in changes.items() if k in ("training.max_steps", "training.epochs")}
    if len(changes) > len(length):
        raise ConfigError(f"--resume: {out} holds a run with another configuration "
                          f"({said({k: v for k, v in changes.items() if k not in length})}). Resume it with the "
                          "configuration it started with (only its length, training.max_steps or training.epochs, "
                          "may change), or start over with --restart.")
    if length and main:  # training longer (or shorter) than planned: said, and recorded in config.yaml below
        print(f"mgpo: --resume with a new length ({said(length)}): the learning-rate schedule follows the "
              "new length from the checkpoint on.", flush=True)
    try:  # a path through a file, an existing file, a folder we may not write to: the field and the fix, no traceback
        out.mkdir(parents=True, exist_ok=True)
        if main:
            (out / "config.yaml").write_text(to_yaml(cfg))
    except OSError as err:
        raise unusable_folder(out, "training.output_dir", err) from None
    set_seed(cfg.training.seed)
    clock = WallClock(checkpoint)

    task = cfg.data.task
    if task == "causal-lm":
        model, tokenizer = load_model_and_tokenizer(cfg.model.name, task, dtype=cfg.model.dtype)
        from mgpo.pipelines.generation import check_benchmark, prepare_causal_lm

        data, splits, collator, info = prepare_causal_lm(cfg, tokenizer)
        check_benchmark(cfg, data, say=main)
        compute_metrics = None
        if cfg.generation.before_training:
            from mgpo.pipelines.generation import evaluate_generation

            info.update(evaluate_generation(cfg, model, tokenizer, data, out, prefix="before"))
    elif task == "text-to-text":  # classification as generation (T5): mgpo.pipelines.text_to_text
        from mgpo.pipelines.text_to_text import prepare_text_to_text

        model, tokenizer = load_model_and_tokenizer(cfg.model.name, task, dtype=cfg.model.dtype)
        data, splits, collator, compute_metrics, label_words, info = prepare_text_to_text(cfg, tokenizer)
    else:
        data = _load_classification(cfg)  # first, so the model is built with the right head size
        model, tokenizer = load_model_and_tokenizer(cfg.model.name, task, num_labels=data.num_labels,
                                                    dtype=cfg.model.dtype)
        splits, truncated = _encode_classification(cfg, data, tokenizer)
        if main:
            _describe_data(data, truncated, cfg.model.max_length)
        collator = DataCollatorWithPadding(tokenizer, pad_to_multiple_of=8)
        compute_metrics = classification_metrics(task, data.num_labels)
        info = {"data_splits": dict(data.sources), "data_rows": {split: len(ds) for split, ds in splits.items()},
                "truncated_examples": truncated["train"],
                "truncated_eval_examples": sum(n for split, n in truncated.items() if split != "train")}
        if task == "classification":  # the saved model config (and metrics.json) say what each class id means
            model.config.id2label = dict(enumerate(_label_names(data)))
            model.config.label2id = {name: i for i, name in enumerate(_label_names(data))}
            info["id2label"] = {str(i): name for i, name in enumerate(_label_names(data))}
            info["label2id"] = dict(model.config.label2id)

    total_steps = total_optimizer_steps(cfg, len(splits["train"]))
    probe = clean_loss_probe(cfg, splits["train"])
    _check_evaluations(cfg, total_steps)
    if fsdp_arguments(cfg) and trained_to_the_end(checkpoint, total_steps):
        # evaluate_from() loads the checkpoint into a model the Trainer has not sharded yet; train() would run one
        # step past the end (its loop checks the limit after a step) and log, save and count it
        raise ConfigError(f"--resume: {checkpoint} holds the whole training of this run (the session that wrote it "
                          "stopped in the evaluation after it). Evaluating a finished run from its checkpoint is not "
                          "supported under distributed.strategy=fsdp: resuming would train a step past the end. Start "
                          "over with --restart.")
    grad_batches = _grad_batches(splits["train"], collator, cfg.training.batch_size)
    model = apply_adapter(model, cfg.adapter, task=task, total_steps=total_steps, grad_batches=grad_batches)
    eval_split = splits.get("validation")
    trainer = PerturbationTrainer(
        model=model,
        args=training_arguments(cfg, out, eval_split is not None),
        perturbation=cfg.perturbation,
        adapter=cfg.adapter,
        train_dataset=splits["train"],
        eval_dataset=eval_split,
        data_collator=collator,
        compute_metrics=compute_metrics,
        preprocess_logits_for_metrics=getattr(compute_metrics, "preprocess", None),
        callbacks=[StepLog(out), GracefulStop(), clock, RunTensorBoard(out / "tensorboard", out / "log.jsonl"),
                   DivergenceStop(cfg.training.max_skipped_steps)],
        clean_loss_probe=probe,
        clean_loss_every=clean_loss_every(cfg),
    )
    if cfg.training.early_stopping_patience:
        trainer.add_callback(EarlyStoppingCallback(early_stopping_patience=cfg.training.early_stopping_patience))
    trainer.remove_callback(PrinterCallback)  # Hugging Face's printed log dicts: the numbers are in log.jsonl
    if cfg.training.progress and main:
        trainer.add_callback(QuietProgress() if sys.stdout.isatty() else PlainProgress())
    stopper = next(cb for cb in trainer.callback_handler.callbacks if isinstance(cb, GracefulStop))
    divergence = next(cb for cb in trainer.callback_handler.callbacks if isinstance(cb, DivergenceStop))
    divergence.trainer = trainer
    train_started = time.time()
    started.append(True)
    try:
        if trained_to_the_end(checkpoint, total_steps):  # (refused above under FSDP)
            evaluate_from(trainer, checkpoint)
        else:
            trainer.train(resume_from_checkpoint=checkpoint)
        if stopper.stopped and main:  # before the barrier: once a rank exits 130, torchrun stops the others
            print(f"mgpo: interrupted at step {trainer.state.global_step}; checkpoint written. Continue with "
                  f"the same command and --resume.", flush=True)
        # every rank waits until rank 0 has finished writing the last checkpoint: a rank that exited first
        # would have torchrun kill rank 0 in the middle of it
        trainer.accelerator.wait_for_everyone()
    finally:
        stopper.restore()
    if divergence.diverged:
        raise TrainingDiverged(divergence.message(cfg, out))
    cost = cost_metrics(trainer, checkpoint, time.time() - train_started)
    if stopper.stopped:
        return {"interrupted": True, "step": trainer.state.global_step, "signal": stopper.signal}

    early = trainer.pop_callback(EarlyStoppingCallback)  # None when off; it would warn at every evaluate() below
    metrics: dict = {"steps": trainer.state.global_step, **info, **cost,
                     **best_model_metrics(cfg, trainer, early, out)}
    for split in ("validation", "test"):
        if splits.get(split) is not None:
            metrics.update(trainer.evaluate(splits[split], metric_key_prefix=split))
    fsdp = bool(fsdp_arguments(cfg))
    if task == "causal-lm" and (main or fsdp):  # FSDP: every rank takes part in the forwards; rank 0 writes
        import tempfile

        from mgpo.pipelines.generation import evaluate_generation

        where = out if main else Path(tempfile.mkdtemp(prefix="mgpo-rank"))
        metrics.update(evaluate_generation(cfg, trainer.model, tokenizer, data, where, prefix="after"))
    if task == "text-to-text" and splits.get("test") is not None and (main or fsdp):
        from mgpo.pipelines.text_to_text import exact_match

        found = exact_match(trainer.model, tokenizer, splits["test"], label_words, cfg.training.eval_batch_size)
        metrics.update({f"test_{k}": v for k, v in found.items()})
    # FSDP: the sharded weights are gathered whole (every rank takes part); DDP: trainer.model is the plain model
    state = trainer.accelerator.get_state_dict(trainer.model) if fsdp else None
    if not main:
        return metrics
    trainer.model.save_pretrained(str(out / "adapter"), **({"state_dict": state} if fsdp else {}))
    tokenizer.save_pretrained(str(out / "adapter"))
    if not (out / "adapter" / "config.json").exists():  # the base model's config: id2label/label2id, head size
        trainer.model.config.save_pretrained(str(out / "adapter"))
    rows = read_log(out / "log.jsonl")
    for key in ("loss", "clean_loss"):  # the loss the steps saw (perturbed for MGPO); the clean probe
        values = [r[key] for r in rows if key in r]
        metrics[f"final_{key}"] = values[-1] if values else None
        metrics[f"best_{key}"] = min(values) if values else None
    metrics["wall_time_s"] = round(clock.elapsed(), 1)  # all sessions of the run, resumed ones included
    write_json(out / "metrics.json", metrics)
    method = cfg.perturbation.resolved().method  # a preset names its method (perturbation.preset=lora: adamw)
    plot_loss_curves({method: out / "log.jsonl"}, out / "loss.png", title=f"{cfg.model.name} on {cfg.data.name}",
                     as_trained=as_trained_label(method))
    return metrics


def trained_to_the_end(checkpoint: str | None, total_steps: int) -> bool:
    """Whether ``checkpoint`` holds the whole training (a session stopped, or killed, in the evaluation after it):
    saved at the last step, or where early stopping ended the run."""
    if checkpoint is None:
        return False
    state = json.loads((Path(checkpoint) / "trainer_state.json").read_text())
    counter, patience = _saved_patience(state)
    return state.get("global_step", 0) >= total_steps or counter >= patience


def _saved_patience(state) -> tuple[int, float]:
    """Early stopping's (counter, patience) as a checkpoint's trainer state saved them; (0, inf) without it."""
    saved = (state.get("stateful_callbacks") if isinstance(state, dict) else state.stateful_callbacks) or {}
    early = saved.get("EarlyStoppingCallback")
    early = early if isinstance(early, dict) else {}
    return (early.get("attributes", {}).get("early_stopping_patience_counter", 0),
            early.get("args", {}).get("early_stopping_patience", math.inf))


def evaluate_from(trainer, checkpoint: str) -> None:
    """Resume a run whose training had finished: the checkpoint's weights and state, and no training step.
    ``trainer.train(resume_from_checkpoint=...)`` would train one step past max_steps (its loop checks the limit
    after a step), and log, save and count it. The session's start and end run as for a training session: the
    log is cut to the checkpoint's rows, and with load_best_model the best checkpoint is loaded."""
    from transformers import TrainerState

    trainer._load_from_checkpoint(checkpoint)
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
        trainer._load_best_model()
    trainer.control = handler.on_train_end(args, trainer.state, trainer.control)


def clean_loss_every(cfg: TrainConfig) -> int:
    """Steps between clean-loss probes (0: off); ``training.clean_loss_every`` null means every logged step."""
    t = cfg.training
    return t.logging_steps if t.clean_loss_every is None else t.clean_loss_every


def clean_loss_probe(cfg: TrainConfig, train_split):
    """The clean-loss probe: ``training.clean_loss_examples`` rows of the tokenized train split, drawn with
    ``data.seed`` (so every method and training seed on the same data is probed on the same examples); None when
    the probe is off. Ordered by length, so each probe batch is padded little (on the movie reviews at
    max_length 64: 40 instead of 58 tokens per example in batches of 64)."""
    if not clean_loss_every(cfg):
        return None
    n = min(cfg.training.clean_loss_examples, len(train_split))
    rows = [int(i) for i in np.random.default_rng(cfg.data.seed).choice(len(train_split), size=n, replace=False)]
    lengths = [len(ids) for ids in train_split.select(rows)["input_ids"]]
    return train_split.select([i for _, i in sorted(zip(lengths, rows))])


# Methods whose training forwards run at perturbed weights: their logged `loss` is not the clean loss.
PERTURBED_FORWARD = ("mgpo", "msam", "random", "ggpo")


def as_trained_label(method: str) -> str:
    """What the logged `loss` of a run with this perturbation method is, for plot labels."""
    return "training loss at the perturbed weights" if method in PERTURBED_FORWARD else "training loss as trained"


def _check_evaluations(cfg: TrainConfig, total_steps: int) -> None:
    """A best checkpoint or early stop needs an evaluation (and, for the checkpoint, a save) before the end."""
    t = cfg.training
    if t.load_best_model:
        check(t.save_steps <= total_steps, "training.save_steps", t.save_steps,
              f"training.load_best_model=true picks among checkpoints saved during training, and this run has "
              f"{total_steps} optimizer steps; use training.eval_steps and training.save_steps <= {total_steps}",
              ConfigError)
    if t.early_stopping_patience:
        check(t.eval_steps <= total_steps, "training.eval_steps", t.eval_steps,
              f"early stopping needs evaluations during training, and this run has {total_steps} optimizer "
              f"steps; use training.eval_steps <= {total_steps}", ConfigError)


def best_model_metrics(cfg: TrainConfig, trainer, early: EarlyStoppingCallback | None, out: Path) -> dict:
    """Which checkpoint was loaded as the best (load_best_model), and whether early stopping ended the run."""
    t, state, found = cfg.training, trainer.state, {}
    if t.load_best_model:
        best = state.best_model_checkpoint  # None: no checkpoint was saved at an evaluation
        found["best_checkpoint"] = os.path.relpath(best, out) if best else None
    if early is not None:
        found["stopped_early"] = early.early_stopping_patience_counter >= early.early_stopping_patience
    if state.is_world_process_zero:
        if found.get("stopped_early"):
            print(f"mgpo: stopped early at step {state.global_step} of {state.max_steps}: no lower validation "
                  f"loss in {t.early_stopping_patience} evaluation(s)", flush=True)
        if found.get("best_checkpoint"):
            print(f"mgpo: loaded the checkpoint with the lowest validation loss, {found['best_checkpoint']}",
                  flush=True)
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
    import os
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
        "load_average": [round(x, 2) for x in os.getloadavg()] if hasattr(os, "getloadavg") else None,
        "cpus": os.cpu_count(),
    }


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
        self.tb_writer = self._SummaryWriter(log_dir=self.logging_dir, purge_step=state.global_step)
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
        self.trainer = None  # the PerturbationTrainer, for its nonfinite_losses counter
        self.diverged: tuple[int, str] | None = None  # (step, why)
        self.bad_steps = 0
        self._seen = (0, 0)  # (non-finite losses, skipped steps) at the end of the last step
        self._group = None

    def on_train_begin(self, args, state, control, optimizer=None, **kwargs):
        from mgpo.integrations.trainer import unwrap_optimizer
        from mgpo.optim._base import PerturbedOptimizer

        self._group = _cpu_group()
        opt = unwrap_optimizer(optimizer)  # a resumed optimizer brings its earlier sessions' skipped steps
        self._seen = (0, opt.skipped_steps if isinstance(opt, PerturbedOptimizer) else 0)

    def on_step_end(self, args, state, control, model=None, optimizer=None, **kwargs):
        import torch

        from mgpo.integrations.trainer import unwrap_optimizer
        from mgpo.optim._base import PerturbedOptimizer
        from mgpo.optim.distributed import local

        trainable = [local(p).detach() for p in model.parameters() if p.requires_grad] if model is not None else []
        # one host read per step (the only one this callback makes)
        weights_bad = int(not torch.stack(torch._foreach_norm(trainable)).isfinite().all()) if trainable else 0
        opt = unwrap_optimizer(optimizer)
        skipped = opt.skipped_steps if isinstance(opt, PerturbedOptimizer) else 0
        losses = int(self.trainer.nonfinite_losses) if self.trainer is not None else 0
        weights_bad, losses, skipped = _agree_max(self._group, weights_bad, losses, skipped)
        self.bad_steps += (losses, skipped) != self._seen
        self._seen = (losses, skipped)
        if weights_bad:
            why = "the trainable weights hold NaN/Inf (a non-finite gradient reached them)"
        elif self.bad_steps > self.patience:
            why = (f"{self.bad_steps} steps had a non-finite (NaN/Inf) loss or gradient, more than "
                   f"training.max_skipped_steps={self.patience}")
        else:
            return
        self.diverged = (state.global_step, why)
        control.should_training_stop = True
        control.should_save = control.should_evaluate = False

    def message(self, cfg: TrainConfig, out: Path) -> str:
        step, why = self.diverged
        found, _ = newest_complete(out / "checkpoints")
        last = (f"the last good checkpoint, {found.relative_to(out)}, is kept (--resume continues from it)"
                if found is not None else "no checkpoint was written before it")
        return (f"training diverged at step {step}: {why}. Nothing was saved from the diverged weights; {last}. "
                f"Lower training.lr (now {cfg.training.lr:g}) and rerun with --restart, or raise "
                "training.max_skipped_steps if a few non-finite steps are expected.")


def _cpu_group():
    """A gloo process group for small host-side agreements (None in a single process): agreeing never waits
    for a GPU's queued work. Every rank must call it, in the same order."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
        return None
    return dist.group.WORLD if dist.get_backend() == "gloo" else dist.new_group(backend="gloo")


def _agree_max(group, *values: int) -> list[int]:
    """The largest of each value over the ranks (the values themselves in a single process)."""
    import torch
    import torch.distributed as dist

    if group is None:
        return list(values)
    flags = torch.tensor(values, dtype=torch.int64)
    dist.all_reduce(flags, op=dist.ReduceOp.MAX, group=group)
    return flags.tolist()


def _grad_batches(train_split, collator, batch_size: int):
    """Model-ready batches for LoRA-GA's gradient estimate (only called when that method is chosen)."""

    def batches():
        for start in range(0, len(train_split), batch_size):
            rows = [train_split[i] for i in range(start, min(start + batch_size, len(train_split)))]
            yield collator([{k: v for k, v in r.items() if k in ("input_ids", "attention_mask", "token_type_ids",
                                                                      "labels", "label")} for r in rows])

    return batches
