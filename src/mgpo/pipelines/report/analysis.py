"""Every number the report shows for one experiment, as an :class:`Analysis`: the metric and baseline it is
read against, one row per run (``runs.csv``), and the tables (:mod:`mgpo.pipelines.report.tables`)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from mgpo.pipelines import measures
from mgpo.pipelines.report.collect import Experiment, RunResult, loss_description
from mgpo.pipelines.report.labels import LOSS_KINDS, PRIMARY_METRICS, _order, higher_is_better
from mgpo.pipelines.report.robustness import Robustness, robustness, window_columns
from mgpo.pipelines.report.tables import (
    Differences,
    MethodTable,
    Table,
    cost_table,
    diagnostics_table,
    difference_tables,
    double_descent_table,
    method_table,
)


@dataclass
class Analysis:
    """One experiment's numbers. ``per_run``: one dict per run (the rows of runs.csv); ``diffs``: (method,
    panel) -> the paired difference to the baseline on the metric (``measures.paired_t``)."""

    metric: str
    better: bool  # higher is better
    baseline: str
    series: list[str]  # the methods, in the order the runs list them
    panels: list[str]
    per_run: list[dict[str, Any]]
    loss: str  # which training loss the curves and the double-descent measure use
    no_clean_loss: list[str]  # runs whose curve is the loss as trained (no probe)
    mixed_losses: bool  # some runs have the probe and some not
    smooth: int | None
    spike_factor: float
    method_table: MethodTable
    differences: Differences
    dd_table: Table
    cost_table: Table
    diag_table: Table
    robustness: Robustness | None = None  # over examples, declared families, the windows (issue 33)
    failed: list[tuple[str, str, str]] = field(default_factory=list)  # (run, status, error) of runs without results
    no_loss: list[str] = field(default_factory=list)  # finished runs that never logged a loss

    @property
    def means(self) -> dict[tuple[str, str], float | None]:
        return self.method_table.means

    @property
    def diffs(self) -> dict[tuple[str, str], dict]:
        return self.differences.diffs


def analyse(
    exp: Experiment,
    *,
    metric: str | None = None,
    baseline: str | None = None,
    smooth: int | None = None,
    spike_factor: float | None = None,
) -> Analysis:
    """Every number the report shows for one experiment (tables as header + rows of (text, bold) cells)."""
    opts = exp.options
    smooth = smooth or opts.get("smooth")
    spike_factor = spike_factor or opts.get("spike_factor") or measures.SPIKE_FACTOR
    _refuse_duplicates(exp)
    metric = _primary_metric(exp, metric or opts.get("metric"))
    _refuse_mixed_scorers(exp, metric)
    series = _order(r.series for r in exp.runs)
    panels = _order(r.panel for r in exp.runs)
    baseline = _baseline(exp, series, baseline or opts.get("baseline"))
    per_run = [_run_row(exp.title, r, metric, smooth, spike_factor) for r in exp.runs]
    better = higher_is_better(metric)
    finished = [r for r in exp.runs if r.metrics]  # the loss a running run has logged so far is not its curve
    fallback = [r.path.name for r in finished if r.losses and r.loss_kind != "clean"]  # runs without the probe
    return Analysis(
        metric=metric,
        better=better,
        baseline=baseline,
        series=series,
        panels=panels,
        per_run=per_run,
        loss=loss_description(finished),
        no_clean_loss=fallback,
        mixed_losses=bool(fallback) and any(r.loss_kind == "clean" for r in finished if r.losses),
        smooth=smooth,
        spike_factor=spike_factor,
        method_table=method_table(per_run, series, panels, metric, better),
        differences=difference_tables(per_run, series, panels, metric, baseline),
        dd_table=double_descent_table(per_run, series, panels, spike_factor),
        cost_table=cost_table(per_run, series, panels, baseline),
        diag_table=diagnostics_table(exp.runs, series, panels),
        robustness=robustness(per_run, series, panels, metric, baseline, opts),
        failed=[(r.path.name, r.status, r.error or "no metrics.json") for r in exp.runs if not r.metrics],
        no_loss=[r.path.name for r in exp.runs if r.metrics and not r.losses],
    )


def _refuse_duplicates(exp: Experiment) -> None:
    """One run per method, panel and seed: a second one would count twice in the mean, once in the paired
    differences."""
    seen: dict[tuple[str, str, int], RunResult] = {}
    for r in exp.runs:
        first = seen.setdefault((r.series, r.panel, r.seed), r)
        if first is not r:
            if first.path.resolve() == r.path.resolve():
                raise ValueError(f"{exp.title!r}: the run folder {r.path} is given twice; pass each run once.")
            raise ValueError(
                f"{exp.title!r}: {first.path} and {r.path} are both {r.series}, seed {r.seed}"
                f"{f' in panel {r.panel}' if r.panel else ''}. Runs that differ in another setting (training.lr, "
                "adapter.rank, the data) are not seeds of one method: run them as a sweep with that axis (mgpo "
                "sweep), or report them separately."
            )


def _primary_metric(exp: Experiment, metric: str | None) -> str:
    """The metric asked for (which some finished run must have), else the first of PRIMARY_METRICS that every
    finished run has."""
    finished = [r for r in exp.runs if r.metrics]
    if metric is not None and finished and not any(metric in r.metrics for r in finished):
        held = sorted({k for r in finished for k, v in r.metrics.items() if isinstance(v, (int, float))})
        raise ValueError(
            f"metric {metric!r}: no finished run of {exp.title!r} has it in metrics.json; pass "
            f"--metric with one they have: {', '.join(held)}."
        )
    if metric is None:
        present = [m for m in PRIMARY_METRICS if finished and all(m in r.metrics for r in finished)]
        metric = present[0] if present else "final_loss"
    return metric


def _refuse_mixed_scorers(exp: Experiment, metric: str) -> None:
    """Scores of one benchmark by two scoring rules are not comparable: math runs from before the rule was recorded
    (no ``<prefix>_scorer`` in metrics.json: math-v1) beside runs scored by math-v2 are refused, by name."""
    key = f"{metric.split('_', 1)[0]}_scorer"
    scored = [r for r in exp.runs if r.metrics and metric in r.metrics]
    if not any(key in r.metrics for r in scored):
        return
    by_rule: dict[str, list[str]] = {}
    for r in scored:
        by_rule.setdefault(str(r.metrics.get(key, "math-v1 (before the rule was recorded)")), []).append(r.path.name)
    if len(by_rule) > 1:
        said = "; ".join(
            f"{rule}: {', '.join(names[:4])}{', ...' if len(names) > 4 else ''}" for rule, names in by_rule.items()
        )
        raise ValueError(
            f"{exp.title!r}: its runs' {metric} were scored by different rules ({said}), so they cannot be compared: "
            "score them again with today's rule (mgpo rescore RUN-or-SWEEP; runs that kept their answers), or "
            "report them apart."
        )


def _baseline(exp: Experiment, series: list[str], baseline: str | None) -> str:
    baseline = baseline or ("LoRA" if "LoRA" in series else series[0])
    if baseline not in series:
        raise ValueError(
            f"baseline {baseline!r} is not one of the methods in {exp.title!r}: "
            f"{', '.join(series)}; pass --baseline with one of them."
        )
    return baseline


def _run_row(title: str, r: RunResult, metric: str, smooth: int | None, spike_factor: float) -> dict[str, Any]:
    """A run's row of runs.csv: its metric, its double-descent measure and its cost."""
    row = {
        "experiment": title,
        "series": r.series,
        "panel": r.panel,
        "seed": r.seed,
        "status": r.status,
        "path": str(r.path),
        "metric": metric,
        "value": r.metrics.get(metric),
        "loss_curve": LOSS_KINDS[r.loss_kind] if r.losses else None,
        # chance of an accuracy: the split's majority-class share (runs from before it was recorded: None)
        "chance": r.metrics.get(metric[: -len("accuracy")] + "majority") if metric.endswith("accuracy") else None,
    }
    # a run still training (or one that failed) has no metrics.json: its curve so far is not the run's, and a measure
    # of it would be paired with finished runs as if it were
    if r.losses and r.metrics:
        window = smooth or measures.default_window(len(r.losses))
        row.update({f"dd_{k}": v for k, v in measures.double_descent(r.steps, r.losses, window).items()})
        if r.loss_kind == "clean":
            row["clean_dd_rise_rel"] = row["dd_rise_rel"]
        row["spikes"] = measures.instability_count(r.losses, window, spike_factor)
        row.update(window_columns(r.steps, r.losses))
    if r.trained_losses and r.metrics:  # the same measure on the logged minibatch loss (perturbed weights for MGPO)
        window = smooth or measures.default_window(len(r.trained_losses))
        dd = measures.double_descent(r.trained_steps, r.trained_losses, window)
        row.update(
            trained_dd_window=window,
            trained_dd_rise_rel=dd["rise_rel"],
            trained_dd_recovered=dd["recovered"],
            trained_spikes=measures.instability_count(r.trained_losses, window, spike_factor),
        )
    for k in (
        "trainable_params",
        "peak_memory_mb",
        "time_per_step_s",
        "steps_timed",
        "steps",
        "load_average",
        "cpus",
        "final_clean_loss",
        "best_clean_loss",
        "final_loss",
        "best_loss",
    ):
        row[k] = r.metrics.get(k)
    return row
