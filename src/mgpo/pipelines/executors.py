"""Where a sweep's runs train: here, one after another or N at a time (``local``), or on a Slurm cluster, one
array job per submission (``slurm``, through submitit).

Every executor runs a run the same way (:func:`train_run`: ``python -m mgpo train ... --resume`` when the run
folder holds a complete checkpoint, else ``--restart``) and leaves the same record in the run folder,
``sweep-run.json`` (state, error, log, job id, host), next to what ``mgpo train`` writes. The run folders are the
one source of truth: ``mgpo sweep SPEC --status`` reads them (and the scheduler, where it answers), and
resubmitting a sweep submits only the runs that are not complete.

States: ``done``, ``running``, ``queued`` (submitted, not started), ``partial`` (a checkpoint to resume from),
``interrupted`` (stopped by a signal, Ctrl-C, ``scancel``, preemption or a time limit, or killed outright: never
failed), ``failed``
(with the last line of its error and its log), ``new``.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import threading
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass, fields
from pathlib import Path

from mgpo.pipelines.checkpoints import checkpoint_number, newest_complete, read_json, write_json
from mgpo.pipelines.config import ConfigError, _help

EXECUTORS = ("local", "slurm")
RECORD = "sweep-run.json"  # the executor's record of a run, in its folder
# Exit codes of a run stopped on request, not failed: mgpo train's own (after its checkpoint), or the signal
# itself (negative: the signal arrived before training installed its handler).
STOPPED = {
    130: "SIGINT",
    143: "SIGTERM",
    -signal.SIGINT: "SIGINT",
    -signal.SIGTERM: "SIGTERM",
    -signal.SIGHUP: "SIGHUP",
}


@dataclass
class SlurmConfig:
    """Each run's resources on a Slurm cluster: one task of the sweep's array job (``slurm:`` in a sweep file)."""

    partition: str | None = _help("Partition (sbatch --partition); unset: the cluster's default.", None)
    account: str | None = _help("Account charged (sbatch --account).", None)
    qos: str | None = _help("Quality of service (sbatch --qos).", None)
    time_min: int = _help(
        "Time limit of each run in minutes. A run that reaches it is told signal_s before, "
        "writes a checkpoint, is requeued and resumes.",
        240,
    )
    gpus_per_run: int = _help("GPUs of each run (sbatch --gpus-per-node): 0 or 1 (a run is one process).", 0)
    cpus_per_run: int = _help("CPU cores of each run (sbatch --cpus-per-task); also its torch threads.", 1)
    mem_gb: float | None = _help("Memory of each run in GB (sbatch --mem); unset: the partition's default.", None)
    parallelism: int = _help("Runs of the array at once (sbatch --array=...%N); 0: as many as the cluster gives.", 0)
    signal_s: int = _help(
        "Seconds before the time limit at which a run is signalled to checkpoint and requeue: "
        "room for one step and one checkpoint.",
        120,
    )
    max_requeues: int = _help(
        "How often a run may be requeued after its time limit before it is left "
        "interrupted (preemptions do not count).",
        20,
    )
    setup: list = _help("Shell lines run before each run (module load ..., source venv/bin/activate).", factory=list)
    extra: dict = _help("More sbatch parameters, e.g. {constraint: a100, exclude: node7}.", factory=dict)

    @classmethod
    def from_spec(cls, spec_path, value) -> SlurmConfig:
        if value is None:
            return cls()
        if not isinstance(value, dict):
            raise ConfigError(f"sweep {str(spec_path)!r}: `slurm:` must map settings to values, not {value!r}.")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(value) - known)
        if unknown:
            raise ConfigError(
                f"sweep {str(spec_path)!r}: unknown slurm setting {unknown[0]!r}; settings: "
                f"{', '.join(sorted(known))} (anything else sbatch takes goes in `extra:`)."
            )
        config = cls(**value)
        for name in ("time_min", "cpus_per_run"):
            if not (isinstance(getattr(config, name), int) and getattr(config, name) >= 1):
                raise ConfigError(
                    f"sweep {str(spec_path)!r}: slurm.{name}={getattr(config, name)!r} must be a "
                    "whole number of at least 1."
                )
        if isinstance(config.gpus_per_run, int) and config.gpus_per_run > 1:
            raise ConfigError(
                f"sweep {str(spec_path)!r}: slurm.gpus_per_run={config.gpus_per_run}: each run trains "
                "in one process on one GPU here (a run on several GPUs, e.g. full fine-tuning at 7B, "
                "goes through torchrun: docs/distributed.md); use gpus_per_run: 1."
            )
        for name in ("gpus_per_run", "parallelism", "signal_s", "max_requeues"):
            if not (isinstance(getattr(config, name), int) and getattr(config, name) >= 0):
                raise ConfigError(
                    f"sweep {str(spec_path)!r}: slurm.{name}={getattr(config, name)!r} must be a "
                    "whole number of at least 0."
                )
        return config


# ----------------------------------------------------------------------------- one run, any executor


def record(out: Path) -> dict:
    """The executor's record of a run (empty when it has none)."""
    try:
        return read_json(out / RECORD) if (out / RECORD).is_file() else {}
    except ValueError:
        return {}


def write_record(out: Path, **values) -> None:
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / RECORD, {**record(out), **values, "updated": time.time()})


def run_state(out: Path) -> str:
    """done (metrics.json written), partial (a complete checkpoint to resume from) or new."""
    if (out / "metrics.json").is_file():
        return "done"
    return "partial" if newest_complete(out / "checkpoints")[0] is not None else "new"


def resume_step(out: Path) -> int | None:
    """The step of the newest complete checkpoint, or None."""
    newest = newest_complete(out / "checkpoints")[0]
    return None if newest is None else checkpoint_number(newest)


def error_tail(log: Path, lines: int = 6) -> str:
    """The last ``lines`` lines of the log, or from its last error line when that is further back (a wrapped
    error message, a traceback's last exception)."""
    text = log.read_text(errors="replace").strip().splitlines() if log.is_file() else []
    # drop progress bars and the command line the log starts each attempt with
    useful = [line for line in text if line.strip() and "%|" not in line and not line.startswith("$ ")][-40:]
    start = next((i for i in range(len(useful) - 1, -1, -1) if _ERROR.match(useful[i].strip())), len(useful))
    return "\n".join(useful[min(start, max(0, len(useful) - lines)) :]) or "no output"


# mgpo's own error line, or an exception's (after the "exit code N: " the record puts first)
_ERROR = re.compile(r"^(?:exit code -?\d+: )?((?:error:|[A-Za-z_.]*(?:Error|Exception|Interrupt)\b.*:).*)")


def error_line(error: str) -> str:
    """The error's own message in one line: from the last ``error: ...`` line mgpo prints (wrapped to the
    terminal's width) or the last exception line of a traceback, else the last line."""
    lines = [line.strip() for line in error.strip().splitlines() if line.strip()]
    for i in range(len(lines) - 1, -1, -1):
        found = _ERROR.match(lines[i])
        if found:
            return " ".join([found.group(1), *lines[i + 1 :]])
    return lines[-1] if lines else ""


@dataclass
class Outcome:
    status: str  # done, resumed, failed, interrupted
    error: str | None = None
    wall_s: float | None = None
    code: int | None = None


def train_command(python: str, base: Path | None, overrides: list[str], state: str) -> list[str]:
    # a partial run resumes from its newest complete checkpoint; what a run killed before its first one left is
    # discarded (--restart removes mgpo train's files only, not train.out)
    return [
        python,
        "-m",
        "mgpo",
        "train",
        *([str(base)] if base else []),
        *overrides,
        "training.progress=false",
        "--resume" if state == "partial" else "--restart",
    ]


def train_run(
    python: str,
    base: Path | None,
    overrides: list[str],
    out: Path,
    env: dict | None = None,
    started_proc=None,
    ignore=(),
    **where,
) -> Outcome:
    """Train one run in its own process, its output appended to ``out/train.out``; record how it ended.

    ``started_proc(proc)`` is called with the process once it runs (to signal it); ``ignore``: signals the
    training process ignores; ``where`` goes into the record (job id, host)."""
    state = run_state(out)
    command = train_command(python, base, overrides, state)
    out.mkdir(parents=True, exist_ok=True)
    log = out / "train.out"
    write_record(out, state="running", error=None, log=str(log), host=socket.gethostname(), **where)
    started = time.time()
    with log.open("a") as f:
        f.write(f"$ {' '.join(command)}\n")
        f.flush()
        ignoring = (lambda: [signal.signal(sig, signal.SIG_IGN) for sig in ignore]) if ignore else None
        proc = subprocess.Popen(command, stdout=f, stderr=subprocess.STDOUT, env=env, preexec_fn=ignoring)
        write_record(out, pid=proc.pid)  # --status tells a run still training from one killed outright
        if started_proc is not None:
            started_proc(proc)
        try:
            code = proc.wait()
        except KeyboardInterrupt:  # the run got the Ctrl-C too: let it write its checkpoint and stop
            proc.wait()
            write_record(out, state="interrupted", error="stopped by SIGINT")
            raise
    wall = round(time.time() - started, 1)
    if (out / "metrics.json").is_file():
        write_record(out, state="done", error=None)
        return Outcome("resumed" if state == "partial" else "done", None, wall, code)
    if code in STOPPED:
        # the run itself was stopped by SIGINT/SIGTERM/SIGHUP: in training it wrote a checkpoint and exited
        # 130/143; before training (loading, resuming) the signal ended it at once, with nothing to lose
        error = f"exit code {code}: stopped by {STOPPED[code]}"
        write_record(out, state="interrupted", error=error)
        return Outcome("interrupted", error, wall, code)
    error = f"exit code {code}: {error_tail(log)}"
    write_record(out, state="failed", error=error)
    return Outcome("failed", error, wall, code)


# ----------------------------------------------------------------------------- local: here, N at a time


def threads_env(threads: int) -> dict:
    """torch's CPU threads for a run. Records are bit-identical across executors only when each run gets the
    same number: a float sum split over other thread counts rounds otherwise."""
    return {"OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}


def device_envs(workers: int, threads: int = 0) -> list[dict | None]:
    """One environment per worker: its own GPU (CUDA_VISIBLE_DEVICES) where there are GPUs, else an equal share
    of the CPU cores as torch threads (``threads`` each when set)."""
    env = dict(os.environ)
    if workers == 1:  # this process's environment, as one run at a time always had
        return [{**env, **threads_env(threads)} if threads else None]
    import torch

    gpus = torch.cuda.device_count()
    if gpus:
        visible = os.environ.get("CUDA_VISIBLE_DEVICES")
        ids = visible.split(",") if visible else [str(i) for i in range(gpus)]
        if workers > len(ids):
            raise ConfigError(
                f"--workers {workers}: each run gets a GPU of its own, and {len(ids)} are visible "
                f"({', '.join(ids)}); use --workers {len(ids)} or fewer."
            )
        extra = threads_env(threads) if threads else {}
        return [{**env, **extra, "CUDA_VISIBLE_DEVICES": ids[i]} for i in range(workers)]
    threads = threads or max(1, (os.cpu_count() or 1) // workers)
    return [{**env, **threads_env(threads)} for _ in range(workers)]


def run_local(sweep, workers: int, python: str, report, write_index, threads: int = 0) -> None:
    """Train the sweep's unfinished runs here, ``workers`` at a time (each in its own process with its own device).

    ``report(run, outcome)`` says what happened (outcome None: skipped, finished before); ``write_index(sweep)``
    saves the sweep's index. A run stopped by a signal stops the sweep: no new run starts, the others running
    finish (or stop, when the signal reached them too), and KeyboardInterrupt is raised."""
    envs = device_envs(workers, threads)
    free = list(range(workers))
    lock = threading.Lock()
    stop = threading.Event()
    running: dict[int, subprocess.Popen] = {}

    def one(run):
        with lock:
            if stop.is_set():
                return None
            slot = free.pop()
            run.status = "running"
            write_index(sweep)
        try:
            outcome = train_run(
                python,
                sweep.base,
                run.overrides,
                run.output_dir,
                env=envs[slot],
                started_proc=lambda proc: running.__setitem__(run.index, proc),
                **(
                    {"device": envs[slot].get("CUDA_VISIBLE_DEVICES") or f"{envs[slot]['OMP_NUM_THREADS']} CPU threads"}
                    if workers > 1
                    else {}
                ),
            )
        except KeyboardInterrupt:  # Ctrl-C while this (main) thread waited for the run: it checkpointed and stopped
            with lock:
                run.status, run.error = "interrupted", "stopped by SIGINT"
                write_index(sweep)
            raise
        finally:
            running.pop(run.index, None)
            with lock:
                free.append(slot)
        with lock:
            run.status, run.error, run.wall_s = outcome.status, outcome.error, outcome.wall_s
            write_index(sweep)
            if outcome.status == "interrupted":
                stop.set()
        report(run, outcome)
        return outcome

    todo = []
    for run in sweep.runs:
        if run_state(run.output_dir) == "done":
            run.status = "skipped"
            report(run, None)
        else:
            todo.append(run)
    write_index(sweep)
    if workers == 1:
        for run in todo:
            if one(run).status == "interrupted":
                raise KeyboardInterrupt
        return
    with ThreadPoolExecutor(max_workers=workers) as pool:
        futures = [pool.submit(one, run) for run in todo]
        try:
            for future in as_completed(futures):
                future.result()
        except KeyboardInterrupt:  # Ctrl-C reached the runs too (same terminal); a kill -INT of the sweep did not
            stop.set()
            for proc in list(running.values()):
                proc.send_signal(signal.SIGINT)
            for future in futures:
                future.cancel()
            raise
    if stop.is_set():
        raise KeyboardInterrupt


# ----------------------------------------------------------------------------- slurm: one array job


def _submitit():
    try:
        import submitit
    except ImportError:
        raise ConfigError("--executor slurm needs submitit: pip install 'mgpo[cluster]'") from None
    return submitit


def check_slurm() -> None:
    """A one-line error naming the fix where Slurm cannot be used from here."""
    if shutil.which("sbatch") is None:
        raise ConfigError(
            "--executor slurm needs Slurm's sbatch on PATH: run mgpo sweep on the cluster's login "
            "node (or load its slurm module), or use --executor local."
        )
    _submitit()


class SlurmRun:
    """One run as a Slurm array task (a submitit Checkpointable): trains it with :func:`train_run`; signalled
    before its time limit (or preempted), it stops the training process, which writes a checkpoint, and asks
    submitit to requeue the task, which then resumes. ``scancel`` stops it the same way and leaves it
    interrupted (Slurm sends SIGTERM to the training process; submitit's own process ignores it)."""

    def __init__(self, python: str, base: Path | None, overrides: list[str], out: Path):
        self.python, self.base, self.overrides, self.out = python, base, overrides, out
        self._proc = None

    def __call__(self):
        job = _submitit().JobEnvironment()
        # Slurm sends the time-limit signal (USR2) to every process of the job: the training process must not
        # die of it; submitit's handler in this one stops it with SIGTERM instead, after its checkpoint
        outcome = train_run(
            self.python,
            self.base,
            self.overrides,
            self.out,
            started_proc=lambda proc: setattr(self, "_proc", proc),
            ignore=(signal.SIGUSR2,),
            job_id=job.job_id,
        )
        return outcome.status

    def checkpoint(self, *args, **kwargs):
        """Called by submitit on the time-limit (or preemption) signal: checkpoint, then requeue."""
        if self._proc is not None and self._proc.returncode is None:
            self._proc.send_signal(signal.SIGTERM)  # mgpo train finishes its step and writes a checkpoint
            # Wait for it to end without reaping it: __call__'s proc.wait(), which this handler interrupted, holds
            # the Popen's lock and reaps it (Popen.wait here would deadlock on that lock).
            os.waitid(os.P_PID, self._proc.pid, os.WEXITED | os.WNOWAIT)
        write_record(
            self.out,
            state="requeued",
            error="signalled before the time limit (or preempted): checkpointed and requeued",
        )
        return _submitit().helpers.DelayedSubmission(SlurmRun(self.python, self.base, self.overrides, self.out))

    def __getstate__(self):
        return {k: v for k, v in self.__dict__.items() if k != "_proc"}

    def __setstate__(self, state):
        self.__dict__.update(state, _proc=None)


def scheduler_states(job_ids: list[str]) -> dict[str, str] | None:
    """job id -> Slurm state (PENDING, RUNNING, ...) for the jobs the scheduler still knows; None when it does not
    answer (no squeue here, or an error). Needs no accounting database."""
    if not job_ids or shutil.which("squeue") is None:
        return None
    try:
        out = subprocess.run(
            ["squeue", "--noheader", "--array", "--format=%i %T", "--jobs", ",".join(job_ids)],
            capture_output=True,
            text=True,
            timeout=30,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    if out.returncode != 0 and "Invalid job id" not in out.stderr:
        return None
    states = {}
    for line in out.stdout.splitlines():
        parts = line.split()
        if len(parts) == 2:
            states[parts[0]] = parts[1]
    return states


def slurm_parameters(config: SlurmConfig, job_name: str, threads: int = 0, *, signal: bool = True) -> dict:
    """submitit's parameters for one array job of ``config``'s resources (sweeps' runs, tune's workers); ``signal``:
    signal each task ``signal_s`` before its time limit (a run checkpoints and requeues on it)."""
    params: dict = dict(
        time=config.time_min,
        cpus_per_task=config.cpus_per_run,
        job_name=job_name,
        stderr_to_stdout=True,
        setup=[*(f"export {k}={v}" for k, v in threads_env(threads or config.cpus_per_run).items()), *config.setup],
        additional_parameters=dict(config.extra),
    )
    if signal:
        params["signal_delay_s"] = config.signal_s
    if config.parallelism:
        params["array_parallelism"] = config.parallelism
    for name, value in (("partition", config.partition), ("account", config.account), ("qos", config.qos)):
        if value:
            params[name] = value
    if config.gpus_per_run:
        params["gpus_per_node"] = config.gpus_per_run
    if config.mem_gb:
        params["mem"] = f"{int(config.mem_gb * 1024)}M"
    return params


def submit_slurm(sweep, config: SlurmConfig, python: str, write_index, threads: int = 0) -> list:
    """Submit the sweep's runs that are not done, queued or running as one array job; returns those runs."""
    check_slurm()
    submitit = _submitit()
    status = {row["name"]: row for row in sweep_status(sweep)}
    todo = [run for run in sweep.runs if status[run.name]["state"] not in ("done", "running", "queued")]
    for run in sweep.runs:
        run.status = status[run.name]["state"]
    if not todo:
        write_index(sweep)
        return []
    folder = sweep.output_dir / "slurm"
    executor = submitit.SlurmExecutor(folder=folder / "%j", python=python, max_num_timeout=config.max_requeues)
    executor.update_parameters(**slurm_parameters(config, f"mgpo-{sweep.output_dir.name}", threads))
    with executor.batch():
        jobs = [executor.submit(SlurmRun(python, sweep.base, run.overrides, run.output_dir)) for run in todo]
    for run, job in zip(todo, jobs):
        write_record(
            run.output_dir,
            state="queued",
            error=None,
            job_id=job.job_id,
            log=str(job.paths.stdout).replace("%j", job.job_id),
            submitted=time.time(),
        )
        run.status = "queued"
    write_index(sweep)
    return todo


# ----------------------------------------------------------------------------- status


SCHEDULED = {
    "PENDING": "queued",
    "CONFIGURING": "queued",
    "REQUEUED": "queued",
    "REQUEUE_HOLD": "queued",
    "REQUEUE_FED": "queued",
    "RESV_DEL_HOLD": "queued",
    "SUSPENDED": "queued",
    "RUNNING": "running",
    "COMPLETING": "running",
    "SIGNALING": "running",
    "STAGE_OUT": "running",
}


# a run's recorded states while it is submitted or training: its record says how it ended once it has
IN_FLIGHT = ("queued", "running", "requeued")


def _process_gone(rec: dict) -> bool:
    """Whether a run recorded as running on this machine has no training process any more (its pid gone, or
    reused by a process that is not ``mgpo train``). False where that cannot be told (another host, no pid)."""
    pid = rec.get("pid")
    if not isinstance(pid, int) or rec.get("host") != socket.gethostname():
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:  # someone else's process: not ours, so ours is gone
        return True
    cmdline = Path(f"/proc/{pid}/cmdline")
    return cmdline.is_file() and b"mgpo" not in cmdline.read_bytes()


def sweep_status(sweep) -> list[dict]:
    """Each run's state from its folder, its record and the scheduler (where it answers)."""
    records = {run.name: record(run.output_dir) for run in sweep.runs}
    ids = sorted({r["job_id"] for r in records.values() if r.get("job_id")})
    scheduler = scheduler_states(ids)
    rows = []
    for run in sweep.runs:
        rec = records[run.name]
        job = rec.get("job_id")
        # one look at the checkpoints (each is checked file by file): run_state's partial is "has a step"
        done = (run.output_dir / "metrics.json").is_file()
        step = None if done else resume_step(run.output_dir)
        state = "done" if done else "partial" if step is not None else "new"
        said = rec.get("state")
        where = (scheduler or {}).get(job) if job else None
        if state == "done":
            shown, detail = "done", ""
        elif where in SCHEDULED:
            shown = SCHEDULED[where]
            detail = "" if step is None else f"at step {step}" if shown == "running" else f"resumes from step {step}"
        elif said in ("failed", "interrupted"):
            shown, detail = said, error_line(rec.get("error") or "")
        elif said in IN_FLIGHT and job and scheduler is not None:
            # the scheduler no longer knows the job and the run never said how it ended: killed outright
            # (scancel past its grace time, node failure). Not failed: resubmitting resumes it.
            shown, detail = "interrupted", f"job {job} ended without a word (killed?)"
        elif said == "running" and not job and _process_gone(rec):
            # a run of this machine whose process is gone, and which never said how it ended: killed outright
            shown, detail = "interrupted", f"its process {rec['pid']} ended without a word (killed?)"
        elif said in IN_FLIGHT:
            shown, detail = said, "(the scheduler did not answer)" if job else ""
        elif state == "partial":
            shown, detail = "partial", ""
        else:
            shown, detail = "new", ""
        if shown in ("partial", "interrupted", "failed") and step is not None:
            detail = f"partial at step {step}" + (f"; {detail}" if detail else "")
        rows.append(
            {
                "name": run.name,
                "state": shown,
                "detail": detail,
                "job_id": job,
                "log": rec.get("log")
                or (str(run.output_dir / "train.out") if (run.output_dir / "train.out").is_file() else None),
            }
        )
    return rows
