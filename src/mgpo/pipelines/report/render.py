"""The report as documents: ``report.md``, a self-contained ``report.html`` (figures embedded) and ``runs.csv``,
from a list of blocks (("h2", text), ("p", text), ("img", path, caption), ("table", Table))."""

from __future__ import annotations

import base64
import csv
import html
from pathlib import Path

from mgpo.pipelines.report.analysis import Analysis
from mgpo.pipelines.report.collect import Experiment
from mgpo.pipelines.report.figures import _panel_chance
from mgpo.pipelines.report.labels import CLEAN_LOSS_DIFFS, STALLED_FALL, _order
from mgpo.pipelines.report.tables import Table


def _md_table(table: Table) -> str:
    head = "| " + " | ".join(table.header) + " |\n|" + "---|" * len(table.header) + "\n"
    body = "".join("| " + " | ".join(f"**{t}**" if b else t for t, b in row) + " |\n" for row in table.rows)
    return head + body


def _html_table(table: Table) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in table.header)

    def cell(text: str, bold: bool) -> str:
        numeric = text[:1].isdigit() or text[:2].lstrip("+-−")[:1].isdigit() or text == "-"
        inner = f"<strong>{html.escape(text)}</strong>" if bold else html.escape(text)
        return f"<td>{inner}</td>" if numeric else f"<td class='text'>{inner}</td>"

    body = "".join("<tr>" + "".join(cell(t, b) for t, b in row) + "</tr>" for row in table.rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _blocks(exp: Experiment, result: Analysis, figures: list[tuple[Path, str]]) -> list[tuple]:
    """One experiment's section: its summary and method table, its differences, its measures."""
    return (
        _summary_blocks(exp, result, figures)
        + _difference_blocks(result)
        + _robustness_blocks(result)
        + _measure_blocks(result)
    )


def _robustness_blocks(result: Analysis) -> list[tuple]:
    """Over examples as well as seeds, the declared families, the double-descent measures by window."""
    rob, base = result.robustness, result.baseline
    blocks: list[tuple] = []
    if rob is None:
        return blocks
    if rob.examples is not None:
        blocks += [
            ("h3", f"Difference to {base} over test examples and seeds: mean [95% interval]"),
            (
                "p",
                "Every run scored the same test rows, so the seed-only interval above measures training noise on "
                "that one test set. This one adds which rows were drawn: t interval with the seed variance plus "
                "the variance of the seed-mean difference under a bootstrap of the test rows (one resample per "
                "replicate, shared by every seed and both arms; 1000 replicates). n = seeds x rows. A verdict "
                "uses this, the wider, interval. Bold and * : it excludes 0. With one seed there is no interval "
                "(the training noise is unmeasured): the interval over examples alone is shown beside it, not as a "
                "verdict.",
            ),
            ("table", rob.examples),
        ]
    if rob.families is not None:
        blocks += [
            ("h3", "Declared comparisons, Holm's correction within each family"),
            (
                "p",
                "Bold and * : Holm's adjusted p below 0.05. Each p is that of the test a verdict uses (column "
                "`over`): over test examples and seeds where both methods saved per-example predictions and the "
                "report has one panel (the wider interval of the table above), else the paired t over the pooled "
                "panels and seeds.",
            ),
            ("table", rob.families),
        ]
    blocks.append(("p", rob.post_hoc))
    if rob.windows is not None:
        blocks += [
            ("h3", "Smoothing window and second descent: how firm the double-descent verdict is"),
            (
                "p",
                "Mean over seeds, per panel, of the bump measure (the largest rise of the smoothed loss above its "
                "running minimum, over that minimum; the primary measure) and of the second-descent measure (the "
                "largest min(rise above the running minimum, fall to the lowest later point), over the running "
                "minimum: large only where the loss rose and came down again; each measure picks its own point), "
                f"at smoothing windows 1-5 logged points. In brackets: the paired difference to {base}; * : its t "
                "interval excludes 0. A verdict that flips across windows is not one.",
            ),
            ("table", rob.windows),
        ]
    return blocks


def _summary_blocks(exp: Experiment, result: Analysis, figures: list[tuple[Path, str]]) -> list[tuple]:
    n_done = sum(1 for r in exp.runs if r.metrics)
    m, base = result.metric, result.baseline
    walls = [r.metrics["wall_time_s"] for r in exp.runs if r.metrics.get("wall_time_s") is not None]
    wall = (
        f" Wall time of the finished runs: {sum(walls) / 3600:.2f} h in all ({len(walls)} runs; each run's "
        "`wall_time_s`: model loading, training and evaluation over all its sessions, less the work an "
        "interrupted session did after its last checkpoint)."
        if walls
        else ""
    )
    blocks: list[tuple] = [
        ("h2", exp.title),
        (
            "p",
            f"{n_done} of {len(exp.runs)} runs finished; methods: {', '.join(result.series)}; "
            f"primary metric `{m}` ({'higher' if result.better else 'lower'} is better); baseline: "
            f"{base}.{wall}",
        ),
    ]
    blocks += [("p", note) for note in exp.notes]
    if exp.differences:
        blocks.append(
            (
                "p",
                "These run folders are not a sweep, so all runs of one method are taken as its seeds; "
                "but they differ in more than the seed: " + " | ".join(exp.differences) + ". Their "
                "means and paired differences mix those settings: run them as a sweep with that axis.",
            )
        )
    for png, caption in figures:
        blocks.append(("img", png, caption))
    blocks.append(("h3", f"{m}: mean ± std over seeds (best in bold)"))
    if result.method_table.uneven:
        blocks.append(
            (
                "p",
                "Not all methods have the same finished seeds in "
                f"{', '.join(c or m for c in result.method_table.uneven)}: there each cell says "
                "its number of seeds n, and no best is marked, as means over different seeds do not "
                "rank the methods. The paired differences below compare only the seeds both have.",
            )
        )
    blocks.append(("table", result.method_table))
    chance = {p: _panel_chance(result, p) for p in result.panels}
    said = [f"{p + ': ' if p else ''}{c:.4f}" for p, (c, _) in chance.items() if c is not None]
    gaps = [f"{p or m}: {why}" for p, (_, why) in chance.items() if why]
    if said or gaps:
        blocks.append(
            (
                "p",
                "Chance (always guessing the most frequent label of the split the metric is taken on, "
                "as each run recorded it): "
                + ("; ".join(said) + " (the dashed line in the figure)" if said else "none common to a panel")
                + (". No chance line for " + "; ".join(gaps) if gaps else "")
                + ".",
            )
        )
    return blocks


def _difference_blocks(result: Analysis) -> list[tuple]:
    base, blocks = result.baseline, []
    if result.differences.table.rows:
        blocks += [
            ("h3", f"Difference to {base}, paired by seed: mean [95% t interval]"),
            (
                "p",
                "Bold and * : the interval excludes 0. Student t interval of the n paired differences "
                "(n-1 degrees of freedom); n=1: no interval.",
            ),
            ("table", result.differences.table),
        ]
    else:  # one method: an empty table of differences would look like a failure
        blocks.append(("p", f"Only one method ({base}): nothing to compare it with, so no differences."))
    if result.differences.own:
        blocks += [
            ("h3", "Each variant with the perturbation minus the same variant without, paired by seed"),
            ("table", result.differences.own),
        ]
    for what, table in result.differences.loss_tables:
        note = "Lower is better. Bold and * : the interval excludes 0."
        if what == CLEAN_LOSS_DIFFS["clean_dd_rise_rel"]:
            note += (
                f" ‡ k stalled: in k of the n pairs the method's clean loss fell by less than "
                f"{100 * STALLED_FALL:g}% of its start, so it had no descent to rise from; a lower rise there "
                f"means it did not train, not that it trained more smoothly. ‡ {base}: k stalled: the same "
                f"for {base}'s runs, whose missing rise makes the method's look larger."
            )
        blocks += [
            ("h3", f"Difference to {base} in the {what}, paired by seed: mean [95% t interval]"),
            ("p", note),
            ("table", table),
        ]
    return blocks


def _measure_blocks(result: Analysis) -> list[tuple]:
    base = result.baseline
    blocks: list[tuple] = []
    blocks += [
        ("h3", "Double descent (smoothed training loss above its running minimum; means over seeds)"),
        ("p", _loss_note(result)),
    ]
    if result.no_loss:
        blocks.append(
            (
                "p",
                f"No logged training loss (training.max_steps below training.logging_steps?), so not "
                f"in the curves or this table: {', '.join(result.no_loss)}.",
            )
        )
    blocks += [
        ("table", result.dd_table),
        ("h3", f"Cost relative to {base}"),
        (
            "p",
            "Time per step is wall time: it also counts the time other processes held the cores. Where the "
            "load column is above the number of CPUs, the runs shared the machine and their times are not "
            "a measure of cost (the cpu-cost sweep and benchmarks/ measure cost alone).",
        ),
        ("table", result.cost_table),
    ]
    if result.diag_table.rows:
        blocks += [
            ("h3", "Perturbation size (median over logged steps, mean over seeds)"),
            (
                "p",
                "radius / ‖W‖: each layer's perturbation radius ‖eps_l‖ over its weight norm ‖W0 + s B A‖; "
                "radius / last update: over the size of the layer's last update (a look-ahead of that many "
                "steps); radius factor k: what rho is multiplied by, the APN factor min(1/gbar, max_scale) "
                "(1 without APN), or for the radius rules ‖W_l‖ (apn=weight) and ‖W_l(t) − W_l(t−1)‖ "
                "(apn=update); share of layers at the APN cap. Means over the perturbed layers at each "
                "step (docs/method.md, section 13). A layer perturbed in factor space (AdaLoRA; full "
                "fine-tuning's tensors) has its radius and sizes taken over the tensors it moves: ‖W‖ is "
                "their norm, a bias's or a LayerNorm's included.",
            ),
            ("table", result.diag_table),
        ]
    if result.failed:
        blocks += [
            ("h3", "Runs without results"),
            (
                "table",
                Table(
                    ["run", "status", "error"],
                    [[(a, False), (b, False), (c.splitlines()[-1][:200], False)] for a, b, c in result.failed],
                ),
            ),
        ]

    return blocks


def _loss_note(result: Analysis) -> str:
    """Which loss the curves and the double-descent measure use, and a warning when runs differ in it."""
    note = (
        f"Loss used for the curves and this table: {result.loss} (column `loss`). `clean (probe)` is "
        "`clean_loss`, the mean loss of a fixed set of training examples at the clean weights, the same "
        "measurement for every method; `as trained` is the logged `loss`, which for MGPO, MSAM and the noise "
        "methods is the loss at the perturbed weights."
    )
    windows = _order(x["dd_window"] for x in result.per_run if "dd_window" in x)
    if windows:
        trained = _order(x["trained_dd_window"] for x in result.per_run if "trained_dd_window" in x)
        note += (
            f" Smoothed: trailing moving average over {' / '.join(map(str, windows))} logged points"
            + (f" (the logged-loss columns: {' / '.join(map(str, trained))})" if trained else "")
            + ". Rise: "
            "the largest amount the smoothed loss climbs above its running minimum. `peak step`: mean over "
            "the seeds with a rise; `steps to recover`: mean over the seeds that got back to that minimum "
            "(`not recovered` counts the others); spikes: logged losses above the factor times the median of "
            "the window before them."
        )
    if result.no_clean_loss and result.mixed_losses:
        note += (
            f" Runs without `clean_loss` (logged before the probe existed, or with "
            f"`training.clean_loss_every=0`) fall back to the loss as trained, so they are not measured like "
            f"the others: {', '.join(result.no_clean_loss)}."
        )
    elif result.no_clean_loss:
        note += (
            " No run here logged `clean_loss` (runs from before the probe, or `training.clean_loss_every=0`): "
            "the loss as trained is used, so an MGPO run's look-ahead loss is compared with a plain run's "
            "clean one."
        )
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
    parts = [
        f"<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
        f"<link rel='icon' href='data:,'><style>{CSS}</style></head><body><h1>{html.escape(title)}</h1>"
    ]
    for b in blocks:
        if b[0] in ("h2", "h3"):
            parts.append(f"<{b[0]}>{html.escape(b[1])}</{b[0]}>")
        elif b[0] == "p":
            parts.append(f"<p>{_inline(b[1])}</p>")
        elif b[0] == "img":
            data = base64.b64encode(b[1].read_bytes()).decode()
            parts.append(
                f"<figure><img src='data:image/png;base64,{data}' alt='{html.escape(b[2])}'>"
                f"<figcaption>{html.escape(b[2])}</figcaption></figure>"
            )
        else:
            parts.append(_html_table(b[1]))
    parts.append("</body></html>")
    out.write_text("\n".join(parts))
    return out


def write_comparisons_csv(results: list[Analysis], out: Path) -> Path | None:
    """comparisons.csv: the intervals over examples and seeds and the declared families' Holm p-values as
    numbers, one row per comparison (None, and no file, where a report has neither)."""
    rows = [
        {"experiment": res.per_run[0]["experiment"] if res.per_run else "", "metric": res.metric, **c}
        for res in results
        if res.robustness is not None
        for c in res.robustness.comparisons
    ]
    if not rows:
        out.unlink(missing_ok=True)
        return None
    with out.open("w", newline="") as f:
        writer = csv.DictWriter(f, list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return out


def write_runs_csv(results: list[Analysis], out: Path) -> Path:
    rows = [r for res in results for r in res.per_run]
    keys = _order(k for r in rows for k in r)
    with out.open("w", newline="") as f:
        writer = csv.DictWriter(f, keys)
        writer.writeheader()
        writer.writerows(rows)
    return out
