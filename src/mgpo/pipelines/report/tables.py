"""The report's tables, one function each, from the per-run rows of an experiment: the method table (mean ± std
over seeds), the paired differences to the baseline, the double-descent measure, the cost and the perturbation's
size. A table is a :class:`Table` of (text, bold) cells, rendered by :mod:`mgpo.pipelines.report.render`."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from mgpo.pipelines import measures
from mgpo.pipelines.report.collect import RunResult
from mgpo.pipelines.report.labels import (
    CLEAN_LOSS_DIFFS,
    DASH_SUFFIXES,
    DIAGNOSTICS,
    MEAN_OF_PANELS,
    NO_CAP,
    POOLED,
    STALLED_FALL,
    _fmt,
    _order,
    mean_std_cell,
)

Cell = tuple[str, bool]  # (text, bold)


@dataclass
class Table:
    header: list[str]
    rows: list[list[Cell]]


@dataclass
class MethodTable(Table):
    """The primary metric per method and panel. ``uneven``: columns whose methods have different finished seeds
    (each cell there says its n, and no best is marked); ``means``: (method, column) -> the mean over seeds."""

    uneven: list[str] = field(default_factory=list)
    means: dict[tuple[str, str], float | None] = field(default_factory=dict)


@dataclass
class Differences:
    """Paired differences by (panel, seed): each method minus the baseline on the metric (``table``, and
    ``diffs``: (method, column) -> ``measures.paired_t``), each "X-MGPO" minus its own "X" (``own``), and the
    clean training loss minus the baseline's (``loss_tables``: (what, table))."""

    table: Table
    own: Table | None
    loss_tables: list[tuple[str, Table]]
    diffs: dict[tuple[str, str], dict]


def _values(per_run: list[dict], s: str, p: str | None, key: str) -> list:
    return [x[key] for x in per_run if x["series"] == s and (p is None or x["panel"] == p) and x.get(key) is not None]


def method_table(per_run: list[dict], series: list[str], panels: list[str], metric: str, better: bool) -> MethodTable:
    """Mean ± std per panel, plus the average over panels; the best of a column in bold."""
    cols = panels + ([MEAN_OF_PANELS] if len(panels) > 1 else [])
    means: dict[tuple[str, str], float | None] = {}
    for s in series:
        for p in panels:
            v = _values(per_run, s, p, "value")
            means[s, p] = float(np.mean(v)) if v else None
        if len(panels) > 1:
            got = [m for p in panels if (m := means[s, p]) is not None]
            means[s, MEAN_OF_PANELS] = float(np.mean(got)) if len(got) == len(panels) else None
    uneven = _uneven_columns(per_run, series, panels, cols)
    best = {}
    for c in cols:
        got = [m for s in series if (m := means[s, c]) is not None and np.isfinite(m)]
        best[c] = (max(got) if better else min(got)) if got and c not in uneven else None
    rows = []
    for s in series:
        cells = [(s, False)]
        for c in cols:
            text = mean_std_cell(_values(per_run, s, c, "value")) if c != MEAN_OF_PANELS else _fmt(means[s, c])
            if c in uneven and c != MEAN_OF_PANELS and _values(per_run, s, c, "value"):
                text += f" (n={len(_values(per_run, s, c, 'value'))})"
            cells.append((text, means[s, c] is not None and means[s, c] == best[c]))
        rows.append(cells)
    return MethodTable(["method", *[c or metric for c in cols]], rows, [c for c in cols if c in uneven], means)


def _uneven_columns(per_run: list[dict], series: list[str], panels: list[str], cols: list[str]) -> set[str]:
    """A partial sweep has more seeds of some methods than of others: their means are over different seeds (a
    lucky or unlucky extra seed can reorder them), so such a column shows each cell's n and marks no best."""
    uneven = {
        p
        for p in panels
        if len(
            {
                frozenset(x["seed"] for x in per_run if x["series"] == s and x["panel"] == p and x["value"] is not None)
                for s in series
            }
            - {frozenset()}
        )
        > 1
    }
    if uneven and MEAN_OF_PANELS in cols:
        uneven.add(MEAN_OF_PANELS)
    return uneven


def difference_tables(
    per_run: list[dict], series: list[str], panels: list[str], metric: str, baseline: str
) -> Differences:
    """Paired differences vs the baseline, paired by (panel, seed)."""
    diff_cols = panels + ([POOLED] if len(panels) > 1 else [])
    diffs: dict[tuple[str, str], dict] = {}
    row = _difference_row(per_run, panels, diff_cols, baseline, diffs)
    diff_header = ["difference", *[c or metric for c in diff_cols]]
    table = Table(diff_header, [row(s, baseline, "value") for s in series if s != baseline])
    # each "X-MGPO" ("X-GGPO", ...) against its own "X": what adding the perturbation did to that adapter; not
    # "LoRA-GA" against "LoRA", which is another adapter
    own = [
        (s, ref)
        for s in series
        if "-" in s
        and s.rsplit("-", 1)[1].split(" ")[0] in DASH_SUFFIXES
        and (ref := s.rsplit("-", 1)[0]) in series
        and ref != baseline
    ]
    own_table = Table(diff_header, [row(s, ref, "value") for s, ref in own]) if own else None
    # the clean training loss against the baseline's, where the baseline's runs have it
    loss_tables = []
    for key, what in CLEAN_LOSS_DIFFS.items():
        if any(x["series"] == baseline and x.get(key) is not None for x in per_run):
            rows = [row(s, baseline, key) for s in series if s != baseline]
            if rows:
                loss_tables.append((what, Table(["difference", *[c or key for c in diff_cols]], rows)))
    return Differences(table, own_table, loss_tables, diffs)


def _difference_row(
    per_run: list[dict], panels: list[str], diff_cols: list[str], baseline: str, diffs: dict[tuple[str, str], dict]
) -> Callable[[str, str, str], list[Cell]]:
    """A function of (method, reference, key) giving that row; the metric's differences to the baseline are
    kept in ``diffs`` as they are computed."""

    def row(s: str, ref: str, key: str) -> list[Cell]:
        cells = [(f"{s} − {ref}", False)]
        for c in diff_cols:
            keys = panels if c == POOLED else [c]
            mine, base = (
                {
                    (x["panel"], x["seed"]): x[key]
                    for x in per_run
                    if x["series"] == name and x.get(key) is not None and x["panel"] in keys
                }
                for name in (s, ref)
            )
            pairs = sorted(set(mine) & set(base))
            d = measures.paired_t([mine[k] for k in pairs], [base[k] for k in pairs])
            stalled = _stalled(per_run, (s, ref), pairs) if key == "clean_dd_rise_rel" else {}
            if ref == baseline and key == "value":
                diffs[s, c] = d
            text = _diff_text(d, " *" if d["significant"] else "") if d["n"] else "-"
            if stalled.get(s):
                text += f" ‡ {stalled[s]} stalled"
            if stalled.get(ref):
                text += f" ‡ {ref}: {stalled[ref]} stalled"
            cells.append((text, d["significant"]))
        return cells

    return row


def _stalled(per_run: list[dict], sides: tuple[str, str], pairs: list) -> dict[str, int]:
    """How many of the paired runs barely trained (STALLED_FALL), per side."""
    stalled = {}
    for side in sides:
        fell = {(x["panel"], x["seed"]): x.get("dd_fall_rel") for x in per_run if x["series"] == side}
        stalled[side] = sum((f := fell.get(k)) is not None and f < STALLED_FALL for k in pairs)
    return stalled


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


def double_descent_table(per_run: list[dict], series: list[str], panels: list[str], spike_factor: float) -> Table:
    """Per panel and method, averaged over seeds."""
    dd_rows = []
    with_trained = any("trained_spikes" in x for x in per_run)
    for p in panels:
        for s in series:
            rows = [x for x in per_run if x["series"] == s and x["panel"] == p and "dd_rise" in x]
            if rows:
                dd_rows.append(_double_descent_row(p, s, rows, with_trained))
    header = [
        "panel",
        "method",
        "loss",
        "fell (% of start)",
        f"stalled (fell < {100 * STALLED_FALL:g}%)",
        "rise (loss)",
        "rise (% of min)",
        "peak step",
        "steps to recover",
        "not recovered",
        f"spikes (> {spike_factor:g}× median)",
    ]
    if with_trained:
        header += ["logged loss: rise (% of min)", "logged loss: not recovered", "logged loss: spikes"]
    return Table(header, dd_rows)


def _double_descent_row(p: str, s: str, rows: list[dict], with_trained: bool) -> list[Cell]:
    rec = [x["dd_recover_steps"] for x in rows if x["dd_recover_steps"] is not None]
    curves = sorted({x["loss_curve"] for x in rows})
    cells = [
        (p or "-", False),
        (s, False),
        (" / ".join(curves), False),
        (mean_std_cell([100 * x["dd_fall_rel"] for x in rows], 1), False),
        (f"{sum(x['dd_fall_rel'] < STALLED_FALL for x in rows)}/{len(rows)}", False),
        (mean_std_cell([x["dd_rise"] for x in rows]), False),
        (mean_std_cell([100 * x["dd_rise_rel"] for x in rows], 1), False),
        (
            _fmt(np.mean([x["dd_peak_step"] for x in rows if x["dd_peak_step"] is not None]), 0)
            if any(x["dd_peak_step"] is not None for x in rows)
            else "-",
            False,
        ),
        (_fmt(np.mean(rec), 0) if rec else "-", False),
        (f"{sum(not x['dd_recovered'] for x in rows)}/{len(rows)}", False),
        (mean_std_cell([x["spikes"] for x in rows], 1), False),
    ]
    if with_trained:  # what the logged minibatch loss (perturbed weights for MGPO) would have said
        got = [x for x in rows if "trained_spikes" in x]
        more = (
            [
                mean_std_cell([100 * x["trained_dd_rise_rel"] for x in got], 1),
                f"{sum(not x['trained_dd_recovered'] for x in got)}/{len(got)}",
                mean_std_cell([x["trained_spikes"] for x in got], 1),
            ]
            if got
            else ["-"] * 3
        )
        cells += [(c, False) for c in more]
    return cells


def cost_table(per_run: list[dict], series: list[str], panels: list[str], baseline: str) -> Table:
    """Cost relative to the baseline in the same panel: a rank or a model changes the cost, and methods with
    unequal numbers of finished runs per panel would otherwise be averaged over different panels."""
    cost_rows = []
    with_load = any(x.get("load_average") for x in per_run)
    by_panel = len(panels) > 1
    for p in panels if by_panel else [None]:
        for s in series:
            cells = [(p or "-", False)] if by_panel else []
            cells.append((s, False))
            for k, digits in (("trainable_params", 0), ("peak_memory_mb", 0), ("time_per_step_s", 3)):
                v, b = _values(per_run, s, p, k), _values(per_run, baseline, p, k)
                mean = float(np.mean(v)) if v else None
                ratio = mean / float(np.mean(b)) if mean is not None and b and np.mean(b) > 0 else None
                text = f"{mean:,.{digits}f}" if mean is not None else "-"
                if k == "time_per_step_s" and mean is not None:
                    text += _resumed_note(per_run, s, p)
                cells += [(text, False), (f"{ratio:.2f}×" if ratio is not None else "-", False)]
            if with_load:  # wall time also counts waiting for cores other processes held
                cells.append((_load_cell(per_run, s, p), False))
            cost_rows.append(cells)
    header = (["panel"] if by_panel else []) + [
        "method",
        "trainable params",
        "× " + baseline,
        "peak memory (MB)",
        "× " + baseline,
        "time / step (s)",
        "× " + baseline,
    ]
    return Table(header + (["load (5-min avg at end) / CPUs"] if with_load else []), cost_rows)


def _resumed_note(per_run: list[dict], s: str, p: str | None) -> str:
    """Says how many of the mean's runs were timed over their last session only (resumed: its checkpoint loading
    and evaluations over fewer steps)."""
    mine = [x for x in per_run if x["series"] == s and (p is None or x["panel"] == p) and x.get("time_per_step_s")]
    resumed = sum(
        1 for x in mine if x.get("steps_timed") is not None and x.get("steps") and x["steps_timed"] < x["steps"]
    )
    return f" ({resumed} of {len(mine)} resumed: timed over their last session)" if resumed else ""


def _load_cell(per_run: list[dict], s: str, p: str | None) -> str:
    mine = [x for x in per_run if x["series"] == s and (p is None or x["panel"] == p) and x.get("load_average")]
    cpus = "/".join(str(c) for c in _order(x.get("cpus") or "?" for x in mine))
    return f"{np.mean([x['load_average'][1] for x in mine]):.1f} / {cpus}" if mine else "-"


def diagnostics_table(runs: list[RunResult], series: list[str], panels: list[str]) -> Table:
    """The perturbation's size, per method and panel: medians over each run's steps, averaged over seeds."""
    diag_rows = []
    for p in panels:
        for s in series:
            # finished runs only: a running one's medians are over the steps it has logged so far
            got = [r for r in runs if r.series == s and r.panel == p and r.diagnostics and r.metrics]
            if got:
                diag_rows.append(
                    [(p or "-", False), (s, False)]
                    + [(_diag_cell([r.diagnostics[k] for r in got if k in r.diagnostics]), False) for k in DIAGNOSTICS]
                )
    return Table(["panel", "method", *DIAGNOSTICS.values()], diag_rows)


def _diag_cell(got: list[Any]) -> str:
    if not got:
        return "-"
    if NO_CAP in got:
        return NO_CAP if all(g == NO_CAP for g in got) else "mixed: some runs have no cap"
    return _fmt(np.mean(got), 4)
