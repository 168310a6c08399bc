"""``mgpo report DIR...``: figures, tables and statistics from sweep folders (or single run folders), written as
``report.md``, a self-contained ``report.html`` (figures embedded), ``runs.csv`` and ``figures/*.png``.

Per experiment (one sweep folder, or all loose run folders together):

- loss curves, one panel per grid value other than method and seed (e.g. rank or learning rate), methods overlaid,
  raw (each seed) faint and smoothed (mean over seeds) bold, shared axes (paper Figures 2-3);
- the double-descent measure and instability count per method and panel (definitions in docs/experiments.md);
  curves and measure use the clean-loss probe (``clean_loss``) where a run logged it, else the loss as trained
  (for MGPO, MSAM and the noise methods the loss at the perturbed weights), and say which;
- the method table: the primary metric, mean +- std over seeds, best in bold (paper Tables 1, 2, 4), with a bar
  chart of the same numbers (paper Figure 4);
- each method minus the baseline, paired by panel and seed, with a 95% t interval; the same for the final clean
  loss and the clean loss's double-descent rise where runs logged the probe;
- the cost table: trainable parameters, peak memory, time per step, each relative to the baseline (Table 3).
"""

from __future__ import annotations

import base64
import csv
import html
import json
import textwrap
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from omegaconf import OmegaConf

from mgpo.pipelines import measures
from mgpo.pipelines.checkpoints import read_json
from mgpo.pipelines.config import read_yaml
from mgpo.pipelines.plots import plt
from mgpo.pipelines.sweep import SEED_FIELD
from mgpo.optim.configs import DEFAULT_RHO, PRESETS, PROFILES
from mgpo.pipelines.runlog import PERTURBED_FORWARD, read_log

# The first of these a run's metrics.json holds is its primary metric (override with --metric).
PRIMARY_METRICS = ("test_accuracy", "test_pearson", "after_accuracy", "after_pass@1", "after_score",
                   "validation_accuracy", "validation_pearson", "test_loss", "validation_loss", "final_clean_loss",
                   "final_loss")
ADAPTER_NAMES = {"lora": "LoRA", "dora": "DoRA", "rslora": "rsLoRA", "pissa": "PiSSA", "loraplus": "LoRA+",
                 "adalora": "AdaLoRA", "lora-ga": "LoRA-GA", "full": "Full FT"}
METHOD_SUFFIX = {"adamw": "", "mgpo": "-MGPO", "msam": " + MSAM", "sam": " + SAM", "random": " + random noise",
                 "ggpo": "-GGPO"}
PRESET_SUFFIX = {"lora": "", "lora-mgpo": "-MGPO", "mgpo-no-apn": "-MGPO w/o APN", "msam": " + MSAM"}
# What follows the last "-" of a label "X-MGPO ..." that names a perturbation added to adapter X.
DASH_SUFFIXES = {"MGPO", "GGPO"}
# Grid axes that name the method when a sweep has no `method:` axis (the label then comes from the config).
METHOD_FIELDS = ("adapter.method", "perturbation.method", "perturbation.preset")
# Paired differences to the baseline on the clean training loss (lower is better): key -> what it is.
CLEAN_LOSS_DIFFS = {"final_clean_loss": "final clean training loss (probe)",
                    "clean_dd_rise_rel": "double-descent rise on the clean loss (fraction of its running minimum)"}
# A run whose clean loss fell by less than this fraction of its start barely trained: its double-descent rise is
# small because there was no descent to rise from, which a lower rise must not be read as (smoother training).
STALLED_FALL = 0.10
# The optimizer's per-step diagnostics (perturbation.diagnostics) the report summarises: key -> column.
DIAGNOSTICS = {"radius_to_weight_mean": "radius / ‖W‖", "radius_to_update_mean": "radius / last update",
               "apn_factor_mean": "radius factor k", "apn_capped": "layers at the APN cap"}
# Columns over several panels (settings): a mean of the panels' means, and the paired differences of every panel
# pooled (each pair still within one panel, but the interval then mixes settings whose spread can differ a lot)
MEAN_OF_PANELS = "mean of panels"
POOLED = "all panels pooled"
NO_CAP = "no cap"  # the apn_capped cell of a run whose radius rule has no APN cap
# Which training loss a run's curve is: the clean-loss probe, or (runs without it) the loss the steps saw.
LOSS_KINDS = {"clean": "clean (probe)", "perturbed": "as trained (at the perturbed weights)",
              "trained": "as trained"}


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


LOWER_IS_BETTER = ("loss", "perplexity", "error", "time", "memory")  # a metric whose name holds one of these


def higher_is_better(metric: str) -> bool:
    return not any(word in metric for word in LOWER_IS_BETTER)


def method_label(cfg: dict) -> str:
    """'LoRA', 'LoRA-MGPO', 'DoRA + SAM', 'DoRA-MGPO rho/10', ... from a run's config.yaml (a preset, when set,
    names itself). An MGPO arm whose rho is not its profile's, or whose radius rule is not APN's, says so: two
    runs share a label only if they share the method."""
    p, a = cfg.get("perturbation", {}), cfg.get("adapter", {})
    adapter = ADAPTER_NAMES.get(a.get("method", "lora"), a.get("method", "?"))
    if p.get("preset"):
        label = adapter + PRESET_SUFFIX.get(p["preset"], f" + {p['preset']}")
        mgpo = PRESETS.get(p["preset"]) is not None
    else:
        method = p.get("method", "adamw")
        label = adapter + METHOD_SUFFIX.get(method, f" + {method}")
        mgpo = method in ("mgpo", "msam")
    if mgpo:
        if p.get("apn") not in (None, "inverse") and (not p.get("preset") or PRESETS[p["preset"]].get("apn") is None):
            label += f" apn={p['apn']}"
        paper = PROFILES.get(p.get("profile"), {}).get("rho", DEFAULT_RHO)
        rho = p.get("rho")
        if rho is not None and not np.isclose(rho, paper):
            label += " rho/10" if np.isclose(rho, paper / 10) else f" rho={rho:g}"
    return label


def _panel_label(axis: str, value) -> str:
    section, _, name = axis.rpartition(".")
    short = section if name == "name" else (name or axis)
    return f"{short}={value}"


# A sweep's "skipped" is a run it found finished by an earlier session, not one it left out: said as that.
STATUS_SAID = {"skipped": "done before"}


def _load_run(path: Path, labels: dict | None, status: str, error: str | None,
              overrides: list[str] | None = None, base: str | None = None) -> RunResult:
    status = STATUS_SAID.get(status, status)
    if (path / "config.yaml").is_file():
        cfg = OmegaConf.to_container(read_yaml(path / "config.yaml"))
    else:  # a run the sweep has not started: its settings are its base config and the overrides it will start with
        start = read_yaml(base) if base and Path(base).is_file() else OmegaConf.create()
        cfg = OmegaConf.to_container(OmegaConf.merge(start, OmegaConf.from_dotlist(list(overrides or []))))
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
    diagnostics = {}
    for name in DIAGNOSTICS:
        got = [r[name] for r in log if isinstance(r.get(name), (int, float)) and np.isfinite(r[name])]
        if got:
            diagnostics[name] = float(np.median(got))
    pert = cfg.get("perturbation") or {}
    if "apn_capped" in diagnostics and (pert.get("apn") not in (None, "inverse") or pert.get("max_scale", 1) is None):
        diagnostics["apn_capped"] = NO_CAP  # a rule (or APN off / uncapped) has no cap: 0 "at the cap" misleads
    return RunResult(path, series, panel, int(seed), status if metrics else (status or "unfinished"), metrics,
                     [r["step"] for r in rows], [r[key] for r in rows], error, kind, diagnostics,
                     [r["step"] for r in trained], [r["loss"] for r in trained], cfg)


def trains_at_perturbed_weights(cfg: dict) -> bool:
    """Whether a run's training forwards ran at perturbed weights (so its logged `loss` is not the clean one)."""
    p = cfg.get("perturbation") or {}
    if p.get("preset"):
        return PRESETS.get(p["preset"]) is not None  # a preset is plain LoRA (None) or an MGPO arm
    return p.get("method", "adamw") in PERTURBED_FORWARD


def loss_description(runs: list[RunResult]) -> str:
    """Which training loss the curves and the double-descent measure of these runs use."""
    kinds = {r.loss_kind for r in runs if r.losses}
    if kinds == {"clean"}:
        return "clean training loss (probe)"
    if "clean" not in kinds:
        return ("training loss as trained" + (" (at the perturbed weights for MGPO, MSAM and the noise methods)"
                                              if "perturbed" in kinds else ""))
    return "training loss: clean (probe) where logged, else as trained"


def collect(dirs: list[str | Path]) -> list[Experiment]:
    """Sweep folders (with index.json) become one experiment each; loose run folders are gathered into one."""
    experiments, loose = [], []
    for d in map(Path, dirs):
        if (d / "index.json").is_file():
            index = read_json(d / "index.json")
            spec = OmegaConf.to_container(read_yaml(d / "sweep.yaml")) if (d / "sweep.yaml").is_file() else {}
            varying = {a for a in index["runs"][0]["labels"]
                       if len({json.dumps(r["labels"][a]) for r in index["runs"]}) > 1} if index["runs"] else set()
            # the run folder inside this sweep folder (it may be a copy, e.g. the records kept under docs/), else
            # where the sweep wrote it
            runs = [_load_run(d / r["name"] if (d / r["name"]).is_dir() else Path(r["output_dir"]),
                              {a: v for a, v in r["labels"].items() if a in varying or a in ("method", SEED_FIELD)},
                              r["status"], r.get("error"), r.get("overrides"), index.get("base"))
                    for r in index["runs"]]
            notes = []
            unstarted = [r.path.name for r in runs if not (r.path / "config.yaml").is_file()]  # as _load_run read them
            if index.get("base") and not Path(index["base"]).is_file() and unstarted:
                notes.append(f"The sweep's base config {index['base']} is not on this machine, so the "
                             f"{len(unstarted)} runs not started yet are labelled from their overrides alone: a "
                             f"method set in the base file may be named wrongly there ({', '.join(unstarted[:5])}"
                             f"{', ...' if len(unstarted) > 5 else ''}). Report from the machine that ran the sweep, "
                             "or from a checkout with that file.")
            experiments.append(Experiment(index.get("title", d.name), d.name, runs, spec.get("report") or {},
                                          notes=notes))
        elif (d / "config.yaml").is_file():
            loose.append(_load_run(d, None, "done", None))
        else:
            raise FileNotFoundError(f"{d} is neither a sweep folder (index.json) nor a run folder (config.yaml): "
                                    "pass folders written by `mgpo sweep` or `mgpo train`.")
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


def _order(values) -> list:
    return list(dict.fromkeys(values))


def _fmt(x, digits: int = 4) -> str:
    """'-' for no value; a NaN or infinite value as itself ('nan', 'inf'), not as a missing one."""
    if x is None:
        return "-"
    return f"{x:.{digits}f}"


def _mean_std(values) -> tuple[float, float]:
    v = np.asarray(values, dtype=float)
    return float(v.mean()), float(v.std(ddof=1)) if len(v) > 1 else 0.0


def mean_std_cell(values, digits: int = 4) -> str:
    """'mean ± std' over seeds (sample std, ddof 1); the mean alone for a single run."""
    if not len(values):
        return "-"
    mean, std = _mean_std(values)
    return _fmt(mean, digits) if len(values) == 1 else f"{_fmt(mean, digits)} ± {_fmt(std, digits)}"


def analyse(exp: Experiment, *, metric: str | None = None, baseline: str | None = None,
            smooth: int | None = None, spike_factor: float | None = None) -> dict:
    """Every number the report shows for one experiment (tables as header + rows of (text, bold) cells)."""
    opts = exp.options
    metric = metric or opts.get("metric")
    smooth = smooth or opts.get("smooth")
    spike_factor = spike_factor or opts.get("spike_factor") or measures.SPIKE_FACTOR
    finished = [r for r in exp.runs if r.metrics]
    seen = {}
    for r in exp.runs:  # one run per method, panel and seed: a second one would count twice in the mean, once
        first = seen.setdefault((r.series, r.panel, r.seed), r)  # in the paired differences
        if first is not r:
            if first.path.resolve() == r.path.resolve():
                raise ValueError(f"{exp.title!r}: the run folder {r.path} is given twice; pass each run once.")
            raise ValueError(
                f"{exp.title!r}: {first.path} and {r.path} are both {r.series}, seed {r.seed}"
                f"{f' in panel {r.panel}' if r.panel else ''}. Runs that differ in another setting (training.lr, "
                "adapter.rank, the data) are not seeds of one method: run them as a sweep with that axis (mgpo "
                "sweep), or report them separately.")
    if metric is not None and finished and not any(metric in r.metrics for r in finished):
        held = sorted({k for r in finished for k, v in r.metrics.items() if isinstance(v, (int, float))})
        raise ValueError(f"metric {metric!r}: no finished run of {exp.title!r} has it in metrics.json; pass "
                         f"--metric with one they have: {', '.join(held)}.")
    if metric is None:
        present = [m for m in PRIMARY_METRICS if finished and all(m in r.metrics for r in finished)]
        metric = present[0] if present else "final_loss"
    series = _order(r.series for r in exp.runs)
    panels = _order(r.panel for r in exp.runs)
    baseline = baseline or opts.get("baseline") or ("LoRA" if "LoRA" in series else series[0])
    if baseline not in series:
        raise ValueError(f"baseline {baseline!r} is not one of the methods in {exp.title!r}: "
                         f"{', '.join(series)}; pass --baseline with one of them.")
    per_run = []
    for r in exp.runs:
        row = {"experiment": exp.title, "series": r.series, "panel": r.panel, "seed": r.seed, "status": r.status,
               "path": str(r.path), "metric": metric, "value": r.metrics.get(metric),
               "loss_curve": LOSS_KINDS[r.loss_kind] if r.losses else None,
               # chance of an accuracy: the split's majority-class share (runs from before it was recorded: None)
               "chance": r.metrics.get(metric[:-len("accuracy")] + "majority") if metric.endswith("accuracy")
               else None}
        if r.losses:
            window = smooth or measures.default_window(len(r.losses))
            row.update({f"dd_{k}": v for k, v in measures.double_descent(r.steps, r.losses, window).items()})
            if r.loss_kind == "clean":
                row["clean_dd_rise_rel"] = row["dd_rise_rel"]
            row["spikes"] = measures.instability_count(r.losses, window, spike_factor)
        if r.trained_losses:  # the same measure on the logged minibatch loss (at the perturbed weights for MGPO)
            window = smooth or measures.default_window(len(r.trained_losses))
            dd = measures.double_descent(r.trained_steps, r.trained_losses, window)
            row.update(trained_dd_window=window, trained_dd_rise_rel=dd["rise_rel"],
                       trained_dd_recovered=dd["recovered"], trained_spikes=measures.instability_count(r.trained_losses, window, spike_factor))
        for k in ("trainable_params", "peak_memory_mb", "time_per_step_s", "load_average", "cpus",
                  "final_clean_loss", "best_clean_loss", "final_loss", "best_loss"):
            row[k] = r.metrics.get(k)
        per_run.append(row)

    def values(s, p, key, rows=per_run):
        return [x[key] for x in rows if x["series"] == s and (p is None or x["panel"] == p)
                and x.get(key) is not None]

    better = higher_is_better(metric)
    # method table: mean ± std per panel, plus the average over panels
    cols = panels + ([MEAN_OF_PANELS] if len(panels) > 1 else [])
    means = {}
    for s in series:
        for p in panels:
            v = values(s, p, "value")
            means[s, p] = float(np.mean(v)) if v else None
        if len(panels) > 1:
            got = [means[s, p] for p in panels]
            means[s, MEAN_OF_PANELS] = float(np.mean(got)) if None not in got else None
    # A partial sweep has more seeds of some methods than of others: their means are over different seeds (a
    # lucky or unlucky extra seed can reorder them), so such a column shows each cell's n and marks no best.
    uneven = {p for p in panels
              if len({frozenset(x["seed"] for x in per_run if x["series"] == s and x["panel"] == p
                                and x["value"] is not None) for s in series} - {frozenset()}) > 1}
    if uneven and MEAN_OF_PANELS in cols:
        uneven.add(MEAN_OF_PANELS)
    best = {}
    for c in cols:
        got = [means[s, c] for s in series if means[s, c] is not None and np.isfinite(means[s, c])]
        best[c] = (max(got) if better else min(got)) if got and c not in uneven else None
    method_rows = []
    for s in series:
        cells = [(s, False)]
        for c in cols:
            text = mean_std_cell(values(s, c, "value")) if c != MEAN_OF_PANELS else _fmt(means[s, c])
            if c in uneven and c != MEAN_OF_PANELS and values(s, c, "value"):
                text += f" (n={len(values(s, c, 'value'))})"
            cells.append((text, means[s, c] is not None and means[s, c] == best[c]))
        method_rows.append(cells)
    method_table = {"header": ["method", *[c or metric for c in cols]], "rows": method_rows,
                    "uneven": [c for c in cols if c in uneven]}

    # paired differences vs the baseline, paired by (panel, seed)
    diff_cols = panels + ([POOLED] if len(panels) > 1 else [])
    diffs = {}

    def diff_row(s: str, ref: str, key: str = "value") -> list:
        cells = [(f"{s} − {ref}", False)]
        for c in diff_cols:
            keys = panels if c == POOLED else [c]
            mine, base = ({(x["panel"], x["seed"]): x[key] for x in per_run
                           if x["series"] == name and x.get(key) is not None and x["panel"] in keys}
                          for name in (s, ref))
            pairs = sorted(set(mine) & set(base))
            d = measures.paired_t([mine[k] for k in pairs], [base[k] for k in pairs])
            stalled = {}
            if key == "clean_dd_rise_rel":  # how many of the paired runs barely trained (STALLED_FALL), per side
                for side in (s, ref):
                    fell = {(x["panel"], x["seed"]): x.get("dd_fall_rel") for x in per_run if x["series"] == side}
                    stalled[side] = sum(fell.get(k) is not None and fell[k] < STALLED_FALL for k in pairs)
            if ref == baseline and key == "value":
                diffs[s, c] = d
            text = _diff_text(d, " *" if d["significant"] else "") if d["n"] else "-"
            if stalled.get(s):
                text += f" ‡ {stalled[s]} stalled"
            if stalled.get(ref):
                text += f" ‡ {ref}: {stalled[ref]} stalled"
            cells.append((text, d["significant"]))
        return cells

    diff_header = ["difference", *[c or metric for c in diff_cols]]
    diff_table = {"header": diff_header, "rows": [diff_row(s, baseline) for s in series if s != baseline]}
    # each "X-MGPO" ("X-GGPO", ...) against its own "X": what adding the perturbation did to that adapter; not
    # "LoRA-GA" against "LoRA", which is another adapter
    own = [(s, ref) for s in series if "-" in s and s.rsplit("-", 1)[1].split(" ")[0] in DASH_SUFFIXES
           and (ref := s.rsplit("-", 1)[0]) in series and ref != baseline]
    own_table = {"header": diff_header, "rows": [diff_row(s, ref) for s, ref in own]} if own else None
    # the clean training loss against the baseline's, where the baseline's runs have it
    loss_diff_tables = []
    for key, what in CLEAN_LOSS_DIFFS.items():
        if any(x["series"] == baseline and x.get(key) is not None for x in per_run):
            rows = [diff_row(s, baseline, key) for s in series if s != baseline]
            if rows:
                header = ["difference", *[c or key for c in diff_cols]]
                loss_diff_tables.append((what, {"header": header, "rows": rows}))

    # double descent: per panel and method, averaged over seeds
    dd_rows = []
    with_trained = any("trained_spikes" in x for x in per_run)
    for p in panels:
        for s in series:
            rows = [x for x in per_run if x["series"] == s and x["panel"] == p and "dd_rise" in x]
            if not rows:
                continue
            rec = [x["dd_recover_steps"] for x in rows if x["dd_recover_steps"] is not None]
            curves = sorted({x["loss_curve"] for x in rows})
            dd_rows.append([(p or "-", False), (s, False), (" / ".join(curves), False),
                            (mean_std_cell([100 * x["dd_fall_rel"] for x in rows], 1), False),
                            (f"{sum(x['dd_fall_rel'] < STALLED_FALL for x in rows)}/{len(rows)}", False),
                            (mean_std_cell([x["dd_rise"] for x in rows]), False),
                            (mean_std_cell([100 * x["dd_rise_rel"] for x in rows], 1), False),
                            (_fmt(np.mean([x["dd_peak_step"] for x in rows if x["dd_peak_step"] is not None]), 0)
                             if any(x["dd_peak_step"] is not None for x in rows) else "-", False),
                            (_fmt(np.mean(rec), 0) if rec else "-", False),
                            (f"{sum(not x['dd_recovered'] for x in rows)}/{len(rows)}", False),
                            (mean_std_cell([x["spikes"] for x in rows], 1), False)])
            if with_trained:  # what the logged minibatch loss (perturbed weights for MGPO) would have said
                got = [x for x in rows if "trained_spikes" in x]
                cells = [mean_std_cell([100 * x["trained_dd_rise_rel"] for x in got], 1),
                         f"{sum(not x['trained_dd_recovered'] for x in got)}/{len(got)}",
                         mean_std_cell([x["trained_spikes"] for x in got], 1)] if got else ["-"] * 3
                dd_rows[-1] += [(c, False) for c in cells]
    dd_table = {"header": ["panel", "method", "loss", "fell (% of start)",
                           f"stalled (fell < {100 * STALLED_FALL:g}%)", "rise (loss)", "rise (% of min)",
                           "peak step", "steps to recover", "not recovered", f"spikes (> {spike_factor:g}× median)"]
                + (["logged loss: rise (% of min)", "logged loss: not recovered", "logged loss: spikes"]
                   if with_trained else []),
                "rows": dd_rows}

    # cost, relative to the baseline in the same panel: a rank or a model changes the cost, and methods with
    # unequal numbers of finished runs per panel would otherwise be averaged over different panels
    cost_rows = []
    with_load = any(x.get("load_average") for x in per_run)
    by_panel = len(panels) > 1
    for p in panels if by_panel else [None]:
        for s in series:
            cells = [(p or "-", False)] if by_panel else []
            cells.append((s, False))
            for k, digits in (("trainable_params", 0), ("peak_memory_mb", 0), ("time_per_step_s", 3)):
                v, b = values(s, p, k), values(baseline, p, k)
                mean = float(np.mean(v)) if v else None
                ratio = mean / float(np.mean(b)) if v and b and np.mean(b) > 0 else None
                cells += [(f"{mean:,.{digits}f}" if mean is not None else "-", False),
                          (f"{ratio:.2f}×" if ratio is not None else "-", False)]
            if with_load:  # wall time also counts waiting for cores other processes held
                mine = [x for x in per_run if x["series"] == s and (p is None or x["panel"] == p)
                        and x.get("load_average")]
                cpus = "/".join(str(c) for c in _order(x.get("cpus") or "?" for x in mine))
                cells.append((f"{np.mean([x['load_average'][1] for x in mine]):.1f} / {cpus}" if mine else "-",
                              False))
            cost_rows.append(cells)
    cost_table = {"header": (["panel"] if by_panel else []) + [
                      "method", "trainable params", "× " + baseline, "peak memory (MB)", "× " + baseline,
                      "time / step (s)", "× " + baseline]
                  + (["load (5-min avg at end) / CPUs"] if with_load else []), "rows": cost_rows}
    # the perturbation's size, per method and panel: medians over each run's steps, averaged over seeds
    diag_rows = []
    for p in panels:
        for s in series:
            runs = [r for r in exp.runs if r.series == s and r.panel == p and r.diagnostics]
            if runs:
                diag_rows.append([(p or "-", False), (s, False)] + [
                    (_diag_cell([r.diagnostics[k] for r in runs if k in r.diagnostics]), False)
                    for k in DIAGNOSTICS])
    diag_table = {"header": ["panel", "method", *DIAGNOSTICS.values()], "rows": diag_rows}
    failed = [(r.path.name, r.status, r.error or "no metrics.json") for r in exp.runs if not r.metrics]
    no_loss = [r.path.name for r in exp.runs if r.metrics and not r.losses]  # finished, but no loss ever logged
    fallback = [r.path.name for r in exp.runs if r.losses and r.loss_kind != "clean"]  # runs without the probe
    mixed = bool(fallback) and any(r.loss_kind == "clean" for r in exp.runs if r.losses)
    return {"loss": loss_description(exp.runs), "no_clean_loss": fallback, "mixed_losses": mixed, "metric": metric,
            "better": better, "baseline": baseline, "series": series, "panels": panels,
            "per_run": per_run, "means": means, "diffs": diffs, "method_table": method_table,
            "diff_table": diff_table, "own_table": own_table, "loss_diff_tables": loss_diff_tables,
            "dd_table": dd_table, "cost_table": cost_table,
            "diag_table": diag_table,
            "failed": failed, "no_loss": no_loss, "smooth": smooth, "spike_factor": spike_factor}


def _diag_cell(got: list) -> str:
    if not got:
        return "-"
    if NO_CAP in got:
        return NO_CAP if all(g == NO_CAP for g in got) else "mixed: some runs have no cap"
    return _fmt(np.mean(got), 4)


# ---------------------------------------------------------------- figures

def _colors(n: int) -> list:
    """matplotlib's default cycle; past its 10 colours, tab20 (so no two methods share a colour)."""
    default = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    return default if n <= len(default) else [plt.get_cmap("tab20")(i % 20) for i in range(n)]


def plot_curves(exp: Experiment, result: dict, out_png: Path) -> Path:
    """One panel per panel value, methods overlaid: raw loss of each seed faint, seed-mean of the smoothed loss bold."""
    panels, series = result["panels"], result["series"]
    ncols = min(4, len(panels))
    nrows = -(-len(panels) // ncols)
    width = max(8.0, 4.2 * ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(width, 3.4 * nrows + 1.2), dpi=110, sharex=True,
                             sharey=True, squeeze=False)
    colors = _colors(len(series))
    counts = {s: [] for s in series}  # seeds in each panel's mean, per method
    for ax, panel in zip(axes.flat, panels):
        for i, s in enumerate(series):
            runs = [r for r in exp.runs if r.series == s and r.panel == panel and r.losses]
            if not runs:
                continue
            color = colors[i % len(colors)]
            first = runs[0]
            window = result["smooth"] or measures.default_window(len(first.losses))
            for r in runs:
                ax.plot(r.steps, r.losses, color=color, alpha=0.2, linewidth=0.7)
            same = [r for r in runs if r.steps == first.steps]
            mean = np.mean([measures.smooth(r.losses, window) for r in same], axis=0)
            ax.plot(first.steps, mean, color=color, linewidth=2, label=s)
            counts[s].append(len(same))
        ax.set_title(panel or "", fontsize=10)
        ax.grid(alpha=0.3)
    for ax in axes[-1]:
        ax.set_xlabel("optimizer step")
    for ax in axes[:, 0]:
        ax.set_ylabel("clean training loss (probe)" if result["loss"].startswith("clean") else "training loss")
    for ax in list(axes.flat)[len(panels):]:
        ax.set_visible(False)
    # one entry per method (its colour is the same in every panel), with the seeds behind each panel's mean:
    # a label per seed count listed one method twice, without saying which panel each entry belonged to
    handles, labels = _legend_entries(axes)
    labels = [s + ("" if counts[s] == [1] * len(counts[s]) else f" (mean of {counts[s][0]} seeds)"
                   if len(set(counts[s])) == 1 else f" (seeds per panel: {', '.join(map(str, counts[s]))})")
              for s in labels]
    per_row = 4 if width >= 12 else 2  # long labels ("LoRA-MGPO (APN normalized) (mean of 3 seeds)") need room
    fig.suptitle(f"{exp.title}\n{result['loss']}\nfaint: raw, each seed; bold: moving average, mean over seeds",
                 fontsize=11)
    fig.tight_layout()
    # below the panels; _save's tight bounding box takes it in, so nothing is cut off
    fig.legend(handles, labels, loc="upper center", bbox_to_anchor=(0.5, 0.0), ncol=min(len(labels), per_row),
               frameon=False, fontsize=9)
    return _save(fig, out_png)


def _legend_entries(axes):
    seen = {}
    for ax in axes.flat:
        for h, label in zip(*ax.get_legend_handles_labels()):
            seen.setdefault(label, h)
    return list(seen.values()), list(seen)


def _panel_chance(result: dict, panel) -> tuple[float | None, str | None]:
    """The chance level of a panel's accuracy bars: the majority-class share its finished runs recorded, where
    they all recorded one and it is the same (runs evaluated on different splits have no common chance line).
    Else None and why not (None when no run recorded one: an accuracy from before the share was recorded)."""
    got = [x["chance"] for x in result["per_run"] if x["panel"] == panel and x["value"] is not None]
    if not any(c is not None for c in got):
        return None, None
    if any(c is None for c in got):
        return None, f"{sum(c is None for c in got)} of its {len(got)} runs did not record it"
    if max(got) - min(got) > 1e-9:
        return None, f"its runs recorded different shares ({min(got):.4f}-{max(got):.4f}: different splits)"
    return got[0], None


def plot_metric_bars(exp: Experiment, result: dict, out_png: Path) -> Path:
    """Grouped bars (paper Figure 4): one group per panel, one bar per method, error bars = std over seeds."""
    panels, series, metric = result["panels"], result["series"], result["metric"]
    fig, ax = plt.subplots(figsize=(max(5.5, 1.1 * len(panels) * len(series) * 0.55 + 2), 3.8), dpi=110)
    width = 0.8 / len(series)
    x = np.arange(len(panels))
    extents, colors = [], _colors(len(series))
    for i, s in enumerate(series):
        stats = [_mean_std([r["value"] for r in result["per_run"] if r["series"] == s and r["panel"] == p
                            and r["value"] is not None] or [np.nan]) for p in panels]
        counts = [sum(r["series"] == s and r["panel"] == p and r["value"] is not None for r in result["per_run"])
                  for p in panels]
        bars = ax.bar(x + (i - (len(series) - 1) / 2) * width, [m for m, _ in stats], width,
                      yerr=[e for _, e in stats], capsize=3, label=s, color=colors[i])
        # each bar says its number of seeds: a mean of 2 seeds beside one of 5 must not read the same
        ax.bar_label(bars, [f"n={n}" if n else "" for n in counts], label_type="center", fontsize=6, rotation=90,
                     color="white")
        extents += [v for m, e in stats if np.isfinite(m) for v in (m - e, m + e)]
    labelled = False
    for j, p in enumerate(panels):
        chance, _ = _panel_chance(result, p)
        if chance is not None:  # without it, a bar at 0.5 of a balanced split reads as half-way to perfect
            ax.hlines(chance, x[j] - 0.45, x[j] + 0.45, colors="black", linestyles="--", linewidth=1,
                      **({} if labelled else {"label": "chance (majority class)"}))
            labelled = True
            extents.append(chance)
    ax.set_xticks(x, [p or metric for p in panels], fontsize=9)
    ax.set_ylabel(metric)
    if extents and min(extents) >= 0:
        # A bar's length is its value, so the axis starts at 0: zoomed on the bars' tops, equal scores of 1.0
        # got an axis of 0.99-1.01 and small differences looked large. The tables hold the exact numbers.
        ax.set_ylim(0, max(extents) * 1.05 or 1)
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=8, ncol=min(len(series), 3), loc="upper center", bbox_to_anchor=(0.5, -0.12), frameon=False)
    ax.set_title(f"{textwrap.fill(exp.title, 70)}\n{metric} ({'higher' if result['better'] else 'lower'} is "
                 "better); bars: mean over the n seeds written on each, whiskers: std", fontsize=10)
    fig.tight_layout()
    return _save(fig, out_png)


def plot_dd(exp: Experiment, result: dict, out_png: Path) -> Path:
    """Relative double-descent rise per panel (e.g. rank or learning rate), one line per method."""
    panels, series = result["panels"], result["series"]
    fig, ax = plt.subplots(figsize=(6.5, 3.8), dpi=110)
    # Panels are separate settings (a rank, a learning rate), not points on one axis: no line joins them, and each
    # method sits a little beside the panel's tick so the whiskers do not cover each other.
    step = 0.6 / max(len(series), 1)
    for j, (s, color) in enumerate(zip(series, _colors(len(series)))):
        xs = [x + (j - (len(series) - 1) / 2) * step for x in range(len(panels))]
        got = [[r for r in result["per_run"] if r["series"] == s and r["panel"] == p and "dd_rise_rel" in r]
               for p in panels]
        stats = [_mean_std([100 * r["dd_rise_rel"] for r in rows] or [np.nan]) for rows in got]
        # a run that never trained has no descent to rise from: its low rise must not read as smooth training.
        # Counts go in the legend (labels beside the points overlapped where stalled methods all sit near 0).
        stalled = [sum(r["dd_fall_rel"] < STALLED_FALL for r in rows) for rows in got]
        label = s + (f" (stalled per panel: {', '.join(f'{k}/{len(rows)}' for k, rows in zip(stalled, got))})"
                     if any(stalled) else "")
        ax.errorbar(xs, [m for m, _ in stats], yerr=[e for _, e in stats], marker="o", capsize=3, linestyle="none",
                    label=label, color=color)
        for x, k, (mean, _) in zip(xs, stalled, stats):
            if k:
                ax.plot(x, mean, marker="o", markersize=11, markerfacecolor="none", markeredgecolor=color)
    ax.set_xticks(range(len(panels)), panels, fontsize=9)
    ax.set_ylabel("double-descent rise (% of running min)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.12), frameon=False)  # off the points
    ax.set_title(f"{textwrap.fill(exp.title, 70)}\ndouble-descent rise: mean over seeds, whiskers: std; lower = "
                 f"smaller rise\nringed, 'stalled k/n': k seeds' loss fell < {100 * STALLED_FALL:g}% (never "
                 "trained), no descent to rise from", fontsize=9)
    fig.tight_layout()
    return _save(fig, out_png)


def _diff_text(d: dict, mark: str = "") -> str:
    """A paired difference as the tables print it; ``mark`` follows an interval (" *", " worse *", ...)."""
    if d["nonfinite"]:
        return f"non-finite in {d['nonfinite']} of {d['n']} pairs"
    if d["low"] is None:
        return f"{d['mean']:+.4f} (n=1)"
    if d["no_spread"]:  # every pair differs by the same amount (both 0: no rise in any run)
        return f"{d['mean']:+.4f} in all {d['n']} pairs (no spread: no interval)"
    return f"{d['mean']:+.4f} [{d['low']:+.4f}, {d['high']:+.4f}] n={d['n']}{mark}"


def _judged(d: dict, higher_better: bool) -> bool | None:
    """A paired difference's verdict: True significantly better, False significantly worse, None neither."""
    return (d["low"] > 0) == higher_better if d["significant"] else None


def _compared_columns(results: list[dict]) -> list[tuple[int, str]]:
    """(experiment index, panel) of every panel with a method besides the baseline: a sweep of the baseline alone
    (full fine-tuning at its own rates) has nothing to compare and gets no column in the table or the figure."""
    return [(i, p) for i, res in enumerate(results) for p in res["panels"]
            if any(s != res["baseline"] for s in res["series"])]


def _in_panel(res: dict, series: str, panel) -> bool:
    """Whether a sweep ran a method in a panel at all (finished or not): a sweep built from a list of grids can run
    a method in one setting only, and elsewhere it is absent, not pending."""
    return any(r["series"] == series and r["panel"] == panel for r in res["per_run"])


def plot_verdicts(results: list[dict], titles: list[str], out_png: Path) -> Path | None:
    """The across-experiments table as a figure: one panel per sweep and setting, each of its methods' paired
    difference to that sweep's baseline as a point with its 95% t interval, a line at 0. Red: significantly worse;
    green: significantly better; grey: the interval holds 0. A panel's own scale: the metrics differ between sweeps.
    Each panel lists only its own sweep's methods (the table says where a method did not run): with every method
    of every sweep on every panel, six sweeps made a figure of mostly "not in this sweep"."""
    cols = _compared_columns(results)
    if len(results) < 2 or not cols:
        return None
    names = {(i, p): [s for s in results[i]["series"] if s != results[i]["baseline"] and _in_panel(results[i], s, p)]
             for i, p in cols}
    ncols = min(3, len(cols))
    nrows = -(-len(cols) // ncols)
    # a row of panels is as tall as its longest list of methods
    heights = [max(len(names[c]) for c in cols[r * ncols:(r + 1) * ncols]) for r in range(nrows)]
    fig, axes = plt.subplots(nrows, ncols, figsize=(4.6 * ncols, sum(0.38 * h + 1.6 for h in heights)), dpi=110,
                             squeeze=False, gridspec_kw={"height_ratios": [0.38 * h + 1.6 for h in heights]})
    for j, (ax, (i, p)) in enumerate(zip(axes.flat, cols)):
        res, height = results[i], heights[j // ncols]
        ys = {s: height - 1 - k for k, s in enumerate(names[i, p])}  # first method on top
        ax.axvline(0, color="black", linewidth=0.8, linestyle="--")
        for s, y in ys.items():
            d = res["diffs"].get((s, p))
            if d is None or not d["n"] or d["nonfinite"]:
                ax.text(0.5, y, "non-finite" if d and d["nonfinite"] else "no pairs yet",
                        transform=ax.get_yaxis_transform(), ha="center", va="center", fontsize=7, color="grey")
                continue
            good = _judged(d, res["better"])
            color = {True: "tab:green", False: "tab:red", None: "tab:grey"}[good]
            err = None if d["low"] is None else [[d["mean"] - d["low"]], [d["high"] - d["mean"]]]
            ax.errorbar([d["mean"]], [y], xerr=err, marker="o", capsize=3, color=color, linestyle="none")
            ax.annotate(f"n={d['n']}" + (", no spread" if d["no_spread"] else ""), (d["mean"], y),
                        textcoords="offset points", xytext=(0, 5), ha="center", fontsize=6, color=color)
        arrow = "higher is better →" if res["better"] else "← lower is better"
        ax.set_xlabel(f"{res['metric']} − {res['baseline']}\n({arrow})", fontsize=8)
        ax.set_title(textwrap.fill(f"{titles[i]}{f' ({p})' if p else ''}", 45), fontsize=8)
        ax.set_yticks(list(ys.values()), list(ys), fontsize=8)
        ax.set_ylim(-0.7, height - 0.3)
        ax.tick_params(axis="x", labelsize=7)
        ax.grid(axis="x", alpha=0.3)
    for ax in list(axes.flat)[len(cols):]:
        ax.set_visible(False)
    fig.tight_layout()
    # above the panels (savefig's tight box takes it in): placed inside, it covered the top panels' titles
    fig.suptitle("Each method minus its sweep's baseline, paired by seed: mean and 95% t interval\n"
                 "red: significantly worse, green: significantly better, grey: the interval holds 0", fontsize=10,
                 y=1.0, va="bottom")
    return _save(fig, out_png)


def _save(fig, out_png: Path) -> Path:
    out_png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_png, bbox_inches="tight")  # nothing clipped, whatever the title and legend lengths
    plt.close(fig)
    return out_png


# ---------------------------------------------------------------- documents

def _md_table(table: dict) -> str:
    head = "| " + " | ".join(table["header"]) + " |\n|" + "---|" * len(table["header"]) + "\n"
    body = "".join("| " + " | ".join(f"**{t}**" if b else t for t, b in row) + " |\n" for row in table["rows"])
    return head + body


def _html_table(table: dict) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in table["header"])
    def cell(text: str, bold: bool) -> str:
        numeric = text[:1].isdigit() or text[:2].lstrip("+-−")[:1].isdigit() or text == "-"
        inner = f"<strong>{html.escape(text)}</strong>" if bold else html.escape(text)
        return f"<td>{inner}</td>" if numeric else f"<td class='text'>{inner}</td>"

    body = "".join("<tr>" + "".join(cell(t, b) for t, b in row) + "</tr>" for row in table["rows"])
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _blocks(exp: Experiment, result: dict, figures: list[tuple[Path, str]]) -> list[tuple]:
    n_done = sum(1 for r in exp.runs if r.metrics)
    m, base = result["metric"], result["baseline"]
    walls = [r.metrics["wall_time_s"] for r in exp.runs if r.metrics.get("wall_time_s") is not None]
    wall = (f" Wall time of the finished runs: {sum(walls) / 3600:.2f} h in all ({len(walls)} runs; each run's "
            "`wall_time_s`: model loading, training and evaluation over all its sessions, less the work an "
            "interrupted session did after its last checkpoint)." if walls else "")
    blocks = [("h2", exp.title),
              ("p", f"{n_done} of {len(exp.runs)} runs finished; methods: {', '.join(result['series'])}; "
                    f"primary metric `{m}` ({'higher' if result['better'] else 'lower'} is better); baseline: "
                    f"{base}.{wall}")]
    blocks += [("p", note) for note in exp.notes]
    if exp.differences:
        blocks.append(("p", "These run folders are not a sweep, so all runs of one method are taken as its seeds; "
                            "but they differ in more than the seed: " + " | ".join(exp.differences) + ". Their "
                            "means and paired differences mix those settings: run them as a sweep with that axis."))
    for png, caption in figures:
        blocks.append(("img", png, caption))
    blocks.append(("h3", f"{m}: mean ± std over seeds (best in bold)"))
    if result["method_table"]["uneven"]:
        blocks.append(("p", "Not all methods have the same finished seeds in "
                            f"{', '.join(c or m for c in result['method_table']['uneven'])}: there each cell says "
                            "its number of seeds n, and no best is marked, as means over different seeds do not "
                            "rank the methods. The paired differences below compare only the seeds both have."))
    blocks.append(("table", result["method_table"]))
    chance = {p: _panel_chance(result, p) for p in result["panels"]}
    said = [f"{p + ': ' if p else ''}{c:.4f}" for p, (c, _) in chance.items() if c is not None]
    gaps = [f"{p or m}: {why}" for p, (_, why) in chance.items() if why]
    if said or gaps:
        blocks.append(("p", "Chance (always guessing the most frequent label of the split the metric is taken on, "
                            "as each run recorded it): " + ("; ".join(said) + " (the dashed line in the figure)"
                                                            if said else "none common to a panel")
                       + (". No chance line for " + "; ".join(gaps) if gaps else "") + "."))
    if result["diff_table"]["rows"]:
        blocks += [("h3", f"Difference to {base}, paired by seed: mean [95% t interval]"),
                   ("p", "Bold and * : the interval excludes 0. Student t interval of the n paired differences "
                         "(n-1 degrees of freedom); n=1: no interval."),
                   ("table", result["diff_table"])]
    else:  # one method: an empty table of differences would look like a failure
        blocks.append(("p", f"Only one method ({base}): nothing to compare it with, so no differences."))
    if result.get("own_table"):
        blocks += [("h3", "Each variant with the perturbation minus the same variant without, paired by seed"),
                   ("table", result["own_table"])]
    for what, table in result.get("loss_diff_tables", []):
        note = "Lower is better. Bold and * : the interval excludes 0."
        if what == CLEAN_LOSS_DIFFS["clean_dd_rise_rel"]:
            note += (f" ‡ k stalled: in k of the n pairs the method's clean loss fell by less than "
                     f"{100 * STALLED_FALL:g}% of its start, so it had no descent to rise from; a lower rise there "
                     f"means it did not train, not that it trained more smoothly. ‡ {base}: k stalled: the same "
                     f"for {base}'s runs, whose missing rise makes the method's look larger.")
        blocks += [("h3", f"Difference to {base} in the {what}, paired by seed: mean [95% t interval]"),
                   ("p", note), ("table", table)]
    blocks += [("h3", "Double descent (smoothed training loss above its running minimum; means over seeds)"),
               ("p", _loss_note(result))]
    if result["no_loss"]:
        blocks.append(("p", f"No logged training loss (training.max_steps below training.logging_steps?), so not "
                            f"in the curves or this table: {', '.join(result['no_loss'])}."))
    blocks += [("table", result["dd_table"]),
               ("h3", f"Cost relative to {base}"),
               ("p", "Time per step is wall time: it also counts the time other processes held the cores. Where the "
                     "load column is above the number of CPUs, the runs shared the machine and their times are not "
                     "a measure of cost (the cpu-cost sweep and benchmarks/ measure cost alone)."),
               ("table", result["cost_table"])]
    if result["diag_table"]["rows"]:
        blocks += [("h3", "Perturbation size (median over logged steps, mean over seeds)"),
                   ("p", "radius / ‖W‖: each layer's perturbation radius ‖eps_l‖ over its weight norm ‖W0 + s B A‖; "
                         "radius / last update: over the size of the layer's last update (a look-ahead of that many "
                         "steps); radius factor k: what rho is multiplied by, the APN factor min(1/gbar, max_scale) "
                         "(1 without APN), or for the radius rules ‖W_l‖ (apn=weight) and ‖W_l(t) − W_l(t−1)‖ "
                         "(apn=update); share of layers at the APN cap. Means over the perturbed layers at each "
                         "step (docs/method.md, section 13). A layer perturbed in factor space (AdaLoRA; full "
                         "fine-tuning's tensors) has its radius and sizes taken over the tensors it moves: ‖W‖ is "
                         "their norm, a bias's or a LayerNorm's included."),
                   ("table", result["diag_table"])]
    if result["failed"]:
        blocks += [("h3", "Runs without results"),
                   ("table", {"header": ["run", "status", "error"],
                              "rows": [[(a, False), (b, False), (c.splitlines()[-1][:200], False)]
                                       for a, b, c in result["failed"]]})]
    return blocks


def _loss_note(result: dict) -> str:
    """Which loss the curves and the double-descent measure use, and a warning when runs differ in it."""
    note = (f"Loss used for the curves and this table: {result['loss']} (column `loss`). `clean (probe)` is "
            "`clean_loss`, the mean loss of a fixed set of training examples at the clean weights, the same "
            "measurement for every method; `as trained` is the logged `loss`, which for MGPO, MSAM and the noise "
            "methods is the loss at the perturbed weights.")
    windows = _order(x["dd_window"] for x in result["per_run"] if "dd_window" in x)
    if windows:
        trained = _order(x["trained_dd_window"] for x in result["per_run"] if "trained_dd_window" in x)
        note += (f" Smoothed: trailing moving average over {' / '.join(map(str, windows))} logged points"
                 + (f" (the logged-loss columns: {' / '.join(map(str, trained))})" if trained else "") + ". Rise: "
                 "the largest amount the smoothed loss climbs above its running minimum. `peak step`: mean over "
                 "the seeds with a rise; `steps to recover`: mean over the seeds that got back to that minimum "
                 "(`not recovered` counts the others); spikes: logged losses above the factor times the median of "
                 "the window before them.")
    if result["no_clean_loss"] and result["mixed_losses"]:
        note += (f" Runs without `clean_loss` (logged before the probe existed, or with "
                 f"`training.clean_loss_every=0`) fall back to the loss as trained, so they are not measured like "
                 f"the others: {', '.join(result['no_clean_loss'])}.")
    elif result["no_clean_loss"]:
        note += (" No run here logged `clean_loss` (runs from before the probe, or `training.clean_loss_every=0`): "
                 "the loss as trained is used, so an MGPO run's look-ahead loss is compared with a plain run's "
                 "clean one.")
    return note


def _inline(text: str) -> str:
    """Markdown's `code` as <code> in HTML."""
    parts = html.escape(text).split("`")
    return "".join(f"<code>{p}</code>" if i % 2 else p for i, p in enumerate(parts))


def write_markdown(blocks: list[tuple], out: Path, title: str) -> Path:
    lines = [f"# {title}\n"]
    for b in blocks:
        if b[0] in ("h2", "h3"):
            lines.append(f"{'#' * int(b[0][1])} {b[1]}\n")
        elif b[0] == "p":
            lines.append(b[1] + "\n")
        elif b[0] == "img":
            lines.append(f"![{b[2]}]({b[1].relative_to(out.parent).as_posix()})\n")
        else:
            lines.append(_md_table(b[1]))
    out.write_text("\n".join(lines))
    return out


CSS = """body{font-family:system-ui,sans-serif;max-width:1180px;margin:2em auto;padding:0 1em;color:#222}
table{border-collapse:collapse;margin:.5em 0 1.5em;font-size:.9em}th,td{border:1px solid #ccc;padding:.3em .6em;
text-align:right}th{background:#f3f3f3}td.text,th:first-child{text-align:left}
figure{margin:1em 0}img{max-width:100%;border:1px solid #eee}figcaption{color:#555;font-size:.9em}
h2{border-bottom:2px solid #ddd;padding-bottom:.2em;margin-top:2em}code{background:#f3f3f3;padding:0 .2em}"""


def write_html(blocks: list[tuple], out: Path, title: str) -> Path:
    parts = [f"<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
             f"<link rel='icon' href='data:,'><style>{CSS}</style></head><body><h1>{html.escape(title)}</h1>"]
    for b in blocks:
        if b[0] in ("h2", "h3"):
            parts.append(f"<{b[0]}>{html.escape(b[1])}</{b[0]}>")
        elif b[0] == "p":
            parts.append(f"<p>{_inline(b[1])}</p>")
        elif b[0] == "img":
            data = base64.b64encode(b[1].read_bytes()).decode()
            parts.append(f"<figure><img src='data:image/png;base64,{data}' alt='{html.escape(b[2])}'>"
                         f"<figcaption>{html.escape(b[2])}</figcaption></figure>")
        else:
            parts.append(_html_table(b[1]))
    parts.append("</body></html>")
    out.write_text("\n".join(parts))
    return out


def write_runs_csv(results: list[dict], out: Path) -> Path:
    rows = [r for res in results for r in res["per_run"]]
    keys = _order(k for r in rows for k in r)
    with out.open("w", newline="") as f:
        writer = csv.DictWriter(f, keys)
        writer.writeheader()
        writer.writerows(rows)
    return out


def verdict_table(results: list[dict], titles: list[str]) -> dict | None:
    """Across experiments: each method minus its experiment's baseline on the primary metric, per panel (paired t
    interval, the numbers of each experiment's difference table), and where it is significantly worse. The
    question a rule must pass to be shipped: never significantly worse than the baseline on any task. A method
    is judged only in the sweeps that ran it; a non-finite value (a NaN Pearson r) counts as a failure."""
    cols = _compared_columns(results)
    series = _order(s for res in results for s in res["series"] if s != res["baseline"])
    if len(results) < 2 or not series:  # one experiment: its own difference table says it all
        return None
    name = {(i, p): f"{titles[i]}{f' ({p})' if p else ''}" for i, p in cols}
    header = ["method"] + [f"{name[c]}: {results[c[0]]['metric']} − {results[c[0]]['baseline']}" for c in cols] + [
        "significantly worse in"]
    rows = []
    for s in series:
        cells, worse, pending, judged = [(s, False)], [], 0, 0
        for i, p in cols:
            d = results[i]["diffs"].get((s, p))
            if s not in results[i]["series"]:
                cells.append(("not in this sweep", False))
                continue
            if not _in_panel(results[i], s, p):
                cells.append(("not in this setting", False))
                continue
            judged += 1
            if d is None or not d["n"]:
                cells.append(("no pairs yet", False))
                pending += 1
            elif d["nonfinite"]:
                cells.append((_diff_text(d), False))
                worse.append(f"{name[i, p]} (non-finite)")
            elif d["low"] is None or d["no_spread"]:
                cells.append((_diff_text(d), False))
                pending += 1
            else:
                good = _judged(d, results[i]["better"])
                if good is False:
                    worse.append(name[i, p])
                tag = " better *" if good else " worse *" if good is False else ""
                cells.append((_diff_text(d, tag), good is not None))
        if worse:
            verdict = ", ".join(worse)
        elif not pending:
            verdict = "nowhere"
        elif pending < judged:
            verdict = f"nowhere yet ({pending} of {judged} without an interval)"
        else:
            verdict = "no interval yet (n < 2 everywhere)"
        cells.append((verdict, False))
        rows.append(cells)
    return {"header": header, "rows": rows}


def make_report(dirs: list[str | Path], out_dir: str | Path = "report", *, title: str = "mgpo experiments",
                metric: str | None = None, baseline: str | None = None, smooth: int | None = None,
                spike_factor: float | None = None) -> dict:
    """Write report.md, report.html, runs.csv and figures/ under ``out_dir``; returns their paths."""
    out_dir = Path(out_dir)
    (out_dir / "figures").mkdir(parents=True, exist_ok=True)
    experiments = collect(dirs)
    blocks, results, figures_all = [], [], []
    for exp in experiments:
        if not any(r.metrics or r.losses for r in exp.runs):
            blocks += [("h2", exp.title), ("p", "No run of this experiment has produced a log yet.")]
            continue
        result = analyse(exp, metric=metric, baseline=baseline, smooth=smooth, spike_factor=spike_factor)
        results.append(result)
        logged = any(r.losses for r in exp.runs)  # else no curve and no double descent to draw (result["no_loss"])
        figs = [(plot_curves(exp, result, out_dir / "figures" / f"{exp.slug}-loss.png"),
                 f"{exp.title}: {result['loss']}, per {'panel' if any(result['panels']) else 'method'}")
                ] if logged else []
        if any(r["value"] is not None for r in result["per_run"]):
            bars = out_dir / "figures" / f"{exp.slug}-{_file(result['metric'])}.png"
            figs.append((plot_metric_bars(exp, result, bars), f"{exp.title}: {result['metric']} per method"))
        if len(result["panels"]) > 1 and logged:
            figs.append((plot_dd(exp, result, out_dir / "figures" / f"{exp.slug}-double-descent.png"),
                         f"{exp.title}: double-descent measure per panel"))
        figures_all += [p for p, _ in figs]
        blocks += _blocks(exp, result, figs)
    titles = [e.slug for e in experiments if any(r.metrics or r.losses for r in e.runs)]
    verdicts = verdict_table(results, titles)
    if verdicts:
        blocks = [("h2", "Across experiments: each method minus the baseline"),
                  ("p", "The primary metric of each experiment and panel, the method minus that experiment's "
                        "baseline (columns: sweep folder and panel), paired by seed: mean [95% t interval] and the "
                        "number of pairs. `better *` / `worse *`: the interval excludes 0 on that side. A radius "
                        "rule is shipped only if it is significantly worse nowhere; that is not evidence of no "
                        "harm: the lower end of each interval is the largest loss the seeds cannot rule out."),
                  ("table", verdicts)] + blocks
        across = plot_verdicts(results, titles, out_dir / "figures" / "across-experiments.png")
        if across:
            figures_all.append(across)
            blocks.insert(3, ("img", across, "Each method minus its sweep's baseline, with 95% t intervals"))
    md = write_markdown(blocks, out_dir / "report.md", title)
    page = write_html(blocks, out_dir / "report.html", title)
    csv_path = write_runs_csv(results, out_dir / "runs.csv")
    return {"markdown": md, "html": page, "csv": csv_path, "figures": figures_all, "results": results}


def _file(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_" else "_" for c in name)
