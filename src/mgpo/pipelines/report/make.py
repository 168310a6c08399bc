"""``make_report``: every experiment's analysis, figures and blocks, the across-experiments table first, and
the documents."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from mgpo.pipelines.report.analysis import analyse
from mgpo.pipelines.report.collect import collect
from mgpo.pipelines.report.figures import plot_curves, plot_dd, plot_metric_bars, plot_verdicts
from mgpo.pipelines.report.render import _blocks, write_comparisons_csv, write_html, write_markdown, write_runs_csv
from mgpo.pipelines.report.verdicts import verdict_table


def make_report(
    dirs: Sequence[str | Path],
    out_dir: str | Path = "report",
    *,
    title: str = "mgpo experiments",
    metric: str | None = None,
    baseline: str | None = None,
    smooth: int | None = None,
    spike_factor: float | None = None,
) -> dict:
    """Write report.md, report.html, runs.csv, comparisons.csv (where there are intervals over examples and seeds
    or declared families) and figures/ under ``out_dir``; returns their paths, and under
    ``results`` each reported experiment's :class:`~mgpo.pipelines.report.analysis.Analysis`."""
    out_dir = Path(out_dir)
    (out_dir / "figures").mkdir(parents=True, exist_ok=True)
    experiments = collect(dirs)
    blocks: list[tuple] = []
    results, figures_all = [], []
    for exp in experiments:
        if not any(r.metrics for r in exp.runs):
            states: dict[str, int] = {}
            for r in exp.runs:
                states[r.status] = states.get(r.status, 0) + 1
            said = ", ".join(f"{n} {state}" for state, n in sorted(states.items()))
            blocks += [("h2", exp.title), ("p", f"None of its runs has finished yet ({said}).")]
            continue
        result = analyse(exp, metric=metric, baseline=baseline, smooth=smooth, spike_factor=spike_factor)
        results.append(result)
        # finished runs with a logged loss, else no curve and no double descent to draw (result.no_loss)
        logged = any(r.losses and r.metrics for r in exp.runs)
        figs = (
            [
                (
                    plot_curves(exp, result, out_dir / "figures" / f"{exp.slug}-loss.png"),
                    f"{exp.title}: {result.loss}, per {'panel' if any(result.panels) else 'method'}",
                )
            ]
            if logged
            else []
        )
        if any(r["value"] is not None for r in result.per_run):
            bars = out_dir / "figures" / f"{exp.slug}-{_file(result.metric)}.png"
            figs.append((plot_metric_bars(exp, result, bars), f"{exp.title}: {result.metric} per method"))
        if len(result.panels) > 1 and logged:
            figs.append(
                (
                    plot_dd(exp, result, out_dir / "figures" / f"{exp.slug}-double-descent.png"),
                    f"{exp.title}: double-descent measure per panel",
                )
            )
        figures_all += [p for p, _ in figs]
        blocks += _blocks(exp, result, figs)
    titles = [e.slug for e in experiments if any(r.metrics for r in e.runs)]
    verdicts = verdict_table(results, titles)
    if verdicts:
        blocks = [
            ("h2", "Across experiments: each method minus the baseline"),
            (
                "p",
                "The primary metric of each experiment and panel, the method minus that experiment's "
                "baseline (columns: sweep folder and panel), paired by seed: mean [95% t interval] and the "
                "number of pairs. `better *` / `worse *`: the interval excludes 0 on that side. A radius "
                "rule is shipped only if it is significantly worse nowhere; that is not evidence of no "
                "harm: the lower end of each interval is the largest loss the seeds cannot rule out.",
            ),
            ("table", verdicts),
        ] + blocks
        across = plot_verdicts(results, titles, out_dir / "figures" / "across-experiments.png")
        if across:
            figures_all.append(across)
            blocks.insert(3, ("img", across, "Each method minus its sweep's baseline, with 95% t intervals"))
    md = write_markdown(blocks, out_dir / "report.md", title)
    page = write_html(blocks, out_dir / "report.html", title)
    csv_path = write_runs_csv(results, out_dir / "runs.csv")
    comparisons = write_comparisons_csv(results, out_dir / "comparisons.csv")
    return {
        "markdown": md,
        "html": page,
        "csv": csv_path,
        "comparisons": comparisons,
        "figures": figures_all,
        "results": results,
    }


def _file(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_" else "_" for c in name)
