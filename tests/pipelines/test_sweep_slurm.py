"""``mgpo sweep --executor slurm`` on a real one-node Slurm cluster (tests/slurm.py; skipped where it cannot run):
one array job per submission, records equal to a local run's, ``scancel`` leaves a run interrupted and a
resubmission resumes it bit-identically, a time limit's signal checkpoints and requeues it, a failing run shows
its error while the others finish, and a finished sweep submits nothing."""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from mgpo.cli import app
from mgpo.pipelines.config import ConfigError
from mgpo.pipelines.executors import record, sweep_status
from mgpo.pipelines.sweep import load_sweep, run_state, run_sweep
from tests.pipelines.test_sweep import records, write_spec
from tests.pipelines.test_train import sentiment_csv, tiny_model_dir  # noqa: F401 (fixtures)
from tests.slurm import local_slurm, needs_slurm  # noqa: F401 (fixture)

ENDED = {"done", "failed", "interrupted"}


def slurm_spec(
    tmp_path, model_dir, csv, grid: str, time_min: int = 10, steps: int = 6, name: str = "spec", save_steps: int = 4
) -> Path:
    return write_spec(
        tmp_path,
        f"""
title: tiny on slurm
base:
  model: {{name: {model_dir}, max_length: 16}}
  data: {{name: {csv}, text_column: review, label_column: stars}}
  training: {{batch_size: 8, lr: 5.0e-3, save_steps: {save_steps}, max_steps: {steps}}}
grid: {grid}
threads_per_run: 1
executor: slurm
slurm: {{partition: debug, time_min: {time_min}, cpus_per_run: 1, parallelism: 2}}
output_dir: {tmp_path / name}
""",
    ).rename(tmp_path / f"{name}.yaml")


def wait_until(sweep, done, timeout: float = 240) -> dict:
    """Polls --status until ``done(rows)``; returns the rows by run name."""
    deadline = time.monotonic() + timeout
    while True:
        rows = {r["name"]: r for r in sweep_status(sweep)}
        if done(rows):
            return rows
        if time.monotonic() > deadline:
            raise TimeoutError(f"the sweep did not get there in {timeout} s: {rows}")
        time.sleep(1)


def local_records(tmp_path, spec: Path, name: str) -> dict:
    """The same sweep trained here, one run at a time, for comparison."""
    sweep = run_sweep(load_sweep(spec, output_dir=tmp_path / name, executor="local"), progress=False)
    assert {r.status for r in sweep.runs} == {"done"}
    return records(tmp_path / name)


def a_run_past_its_checkpoint(tmp_path, model_dir, csv) -> tuple[Path, object, Path, str]:
    """One 150-step run submitted with a 10-minute limit, returned once it runs past its first checkpoint (step 50):
    a signal sent now stops it between steps 50 and 150. Returns the spec, the sweep, the run folder, the job id."""
    spec = slurm_spec(tmp_path, model_dir, csv, "{training.seed: [0]}", time_min=10, steps=150, save_steps=50)
    sweep = run_sweep(load_sweep(spec), progress=False)
    out = sweep.runs[0].output_dir
    wait_until(sweep, lambda rows: run_state(out) == "partial" and rows["seed0"]["state"] == "running")
    return spec, sweep, out, record(out)["job_id"]


@needs_slurm
def test_an_array_of_three_runs_two_at_a_time_equals_a_local_run(tmp_path, local_slurm, tiny_model_dir, sentiment_csv):  # noqa: F811
    spec = slurm_spec(tmp_path, tiny_model_dir, sentiment_csv, "{training.seed: [0, 1, 2]}")
    sweep = run_sweep(load_sweep(spec), progress=False)
    assert len(sweep.submitted) == 3
    jobs = [record(run.output_dir)["job_id"] for run in sweep.runs]
    assert len({job.split("_")[0] for job in jobs}) == 1 and sorted(j.split("_")[1] for j in jobs) == list("012")
    rows = wait_until(sweep, lambda rows: all(r["state"] in ENDED for r in rows.values()))
    assert {r["state"] for r in rows.values()} == {"done"}, rows
    assert records(tmp_path / "spec") == local_records(tmp_path, spec, "local")

    # resubmitting a finished sweep submits nothing, and says so
    again = CliRunner().invoke(app, ["sweep", str(spec)])
    assert again.exit_code == 0 and "nothing to submit" in again.output, again.output
    assert [record(run.output_dir)["job_id"] for run in sweep.runs] == jobs


@needs_slurm
def test_a_failing_run_shows_its_error_and_the_others_finish(tmp_path, local_slurm, tiny_model_dir, sentiment_csv):  # noqa: F811
    """A data path that passes the plan (a hub id: checked when the run loads it) and fails in its job."""
    spec = slurm_spec(
        tmp_path, tiny_model_dir, sentiment_csv, f"{{data.name: [no-such-org/no-such-data, {sentiment_csv}]}}"
    )
    sweep = run_sweep(load_sweep(spec), progress=False)
    rows = wait_until(sweep, lambda rows: all(r["state"] in ENDED for r in rows.values()))
    done, failed = rows[sweep.runs[1].name], rows[sweep.runs[0].name]
    assert done["state"] == "done", rows
    assert failed["state"] == "failed" and failed["detail"].startswith("error: 'no-such-org/no-such-data'"), failed
    assert Path(failed["log"]).is_file() and "Traceback" not in failed["detail"]
    shown = CliRunner().invoke(app, ["sweep", str(spec), "--status"], env={"COLUMNS": "300"})
    assert shown.exit_code == 0 and "1 failed, 1 done" in shown.output.replace("1 done, 1 failed", "1 failed, 1 done")


@needs_slurm
def test_scancel_leaves_the_run_interrupted_and_a_resubmission_resumes_it(
    tmp_path, local_slurm, tiny_model_dir, sentiment_csv
):  # noqa: F811
    spec, sweep, out, job = a_run_past_its_checkpoint(tmp_path, tiny_model_dir, sentiment_csv)
    subprocess.run(["scancel", job], check=True)
    rows = wait_until(sweep, lambda rows: rows["seed0"]["state"] in ENDED, timeout=120)
    assert rows["seed0"]["state"] == "interrupted", rows
    assert "partial at step" in rows["seed0"]["detail"] and record(out)["state"] == "interrupted"
    step = int(rows["seed0"]["detail"].split("partial at step ")[1].split(";")[0])
    assert 50 <= step < 150

    resubmitted = run_sweep(load_sweep(spec), progress=False)
    assert [r.name for r in resubmitted.submitted] == ["seed0"]
    rows = wait_until(sweep, lambda rows: rows["seed0"]["state"] in ENDED, timeout=300)
    assert rows["seed0"]["state"] == "done", rows
    assert "--resume" in (out / "train.out").read_text()
    assert records(tmp_path / "spec") == local_records(tmp_path, spec, "local")  # bit-identical adapter


@needs_slurm
def test_the_time_limit_signal_checkpoints_requeues_and_finishes(tmp_path, local_slurm, tiny_model_dir, sentiment_csv):  # noqa: F811
    """The job is submitted to be signalled (USR2) signal_s before its time limit; the test sends that signal itself
    once the run has a checkpoint, so the run is signalled at a known point: Slurm's own timer fires on a 30-second
    sweep of its jobs, up to a minute early, and a test waiting for it took minutes (signalled six times over 1000
    steps). submitit takes a USR2 this far into a 10-minute limit for the time limit (it counts toward
    max_requeues). The run stops after its checkpoint, is requeued, resumes, and finishes: the adapter equals an
    uninterrupted run's."""
    spec, sweep, out, job = a_run_past_its_checkpoint(tmp_path, tiny_model_dir, sentiment_csv)
    subprocess.run(["scancel", "--signal=USR2", job], check=True)
    rows = wait_until(sweep, lambda rows: rows["seed0"]["state"] in ENDED, timeout=300)
    assert rows["seed0"]["state"] == "done", (rows, (out / "train.out").read_text()[-3000:])
    log = (out / "train.out").read_text()
    script = next((tmp_path / "spec").rglob(f"{job.split('_')[0]}_submission.sh")).read_text()
    assert "#SBATCH --signal=USR2@120" in script, script  # signal_s before the limit: Slurm's own signal
    # stopped once, requeued by submitit, resumed once from the checkpoint the stop wrote
    assert log.count("$ ") == 2 and "--resume" in log, log[-3000:]
    assert "interrupted at step" in log and "resuming from checkpoint-" in log, log[-3000:]
    assert records(tmp_path / "spec") == local_records(tmp_path, spec, "local")


def test_slurm_without_sbatch_or_submitit_is_one_line_naming_the_fix(tmp_path, monkeypatch):
    import mgpo.pipelines.executors as executors

    spec = write_spec(tmp_path, f"grid: {{training.seed: [0]}}\nexecutor: slurm\noutput_dir: {tmp_path / 's'}\n")
    monkeypatch.setattr(executors.shutil, "which", lambda name: None)
    result = CliRunner().invoke(app, ["sweep", str(spec)])
    assert result.exit_code == 2, result.output
    assert "needs Slurm's sbatch on PATH" in result.output and "Traceback" not in result.output
    monkeypatch.setattr(executors.shutil, "which", lambda name: "/usr/bin/" + name)
    monkeypatch.setitem(__import__("sys").modules, "submitit", None)
    with pytest.raises(ConfigError, match=r"pip install 'mgpo\[cluster\]'"):
        executors.check_slurm()
