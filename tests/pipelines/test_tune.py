"""``mgpo tune``: the study's bookkeeping against a stand-in trainer whose score is a known function of rho
(tests/pipelines/fake_train.py: same trials for the same sampler seed, two workers on one SQLite study without a
trial counted twice, a kill -9 and a resume finishing with the right number of trials, pruning that stops runs),
one real study of a tiny model end to end through the CLI, the verdict's logic, and one-line errors for bad
input."""

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
from mgpo.pipelines.config import ConfigError
from mgpo.pipelines.executors import record
from mgpo.pipelines.tune import BASELINE, SEARCH, SEEDS, TrialFailed, counts, load_tune, open_study, run_tune
from mgpo.pipelines.tune.report import Setting, settings, verdict, write_report
from tests.pipelines.test_train import sentiment_csv, tiny_model_dir  # noqa: F401 (fixtures)
from tests.slurm import local_slurm, needs_slurm  # noqa: F401 (fixture)

HERE = Path(__file__).parent


@pytest.fixture()
def fake_python(tmp_path) -> str:
    """An executable that stands in for the interpreter the trials are started with (``PY -m mgpo train ...``)."""
    path = tmp_path / "fake-python"
    path.write_text(f'#!/bin/sh\nexec {sys.executable} {HERE / "fake_train.py"} "$@"\n')
    path.chmod(0o755)
    return str(path)


def write_config(tmp_path, csv, tune: str, name: str = "tune.yaml", data: str = "") -> Path:
    path = tmp_path / name
    model = "smollm2-135m" if "causal-lm" in data else "minilm"
    path.write_text(f"""
model: {{name: {model}, max_length: 16}}
data: {{name: {csv}, text_column: review, label_column: stars{data}}}
training: {{batch_size: 8, lr: 5.0e-3}}
tune: {tune}
""")
    return path


def search_trials(study) -> list:
    return [t for t in study.get_trials() if t.user_attrs.get("phase") == SEARCH and t.user_attrs["arm"] != BASELINE]


def test_a_fixed_sampler_seed_gives_the_same_trials_and_the_same_choice(tmp_path, sentiment_csv, fake_python):
    config = write_config(tmp_path, sentiment_csv, "{trials: 6, max_steps: 4, evals: 2, sampler_seed: 3}")
    studies = [run_tune(load_tune(config, output_dir=tmp_path / name), python=fake_python) for name in "ab"]
    rhos = [[t.params["rho"] for t in search_trials(s)] for s in studies]
    assert rhos[0] == rhos[1] and len(rhos[0]) == 6 and len(set(rhos[0])) == 6
    assert studies[0].best_trial.params == studies[1].best_trial.params
    other = run_tune(
        load_tune(
            write_config(tmp_path, sentiment_csv, "{trials: 6, max_steps: 4, evals: 2, sampler_seed: 4}", "other.yaml"),
            output_dir=tmp_path / "c",
        ),
        python=fake_python,
    )
    assert [t.params["rho"] for t in search_trials(other)] != rhos[0]  # the seed is what fixed them
    # trial 0 is LoRA without perturbation, and every rho stays in the default range around the profile's 0.05
    first = studies[0].get_trials()[0]
    assert first.number == 0 and first.user_attrs["arm"] == BASELINE and first.params == {}
    assert all(0.0005 <= r <= 0.5 for r in rhos[0])


def test_two_workers_share_one_sqlite_study_without_a_trial_counted_twice(tmp_path, sentiment_csv, fake_python):
    config = write_config(tmp_path, sentiment_csv, "{trials: 8, max_steps: 6, evals: 2, pruner: none}")
    plan = load_tune(config, output_dir=tmp_path / "t")
    os.environ["FAKE_STEP_S"] = "0.05"
    try:
        study = run_tune(plan, workers=2, python=fake_python)
    finally:
        del os.environ["FAKE_STEP_S"]
    assert counts(study) == {"COMPLETE": 8}
    runs = [t.user_attrs["run"] for t in study.get_trials()]
    assert len(runs) == len(set(runs)) == 9  # LoRA and 8 search trials, one folder each
    starts = sorted((t.datetime_start, t.datetime_complete) for t in study.get_trials())
    assert any(b[0] < a[1] for a, b in zip(starts, starts[1:])), "the two workers never overlapped"
    # a rerun of the finished study adds nothing
    assert counts(run_tune(plan, workers=2, python=fake_python)) == {"COMPLETE": 8}


TAKER = """
import sys, threading
from mgpo.pipelines.tune import load_tune, open_study
from mgpo.pipelines.tune.workers import Gate, work
tune = load_tune(sys.argv[1], output_dir=sys.argv[2])
def objective(trial):
    with open(sys.argv[3], "a") as f:
        f.write(f"{trial.number}\\n")
    return 0.0
work(open_study(tune), tune, objective, Gate(tune), threading.Event())
"""


def test_worker_processes_on_one_sqlite_study_never_take_the_same_queued_trial(tmp_path, sentiment_csv):
    """SQLite has no row locks, so Optuna alone lets two processes pop one queued trial (optuna/optuna#4621; it
    made trial 0 train twice on Slurm): mgpo's gate makes taking a trial one step across processes."""
    config = write_config(tmp_path, sentiment_csv, "{trials: 1, pruner: none}")
    tune = load_tune(config, output_dir=tmp_path / "t")
    tune.output_dir.mkdir()
    study = open_study(tune)
    for _ in range(47):  # 48 queued trials with trial 0, then 1 search trial: taken by 4 processes at once
        study.enqueue_trial({}, user_attrs={"arm": BASELINE, "phase": SEEDS})
    taken = tmp_path / "taken.txt"
    script = [sys.executable, "-c", TAKER, str(config), str(tune.output_dir), str(taken)]
    procs = [subprocess.Popen(script, stderr=subprocess.PIPE, text=True) for _ in range(4)]
    errors = [p.communicate()[1] for p in procs]
    assert all(p.returncode == 0 for p in procs), errors
    numbers = taken.read_text().split()
    assert sorted(numbers, key=int) == [str(n) for n in range(49)], "a trial was taken twice, or never"


def test_a_gate_whose_lock_file_cannot_be_locked_raises_and_leaves_no_thread_waiting(
    tmp_path, sentiment_csv, monkeypatch
):
    """On a file system without flock the error reaches the worker, and the other workers of the process are not
    left waiting forever on the threads' lock."""
    import errno
    import threading

    from mgpo.pipelines.tune import workers

    tune = load_tune(write_config(tmp_path, sentiment_csv, "{trials: 1}"), output_dir=tmp_path / "t")
    tune.output_dir.mkdir()
    gate = workers.Gate(tune)

    def refuse(*args):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(workers.fcntl, "flock", refuse)
    with pytest.raises(OSError, match="No locks available"):
        gate.acquire()
    monkeypatch.undo()
    other = threading.Thread(target=lambda: (gate.acquire(), gate.release()), daemon=True)
    other.start()
    other.join(10)
    assert not other.is_alive(), "the failed acquire left the threads' lock held"


KILLED = """
import sys
from mgpo.pipelines.tune import load_tune, run_tune
run_tune(load_tune(sys.argv[1], output_dir=sys.argv[2]), python=sys.argv[3])
"""


def test_a_kill_mid_study_then_a_resume_finishes_with_the_right_number_of_trials(tmp_path, sentiment_csv, fake_python):
    config = write_config(tmp_path, sentiment_csv, "{trials: 5, max_steps: 20, evals: 2, pruner: none}")
    out = tmp_path / "t"
    env = {**os.environ, "FAKE_STEP_S": "0.1", "PYTHONPATH": os.pathsep.join(sys.path)}
    proc = subprocess.Popen(
        [sys.executable, "-c", KILLED, str(config), str(out), fake_python], env=env, start_new_session=True
    )
    deadline = time.monotonic() + 120
    # LoRA and one search trial done, and the third training (its log begun)
    while len(list((out / "trials").glob("*/metrics.json"))) < 2 or not (out / "trials/trial-0002/log.jsonl").exists():
        assert time.monotonic() < deadline and proc.poll() is None
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    plan = load_tune(config, output_dir=out)
    study = run_tune(plan, python=fake_python)
    trials = study.get_trials()
    failed = [t for t in trials if t.state.name == "FAIL"]
    assert len(failed) == 1, [(t.number, t.state) for t in trials]
    retry = [t for t in trials if t.user_attrs.get("retry_of") == failed[0].number]
    assert len(retry) == 1 and retry[0].state.name == "COMPLETE" and retry[0].params == failed[0].params
    assert counts(study) == {"COMPLETE": 5, "FAIL": 1}  # five counted, the killed one not among them


def test_the_pruner_stops_poor_trials_at_a_validation_evaluation(tmp_path, sentiment_csv, fake_python):
    config = write_config(tmp_path, sentiment_csv, "{trials: 10, max_steps: 40, evals: 4, sampler_seed: 0}")
    os.environ["FAKE_STEP_S"] = "0.05"  # a trial of 2 s: the watcher (0.5 s a look) can stop it under load
    try:
        study = run_tune(load_tune(config, output_dir=tmp_path / "t"), python=fake_python)
    finally:
        del os.environ["FAKE_STEP_S"]
    pruned = [t for t in study.get_trials() if t.state.name == "PRUNED"]
    assert pruned, [(t.params, t.value) for t in study.get_trials()]
    for t in pruned:  # stopped by SIGTERM at the step it was pruned at, long before the end
        logged = [json.loads(line) for line in (Path(t.user_attrs["run"]) / "log.jsonl").read_text().splitlines()]
        assert t.user_attrs["pruned_at"] < 40 and logged[-1]["step"] < 40
        assert not (Path(t.user_attrs["run"]) / "metrics.json").exists()
    assert counts(study).get("COMPLETE", 0) + len(pruned) == 10
    assert study.get_trials()[0].state.name == "COMPLETE"  # LoRA is never pruned
    # a pruned trial has no final score: the one it was stopped at is its own column, not a trial's score
    from mgpo.pipelines.tune.report import trial_rows

    rows = {r["trial"]: r for r in trial_rows(study)}
    for t in pruned:
        assert rows[t.number]["score"] is None and rows[t.number]["pruned_score"] == t.value


def test_a_study_whose_pruner_cannot_see_the_evaluations_stops_after_its_first_trial(
    tmp_path, sentiment_csv, fake_python, monkeypatch
):
    """How the pruner defect of issue 36 stayed hidden: the evaluations during training were logged under keys
    the watcher did not read, so nothing was pruned and nothing said so. Now a finished trial whose evaluations
    did not all reach the pruner stops the study, naming the steps and the keys it read."""
    config = write_config(tmp_path, sentiment_csv, "{trials: 3, max_steps: 8, evals: 4}")
    monkeypatch.setenv("FAKE_EVAL_PREFIX", "val_")  # not a key mgpo tune reads
    monkeypatch.setenv("FAKE_STEP_S", "0")
    plan = load_tune(config, output_dir=tmp_path / "t")
    with pytest.raises(TrialFailed) as stopped:
        run_tune(plan, python=fake_python)
    said = str(stopped.value)
    assert said.startswith("trial 0: the pruner saw no validation score at step(s) 2, 4, 6 of "), said
    assert "eval_accuracy or validation_accuracy" in said and "tune.pruner=none" in said, said
    # LoRA's trial 0 finished (its score stands); no search trial was started
    assert [(t.user_attrs["arm"], t.state.name) for t in open_study(plan).get_trials()] == [(BASELINE, "COMPLETE")]

    # with the pruner off there is nothing to see, and the same runs finish the study
    off = write_config(tmp_path, sentiment_csv, "{trials: 3, max_steps: 8, evals: 4, pruner: none}", "off.yaml")
    assert counts(run_tune(load_tune(off, output_dir=tmp_path / "off"), python=fake_python)) == {"COMPLETE": 3}


def test_seed_reruns_pair_the_best_settings_with_lora_and_the_verdict_reads_them(tmp_path, sentiment_csv, fake_python):
    config = write_config(tmp_path, sentiment_csv, "{trials: 6, max_steps: 4, evals: 2, top: 2}")
    plan = load_tune(config, output_dir=tmp_path / "t")
    study = run_tune(plan, seeds=3, python=fake_python)
    again = [t for t in study.get_trials() if t.user_attrs.get("phase") == SEEDS]
    assert sorted((t.user_attrs["of"] == 0, t.user_attrs["seed"]) for t in again) == sorted(
        [(True, 1), (True, 2)] + [(False, 1), (False, 2)] * 2
    )
    summary = write_report(plan, study)
    best, lora = summary["best"], summary["lora"]
    assert sorted(best.scores) == sorted(lora.scores) == [0, 1, 2]
    # the stand-in's score differs from LoRA's by the same amount on every seed: a zero-width interval
    assert best.low == pytest.approx(best.high) == pytest.approx(best.diff)
    for name in ("tune.md", "trials.csv", "score-vs-rho.png", "best.yaml"):
        assert (plan.output_dir / name).stat().st_size > 0
    assert summary["verdict"] in (plan.output_dir / "tune.md").read_text()
    # a rerun with the same seeds queues nothing more
    assert len(run_tune(plan, seeds=3, python=fake_python).get_trials()) == len(study.get_trials())


def test_the_verdict_says_when_no_radius_beats_lora(tmp_path, sentiment_csv):
    plan = load_tune(write_config(tmp_path, sentiment_csv, "{trials: 2}"), output_dir=tmp_path / "t")
    lora = Setting(0, BASELINE, {}, {0: 0.80, 1: 0.82, 2: 0.81})
    rows = [
        {
            "trial": 0,
            "arm": BASELINE,
            "phase": SEARCH,
            "seed": s,
            "of": 0,
            "state": "complete",
            "score": v,
            **dict.fromkeys(("rho", "lr", "max_scale", "apn")),
        }
        for s, v in lora.scores.items()
    ]
    noisy = {0: 0.83, 1: 0.80, 2: 0.815}  # +0.03, -0.02, +0.005: no consistent gain
    rows += [
        {
            "trial": 1,
            "arm": "mgpo",
            "phase": SEARCH if s == 0 else SEEDS,
            "seed": s,
            "of": 1,
            "state": "complete",
            "score": v,
            "rho": 0.01,
            "lr": None,
            "max_scale": None,
            "apn": None,
        }
        for s, v in noisy.items()
    ]
    lora_setting, found = settings(rows, maximize=True)
    said = verdict(plan, lora_setting, found)
    assert said.startswith("no radius helps on this task at 100 steps; LoRA is as good") and "3 seeds" in said
    clear = {0: 0.85, 1: 0.86, 2: 0.855}
    for row in rows:
        if row["trial"] == 1:
            row["score"] = clear[row["seed"]]
    lora_setting, found = settings(rows, maximize=True)
    assert "beats LoRA" in verdict(plan, lora_setting, found)
    # a setting scored on one seed only, however high, does not outrank the one its re-runs tested
    lucky = {**rows[-1], "trial": 2, "of": 2, "phase": SEARCH, "seed": 0, "score": 0.95, "rho": 0.03}
    _, found = settings([*rows, lucky], maximize=True)
    assert [s.trial for s in found] == [1, 2]


def test_a_real_study_of_a_tiny_model_through_the_cli(tmp_path, tiny_model_dir, sentiment_csv):
    config = tmp_path / "tiny.yaml"
    config.write_text(f"""
model: {{name: {tiny_model_dir}, max_length: 16}}
data: {{name: {sentiment_csv}, text_column: review, label_column: stars}}
training: {{batch_size: 8, lr: 5.0e-3}}
tune: {{trials: 2, max_steps: 6, evals: 2, top: 1}}
""")
    out = tmp_path / "t"
    result = CliRunner().invoke(app, ["tune", str(config), "--output-dir", str(out), "--seeds", "2", "--workers", "2"])
    assert result.exit_code == 0, result.output
    assert "trial 0 (LoRA, seed 0): complete" in result.output and "verdict: " in result.output
    rows = (out / "trials.csv").read_text().splitlines()
    assert len(rows) == 1 + 5  # LoRA, 2 search trials, LoRA and the best with seed 1
    best = (out / "best.yaml").read_text()
    assert best.startswith("# mgpo tune's best setting") and "rho:" in best
    from mgpo.pipelines.config import load_config

    cfg = load_config(out / "best.yaml")  # ready for mgpo train
    assert cfg.model.name == str(tiny_model_dir) and cfg.perturbation.rho is not None
    report = (out / "tune.md").read_text()
    assert "apn_capped" in report and "| 0 | lora | 0 | complete |" in report
    # the pruner saw each evaluation during training, not only the final one (eval_* rows, then validation_*)
    study = run_tune(load_tune(config, output_dir=out), seeds=2)
    for trial in study.get_trials():
        assert sorted(trial.intermediate_values) == [3, 6], (trial.number, trial.intermediate_values)


@pytest.mark.parametrize(
    "tune,data,message",
    [
        ("{search: {rho: {low: 0, high: 0.1}}}", "", "tune.search.rho: low=0 and high=0.1 must be numbers above 0"),
        ("{search: {rho: {low: 0.1, high: 0.01}}}", "", "low=0.1 must be below high=0.01"),
        ("{search: {beta: {low: 0.5, high: 0.9}}}", "", "unknown parameter 'beta' in tune.search; tunable: rho, lr"),
        ("{search: {apn: [inverse, sometimes]}}", "", "perturbation.apn"),
        ("{trials: 0}", "", "tune.trials=0 must be a whole number of at least 1"),
        ("{tirals: 5}", "", "unknown tune setting 'tirals'"),
        ("{metric: accuracy}", "", "tune.metric='accuracy' is unknown: choose one of task, loss"),
        (
            "{}",
            ", task: causal-lm, prompt_column: review, response_column: stars",
            "it has no validation split of its own: causal-lm runs take their validation loss on the test split",
        ),
    ],
)
def test_bad_input_is_one_line_naming_the_problem(tmp_path, sentiment_csv, tune, data, message):
    config = write_config(tmp_path, sentiment_csv, tune, data=data)
    with pytest.raises(ConfigError, match=None) as err:
        load_tune(config, output_dir=tmp_path / "t")
    assert message in str(err.value)
    result = CliRunner().invoke(app, ["tune", str(config), "--output-dir", str(tmp_path / "t")])
    assert result.exit_code == 2 and "error:" in result.output and "Traceback" not in result.output
    assert not (tmp_path / "t").exists()  # nothing written before the config is known to be good


def test_slurm_workers_get_the_sweeps_resources_but_no_time_limit_signal():
    """Sweeps and tune build their sbatch parameters in one place (executors.slurm_parameters); a tune worker has no
    checkpoint handler, so it is not signalled before its limit (its trial goes back to the queue by heartbeat)."""
    from mgpo.pipelines.executors import SlurmConfig, slurm_parameters

    config = SlurmConfig(partition="gpu", time_min=30, cpus_per_run=4, gpus_per_run=1, mem_gb=8, extra={"qos": "x"})
    sweep = slurm_parameters(config, "mgpo-sweep")
    worker = slurm_parameters(config, "mgpo-tune", signal=False)
    assert sweep["signal_delay_s"] == config.signal_s and "signal_delay_s" not in worker
    assert {k: v for k, v in sweep.items() if k != "signal_delay_s" and k != "job_name"} == {
        k: v for k, v in worker.items() if k != "job_name"
    }
    assert worker["gpus_per_node"] == 1 and worker["mem"] == "8192M" and worker["partition"] == "gpu"
    assert "export OMP_NUM_THREADS=4" in worker["setup"] and worker["additional_parameters"] == {"qos": "x"}


@needs_slurm
def test_two_slurm_workers_share_the_study_and_report_its_counts(tmp_path, local_slurm, sentiment_csv, fake_python):  # noqa: F811
    """The Slurm path end to end on the one-node cluster: two array tasks pull trials from one SQLite study, every
    trial is counted once, and the submitting process reports the search's counts as they change."""
    slurm = "slurm: {partition: debug, time_min: 10, cpus_per_run: 1}"
    config = write_config(tmp_path, sentiment_csv, f"{{trials: 6, max_steps: 6, evals: 2, pruner: none, {slurm}}}")
    said: list[str] = []
    os.environ["FAKE_STEP_S"] = "0.2"  # long enough for the two workers to overlap
    try:
        plan = load_tune(config, output_dir=tmp_path / "t")
        study = run_tune(plan, executor="slurm", workers=2, python=fake_python, say=said.append)
    finally:
        del os.environ["FAKE_STEP_S"]
    assert counts(study) == {"COMPLETE": 6}
    runs = [t.user_attrs["run"] for t in study.get_trials()]
    assert len(runs) == len(set(runs)) == 7  # LoRA and 6 search trials, one folder each
    assert said and said[-1] == "search trials: 6 complete", said
    jobs = {record(Path(run))["job_id"] for run in runs}  # the array task each trial trained in
    assert len(jobs) == 2 and {job.split("_")[1] for job in jobs} == {"0", "1"}, jobs
    # a rerun of the finished study submits workers that find nothing to do
    assert counts(run_tune(plan, executor="slurm", workers=1, python=fake_python, say=said.append)) == {"COMPLETE": 6}


@pytest.mark.parametrize(("name", "folder"), [("tune-tweets.yaml", "tune-tweets"), ("mine.yaml", "tune-mine")])
def test_the_default_tune_folder_is_named_after_the_config(tmp_path, sentiment_csv, name, folder):
    config = write_config(tmp_path, sentiment_csv, "{trials: 2}", name=name)
    assert load_tune(config).output_dir == Path("runs") / folder
