"""The reports committed under docs/experiments-clean/ regenerate byte for byte from the run records kept beside
them (docs/results.md gives each command): report.md, runs.csv, the figures (matplotlib writes no date into a PNG)
and, where it is committed, report.html. A change to the report's code that changes a number, a word or a pixel
of them fails here; regenerate them with the command and commit them with that change."""

from __future__ import annotations

from pathlib import Path

import pytest

from mgpo.pipelines.report import make_report

ROOT = Path(__file__).resolve().parents[2]
RUNS = Path("docs/experiments-clean/runs")  # relative: runs.csv records the run folders as they were given


def clean_dirs() -> list[Path]:
    names = (
        "cpu-dd-clean",
        "cpu-dd-clean-full",
        "cpu-core-tweets",
        "cpu-arithmetic-core",
        "cpu-ablation-clean",
        "cpu-methods-clean",
    )
    return [RUNS / n for n in names]


def uncapped_dirs() -> list[Path]:
    """`$M/{rslora,pissa,loraplus,lora-ga}-lora-s* $M/{...}-lora-mgpo-s* .../cpu-methods-uncapped/*/`, as the
    shell expands it (each pattern's matches sorted)."""
    adapters, methods = ("rslora", "pissa", "loraplus", "lora-ga"), RUNS / "cpu-methods-clean"
    dirs = [
        p
        for suffix in ("-lora-s*", "-lora-mgpo-s*")
        for a in adapters
        for p in sorted((ROOT / methods).glob(a + suffix))
    ]
    dirs += sorted(p for p in (ROOT / RUNS / "cpu-methods-uncapped").iterdir() if p.is_dir())
    return [p.relative_to(ROOT) for p in dirs]


def verdicts(sweep: str):
    """Issue 33's reruns: one report per sweep (its families are in its sweep.yaml)."""
    return lambda: [RUNS / sweep]


VERDICTS = {
    "tweets": (
        "cpu-verdicts-tweets",
        "Verdicts on tweets over examples and seeds (MiniLM, regression, all 420 test rows, 5 seeds)",
    ),
    "methods": (
        "cpu-verdicts-methods",
        "Method verdicts over examples and seeds (MiniLM, movie reviews, all 1057 test rows, 5 seeds)",
    ),
    "dd": (
        "cpu-verdicts-dd",
        "Double descent at r 8 over windows and seeds (MiniLM, movie reviews, 300 steps, all 1057 test rows, 10 seeds)",
    ),
    "paper-rho": (
        "cpu-verdicts-paper-rho",
        "The paper's rho on movie reviews over examples and seeds "
        "(MiniLM, r 8, 300 steps, all 1057 test rows, 5 seeds)",
    ),
}

REPORTS = {
    "experiments-clean": (clean_dirs, "Does MGPO help? Clean-loss experiments, 5 seeds"),
    "experiments-clean/uncapped": (
        uncapped_dirs,
        "Uncapped adapters: without MGPO, MGPO at rho / 10 and at the paper's rho (MiniLM, movie reviews)",
    ),
    **{f"experiments-clean/verdicts/{k}": (verdicts(sweep), title) for k, (sweep, title) in VERDICTS.items()},
}


@pytest.mark.parametrize("name", list(REPORTS))
def test_a_committed_report_regenerates_byte_for_byte(name, tmp_path, monkeypatch):
    dirs, title = REPORTS[name]
    monkeypatch.chdir(ROOT)
    committed = ROOT / "docs" / name
    make_report(dirs(), tmp_path, title=title)
    written = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*") if p.is_file())
    kept = sorted(
        p.relative_to(committed)
        for p in committed.rglob("*")
        if p.is_file() and p.relative_to(committed).parts[0] not in ("runs", "uncapped", "verdicts")
    )
    assert set(kept) <= set(written), f"committed but no longer written: {set(kept) - set(written)}"
    assert {Path("report.md"), Path("runs.csv")} <= set(kept)
    changed = [str(p) for p in kept if (tmp_path / p).read_bytes() != (committed / p).read_bytes()]
    assert not changed, f"docs/{name}: these no longer regenerate byte for byte: {', '.join(changed)}"
