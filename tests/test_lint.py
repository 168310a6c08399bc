"""The linter and the formatter over src/, tests/, benchmarks/ and scripts/ (ruff) and the type checker over src/ and
tests/ (mypy, strict on mgpo.optim), configured in pyproject.toml:
zero findings. Part of the test command, so CI runs it; `pre-commit run --all-files` runs the same checks."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PATHS = ["src", "tests", "benchmarks", "scripts"]


def ruff(*args: str) -> subprocess.CompletedProcess:
    command = [shutil.which("ruff") or sys.executable, *([] if shutil.which("ruff") else ["-m", "ruff"]), *args]
    return subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300)


@pytest.mark.skipif(
    shutil.which("ruff") is None
    and subprocess.run([sys.executable, "-m", "ruff", "--version"], capture_output=True).returncode != 0,
    reason="ruff is not installed: pip install -e '.[test]'",
)
@pytest.mark.parametrize("check", [["check", *PATHS], ["format", "--check", *PATHS]], ids=["lint", "format"])
def test_ruff_finds_nothing(check):
    done = ruff(*check)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-2000:]


@pytest.mark.skipif(
    subprocess.run([sys.executable, "-m", "mypy", "--version"], capture_output=True).returncode != 0,
    reason="mypy is not installed: pip install -e '.[test]'",
)
def test_mypy_finds_nothing():
    """pyproject.toml [tool.mypy]: src/ and tests/, strict on mgpo.optim."""
    done = subprocess.run([sys.executable, "-m", "mypy"], cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-2000:]
