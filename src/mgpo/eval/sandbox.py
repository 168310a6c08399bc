"""Run untrusted, model-generated Python programs in a separate, limited process.

Two layers. The outer one, when bubblewrap (``bwrap``, Debian package ``bubblewrap``) is installed, is an
isolation boundary; the inner one is what ran before and still runs inside it.

With bubblewrap (``SandboxLimits.isolation`` ``auto`` or ``bwrap``; tested in ``tests/eval/test_sandbox.py``):

* Every program runs in its own user, network, PID, IPC, UTS and mount namespaces (``bwrap --unshare-all``):
  no network at all (not even loopback: a server on the host's 127.0.0.1 is unreachable), it sees only its
  own processes (it is PID 2; the parent cannot be signalled), and when the run ends or the parent dies
  (``--die-with-parent``) the namespace's init exits and the kernel kills every process left in it, including
  ones that left the process group with ``setsid``.
* The root filesystem is mounted read-only; ``/tmp``, ``/dev/shm`` and the program's scratch directory are
  private and writable; the parent's home directory, its working directory and the mgpo project folder are
  replaced by empty read-only directories, so files there can be neither read nor written.

Always (with or without bubblewrap):

* Every program runs in its own ``python -I -B`` process, in a new session (its own process group), in a
  fresh temporary working directory that is deleted afterwards, with stdin closed, an environment holding
  only ``PATH``/``HOME``/``TMPDIR``/``LANG`` (nothing is inherited from the parent, so secrets in the
  parent's environment are not visible), and stdout/stderr written to anonymous files of bounded size.
* Resource limits set before the program starts: ``RLIMIT_CPU``, ``RLIMIT_AS`` (memory), ``RLIMIT_NPROC``,
  ``RLIMIT_FSIZE`` (this also bounds the captured output), ``RLIMIT_CORE = 0``. On wall-clock expiry the
  whole process group is killed with SIGKILL; the group is also killed after every normal exit so that no
  background child outlives its run.
* When the parent runs as root and the user ``SandboxLimits.user`` (default ``nobody``) exists, the
  program (and bubblewrap) runs as that user, with no supplementary groups. This is what makes the limits
  real: the kernel does not enforce ``RLIMIT_NPROC`` for root, and root could raise any limit again (and
  root-owned files would be readable through bubblewrap's user namespace). The parent's interpreter may live
  where that user cannot reach it (e.g. ``/root/.pyenv``); then the first system interpreter that user can
  run (``/usr/bin/python3`` ...) is used instead, and only its standard library is available to the program.
  ``RLIMIT_NPROC`` counts *all* processes of that user, including other sandboxes running at the same time.
* A Python-level guard, installed after the limits and before the program's code, blocks: opening files for
  writing outside the working directory (``open``, ``io.open``, ``io.FileIO``, ``os.open``), path-changing
  ``os`` functions outside the working directory (``remove``, ``rename``, ``mkdir``, ``chmod`` ...),
  and disables process and signal functions (``os.fork``, ``os.system``, ``os.kill``, ``os.exec*``,
  ``os.spawn*``, ``subprocess`` process creation, ``signal.pthread_kill`` ...); it makes ``ctypes`` and
  ``resource`` unimportable. It gives clear error messages; it is not a boundary (it can be bypassed
  through interpreter internals).
* A program only passes if it runs to its end: after the program's code finished, the launcher prints a
  random token that the program never sees (it is read from a file that is deleted before the code runs).
  ``sys.exit(0)`` or ``os._exit(0)`` before the end therefore counts as a failure.

What does NOT hold:

* There is no seccomp filter: the kernel's whole syscall surface is reachable (bubblewrap's namespaces are
  the boundary). The end-of-run token lives in the process's memory.
* Without bubblewrap (not installed, user namespaces disabled, or ``isolation="process"``) there is no
  network, filesystem or PID isolation: a program that bypasses the guard can open connections, read any
  file its user can read, write to world-writable places (``/tmp``, ``/dev/shm``), and a process that leaves
  the group with ``setsid`` is not killed at the end. ``auto`` then warns once, loudly.
* Without the user switch (parent not root, or no such user), the program runs as the parent's user.
  As root without the switch, ``RLIMIT_NPROC`` is not enforced and only the guard prevents forking.
  :func:`describe_isolation` says which case applies.
"""

from __future__ import annotations

import functools
import os
import pwd
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

__all__ = ["SandboxLimits", "RunResult", "run_program", "run_programs", "describe_isolation", "switches_user",
           "uses_namespaces"]

_PROGRAM_FILE = "_program.py"
_TOKEN_FILE = "_token"
_EXIT_ERROR, _EXIT_ASSERT, _EXIT_MEMORY = 92, 93, 94
_SYSTEM_PYTHONS = ("/usr/bin/python3", "/usr/local/bin/python3", "/bin/python3")
_MIN_PATH = "/usr/local/bin:/usr/bin:/bin"
ISOLATIONS = ("auto", "bwrap", "process")


@dataclass
class SandboxLimits:
    """Limits for one sandboxed program run."""

    timeout_s: float = field(default=10.0, metadata={"help": "Wall-clock limit in seconds; then the process group is killed."})
    cpu_s: int = field(default=10, metadata={"help": "CPU-time limit in seconds (RLIMIT_CPU)."})
    memory_mb: int = field(default=512, metadata={"help": "Address-space limit in MiB (RLIMIT_AS)."})
    max_processes: int = field(default=64, metadata={"help": "RLIMIT_NPROC: processes of the running user (enforced for non-root users only)."})
    max_file_mb: int = field(default=16, metadata={"help": "Largest file the program may write, captured output included (RLIMIT_FSIZE)."})
    max_output_chars: int = field(default=4000, metadata={"help": "How many characters of stdout/stderr to keep in the result."})
    user: str = field(default="nobody", metadata={"help": "When the parent is root, run the program as this user ('' = stay root)."})
    python: str = field(default="", metadata={"help": "Interpreter to run the program with ('' = this one, or a system python the user can run)."})
    guard: bool = field(default=True, metadata={"help": "Install the Python-level guard (write/process/signal blocking) before the code runs."})
    isolation: str = field(default="auto", metadata={"help": "auto: bubblewrap namespaces when bwrap works, else the process sandbox with a warning; bwrap: require it; process: never use it."})

    def __post_init__(self):
        if self.isolation not in ISOLATIONS:
            raise ValueError(f"SandboxLimits.isolation={self.isolation!r} is invalid: choose one of {', '.join(ISOLATIONS)}.")
        for name in ("timeout_s", "cpu_s", "memory_mb", "max_processes", "max_file_mb", "max_output_chars"):
            value = getattr(self, name)
            if not value > 0:
                raise ValueError(f"SandboxLimits.{name}={value!r} is invalid: it must be a positive number.")


@dataclass
class RunResult:
    """Outcome of one program run.

    status is one of: "passed", "failed" (assertion error or exit before the end), "error" (any other
    exception, syntax errors and blocked operations included), "timeout" (wall-clock or CPU limit),
    "memory" (memory limit), "file_limit" (file/output size limit), "killed" (any other signal).
    """

    passed: bool
    status: str
    detail: str
    duration_s: float
    output: str = ""


# The launcher runs inside the child: it sets the limits, reads and deletes the token, reads the program,
# installs the guard, runs the program, and prints the token only if the program's code ran to its end.
_LAUNCHER = r'''
import os, sys, resource
cpu_s, mem_b, nproc, fsize_b, guard = (int(a) for a in sys.argv[1:6])
for lim, val in ((resource.RLIMIT_CPU, (cpu_s, cpu_s + 1)), (resource.RLIMIT_AS, (mem_b, mem_b)),
                 (resource.RLIMIT_NPROC, (nproc, nproc)), (resource.RLIMIT_FSIZE, (fsize_b, fsize_b)),
                 (resource.RLIMIT_CORE, (0, 0))):
    resource.setrlimit(lim, val)
with open("_token", "rb") as f:
    token = f.read()
os.remove("_token")
with open("_program.py", encoding="utf-8") as f:
    source = f.read()
os.remove("_program.py")
out_fd = os.dup(1)
if guard:
    import builtins, io, _io, signal, _posixsubprocess
    work = os.path.realpath(os.getcwd())

    def inside(path):
        if isinstance(path, int):
            return True
        real = os.path.realpath(os.fsdecode(path))
        return real == work or real.startswith(work + os.sep)

    def check(path, what):
        if not inside(path):
            raise PermissionError(f"sandbox: {what} outside the working directory is blocked: {path!r}")

    def deny(name):
        def blocked(*args, **kwargs):
            raise PermissionError(f"sandbox: {name} is disabled")
        return blocked

    real_open = builtins.open

    def open_(file, mode="r", *args, **kwargs):
        if any(c in mode for c in "wax+"):
            check(file, "writing")
        return real_open(file, mode, *args, **kwargs)

    builtins.open = io.open = _io.open = open_

    class FileIO(_io.FileIO):
        def __init__(self, file, mode="r", *args, **kwargs):
            if any(c in mode for c in "wax+"):
                check(file, "writing")
            super().__init__(file, mode, *args, **kwargs)

    io.FileIO = _io.FileIO = FileIO
    write_flags = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND
    real_os_open = os.open

    def os_open(path, flags, mode=0o777, *, dir_fd=None):
        if flags & write_flags and (dir_fd is not None or not inside(path)):
            raise PermissionError(f"sandbox: writing outside the working directory is blocked: {path!r}")
        return real_os_open(path, flags, mode)

    os.open = os_open

    def guard_paths(name, npaths):
        real = getattr(os, name)

        def guarded(*args, **kwargs):
            if kwargs.get("dir_fd") is not None or kwargs.get("src_dir_fd") is not None or kwargs.get("dst_dir_fd") is not None:
                raise PermissionError(f"sandbox: os.{name} with dir_fd is disabled")
            for path in args[:npaths]:
                check(path, f"os.{name}")
            return real(*args, **kwargs)
        setattr(os, name, guarded)

    for name in ("remove", "unlink", "rmdir", "mkdir", "truncate", "chmod", "utime", "mkfifo", "mknod"):
        if hasattr(os, name):
            guard_paths(name, 1)
    for name in ("rename", "replace"):
        guard_paths(name, 2)
    for name in ("fork", "forkpty", "vfork", "system", "popen", "kill", "killpg", "setsid", "setpgid", "setpgrp",
                 "setuid", "setgid", "seteuid", "setegid", "setreuid", "setregid", "setresuid", "setresgid",
                 "execv", "execve", "execl", "execle", "execlp", "execlpe", "execvp", "execvpe",
                 "spawnv", "spawnve", "spawnl", "spawnle", "spawnlp", "spawnlpe", "spawnvp", "spawnvpe",
                 "posix_spawn", "posix_spawnp", "symlink", "link", "chown", "lchown", "fchown", "chroot",
                 "chdir", "fchdir", "fchmod", "pidfd_open"):
        if hasattr(os, name):
            setattr(os, name, deny(f"os.{name}"))
    for name in ("pthread_kill", "pidfd_send_signal"):
        if hasattr(signal, name):
            setattr(signal, name, deny(f"signal.{name}"))
    _posixsubprocess.fork_exec = deny("subprocess process creation")
    for name in ("ctypes", "_ctypes", "resource", "multiprocessing"):
        sys.modules[name] = None
    del builtins, io, _io, signal, _posixsubprocess, name
try:
    exec(compile(source, "<program>", "exec"), {"__name__": "__main__", "__builtins__": __builtins__})
except AssertionError:
    import traceback; traceback.print_exc(); sys.stderr.flush(); os._exit(93)
except MemoryError:
    sys.stderr.write("MemoryError: memory limit reached\n"); sys.stderr.flush(); os._exit(94)
except Exception:
    import traceback; traceback.print_exc(); sys.stderr.flush(); os._exit(92)
sys.stdout.flush()
os.write(out_fd, b"\n" + token + b"\n")
'''


def _minimal_env(home: str) -> dict[str, str]:
    return {"PATH": _MIN_PATH, "HOME": home, "TMPDIR": home, "LANG": "C.UTF-8"}


@dataclass(frozen=True)
class _Runner:
    python: str
    uid: int | None
    gid: int | None
    bwrap: str | None  # the bwrap executable when programs run in namespaces
    description: str


def _choose_user(python: str, user: str) -> tuple[str, int | None, int | None, str]:
    """(interpreter, uid, gid, description): who runs the programs, with which python."""
    own_python = python or sys.executable
    if os.geteuid() != 0:
        return own_python, None, None, f"runs as the current user (uid {os.geteuid()})"
    if not user:
        return own_python, None, None, "runs as root: RLIMIT_NPROC not enforced"
    try:
        entry = pwd.getpwnam(user)
    except KeyError:
        warnings.warn(f"sandbox: user {user!r} does not exist; untrusted code will run as root "
                      "(set SandboxLimits.user to an existing unprivileged user).", RuntimeWarning, stacklevel=4)
        return own_python, None, None, f"runs as root (user {user!r} missing): RLIMIT_NPROC not enforced"
    candidates = [python] if python else [sys.executable, *_SYSTEM_PYTHONS]
    for candidate in candidates:
        try:
            probe = subprocess.run([candidate, "-I", "-c", "import resource"], user=entry.pw_uid,
                                   group=entry.pw_gid, extra_groups=[], cwd="/", env=_minimal_env("/"),
                                   stdin=subprocess.DEVNULL, capture_output=True, timeout=30)
        except (OSError, subprocess.SubprocessError):
            continue
        if probe.returncode == 0:
            return candidate, entry.pw_uid, entry.pw_gid, f"runs as {user} (uid {entry.pw_uid}) with {candidate}"
    warnings.warn(f"sandbox: user {user!r} cannot run any of {candidates}; untrusted code will run as root. "
                  "Set SandboxLimits.python to an interpreter that user can execute.", RuntimeWarning, stacklevel=4)
    return own_python, None, None, f"runs as root ({user!r} cannot run a python): RLIMIT_NPROC not enforced"


# Never hidden, nor anything above them: the system the interpreter needs.
_SYSTEM_DIRS = ("/usr", "/bin", "/sbin", "/lib", "/lib64", "/etc", "/opt", "/tmp", "/dev", "/proc", "/sys")


def _hidden_dirs() -> list[str]:
    """Folders replaced by empty ones inside bubblewrap: the home directory, the working directory and the
    mgpo project (the folder holding pyproject.toml above this file, for a source checkout)."""
    project = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
    candidates = [os.path.expanduser("~"), os.getcwd()]
    if os.path.isfile(os.path.join(project, "pyproject.toml")):
        candidates.append(project)
    hidden = []
    for path in map(os.path.realpath, candidates):
        system = any(d == path or d.startswith(path.rstrip("/") + "/") for d in _SYSTEM_DIRS)
        if os.path.isdir(path) and not system and path not in hidden:
            hidden.append(path)
    return hidden


def _bwrap_args(bwrap: str, python: str, work: str) -> list[str]:
    """bubblewrap: new namespaces, read-only root, private /tmp and scratch dir, home and project hidden."""
    args = [bwrap, "--unshare-all", "--die-with-parent", "--new-session", "--ro-bind", "/", "/",
            "--proc", "/proc", "--dev", "/dev", "--tmpfs", "/tmp"]
    hidden = _hidden_dirs()
    for path in hidden:
        args += ["--tmpfs", path]
    # the interpreter may live below a hidden folder (a venv in the project, pyenv in the home directory)
    prefix = os.path.dirname(os.path.dirname(os.path.realpath(python)))
    prefixes = {prefix, os.path.realpath(sys.prefix), os.path.realpath(sys.base_prefix)} if python == sys.executable \
        else {prefix}
    for path in sorted(prefixes):
        if any(path.startswith(h + "/") for h in hidden):
            args += ["--ro-bind", path, path]
    for path in hidden:
        args += ["--remount-ro", path]
    return [*args, "--bind", work, work, "--chdir", work]


def _bwrap_problem(bwrap: str, python: str, uid: int | None, gid: int | None) -> str | None:
    """None when ``python`` runs inside bubblewrap as that user, else what went wrong."""
    work = tempfile.mkdtemp(prefix="mgpo-sandbox-probe-")
    try:
        if uid is not None:
            os.chown(work, uid, gid)
        user_kwargs = {"user": uid, "group": gid, "extra_groups": []} if uid is not None else {}
        probe = subprocess.run([*_bwrap_args(bwrap, python, work), python, "-I", "-c", "import resource"],
                               env=_minimal_env(work), stdin=subprocess.DEVNULL, capture_output=True, timeout=30,
                               **user_kwargs)
    except (OSError, subprocess.SubprocessError) as err:
        return f"bwrap could not start ({err})"
    finally:
        shutil.rmtree(work, ignore_errors=True)
    if probe.returncode != 0:
        why = probe.stderr.decode(errors="replace").strip().splitlines()
        return f"bwrap fails here ({why[-1] if why else f'exit status {probe.returncode}'})"
    return None


@functools.lru_cache(maxsize=None)
def _runner(python: str, user: str, isolation: str = "auto") -> _Runner:
    """Choose interpreter, user and isolation once per configuration."""
    python, uid, gid, who = _choose_user(python, user)
    if isolation == "process":
        return _Runner(python, uid, gid, None, f"{who}; process sandbox (isolation='process': no namespaces)")
    bwrap = shutil.which("bwrap")
    problem = _bwrap_problem(bwrap, python, uid, gid) if bwrap else \
        "bubblewrap (bwrap) is not installed: apt-get install bubblewrap"
    if problem is None:
        return _Runner(python, uid, gid, bwrap, f"{who}; bubblewrap namespaces (no network, read-only root, "
                                                f"own PIDs, home and project hidden)")
    if isolation == "bwrap":
        raise RuntimeError(f"sandbox: isolation='bwrap' was asked for but {problem}.")
    warnings.warn(f"sandbox: {problem}. Model-generated code will run WITHOUT network, filesystem or PID "
                  "isolation (only rlimits, the user switch and a Python guard). Install bubblewrap, or pass "
                  "SandboxLimits(isolation='process') to accept this.", RuntimeWarning, stacklevel=4)
    return _Runner(python, uid, gid, None, f"{who}; process sandbox only ({problem})")


def switches_user(limits: SandboxLimits | None = None) -> bool:
    """True when programs run as another (unprivileged) user than this process."""
    limits = limits or SandboxLimits()
    return _runner(limits.python, limits.user, limits.isolation).uid is not None


def uses_namespaces(limits: SandboxLimits | None = None) -> bool:
    """True when programs run inside bubblewrap's namespaces."""
    limits = limits or SandboxLimits()
    return _runner(limits.python, limits.user, limits.isolation).bwrap is not None


def describe_isolation(limits: SandboxLimits | None = None) -> str:
    """One line saying which user, interpreter and isolation programs run with under these limits."""
    limits = limits or SandboxLimits()
    return _runner(limits.python, limits.user, limits.isolation).description


def _tail(data: bytes, limit: int) -> str:
    text = data.decode("utf-8", errors="replace")
    return text if len(text) <= limit else "...[truncated]..." + text[-limit:]


def _read(f, limit: int) -> bytes:
    f.seek(0, os.SEEK_END)
    size = f.tell()
    f.seek(max(0, size - 4 * limit - 256))
    return f.read()


def _classify(rc: int | None, timed_out: bool, token_seen: bool, stderr: str, limits: SandboxLimits) -> tuple[str, str]:
    if timed_out:
        return "timeout", f"wall-clock limit of {limits.timeout_s}s reached; process group killed"
    if rc == 0:
        if token_seen:
            return "passed", "ran to the end"
        return "failed", "program exited with status 0 before its code finished (e.g. sys.exit): not counted as passed"
    if rc == _EXIT_ASSERT:
        return "failed", "assertion failed"
    if rc == _EXIT_MEMORY or "MemoryError" in stderr:
        return "memory", f"memory limit of {limits.memory_mb} MiB reached"
    if (rc is not None and rc < 0 and -rc == signal.SIGXFSZ) or "File too large" in stderr:
        return "file_limit", f"file/output size limit of {limits.max_file_mb} MiB reached"
    if rc == _EXIT_ERROR:
        return "error", "uncaught exception"
    if rc is not None and rc < 0:
        sig = -rc
        if sig == signal.SIGXCPU:
            return "timeout", f"CPU-time limit of {limits.cpu_s}s reached"
        return "killed", f"killed by signal {signal.Signals(sig).name}"
    return "failed", f"program exited with status {rc} before its code finished"


def run_program(source: str, limits: SandboxLimits | None = None) -> RunResult:
    """Run ``source`` as a program in a fresh sandboxed process and report how it ended.

    The program passes only if it runs to its end without an exception within the limits.
    """
    if not isinstance(source, str):
        raise TypeError(f"run_program expects the program source as str, got {type(source).__name__}.")
    limits = limits or SandboxLimits()
    runner = _runner(limits.python, limits.user, limits.isolation)
    python, uid, gid = runner.python, runner.uid, runner.gid
    token = secrets.token_hex(16).encode()
    work = tempfile.mkdtemp(prefix="mgpo-sandbox-")
    start = time.monotonic()
    try:
        with open(os.path.join(work, _TOKEN_FILE), "wb") as f:
            f.write(token)
        with open(os.path.join(work, _PROGRAM_FILE), "w", encoding="utf-8") as f:
            f.write(source)
        if uid is not None:
            for path in (work, os.path.join(work, _TOKEN_FILE), os.path.join(work, _PROGRAM_FILE)):
                os.chown(path, uid, gid)
        args = [python, "-I", "-B", "-c", _LAUNCHER, str(limits.cpu_s), str(limits.memory_mb * 2**20),
                str(limits.max_processes), str(limits.max_file_mb * 2**20), str(int(limits.guard))]
        if runner.bwrap:
            args = [*_bwrap_args(runner.bwrap, python, work), *args]
        user_kwargs = {"user": uid, "group": gid, "extra_groups": []} if uid is not None else {}
        with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
            proc = subprocess.Popen(args, cwd=work, env=_minimal_env(work), stdin=subprocess.DEVNULL,
                                    stdout=out, stderr=err, start_new_session=True, close_fds=True, **user_kwargs)
            timed_out = False
            try:
                rc = proc.wait(timeout=limits.timeout_s)
            except subprocess.TimeoutExpired:
                timed_out = True
            try:
                os.killpg(proc.pid, signal.SIGKILL)  # the program and anything it left behind in its group
            except (ProcessLookupError, PermissionError):
                pass
            rc = proc.wait()
            if runner.bwrap and rc > 128:  # bwrap reports a program killed by signal N as 128 + N
                rc = 128 - rc
            duration = time.monotonic() - start
            stdout_raw = _read(out, limits.max_output_chars)
            stderr_text = _tail(_read(err, limits.max_output_chars), limits.max_output_chars)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    stripped = stdout_raw.rstrip(b"\n")
    token_seen = stripped.endswith(b"\n" + token) or stripped == token
    if token_seen:
        stdout_raw = stripped[: -len(token) - 1]
    status, reason = _classify(None if timed_out else rc, timed_out, token_seen, stderr_text, limits)
    detail = reason if not stderr_text.strip() else f"{reason}\n{stderr_text.strip()}"
    return RunResult(passed=status == "passed", status=status, detail=detail, duration_s=duration,
                     output=_tail(stdout_raw, limits.max_output_chars))


def run_programs(sources: list[str], limits: SandboxLimits | None = None, workers: int = 2) -> list[RunResult]:
    """Run many programs with a small thread pool (each still in its own process); results keep the order."""
    if workers < 1:
        raise ValueError(f"workers={workers} is invalid: use at least 1 worker.")
    with ThreadPoolExecutor(max_workers=workers) as pool:
        return list(pool.map(lambda s: run_program(s, limits), sources))
