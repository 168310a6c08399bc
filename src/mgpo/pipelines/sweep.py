"""``mgpo sweep SPEC``: run a grid of ``mgpo train`` configurations, one folder per run, resumable.

A sweep spec is a YAML file (format in docs/experiments.md)::

    title: LoRA vs LoRA-MGPO across ranks      # shown in the report
    base: ../movie-reviews-mgpo.yaml           # a config path (relative to this file) or an inline config
    set: {training.max_steps: 60}              # overrides applied to every run (optional)
    grid:                                      # the cartesian product of all axes, first axis outermost
      method:                                  # a named axis: label -> overrides
        LoRA: {perturbation.method: adamw}
        LoRA-MGPO: {perturbation.method: mgpo}
      training.seed: [0, 1, 2]                 # a field axis: dotted field -> list of values
                                               # (or a list of such grids, same axes: their runs joined in order)
    name: "{method}-s{training.seed}"          # run folder name (optional)
    output_dir: runs/experiments/example       # the sweep folder (optional; default runs/sweeps/<spec name>)
    report: {baseline: LoRA}                   # options for `mgpo report` (optional)
    executor: local                            # local (default) or slurm; --executor overrides it
    workers: 1                                 # local: runs at once, each on its own device (--workers)
    threads_per_run: 1                         # torch CPU threads of each run (default: the executor's share)
    slurm: {partition: gpu, time_min: 240, gpus_per_run: 1, cpus_per_run: 8, parallelism: 8}   # (slurm)

Each run trains in its own ``python -m mgpo train`` process (a crash or out-of-memory does not end the sweep,
and the peak memory measured is that run's). The sweep folder holds ``sweep.yaml`` (the spec),
``index.json`` / ``index.csv`` (one row per run: its axis values, status, error, time) and one folder per run.
Rerunning the same command skips finished runs (``metrics.json`` present), resumes half-finished ones from their
last complete checkpoint and retries failed ones. Where the runs train is the executor's business
(:mod:`mgpo.pipelines.executors`): here, one or N at a time, or on a Slurm cluster as one array job per
submission; each leaves its record in its run folder, which ``--status`` reads.
"""

from __future__ import annotations

import csv
import itertools
import json
import re
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import NoReturn

from omegaconf import OmegaConf

from mgpo.pipelines.checkpoints import write_json
from mgpo.pipelines.config import ConfigError, changed_fields, load_config, read_yaml, said, unusable_folder
from mgpo.pipelines.executors import EXECUTORS, SlurmConfig, error_line, run_local, run_state, submit_slurm

SPEC_KEYS = (
    "title",
    "base",
    "set",
    "grid",
    "name",
    "output_dir",
    "report",
    "executor",
    "workers",
    "threads_per_run",
    "slurm",
)
SEED_FIELD = "training.seed"


@dataclass
class Run:
    index: int
    name: str
    labels: dict  # axis -> label (named axes) or value (field axes)
    overrides: list[str]  # section.field=value, output_dir last
    output_dir: Path
    status: str = "pending"
    error: str | None = None
    wall_s: float | None = None


@dataclass
class Sweep:
    title: str
    base: Path | None  # config file the runs start from (None: defaults only)
    base_overrides: list[str]
    output_dir: Path
    runs: list[Run]
    spec: dict
    executor: str = "local"
    workers: int = 1
    threads_per_run: int = 0  # 0: the executor's choice (all cores, their share, or slurm.cpus_per_run)
    slurm: SlurmConfig = field(default_factory=SlurmConfig)
    submitted: list | None = None  # the runs a submission to a scheduler sent (None: they trained here)


def _fail(spec_path, message: str) -> NoReturn:
    raise ConfigError(f"sweep {str(spec_path)!r}: {message}")


def _as_override(key: str, value) -> str:
    if isinstance(value, (list, dict)):
        return f"{key}={json.dumps(value)}"
    if value is None:
        return f"{key}=null"
    return f"{key}={value}"


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.+-]+", "_", str(text)).strip("_") or "run"


def load_sweep(
    spec_path: str | Path,
    extra: Sequence[str] = (),
    output_dir: str | Path | None = None,
    executor: str | None = None,
    workers: int | None = None,
) -> Sweep:
    """Read a sweep spec and expand its grid into runs (nothing is trained or downloaded). ``executor`` and
    ``workers`` (the command line's) override the spec's."""
    spec_path = Path(spec_path)
    if not spec_path.is_file():
        raise ConfigError(f"sweep spec {str(spec_path)!r} does not exist; see configs/experiments/ for examples.")
    spec = OmegaConf.to_container(read_yaml(spec_path), resolve=True)
    if not isinstance(spec, dict):
        _fail(spec_path, "the file must be a mapping with at least `grid:` (see docs/experiments.md).")
    unknown = sorted(set(spec) - set(SPEC_KEYS))
    if unknown:
        _fail(spec_path, f"unknown key {unknown[0]!r}; allowed keys: {', '.join(SPEC_KEYS)}.")
    grids = spec.get("grid") or {}
    grids = grids if isinstance(grids, list) else [grids]
    if not grids or not all(isinstance(g, dict) and g for g in grids):
        _fail(
            spec_path,
            "`grid:` must map axes to values, e.g. `grid: {training.seed: [0, 1, 2]}` (or be a list "
            "of such mappings, whose runs are joined in order).",
        )
    if any(list(g) != list(grids[0]) for g in grids):
        _fail(
            spec_path,
            "every mapping in the `grid:` list must have the same axes, in the same order; got "
            + " and ".join(str(list(g)) for g in grids)
            + ".",
        )

    base, base_overrides = spec.get("base"), []
    if isinstance(base, str):
        base = (spec_path.parent / base).resolve()
        if not base.is_file():
            _fail(spec_path, f"base config {str(base)!r} does not exist (paths are relative to the spec file).")
    elif isinstance(base, dict):  # an inline config: flattened to overrides
        base_overrides = [_as_override(k, v) for k, v in _flatten(base).items()]
        base = None
    elif base is not None:
        _fail(spec_path, f"`base:` must be a config path or an inline config mapping, not {base!r}.")
    set_ = spec.get("set") or {}
    if not isinstance(set_, dict):
        _fail(spec_path, f"`set:` must map dotted fields to values, not {set_!r}.")
    base_overrides += [_as_override(k, v) for k, v in _flatten(set_).items()] + list(extra)

    out_root = Path(output_dir or spec.get("output_dir") or Path("runs/sweeps") / spec_path.stem)
    template = spec.get("name")
    runs, names = [], set()
    combos = [combo for grid in grids for combo in _combinations(spec_path, grid)]
    for i, combo in enumerate(combos):
        labels = {axis: label for axis, label, _ in combo}
        fields: dict = {}
        for _, _, fs in combo:
            fields.update(fs)
        if template:
            name = _name_from(spec_path, template, labels)
        else:
            name = "-".join(
                f"{axis.rsplit('.', 1)[-1]}{label}" if "." in axis else str(label) for axis, label in labels.items()
            )
        name = _slug(name)
        if name in names:
            _fail(
                spec_path,
                f"two runs are both named {name!r}: include every axis in `name:` (and, with a list of "
                "grids, keep them from overlapping).",
            )
        names.add(name)
        out = out_root / name
        overrides = [*base_overrides, *(_as_override(k, v) for k, v in fields.items()), f"training.output_dir={out}"]
        runs.append(Run(i, name, labels, overrides, out))
    executor = executor or spec.get("executor") or "local"
    if executor not in EXECUTORS:
        _fail(spec_path, f"executor {executor!r} is unknown: use one of {', '.join(EXECUTORS)}.")
    workers = workers if workers is not None else spec.get("workers", 1)
    if not (isinstance(workers, int) and not isinstance(workers, bool) and workers >= 1):
        _fail(spec_path, f"workers={workers!r}: use a whole number of runs at once, at least 1.")
    if workers > 1 and executor != "local":
        _fail(
            spec_path,
            f"workers={workers} is for --executor local; on Slurm, slurm.parallelism sets how many "
            "runs of the array run at once.",
        )
    threads = spec.get("threads_per_run", 0)
    if not (isinstance(threads, int) and not isinstance(threads, bool) and threads >= 0):
        _fail(spec_path, f"threads_per_run={threads!r}: use a whole number of threads (0: the executor's share).")
    return Sweep(
        title=str(spec.get("title") or spec_path.stem),
        base=base,
        base_overrides=base_overrides,
        output_dir=out_root,
        runs=runs,
        spec=spec,
        executor=executor,
        workers=workers,
        threads_per_run=threads,
        slurm=SlurmConfig.from_spec(spec_path, spec.get("slurm")),
    )


def _combinations(spec_path, grid: dict) -> list[tuple]:
    """The cartesian product of one grid's axes, first axis outermost: per run, ((axis, label, fields), ...)."""
    axes = []
    for axis, values in grid.items():
        if isinstance(values, dict) and "." not in axis:
            choices = []
            for label, fields in values.items():
                if not isinstance(fields, dict):
                    _fail(
                        spec_path,
                        f"grid axis {axis!r}, choice {label!r}: give a mapping of fields, e.g. "
                        "{perturbation.method: mgpo}.",
                    )
                choices.append((str(label), _flatten(fields)))
        elif isinstance(values, list) and "." in axis and values:
            choices = [(v, {axis: v}) for v in values]
        else:
            _fail(
                spec_path,
                f"grid axis {axis!r}: use `section.field: [values...]` or a named axis "
                "`name: {label: {section.field: value}}`.",
            )
        axes.append([(axis, label, fields) for label, fields in choices])
    return list(itertools.product(*axes))


def _name_from(spec_path, template: str, labels: dict) -> str:
    """``template`` with each ``{axis}`` replaced by the run's label on that axis."""
    return re.sub(r"\{([^}]+)\}", lambda m: _label_for(spec_path, labels, m.group(1)), template)


def _label_for(spec_path, labels: dict, key: str) -> str:
    if key not in labels:
        _fail(spec_path, f"`name:` uses {{{key}}}, which is not a grid axis; axes: {', '.join(labels)}.")
    return str(labels[key])


def _flatten(mapping: dict, prefix: str = "") -> dict:
    """{'training': {'lr': 1}} and {'training.lr': 1} both become {'training.lr': 1}."""
    flat = {}
    for key, value in mapping.items():
        full = f"{prefix}{key}"
        if isinstance(value, dict) and not full.count("."):
            flat.update(_flatten(value, full + "."))
        else:
            flat[full] = value
    return flat


def plan(sweep: Sweep) -> list:
    """Resolve and validate every run's configuration (no training, no downloads): the list of TrainConfigs.

    A run folder that already holds a run (finished or half-finished) must hold this configuration: a finished
    run would otherwise be skipped, and a half-finished one resumed, under a spec that no longer describes it."""
    configs, stale = [], []
    for run in sweep.runs:
        try:
            configs.append(load_config(sweep.base, run.overrides))
        except ConfigError as err:
            raise ConfigError(f"run {run.name!r}: {err}") from None
        saved = run.output_dir / "config.yaml"
        if run_state(run.output_dir) != "new" and saved.is_file():
            changes = changed_fields(saved, configs[-1])
            if changes:
                shown = dict(list(changes.items())[:3])
                stale.append(f"{run.name} ({said(shown)}{'; ...' if len(changes) > 3 else ''})")
    if stale:
        raise ConfigError(
            f"{len(stale)} run folder(s) under {sweep.output_dir} hold a run with another "
            f"configuration than the spec gives them: {', '.join(stale[:5])}"
            f"{', ...' if len(stale) > 5 else ''}. Put the spec back as it was, or move those "
            "folders away (or choose another output_dir) to run them anew."
        )
    return configs


def write_index(sweep: Sweep) -> None:
    sweep.output_dir.mkdir(parents=True, exist_ok=True)
    rows = [
        {
            "index": r.index,
            "name": r.name,
            "status": r.status,
            "output_dir": str(r.output_dir),
            "labels": r.labels,
            "overrides": r.overrides,
            "error": r.error,
            "wall_s": r.wall_s,
        }
        for r in sweep.runs
    ]
    # the base config file (if the spec names one) and each run's overrides are its whole configuration: enough
    # for a report to name the method of a run that has not started
    write_json(
        sweep.output_dir / "index.json",
        {"title": sweep.title, "runs": rows, **({"base": str(sweep.base)} if sweep.base else {})},
    )
    axes = list(sweep.runs[0].labels) if sweep.runs else []
    tmp = sweep.output_dir / "index.csv.tmp"
    with tmp.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["index", "name", *axes, "status", "wall_s", "error", "output_dir"])
        for r in sweep.runs:
            writer.writerow(
                [
                    r.index,
                    r.name,
                    *(r.labels[a] for a in axes),
                    r.status,
                    r.wall_s,
                    (r.error or "").replace("\n", " "),
                    r.output_dir,
                ]
            )
    tmp.replace(sweep.output_dir / "index.csv")


def run_sweep(sweep: Sweep, *, progress: bool = True, python: str = sys.executable) -> Sweep:
    """Run the plan with the sweep's executor; returns the sweep with each run's status (local: done, skipped,
    failed, resumed; slurm: queued for those submitted, the others as --status shows them)."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    plan(sweep)  # every configuration is valid before the first run starts
    try:  # the spec's output_dir or --output-dir: said by name when it cannot be a folder, not a traceback
        sweep.output_dir.mkdir(parents=True, exist_ok=True)
        (sweep.output_dir / "sweep.yaml").write_text(OmegaConf.to_yaml(OmegaConf.create(sweep.spec)))
    except OSError as err:
        raise unusable_folder(sweep.output_dir, "output_dir", err) from None
    write_index(sweep)
    if sweep.executor == "slurm":
        sweep.submitted = submit_slurm(sweep, sweep.slurm, python, write_index, sweep.threads_per_run)
        return sweep
    columns = [TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn()]
    with Progress(*columns, disable=not progress, transient=False) as bar:
        task = bar.add_task(sweep.title, total=len(sweep.runs))

        def report(run, outcome):
            if outcome is None:
                bar.console.print(f"[dim]skip[/] {run.name} (finished before)")
            elif outcome.status in ("done", "resumed"):
                bar.console.print(f"[green]done[/] {run.name} ({outcome.wall_s:.0f} s)")
            elif outcome.status == "interrupted":
                bar.console.print(f"[yellow]interrupted[/] {run.name}: rerun the same command to resume it")
            else:
                bar.console.print(
                    f"[red]failed[/] {run.name}: {error_line(outcome.error)} (see {run.output_dir / 'train.out'})"
                )
            if outcome is None or outcome.status != "interrupted":
                bar.advance(task)

        run_local(sweep, sweep.workers, python, report, write_index, sweep.threads_per_run)
    return sweep
