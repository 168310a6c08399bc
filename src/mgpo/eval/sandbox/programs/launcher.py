"""The launcher: the first code of every sandboxed process (``python -I -B -c <codec + this file>``).

It sets the resource limits, reads the program from an inherited descriptor of an unlinked file (nothing is left
on disk), installs the guard and runs the program. Then, for ``run_program``, it prints the token that was sent with
the program; for ``judge`` it serves calls of the program's function over two pipes, and holds no token and no
channel to a verdict. Its arguments: see ``main``; the parent builds them in ``mgpo.eval.sandbox.run``.

The guard blocks writing outside the working directory, path-changing and process functions of ``os``, and
makes ctypes/resource unimportable. It gives clear messages; it is not a boundary (bubblewrap's namespaces are).
"""

from __future__ import annotations

import os
import resource
import sys

from .codec import EXIT_ASSERT, EXIT_ERROR, EXIT_MEMORY, decode, encode, read_frame, write_frame

TYPE_CHECKING = False  # typing costs ~13 ms at each start of a sandboxed process: for checkers only
if TYPE_CHECKING:
    from collections.abc import Callable
    from typing import Any, NoReturn


_PROCESS_FUNCTIONS = (
    "fork",
    "forkpty",
    "vfork",
    "system",
    "popen",
    "kill",
    "killpg",
    "setsid",
    "setpgid",
    "setpgrp",
    "setuid",
    "setgid",
    "seteuid",
    "setegid",
    "setreuid",
    "setregid",
    "setresuid",
    "setresgid",
    "execv",
    "execve",
    "execl",
    "execle",
    "execlp",
    "execlpe",
    "execvp",
    "execvpe",
    "spawnv",
    "spawnve",
    "spawnl",
    "spawnle",
    "spawnlp",
    "spawnlpe",
    "spawnvp",
    "spawnvpe",
    "posix_spawn",
    "posix_spawnp",
    "symlink",
    "link",
    "chown",
    "lchown",
    "fchown",
    "chroot",
    "chdir",
    "fchdir",
    "fchmod",
    "pidfd_open",
    "memfd_create",
)


def set_limits(cpu_s: int, mem_b: int, nproc: int, fsize_b: int, nofile: int) -> None:
    for lim, val in (
        (resource.RLIMIT_CPU, (cpu_s, cpu_s + 1)),
        (resource.RLIMIT_AS, (mem_b, mem_b)),
        (resource.RLIMIT_NPROC, (nproc, nproc)),
        (resource.RLIMIT_FSIZE, (fsize_b, fsize_b)),
        (resource.RLIMIT_NOFILE, (nofile, nofile)),
        (resource.RLIMIT_CORE, (0, 0)),
    ):
        resource.setrlimit(lim, val)


def _deny(name: str) -> Callable[..., NoReturn]:
    def blocked(*args: Any, **kwargs: Any) -> NoReturn:
        raise PermissionError(f"sandbox: {name} is disabled")

    return blocked


def _guard_writes(work: str) -> Callable[[Any, str], None]:
    """Opening files for writing outside ``work`` fails (open, io.open, io.FileIO, os.open); returns the check."""
    import _io
    import builtins
    import io

    def inside(path: Any) -> bool:
        if isinstance(path, int):
            return True
        real = os.path.realpath(os.fsdecode(path))
        return real == work or real.startswith(work + os.sep)

    def check(path: Any, what: str) -> None:
        if not inside(path):
            raise PermissionError(f"sandbox: {what} outside the working directory is blocked: {path!r}")

    real_open = builtins.open

    def open_(file: Any, mode: str = "r", *args: Any, **kwargs: Any) -> Any:
        if any(c in mode for c in "wax+"):
            check(file, "writing")
        return real_open(file, mode, *args, **kwargs)

    builtins.open = io.open = _io.open = open_

    class FileIO(_io.FileIO):
        def __init__(self, file: Any, mode: str = "r", *args: Any, **kwargs: Any) -> None:
            if any(c in mode for c in "wax+"):
                check(file, "writing")
            super().__init__(file, mode, *args, **kwargs)

    io.FileIO = _io.FileIO = FileIO  # type: ignore[misc]
    write_flags = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND
    real_os_open = os.open

    def os_open(path: Any, flags: int, mode: int = 0o777, *, dir_fd: Any = None) -> int:
        if flags & write_flags and (dir_fd is not None or not inside(path)):
            raise PermissionError(f"sandbox: writing outside the working directory is blocked: {path!r}")
        return real_os_open(path, flags, mode)

    os.open = os_open
    return check


def _guard_paths(check: Callable[[Any, str], None], name: str, npaths: int) -> None:
    """``os.<name>`` refuses paths outside the working directory and any dir_fd."""
    real = getattr(os, name)

    def guarded(*args: Any, **kwargs: Any) -> Any:
        if any(kwargs.get(k) is not None for k in ("dir_fd", "src_dir_fd", "dst_dir_fd")):
            raise PermissionError(f"sandbox: os.{name} with dir_fd is disabled")
        for path in args[:npaths]:
            check(path, f"os.{name}")
        return real(*args, **kwargs)

    setattr(os, name, guarded)


def install_guard() -> None:
    """The Python-level guard: clear messages for what the program may not do (not a boundary)."""
    import _posixsubprocess
    import signal

    check = _guard_writes(os.path.realpath(os.getcwd()))
    for name in ("remove", "unlink", "rmdir", "mkdir", "truncate", "chmod", "utime", "mkfifo", "mknod"):
        if hasattr(os, name):
            _guard_paths(check, name, 1)
    for name in ("rename", "replace"):
        _guard_paths(check, name, 2)
    for name in _PROCESS_FUNCTIONS:
        if hasattr(os, name):
            setattr(os, name, _deny(f"os.{name}"))
    for name in ("pthread_kill", "pidfd_send_signal"):
        if hasattr(signal, name):
            setattr(signal, name, _deny(f"signal.{name}"))
    _posixsubprocess.fork_exec = _deny("subprocess process creation")
    for name in ("ctypes", "_ctypes", "resource", "multiprocessing"):
        sys.modules[name] = None  # type: ignore[assignment]


def run(source: str, namespace: dict[str, Any]) -> None:
    """Execute the program; an uncaught exception ends the process with the status that names its kind."""
    try:
        exec(compile(source, "<program>", "exec"), namespace)
    except AssertionError:
        import traceback

        traceback.print_exc()
        sys.stderr.flush()
        os._exit(EXIT_ASSERT)
    except MemoryError:
        sys.stderr.write("MemoryError: memory limit reached\n")
        sys.stderr.flush()
        os._exit(EXIT_MEMORY)
    except Exception:
        import traceback

        traceback.print_exc()
        sys.stderr.flush()
        os._exit(EXIT_ERROR)


def serve(namespace: dict[str, Any], entry: str, req_fd: int, rep_fd: int, max_msg: int) -> NoReturn:
    """Judge: answer calls of the program's function ``entry`` (looked up at each call, as the program may rebind
    it) until the harness closes the channel."""
    while True:
        request = read_frame(req_fd, max_msg)
        if request is None:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(0)
        try:
            value = namespace[entry](*decode(request["args"]), **decode(request["kwargs"]))
            reply = {"return": encode(value)}
        except BaseException as err:  # SystemExit and KeyboardInterrupt too: they end the call, not the judge
            reply = {"raise": [type(err).__name__, str(err)[:1000]]}
        sys.stdout.flush()
        write_frame(rep_fd, reply)


def main() -> None:
    cpu_s, mem_b, nproc, fsize_b, nofile, guard, src_fd, req_fd, rep_fd, max_msg = (int(a) for a in sys.argv[1:11])
    entry = sys.argv[11]
    set_limits(cpu_s, mem_b, nproc, fsize_b, nofile)
    with os.fdopen(src_fd, "rb") as f:
        token, _, program = f.read().partition(b"\n")
    source = program.decode("utf-8")
    out_fd = os.dup(1)
    if guard:
        install_guard()
    namespace: dict[str, Any] = {"__name__": "__main__", "__builtins__": __builtins__}
    run(source, namespace)
    sys.stdout.flush()
    if not entry:
        os.write(out_fd, b"\n" + token + b"\n")
        sys.exit(0)
    del token
    serve(namespace, entry, req_fd, rep_fd, max_msg)


if __name__ == "__main__":
    main()
