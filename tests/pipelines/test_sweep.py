"""``mgpo sweep``: grid expansion and the run plan (fast), a failed run that does not stop the sweep, and a sweep
killed mid-run that, rerun, skips its finished runs and resumes the half-finished one (tiny BERT, real training)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from mgpo.cli import app
from mgpo.pipelines.config import ConfigError, to_yaml
from mgpo.pipelines.executors import sweep_status, write_record
from mgpo.pipelines.sweep import load_sweep, plan, run_state, run_sweep, write_index
from tests.pipelines.test_train import sentiment_csv, tiny_model_dir  # noqa: F401 (fixtures)


def write_spec(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "spec.yaml"
    path.write_text(text)
    return path


def test_grid_is_the_product_of_its_axes_in_order(tmp_path):
    (tmp_path / "base.yaml").write_text("training: {lr: 1.0e-3}\n")
    spec = write_spec(
        tmp_path,
        """
title: demo
base: base.yaml
set: {training.max_steps: 7}
grid:
  method:
    LoRA: {perturbation.method: adamw}
    LoRA-MGPO: {perturbation.method: mgpo, perturbation.rho: 0.1}
  training.seed: [0, 1, 2]
name: "{method}-s{training.seed}"
output_dir: out
""",
    )
    sweep = load_sweep(spec, ["training.batch_size=4"], output_dir=tmp_path / "sweep")
    assert [r.name for r in sweep.runs] == [
        "LoRA-s0",
        "LoRA-s1",
        "LoRA-s2",
        "LoRA-MGPO-s0",
        "LoRA-MGPO-s1",
        "LoRA-MGPO-s2",
    ]
    assert sweep.runs[4].labels == {"method": "LoRA-MGPO", "training.seed": 1}
    configs = plan(sweep)
    c = configs[4]
    assert (c.perturbation.method, c.perturbation.rho, c.training.seed) == ("mgpo", 0.1, 1)
    assert (c.training.lr, c.training.max_steps, c.training.batch_size) == (1e-3, 7, 4)
    assert c.training.output_dir == str(tmp_path / "sweep" / "LoRA-MGPO-s1")
    assert {run_state(r.output_dir) for r in sweep.runs} == {"new"}
    write_index(sweep)  # the base file is named in the index: with each run's overrides, its whole configuration
    assert json.loads((tmp_path / "sweep" / "index.json").read_text())["base"] == str(tmp_path / "base.yaml")


def test_inline_base_and_default_names(tmp_path):
    spec = write_spec(
        tmp_path, "base: {training: {lr: 0.002}, adapter: {method: dora}}\ngrid: {adapter.rank: [4, 8]}\n"
    )
    sweep = load_sweep(spec)
    assert [r.name for r in sweep.runs] == ["rank4", "rank8"]
    assert sweep.output_dir == Path("runs/sweeps/spec")
    assert [(c.adapter.method, c.adapter.rank, c.training.lr) for c in plan(sweep)] == [
        ("dora", 4, 0.002),
        ("dora", 8, 0.002),
    ]


def test_a_list_of_grids_joins_their_runs_in_order(tmp_path):
    spec = write_spec(
        tmp_path,
        """
grid:
  - {training.seed: [0, 1], method: {A: {training.lr: 0.001}, B: {training.lr: 0.002}}}
  - {training.seed: [2], method: {B: {training.lr: 0.002}}}
name: "{method}-s{training.seed}"
""",
    )
    sweep = load_sweep(spec)
    assert [r.name for r in sweep.runs] == ["A-s0", "B-s0", "A-s1", "B-s1", "B-s2"]
    assert [r.index for r in sweep.runs] == [0, 1, 2, 3, 4]
    assert sweep.runs[4].labels == {"training.seed": 2, "method": "B"}
    assert [(c.training.seed, c.training.lr) for c in plan(sweep)][-1] == (2, 0.002)


def test_a_run_folder_holding_another_configuration_is_refused(tmp_path):
    spec = write_spec(
        tmp_path,
        f"grid: {{training.lr: [0.001, 0.002]}}\nname: 'lr{{training.lr}}'\noutput_dir: {tmp_path / 'sweep'}\n",
    )
    sweep = load_sweep(spec)
    done, other = sweep.runs
    done.output_dir.mkdir(parents=True)
    (done.output_dir / "config.yaml").write_text(to_yaml(plan(sweep)[0]))
    (done.output_dir / "metrics.json").write_text("{}")
    plan(sweep)  # the same configuration, written by this spec: fine
    # a finished run the spec now describes otherwise: skipping it would report the old run under the new spec
    changed = load_sweep(
        write_spec(
            tmp_path,
            "grid: {training.lr: [0.001, 0.002]}\nname: 'lr{training.lr}'\n"
            f"output_dir: {tmp_path / 'sweep'}\nset: {{training.seed: 7}}\n",
        )
    )
    with pytest.raises(ConfigError, match=r"1 run folder.*lr0.001 \(training.seed: 0 -> 7\).*move those"):
        plan(changed)
    result = CliRunner().invoke(app, ["sweep", str(tmp_path / "spec.yaml"), "--plan"])
    assert result.exit_code == 2 and "training.seed: 0 -> 7" in " ".join(result.output.split())
    assert not other.output_dir.exists()


@pytest.mark.parametrize(
    "text,message",
    [
        ("grid: {}", "grid:"),
        ("grid: {training.seed: 3}", "training.seed"),
        ("grid: {training.seed: [0]}\nbsae: x.yaml", "'bsae'"),
        ("grid: [{training.seed: [0]}, {training.lr: [0.1]}]", "same axes"),
        ("grid: [{training.seed: [0]}, {training.seed: [0]}]", "overlapping"),
        ("base: missing.yaml\ngrid: {training.seed: [0]}", "missing.yaml"),
        ("grid: {training.seed: [0, 1]}\nname: run", "'run'"),
        ("grid: {training.seed: [0]}\nname: '{seed}'", "{seed}"),
        ("grid: {method: {A: adamw}}", "'A'"),
    ],
)
def test_bad_specs_are_clear_errors(tmp_path, text, message):
    with pytest.raises(ConfigError, match=message.replace("{", r"\{").replace("}", r"\}")):
        load_sweep(write_spec(tmp_path, text))


def test_an_invalid_run_config_stops_the_sweep_before_any_training(tmp_path):
    spec = write_spec(tmp_path, "grid: {training.lr: [0.001, -1]}\n")
    result = CliRunner().invoke(app, ["sweep", str(spec), "--output-dir", str(tmp_path / "s")])
    assert result.exit_code == 2 and "lr-1" in result.output and "training.lr" in result.output
    assert not (tmp_path / "s" / "lr0.001").exists()


@pytest.mark.parametrize("where", ["a file", "inside a file"])
def test_an_output_dir_that_cannot_be_a_folder_is_one_clear_line(tmp_path, where):
    spec = write_spec(tmp_path, "grid: {training.lr: [0.001]}\n")
    blocker = tmp_path / "taken"
    blocker.write_text("not a folder")
    out = blocker if where == "a file" else blocker / "sweep"
    result = CliRunner().invoke(app, ["sweep", str(spec), "--output-dir", str(out)])
    assert result.exit_code == 2, result.output
    assert "output_dir=" in result.output and "Traceback" not in result.output
    assert blocker.read_text() == "not a folder"


def sweep_spec(tmp_path, model_dir, csv, grid: str) -> Path:
    return write_spec(
        tmp_path,
        f"""
title: tiny
base:
  model: {{name: {model_dir}, max_length: 16}}
  data: {{name: {csv}, text_column: review, label_column: stars}}
  training: {{batch_size: 8, lr: 5.0e-3, save_steps: 4, max_steps: 6}}
grid: {grid}
output_dir: {tmp_path / "sweep"}
""",
    )


def index(tmp_path) -> dict:
    return {r["name"]: r for r in json.loads((tmp_path / "sweep" / "index.json").read_text())["runs"]}


def test_a_failed_run_is_recorded_the_sweep_goes_on_and_status_shows_it(tmp_path, tiny_model_dir, sentiment_csv):  # noqa: F811
    # a missing column is refused before any run starts (the config check reads the file's header) ...
    spec = sweep_spec(tmp_path, tiny_model_dir, sentiment_csv, "{data.label_column: [no_such_column, stars]}")
    with pytest.raises(ConfigError, match="no column 'no_such_column'"):
        run_sweep(load_sweep(spec), progress=False)
    # ... a run that fails only once it loads its data is recorded, and the sweep goes on
    spec = sweep_spec(tmp_path, tiny_model_dir, sentiment_csv, "{data.text_column: [stars, review]}")
    sweep = run_sweep(load_sweep(spec), progress=False)
    assert [r.status for r in sweep.runs] == ["failed", "done"]
    runs = index(tmp_path)
    assert runs["text_columnstars"]["status"] == "failed"
    assert "'stars' is chosen both as" in " ".join(runs["text_columnstars"]["error"].split())
    assert (tmp_path / "sweep" / "text_columnreview" / "metrics.json").is_file()
    assert "failed" in (tmp_path / "sweep" / "index.csv").read_text()

    # --status reads the same from the run folders alone: done, failed with its error line, interrupted
    result = CliRunner().invoke(app, ["sweep", str(spec), "--status"], env={"COLUMNS": "300"})
    assert result.exit_code == 0, result.output
    assert "done" in result.output and "failed" in result.output and "1 failed, 1 done" in result.output
    assert "both as text and as label" in " ".join(result.output.split()), result.output
    write_record(sweep.runs[0].output_dir, state="interrupted", error="exit code 143: stopped by SIGTERM")
    rows = {r["name"]: r for r in sweep_status(load_sweep(spec))}
    assert rows["text_columnstars"]["state"] == "interrupted" and "SIGTERM" in rows["text_columnstars"]["detail"]
    assert rows["text_columnreview"]["state"] == "done"


def test_a_killed_sweep_resumes(tmp_path, tiny_model_dir, sentiment_csv):  # noqa: F811
    """Kill the whole sweep (SIGKILL) while its second run is past its first checkpoint; the rerun skips the first
    run, resumes the second from its checkpoint and runs the third."""
    spec = sweep_spec(tmp_path, tiny_model_dir, sentiment_csv, "{training.max_steps: [6, 40, 5]}")
    second = tmp_path / "sweep" / "max_steps40"
    proc = subprocess.Popen(
        [sys.executable, "-m", "mgpo", "sweep", str(spec)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
        env={**os.environ},
    )
    deadline = time.time() + 400
    while time.time() < deadline and proc.poll() is None and run_state(second) != "partial":
        time.sleep(0.1)
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert run_state(second) == "partial", "the second run did not reach a checkpoint in time"
    # --status: its record still says running, but its process is gone (it used to show "running" for ever)
    shown = {r["name"]: r for r in sweep_status(load_sweep(spec))}["max_steps40"]
    assert shown["state"] == "interrupted" and "ended without a word (killed?)" in shown["detail"], shown
    first_metrics = tmp_path / "sweep" / "max_steps6" / "metrics.json"
    written = first_metrics.stat().st_mtime_ns

    sweep = run_sweep(load_sweep(spec), progress=False)
    assert [r.status for r in sweep.runs] == ["skipped", "resumed", "done"]
    assert first_metrics.stat().st_mtime_ns == written
    rows = [json.loads(line) for line in (second / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "loss" in r] == list(range(1, 41))  # each step logged once, none missing
    assert "--resume" in (second / "train.out").read_text()
    assert json.loads((second / "metrics.json").read_text())["steps"] == 40


def _pid_of(fragment: str) -> int | None:
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if fragment in (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode():
                    return int(entry.name)
            except OSError:
                continue
    return None


def test_a_run_stopped_by_a_signal_is_interrupted_not_failed_and_the_sweep_stops(
    tmp_path, tiny_model_dir, sentiment_csv
):  # noqa: F811
    """SIGTERM to the run alone (or Ctrl-C to a sweep started in the background, which ignores SIGINT): the run
    writes its checkpoint and exits 143; the sweep records it as interrupted (it used to say failed and start
    the next run) and stops with 130; the rerun resumes it."""
    spec = sweep_spec(tmp_path, tiny_model_dir, sentiment_csv, "{training.max_steps: [400, 5]}")
    first = tmp_path / "sweep" / "max_steps400"
    proc = subprocess.Popen(
        [sys.executable, "-m", "mgpo", "sweep", str(spec)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env={**os.environ, "COLUMNS": "300"},
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN),
    )
    deadline = time.time() + 400
    while time.time() < deadline and not (
        (first / "log.jsonl").is_file() and len((first / "log.jsonl").read_text().splitlines()) >= 3
    ):
        time.sleep(0.2)
    os.kill(_pid_of(f"training.output_dir={first}"), signal.SIGTERM)
    output, _ = proc.communicate(timeout=300)
    assert proc.returncode == 130, output[-2000:]
    runs = index(tmp_path)
    assert runs["max_steps400"]["status"] == "interrupted" and runs["max_steps5"]["status"] == "pending", runs
    assert "interrupted" in output and "failed" not in output
    assert run_state(first) == "partial"


def test_a_run_stopped_before_it_trains_is_interrupted_too(tmp_path, tiny_model_dir, sentiment_csv):  # noqa: F811
    """SIGTERM while the run is still starting (importing, loading, resuming: before it installs its handler)
    ends it with -15. That is a stop on request, not a failure: the sweep used to record "failed" and start the
    next run."""
    spec = sweep_spec(tmp_path, tiny_model_dir, sentiment_csv, "{training.max_steps: [400, 5]}")
    first = tmp_path / "sweep" / "max_steps400"
    proc = subprocess.Popen(
        [sys.executable, "-m", "mgpo", "sweep", str(spec)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env={**os.environ, "COLUMNS": "300"},
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN),
    )
    deadline, pid = time.time() + 120, None
    while time.time() < deadline and pid is None:
        pid = _pid_of(f"training.output_dir={first}")
        time.sleep(0.05)
    assert pid is not None and not (first / "log.jsonl").is_file()  # caught before training began
    os.kill(pid, signal.SIGTERM)
    output, _ = proc.communicate(timeout=300)
    assert proc.returncode == 130, output[-2000:]
    runs = index(tmp_path)
    assert runs["max_steps400"]["status"] == "interrupted" and runs["max_steps5"]["status"] == "pending", runs
    assert "stopped by SIGTERM" in runs["max_steps400"]["error"] and "failed" not in output


def records(folder: Path) -> dict:
    """What a run leaves that must not depend on where it ran: its adapter's bytes, its final metrics and its
    logged losses (wall times and paths left out)."""
    out = {}
    for run in sorted(p for p in folder.iterdir() if (p / "metrics.json").is_file()):
        metrics = json.loads((run / "metrics.json").read_text())
        adapter = sorted((run / "adapter").glob("*.safetensors")) if (run / "adapter").is_dir() else []
        out[run.name] = {
            "metrics": {
                k: v
                for k, v in metrics.items()
                if not isinstance(v, str)
                and not any(measured in k for measured in ("time", "wall", "per_second", "memory", "load_average"))
            },
            "losses": [
                (r.get("step"), r.get("loss"))
                for r in map(json.loads, (run / "log.jsonl").read_text().splitlines())
                if "loss" in r
            ],
            "adapter": [p.read_bytes() for p in adapter],
        }
    return out


def test_two_local_workers_give_the_same_records_as_one(tmp_path, tiny_model_dir, sentiment_csv):  # noqa: F811
    """Bit-identical when each run gets the same number of torch threads (threads_per_run)."""
    spec = sweep_spec(tmp_path, tiny_model_dir, sentiment_csv, "{training.seed: [0, 1]}\nthreads_per_run: 1")
    one = run_sweep(load_sweep(spec, output_dir=tmp_path / "one"), progress=False)
    two = run_sweep(load_sweep(spec, output_dir=tmp_path / "two", workers=2), progress=False)
    assert [r.status for r in one.runs] == [r.status for r in two.runs] == ["done"] * 2
    first, second = records(tmp_path / "one"), records(tmp_path / "two")
    assert list(first) == ["seed0", "seed1"] and all(r["adapter"] for r in first.values())
    assert first == second
    ran_on = {json.loads((tmp_path / "two" / name / "sweep-run.json").read_text())["device"] for name in second}
    assert ran_on == {"1 CPU threads"}


def test_bad_executor_settings_are_one_clear_line(tmp_path):
    spec = write_spec(tmp_path, "grid: {training.seed: [0]}\nexecutor: kubernetes\n")
    with pytest.raises(ConfigError, match="executor 'kubernetes' is unknown: use one of local, slurm"):
        load_sweep(spec)
    spec = write_spec(tmp_path, "grid: {training.seed: [0]}\nslurm: {partition: gpu, gpu_per_run: 1}\n")
    with pytest.raises(ConfigError, match="unknown slurm setting 'gpu_per_run'"):
        load_sweep(spec)
    with pytest.raises(ConfigError, match="workers=0"):
        load_sweep(write_spec(tmp_path, "grid: {training.seed: [0]}\n"), workers=0)
    with pytest.raises(ConfigError, match="workers=2 is for --executor local"):
        load_sweep(write_spec(tmp_path, "grid: {training.seed: [0]}\n"), executor="slurm", workers=2)


def test_a_run_on_several_gpus_is_refused_by_name(tmp_path):
    spec = write_spec(tmp_path, "grid: {training.seed: [0]}\nexecutor: slurm\nslurm: {gpus_per_run: 4}\n")
    with pytest.raises(ConfigError, match="gpus_per_run=4: each run trains in one process on one GPU"):
        load_sweep(spec)
