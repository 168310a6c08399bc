"""How far a verdict holds (issue 33): differences over test examples as well as seeds (where runs saved their
per-example predictions), declared families of comparisons with Holm's correction (the rest marked post hoc), and
the double-descent measures across smoothing windows beside a measure that needs a second descent."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mgpo.pipelines import measures, predictions
from mgpo.pipelines.config import ConfigError
from mgpo.pipelines.report.tables import Cell, Table

WINDOWS = (1, 2, 3, 4, 5)  # smoothing windows (logged points) the double-descent measures are shown at
PRIMARY_DD = "dd_rise_rel"  # the primary double-descent measure, fixed before the reruns (docs/experiments.md)
# the metric's statistic over one run's rows, and what it reads from each row and its target; accuracy reads the
# correctness each row records (a math answer is scored by the benchmark's rule, not by equality with its gold)
STATS = {
    "accuracy": (measures.accuracy, lambda r: r["correct"], lambda r: True),
    "pearson": (measures.pearson, lambda r: r["prediction"], lambda r: r["target"]),
}
SPLITS = ("test_", "after_")  # the held-out split's metrics: a test evaluation, or generation after training


@dataclass
class Robustness:
    examples: Table | None  # differences to the baseline over examples and seeds (runs with predictions.jsonl)
    families: Table | None  # the declared comparisons, Holm within each family
    post_hoc: str  # which comparisons are post hoc
    windows: Table | None  # the bump measure and the second-descent measure at each window
    comparisons: list[dict]  # comparisons.csv: every difference above as numbers (interval, test, p, Holm p)


def _record(family: str, name: str, panel: str, over: str, d: dict, holm_p: float | None = None) -> dict:
    """One row of comparisons.csv. ``family``: the declared family (its Holm p in ``holm_p``), or ``vs baseline``
    for the table of every method against the baseline over examples and seeds."""
    return {
        "family": family,
        "comparison": name,
        "panel": panel,
        "over": over,
        "seeds": d["n"],
        "examples": d.get("examples"),
        "mean": d["mean"],
        "low": d["low"],
        "high": d["high"],
        "seeds_low": d.get("seeds_low", d["low"]),
        "seeds_high": d.get("seeds_high", d["high"]),
        "examples_low": d.get("examples_low"),  # over examples alone (the only interval a one-seed pair has)
        "examples_high": d.get("examples_high"),
        "p": d["p"],
        "holm_p": holm_p,
    }


def window_columns(steps: list, losses: list) -> dict[str, Any]:
    """runs.csv columns: the bump measure (``dd_rise_rel``) and the second-descent measure at each window."""
    out: dict[str, Any] = {}
    for w in WINDOWS:
        out[f"dd_rise_rel_w{w}"] = measures.double_descent(steps, losses, w)["rise_rel"]
        out[f"second_descent_rel_w{w}"] = measures.second_descent(steps, losses, w)["second_descent_rel"]
    return out


def robustness(
    per_run: list[dict], series: list[str], panels: list[str], metric: str, baseline: str, options: dict
) -> Robustness:
    saved = _Saved(per_run, metric)
    comparisons: list[dict] = []
    return Robustness(
        examples=_examples_table(saved, series, panels, metric, baseline, comparisons),
        families=_families_table(per_run, series, panels, metric, options.get("families"), saved, comparisons),
        post_hoc=_post_hoc(options.get("families")),
        windows=_windows_table(per_run, series, panels, baseline),
        comparisons=comparisons,
    )


class _Saved:
    """The runs' per-example predictions, read once: the difference of two methods in one panel over examples and
    seeds (:func:`measures.paired_over_examples_and_seeds`), where both have them for common seeds."""

    def __init__(self, per_run: list[dict], metric: str):
        name = metric.split("_", 1)[-1]
        self.usable = name in STATS and metric.startswith(SPLITS)
        self.stat = STATS.get(name)
        self.rows = (
            # runs with a result only: predictions.jsonl is written before metrics.json, so a run that died between
            # the two has predictions but is no finished run
            {
                (x["series"], x["panel"], x["seed"]): predictions.read(Path(x["path"]))
                for x in per_run
                if x["value"] is not None
            }
            if self.usable
            else {}
        )
        self.paths = {(x["series"], x["panel"], x["seed"]): x["path"] for x in per_run}
        self.any = any(self.rows.values())
        self._done: dict[tuple[str, str, str], dict | None] = {}  # a declared pair is often in the baseline table

    def difference(self, a: str, b: str, panel: str) -> dict | None:
        if (a, b, panel) not in self._done:
            self._done[a, b, panel] = self._difference(a, b, panel)
        return self._done[a, b, panel]

    def _difference(self, a: str, b: str, panel: str) -> dict | None:
        if not self.any or self.stat is None:
            return None
        stat, value, truth = self.stat
        mine = {k[2]: v for k, v in self.rows.items() if k[:2] == (a, panel) and v}
        base = {k[2]: v for k, v in self.rows.items() if k[:2] == (b, panel) and v}
        seeds = sorted(set(mine) & set(base))
        if not seeds:
            return None
        self._check_same_rows([(a, panel, k) for k in seeds] + [(b, panel, k) for k in seeds])
        return measures.paired_over_examples_and_seeds(
            {k: [value(r) for r in mine[k]] for k in seeds},
            {k: [value(r) for r in base[k]] for k in seeds},
            [truth(r) for r in base[seeds[0]]],
            stat,
            boots=1000,
        )

    def _check_same_rows(self, keys: list[tuple[str, str, int]]) -> None:
        """The pairing over examples is by position: every run compared must have scored the same test rows."""
        first = keys[0]
        want = [(r.get("id"), r.get("target")) for r in self.rows[first] or []]
        for key in keys[1:]:
            got = [(r.get("id"), r.get("target")) for r in self.rows[key] or []]
            if got != want:
                raise ValueError(
                    f"{self.paths[key]} and {self.paths[first]} did not score the same test rows ({len(got)} and "
                    f"{len(want)} rows{', different ids or targets' if len(got) == len(want) else ''}), so their "
                    "predictions cannot be paired example by example: report runs of the same data.name, data.seed "
                    "and data.max_eval_examples together, or score them again on the same rows."
                )


def _examples_table(
    saved: _Saved, series: list[str], panels: list[str], metric: str, baseline: str, found: list[dict]
) -> Table | None:
    if not saved.any:
        return None
    rows = []
    for s in series:
        if s == baseline:
            continue
        cells: list[Cell] = [(f"{s} − {baseline}", False)]
        for p in panels:
            d = saved.difference(s, baseline, p)
            cells.append(("-", False) if d is None else (_both(d), d["significant"]))
            if d is not None:
                found.append(_record("vs baseline", f"{s} − {baseline}", p, "examples and seeds", d))
        rows.append(cells)
    return Table(["difference", *[p or metric for p in panels]], rows)


def _both(d: dict) -> str:
    if d["low"] is None and d.get("examples_low") is not None:  # one seed: no verdict, however many examples
        return (
            f"{d['mean']:+.4f} n={d['n']}x{d['examples']}: one seed, no interval (training noise unmeasured; over "
            f"examples alone [{d['examples_low']:+.4f}, {d['examples_high']:+.4f}])"
        )
    if d["low"] is None:
        return f"{d['mean']:+.4f}"
    seeds = "" if d["seeds_low"] is None else f"; seeds only [{d['seeds_low']:+.4f}, {d['seeds_high']:+.4f}]"
    mark = " *" if d["significant"] else ""
    return f"{d['mean']:+.4f} [{d['low']:+.4f}, {d['high']:+.4f}] n={d['n']}x{d['examples']}{seeds}{mark}"


def _families_table(
    per_run: list[dict],
    series: list[str],
    panels: list[str],
    metric: str,
    families: Any,
    saved: _Saved,
    found: list[dict],
) -> Table | None:
    """Holm within each declared family, on the test a verdict uses: over examples and seeds where both methods
    saved predictions (one panel: the test rows are shared), over seeds alone otherwise (the table says which)."""
    if not families:
        return None
    if not isinstance(families, dict):
        raise ConfigError(f"report.families must map a family's name to its comparisons, not {families!r}.")
    rows = []
    for family, comparisons in families.items():
        tests = {}
        for pair in comparisons or []:
            if not (isinstance(pair, (list, tuple)) and len(pair) == 2 and all(m in series for m in pair)):
                raise ConfigError(
                    f"report.families.{family}: {pair!r} is not a pair of this report's methods "
                    f"({', '.join(series)}): write [method, reference]."
                )
            a, b = pair
            mine, base = (
                {
                    (x["panel"], x["seed"]): x["value"]
                    for x in per_run
                    if x["series"] == m and x.get("value") is not None
                }
                for m in (a, b)
            )
            keys = sorted(set(mine) & set(base))
            both = saved.difference(a, b, panels[0]) if len(panels) == 1 else None
            tests[f"{a} − {b}"] = (
                (both, "examples and seeds")
                if both is not None and (both["p"] is not None or both["n"] == 1)  # one seed: _both says why no p
                else (measures.paired_t([mine[k] for k in keys], [base[k] for k in keys]), "seeds")
            )
        adjusted = measures.holm({k: d["p"] for k, (d, _) in tests.items()})
        for name, (d, over) in tests.items():
            holm_p = adjusted[name]
            kept = holm_p is not None and holm_p < 1 - measures.CONFIDENCE
            found.append(_record(family, name, panels[0] if len(panels) == 1 else "(pooled)", over, d, holm_p))
            p = "-" if d["p"] is None else f"{d['p']:.3g}"
            rows.append(
                [
                    (family, False),
                    (name, False),
                    (_both(d) if over != "seeds" else _interval(d), False),
                    (over, False),
                    (p, False),
                    ("-" if holm_p is None else f"{holm_p:.3g}" + (" *" if kept else ""), kept),
                ]
            )
    return Table(["family", "comparison", f"{metric}: mean [95% interval]", "over", "p", "Holm p"], rows)


def _interval(d: dict) -> str:
    if d["low"] is None:
        return f"{d['mean']:+.4f} (n={d['n']})"
    return f"{d['mean']:+.4f} [{d['low']:+.4f}, {d['high']:+.4f}] n={d['n']}"


def _post_hoc(families: Any) -> str:
    if families:
        return (
            "Only the comparisons in the families above were declared before the runs (report.families in the "
            "sweep file); Holm's correction holds within each family. Every other difference in this report is "
            "post hoc: read its interval as exploratory."
        )
    return (
        "No families of comparisons were declared before the runs (report.families in the sweep file): every "
        "difference in this report is post hoc, with no correction for how many were looked at."
    )


def _windows_table(per_run: list[dict], series: list[str], panels: list[str], baseline: str) -> Table | None:
    """One row per panel and method: pooling panels (r 8 with r 128) would hide a setting's own verdict."""
    if not any(x.get("dd_rise_rel_w1") is not None for x in per_run):
        return None
    header = ["panel", "method", *[f"bump w={w}" for w in WINDOWS], *[f"second descent w={w}" for w in WINDOWS]]
    rows = []
    for p in panels:
        here = [x for x in per_run if x["panel"] == p]
        for s in series:
            if not any(x["series"] == s for x in here):
                continue
            cells: list[Cell] = [(p or "-", False), (s, False)]
            for key in ("dd_rise_rel", "second_descent_rel"):
                for w in WINDOWS:
                    cells.append(_window_cell(here, s, baseline, f"{key}_w{w}"))
            rows.append(cells)
    return Table(header, rows)


def _window_cell(per_run: list[dict], s: str, baseline: str, key: str) -> Cell:
    mine = {x["seed"]: x[key] for x in per_run if x["series"] == s and x.get(key) is not None}
    if not mine:
        return ("-", False)
    mean = sum(mine.values()) / len(mine)
    if s == baseline:
        return (f"{mean:.3f}", False)
    base = {x["seed"]: x[key] for x in per_run if x["series"] == baseline and x.get(key) is not None}
    keys = sorted(set(mine) & set(base))
    d = measures.paired_t([mine[k] for k in keys], [base[k] for k in keys])
    if d["low"] is None:
        return (f"{mean:.3f}", False)
    return (f"{mean:.3f} ({d['mean']:+.3f}{' *' if d['significant'] else ''})", d["significant"])
