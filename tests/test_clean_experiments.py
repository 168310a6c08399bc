"""scripts/clean-experiments.sh against a stand-in `mgpo`: finished runs are kept under docs/ (records only, no
checkpoints), put back on a fresh checkout so the sweep skips them, and a stopped sweep stops the queue."""

import os
import shutil
import subprocess
from pathlib import Path

ROOT = Path(__file__).parents[1]
SWEEPS = [
    "cpu-dd-clean",
    "cpu-dd-clean-full",
    "cpu-core-tweets",
    "cpu-arithmetic-core",
    "cpu-ablation-clean",
    "cpu-methods-clean",
    "cpu-methods-uncapped",
    "cpu-verdicts-tweets",
    "cpu-verdicts-methods",
    "cpu-verdicts-dd",
    "cpu-verdicts-paper-rho",
    "cpu-verdicts-arithmetic",
]
# `mgpo sweep configs/experiments/NAME.yaml`: logs whether run-a was already done, then writes one finished run
# (with a checkpoint that must not be kept) and one half-finished run; exits $STOP_AT's code on that sweep
FAKE_MGPO = r"""#!/bin/bash
name=$(basename "$2" .yaml); out=runs/experiments/$name
[[ -f $out/run-a/metrics.json ]] && echo "$name run-a done before" >> "$CALLS" || echo "$name run-a trained" >> "$CALLS"
mkdir -p $out/run-a/checkpoints/checkpoint-1 $out/run-b/checkpoints
echo "title: $name" > $out/sweep.yaml; echo '{"runs": []}' > $out/index.json
echo "seed: 0" > $out/run-a/config.yaml; echo '{"step": 1, "loss": 1.0}' > $out/run-a/log.jsonl
echo '{"test_accuracy": 0.5}' > $out/run-a/metrics.json; echo weights > $out/run-a/checkpoints/checkpoint-1/w
[[ $name == "$STOP_AT" ]] && exit 130
exit 0
"""


def queue(tmp_path: Path, stop_at: str = "", *args: str, **env: str) -> subprocess.CompletedProcess:
    (tmp_path / "scripts").mkdir(exist_ok=True)
    shutil.copy(ROOT / "scripts" / "clean-experiments.sh", tmp_path / "scripts")
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    (bin_dir / "mgpo").write_text(FAKE_MGPO)
    (bin_dir / "mgpo").chmod(0o755)
    env = {
        **os.environ,
        "PATH": f"{bin_dir}:{os.environ['PATH']}",
        "CALLS": str(tmp_path / "calls.log"),
        "STOP_AT": stop_at,
        "MGPO_KEEP_EVERY": "0.1",
        **env,
    }
    return subprocess.run(
        ["bash", "scripts/clean-experiments.sh", *args],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_finished_runs_are_kept_and_put_back_on_a_fresh_checkout(tmp_path):
    result = queue(tmp_path)
    assert result.returncode == 0, result.stderr
    keep = tmp_path / "docs" / "experiments-clean" / "runs"
    for name in SWEEPS:
        assert sorted(p.name for p in (keep / name).iterdir()) == ["index.json", "run-a", "sweep.yaml"]
        assert sorted(p.name for p in (keep / name / "run-a").iterdir()) == ["config.yaml", "log.jsonl", "metrics.json"]
    shutil.rmtree(tmp_path / "runs")  # a new machine: only what git holds is left
    result = queue(tmp_path)
    assert result.returncode == 0, result.stderr
    calls = (tmp_path / "calls.log").read_text().splitlines()
    assert calls == [f"{n} run-a trained" for n in SWEEPS] + [f"{n} run-a done before" for n in SWEEPS]
    assert "restored cpu-dd-clean/run-a" in result.stdout


def test_a_stopped_sweep_stops_the_queue_with_its_exit_code(tmp_path):
    result = queue(tmp_path, stop_at="cpu-core-tweets")
    assert result.returncode == 130 and "rerun to resume" in result.stdout
    calls = (tmp_path / "calls.log").read_text().splitlines()
    assert calls == [f"{n} run-a trained" for n in SWEEPS[:3]]
    assert (tmp_path / "docs" / "experiments-clean" / "runs" / "cpu-core-tweets" / "run-a" / "metrics.json").is_file()


def test_commit_takes_the_kept_records_only(tmp_path):
    git = lambda *a: subprocess.run(["git", "-C", str(tmp_path), *a], check=True, capture_output=True, text=True)
    git("init", "-q")
    shutil.copy(ROOT / ".gitignore", tmp_path)  # the project's own: it must not ignore the kept records
    git("-c", "user.name=t", "-c", "user.email=t@t", "commit", "-q", "--allow-empty", "-m", "start")
    (tmp_path / "work.py").write_text("x = 1\n")
    git("add", "work.py")  # someone's staged work in the same checkout
    result = queue(
        tmp_path,
        "",
        "--commit",
        GIT_AUTHOR_NAME="t",
        GIT_AUTHOR_EMAIL="t@t",
        GIT_COMMITTER_NAME="t",
        GIT_COMMITTER_EMAIL="t@t",
    )
    assert result.returncode == 0, result.stderr
    log = git("log", "--format=%s", "--name-only").stdout
    assert log.count("runs kept") == len(SWEEPS) and "work.py" not in log
    assert "docs/experiments-clean/runs/cpu-dd-clean/run-a/metrics.json" in log
    assert "experiments: cpu-dd-clean, 1 runs kept" in log
    assert git("status", "--porcelain").stdout.splitlines()[0] == "A  work.py"


def test_named_sweeps_run_alone_in_the_order_given(tmp_path):
    (tmp_path / "configs" / "experiments").mkdir(parents=True)
    for name in ("cpu-verdicts-dd", "cpu-verdicts-tweets"):
        (tmp_path / "configs" / "experiments" / f"{name}.yaml").write_text("title: x\n")
    result = queue(tmp_path, "", "cpu-verdicts-dd", "cpu-verdicts-tweets")
    assert result.returncode == 0, result.stderr
    calls = (tmp_path / "calls.log").read_text().splitlines()
    assert calls == ["cpu-verdicts-dd run-a trained", "cpu-verdicts-tweets run-a trained"]
    result = queue(tmp_path, "", "cpu-verdicts-typo")
    assert result.returncode == 2 and "no sweep named 'cpu-verdicts-typo'" in result.stderr
