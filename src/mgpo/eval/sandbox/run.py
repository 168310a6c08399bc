"""Running one program (run_program) or judging one (judge), and how each run ended. See docs/sandbox.md."""

from __future__ import annotations

import os
import secrets
import shutil
import signal
import subprocess
import tempfile
import textwrap
import time
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import IO

from .cgroup import Cgroup, cgroup_homes
from .isolation import SCRATCH, Runner, bwrap_argv, minimal_env, runner
from .limits import RunResult, SandboxLimits
from .programs import HARNESS, LAUNCHER
from .programs.codec import EXIT_ASSERT, EXIT_ERROR, EXIT_EXIT, EXIT_GONE, EXIT_JUDGE_MEMORY, EXIT_MEMORY, EXIT_REPLY

_MAX_OPEN_FILES = 64  # RLIMIT_NOFILE: also bounds memfd/pipe memory outside the address space (docs/sandbox.md)
_MAX_REQUEST = 64 * 2**20  # the largest argument list (bytes of JSON) the harness sends: the tests are trusted


def switches_user(limits: SandboxLimits | None = None) -> bool:
    """True when programs run as another (unprivileged) user than this process."""
    limits = limits or SandboxLimits()
    return runner(limits.python, limits.user, limits.isolation).uid is not None


def uses_namespaces(limits: SandboxLimits | None = None) -> bool:
    """True when programs run inside bubblewrap's namespaces."""
    limits = limits or SandboxLimits()
    return runner(limits.python, limits.user, limits.isolation).bwrap is not None


def describe_isolation(limits: SandboxLimits | None = None) -> str:
    """One line saying which user, interpreter and isolation programs run with under these limits."""
    limits = limits or SandboxLimits()
    return runner(limits.python, limits.user, limits.isolation).description


def _tail(data: bytes, limit: int) -> str:
    text = data.decode("utf-8", errors="replace")
    return text if len(text) <= limit else "...[truncated]..." + text[-limit:]


def _read(f: IO[bytes], limit: int) -> bytes:
    f.seek(0, os.SEEK_END)
    size = f.tell()
    f.seek(max(0, size - 4 * limit - 256))
    return f.read()


def _size(f: IO[bytes]) -> int:
    return os.fstat(f.fileno()).st_size


def _classify(
    rc: int | None, token_seen: bool, stderr: str, limits: SandboxLimits, output_full: bool
) -> tuple[str, str]:
    """Status and reason from how the program's process ended (rc None: the wall-clock limit)."""
    if rc is None:
        return "timeout", f"wall-clock limit of {limits.timeout_s}s reached; process group killed"
    if rc == 0 and token_seen:
        return "passed", "ran to the end"
    # An output file at the size limit means a write was refused, whatever the program did next (Python ignores
    # SIGXFSZ, so it sees an OSError, and a flood of stderr cannot even print its traceback).
    if output_full or (rc < 0 and -rc == signal.SIGXFSZ) or "File too large" in stderr:
        return "file_limit", f"file/output size limit of {limits.max_file_mb} MiB reached"
    if rc == 0:
        return "failed", "program exited with status 0 before its code finished (e.g. sys.exit): not counted as passed"
    if rc == EXIT_ASSERT:
        return "failed", "assertion failed"
    if rc == EXIT_MEMORY or "MemoryError" in stderr:
        return "memory", f"memory limit of {limits.memory_mb} MiB reached"
    if rc == EXIT_ERROR:
        return "error", "uncaught exception"
    if rc < 0:
        sig = -rc
        if sig == signal.SIGXCPU:
            return "timeout", f"CPU-time limit of {limits.cpu_s}s reached"
        return "killed", f"killed by signal {signal.Signals(sig).name}"
    return "failed", f"program exited with status {rc} before its code finished"


def _kill_group(proc: subprocess.Popen[bytes]) -> int:
    """SIGKILL the program and anything it left behind in its group; its exit status (-N for signal N)."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    return proc.wait()


def answers_visible(limits: SandboxLimits, hidden: Iterable[str | os.PathLike[str]]) -> bool:
    """Whether programs run under ``limits`` could read the ``hidden`` paths: False under bubblewrap (they are
    masked) or when none exists; True without it when ``limits.allow_visible_answers``; otherwise it raises,
    naming the paths and the fix. A judge calls it before every run; call it before costly work (generation)."""
    chosen = runner(limits.python, limits.user, limits.isolation)
    on_disk = [os.fspath(path) for path in hidden if os.path.exists(path)]
    if chosen.bwrap or not on_disk:
        return False
    if not limits.allow_visible_answers:
        raise RuntimeError(
            f"sandbox: this dataset's answers are on disk ({', '.join(on_disk)}) and the sandbox runs without "
            f"bubblewrap ({chosen.description}), which cannot hide files: a completion could read them and pass. "
            "Install bubblewrap (apt-get install bubblewrap) so that they are hidden, or pass "
            "SandboxLimits(allow_visible_answers=True) to grade anyway with every result marked answers_visible."
        )
    return True


@dataclass
class _Ended:
    """What the parent saw of one run once both processes are gone."""

    rc: int  # the program's exit status (-N: killed by signal N)
    running: bool  # the program was still running when the run ended (judge: the tests ended first)
    timed_out: bool
    verdict: int | None  # the harness's exit status (judge only)
    over_budget: bool  # the kernel killed a process of the run's cgroup for the memory budget
    output_full: bool  # stdout or stderr reached the file-size limit
    stdout: bytes
    stderr: str
    judge_text: str
    duration_s: float


def _launcher_args(
    python: str, limits: SandboxLimits, program_fd: int, req_r: int, rep_w: int, entry: str
) -> list[str]:
    """The sandboxed process's command (programs/launcher.py's main reads these arguments in this order)."""
    return [
        python,
        "-I",
        "-B",
        "-c",
        LAUNCHER,
        str(limits.cpu_s),
        str(limits.memory_mb * 2**20),
        str(limits.max_processes),
        str(limits.max_file_mb * 2**20),
        str(_MAX_OPEN_FILES),
        str(int(limits.guard)),
        str(program_fd),
        str(req_r),
        str(rep_w),
        str(_MAX_REQUEST),
        entry,
    ]


def _start_harness(
    python: str, limits: SandboxLimits, tests: str, req_w: int, rep_r: int, log: IO[bytes]
) -> subprocess.Popen[bytes]:
    """The judge's harness (programs/harness.py), reading ``tests`` on stdin. ``python``: the programs' interpreter
    (a system one starts in a quarter of a pyenv one's time); -S: the tests need only the standard library."""
    with tempfile.TemporaryFile() as test_source:
        test_source.write(tests.encode("utf-8"))
        test_source.seek(0)
        return subprocess.Popen(
            [
                python,
                "-I",
                "-S",
                "-B",
                "-c",
                HARNESS,
                str(limits.harness_memory_mb * 2**20),
                str(limits.harness_cpu_s),
                str(req_w),
                str(rep_r),
                str(limits.reply_mb * 2**20),
                str(limits.reply_depth),
                str(limits.reply_items),
                str(limits.decode_s),
            ],
            cwd="/",
            env=minimal_env("/"),
            stdin=test_source,
            stdout=log,
            stderr=log,
            close_fds=True,
            pass_fds=(req_w, rep_r),
        )


def _wait(
    proc: subprocess.Popen[bytes], harness: subprocess.Popen[bytes] | None, limits: SandboxLimits, start: float
) -> tuple[bool, int | None]:
    """(timed out, the harness's verdict) once the run is over: the program ended (run_program) or the tests did
    (judge), or the wall-clock limit passed."""
    try:
        (harness or proc).wait(timeout=limits.timeout_s)
        timed_out = False
    except subprocess.TimeoutExpired:
        timed_out = True
    verdict = None
    if harness is not None:
        harness.kill()
        verdict = harness.wait()
        if verdict == EXIT_GONE and not timed_out:
            try:  # the program's process ended (or closed its channel): let it finish ending
                proc.wait(timeout=max(0.0, min(1.0, start + limits.timeout_s - time.monotonic())))
            except subprocess.TimeoutExpired:
                pass
    return timed_out, verdict


def _execute(
    chosen: Runner,
    source: str,
    token: bytes,
    limits: SandboxLimits,
    entry: str,
    tests: str | None,
    hidden: tuple[str, ...],
    work: str | None,
) -> _Ended:
    """Start the program (and, for a judge, the harness), wait for the run's end, kill what is left, read back."""
    opened: list[int] = []
    cgroup = None
    start = time.monotonic()
    try:
        with (
            tempfile.TemporaryFile() as program,
            tempfile.TemporaryFile() as out,
            tempfile.TemporaryFile() as err,
            tempfile.TemporaryFile() as verdict_log,
        ):
            # The program travels as an inherited descriptor of an unlinked file: no path to find it by.
            program.write(token + b"\n" + source.encode("utf-8"))
            program.seek(0)
            child_fds = [program.fileno()]
            req_r = req_w = rep_r = rep_w = -1
            if tests is not None:
                req_r, req_w = os.pipe()
                rep_r, rep_w = os.pipe()
                opened += [req_r, req_w, rep_r, rep_w]
                child_fds += [req_r, rep_w]
            args = _launcher_args(chosen.python, limits, program.fileno(), req_r, rep_w, entry)
            if chosen.bwrap:
                wrapper, wrapper_fds = bwrap_argv(chosen.bwrap, chosen.python, limits.tmpfs_mb, hidden)
                opened += wrapper_fds
                child_fds += wrapper_fds
                args = [*wrapper, *args]
            homes, _ = cgroup_homes()
            cgroup = Cgroup(homes, limits) if homes else None

            def popen() -> subprocess.Popen[bytes]:
                return subprocess.Popen(
                    args,
                    cwd=work or "/",
                    env=minimal_env(work or SCRATCH),
                    stdin=subprocess.DEVNULL,
                    stdout=out,
                    stderr=err,
                    start_new_session=True,
                    close_fds=True,
                    pass_fds=child_fds,
                    user=chosen.uid,
                    group=chosen.gid,
                    extra_groups=None if chosen.uid is None else [],
                )

            proc = cgroup.start(popen) if cgroup else popen()
            harness = None
            if tests is not None:
                try:
                    harness = _start_harness(chosen.python, limits, tests, req_w, rep_r, verdict_log)
                except BaseException:
                    _kill_group(proc)  # no program left waiting for calls that never come
                    raise
            for fd in opened:  # only the two processes hold the pipes now: an exit is seen as end-of-file
                os.close(fd)
            opened = []
            timed_out, verdict = _wait(proc, harness, limits, start)
            running = proc.poll() is None
            rc = _kill_group(proc)
            if chosen.bwrap and rc > 128:  # bwrap reports a program killed by signal N as 128 + N
                rc = 128 - rc
            limit = limits.max_output_chars
            return _Ended(
                rc=rc,
                running=running,
                timed_out=timed_out,
                verdict=verdict,
                over_budget=cgroup is not None and cgroup.oom_killed(),
                output_full=max(_size(out), _size(err)) >= limits.max_file_mb * 2**20,
                stdout=_read(out, limit),
                stderr=_tail(_read(err, limit), limit),
                judge_text=_tail(_read(verdict_log, limit), limit),
                duration_s=time.monotonic() - start,
            )
    finally:
        for fd in opened:
            os.close(fd)
        if cgroup is not None:
            cgroup.remove()


def _run(
    source: str, limits: SandboxLimits, entry: str = "", tests: str | None = None, hidden: tuple[str, ...] = ()
) -> RunResult:
    """Run ``source`` in the sandbox: as a whole program (``tests`` None) or judged by ``tests`` (see judge)."""
    chosen = runner(limits.python, limits.user, limits.isolation)
    visible = answers_visible(limits, hidden)
    judged = tests is not None
    token = b"" if judged else secrets.token_hex(16).encode()
    # Under bubblewrap the scratch directory is the private /tmp; without it, a fresh folder on the host.
    work = None if chosen.bwrap else tempfile.mkdtemp(prefix="mgpo-sandbox-")
    if work and chosen.uid is not None:
        os.chown(work, chosen.uid, chosen.gid)  # type: ignore[arg-type]
    try:
        ended = _execute(chosen, source, token, limits, entry, tests, hidden, work)
    finally:
        if work:
            shutil.rmtree(work, ignore_errors=True)
    stdout = ended.stdout
    if judged:
        status, reason = _judge_status(
            ended.verdict, ended.timed_out, None if ended.running else ended.rc, ended.stderr, limits, ended.output_full
        )
    else:
        stripped = stdout.rstrip(b"\n")
        token_seen = stripped.endswith(b"\n" + token) or stripped == token
        if token_seen:
            stdout = stripped[: -len(token) - 1]
        status, reason = _classify(
            None if ended.timed_out else ended.rc, token_seen, ended.stderr, limits, ended.output_full
        )
    if ended.over_budget and status != "passed":  # the kernel killed a process of the group for the budget
        status, reason = (
            "memory",
            (
                f"memory budget of {limits.memory_budget_mb} MiB reached (all of the program's "
                f"processes, /tmp and /dev/shm together)"
            ),
        )
    # The harness's text is the judge's (the program's words in it are quoted); the program's stderr is its own
    # text, marked line by line so that it cannot pass for the sandbox's reason.
    detail = [reason]
    if judged and ended.judge_text.strip():
        detail.append(ended.judge_text.strip())
    if ended.stderr.strip():
        detail.append(
            "the program's stderr (its own text, not the sandbox's):\n"
            + textwrap.indent(ended.stderr.strip(), "| ", lambda line: True)
        )
    return RunResult(
        passed=status == "passed",
        status=status,
        detail="\n".join(detail),
        duration_s=ended.duration_s,
        output=_tail(stdout, limits.max_output_chars),
        answers_visible=visible,
    )


def _judge_status(
    verdict: int | None, timed_out: bool, rc: int | None, stderr: str, limits: SandboxLimits, output_full: bool
) -> tuple[str, str]:
    """Status from the harness's exit status (the verdict) and, when the program's process ended by itself
    (rc not None), from how it ended. Only the harness's 0 is a pass."""
    if timed_out:
        return "timeout", f"wall-clock limit of {limits.timeout_s}s reached; process group killed"
    if verdict == 0:
        return "passed", "the tests ran to their end"
    if verdict == EXIT_GONE and rc is not None:
        if rc == 0:
            return "failed", "the program's process exited before the tests finished: not counted as passed"
        return _classify(rc, False, stderr, limits, output_full)
    if output_full:
        return "file_limit", f"file/output size limit of {limits.max_file_mb} MiB reached"
    if verdict == EXIT_GONE:
        return "failed", "the program closed its channel before the tests finished"
    if verdict == EXIT_ASSERT:
        return "failed", "assertion failed"
    if verdict == EXIT_EXIT:
        return "failed", "the program called sys.exit during the tests: not counted as passed"
    if verdict == EXIT_MEMORY:
        return "memory", f"memory limit of {limits.memory_mb} MiB reached"
    if verdict == EXIT_JUDGE_MEMORY:
        return "memory", (
            f"the judge's harness ran out of memory (SandboxLimits.harness_memory_mb={limits.harness_memory_mb})"
        )
    if verdict == EXIT_REPLY:
        return "reply_limit", "a reply of the program's function went over the judge's own bounds"
    if verdict == EXIT_ERROR:
        return "error", "uncaught exception"
    if verdict == -signal.SIGXCPU:
        return "timeout", f"the tests' CPU-time limit of {limits.harness_cpu_s}s (SandboxLimits.harness_cpu_s) reached"
    return "error", f"the test harness ended with status {verdict}"


def run_program(source: str, limits: SandboxLimits | None = None) -> RunResult:
    """Run ``source`` as a program in a fresh sandboxed process and report how it ended.

    The program passes only if it runs to its end without an exception within the limits. That is the
    program's own report: code that wants to can fake it. To grade untrusted code against tests, use
    :func:`judge`.
    """
    if not isinstance(source, str):
        raise TypeError(f"run_program expects the program source as str, got {type(source).__name__}.")
    return _run(source, limits or SandboxLimits())


def judge(
    program: str,
    entry_point: str,
    tests: str,
    limits: SandboxLimits | None = None,
    hidden: Iterable[str | os.PathLike[str]] = (),
) -> RunResult:
    """Run the untrusted ``program`` in the sandbox and grade its function ``entry_point`` with ``tests``.

    ``tests`` is trusted code. It runs in a separate harness process outside the sandbox (as this process's
    user, with its own limits: SandboxLimits.harness_*, reply_*, decode_s), with the name ``candidate`` bound to
    a proxy: each call sends its arguments to the sandboxed program and returns the function's result as plain
    data (a subclass of a builtin type arrives as its base type), or raises the harness's ``CandidateError`` when
    the function raised. The run passes only if ``tests`` runs to its end.

    ``hidden``: files or folders the program must not see, such as the dataset's answers. Under bubblewrap they
    are masked (they are not mounted at all unless they lie in the system or interpreter folders). Without it
    nothing can be hidden, so the call refuses unless ``limits.allow_visible_answers`` (then the result says
    ``answers_visible``).
    """
    for name, value in (("program", program), ("entry_point", entry_point), ("tests", tests)):
        if not isinstance(value, str):
            raise TypeError(f"judge expects {name} as str, got {type(value).__name__}.")
    if not entry_point.isidentifier():
        raise ValueError(f"judge: entry_point={entry_point!r} is not a Python identifier.")
    if isinstance(hidden, (str, os.PathLike)):
        raise TypeError(f"judge: hidden={hidden!r} must be a list of paths, not one path.")
    paths = tuple(os.path.realpath(os.fspath(path)) for path in hidden)
    return _run(program, limits or SandboxLimits(), entry=entry_point, tests=tests, hidden=paths)


def run_programs(sources: list[str], limits: SandboxLimits | None = None, workers: int = 2) -> list[RunResult]:
    """Run many programs with a small thread pool (each still in its own process); results keep the order."""
    if workers < 1:
        raise ValueError(f"workers={workers} is invalid: use at least 1 worker.")
    with ThreadPoolExecutor(max_workers=workers) as pool:
        return list(pool.map(lambda s: run_program(s, limits), sources))


def judge_many(
    jobs: list[tuple[str, str, str]],
    limits: SandboxLimits | None = None,
    workers: int = 2,
    hidden: Iterable[str | os.PathLike[str]] = (),
) -> list[RunResult]:
    """:func:`judge` for many (program, entry_point, tests) triples, a few at a time; results keep the order."""
    if workers < 1:
        raise ValueError(f"workers={workers} is invalid: use at least 1 worker.")
    paths = tuple(hidden) if not isinstance(hidden, (str, os.PathLike)) else hidden  # judge refuses one path
    with ThreadPoolExecutor(max_workers=workers) as pool:
        return list(pool.map(lambda job: judge(job[0], job[1], job[2], limits, paths), jobs))
