"""Where trials train: each is ``mgpo train`` in its own process (the sweep executors' ``train_run``), followed
while it runs so that the pruner can stop it; workers are threads here or Slurm array tasks; ``run_tune`` runs a
whole study."""

from __future__ import annotations

import dataclasses
import fcntl
import json
import math
import signal
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import IO

from mgpo.pipelines.config import ConfigError
from mgpo.pipelines.executors import check_slurm, device_envs, scheduler_states, slurm_parameters, train_run
from mgpo.pipelines.tune.config import BASELINE, MAX_FAILURES, SEARCH, SEEDS, TRIALS, Tune, trial_overrides
from mgpo.pipelines.tune.study import _next, _optuna, counts, open_study, queue_seeds, recover


class TrialFailed(Exception):
    """A trial's training failed (its error is in the trial's user attributes and its folder's train.out)."""


class _Watch:
    """Follows a trial's log.jsonl while it trains: reports each validation score to the trial and, where the
    pruner says so, stops the run with SIGTERM (it ends its step and stops)."""

    def __init__(self, trial, log: Path, keys: tuple[str, ...], prunable: bool):
        self.trial, self.log, self.keys, self.prunable = trial, log, keys, prunable
        self.pruned_at: int | None = None
        self.reported: set[int] = set()  # the last evaluation is logged twice (eval_* and validation_*)
        self.done = threading.Event()
        self._offset = 0
        self._thread: threading.Thread | None = None

    def start(self, proc) -> None:
        self._thread = threading.Thread(target=self._follow, args=(proc,), daemon=True)
        self._thread.start()

    def finish(self) -> None:
        """Stop following, then report what the log gained since the last look (the run may end between two)."""
        self.done.set()
        if self._thread is not None:
            self._thread.join()
        for row in self._rows():
            self._report(row)

    def _rows(self) -> list[dict]:
        if not self.log.is_file():
            return []
        with self.log.open() as f:
            f.seek(self._offset)
            text = f.read()
        complete = text[: text.rfind("\n") + 1]  # a line still being written is read next time
        self._offset += len(complete.encode())
        return [json.loads(line) for line in complete.splitlines() if line.strip()]

    def _report(self, row: dict) -> bool:
        """Reports the row's score, if it has one not reported yet; returns whether it did."""
        value = next((row[k] for k in self.keys if isinstance(row.get(k), (int, float))), None)
        step = int(row.get("step", -1))
        if value is None or not math.isfinite(value) or self.pruned_at is not None or step in self.reported:
            return False
        self.reported.add(step)
        self.trial.report(float(value), step)
        return True

    def _follow(self, proc) -> None:
        while proc.poll() is None and not self.done.is_set():
            for row in self._rows():
                if self._report(row) and self.prunable and self.trial.should_prune():
                    self.pruned_at = int(row["step"])
                    proc.send_signal(signal.SIGTERM)
            self.done.wait(0.5)

    def unseen(self, expected: set[int]) -> str | None:
        """Why the pruner did not see every evaluation of a finished trial, or None when it did."""
        missing = sorted(expected - self.reported)
        if not missing:
            return None
        return (
            f"the pruner saw no validation score at step(s) {', '.join(map(str, missing))} of {self.log} (it reads "
            f"{' or '.join(self.keys)}), so it could not stop any trial there. This is a defect in mgpo tune: "
            "please report it with that log. The override tune.pruner=none runs the study without pruning."
        )


def _diagnostics(run: Path) -> dict[str, float]:
    """Means over a trial's logged steps of the optimizer's diagnostics: why a radius won or lost."""
    sums: dict[str, list[float]] = {}
    log = run / "log.jsonl"
    for line in log.read_text().splitlines() if log.is_file() else []:
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        for key in ("apn_capped", "radius_to_weight_mean", "gbar_mean"):
            if isinstance(row.get(key), (int, float)) and math.isfinite(row[key]):
                sums.setdefault(key, []).append(float(row[key]))
    return {key: sum(v) / len(v) for key, v in sums.items()}


def objective_for(tune: Tune, python: str, env: dict | None, running: set | None = None, **where) -> Callable:
    """The objective one worker runs: train the trial in its own process, score it on the validation split.
    ``running``: where the training processes are kept while they run (to pass them a Ctrl-C); ``where`` goes to
    :func:`train_run` (signals to ignore, the job id)."""
    optuna = _optuna()

    def objective(trial) -> float:
        attrs = trial.user_attrs
        arm, phase, seed = attrs.get("arm", "mgpo"), attrs.get("phase", SEARCH), attrs.get("seed", tune.seed)
        for key, value in (("arm", arm), ("phase", phase), ("seed", seed)):
            trial.set_user_attr(key, value)
        params = {} if arm == BASELINE else {space.name: space.suggest(trial) for space in tune.space}
        out = tune.output_dir / TRIALS / f"trial-{trial.number:04d}"
        trial.set_user_attr("run", str(out))
        watch = _Watch(trial, out / "log.jsonl", tune.progress_keys, prunable=arm != BASELINE and phase == SEARCH)
        procs = running if running is not None else set()

        def started(proc):
            procs.add(proc)
            watch.start(proc)

        try:
            outcome = train_run(
                python,
                tune.base,
                trial_overrides(tune, params, arm, seed, out),
                out,
                env=env,
                started_proc=started,
                **where,
            )
        finally:
            watch.finish()
            procs.difference_update([p for p in list(procs) if p.poll() is not None])
        trial.set_user_attr("wall_s", outcome.wall_s)
        trial.set_user_attr("diagnostics", _diagnostics(out))
        if watch.pruned_at is not None:
            trial.set_user_attr("pruned_at", watch.pruned_at)
            raise optuna.TrialPruned()
        if outcome.status == "interrupted":
            trial.set_user_attr("interrupted", True)
            raise KeyboardInterrupt
        if outcome.status == "failed":
            trial.set_user_attr("error", outcome.error)
            raise TrialFailed(outcome.error)
        blind = watch.unseen(tune.config.evaluated_steps) if tune.config.prunes else None
        if blind:  # the trial's score stands; the study stops (work()), as pruning does not do what it says
            trial.set_user_attr("pruner_blind", blind)
        metrics = json.loads((out / "metrics.json").read_text())
        if not isinstance(metrics.get(tune.key), (int, float)):
            trial.set_user_attr("error", f"its metrics.json has no {tune.key}")
            raise TrialFailed(
                f"trial {trial.number}'s run has no {tune.key} in {out / 'metrics.json'}: mgpo "
                "tune scores on the validation split only."
            )
        return float(metrics[tune.key])

    return objective


class Gate:
    """Makes taking a trial (deciding whether to, then popping a queued one or creating one) one step among all of a
    study's workers: this process's threads (a lock) and, on SQLite, other processes too (``take.lock`` beside the
    trials). Optuna pops a queued trial with SELECT ... FOR UPDATE, which SQLite ignores, so without it two Slurm
    workers could both take one (optuna/optuna#4621): trial 0 trained twice, and the later worker failed."""

    def __init__(self, tune: Tune):
        self._threads = threading.Lock()
        self._path = tune.output_dir / "take.lock" if tune.sqlite else None
        self._file: IO[str] | None = None

    def acquire(self) -> None:
        self._threads.acquire()
        if self._path is None:
            return
        try:  # a folder that cannot be locked (no flock on this file system) must not leave the threads' lock held
            file = self._path.open("a")
            try:
                fcntl.flock(file, fcntl.LOCK_EX)  # waits while another process takes its trial
            except BaseException:
                file.close()
                raise
        except BaseException:
            self._threads.release()
            raise
        self._file = file

    def release(self) -> None:
        file, self._file = self._file, None
        try:
            if file is not None:
                file.close()  # closing the file releases its lock
        finally:
            self._threads.release()


def work(
    study,
    tune: Tune,
    objective: Callable,
    gate: Gate,
    stop: threading.Event,
    on_trial: Callable | None = None,
) -> None:
    """One worker: take trials (queued ones first, then new search trials while the budget allows) until none is
    left. ``gate`` makes deciding and taking a trial one step among the study's workers; ``on_trial(trial)``
    hears of each finished one."""
    from optuna.trial import TrialState

    failures = 0
    while not stop.is_set():
        gate.acquire()
        taken: list = [True, None]  # [gate still held, the trial's number]

        def opened(trial, taken=taken):
            taken[1] = trial.number
            if taken[0]:
                taken[0] = False
                gate.release()  # the trial exists now: the next worker may decide
            return objective(trial)

        try:
            if not _next(study, tune.config.trials):
                return
            study.optimize(opened, n_trials=1, catch=(TrialFailed,))
        finally:
            if taken[0]:
                gate.release()
        if taken[1] is None:
            continue
        trial = next(t for t in study.get_trials(deepcopy=False) if t.number == taken[1])
        if on_trial is not None:
            on_trial(trial)
        if trial.user_attrs.get("pruner_blind"):
            stop.set()
            raise TrialFailed(f"trial {trial.number}: {trial.user_attrs['pruner_blind']} The study stopped.")
        failures = failures + 1 if trial.state == TrialState.FAIL else 0
        if trial.state == TrialState.FAIL and (failures >= MAX_FAILURES or trial.user_attrs.get("arm") == BASELINE):
            stop.set()
            raise TrialFailed(
                f"trial {trial.number} failed: {trial.user_attrs.get('error', '?')}. The study "
                f"stopped; the run's log: {trial.user_attrs.get('run')}/train.out"
            )


# ----------------------------------------------------------------------------- running it


def _plan(tune: Tune) -> dict:
    return {
        "base": tune.base_text,
        "overrides": tune.overrides,
        "tune": dataclasses.asdict(tune.config),
        "storage": tune.storage,
    }


def prepare(tune: Tune):
    """Create the tune folder (or check it holds this very study) and lock it; returns the held lock file."""
    try:
        tune.output_dir.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        from mgpo.pipelines.config import unusable_folder

        raise unusable_folder(tune.output_dir, "--output-dir", err) from None
    plan_file = tune.output_dir / "tune-plan.json"
    if plan_file.is_file():
        before = json.loads(plan_file.read_text())
        changed = [k for k in _plan(tune) if before.get(k) != _plan(tune)[k]]
        if changed:
            raise ConfigError(
                f"{tune.output_dir} holds a study of another plan ({', '.join(changed)} differ): "
                "resume it with the same config and overrides, or choose another --output-dir."
            )
    else:
        plan_file.write_text(json.dumps(_plan(tune), indent=2))
    tune.base.write_text(tune.base_text)
    lock = (tune.output_dir / "tune.lock").open("w")
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        lock.close()
        raise ConfigError(
            f"another mgpo tune is working on {tune.output_dir}; wait for it, or stop it first."
        ) from None
    return lock


def run_local(study, tune: Tune, workers: int, python: str, threads: int = 0, on_trial: Callable | None = None) -> None:
    """Run the study's trials here, ``workers`` at a time (threads, each starting its trials' processes on its
    own device). Ctrl-C stops the running trials (each writes a checkpoint; a rerun queues them again)."""
    envs = device_envs(workers, threads)
    gate, stop = Gate(tune), threading.Event()
    running: set = set()  # the training processes
    errors: list[BaseException] = []

    def one(env):
        try:
            work(study, tune, objective_for(tune, python, env, running), gate, stop, on_trial)
        except BaseException as err:  # noqa: BLE001 -- handed to the main thread
            errors.append(err)
            stop.set()

    pool = [threading.Thread(target=one, args=(env,), daemon=True) for env in envs]
    for thread in pool:
        thread.start()
    try:
        for thread in pool:
            while thread.is_alive():
                thread.join(0.5)
    except KeyboardInterrupt:
        stop.set()
        for proc in list(running):
            proc.send_signal(signal.SIGINT)
        for thread in pool:
            thread.join()
        raise
    if any(isinstance(err, KeyboardInterrupt) for err in errors):
        raise KeyboardInterrupt
    if errors:
        raise errors[0]


class SlurmWorker:
    """One worker as a Slurm array task (submitit): takes trials from the shared study until none is left. A worker
    that dies leaves its trial running; the study's heartbeat fails it after 60 s and queues it again."""

    def __init__(self, tune: Tune, python: str):
        self.tune, self.python = tune, python

    def __call__(self) -> str:
        job = _submitit().JobEnvironment()
        study = open_study(self.tune)
        # Slurm's time-limit signal (USR2) reaches every process of the job: the training process ignores it
        objective = objective_for(self.tune, self.python, None, ignore=(signal.SIGUSR2,), job_id=job.job_id)
        work(study, self.tune, objective, Gate(self.tune), threading.Event())
        return "done"


def _submitit():
    from mgpo.pipelines.executors import _submitit as load

    return load()


def run_slurm(
    study, tune: Tune, workers: int, python: str, threads: int = 0, say: Callable[[str], None] = print
) -> None:
    """Run the study's trials on Slurm: ``workers`` array tasks share the study; this process waits for them and
    ``say``s the search's counts when they change. Ctrl-C cancels them (their trials stop with a checkpoint and
    are queued again by the next run)."""
    check_slurm()
    if tune.sqlite and workers > 1:
        say(
            "note: several workers on one SQLite file need a shared file system that locks correctly (NFS often "
            "does not); prefer --storage postgresql://..."
        )
    # the worker is this interpreter's code (mgpo, Optuna); ``python`` is what it starts each trial's training with
    executor = _submitit().SlurmExecutor(folder=tune.output_dir / "slurm" / "%j", python=sys.executable)
    # workers take no time-limit signal: one killed at its limit leaves its trial to the heartbeat (failed, requeued)
    executor.update_parameters(
        **slurm_parameters(tune.slurm, f"mgpo-tune-{tune.output_dir.name}", threads, signal=False)
    )
    with executor.batch():
        jobs = [executor.submit(SlurmWorker(tune, python)) for _ in range(workers)]
    said = ""
    try:
        while True:
            ended = _ended(jobs)  # asked first: the counts read after it are final once it is True
            now = ", ".join(f"{n} {state.lower()}" for state, n in sorted(counts(study).items()))
            if now and now != said:
                say(f"search trials: {now}")
                said = now
            if ended:
                break
            time.sleep(5)
    except KeyboardInterrupt:
        for job in jobs:
            job.cancel(check=False)
        raise
    for job in jobs:
        if not job.done():  # gone from the queue without a result: it died before it could write one
            raise TrialFailed(
                f"Slurm worker {job.job_id} ended without a result (killed, or its Python could not start); "
                f"its log: {job.paths.stderr}"
            )
        if job.exception() is not None:
            raise TrialFailed(f"Slurm worker {job.job_id} failed: {job.exception()}; its log: {job.paths.stdout}")


def _ended(jobs: list) -> bool:
    """Whether every worker has ended: with its result (submitit knows), or gone from the scheduler's queue without
    one (submitit, which asks sacct, would wait for it forever on a cluster without accounting)."""
    if all(job.done() for job in jobs):
        return True
    queued = scheduler_states([job.job_id for job in jobs])
    return queued is not None and all(job.done() or job.job_id not in queued for job in jobs)


def run_tune(
    tune: Tune,
    *,
    executor: str = "local",
    workers: int = 1,
    threads: int = 0,
    seeds: int = 1,
    python: str = sys.executable,
    on_trial: Callable | None = None,
    say: Callable[[str], None] = print,
):
    """Run (or resume) the whole study: the search, then with ``seeds`` > 1 the re-runs. Returns the study.
    ``on_trial(trial)`` hears of each trial finished here; on Slurm, ``say`` gets the counts as they change."""
    if executor not in ("local", "slurm"):
        raise ConfigError(f"--executor {executor!r} is unknown: choose local or slurm.")
    for name, value in (("--workers", workers), ("--seeds", seeds)):
        if value < 1:
            raise ConfigError(f"{name} {value} is invalid: use at least 1.")
    lock = prepare(tune)
    try:
        study = open_study(tune)
        recover(study, left_running=executor == "local")
        for phase in (SEARCH, SEEDS):
            if phase == SEEDS and not (seeds > 1 and queue_seeds(study, tune, seeds) + _waiting(study)):
                break
            if executor == "local":
                run_local(study, tune, workers, python, threads, on_trial)
            else:
                run_slurm(study, tune, workers, python, threads, say)
        return study
    finally:
        lock.close()


def _waiting(study) -> int:
    from optuna.trial import TrialState

    return sum(t.state == TrialState.WAITING for t in study.get_trials(deepcopy=False))
