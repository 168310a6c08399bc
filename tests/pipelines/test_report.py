"""``mgpo report`` on a fixture of small run folders written by hand (no training): the tables hold the numbers
computed from the fixture's logs and metrics, figures and a self-contained HTML page are written, and the page
renders in a real headless browser with every figure shown and no console error."""

from __future__ import annotations

import csv
import json
import re
import shutil
import subprocess
import zlib
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from mgpo.cli import app
from mgpo.pipelines.measures import double_descent, instability_count, paired_t
from mgpo.pipelines.report import STALLED_FALL, make_report, mean_std_cell

RANKS = (16, 64)
SEEDS = (0, 1, 2)
ACCURACY = {  # (method, rank) -> accuracy per seed
    ("LoRA", 16): [0.80, 0.82, 0.81],
    ("LoRA", 64): [0.78, 0.74, 0.76],
    ("LoRA-MGPO", 16): [0.83, 0.84, 0.82],
    ("LoRA-MGPO", 64): [0.85, 0.83, 0.84],
}
COST = {"LoRA": (1000, 500.0, 0.10), "LoRA-MGPO": (1000, 550.0, 0.12)}


def curve(method: str, rank: int, seed: int) -> list[float]:
    """A decaying loss; LoRA gets a bump after step 60 that grows with rank."""
    t = np.arange(1, 101)
    loss = 2.0 * np.exp(-t / 15) + 0.3 + 0.01 * np.sin(t + seed)
    if method == "LoRA":
        loss += (rank / 64) * 0.5 * np.exp(-(((t - 70) / 6) ** 2))
    return [round(float(x), 6) for x in loss]


def add_run(
    root: Path, rows: list, name: str, labels: dict, log: list[dict], metrics: dict, config: str | None = None
) -> Path:
    """A finished run folder ``root/name`` (log.jsonl, metrics.json, config.yaml if given), appended to ``rows``
    as the sweep's index.json lists it."""
    out = root / name
    out.mkdir(parents=True, exist_ok=True)
    if config is not None:
        (out / "config.yaml").write_text(config)
    (out / "log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in log))
    (out / "metrics.json").write_text(json.dumps(metrics))
    rows.append({"index": len(rows), "name": name, "status": "done", "output_dir": str(out), "labels": labels})
    return out


def write_index(root: Path, title: str, rows: list) -> None:
    (root / "index.json").write_text(json.dumps({"title": title, "runs": rows}))


def seeded(method: str, seed: int) -> dict:
    return {"method": method, "training.seed": seed}


def falling(steps: int = 20) -> list[dict]:
    return [{"step": i + 1, "loss": 1 / (i + 1)} for i in range(steps)]


@pytest.fixture
def sweep_dir(tmp_path) -> Path:
    root = tmp_path / "rank-sweep"
    rows: list[dict] = []
    for rank in RANKS:
        for method in ("LoRA", "LoRA-MGPO"):
            for seed in SEEDS:
                p_method = "mgpo" if method == "LoRA-MGPO" else "adamw"
                params, mem, tps = COST[method]
                add_run(
                    root,
                    rows,
                    f"r{rank}-{method}-s{seed}",
                    {"rank": str(rank), **seeded(method, seed)},
                    [{"step": i + 1, "loss": v} for i, v in enumerate(curve(method, rank, seed))],
                    {
                        "test_accuracy": ACCURACY[method, rank][seed],
                        "trainable_params": params,
                        "peak_memory_mb": mem,
                        "time_per_step_s": tps,
                    },
                    config=f"adapter: {{method: lora, rank: {rank}}}\nperturbation: {{method: {p_method}}}\n"
                    f"training: {{seed: {seed}}}\n",
                )
    failed = root / "r64-LoRA-s3"
    failed.mkdir()
    rows.append(
        {
            "index": len(rows),
            "name": failed.name,
            "status": "failed",
            "output_dir": str(failed),
            "labels": {"rank": "64", "method": "LoRA", "training.seed": 3},
            "error": "exit code 2\nerror: out of memory",
        }
    )
    write_index(root, "rank sweep", rows)
    (root / "sweep.yaml").write_text("report: {baseline: LoRA}\n")
    return root


def _md_row(md: str, first_cell: str) -> list[str]:
    line = next(line for line in md.splitlines() if line.startswith(f"| {first_cell} |"))
    return [c.strip() for c in line.strip("|").split("|")]


def test_report_tables_hold_the_numbers_of_the_fixture(sweep_dir, tmp_path):
    paths = make_report([sweep_dir], tmp_path / "report")
    md = paths["markdown"].read_text()
    for method in ("LoRA", "LoRA-MGPO"):
        row = _md_row(md.split("## rank sweep")[1].split("### Difference")[0], method)
        expected = [mean_std_cell(ACCURACY[method, r]) for r in RANKS]
        assert [c.strip("*") for c in row[1:3]] == expected
    # the best mean of each column is bold: LoRA-MGPO in both panels here
    assert _md_row(md, "LoRA-MGPO")[1].startswith("**") and not _md_row(md, "LoRA")[1].startswith("**")
    # paired differences with the t interval, pooled over ranks and seeds
    diff = paired_t(
        [a for r in RANKS for a in ACCURACY["LoRA-MGPO", r]], [a for r in RANKS for a in ACCURACY["LoRA", r]]
    )
    cell = _md_row(md, "LoRA-MGPO − LoRA")[-1]
    assert f"{diff['mean']:+.4f} [{diff['low']:+.4f}, {diff['high']:+.4f}]" in cell
    # per-run double-descent numbers in runs.csv equal the measure computed on the logs
    rows = list(csv.DictReader(paths["csv"].open()))
    assert len(rows) == 2 * 2 * 3 + 1
    for row in rows:
        if row["status"] == "failed":
            continue
        method, rank, seed = row["series"], int(row["panel"].split("=")[1]), int(row["seed"])
        losses = curve(method, rank, seed)
        dd = double_descent(range(1, 101), losses)
        assert float(row["dd_rise"]) == pytest.approx(dd["rise"])
        assert float(row["dd_rise_rel"]) == pytest.approx(dd["rise_rel"])
        assert float(row["dd_fall_rel"]) == pytest.approx(dd["fall_rel"])
        assert int(row["spikes"]) == instability_count(losses, dd["window"])
    rises = {(r["series"], r["panel"]): float(r["dd_rise"]) for r in rows if r["seed"] == "0"}
    assert rises["LoRA", "rank=64"] > rises["LoRA", "rank=16"] > rises["LoRA-MGPO", "rank=64"]
    # cost relative to LoRA
    cost = md.split("### Cost")[1].split("###")[0]
    for rank in RANKS:  # one row per panel and method, each against the baseline in its panel
        assert _md_row(cost, f"rank={rank} | LoRA-MGPO")[2:] == ["1,000", "1.00×", "550", "1.10×", "0.120", "1.20×"]
    # the failed run is listed with its error, not silently dropped
    assert "r64-LoRA-s3" in md and "out of memory" in md
    assert {p.name for p in paths["figures"]} == {
        "rank-sweep-loss.png",
        "rank-sweep-test_accuracy.png",
        "rank-sweep-double-descent.png",
    }
    html = paths["html"].read_text()
    assert html.count("src='data:image/png;base64,") == 3 and "<img src='figures" not in html


def test_a_method_with_fewer_seeds_is_paired_on_the_seeds_both_have_and_says_n(sweep_dir, tmp_path):
    index = json.loads((sweep_dir / "index.json").read_text())
    index["runs"] = [r for r in index["runs"] if r["name"] != "r16-LoRA-MGPO-s2"]  # LoRA keeps its 3 seeds there
    (sweep_dir / "index.json").write_text(json.dumps(index))
    md = make_report([sweep_dir], tmp_path / "report")["markdown"].read_text()
    row = _md_row(md.split("### Difference")[1], "LoRA-MGPO − LoRA")
    r16 = paired_t(ACCURACY["LoRA-MGPO", 16][:2], ACCURACY["LoRA", 16][:2])
    assert row[1].strip("*") == f"{r16['mean']:+.4f} [{r16['low']:+.4f}, {r16['high']:+.4f}] n=2"
    pooled = paired_t(
        ACCURACY["LoRA-MGPO", 16][:2] + ACCURACY["LoRA-MGPO", 64], ACCURACY["LoRA", 16][:2] + ACCURACY["LoRA", 64]
    )
    assert row[-1].strip("*") == f"{pooled['mean']:+.4f} [{pooled['low']:+.4f}, {pooled['high']:+.4f}] n=5 "


def test_a_column_whose_methods_have_different_seeds_shows_n_and_marks_no_best(sweep_dir, tmp_path):
    """A partial sweep: LoRA has a 4th seed at rank 16 (a lucky one) the other method has not yet. Its mean over 4
    seeds then tops the column though on the 3 shared seeds LoRA-MGPO is better: that column says each cell's n
    and bolds no best; the complete rank-64 column still does."""
    index = json.loads((sweep_dir / "index.json").read_text())
    rows = index["runs"]
    lucky = 0.99
    add_run(
        sweep_dir,
        rows,
        "r16-LoRA-s3",
        {"rank": "16", **seeded("LoRA", 3)},
        falling(),
        {"test_accuracy": lucky},
        config="adapter: {method: lora, rank: 16}\ntraining: {seed: 3}\n",
    )
    write_index(sweep_dir, "rank sweep", rows)
    lora16 = ACCURACY["LoRA", 16] + [lucky]
    assert np.mean(lora16) > np.mean(ACCURACY["LoRA-MGPO", 16])  # unpaired, LoRA would look best
    md = make_report([sweep_dir], tmp_path / "report")["markdown"].read_text()
    table = md.split("## rank sweep")[1].split("### Difference")[0]
    lora, mgpo = _md_row(table, "LoRA"), _md_row(table, "LoRA-MGPO")
    assert lora[1] == f"{mean_std_cell(lora16)} (n=4)"
    assert mgpo[1] == f"{mean_std_cell(ACCURACY['LoRA-MGPO', 16])} (n=3)"
    assert not any(row[i].startswith("**") for row in (lora, mgpo) for i in (1, 3))  # rank=16 and avg
    assert mgpo[2] == f"**{mean_std_cell(ACCURACY['LoRA-MGPO', 64])}**"
    assert "no best is marked" in table and "rank=16" in table.split("|")[0]


def test_loose_run_folders_are_labelled_from_their_config(sweep_dir, tmp_path):
    runs = [sweep_dir / "r16-LoRA-s0", sweep_dir / "r16-LoRA-MGPO-s0"]
    result = CliRunner().invoke(app, ["report", *map(str, runs), "--out", str(tmp_path / "r")])
    assert result.exit_code == 0, result.output
    md = (tmp_path / "r" / "report.md").read_text()
    assert _md_row(md, "LoRA")[1] == "0.8000" and _md_row(md, "LoRA-MGPO")[1].strip("*") == "0.8300"


def test_a_run_that_logged_no_loss_is_named_and_the_others_are_reported(sweep_dir, tmp_path):
    """max_steps below logging_steps: a finished run with metrics but an empty log.jsonl, given with a sweep."""
    lone = add_run(
        tmp_path,
        [],
        "no-loss",
        {},
        [],
        {"test_accuracy": 0.7},
        config="adapter: {method: lora}\nperturbation: {method: mgpo}\n",
    )
    result = CliRunner().invoke(app, ["report", str(sweep_dir), str(lone), "--out", str(tmp_path / "r")])
    assert result.exit_code == 0, result.output
    md = (tmp_path / "r" / "report.md").read_text()
    assert "No logged training loss" in md and ": no-loss." in md
    assert "figures/rank-sweep-loss.png" in md and "runs-loss.png" not in md  # no empty curve for the lone run
    assert "| LoRA-MGPO | **0.7000** |" in md  # the lone run's metric is reported


def test_report_errors_name_the_bad_input(sweep_dir, tmp_path):
    result = CliRunner().invoke(app, ["report", str(tmp_path / "nothing-here"), "--out", str(tmp_path / "r")])
    assert result.exit_code == 2 and "neither a sweep folder" in result.output
    result = CliRunner().invoke(app, ["report", str(sweep_dir), "--baseline", "DoRA", "--out", str(tmp_path / "r")])
    assert result.exit_code == 2 and "DoRA" in result.output and "LoRA-MGPO" in result.output


def chromium() -> str | None:
    return next((shutil.which(b) for b in ("chromium", "chromium-browser", "google-chrome") if shutil.which(b)), None)


# Injected at the top of <head> in a copy of the page: records script errors, failed resource loads and
# console.error calls, then, once loaded, whether every <img> decoded and is on screen with a size.
PROBE = """<script>
window.__problems = [];
window.addEventListener('error', e => window.__problems.push('error: ' + (e.message || (e.target && e.target.src
  || '').slice(0, 60))), true);
const __ce = console.error; console.error = (...a) => { window.__problems.push('console.error: ' + a.join(' '));
  __ce(...a); };
window.addEventListener('load', () => {
  const imgs = [...document.images];
  const shown = imgs.filter(i => i.complete && i.naturalWidth > 0 && i.getBoundingClientRect().width > 100);
  const out = document.createElement('pre'); out.id = '__probe';
  out.textContent = JSON.stringify({images: imgs.length, shown: shown.length, problems: window.__problems});
  document.body.appendChild(out);
});
</script>"""


@pytest.mark.skipif(
    chromium() is None,
    reason="no chromium binary on PATH: `bash scripts/install.sh --test` "
    "installs Debian's chromium (apt-get install chromium)",
)
def test_html_report_renders_in_a_headless_browser(sweep_dir, tmp_path):
    paths = make_report([sweep_dir], tmp_path / "report")
    page = paths["html"].read_text()
    probed = tmp_path / "probed.html"
    probed.write_text(page.replace("<head>", "<head>" + PROBE, 1))
    proc = subprocess.run(
        [
            chromium(),
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-background-networking",
            "--virtual-time-budget=10000",
            "--dump-dom",
            probed.as_uri(),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    found = re.search(r'<pre id="__probe">(.*?)</pre>', proc.stdout, re.S)
    assert found, proc.stderr[-2000:]
    probe = json.loads(found.group(1).replace("&quot;", '"'))
    assert probe["problems"] == []
    assert probe["images"] == len(paths["figures"]) == probe["shown"]
    console = [line for line in proc.stderr.splitlines() if "CONSOLE" in line and "ERROR" in line.upper()]
    assert console == []


def test_each_variant_is_also_compared_with_itself_without_the_perturbation(tmp_path):
    accuracy = {"LoRA": [0.70, 0.72, 0.71], "DoRA": [0.74, 0.70, 0.75], "DoRA-MGPO": [0.76, 0.75, 0.74]}
    root, rows = tmp_path / "methods", []
    for method, values in accuracy.items():
        for seed, value in enumerate(values):
            add_run(root, rows, f"{method}-s{seed}", seeded(method, seed), falling(), {"test_accuracy": value})
    write_index(root, "methods", rows)
    (root / "sweep.yaml").write_text("report: {baseline: LoRA}\n")
    md = make_report([root], tmp_path / "report")["markdown"].read_text()
    own = md.split("same variant without")[1].split("###")[0]
    d = paired_t(accuracy["DoRA-MGPO"], accuracy["DoRA"])
    assert f"{d['mean']:+.4f} [{d['low']:+.4f}, {d['high']:+.4f}]" in _md_row(own, "DoRA-MGPO − DoRA")[1]
    assert "DoRA − LoRA" not in own  # only a variant against itself, the baseline comparison is the table above
    # LoRA-GA is another adapter, not LoRA with a perturbation: never paired with LoRA as "with vs without"
    for seed, value in enumerate((0.70, 0.71, 0.72)):
        add_run(root, rows, f"LoRA-GA-s{seed}", seeded("LoRA-GA", seed), falling(1), {"test_accuracy": value})
    write_index(root, "methods", rows)
    md = make_report([root], tmp_path / "report2", baseline="DoRA")["markdown"].read_text()
    assert "LoRA-GA − LoRA" not in md and "LoRA-GA − DoRA" in md


def test_curves_and_double_descent_use_the_clean_loss_where_a_run_logged_it(tmp_path):
    """Logged `loss` smooth and low (MGPO's look-ahead), `clean_loss` (every other step) with a bump: the measure
    must be the clean curve's. A run from before the probe falls back to its loss, and the report says so."""
    t = np.arange(1, 61)
    as_trained = 1.5 * np.exp(-t / 10) + 0.1
    clean = 1.5 * np.exp(-t / 10) + 0.4 + 0.5 * np.exp(-(((t - 40) / 4) ** 2))
    root, rows = tmp_path / "probe", []
    for method, preset, with_probe in (
        ("LoRA", "lora", True),
        ("LoRA-MGPO", "lora-mgpo", True),
        ("LoRA-MGPO old", "lora-mgpo", False),
    ):
        log = [
            {"step": int(s), "loss": float(a), **({"clean_loss": float(c)} if with_probe and s % 2 == 0 else {})}
            for s, a, c in zip(t, as_trained, clean)
        ]
        add_run(
            root,
            rows,
            method.replace(" ", "-"),
            seeded(method, 0),
            log,
            {"test_accuracy": 0.8},
            config=f"perturbation: {{preset: {preset}}}\n",
        )
    write_index(root, "probe", rows)
    paths = make_report([root], tmp_path / "report")
    runs = {r["series"]: r for r in csv.DictReader(paths["csv"].open())}
    expected = double_descent(t[1::2], clean[1::2])
    wrong = double_descent(t, as_trained)
    assert expected["rise"] > 0.1 and wrong["rise"] == 0  # the two curves tell different stories
    for method in ("LoRA", "LoRA-MGPO"):
        assert runs[method]["loss_curve"] == "clean (probe)"
        assert float(runs[method]["dd_rise"]) == pytest.approx(expected["rise"])
        assert int(runs[method]["dd_peak_step"]) == expected["peak_step"]
    assert runs["LoRA-MGPO old"]["loss_curve"] == "as trained (at the perturbed weights)"
    assert float(runs["LoRA-MGPO old"]["dd_rise"]) == pytest.approx(wrong["rise"])
    md = paths["markdown"].read_text()
    dd = md.split("### Double descent")[1].split("###")[0]
    assert _md_row(dd, "-")[1:3] == ["LoRA", "clean (probe)"]
    assert "fall back to the loss as trained" in dd and "LoRA-MGPO-old" in dd
    assert "clean (probe) where logged" in md  # the figure's caption says which curve it shows


def test_a_single_method_report_has_no_empty_difference_table_and_its_bars_start_at_0(tmp_path, monkeypatch):
    """One method, every seed at accuracy 1.0: no table of differences (there is nothing to take them against)
    and the bar chart's y-axis runs from 0 past 1.0 (it was 0.99-1.01, zoomed on bars that all reach 1.0)."""
    from mgpo.pipelines.report import figures as report_figures

    root, rows = tmp_path / "single", []
    for seed in range(3):
        add_run(root, rows, f"LoRA-s{seed}", seeded("LoRA", seed), falling(), {"test_accuracy": 1.0})
    write_index(root, "single", rows)
    limits, save = {}, report_figures._save

    def keep_limits(fig, out_png):
        limits[out_png.name] = fig.axes[0].get_ylim()
        return save(fig, out_png)

    monkeypatch.setattr(report_figures, "_save", keep_limits)
    paths = make_report([root], tmp_path / "report")
    md = paths["markdown"].read_text()
    assert "Difference to" not in md and "| difference |" not in md
    assert "Only one method (LoRA): nothing to compare it with" in md
    assert "nothing to compare it with" in paths["html"].read_text()
    low, high = limits["single-test_accuracy.png"]
    assert low == 0 and 1.0 < high <= 1.1


def test_the_perturbation_size_table_holds_medians_over_steps_averaged_over_seeds(tmp_path):
    """Runs that logged the optimizer's diagnostics get a row each (median over their steps, mean over seeds,
    non-finite steps left out); a run without them (LoRA) gets none."""
    root, rows = tmp_path / "diag", []
    for method, preset in (("LoRA", "lora"), ("LoRA-MGPO", "lora-mgpo")):
        for seed in (0, 1):
            log = []
            for step in range(1, 8):
                row = {"step": step, "loss": 1.0 / step}
                if method == "LoRA-MGPO":
                    row.update(
                        {
                            "radius_to_weight_mean": 0.01 * step * (seed + 1),
                            "apn_capped": 1.0,
                            "radius_to_update_mean": float("nan") if step == 1 else 3.0 + step,
                            "apn_factor_mean": 10.0,
                        }
                    )
                log.append(row)
            add_run(
                root,
                rows,
                f"{method}-{seed}",
                seeded(method, seed),
                log,
                {"test_accuracy": 0.8},
                config=f"perturbation: {{preset: {preset}}}\n",
            )
    write_index(root, "diag", rows)
    md = make_report([root], tmp_path / "report")["markdown"].read_text()
    table = md.split("### Perturbation size")[1].split("###")[0]
    assert _md_row(table, "-")[1:] == [
        "LoRA-MGPO",
        f"{(0.04 + 0.08) / 2:.4f}",
        f"{np.median(range(5, 11)):.4f}",
        "10.0000",
        "1.0000",
    ]
    assert "| - | LoRA |" not in table
    assert "radius factor k" in table and "apn=update" in table  # k is the rules' factor too, said so


def test_clean_loss_differences_and_what_the_perturbed_loss_would_have_said(tmp_path):
    """Probed runs: the report pairs the final clean loss and the clean curve's double-descent rise against the
    baseline (t intervals), and for the MGPO runs adds the measure on the loss as trained beside the clean one."""
    t = np.arange(1, 61)
    root, rows, final, rises, trained = tmp_path / "dd", [], {}, {}, {}
    for method, preset in (("LoRA", "lora"), ("LoRA-MGPO", "lora-mgpo")):
        for seed in range(4):
            bump = 0.3 * (seed + 1) if method == "LoRA" else 0.05 * seed
            clean = 1.5 * np.exp(-t / 10) + 0.4 + bump * np.exp(-(((t - 40) / 4) ** 2)) + 0.01 * seed
            as_trained = 1.5 * np.exp(-t / 10) + 0.1 + (0.6 * np.exp(-(((t - 20) / 3) ** 2)) if seed % 2 else 0)
            log = [
                {"step": int(s), "loss": float(a), **({"clean_loss": float(c)} if s % 2 == 0 else {})}
                for s, a, c in zip(t, as_trained, clean)
            ]
            final[method, seed] = float(clean[-1]) + (0.05 + 0.01 * seed if method == "LoRA" else 0.0)
            add_run(
                root,
                rows,
                f"{method}-{seed}",
                seeded(method, seed),
                log,
                {"test_accuracy": 0.8, "final_clean_loss": final[method, seed]},
                config=f"perturbation: {{preset: {preset}}}\n",
            )
            rises[method, seed] = double_descent(t[1::2], clean[1::2])["rise_rel"]
            trained[method, seed] = double_descent(t, as_trained)
    write_index(root, "dd", rows)
    md = make_report([root], tmp_path / "report")["markdown"].read_text()
    for what, values in (("final clean training loss", final), ("double-descent rise on the clean loss", rises)):
        table = md.split(f"in the {what}")[1].split("###")[0]
        d = paired_t([values["LoRA-MGPO", s] for s in range(4)], [values["LoRA", s] for s in range(4)])
        assert d["significant"]
        cell = f"**{d['mean']:+.4f} [{d['low']:+.4f}, {d['high']:+.4f}] n={d['n']} ***"
        assert _md_row(table, "LoRA-MGPO − LoRA")[1] == cell
    dd = md.split("### Double descent")[1].split("###")[0]
    assert "logged loss: rise (% of min)" in dd
    for method in ("LoRA", "LoRA-MGPO"):  # every probed run, so the columns compare like with like
        line = next(line for line in dd.splitlines() if line.startswith(f"| - | {method} |"))
        cells = [c.strip() for c in line.strip("|").split("|")]
        assert cells[-3] == mean_std_cell([100 * trained[method, s]["rise_rel"] for s in range(4)], 1)
        assert cells[-2] == f"{sum(not trained[method, s]['recovered'] for s in range(4))}/4"


def test_a_lower_double_descent_rise_of_runs_that_never_trained_is_marked_stalled(tmp_path):
    """A method whose clean loss stays flat has no descent to rise from: its smaller rise is marked, with how many
    of the pairs stalled (clean loss fell by less than STALLED_FALL of its start), not passed off as smoother."""
    t = np.arange(1, 61)
    root, rows = tmp_path / "dd", []
    for method in ("LoRA", "Trains", "Stalls"):
        for seed in range(4):
            if (method == "Stalls" and seed < 3) or (method == "LoRA" and seed == 3):  # flat near chance: falls
                # by 2% of its start
                clean = 0.69 - 0.014 * (1 - np.exp(-t / 10)) + 0.001 * np.sin(t + seed)
            else:
                bump = (0.3 if method == "LoRA" else 0.1) * (seed + 1)
                clean = 1.5 * np.exp(-t / 10) + 0.4 + bump * np.exp(-(((t - 40) / 4) ** 2))
            log = [{"step": int(s), "loss": float(c), "clean_loss": float(c)} for s, c in zip(t, clean)]
            add_run(root, rows, f"{method}-{seed}", seeded(method, seed), log, {"test_accuracy": 0.8})
    write_index(root, "dd", rows)
    md = make_report([root], tmp_path / "report")["markdown"].read_text()
    table = md.split("in the double-descent rise on the clean loss")[1].split("###")[0]
    assert f"fell by less than {100 * STALLED_FALL:g}% of its start" in table
    # the baseline's stalled seed 3 is marked on every row it is paired in, by the baseline's name
    assert _md_row(table, "Stalls − LoRA")[1].strip("*").endswith("‡ 3 stalled ‡ LoRA: 1 stalled")
    assert _md_row(table, "Trains − LoRA")[1].strip("*").endswith("n=4 ‡ LoRA: 1 stalled")
    assert "for LoRA's runs, whose missing rise" in table


def test_stalled_runs_are_marked_in_the_double_descent_table_and_figure(tmp_path, monkeypatch):
    """A method flat near chance in one panel has the lowest rise there; the double-descent table counts its
    stalled seeds and the figure rings and labels the point, rather than calling it the smoothest."""
    from mgpo.pipelines.report import figures as report_figures

    t = np.arange(1, 61)
    root, rows = tmp_path / "dd2", []
    for panel in ("a", "b"):
        for method in ("LoRA", "Stalls"):
            for seed in range(3):
                if method == "Stalls" and panel == "b":
                    clean = 0.69 - 0.014 * (1 - np.exp(-t / 10)) + 0.001 * np.sin(t + seed)
                else:
                    clean = 1.5 * np.exp(-t / 10) + 0.4 + 0.3 * np.exp(-(((t - 40) / 4) ** 2))
                log = [{"step": int(s), "loss": float(c), "clean_loss": float(c)} for s, c in zip(t, clean)]
                add_run(
                    root,
                    rows,
                    f"{panel}-{method}-{seed}",
                    {"panel": panel, **seeded(method, seed)},
                    log,
                    {"test_accuracy": 0.8},
                )
    write_index(root, "dd2", rows)
    figures = {}

    def keep(fig, out_png):
        figures[out_png.name] = [
            t.get_text() for ax in fig.axes if ax.get_legend() for t in ax.get_legend().get_texts()
        ] + [ax.get_title() for ax in fig.axes]
        out_png.parent.mkdir(parents=True, exist_ok=True)
        out_png.write_bytes(b"")
        return out_png

    monkeypatch.setattr(report_figures, "_save", keep)
    paths = make_report([root], tmp_path / "report")
    md = paths["markdown"].read_text()
    dd = md.split("### Double descent")[1].split("###")[0]
    runs = list(csv.DictReader(paths["csv"].open()))
    for panel in ("a", "b"):
        for method in ("LoRA", "Stalls"):
            fell = [float(r["dd_fall_rel"]) for r in runs if r["series"] == method and r["panel"] == f"panel={panel}"]
            stalled = sum(f < STALLED_FALL for f in fell)
            header = _md_row(dd, "panel")
            row = _md_row(dd, f"panel={panel} | {method}")
            assert row[header.index(f"stalled (fell < {100 * STALLED_FALL:g}%)")] == f"{stalled}/{len(fell)}"
    assert "Stalls (stalled per panel: 0/3, 3/3)" in figures["dd2-double-descent.png"]
    assert "LoRA" in figures["dd2-double-descent.png"]  # no stalled seed: no count
    assert not any("lower = smoother" in text for text in figures["dd2-double-descent.png"])


def test_loss_legend_names_each_method_once_and_the_table_says_its_smoothing_window(tmp_path, monkeypatch):
    """Two panels, LoRA with 3 seeds in one and 2 in the other: the legend had 'LoRA (mean of 3 seeds)' and
    'LoRA (mean of 2 seeds)' as if two series. One entry per method, its seeds per panel; and the double-descent
    note says the moving-average window the measure used."""
    from mgpo.pipelines.report import figures as report_figures

    root, rows = tmp_path / "legend", []
    for panel in ("a", "b"):
        for method in ("LoRA", "Other"):
            for seed in range(3 if (panel, method) != ("b", "LoRA") else 2):
                log = [{"step": i + 1, "loss": 1 / (i + 1), "clean_loss": 1 / (i + 1)} for i in range(40)]
                add_run(
                    root,
                    rows,
                    f"{panel}-{method}-{seed}",
                    {"panel": panel, **seeded(method, seed)},
                    log,
                    {"test_accuracy": 0.8},
                )
    write_index(root, "legend", rows)
    legends = {}

    def keep(fig, out_png):
        legends[out_png.name] = [t.get_text() for leg in fig.legends for t in leg.get_texts()]
        out_png.parent.mkdir(parents=True, exist_ok=True)
        out_png.write_bytes(b"")
        return out_png

    monkeypatch.setattr(report_figures, "_save", keep)
    md = make_report([root], tmp_path / "report")["markdown"].read_text()
    assert legends["legend-loss.png"] == ["LoRA (seeds per panel: 3, 2)", "Other (mean of 3 seeds)"]
    window = double_descent(range(40), [1 / (i + 1) for i in range(40)])["window"]
    assert f"moving average over {window} logged points (the logged-loss columns: {window})" in md


def test_a_copied_sweep_folder_is_read_from_the_copy_not_from_where_the_sweep_wrote_it(tmp_path):
    """scripts/clean-experiments.sh keeps finished runs under docs/; their index.json still names runs/...: the
    report of the copy must show the copy's runs even while the originals (here: other numbers) still exist."""
    import shutil

    root, rows = tmp_path / "runs" / "sweep", []
    for seed in range(2):
        add_run(root, rows, f"LoRA-s{seed}", seeded("LoRA", seed), falling(), {"test_accuracy": 0.5})
    write_index(root, "copied", rows)
    kept = tmp_path / "docs" / "sweep"
    shutil.copytree(root, kept)
    for seed in range(2):
        (kept / f"LoRA-s{seed}" / "metrics.json").write_text(json.dumps({"test_accuracy": 0.75}))
    csv = (make_report([kept], tmp_path / "report")["markdown"].parent / "runs.csv").read_text()
    assert "0.75" in csv and "0.5," not in csv


def test_a_run_the_sweep_found_finished_before_is_said_done_before_not_skipped(tmp_path):
    root, rows = tmp_path / "sweep", []
    for seed in range(2):
        add_run(root, rows, f"LoRA-s{seed}", seeded("LoRA", seed), falling(), {"test_accuracy": 0.5})
    rows[0]["status"] = "skipped"  # what the sweep writes for a run finished in an earlier session
    write_index(root, "resumed", rows)
    csv = (make_report([root], tmp_path / "report")["markdown"].parent / "runs.csv").read_text()
    assert "done before" in csv and "skipped" not in csv


@pytest.mark.parametrize("broken", ["index.json", "LoRA-s0/metrics.json", "sweep.yaml", "LoRA-s0/config.yaml"])
def test_a_cut_short_json_or_yaml_file_is_named(tmp_path, broken):
    root, rows = tmp_path / "sweep", []
    add_run(root, rows, "LoRA-s0", seeded("LoRA", 0), falling(), {"test_accuracy": 0.5}, config="adapter: {}\n")
    write_index(root, "cut", rows)
    (root / "sweep.yaml").write_text("title: cut\n")
    (root / broken).write_text('{"runs": [')
    kind = "JSON" if broken.endswith(".json") else "YAML"
    with pytest.raises(ValueError, match=rf"{re.escape(str(root / broken))}'? is not valid {kind}"):
        make_report([root], tmp_path / "report")


def metric_sweeps(tmp_path: Path, values: dict) -> list[Path]:
    """One sweep folder per key of ``values`` (sweep -> method -> value per seed), baseline LoRA; the sweep named
    "acc" scores test_accuracy (higher is better), every other test_loss (lower is better)."""
    dirs = []
    for sweep, methods in values.items():
        root = tmp_path / sweep
        rows: list[dict] = []
        metric = "test_accuracy" if sweep == "acc" else "test_loss"
        for method, per_seed in methods.items():
            for seed, v in enumerate(per_seed):
                add_run(root, rows, f"{method}-s{seed}", seeded(method, seed), falling(1), {metric: v})
        write_index(root, sweep, rows)
        (root / "sweep.yaml").write_text(f"report: {{baseline: LoRA, metric: {metric}}}\n")
        dirs.append(root)
    return dirs


def test_across_experiments_table_names_where_a_method_is_significantly_worse(tmp_path):
    """Two sweeps (accuracy: higher is better; a loss metric: lower is better): each method minus its sweep's
    baseline per sweep, with the t interval of that sweep's difference table, and the verdict column naming
    the sweeps where the interval excludes 0 on the bad side."""
    values = {  # sweep -> method -> per seed
        "acc": {
            "LoRA": [0.80, 0.82, 0.81, 0.79],
            "Rule": [0.70, 0.71, 0.72, 0.69],
            "Other": [0.81, 0.80, 0.83, 0.79],
            "Only here": [0.81, 0.82, 0.80, 0.80],
        },
        "loss": {
            "LoRA": [0.50, 0.52, 0.51, 0.49],
            "Rule": [0.48, 0.50, 0.48, 0.47],
            "Other": [0.50, 0.54, 0.49, 0.52],
            "Collapsed": [0.5, float("nan"), 0.5, 0.5],
        },
    }
    dirs = metric_sweeps(tmp_path, values)
    md = make_report(dirs, tmp_path / "report")["markdown"].read_text()
    table = md.split("## Across experiments")[1].split("\n## ")[0]
    rule, other = _md_row(table, "Rule"), _md_row(table, "Other")
    d = paired_t(values["acc"]["Rule"], values["acc"]["LoRA"])
    assert rule[1] == f"**{d['mean']:+.4f} [{d['low']:+.4f}, {d['high']:+.4f}] n=4 worse ***"  # bold: significant
    d = paired_t(values["loss"]["Rule"], values["loss"]["LoRA"])
    assert rule[2] == f"**{d['mean']:+.4f} [{d['low']:+.4f}, {d['high']:+.4f}] n=4 better ***"  # lower loss: better
    assert rule[3] == "acc" and other[3] == "nowhere"
    only, collapsed = _md_row(table, "Only here"), _md_row(table, "Collapsed")
    assert only[2] == "not in this sweep" and only[3] == "nowhere"  # judged where it ran
    assert collapsed[2] == "non-finite in 1 of 4 pairs" and collapsed[3] == "loss (non-finite)"  # NaN fails
    assert "test_accuracy − LoRA" in table.splitlines()[4]  # each column names its baseline
    # one sweep alone: no cross table
    assert "Across experiments" not in make_report(dirs[:1], tmp_path / "one")["markdown"].read_text()
    # mid-sweep, "nowhere" is not said of a method with runs still to finish (here Other's seed 3 in "loss")
    (tmp_path / "loss" / "Other-s3" / "metrics.json").unlink()
    rows = json.loads((tmp_path / "loss" / "index.json").read_text())["runs"]
    next(r for r in rows if r["name"] == "Other-s3")["status"] = "running"
    write_index(tmp_path / "loss", "loss", rows)
    table = make_report(dirs, tmp_path / "mid")["markdown"].read_text().split("## Across experiments")[1]
    assert _md_row(table, "Other")[3] == "nowhere so far (1 of its and the baseline's runs without a result yet)"


def test_a_method_one_setting_of_a_sweep_did_not_run_is_absent_there_not_pending(tmp_path, monkeypatch):
    """A sweep made of a list of grids (full fine-tuning at r 8 only): in the other setting the method is "not in
    this setting" in the across table and not drawn in that panel; it is judged where it ran."""
    from mgpo.pipelines.report import figures as report_figures

    root, rows = tmp_path / "grids", []
    per_seed = {
        ("LoRA", "8"): [0.80, 0.82, 0.81],
        ("Rule", "8"): [0.81, 0.82, 0.80],
        ("Full", "8"): [0.79, 0.83, 0.82],
        ("LoRA", "128"): [0.60, 0.62, 0.61],
        ("Rule", "128"): [0.61, 0.63, 0.60],
    }
    for (method, rank), values in per_seed.items():
        for seed, v in enumerate(values):
            add_run(
                root,
                rows,
                f"r{rank}-{method}-s{seed}",
                {"rank": rank, **seeded(method, seed)},
                falling(1),
                {"test_accuracy": v},
            )
    write_index(root, "grids", rows)
    (root / "sweep.yaml").write_text("report: {baseline: LoRA}\n")
    other = metric_sweeps(tmp_path, {"acc": {"LoRA": [0.8, 0.81, 0.79], "Rule": [0.8, 0.8, 0.8]}})
    drawn = {}

    def keep(fig, out_png):
        if out_png.name == "across-experiments.png":
            drawn.update(
                {
                    ax.get_title(): ([t.get_text() for t in ax.get_yticklabels()], [t.get_text() for t in ax.texts])
                    for ax in fig.axes
                    if ax.get_visible()
                }
            )
        out_png.parent.mkdir(parents=True, exist_ok=True)
        out_png.write_bytes(b"")
        return out_png

    monkeypatch.setattr(report_figures, "_save", keep)
    table = (
        make_report([root, *other], tmp_path / "report")["markdown"]
        .read_text()
        .split("## Across experiments")[1]
        .split("\n## ")[0]
    )
    header = [c.strip() for c in table.splitlines()[4].strip("|").split("|")]
    full = dict(zip(header, _md_row(table, "Full")))
    at8 = next(v for k, v in full.items() if "grids" in k and "8" in k and "128" not in k)
    at128 = next(v for k, v in full.items() if "grids" in k and "128" in k)
    d = paired_t(per_seed["Full", "8"], per_seed["LoRA", "8"])
    assert at8 == f"{d['mean']:+.4f} [{d['low']:+.4f}, {d['high']:+.4f}] n=3"
    assert at128 == "not in this setting" and full["significantly worse in"] == "nowhere"
    assert next(v for k, v in full.items() if k.startswith("acc")) == "not in this sweep"
    ((rows128, texts128),) = [v for k, v in drawn.items() if "grids" in k and "128" in k]
    ((rows8, _),) = [v for k, v in drawn.items() if "grids" in k and "128" not in k]
    assert rows128 == ["Rule"] and "no pairs yet" not in texts128 and rows8 == ["Rule", "Full"]


def test_the_across_experiments_figure_draws_each_interval_coloured_by_its_verdict(tmp_path, monkeypatch):
    """The figure beside the shipping test: per sweep, each method's paired difference to the baseline as a point
    whose whiskers are its t interval; red where significantly worse, green where better (a lower loss is
    better), grey otherwise; a panel lists only its sweep's methods (a method it did not run is not drawn at 0)."""
    from mgpo.pipelines.report import figures as report_figures

    values = {
        "acc": {"LoRA": [0.80, 0.82, 0.81, 0.79], "Rule": [0.70, 0.71, 0.72, 0.69], "Other": [0.81, 0.80, 0.83, 0.79]},
        "loss": {"LoRA": [0.50, 0.52, 0.51, 0.49], "Rule": [0.48, 0.50, 0.48, 0.47]},
        "alone": {"LoRA": [0.80, 0.81, 0.79, 0.80]},
    }  # the baseline alone: nothing to compare, no column
    dirs = metric_sweeps(tmp_path, values)
    drawn = {}

    def keep(fig, out_png):
        if out_png.name == "across-experiments.png":
            for ax in fig.axes:
                if not ax.get_visible():
                    continue
                labels = [t.get_text() for t in ax.get_yticklabels()]
                ticks = list(ax.get_yticks())
                points = {}
                for line in ax.lines:
                    xs, ys = line.get_xdata(), line.get_ydata()
                    if len(xs) == 1 and line.get_marker() == "o":
                        points[labels[ticks.index(ys[0])]] = (xs[0], line.get_color())
                caps = sorted(x for c in ax.collections for seg in c.get_segments() for x in (seg[0][0], seg[1][0]))
                drawn[ax.get_title()] = {
                    "points": points,
                    "whiskers": caps,
                    "rows": labels,
                    "texts": [t.get_text() for t in ax.texts],
                }
        out_png.parent.mkdir(parents=True, exist_ok=True)
        out_png.write_bytes(b"")
        return out_png

    monkeypatch.setattr(report_figures, "_save", keep)
    md = make_report(dirs, tmp_path / "report")["markdown"].read_text()
    table = md.split("## Across experiments")[1].split("\n## ")[0]
    assert "figures/across-experiments.png" in table
    assert "alone" not in table and set(drawn) == {"acc", "loss"}
    acc, loss = drawn["acc"], drawn["loss"]
    d = paired_t(values["acc"]["Rule"], values["acc"]["LoRA"])
    assert acc["points"]["Rule"] == (pytest.approx(d["mean"]), "tab:red")
    assert pytest.approx(d["low"]) in acc["whiskers"] and pytest.approx(d["high"]) in acc["whiskers"]
    assert acc["points"]["Other"][1] == "tab:grey"
    assert loss["points"]["Rule"][1] == "tab:green"  # lower loss: better
    assert acc["rows"] == ["Rule", "Other"] and loss["rows"] == ["Rule"]  # each panel lists its own sweep's methods
    assert "Across experiments" not in make_report(dirs[:1], tmp_path / "one")["markdown"].read_text()


def test_cost_table_shows_the_load_the_times_were_taken_at(tmp_path):
    root, rows = tmp_path / "load", []
    for method, loads in (("LoRA", [(1.0, 1.2, 1.5), (1.1, 1.4, 1.5)]), ("LoRA-MGPO", [(3.9, 4.1, 3.0), None])):
        for seed, load in enumerate(loads):
            add_run(
                root,
                rows,
                f"{method}-{seed}",
                seeded(method, seed),
                falling(1),
                {
                    "test_accuracy": 0.8,
                    "time_per_step_s": 0.5,
                    "steps": 30,
                    "steps_timed": 15 if (method, seed) == ("LoRA-MGPO", 1) else 30,  # resumed at step 15
                    **({"load_average": load, "cpus": 2} if load else {}),
                },
            )
    write_index(root, "load", rows)
    md = make_report([root], tmp_path / "report")["markdown"].read_text()
    cost = md.split("### Cost")[1].split("###")[0]
    assert "load (5-min avg at end) / CPUs" in cost and "not a measure of cost" in cost
    assert "Wall time of the finished runs" not in md  # no run has wall_time_s: nothing claimed
    assert _md_row(cost, "LoRA")[-1] == "1.3 / 2" and _md_row(cost, "LoRA-MGPO")[-1] == "4.1 / 2"
    assert _md_row(cost, "LoRA")[5] == "0.500"  # timed over every step
    assert _md_row(cost, "LoRA-MGPO")[5] == "0.500 (1 of 2 resumed: timed over their last session)"


def test_cost_is_compared_within_each_panel_whatever_runs_have_finished(tmp_path):
    """Rank 128 has 16x the trainable parameters of rank 8; the MGPO arm has finished only its rank-8 run. Pooled
    over panels, its cost would read as 0.12x LoRA's; in its panel it is 1.00x."""
    root, rows = tmp_path / "panels", []
    for rank, methods in ((8, ("LoRA", "LoRA-MGPO")), (128, ("LoRA",))):
        for method in methods:
            add_run(
                root,
                rows,
                f"r{rank}-{method}",
                {"rank": str(rank), **seeded(method, 0)},
                falling(1),
                {
                    "test_accuracy": 0.8,
                    "trainable_params": 1000 * rank,
                    "time_per_step_s": rank / 100,
                    "wall_time_s": 600.0 * rank,
                },
            )
    write_index(root, "panels", rows)
    md = make_report([root], tmp_path / "report")["markdown"].read_text()
    assert f"Wall time of the finished runs: {600 * (8 + 8 + 128) / 3600:.2f} h in all (3 runs;" in md
    cost = md.split("### Cost")[1].split("###")[0]
    assert _md_row(cost, "rank=8 | LoRA-MGPO")[2:4] == ["8,000", "1.00×"]
    assert _md_row(cost, "rank=128 | LoRA")[2:4] == ["128,000", "1.00×"]
    assert _md_row(cost, "rank=128 | LoRA-MGPO")[2:] == ["-"] * 6


def test_method_labels_name_a_radius_that_is_not_the_papers():
    """Two runs share a label only if they share the method: rho/10 of the profile's rho, any other rho, and a
    radius rule other than APN are in the label (cpu-methods-clean's '-MGPO' arms run at rho/10)."""
    from mgpo.pipelines.report import method_label

    def label(adapter="lora", **p):
        return method_label({"adapter": {"method": adapter}, "perturbation": p})

    assert label(preset="lora-mgpo", profile="nlu", rho=None, apn="inverse") == "LoRA-MGPO"
    assert label(preset="lora-mgpo", profile="nlu", rho=0.05) == "LoRA-MGPO"
    assert label("dora", preset="lora-mgpo", profile="nlu", rho=0.005) == "DoRA-MGPO rho/10"
    assert label(preset="lora-mgpo", profile="nlg", rho=0.001) == "LoRA-MGPO rho/10"
    assert label(preset="lora-mgpo", profile="nlu", rho=0.002, apn="weight") == "LoRA-MGPO apn=weight rho=0.002"
    assert label(preset="mgpo-no-apn", profile="nlu", apn="off") == "LoRA-MGPO w/o APN"
    assert label(preset="lora", profile="nlu", rho=0.005) == "LoRA"  # no perturbation: rho means nothing
    assert label(method="sam", rho=0.1) == "LoRA + SAM"


def _loose_run(root: Path, name: str, method: str, seed: int, accuracy: float, lr: float = 1e-4) -> Path:
    out = root / name
    out.mkdir(parents=True)
    (out / "config.yaml").write_text(f"perturbation: {{method: {method}}}\ntraining: {{seed: {seed}, lr: {lr}}}\n")
    (out / "log.jsonl").write_text("".join(json.dumps({"step": i, "loss": 1.0 / i}) + "\n" for i in range(1, 6)))
    (out / "metrics.json").write_text(json.dumps({"test_accuracy": accuracy}))
    return out


def test_a_run_counted_twice_or_runs_merged_as_seeds_are_named(tmp_path):
    """A run folder passed twice counted twice in the mean ± std (LoRA 0.7667 ± 0.0577 from two runs) and once in
    the paired differences; loose runs at another learning rate were averaged as seeds of their method; a --metric
    no run has gave a table of '-'; a NaN showed as '-' (no value). Each now says so."""
    a = _loose_run(tmp_path, "lora-s0", "adamw", 0, 0.8)
    b = _loose_run(tmp_path, "mgpo-s0", "mgpo", 0, 0.9)
    c = _loose_run(tmp_path, "lora-s1", "adamw", 1, 0.7)
    d = _loose_run(tmp_path, "mgpo-s1", "mgpo", 1, float("nan"))
    with pytest.raises(ValueError, match=r"run folder .*lora-s0 is given twice"):
        make_report([a, b, a, c, d], tmp_path / "r1")
    e = _loose_run(tmp_path, "lora-lr3-s0", "adamw", 0, 0.5, lr=3e-4)
    with pytest.raises(ValueError, match=r"lora-s0 and .*lora-lr3-s0 are both LoRA, seed 0.*sweep"):
        make_report([a, b, c, e], tmp_path / "r2")
    with pytest.raises(ValueError, match=r"metric 'test_acc'.*one they have: test_accuracy"):
        make_report([a, b, c, d], tmp_path / "r3", metric="test_acc")
    f = _loose_run(tmp_path, "lora-lr3-s2", "adamw", 2, 0.5, lr=3e-4)
    md = make_report([a, b, c, d, f], tmp_path / "r4")["markdown"].read_text()
    assert "differ in more than the seed: LoRA: training.lr = 0.0001, 0.0003" in md
    # LoRA has 3 seeds here, LoRA-MGPO 2: each cell says its n and no best is marked
    assert _md_row(md, "LoRA-MGPO")[1] == "nan ± nan (n=2)"
    assert _md_row(md, "LoRA")[1] == f"{mean_std_cell([0.8, 0.7, 0.5])} (n=3)"
    result = CliRunner().invoke(app, ["report", str(a), str(a), "--out", str(tmp_path / "r5")])
    said = " ".join(result.output.split())
    assert result.exit_code == 2 and "given twice; pass each run once" in said and "Traceback" not in said


def test_figures_join_no_settings_by_a_line_and_each_bar_says_its_seeds(sweep_dir, tmp_path, monkeypatch):
    """Panels are separate settings: the double-descent figure draws points with whiskers, no line from one panel
    to the next, each method beside the other. Each accuracy bar carries its number of seeds, and the columns
    over all panels say they mix them."""
    from mgpo.pipelines.report import figures as report_figures

    shutil.rmtree(sweep_dir / "r64-LoRA-MGPO-s2")  # one bar of 2 seeds beside bars of 3
    figures = {}

    def keep(fig, out_png):
        ax = fig.axes[0]
        figures[out_png.name] = {
            "lines": [
                (line.get_linestyle(), tuple(line.get_xdata())) for line in ax.lines if len(line.get_xdata()) > 1
            ],
            "texts": [t.get_text() for t in ax.texts],
        }
        out_png.parent.mkdir(parents=True, exist_ok=True)
        out_png.write_bytes(b"")
        return out_png

    monkeypatch.setattr(report_figures, "_save", keep)
    md = make_report([sweep_dir], tmp_path / "report")["markdown"].read_text()
    dd = figures["rank-sweep-double-descent.png"]["lines"]
    assert dd and all(style == "None" for style, _ in dd)  # points, whiskers' caps: no line
    assert len({xs for _, xs in dd}) == 2  # LoRA's and LoRA-MGPO's points sit side by side, not on top of each other
    assert sorted(figures["rank-sweep-test_accuracy.png"]["texts"]) == ["n=2"] + ["n=3"] * 3
    assert _md_row(md, "method")[-1] == "mean of panels"
    assert _md_row(md, "difference")[-1] == "all panels pooled"


def test_a_radius_rule_has_no_apn_cap_and_the_table_says_so(tmp_path):
    """A rule run (apn=weight) logs apn_capped = 0 because it has no cap; the table says 'no cap' rather than
    a 0 that reads as 'no layer reached it'."""
    root, rows = tmp_path / "rule", []
    for method, apn in (("LoRA-MGPO", "inverse"), ("MGPO weight-rule", "weight")):
        log = [
            {"step": s, "loss": 1.0 / s, "apn_capped": 1.0 if apn == "inverse" else 0.0, "apn_factor_mean": 5.0}
            for s in range(1, 6)
        ]
        add_run(
            root,
            rows,
            f"{apn}-0",
            {"method": method, "training.seed": 0},
            log,
            {"test_accuracy": 0.8},
            config=f"perturbation: {{method: mgpo, apn: {apn}, max_scale: 10.0}}\n",
        )
    write_index(root, "rule", rows)
    table = make_report([root], tmp_path / "report")["markdown"].read_text().split("### Perturbation size")[1]
    assert _md_row(table, "- | LoRA-MGPO")[-1] == "1.0000"
    assert _md_row(table, "- | MGPO weight-rule")[-1] == "no cap"


def test_a_difference_that_is_the_same_in_every_pair_says_so_instead_of_a_zero_width_interval(tmp_path):
    """Short runs whose clean loss only falls have no rise: every paired difference is 0, and a t interval of
    [+0.0000, +0.0000] would read as a measured certainty. The cell says every pair is the same instead."""
    root, rows = tmp_path / "flat", []
    for method in ("LoRA", "LoRA-MGPO"):
        for seed in range(3):
            log = [{"step": i + 1, "loss": 1 / (i + 1), "clean_loss": 1 / (i + 1)} for i in range(20)]
            add_run(
                root,
                rows,
                f"{method}-{seed}",
                seeded(method, seed),
                log,
                {
                    "test_accuracy": 0.8 + 0.01 * seed + (0.02 if method == "LoRA" else 0),
                    "final_clean_loss": 0.05 + 0.01 * seed,
                },
            )
    write_index(root, "flat", rows)
    md = make_report([root], tmp_path / "report")["markdown"].read_text()
    rise = md.split("in the double-descent rise on the clean loss")[1].split("###")[0]
    assert _md_row(rise, "LoRA-MGPO − LoRA")[1] == "+0.0000 in all 3 pairs (no spread: no interval)"
    accuracy = md.split("### Difference to LoRA, paired by seed")[1].split("###")[0]
    assert _md_row(accuracy, "LoRA-MGPO − LoRA")[1] == "-0.0200 in all 3 pairs (no spread: no interval)"  # not bold


def test_accuracy_bars_draw_the_chance_level_the_runs_recorded_and_the_table_states_it(tmp_path, monkeypatch):
    """A bar's height means little without chance beside it: runs that record their split's majority-class share
    (``test_majority``) get a dashed line at it in each panel and a sentence under the table; a panel with a run
    that did not record it, or runs on splits with different shares, gets none rather than a wrong one."""
    from mgpo.pipelines.report import figures as report_figures

    root, rows = tmp_path / "sweep", []
    for panel, shares in (("a", (0.6, 0.6)), ("b", (0.55, None)), ("c", (0.5, 0.7))):
        for method, share in zip(("LoRA", "LoRA-MGPO"), shares):
            for seed in (0, 1):
                metrics = {"test_accuracy": 0.8 + 0.01 * seed} | ({"test_majority": share} if share else {})
                add_run(
                    root,
                    rows,
                    f"{panel}-{method}-s{seed}",
                    {"setting": panel, **seeded(method, seed)},
                    falling(),
                    metrics,
                )
    write_index(root, "chance", rows)
    lines = {}

    def keep(fig, out_png):
        ax = fig.axes[0]
        lines[out_png.name] = (
            [(tuple(seg[:, 1]), tuple(seg[:, 0])) for c in ax.collections for seg in c.get_segments()]
            if ax.collections
            else []
        )
        lines[out_png.name + ":legend"] = ax.get_legend_handles_labels()[1]
        out_png.parent.mkdir(parents=True, exist_ok=True)
        out_png.write_bytes(b"")
        return out_png

    monkeypatch.setattr(report_figures, "_save", keep)
    md = make_report([root], tmp_path / "report")["markdown"].read_text()
    drawn = [seg for seg in lines["sweep-test_accuracy.png"] if seg[0][0] == seg[0][1] == 0.6]
    assert len(drawn) == 1 and drawn[0][1][0] < 0 < drawn[0][1][1]  # over panel a's group only
    assert not [seg for seg in lines["sweep-test_accuracy.png"] if seg[0][0] in (0.55, 0.5, 0.7)]
    assert lines["sweep-test_accuracy.png:legend"].count("chance (majority class)") == 1
    assert (
        "as each run recorded it): setting=a: 0.6000 (the dashed line in the figure). No chance line for "
        "setting=b: 2 of its 4 runs did not record it; setting=c: its runs recorded different shares "
        "(0.5000-0.7000: different splits)."
    ) in md


def test_a_partial_sweep_whose_methods_are_config_fields_names_its_pending_runs_from_the_spec(tmp_path):
    """Mid-sweep, a run not yet started has no config.yaml: its method comes from the overrides the sweep will
    start it with. Labelled from nothing, every pending run read as "LoRA", clashed with the finished LoRA run of
    its seed, and the progress report refused to be made."""
    root, rows = tmp_path / "methods", []
    for adapter, preset, done in (
        ("lora", "lora", True),
        ("lora", "lora-mgpo", True),
        ("dora", "lora", False),
        ("dora", "lora-mgpo", False),
    ):
        labels = {"training.seed": 0, "adapter.method": adapter, "perturbation.preset": preset}
        overrides = [
            "perturbation.profile=nlu",
            "perturbation.rho=0.005",
            f"adapter.method={adapter}",
            f"perturbation.preset={preset}",
            "training.seed=0",
        ]
        if done:
            add_run(
                root,
                rows,
                f"{adapter}-{preset}-s0",
                labels,
                falling(),
                {"test_accuracy": 0.75 if preset == "lora" else 0.74},
                config=f"adapter: {{method: {adapter}}}\nperturbation: {{preset: {preset}, profile: nlu, "
                "rho: 0.005}\ntraining: {seed: 0}\n",
            )
            rows[-1]["overrides"] = overrides
        else:
            rows.append(
                {
                    "index": len(rows),
                    "name": f"{adapter}-{preset}-s0",
                    "status": "pending",
                    "output_dir": str(root / f"{adapter}-{preset}-s0"),
                    "labels": labels,
                    "overrides": overrides,
                }
            )
    write_index(root, "methods", rows)
    md = make_report([root], tmp_path / "report")["markdown"].read_text()
    assert [_md_row(md, m)[1] for m in ("LoRA", "LoRA-MGPO rho/10", "DoRA", "DoRA-MGPO rho/10")] == [
        "**0.7500**",
        "0.7400",
        "-",
        "-",
    ]
    assert "| DoRA-MGPO_rho_10-s0 |" not in md and "| dora-lora-mgpo-s0 | pending |" in md
    # a spec whose base is a config file: the file's settings are not among the overrides, the index names it
    base = tmp_path / "base.yaml"
    base.write_text("perturbation: {profile: nlu, rho: 0.005}\n")
    for r in rows:
        r["overrides"] = [o for o in r["overrides"] if not o.startswith(("perturbation.profile", "perturbation.rho"))]
    (root / "index.json").write_text(json.dumps({"title": "methods", "runs": rows, "base": str(base)}))
    md = make_report([root], tmp_path / "report-2")["markdown"].read_text()
    assert _md_row(md, "DoRA-MGPO rho/10")[1] == "-" and "| DoRA-MGPO |" not in md
    assert "is not on this machine" not in md
    base.unlink()  # the base file missing where the report is made: said, with the runs it touches
    md = make_report([root], tmp_path / "report-3")["markdown"].read_text()
    assert (
        f"The sweep's base config {base} is not on this machine, so the 2 runs not started yet are labelled "
        "from their overrides alone"
    ) in md and "(dora-lora-s0, dora-lora-mgpo-s0)" in md


def test_a_run_still_training_adds_nothing_to_the_double_descent_comparisons(sweep_dir, tmp_path):
    """Mid-sweep a running run has logged part of its curve but has no metrics.json: measured, its partial curve was
    paired with LoRA's finished one (4 pairs of rise where accuracy had 3)."""
    rows = json.loads((sweep_dir / "index.json").read_text())["runs"]
    running = next(r for r in rows if r["name"] == "r16-LoRA-MGPO-s2")
    (Path(running["output_dir"]) / "metrics.json").unlink()
    running["status"] = "running"
    write_index(sweep_dir, "rank sweep", rows)
    csv = (make_report([sweep_dir], tmp_path / "r")["markdown"].parent / "runs.csv").read_text().splitlines()
    header = csv[0].split(",")
    row = next(dict(zip(header, line.split(","))) for line in csv[1:] if "r16-LoRA-MGPO-s2" in line)
    assert row["status"] == "running" and row["dd_rise_rel"] == "" and row["dd_rise_rel_w1"] == ""
    finished = next(dict(zip(header, line.split(","))) for line in csv[1:] if "r16-LoRA-MGPO-s1" in line)
    assert finished["dd_rise_rel"] != ""
    # nor to the perturbation-size table, nor (predictions.jsonl is written before metrics.json) to the interval
    # over examples and seeds
    for run in sweep_dir.iterdir():
        if run.is_dir():
            rows = [{"id": i, "target": 1, "prediction": 1, "correct": bool(i % 3)} for i in range(30)]
            (run / "predictions.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
            (run / "log.jsonl").write_text(
                "".join(json.dumps({"step": i + 1, "loss": 1 / (i + 1), "apn_capped": 0.5}) + "\n" for i in range(20))
            )
    (sweep_dir / "r16-LoRA-MGPO-s2" / "log.jsonl").write_text(json.dumps({"step": 1, "loss": 1, "apn_capped": 1.0}))
    md = make_report([sweep_dir], tmp_path / "r2")["markdown"].read_text()
    assert "| rank=16 | LoRA-MGPO | - | - | - | 0.5000 |" in md  # the running run's 100% is not averaged in
    examples = md.split("over test examples and seeds")[1].split("###")[0]
    assert "n=2x30" in _md_row(examples, "LoRA-MGPO − LoRA")[1]  # r16: seeds 0 and 1 only


def test_a_runs_status_comes_from_its_own_record_and_a_loose_folder_without_metrics_is_unfinished(sweep_dir, tmp_path):
    """On Slurm the index keeps what the sweep submitted ("queued"): the run's record says how it went. A loose run
    folder still training was said "done"; a sweep with no finished run says what its runs are doing."""
    from mgpo.pipelines.executors import write_record

    rows = json.loads((sweep_dir / "index.json").read_text())["runs"]
    for r in rows:
        r["status"] = "queued"
    write_index(sweep_dir, "rank sweep", rows)
    write_record(sweep_dir / "r16-LoRA-s0", state="done")
    loose = add_run(tmp_path, [], "loose", {}, falling(), {}, config="adapter: {method: lora}\n")
    (loose / "metrics.json").unlink()
    made = make_report([sweep_dir, loose], tmp_path / "r")["markdown"]
    with open(made.parent / "runs.csv") as f:
        status = {Path(r["path"]).name: r["status"] for r in csv.DictReader(f)}
    assert status["r16-LoRA-s0"] == "done" and status["r16-LoRA-s1"] == "queued"
    assert "None of its runs has finished yet (1 unfinished)." in made.read_text()  # the loose folder
    for name in [r["name"] for r in rows]:
        (sweep_dir / name / "metrics.json").unlink(missing_ok=True)
    md = make_report([sweep_dir], tmp_path / "r2")["markdown"].read_text()
    assert "None of its runs has finished yet (12 queued, 1 unfinished)." in md


def test_math_scores_of_two_scoring_rules_are_refused_together(tmp_path):
    """Runs scored before the math rule was recorded (math-v1) beside math-v2 runs: not compared, named."""
    root, rows = tmp_path / "arith", []
    for method in ("LoRA", "LoRA-MGPO"):
        for seed in (0, 1):
            scorer = {} if (method, seed) == ("LoRA", 1) else {"after_scorer": "math-v2"}
            add_run(root, rows, f"{method}-s{seed}", seeded(method, seed), falling(), {"after_accuracy": 0.3, **scorer})
    write_index(root, "arith", rows)
    with pytest.raises(ValueError, match=r"scored by different rules \(math-v2: .*; math-v1 .*: LoRA-s1\).*rescore"):
        make_report([root], tmp_path / "r")
    scored = json.loads((root / "LoRA-s1" / "metrics.json").read_text())
    (root / "LoRA-s1" / "metrics.json").write_text(json.dumps({**scored, "after_scorer": "math-v2"}))
    assert make_report([root], tmp_path / "r")["markdown"].is_file()


def test_declared_families_are_holm_corrected_and_the_rest_called_post_hoc(sweep_dir, tmp_path):
    (sweep_dir / "sweep.yaml").write_text("report: {baseline: LoRA, families: {main: [[LoRA-MGPO, LoRA]]}}\n")
    md = make_report([sweep_dir], tmp_path / "out")["markdown"].read_text()
    block = md.split("### Declared comparisons, Holm's correction within each family")[1].split("###")[0]
    row = _md_row(block, "main")
    assert row[1] == "LoRA-MGPO − LoRA" and row[2].endswith("n=6")  # pooled over both ranks' 3 seeds
    assert row[3] == "seeds"  # no predictions saved: the seed-only test
    assert float(row[4]) == pytest.approx(float(row[5].strip("* ")))  # one comparison: Holm leaves p as it is
    assert "Every other difference in this report is post hoc" in md
    with open(tmp_path / "out" / "comparisons.csv") as f:
        (declared,) = list(csv.DictReader(f))
    assert declared["family"] == "main" and declared["over"] == "seeds"
    assert float(declared["holm_p"]) == pytest.approx(float(row[5].strip("* ")), rel=1e-2)
    (sweep_dir / "sweep.yaml").write_text("report: {baseline: LoRA, families: {main: [[LoRA-MGPO, DoRA]]}}\n")
    with pytest.raises(ValueError, match="report.families.main: .* is not a pair of this report's methods"):
        make_report([sweep_dir], tmp_path / "bad")


def test_runs_with_predictions_get_an_interval_over_examples_and_seeds(sweep_dir, tmp_path):
    rng = np.random.default_rng(0)
    target = rng.integers(0, 2, 200)
    for run in sweep_dir.iterdir():
        if run.is_dir() and (run / "metrics.json").is_file():
            right = np.random.default_rng(zlib.crc32(run.name.encode())).random(200) < (
                0.9 if "MGPO" in run.name else 0.8
            )
            guess = np.where(right, target, 1 - target)
            rows = [
                {"id": i, "target": int(t), "prediction": int(g), "correct": bool(t == g)}
                for i, (t, g) in enumerate(zip(target, guess))
            ]
            (run / "predictions.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    md = make_report([sweep_dir], tmp_path / "out")["markdown"].read_text()
    block = md.split("over test examples and seeds")[1].split("###")[0]
    row = _md_row(block, "LoRA-MGPO − LoRA")
    assert "n=3x200" in row[1] and "seeds only [" in row[1] and row[1].endswith("*")  # ~ +0.10 of accuracy
    low, high = (float(x) for x in row[1].split("[")[1].split("]")[0].split(", "))
    seeds_low, seeds_high = (float(x) for x in row[1].split("seeds only [")[1].split("]")[0].split(", "))
    assert high - low > seeds_high - seeds_low
    # the same numbers in comparisons.csv, one row per panel
    with open(tmp_path / "out" / "comparisons.csv") as f:
        rows = [r for r in csv.DictReader(f) if r["comparison"] == "LoRA-MGPO − LoRA"]
    assert len(rows) == len(RANKS) and {r["family"] for r in rows} == {"vs baseline"}
    first = rows[0]
    assert (round(float(first["low"]), 4), round(float(first["high"]), 4)) == (low, high)
    assert first["examples"] == "200" and first["seeds"] == "3" and first["holm_p"] == ""
    # a run that scored other rows (here one fewer) cannot be paired example by example: refused, by name
    short = sweep_dir / "r16-LoRA-s1" / "predictions.jsonl"
    short.write_text("".join(short.read_text().splitlines(keepends=True)[:-1]))
    with pytest.raises(ValueError, match="r16-LoRA-s1 and .* did not score the same test rows \\(199 and 200 rows\\)"):
        make_report([sweep_dir], tmp_path / "out-2")


def test_math_runs_get_the_interval_from_the_correctness_the_benchmark_scored(tmp_path):
    """A math run's predictions.jsonl holds extracted answers that may be right without equalling the gold string
    ("12.0" for 12): the interval reads each row's ``correct``, the benchmark's verdict."""
    from mgpo.pipelines.report import robustness

    per_run = []
    for arm, share in (("LoRA", 0.3), ("LoRA-MGPO", 0.6)):
        for seed in range(3):
            run = tmp_path / f"{arm}-s{seed}"
            run.mkdir()
            right = np.random.default_rng(seed + 10 * len(arm)).random(100) < share
            rows = [
                {"id": i, "target": "12", "prediction": "12.0" if ok else "7", "correct": bool(ok)}
                for i, ok in enumerate(right)
            ]
            (run / "predictions.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
            per_run.append({"series": arm, "panel": "", "seed": seed, "path": str(run), "value": float(right.mean())})
    saved = robustness._Saved(per_run, "after_accuracy")
    table = robustness._examples_table(saved, ["LoRA", "LoRA-MGPO"], [""], "after_accuracy", "LoRA", [])
    assert table is not None
    cell = table.rows[0][1][0]
    assert cell.startswith("+0.") and "n=3x100" in cell and cell.endswith("*"), cell  # ~ +0.3, not 0 - 0
    # a declared family is tested over examples and seeds too, with that test's p (larger than the seeds-only one)
    families = robustness._families_table(
        per_run, ["LoRA", "LoRA-MGPO"], [""], "after_accuracy", {"radius": [["LoRA-MGPO", "LoRA"]]}, saved, []
    )
    assert families is not None
    row = [c[0] for c in families.rows[0]]
    d = paired_t(*([x["value"] for x in per_run if x["series"] == m] for m in ("LoRA-MGPO", "LoRA")))  # by seed
    assert row[3] == "examples and seeds" and "n=3x100" in row[2] and float(row[4]) >= d["p"] * 0.999
    # with one seed of each (a sweep that has just begun) neither table gives a verdict: no interval, no p, no Holm p
    first = [x for x in per_run if x["seed"] == 0]
    saved = robustness._Saved(first, "after_accuracy")
    cell = robustness._examples_table(saved, ["LoRA", "LoRA-MGPO"], [""], "after_accuracy", "LoRA", []).rows[0][1]
    assert "n=1x100: one seed, no interval (training noise unmeasured; over examples alone [" in cell[0], cell
    assert cell[1] is False  # not bold: however far from 0 the examples-only interval is
    families = robustness._families_table(
        first, ["LoRA", "LoRA-MGPO"], [""], "after_accuracy", {"radius": [["LoRA-MGPO", "LoRA"]]}, saved, []
    )
    row = [c[0] for c in families.rows[0]]
    assert row[3] == "examples and seeds" and "one seed, no interval" in row[2] and row[4:] == ["-", "-"]


def test_the_window_table_has_a_row_per_panel_and_method_from_runs_csv(sweep_dir, tmp_path):
    """Pooling panels (r 8 with r 128) hid a setting's own verdict (issue 33): each panel has its rows, and each
    cell is that panel's mean over seeds with the paired difference to the baseline in brackets."""
    out = make_report([sweep_dir], tmp_path / "out")
    md = out["markdown"].read_text()
    block = md.split("### Smoothing window and second descent")[1].split("\n### ")[0]
    lines = [line for line in block.splitlines() if line.startswith("| ") and "---" not in line][1:]
    table = [[c.strip(" *") for c in line.strip("|").split("|")] for line in lines]
    with open(tmp_path / "out" / "runs.csv") as f:
        runs = [r for r in csv.DictReader(f) if r["dd_rise_rel_w1"]]
    panels = sorted({r["panel"] for r in runs})
    assert len(panels) > 1 and [(row[0], row[1]) for row in table] == [
        (p, m) for p in panels for m in ("LoRA", "LoRA-MGPO")
    ]
    for panel, method, first, *_ in table:
        mine = {r["seed"]: float(r["dd_rise_rel_w1"]) for r in runs if (r["panel"], r["series"]) == (panel, method)}
        base = {r["seed"]: float(r["dd_rise_rel_w1"]) for r in runs if (r["panel"], r["series"]) == (panel, "LoRA")}
        assert float(first.split(" ")[0]) == pytest.approx(sum(mine.values()) / len(mine), abs=5e-4)
        if method != "LoRA":
            diff = sum(mine[k] - base[k] for k in set(mine) & set(base)) / len(set(mine) & set(base))
            assert float(first.split("(")[1].rstrip(")* ")) == pytest.approx(diff, abs=5e-4)
