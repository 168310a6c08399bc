"""Across experiments: each method minus its experiment's baseline on the primary metric, as a table (the
shipping test: never significantly worse than the baseline on any task)."""

from __future__ import annotations

from mgpo.pipelines.report.analysis import Analysis
from mgpo.pipelines.report.labels import _order
from mgpo.pipelines.report.tables import Table, _diff_text, _judged


def _compared_columns(results: list[Analysis]) -> list[tuple[int, str]]:
    """(experiment index, panel) of every panel with a method besides the baseline: a sweep of the baseline alone
    (full fine-tuning at its own rates) has nothing to compare and gets no column in the table or the figure."""
    return [(i, p) for i, res in enumerate(results) for p in res.panels if any(s != res.baseline for s in res.series)]


def _in_panel(res: Analysis, series: str, panel: str) -> bool:
    """Whether a sweep ran a method in a panel at all (finished or not): a sweep built from a list of grids can run
    a method in one setting only, and elsewhere it is absent, not pending."""
    return any(r["series"] == series and r["panel"] == panel for r in res.per_run)


def verdict_table(results: list[Analysis], titles: list[str]) -> Table | None:
    """Across experiments: each method minus its experiment's baseline on the primary metric, per panel (paired t
    interval, the numbers of each experiment's difference table), and where it is significantly worse. The
    question a rule must pass to be shipped: never significantly worse than the baseline on any task. A method
    is judged only in the sweeps that ran it; a non-finite value (a NaN Pearson r) counts as a failure."""
    cols = _compared_columns(results)
    series = _order(s for res in results for s in res.series if s != res.baseline)
    if len(results) < 2 or not series:  # one experiment: its own difference table says it all
        return None
    name = {(i, p): f"{titles[i]}{f' ({p})' if p else ''}" for i, p in cols}
    header = (
        ["method"]
        + [f"{name[c]}: {results[c[0]].metric} − {results[c[0]].baseline}" for c in cols]
        + ["significantly worse in"]
    )
    rows = []
    for s in series:
        cells, worse, pending, judged, missing = [(s, False)], [], 0, 0, 0
        for i, p in cols:
            d = results[i].diffs.get((s, p))
            if s not in results[i].series:
                cells.append(("not in this sweep", False))
                continue
            if not _in_panel(results[i], s, p):
                cells.append(("not in this setting", False))
                continue
            judged += 1
            # runs of the pair without a result (still to run, running, failed): "nowhere" must not be said of them
            missing += sum(
                1
                for r in results[i].per_run
                if r["series"] in (s, results[i].baseline) and r["panel"] == p and r["value"] is None
            )
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
                good = _judged(d, results[i].better)
                if good is False:
                    worse.append(name[i, p])
                tag = " better *" if good else " worse *" if good is False else ""
                cells.append((_diff_text(d, tag), good is not None))
        if worse:
            verdict = ", ".join(worse)
        elif not pending and not missing:
            verdict = "nowhere"
        elif not pending:
            verdict = f"nowhere so far ({missing} of its and the baseline's runs without a result yet)"
        elif pending < judged:
            verdict = f"nowhere yet ({pending} of {judged} without an interval)"
        else:
            verdict = "no interval yet (n < 2 everywhere)"
        cells.append((verdict, False))
        rows.append(cells)
    return Table(header, rows)
