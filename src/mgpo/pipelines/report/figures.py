"""The report's figures (matplotlib, headless): loss curves per panel, the metric as bars, the double-descent
rise per panel, and the across-experiments differences."""

from __future__ import annotations

import textwrap
from pathlib import Path
from typing import Any

import numpy as np

from mgpo.pipelines import measures
from mgpo.pipelines.plots import plt
from mgpo.pipelines.report.analysis import Analysis
from mgpo.pipelines.report.collect import Experiment
from mgpo.pipelines.report.labels import STALLED_FALL, _mean_std
from mgpo.pipelines.report.tables import _judged
from mgpo.pipelines.report.verdicts import _compared_columns, _in_panel


def _colors(n: int) -> list:
    """matplotlib's default cycle; past its 10 colours, tab20 (so no two methods share a colour)."""
    default = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    return default if n <= len(default) else [plt.get_cmap("tab20")(i % 20) for i in range(n)]


def plot_curves(exp: Experiment, result: Analysis, out_png: Path) -> Path:
    """One panel per panel value, methods overlaid: raw loss of each seed faint, seed-mean of the smoothed loss bold."""
    panels, series = result.panels, result.series
    ncols = min(4, len(panels))
    nrows = -(-len(panels) // ncols)
    width = max(8.0, 4.2 * ncols)
    fig, axes = plt.subplots(
        nrows, ncols, figsize=(width, 3.4 * nrows + 1.2), dpi=110, sharex=True, sharey=True, squeeze=False
    )
    colors = _colors(len(series))
    counts: dict[str, list[int]] = {s: [] for s in series}  # seeds in each panel's mean, per method
    for ax, panel in zip(axes.flat, panels):
        for i, s in enumerate(series):
            # finished runs only: a running one's curve so far would pull the mean (and the seed count) with it
            runs = [r for r in exp.runs if r.series == s and r.panel == panel and r.losses and r.metrics]
            if not runs:
                continue
            color = colors[i % len(colors)]
            first = runs[0]
            window = result.smooth or measures.default_window(len(first.losses))
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
        ax.set_ylabel("clean training loss (probe)" if result.loss.startswith("clean") else "training loss")
    for ax in list(axes.flat)[len(panels) :]:
        ax.set_visible(False)
    # one entry per method (its colour is the same in every panel), with the seeds behind each panel's mean:
    # a label per seed count listed one method twice, without saying which panel each entry belonged to
    handles, labels = _legend_entries(axes)
    labels = [
        s
        + (
            ""
            if counts[s] == [1] * len(counts[s])
            else f" (mean of {counts[s][0]} seeds)"
            if len(set(counts[s])) == 1
            else f" (seeds per panel: {', '.join(map(str, counts[s]))})"
        )
        for s in labels
    ]
    per_row = 4 if width >= 12 else 2  # long labels ("LoRA-MGPO (APN normalized) (mean of 3 seeds)") need room
    fig.suptitle(
        f"{exp.title}\n{result.loss}\nfaint: raw, each seed; bold: moving average, mean over seeds", fontsize=11
    )
    fig.tight_layout()
    # below the panels; _save's tight bounding box takes it in, so nothing is cut off
    fig.legend(
        handles,
        labels,
        loc="upper center",
        bbox_to_anchor=(0.5, 0.0),
        ncol=min(len(labels), per_row),
        frameon=False,
        fontsize=9,
    )
    return _save(fig, out_png)


def _legend_entries(axes: Any) -> tuple[list, list[str]]:
    seen: dict[str, Any] = {}  # label -> handle
    for ax in axes.flat:
        for h, label in zip(*ax.get_legend_handles_labels()):
            seen.setdefault(label, h)
    return list(seen.values()), list(seen)


def _panel_chance(result: Analysis, panel: str) -> tuple[float | None, str | None]:
    """The chance level of a panel's accuracy bars: the majority-class share its finished runs recorded, where
    they all recorded one and it is the same (runs evaluated on different splits have no common chance line).
    Else None and why not (None when no run recorded one: an accuracy from before the share was recorded)."""
    got = [x["chance"] for x in result.per_run if x["panel"] == panel and x["value"] is not None]
    if not any(c is not None for c in got):
        return None, None
    if any(c is None for c in got):
        return None, f"{sum(c is None for c in got)} of its {len(got)} runs did not record it"
    if max(got) - min(got) > 1e-9:
        return None, f"its runs recorded different shares ({min(got):.4f}-{max(got):.4f}: different splits)"
    return got[0], None


def plot_metric_bars(exp: Experiment, result: Analysis, out_png: Path) -> Path:
    """Grouped bars (paper Figure 4): one group per panel, one bar per method, error bars = std over seeds."""
    panels, series, metric = result.panels, result.series, result.metric
    fig, ax = plt.subplots(figsize=(max(5.5, 1.1 * len(panels) * len(series) * 0.55 + 2), 3.8), dpi=110)
    width = 0.8 / len(series)
    x = np.arange(len(panels))
    extents, colors = [], _colors(len(series))
    for i, s in enumerate(series):
        stats = [
            _mean_std(
                [r["value"] for r in result.per_run if r["series"] == s and r["panel"] == p and r["value"] is not None]
                or [np.nan]
            )
            for p in panels
        ]
        counts = [
            sum(r["series"] == s and r["panel"] == p and r["value"] is not None for r in result.per_run) for p in panels
        ]
        bars = ax.bar(
            x + (i - (len(series) - 1) / 2) * width,
            [m for m, _ in stats],
            width,
            yerr=[e for _, e in stats],
            capsize=3,
            label=s,
            color=colors[i],
        )
        # each bar says its number of seeds: a mean of 2 seeds beside one of 5 must not read the same
        ax.bar_label(
            bars, [f"n={n}" if n else "" for n in counts], label_type="center", fontsize=6, rotation=90, color="white"
        )
        extents += [v for m, e in stats if np.isfinite(m) for v in (m - e, m + e)]
    labelled = False
    for j, p in enumerate(panels):
        chance, _ = _panel_chance(result, p)
        if chance is not None:  # without it, a bar at 0.5 of a balanced split reads as half-way to perfect
            legend: dict[str, Any] = {} if labelled else {"label": "chance (majority class)"}
            ax.hlines(
                chance,
                x[j] - 0.45,
                x[j] + 0.45,
                colors="black",
                linestyles="--",
                linewidth=1,
                **legend,
            )
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
    ax.set_title(
        f"{textwrap.fill(exp.title, 70)}\n{metric} ({'higher' if result.better else 'lower'} is "
        "better); bars: mean over the n seeds written on each, whiskers: std",
        fontsize=10,
    )
    fig.tight_layout()
    return _save(fig, out_png)


def plot_dd(exp: Experiment, result: Analysis, out_png: Path) -> Path:
    """Relative double-descent rise per panel (e.g. rank or learning rate), one line per method."""
    panels, series = result.panels, result.series
    fig, ax = plt.subplots(figsize=(6.5, 3.8), dpi=110)
    # Panels are separate settings (a rank, a learning rate), not points on one axis: no line joins them, and each
    # method sits a little beside the panel's tick so the whiskers do not cover each other.
    step = 0.6 / max(len(series), 1)
    for j, (s, color) in enumerate(zip(series, _colors(len(series)))):
        xs = [x + (j - (len(series) - 1) / 2) * step for x in range(len(panels))]
        got = [
            [r for r in result.per_run if r["series"] == s and r["panel"] == p and "dd_rise_rel" in r] for p in panels
        ]
        stats = [_mean_std([100 * r["dd_rise_rel"] for r in rows] or [np.nan]) for rows in got]
        # a run that never trained has no descent to rise from: its low rise must not read as smooth training.
        # Counts go in the legend (labels beside the points overlapped where stalled methods all sit near 0).
        stalled = [sum(r["dd_fall_rel"] < STALLED_FALL for r in rows) for rows in got]
        label = s + (
            f" (stalled per panel: {', '.join(f'{k}/{len(rows)}' for k, rows in zip(stalled, got))})"
            if any(stalled)
            else ""
        )
        ax.errorbar(
            xs,
            [m for m, _ in stats],
            yerr=[e for _, e in stats],
            marker="o",
            capsize=3,
            linestyle="none",
            label=label,
            color=color,
        )
        for x, k, (mean, _) in zip(xs, stalled, stats):
            if k:
                ax.plot(x, mean, marker="o", markersize=11, markerfacecolor="none", markeredgecolor=color)
    ax.set_xticks(range(len(panels)), panels, fontsize=9)
    ax.set_ylabel("double-descent rise (% of running min)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.12), frameon=False)  # off the points
    ax.set_title(
        f"{textwrap.fill(exp.title, 70)}\ndouble-descent rise: mean over seeds, whiskers: std; lower = "
        f"smaller rise\nringed, 'stalled k/n': k seeds' loss fell < {100 * STALLED_FALL:g}% (never "
        "trained), no descent to rise from",
        fontsize=9,
    )
    fig.tight_layout()
    return _save(fig, out_png)


def plot_verdicts(results: list[Analysis], titles: list[str], out_png: Path) -> Path | None:
    """The across-experiments table as a figure: one panel per sweep and setting, each of its methods' paired
    difference to that sweep's baseline as a point with its 95% t interval, a line at 0. Red: significantly worse;
    green: significantly better; grey: the interval holds 0. A panel's own scale: the metrics differ between sweeps.
    Each panel lists only its own sweep's methods (the table says where a method did not run): with every method
    of every sweep on every panel, six sweeps made a figure of mostly "not in this sweep"."""
    cols = _compared_columns(results)
    if len(results) < 2 or not cols:
        return None
    names = {
        (i, p): [s for s in results[i].series if s != results[i].baseline and _in_panel(results[i], s, p)]
        for i, p in cols
    }
    ncols = min(3, len(cols))
    nrows = -(-len(cols) // ncols)
    # a row of panels is as tall as its longest list of methods
    heights = [max(len(names[c]) for c in cols[r * ncols : (r + 1) * ncols]) for r in range(nrows)]
    fig, axes = plt.subplots(
        nrows,
        ncols,
        figsize=(4.6 * ncols, sum(0.38 * h + 1.6 for h in heights)),
        dpi=110,
        squeeze=False,
        gridspec_kw={"height_ratios": [0.38 * h + 1.6 for h in heights]},
    )
    for j, (ax, (i, p)) in enumerate(zip(axes.flat, cols)):
        res, height = results[i], heights[j // ncols]
        ys = {s: height - 1 - k for k, s in enumerate(names[i, p])}  # first method on top
        ax.axvline(0, color="black", linewidth=0.8, linestyle="--")
        for s, y in ys.items():
            d = res.diffs.get((s, p))
            if d is None or not d["n"] or d["nonfinite"]:
                ax.text(
                    0.5,
                    y,
                    "non-finite" if d and d["nonfinite"] else "no pairs yet",
                    transform=ax.get_yaxis_transform(),
                    ha="center",
                    va="center",
                    fontsize=7,
                    color="grey",
                )
                continue
            good = _judged(d, res.better)
            color = {True: "tab:green", False: "tab:red", None: "tab:grey"}[good]
            err = None if d["low"] is None else [[d["mean"] - d["low"]], [d["high"] - d["mean"]]]
            ax.errorbar([d["mean"]], [y], xerr=err, marker="o", capsize=3, color=color, linestyle="none")
            ax.annotate(
                f"n={d['n']}" + (", no spread" if d["no_spread"] else ""),
                (d["mean"], y),
                textcoords="offset points",
                xytext=(0, 5),
                ha="center",
                fontsize=6,
                color=color,
            )
        arrow = "higher is better →" if res.better else "← lower is better"
        ax.set_xlabel(f"{res.metric} − {res.baseline}\n({arrow})", fontsize=8)
        ax.set_title(textwrap.fill(f"{titles[i]}{f' ({p})' if p else ''}", 45), fontsize=8)
        ax.set_yticks(list(ys.values()), list(ys), fontsize=8)
        ax.set_ylim(-0.7, height - 0.3)
        ax.tick_params(axis="x", labelsize=7)
        ax.grid(axis="x", alpha=0.3)
    for ax in list(axes.flat)[len(cols) :]:
        ax.set_visible(False)
    fig.tight_layout()
    # above the panels (savefig's tight box takes it in): placed inside, it covered the top panels' titles
    fig.suptitle(
        "Each method minus its sweep's baseline, paired by seed: mean and 95% t interval\n"
        "red: significantly worse, green: significantly better, grey: the interval holds 0",
        fontsize=10,
        y=1.0,
        va="bottom",
    )
    return _save(fig, out_png)


def _save(fig: Any, out_png: Path) -> Path:
    out_png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_png, bbox_inches="tight")  # nothing clipped, whatever the title and legend lengths
    plt.close(fig)
    return out_png
