"""Every Python block of README.md and docs/*.md runs as written, in page order (Sybil), with the fill-ins each
page declares beside its blocks in invisible blocks (tests/docs/fill.py: a tiny offline model and data for what a
reader brings). A block that stops working, or drifts from the code, fails here with its page and line."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
from sybil import Sybil
from sybil.parsers.markdown import PythonCodeBlockParser

ROOT = Path(__file__).resolve().parents[2]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
PAGES_WITH_CODE = [p for p in PAGES if "```python" in p.read_text()]


@pytest.mark.parametrize("page", PAGES_WITH_CODE, ids=[p.name for p in PAGES_WITH_CODE])
def test_every_python_block_runs_as_written(page, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # blocks write "out", "runs/...": here, not in the repository
    monkeypatch.setattr(sys, "argv", [sys.argv[0]])
    monkeypatch.syspath_prepend(str(ROOT))  # the fill-ins: tests.docs.fill
    document = Sybil(parsers=[PythonCodeBlockParser()]).parse(page)
    ran = 0
    for example in document:
        try:
            example.evaluate()
        except Exception as err:
            raise AssertionError(f"{page.name}, the block at line {example.line}: {type(err).__name__}: {err}") from err
        ran += 1
    assert ran >= page.read_text().count("```python"), f"{page.name}: not every block was found"


def test_pages_without_python_blocks_are_known():
    # the pages this test does not run hold shell commands and tables only (tests/test_readme.py checks commands)
    assert {p.name for p in PAGES} - {p.name for p in PAGES_WITH_CODE} <= {
        "experiments.md",
        "method.md",
        "performance.md",
        "results.md",
        "sandbox.md",
        "tasks.md",
        "tune-movie-reviews.md",
        "tune-tweets.md",
    }
