"""Reading run folders for the report: a sweep folder (``index.json``) becomes one :class:`Experiment`, loose run
folders are gathered into one, and each run's ``config.yaml``, ``metrics.json`` and ``log.jsonl`` become a
:class:`RunResult`. Imports no machine-learning library."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from omegaconf import Container, OmegaConf

from mgpo.pipelines.checkpoints import read_json
from mgpo.pipelines.config import read_yaml
from mgpo.pipelines.executors import IN_FLIGHT, record
from mgpo.pipelines.report.labels import (
    DIAGNOSTICS,
    METHOD_FIELDS,
    NO_CAP,
    _apn_caps,
    _order,
    _panel_label,
    method_label,
    trains_at_perturbed_weights,
)
from mgpo.pipelines.runlog import read_log
from mgpo.pipelines.sweep import SEED_FIELD


@dataclass
class RunResult:
    path: Path
    series: str
    panel: str
    seed: int
    status: str
    metrics: dict = field(default_factory=dict)
    steps: list = field(default_factory=list)
    losses: list = field(default_factory=list)
    error: str | None = None
    loss_kind: str = "trained"  # a LOSS_KINDS key: which loss `losses` holds
    diagnostics: dict = field(default_factory=dict)  # DIAGNOSTICS key -> median over the run's logged steps
    # a probed run: its logged `loss` too (minibatch; at the perturbed weights for MGPO), what that curve would say
    trained_steps: list = field(default_factory=list)
    trained_losses: list = field(default_factory=list)
    config: dict = field(default_factory=dict)  # the run's config.yaml


@dataclass
class Experiment:
    title: str
    slug: str
    runs: list[RunResult]
    options: dict
    differences: list[str] = field(default_factory=list)  # loose runs of one method that differ in a setting
    notes: list[str] = field(default_factory=list)  # what the reader must know about how runs were read


def _mapping(cfg: Container) -> dict[Any, Any]:
    """A config mgpo wrote (a run's config.yaml, a sweep's spec: mappings) as plain Python."""
    out = OmegaConf.to_container(cfg)
    assert isinstance(out, dict)
    return out


# A sweep's "skipped" is a run it found finished by an earlier session, not one it left out: said as that.
STATUS_SAID = {"skipped": "done before"}


def _load_run(
    path: Path,
    labels: dict[str, Any] | None,
    status: str,
    error: str | None,
    overrides: list[str] | None = None,
    base: str | None = None,
) -> RunResult:
    status = STATUS_SAID.get(status, status)
    if status in IN_FLIGHT:
        # the index says what the sweep last knew (on Slurm, what it submitted); the run's own record says how it went
        status = record(path).get("state") or status
    if (path / "config.yaml").is_file():
        cfg = _mapping(read_yaml(path / "config.yaml"))
    else:  # a run the sweep has not started: its settings are its base config and the overrides it will start with
        start = read_yaml(base) if base and Path(base).is_file() else OmegaConf.create()
        cfg = _mapping(OmegaConf.merge(start, OmegaConf.from_dotlist(list(overrides or []))))
    labels = labels or {}
    if "method" in labels:
        series = str(labels["method"])
    else:
        series = method_label(cfg)
    panel_axes = [a for a in labels if a not in ("method", SEED_FIELD, *METHOD_FIELDS)]
    panel = ", ".join(_panel_label(a, labels[a]) for a in panel_axes)
    seed = labels.get(SEED_FIELD, cfg.get("training", {}).get("seed", 0))
    metrics = read_json(path / "metrics.json") if (path / "metrics.json").is_file() else {}
    log = read_log(path / "log.jsonl")
    key = "clean_loss" if any("clean_loss" in r for r in log) else "loss"
    kind = "clean" if key == "clean_loss" else "perturbed" if trains_at_perturbed_weights(cfg) else "trained"
    rows = [r for r in log if key in r]
    trained = [r for r in log if "loss" in r] if key == "clean_loss" else []
    diagnostics: dict[str, float | str] = {}
    for name in DIAGNOSTICS:
        got = [r[name] for r in log if isinstance(r.get(name), (int, float)) and np.isfinite(r[name])]
        if got:
            diagnostics[name] = float(np.median(got))
    pert = cfg.get("perturbation") or {}
    if "apn_capped" in diagnostics and not _apn_caps(pert):
        diagnostics["apn_capped"] = NO_CAP  # a rule (or APN off / uncapped) has no cap: 0 "at the cap" misleads
    return RunResult(
        path,
        series,
        panel,
        int(seed),
        # a folder said to be done without metrics.json (a loose run folder still training) is not finished
        status if metrics else ("unfinished" if status in ("", "done", "done before") else status),
        metrics,
        [r["step"] for r in rows],
        [r[key] for r in rows],
        error,
        kind,
        diagnostics,
        [r["step"] for r in trained],
        [r["loss"] for r in trained],
        cfg,
    )


def loss_description(runs: list[RunResult]) -> str:
    """Which training loss the curves and the double-descent measure of these runs use."""
    kinds = {r.loss_kind for r in runs if r.losses}
    if kinds == {"clean"}:
        return "clean training loss (probe)"
    if "clean" not in kinds:
        return "training loss as trained" + (
            " (at the perturbed weights for MGPO, MSAM and the noise methods)" if "perturbed" in kinds else ""
        )
    return "training loss: clean (probe) where logged, else as trained"


def collect(dirs: Sequence[str | Path]) -> list[Experiment]:
    """Sweep folders (with index.json) become one experiment each; loose run folders are gathered into one."""
    experiments, loose = [], []
    for d in map(Path, dirs):
        if (d / "index.json").is_file():
            index = read_json(d / "index.json")
            spec = _mapping(read_yaml(d / "sweep.yaml")) if (d / "sweep.yaml").is_file() else {}
            varying = (
                {a for a in index["runs"][0]["labels"] if len({json.dumps(r["labels"][a]) for r in index["runs"]}) > 1}
                if index["runs"]
                else set()
            )
            # the run folder inside this sweep folder (it may be a copy, e.g. the records kept under docs/), else
            # where the sweep wrote it
            runs = [
                _load_run(
                    d / r["name"] if (d / r["name"]).is_dir() else Path(r["output_dir"]),
                    {a: v for a, v in r["labels"].items() if a in varying or a in ("method", SEED_FIELD)},
                    r["status"],
                    r.get("error"),
                    r.get("overrides"),
                    index.get("base"),
                )
                for r in index["runs"]
            ]
            notes = []
            unstarted = [r.path.name for r in runs if not (r.path / "config.yaml").is_file()]  # as _load_run read them
            if index.get("base") and not Path(index["base"]).is_file() and unstarted:
                notes.append(
                    f"The sweep's base config {index['base']} is not on this machine, so the "
                    f"{len(unstarted)} runs not started yet are labelled from their overrides alone: a "
                    f"method set in the base file may be named wrongly there ({', '.join(unstarted[:5])}"
                    f"{', ...' if len(unstarted) > 5 else ''}). Report from the machine that ran the sweep, "
                    "or from a checkout with that file."
                )
            experiments.append(
                Experiment(index.get("title", d.name), d.name, runs, spec.get("report") or {}, notes=notes)
            )
        elif (d / "config.yaml").is_file():
            loose.append(_load_run(d, None, "done", None))
        else:
            raise FileNotFoundError(
                f"{d} is neither a sweep folder (index.json) nor a run folder (config.yaml): "
                "pass folders written by `mgpo sweep` or `mgpo train`."
            )
    if loose:
        experiments.append(Experiment("runs", "runs", loose, {}, loose_differences(loose)))
    return experiments


def loose_differences(runs: list[RunResult]) -> list[str]:
    """Loose run folders have no grid: every run of one method is taken as a seed of it. The settings in which
    such runs differ (other than the seed and bookkeeping), one line per method, so the report can say so."""
    from mgpo.pipelines.config import BOOKKEEPING_FIELDS
    from mgpo.pipelines.sweep import _flatten

    lines = []
    for s in _order(r.series for r in runs):
        flat = [_flatten(r.config) for r in runs if r.series == s]
        keys = sorted({k for f in flat for k in f} - {*BOOKKEEPING_FIELDS, SEED_FIELD})
        differ = {k: _order(json.dumps(f.get(k)) for f in flat) for k in keys}
        differ = {k: v for k, v in differ.items() if len(v) > 1}
        if differ:
            lines.append(f"{s}: " + "; ".join(f"{k} = {', '.join(v)}" for k, v in differ.items()))
    return lines
