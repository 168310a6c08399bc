"""The CLI tells the user's mistakes from mgpo's: only input errors (a config, data or argument problem, in a
message mgpo composed) are one line with exit 2; an error raised inside a library, or by an operation in mgpo's
own code, is an internal error: its traceback, a line asking for a report, exit 70."""

from __future__ import annotations

import subprocess
import sys

import numpy
from typer.testing import CliRunner

import mgpo.pipelines.report as report
from mgpo.cli import INTERNAL_ERROR, app
from tests.pipelines.test_train import sentiment_csv, tiny_model_dir  # noqa: F401 (fixtures)


def test_a_config_problem_is_one_line_with_exit_2(tmp_path):
    result = CliRunner().invoke(app, ["config", "training.lr=-1"])
    assert result.exit_code == 2 and "error:" in result.output and "Traceback" not in result.output
    assert "training.lr" in result.output


def test_a_library_value_error_is_an_internal_error_with_its_traceback(tmp_path, monkeypatch):
    # what issue 35 saw: a ValueError from numpy inside the report read as "error: number sections must be larger
    # than 0." with exit 2, as if the user had done something wrong
    monkeypatch.setattr(report, "make_report", lambda *a, **k: numpy.array_split([1, 2], 0))
    result = CliRunner().invoke(app, ["report", str(tmp_path)])
    assert result.exit_code == INTERNAL_ERROR, result.output
    assert "Traceback" in result.output and "array_split" in result.output
    assert "internal error (ValueError)" in result.output and "issue tracker" in result.output


def test_an_operation_failing_in_mgpo_code_is_internal_too(tmp_path, monkeypatch):
    def bug(*args, **kwargs):
        return range(None)  # a TypeError no mgpo message composed ('NoneType' object cannot be interpreted ...)

    monkeypatch.setattr(report, "make_report", bug)
    result = CliRunner().invoke(app, ["report", str(tmp_path)])
    assert result.exit_code == INTERNAL_ERROR and "internal error (TypeError)" in result.output


def test_an_unexpected_exception_outside_the_handled_types_exits_70_from_the_command_line(tmp_path):
    code = (
        "import sys, mgpo.pipelines.report as r\n"
        "def boom(*a, **k): raise KeyError('x')\n"
        "r.make_report = boom\n"
        "from mgpo.cli import main\n"
        f"sys.argv = ['mgpo', 'report', {str(tmp_path)!r}]\n"
        "main()\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == INTERNAL_ERROR, out.stderr[-2000:]
    assert "Traceback" in out.stderr and "KeyError" in out.stderr and "issue tracker" in out.stderr


def test_a_full_disk_while_checkpointing_names_the_folder_the_last_checkpoint_and_resume(
    tmp_path, monkeypatch, tiny_model_dir, sentiment_csv
):
    import errno

    import torch

    from tests.pipelines.test_train import overrides

    real_save = torch.save

    def save(obj, f, *args, **kwargs):
        if "checkpoint-8" in str(f):
            raise OSError(errno.ENOSPC, "No space left on device", str(f))
        return real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", save)
    out = tmp_path / "run"
    args = ["train", *overrides(tiny_model_dir, sentiment_csv, out)]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 1, result.output
    said = "".join(result.output.split())  # rich wraps the line anywhere, paths included

    def has(text):
        return "".join(text.split()) in said

    assert has(f"the disk is full (or over its quota) while writing {out}")
    assert has(f"the last complete checkpoint is {out / 'checkpoints' / 'checkpoint-4'}")
    assert has("--resume") and "Traceback" not in result.output
    monkeypatch.setattr(torch, "save", real_save)  # space freed: the run resumes from checkpoint-4 and finishes
    resumed = CliRunner().invoke(app, [*args, "--resume"])
    assert resumed.exit_code == 0, resumed.output
    assert (out / "metrics.json").is_file()
