"""scripts/gpu-check.sh on a machine without a GPU: it says so and exits 0 writing nothing, and its dry run counts
the work and shows that it fits the 8-minute budget."""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

from tests.optim.helpers import METHODS

ROOT = Path(__file__).resolve().parents[1]


def run_script(tmp_path, *args):
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "OUT": str(tmp_path)}
    return subprocess.run(
        ["bash", str(ROOT / "scripts" / "gpu-check.sh"), *args],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
        timeout=300,
    )


def test_without_a_gpu_it_says_so_and_writes_nothing(tmp_path):
    proc = run_script(tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "no CUDA GPU is visible" in proc.stdout and "no report was written" in proc.stdout
    assert list(tmp_path.iterdir()) == []


def test_dry_run_counts_the_work_and_fits_in_eight_minutes(tmp_path):
    proc = run_script(tmp_path, "--dry-run")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    out = proc.stdout
    # bf16, fp16 and exact-restore tests of every method of the contract tests, then peak memory and FSDP2
    assert f"tests: {3 * len(METHODS) + 2} in tests/gpu/test_cuda.py" in out
    assert "--device cuda --shape 1b" in out
    assert len(re.findall(r"2 x 512 tokens, LoRA rank (8|64):", out)) == 2
    total, limit = map(int, re.search(r"total: (\d+) s of the (\d+) s limit", out).groups())
    assert limit == 480 and total <= limit and "fits" in out
    assert list(tmp_path.iterdir()) == []  # a dry run writes nothing
