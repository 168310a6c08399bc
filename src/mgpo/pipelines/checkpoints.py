"""Which checkpoint a run resumes from, and the run files that must survive a kill at any moment.

The Trainer writes ``checkpoint-N/`` in place, file by file, so a kill (or a second Ctrl-C) during a save leaves a
folder that looks like a checkpoint and is not one. ``--resume`` therefore never trusts the highest number: a
checkpoint counts only when every file it should hold is there and opens (:func:`checkpoint_problem`). Newer ones
that do not are moved aside (``checkpoints/damaged-checkpoint-N``, named in one line each, left for the user to
delete) and the run resumes from the newest one that does. The cheap checks used here catch what a kill leaves
(missing, empty or truncated files); they do not verify every byte.

A checkpoint without its RNG state counts as incomplete: resuming from it would continue on another random
trajectory, and the resumed run would silently differ from an uninterrupted one.

Our own files (metrics, the wall-time file, the rewritten log) are written to a temporary name, flushed to disk
and renamed (:func:`write_atomic`), so a reader or a resumed run sees the old file or the new one, never a part.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import zipfile
from pathlib import Path

from mgpo.pipelines.predictions import FILE as PREDICTIONS

WALL_TIME_FILE = "mgpo_wall_time.json"
WEIGHT_FILES = (
    "adapter_model.safetensors",
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model_fsdp_0",
)  # LoRA adapter, full fine-tuning, sharded full model, FSDP's folder
OPTIMIZER_FILES = ("optimizer.pt", "optimizer_0")  # optimizer_0/: FSDP's sharded optimizer state
# What ``mgpo train`` writes into a run folder (``--restart`` removes these and nothing else).
# (before_*.jsonl / after_*.jsonl: the generations scored before and after training)
RUN_FILES = (
    "checkpoints",
    "log.jsonl",
    "log.csv",
    "tensorboard",
    "adapter",
    "metrics.json",
    "metrics.superseded.json",
    PREDICTIONS,
    "loss.png",
    "config.yaml",
    "before_*.jsonl",
    "after_*.jsonl",
)


def write_atomic(path: Path, text: str) -> None:
    """Replace ``path`` by ``text`` all at once: temporary file, fsync, rename (then fsync the folder)."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    try:  # the rename itself reaches the disk only with the folder's entry
        fd = os.open(path.parent, os.O_RDONLY)
    except OSError:  # a platform without directory descriptors
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_json(path: Path, obj) -> None:
    write_atomic(path, json.dumps(obj, indent=2, default=float))


def read_json(path: Path):
    """The JSON in ``path``; a file that is not valid JSON (cut short, edited by hand) is a ValueError naming it."""
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(
            f"{path} is not valid JSON ({err}): it was cut short or edited; restore it, or move the "
            "folder away and run again."
        ) from None


def checkpoint_number(folder: Path) -> int | None:
    found = re.fullmatch(r"checkpoint-(\d+)", folder.name)
    return int(found.group(1)) if found else None


def _safetensors_problem(path: Path) -> str | None:
    from safetensors import safe_open  # checks the header against the file's length: a truncation fails here

    try:
        with safe_open(str(path), "pt"):
            return None
    except Exception as err:  # noqa: BLE001 - any failure to open is the answer we want
        return f"{path.name} does not open ({str(err).splitlines()[0]})"


def _torch_file_problem(path: Path) -> str | None:
    """torch.save writes a zip archive whose directory is at the end: a truncated file has none."""
    try:
        with zipfile.ZipFile(path) as archive:
            archive.namelist()
        return None
    except (zipfile.BadZipFile, OSError) as err:
        return f"{path.name} is damaged or truncated ({err})"


def _json_problem(path: Path) -> str | None:
    try:
        json.loads(path.read_text())
        return None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        return f"{path.name} is not valid JSON ({err})"


def rng_files(folder: Path) -> list[str]:
    """The RNG state files: ``rng_state.pth`` (one process) or ``rng_state_<rank>.pth`` (one per rank)."""
    return sorted(p.name for p in folder.iterdir() if re.fullmatch(r"rng_state(_\d+)?\.pth", p.name))


def rng_mismatch(folder: Path, world_size: int) -> str | None:
    """A checkpoint written by another number of processes than resumes it: it can be resumed (the Trainer
    takes each rank's state where there is one), but not on the trajectory an uninterrupted run takes."""
    expected = ["rng_state.pth"] if world_size == 1 else [f"rng_state_{r}.pth" for r in range(world_size)]
    found = rng_files(folder)
    if set(expected) <= set(found):
        return None
    return (
        f"{folder.name} holds the RNG state of {len(found)} process(es) and this run has {world_size}: it "
        "continues, but not as an uninterrupted run would (other random numbers, another data order)"
    )


def checkpoint_problem(folder: Path) -> str | None:
    """Why ``folder`` cannot be resumed from (the first problem found), or None when it is complete.

    Complete: ``trainer_state.json`` (at this folder's step), the model's weights, ``optimizer.pt``,
    ``scheduler.pt``, the RNG state and mgpo's wall-time file, each present and opening."""
    try:
        names = {p.name for p in folder.iterdir()}
    except OSError as err:  # gone (another process moved it aside) or unreadable
        return f"cannot be read ({err.strerror})"
    weights = [n for n in WEIGHT_FILES if n in names]
    if not weights:
        return f"no model weights ({' or '.join(WEIGHT_FILES[:2])})"
    if not any(n in names for n in OPTIMIZER_FILES):
        return "optimizer.pt is missing"
    if not rng_files(folder):  # without it the run would go on, silently, on another random trajectory
        return "rng_state.pth is missing"
    required = ["trainer_state.json", "scheduler.pt", WALL_TIME_FILE]
    missing = [n for n in required if n not in names]
    if missing:
        return f"{missing[0]} is missing"
    for name in sorted(names):
        path = folder / name
        if path.is_dir():
            continue
        if path.stat().st_size == 0:
            return f"{name} is empty"
        if name.endswith(".json"):
            problem = _json_problem(path)
        elif name.endswith(".safetensors"):
            problem = _safetensors_problem(path)
        elif name.endswith((".pt", ".pth", ".bin")):
            problem = _torch_file_problem(path)
        else:
            problem = None
        if problem:
            return problem
    step = json.loads((folder / "trainer_state.json").read_text()).get("global_step")
    if step != checkpoint_number(folder):
        return f"trainer_state.json is at step {step}, not {checkpoint_number(folder)}"
    return None


def checkpoints(folder: Path) -> list[Path]:
    """The ``checkpoint-N`` folders under ``folder``, newest (highest N) first."""
    found = [p for p in folder.glob("checkpoint-*") if checkpoint_number(p) is not None] if folder.is_dir() else []
    return sorted(found, key=lambda p: checkpoint_number(p) or 0, reverse=True)  # all of them numbered


def newest_complete(folder: Path) -> tuple[Path | None, list[tuple[Path, str]]]:
    """The newest complete checkpoint under ``folder`` (None if there is none), and the newer ones that are not,
    each with its problem."""
    bad: list[tuple[Path, str]] = []
    for candidate in checkpoints(folder):
        problem = checkpoint_problem(candidate)
        if problem is None:
            return candidate, bad
        bad.append((candidate, problem))
    return None, bad


def set_aside(checkpoint: Path) -> Path:
    """Move a checkpoint that cannot be resumed from out of the Trainer's way (it would write into the same
    folder, or count it when rotating old checkpoints): ``damaged-checkpoint-N`` beside it."""
    target = checkpoint.with_name(f"damaged-{checkpoint.name}")
    n = 1
    while target.exists():
        n += 1
        target = checkpoint.with_name(f"damaged-{checkpoint.name}-{n}")
    checkpoint.rename(target)
    return target


def remove_run(out: Path) -> list[str]:
    """``--restart``: remove what ``mgpo train`` wrote into ``out`` (nothing else); returns the names removed."""
    removed = []
    for path in sorted(p for pattern in RUN_FILES for p in out.glob(pattern)):
        shutil.rmtree(path) if path.is_dir() and not path.is_symlink() else path.unlink()
        removed.append(path.name)
    return removed
