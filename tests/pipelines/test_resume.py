"""No run lost: resume after a kill at any moment of a checkpoint write, damaged checkpoint files, torn and
interrupted log writes, --restart, a failed start, and a diverging run (non-zero exit, last good checkpoint kept).

The states a kill leaves are made directly (an emptied folder, a file removed or cut short), which reproduces
each one exactly, where a real SIGKILL would hit it only by chance."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
from safetensors.torch import load_file
from typer.testing import CliRunner

from mgpo.cli import app
from mgpo.pipelines import checkpoints as ck
from mgpo.pipelines.config import ConfigError, changed_fields, load_config
from mgpo.pipelines.train import StepLog, read_log, start_checkpoint, train
from tests.pipelines.test_train import overrides, sentiment_csv, tiny_model_dir  # noqa: F401  (fixtures)

STEPS = 12  # checkpoints every 4 steps; the Trainer keeps the last two (8 and 12)


def run_args(model_dir, csv, out, *extra):
    return overrides(model_dir, csv, out, f"training.max_steps={STEPS}", "training.logging_steps=2", *extra)


@pytest.fixture(scope="module")
def finished_run(tiny_model_dir, sentiment_csv, tmp_path_factory) -> Path:
    """An uninterrupted run: the reference every resumed run must match bit for bit."""
    out = tmp_path_factory.mktemp("reference") / "run"
    train(load_config(None, run_args(tiny_model_dir, sentiment_csv, out)))
    return out


def copy_run(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def truncate(path: Path) -> None:
    os.truncate(path, path.stat().st_size // 2)


DAMAGE = {  # what a kill during a save (or a damaged disk) leaves in the newest checkpoint -> the problem named
    "empty folder": (lambda c: [p.unlink() for p in c.iterdir()], "no model weights"),
    "no trainer_state.json": (lambda c: (c / "trainer_state.json").unlink(), "trainer_state.json is missing"),
    "truncated adapter": (lambda c: truncate(c / "adapter_model.safetensors"), "adapter_model.safetensors"),
    "truncated optimizer.pt": (lambda c: truncate(c / "optimizer.pt"), "optimizer.pt"),
    "truncated scheduler.pt": (lambda c: truncate(c / "scheduler.pt"), "scheduler.pt"),
    "truncated rng_state.pth": (lambda c: truncate(c / "rng_state.pth"), "rng_state.pth"),
    "no rng_state.pth": (lambda c: (c / "rng_state.pth").unlink(), "rng_state.pth is missing"),
    "truncated trainer_state.json": (lambda c: truncate(c / "trainer_state.json"), "trainer_state.json"),
    "emptied wall-time file": (lambda c: (c / ck.WALL_TIME_FILE).write_text(""), f"{ck.WALL_TIME_FILE} is empty"),
    "no wall-time file": (lambda c: (c / ck.WALL_TIME_FILE).unlink(), f"{ck.WALL_TIME_FILE} is missing"),
}


def test_the_reference_checkpoints_are_complete(finished_run):
    found, bad = ck.newest_complete(finished_run / "checkpoints")
    assert found.name == f"checkpoint-{STEPS}" and bad == []
    assert ck.checkpoint_problem(finished_run / "checkpoints" / "checkpoint-8") is None


@pytest.mark.parametrize("damage", list(DAMAGE))
def test_resume_skips_a_damaged_newest_checkpoint_naming_the_file(finished_run, tmp_path, capsys, damage):
    out = copy_run(finished_run, tmp_path / "run")
    spoil, problem = DAMAGE[damage]
    spoil(out / "checkpoints" / f"checkpoint-{STEPS}")
    chosen = start_checkpoint(out, resume=True, restart=False, main=True)
    assert Path(chosen).name == "checkpoint-8"
    said = capsys.readouterr().out
    assert f"skipping checkpoint-{STEPS}: " in said and problem in said, said
    assert f"damaged-checkpoint-{STEPS}" in said and (out / "checkpoints" / f"damaged-checkpoint-{STEPS}").is_dir()
    assert len([line for line in said.splitlines() if "skipping" in line]) == 1


def test_no_complete_checkpoint_says_how_to_start_over(finished_run, tmp_path):
    out = copy_run(finished_run, tmp_path / "run")
    for c in (out / "checkpoints").iterdir():
        (c / "optimizer.pt").unlink()
    with pytest.raises(FileNotFoundError, match="no complete checkpoint") as err:
        start_checkpoint(out, resume=True, restart=False, main=True)
    assert "optimizer.pt is missing" in str(err.value) and "--restart" in str(err.value)


def test_a_run_folder_is_refused_without_resume_and_restart_discards_only_our_files(finished_run, tmp_path, capsys):
    out = copy_run(finished_run, tmp_path / "run")
    (out / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="--restart"):
        start_checkpoint(out, resume=False, restart=False, main=True)
    with pytest.raises(ValueError, match="contradict"):
        start_checkpoint(out, resume=True, restart=True, main=True)
    assert start_checkpoint(out, resume=False, restart=True, main=True) is None
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt"]
    assert "removed" in capsys.readouterr().out


def test_resume_refuses_another_configuration_naming_the_field(finished_run, tiny_model_dir, sentiment_csv, tmp_path):
    out = copy_run(finished_run, tmp_path / "run")
    (out / "metrics.json").unlink()
    saved = (out / "config.yaml").read_text()
    with pytest.raises(ConfigError, match=r"training.lr: 0.005 -> 0.1\).*--restart"):  # the length alone may change
        train(
            load_config(None, run_args(tiny_model_dir, sentiment_csv, out, "training.lr=0.1", "training.max_steps=20")),
            resume=True,
        )
    assert (out / "config.yaml").read_text() == saved  # refused before anything was written
    # where the folder is, progress display and diagnostics are not part of the run
    moved = out.rename(tmp_path / "moved")
    cfg = load_config(
        None, run_args(tiny_model_dir, sentiment_csv, moved, "training.progress=true", "perturbation.diagnostics=true")
    )
    assert changed_fields(moved / "config.yaml", cfg) == {}
    (moved / "config.yaml").write_text("model: [\n")
    assert "does not read as a configuration" in changed_fields(moved / "config.yaml", cfg)[str(moved / "config.yaml")]


def test_a_finished_fsdp_run_is_refused_rather_than_trained_a_step_past_its_end(
    finished_run, tiny_model_dir, sentiment_csv, tmp_path, monkeypatch
):
    """Under FSDP the checkpoint cannot be evaluated without training (GPU only, so the two processes and the GPU
    are stood in for): --resume of a run whose training finished says so instead of training one more step."""
    from mgpo.pipelines import ranks
    from mgpo.pipelines.config import to_yaml

    out = copy_run(finished_run, tmp_path / "run")
    (out / "metrics.json").unlink()
    cfg = load_config(None, run_args(tiny_model_dir, sentiment_csv, out, "distributed.strategy=fsdp"))
    (out / "config.yaml").write_text(to_yaml(cfg))
    monkeypatch.setattr(ranks, "world_size", lambda: 2)
    monkeypatch.setattr(ranks, "cuda_available", lambda: True)
    with pytest.raises(ConfigError, match=r"whole training.*fsdp.*--restart"):
        train(cfg, resume=True)
    assert not (out / "metrics.json").exists()


def tensorboard_points(folder: Path, tag: str) -> list[int]:
    """The steps of ``tag`` as TensorBoard shows them: the event files in order, a restart's purge applied."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(folder), purge_orphaned_data=True)
    acc.Reload()
    return [e.step for e in acc.Scalars(tag)]


def test_resumed_after_a_kill_sequence_matches_the_uninterrupted_run(
    finished_run, tiny_model_dir, sentiment_csv, tmp_path
):
    """The state of a run killed during its last checkpoint save, after its log had rows past the checkpoint
    before, a torn last line and a summary row from a session that had finished: --resume falls back to
    checkpoint-8, and the adapter, log and TensorBoard points equal those of the run never interrupted."""
    out = copy_run(finished_run, tmp_path / "run")
    for name in ("adapter", "metrics.json", "loss.png"):  # killed before the end of the run was written
        shutil.rmtree(out / name) if (out / name).is_dir() else (out / name).unlink()
    DAMAGE["no trainer_state.json"][0](out / "checkpoints" / f"checkpoint-{STEPS}")
    with (out / "log.jsonl").open("a") as f:
        f.write('{"step": 12, "train_runtime": 1.0}\n{"step": 12, "lo')  # a summary row, then a torn line
    metrics = train(load_config(None, run_args(tiny_model_dir, sentiment_csv, out)), resume=True)
    assert metrics["steps"] == STEPS

    reference = load_file(finished_run / "adapter" / "adapter_model.safetensors")
    resumed = load_file(out / "adapter" / "adapter_model.safetensors")
    assert reference.keys() == resumed.keys()
    for name, tensor in reference.items():
        assert tensor.equal(resumed[name]), name  # bit-identical
    rows = read_log(out / "log.jsonl")
    assert [r["step"] for r in rows if "loss" in r] == list(range(2, STEPS + 1, 2))  # no gap, no duplicate
    assert sum("train_runtime" in r for r in rows) == 1
    assert [r["loss"] for r in rows if "loss" in r] == [
        r["loss"] for r in read_log(finished_run / "log.jsonl") if "loss" in r
    ]
    csv_steps = [line.split(",")[0] for line in (out / "log.csv").read_text().splitlines()[1:]]
    assert csv_steps == [str(s) for s in range(2, STEPS + 1, 2)]
    assert tensorboard_points(out / "tensorboard", "train/loss") == list(range(2, STEPS + 1, 2))


def test_a_torn_last_log_line_is_dropped_with_a_warning_a_damaged_middle_line_is_named(tmp_path):
    log = tmp_path / "log.jsonl"
    log.write_text('{"step": 1, "loss": 0.5}\n{"step": 2, "lo')
    with pytest.warns(RuntimeWarning, match="log.jsonl: its last line is incomplete"):
        assert read_log(log) == [{"step": 1, "loss": 0.5}]
    log.write_text('{"step": 1, "lo\n{"step": 2, "loss": 0.5}\n')
    with pytest.raises(ValueError, match="log.jsonl, line 1"):
        read_log(log)


def test_an_interrupted_log_rewrite_loses_no_row(tmp_path, monkeypatch):
    """The rewrite at a session's start (cutting the log to its checkpoint) goes to a temporary file first: a
    kill before the rename leaves the old log whole (the old code truncated it first: 0 bytes)."""
    from types import SimpleNamespace

    out = tmp_path
    rows = "".join(json.dumps({"step": s, "loss": 1.0 / s}) + "\n" for s in range(1, 9))
    (out / "log.jsonl").write_text(rows)

    def killed(*args):
        raise KeyboardInterrupt  # the process dies between writing the new file and renaming it

    monkeypatch.setattr(ck.os, "replace", killed)
    with pytest.raises(KeyboardInterrupt):
        StepLog(out).on_train_begin(None, SimpleNamespace(is_world_process_zero=True, global_step=4), None)
    assert (out / "log.jsonl").read_text() == rows


def test_a_start_that_fails_removes_the_folder_it_created_and_keeps_one_that_existed(
    tiny_model_dir, sentiment_csv, tmp_path
):
    out = tmp_path / "new"
    with pytest.raises(Exception):
        train(load_config(None, overrides(tiny_model_dir, sentiment_csv, out, "model.name=/nonexistent/model")))
    assert not out.exists()
    kept = tmp_path / "existing"
    kept.mkdir()
    with pytest.raises(Exception):
        train(load_config(None, overrides(tiny_model_dir, sentiment_csv, kept, "model.name=/nonexistent/model")))
    assert kept.is_dir()


@pytest.fixture(scope="module")
def exploding_csv(tmp_path_factory) -> Path:
    """A regression target near float32's largest value: every step's squared error overflows to inf."""
    rows = ["review,score"] + [f"the movie was good,{3e38 if i % 2 else -3e38}" for i in range(64)]
    path = tmp_path_factory.mktemp("data") / "exploding.csv"
    path.write_text("\n".join(rows) + "\n")
    return path


@pytest.mark.parametrize("preset", ["lora-mgpo", "lora"])
def test_a_diverging_run_exits_3_naming_the_step_and_keeps_the_last_good_checkpoint(
    tiny_model_dir, exploding_csv, tmp_path, preset
):
    """Every step is non-finite: with max_skipped_steps=2 the run stops at step 3, exit status 3, the step and the
    last good checkpoint named, nothing saved from step 3 (no checkpoint, adapter or metrics)."""
    out = tmp_path / "run"
    args = overrides(
        tiny_model_dir,
        exploding_csv,
        out,
        "data.task=regression",
        "data.label_column=score",
        f"perturbation.preset={preset}",
        "training.max_skipped_steps=2",
        "training.save_steps=1",
        "training.max_steps=20",
    )
    result = CliRunner().invoke(app, ["train", *args], env={"COLUMNS": "400"})
    assert result.exit_code == 3, result.output
    assert "diverged at step 3: 3 steps had a non-finite" in result.output, result.output
    assert "checkpoints/checkpoint-2, is kept" in result.output and "Traceback" not in result.output
    assert not (out / "adapter").exists() and not (out / "metrics.json").exists()
    assert [c.name for c in ck.checkpoints(out / "checkpoints")] == ["checkpoint-2", "checkpoint-1"]


def test_non_finite_weights_stop_at_once_and_every_skip_is_counted():
    """Plain AdamW cannot skip a NaN gradient: its weights take it, and that step ends the run whatever the
    patience. A perturbation optimizer's skipped steps count one each."""
    from types import SimpleNamespace

    import torch

    import mgpo
    from mgpo.pipelines.train import DivergenceStop

    model = torch.nn.Linear(3, 2)
    stop = DivergenceStop(patience=10)
    stop.on_train_begin(None, None, None, optimizer=torch.optim.AdamW(model.parameters()))
    control = SimpleNamespace(should_training_stop=False, should_save=True, should_evaluate=True)
    stop.on_step_end(None, SimpleNamespace(global_step=1), control, model=model)
    assert stop.diverged is None and control.should_save
    with torch.no_grad():
        model.weight[0, 0] = float("nan")
    stop.on_step_end(None, SimpleNamespace(global_step=2), control, model=model)
    assert stop.diverged[0] == 2 and "weights hold NaN" in stop.diverged[1]
    assert control.should_training_stop and not control.should_save and not control.should_evaluate

    model = torch.nn.Linear(3, 2)
    opt = mgpo.MGPO(model, lr=1e-2, rho=0.05, perturb_non_lora=True)
    stop = DivergenceStop(patience=1)
    stop.on_train_begin(None, None, None, optimizer=opt)
    for step in (1, 2):
        model(torch.full((1, 3), float("nan"))).sum().backward()
        opt.step()
        opt.zero_grad()
        stop.on_step_end(None, SimpleNamespace(global_step=step), control, model=model, optimizer=opt)
    assert (
        opt.skipped_steps == 2
        and stop.diverged[0] == 2
        and "more than training.max_skipped_steps=1" in stop.diverged[1]
    )


def test_resumed_after_its_training_had_finished_trains_no_further_step(
    finished_run, tiny_model_dir, sentiment_csv, tmp_path
):
    """Stopped (Ctrl-C, a kill) in the evaluation after training, with the last checkpoint at max_steps: --resume
    trained a step past it (the Trainer checks the limit after a step), saved checkpoint-13, logged and counted it
    (metrics.json: steps 13), and gave the session's whole time as time_per_step_s of that one step. Now it
    evaluates the checkpoint as it is."""
    out = copy_run(finished_run, tmp_path / "run")
    for name in ("adapter", "metrics.json", "loss.png"):
        shutil.rmtree(out / name) if (out / name).is_dir() else (out / name).unlink()
    with (out / "log.jsonl").open("a") as f:
        f.write('{"step": 12, "validation_loss": 0.5}\n')  # the evaluation the stop cut short
    metrics = train(load_config(None, run_args(tiny_model_dir, sentiment_csv, out)), resume=True)
    reference = json.loads((finished_run / "metrics.json").read_text())
    assert metrics["steps"] == STEPS and not (out / "checkpoints" / f"checkpoint-{STEPS + 1}").exists()
    assert metrics["test_accuracy"] == reference["test_accuracy"] and metrics["test_loss"] == reference["test_loss"]
    assert metrics["time_per_step_s"] is None and metrics["peak_memory_mb"] is None  # no step measured
    adapter, resumed = (load_file(d / "adapter" / "adapter_model.safetensors") for d in (finished_run, out))
    assert all(adapter[k].equal(resumed[k]) for k in adapter)
    rows, before = read_log(out / "log.jsonl"), read_log(finished_run / "log.jsonl")
    assert [r for r in rows if "loss" in r] == [r for r in before if "loss" in r]
    assert sum("train_runtime" in r for r in rows) == 1 and sum("validation_loss" in r for r in rows) == 1


def test_a_finished_run_resumed_to_train_longer_is_unfinished_until_it_writes_new_results(
    finished_run, tiny_model_dir, sentiment_csv, tmp_path, monkeypatch, capsys
):
    """--resume with a longer training.max_steps on a finished run: its old metrics.json said "done" (to sweeps
    and reports, beside the new, longer curve) for as long as the session ran, and for good if it failed. It is
    moved aside first."""
    from mgpo.pipelines import train as train_module

    out = copy_run(finished_run, tmp_path / "run")

    def fail(*args, **kwargs):
        raise RuntimeError("the session failed after training")

    monkeypatch.setattr(train_module, "_finish", fail)
    with pytest.raises(RuntimeError, match="failed after training"):
        train(
            load_config(None, run_args(tiny_model_dir, sentiment_csv, out, f"training.max_steps={STEPS + 2}")),
            resume=True,
        )
    assert not (out / "metrics.json").exists() and (out / "metrics.superseded.json").is_file()
    assert "counts as unfinished until this session writes its results" in capsys.readouterr().out


def test_early_stopping_resumed_mid_way_stops_where_the_uninterrupted_run_did(tiny_model_dir, sentiment_csv, tmp_path):
    """Killed after an evaluation that did not improve (patience counter 1 of 2), then resumed: the run stops at
    the step the uninterrupted one stopped at, not one patience later."""

    def args(out, steps):
        return overrides(
            tiny_model_dir,
            sentiment_csv,
            out,
            f"training.max_steps={steps}",
            "training.lr=5e-2",
            "training.lr_scheduler=constant",
            "training.warmup_ratio=0",
            "training.eval_steps=2",
            "training.save_steps=2",
            "training.early_stopping_patience=2",
            "training.clean_loss_examples=16",
        )

    out = tmp_path / "run"
    first = train(load_config(None, args(out, 60)))
    assert first["stopped_early"] and first["steps"] < 60
    # the checkpoint one evaluation before the stop (rotated away in `out`, which keeps the best and the last):
    # the same run cut there (a constant learning rate does not depend on max_steps)
    cut = tmp_path / "cut"
    train(load_config(None, args(cut, first["steps"] - 2)))
    before = cut / "checkpoints" / f"checkpoint-{first['steps'] - 2}"
    state = json.loads((before / "trainer_state.json").read_text())
    assert state["stateful_callbacks"]["EarlyStoppingCallback"]["attributes"]["early_stopping_patience_counter"] == 1
    shutil.rmtree(out / "checkpoints" / f"checkpoint-{first['steps']}")
    shutil.copytree(before, out / "checkpoints" / before.name)
    (out / "metrics.json").unlink()
    again = train(load_config(None, args(out, 60)), resume=True)
    assert again["stopped_early"] is True and again["steps"] == first["steps"]


def test_resumed_after_early_stopping_had_ended_it_trains_no_further_step(tiny_model_dir, sentiment_csv, tmp_path):
    """Early stopping ended the run at step N (checkpoint-N written), then the evaluation was stopped: --resume
    trained on to the next evaluation (N + eval_steps) and reported that as the run's steps."""
    out = tmp_path / "run"
    args = overrides(
        tiny_model_dir,
        sentiment_csv,
        out,
        "training.max_steps=40",
        "training.lr=5e-2",
        "training.lr_scheduler=constant",
        "training.warmup_ratio=0",
        "training.eval_steps=2",
        "training.save_steps=2",
        "training.load_best_model=true",
        "training.early_stopping_patience=1",
        "training.clean_loss_examples=16",
    )
    first = train(load_config(None, args))
    assert first["stopped_early"] and first["steps"] < 40
    (out / "metrics.json").unlink()
    again = train(load_config(None, args), resume=True)
    assert again["steps"] == first["steps"] and again["stopped_early"] is True
    assert again["best_checkpoint"] == first["best_checkpoint"] and again["test_loss"] == first["test_loss"]
    assert max(int(c.name.split("-")[1]) for c in (out / "checkpoints").iterdir()) == first["steps"]


def test_resumed_epoch_run_with_grad_accum_trains_its_last_partial_step(tiny_model_dir, sentiment_csv, tmp_path):
    """128 training rows in batches of 8 with grad_accum=3: 16 micro-batches, and the Trainer takes 6 optimizer
    steps per epoch (the last one over the 1 micro-batch left). mgpo counted 16 // 3 = 5, so --resume from
    checkpoint-5 took the run for finished and evaluated it without its last step."""
    out = tmp_path / "run"
    args = overrides(
        tiny_model_dir,
        sentiment_csv,
        out,
        "training.max_steps=-1",
        "training.epochs=1",
        "training.grad_accum=3",
        "training.save_steps=5",
        "training.clean_loss_examples=16",
    )
    first = train(load_config(None, args))
    assert first["steps"] == 6
    shutil.rmtree(out / "checkpoints" / "checkpoint-6")
    (out / "metrics.json").unlink()
    again = train(load_config(None, args), resume=True)
    assert again["steps"] == 6 and (out / "checkpoints" / "checkpoint-6").is_dir()
