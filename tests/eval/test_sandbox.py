"""Hostile programs must only cost their own result; the test process must survive each of them.

The default tests run with the default isolation (bubblewrap when installed, as on CI); the ``PROCESS`` tests
pin the fallback (rlimits + user switch + Python guard), and the ``needs_bwrap`` tests turn the Python guard
off so that only the namespaces stand between the program and the machine.
"""

import dataclasses
import os
import secrets
import socket
import subprocess
import textwrap
import time
import warnings
from pathlib import Path

import pytest

from mgpo.eval.sandbox import (
    RunResult,
    SandboxLimits,
    cgroup,
    describe_isolation,
    isolation,
    judge,
    run_program,
    run_programs,
    switches_user,
    uses_namespaces,
)

FAST = SandboxLimits(timeout_s=5, cpu_s=3, memory_mb=256, max_processes=8, max_file_mb=2)
PROCESS = dataclasses.replace(FAST, isolation="process")
HOSTILE = dataclasses.replace(FAST, guard=False, isolation="bwrap")  # the namespaces alone
PROJECT = Path(__file__).resolve().parents[2]

needs_bwrap = pytest.mark.skipif(
    not uses_namespaces(FAST), reason=f"bubblewrap is not usable here: {describe_isolation(FAST)}"
)

needs_user_switch = pytest.mark.skipif(
    not switches_user(FAST),
    reason=f"only meaningful when programs run as another user; here: {describe_isolation(FAST)}",
)


def src(text: str) -> str:
    return textwrap.dedent(text).strip() + "\n"


def test_correct_program_passes_and_output_is_captured():
    result = run_program(
        src("""
        def add(a, b):
            return a + b
        assert add(2, 3) == 5
        print("hello from the sandbox")
    """),
        FAST,
    )
    assert isinstance(result, RunResult)
    assert result.passed and result.status == "passed", result.detail
    assert result.output.strip() == "hello from the sandbox"
    assert result.duration_s > 0


def test_failed_assertion_and_exceptions_are_failures():
    failed = run_program("assert 1 + 1 == 3\n", FAST)
    assert (failed.passed, failed.status) == (False, "failed")
    assert "AssertionError" in failed.detail
    error = run_program("raise ValueError('boom')\n", FAST)
    assert (error.passed, error.status) == (False, "error")
    assert "ValueError: boom" in error.detail
    syntax = run_program("def broken(:\n", FAST)
    assert (syntax.passed, syntax.status) == (False, "error")
    assert "SyntaxError" in syntax.detail


@pytest.mark.parametrize("exit_code", ["import sys; sys.exit(0)", "import os; os._exit(0)", "raise SystemExit"])
def test_premature_exit_does_not_count_as_pass(exit_code):
    result = run_program(
        src(f"""
        def solution():
            return 1
        {exit_code}
        assert solution() == 2
    """),
        FAST,
    )
    assert not result.passed
    assert result.status == "failed"
    assert "before its code finished" in result.detail


def test_infinite_loop_hits_the_wall_clock_timeout():
    limits = SandboxLimits(timeout_s=1.0, cpu_s=30, memory_mb=256, max_processes=8)
    start = time.monotonic()
    result = run_program("import time\nwhile True:\n    time.sleep(0.01)\n", limits)
    assert time.monotonic() - start < 10
    assert (result.passed, result.status) == (False, "timeout")
    assert "wall-clock" in result.detail


def test_busy_loop_hits_the_cpu_limit():
    limits = SandboxLimits(timeout_s=20, cpu_s=1, memory_mb=256, max_processes=8)
    result = run_program("while True:\n    pass\n", limits)
    assert (result.passed, result.status) == (False, "timeout")
    assert "CPU" in result.detail
    assert result.duration_s < 15


def test_unbounded_allocation_hits_the_memory_limit():
    limits = SandboxLimits(timeout_s=20, cpu_s=10, memory_mb=200, max_processes=8)
    result = run_program(
        src("""
        blocks = []
        while True:
            blocks.append(bytearray(10 * 2**20))
    """),
        limits,
    )
    assert (result.passed, result.status) == (False, "memory")


def test_huge_output_is_bounded():
    result = run_program("while True:\n    print('x' * 10000)\n", FAST)
    assert not result.passed and result.status == "file_limit"
    assert len(result.output) <= FAST.max_output_chars + 50


def test_fork_bomb_is_blocked_by_the_guard():
    result = run_program(
        src("""
        import os
        while True:
            os.fork()
    """),
        FAST,
    )
    assert (result.passed, result.status) == (False, "error")
    assert "os.fork is disabled" in result.detail
    blocked = run_program("import subprocess\nsubprocess.run(['true'])\n", FAST)
    assert blocked.status == "error" and "disabled" in blocked.detail


def _alive_with_args(marker: str) -> list[int]:
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                args = f.read().split(b"\0")
        except OSError:
            continue
        if marker.encode() in args:
            pids.append(int(entry))
    return pids


@needs_user_switch
@pytest.mark.parametrize("isolation", ["auto", "process"])
def test_fork_bomb_without_guard_is_bounded_by_rlimit_nproc_and_cleaned_up(isolation):
    # Unusual memory size: its byte count appears in every forked child's command line.
    limits = SandboxLimits(timeout_s=3, cpu_s=2, memory_mb=237, max_processes=6, guard=False, isolation=isolation)
    marker = str(237 * 2**20)
    result = run_program(
        src("""
        import os, time
        children = 0
        while True:
            try:
                if os.fork() == 0:
                    time.sleep(60)
                    os._exit(0)
                children += 1
            except OSError:
                print("fork refused after", children, "children", flush=True)
                time.sleep(60)
    """),
        limits,
    )
    assert not result.passed and result.status == "timeout"
    assert "fork refused after" in result.output
    refused_after = int(result.output.split("after")[1].split()[0])
    assert refused_after < limits.max_processes
    for _ in range(50):  # killed processes may take a moment to disappear
        if not _alive_with_args(marker):
            break
        time.sleep(0.1)
    assert _alive_with_args(marker) == []


def test_writing_outside_the_working_directory_is_blocked(tmp_path):
    target = tmp_path / "escaped.txt"
    for code in (
        f"open({str(target)!r}, 'w').write('x')\n",
        f"import pathlib\npathlib.Path({str(target)!r}).write_text('x')\n",
        f"import os\nos.close(os.open({str(target)!r}, os.O_WRONLY | os.O_CREAT))\n",
        f"import os\nos.remove({str(tmp_path / 'keep.txt')!r})\n",
    ):
        (tmp_path / "keep.txt").write_text("keep")
        result = run_program(code, FAST)
        assert not result.passed and result.status == "error", code
        assert not target.exists()
        assert (tmp_path / "keep.txt").read_text() == "keep"
    inside = run_program(
        src("""
        import os, pathlib
        open("a.txt", "w").write("data")
        pathlib.Path("sub").mkdir()
        pathlib.Path("sub/b.txt").write_text("more")
        assert open("a.txt").read() == "data"
        os.remove("a.txt")
    """),
        FAST,
    )
    assert inside.passed, inside.detail


@needs_user_switch
def test_writing_outside_without_guard_is_refused_by_the_os(tmp_path):
    target = tmp_path / "escaped.txt"
    result = run_program(
        f"open({str(target)!r}, 'w').write('x')\n", SandboxLimits(timeout_s=5, guard=False, isolation="process")
    )
    assert not result.passed and "PermissionError" in result.detail
    assert not target.exists()


@pytest.mark.parametrize("limits", [FAST, PROCESS], ids=["default", "process"])
def test_working_directory_is_fresh_and_removed(limits):
    marker = f"left-{secrets.token_hex(4)}.txt"
    first = run_program(
        f"import os\nprint(os.getcwd())\nprint(os.listdir('.'))\nopen({marker!r}, 'w').write('x')\n", limits
    )
    assert first.passed, first.detail
    workdir, listing = first.output.split("\n")[:2]
    assert listing == "[]"  # nothing of the launcher is left on disk
    # bubblewrap: the private /tmp vanished with the namespace; process sandbox: the folder is deleted
    assert not os.path.exists(os.path.join(workdir, marker))
    assert uses_namespaces(limits) or not os.path.exists(workdir)
    second = run_program(f"import os\nprint(os.getcwd())\nassert not os.path.exists({marker!r})\n", limits)
    assert second.passed, second.detail


def test_killing_the_parent_or_itself_costs_only_its_own_result():
    parent = run_program("import os\nos.kill(os.getppid(), 9)\n", FAST)
    assert not parent.passed and parent.status == "error" and "os.kill is disabled" in parent.detail
    own = run_program(
        "import os\nos.kill(os.getpid(), 9)\nprint('unreachable')\n", SandboxLimits(timeout_s=5, guard=False)
    )
    assert not own.passed and own.status == "killed" and "SIGKILL" in own.detail
    assert os.getpid() > 0  # still here


@needs_user_switch
def test_killing_the_parent_without_guard_is_refused_by_the_os():
    result = run_program(
        "import os\nos.kill(os.getppid(), 9)\n", SandboxLimits(timeout_s=5, guard=False, isolation="process")
    )
    assert not result.passed and "PermissionError" in result.detail


def test_parent_environment_secrets_are_not_visible(monkeypatch):
    monkeypatch.setenv("SECRET_TOKEN", "hunter2-do-not-leak")
    result = run_program(
        src("""
        import os
        print(sorted(os.environ))
        assert "SECRET_TOKEN" not in os.environ
        assert all("hunter2" not in v for v in os.environ.values())
    """),
        FAST,
    )
    assert result.passed, result.detail
    assert "SECRET_TOKEN" not in result.output


@needs_user_switch
def test_parent_environment_cannot_be_read_through_proc(monkeypatch):
    monkeypatch.setenv("SECRET_TOKEN", "hunter2-do-not-leak")
    for limits in (FAST, PROCESS):  # bwrap: the parent is the namespace's init; process: permission denied
        result = run_program("import os\nprint(open(f'/proc/{os.getppid()}/environ', 'rb').read())\n", limits)
        assert "hunter2" not in result.output and "hunter2" not in result.detail


def test_run_programs_keeps_order():
    results = run_programs(
        ["assert True\n", "assert False\n", "while True: pass\n", "print(6 * 7)\n"],
        SandboxLimits(timeout_s=1.5, cpu_s=5, max_processes=4),
        workers=2,
    )
    assert [r.status for r in results] == ["passed", "failed", "timeout", "passed"]
    assert results[3].output.strip() == "42"


def test_bad_limits_are_rejected():
    with pytest.raises(ValueError, match="timeout_s"):
        SandboxLimits(timeout_s=0)
    with pytest.raises(TypeError, match="str"):
        run_program(b"print(1)")


# ----------------------------------------------------------------------------- the fallback (no bubblewrap)


def test_process_fallback_runs_programs_and_its_guard_blocks(tmp_path):
    assert run_program("assert sum(range(4)) == 6\n", PROCESS).passed
    fork = run_program("import os\nos.fork()\n", PROCESS)
    assert fork.status == "error" and "os.fork is disabled" in fork.detail
    target = tmp_path / "escaped.txt"
    write = run_program(f"open({str(target)!r}, 'w').write('x')\n", PROCESS)
    assert write.status == "error" and not target.exists()
    loop = run_program("while True: pass\n", dataclasses.replace(PROCESS, timeout_s=1, cpu_s=30))
    assert loop.status == "timeout"


def test_missing_bwrap_warns_once_naming_it_and_falls_back(monkeypatch):
    monkeypatch.setattr(isolation.shutil, "which", lambda name: None)
    isolation.runner.cache_clear()
    try:
        with pytest.warns(RuntimeWarning, match=r"bubblewrap \(bwrap\) is not installed.*WITHOUT network"):
            result = run_program("print(1)\n", FAST)
        assert result.passed and not uses_namespaces(FAST)
        assert "process sandbox only" in describe_isolation(FAST)
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # once per configuration, not once per program
            assert run_program("print(2)\n", FAST).passed
        with pytest.raises(RuntimeError, match="isolation='bwrap'.*apt-get install bubblewrap"):
            run_program("print(3)\n", dataclasses.replace(FAST, isolation="bwrap"))
    finally:
        isolation.runner.cache_clear()


def test_too_old_bwrap_is_named_with_the_fix(monkeypatch, tmp_path):
    fake = tmp_path / "bwrap"  # a bubblewrap from before --size (Ubuntu 22.04 ships 0.6.1)
    fake.write_text("#!/bin/sh\nif [ \"$1\" = --version ]; then echo bubblewrap 0.6.1; else echo '--args FD'; fi\n")
    fake.chmod(0o755)
    monkeypatch.setattr(isolation.shutil, "which", lambda name: str(fake))
    isolation.runner.cache_clear()
    try:
        with pytest.raises(RuntimeError, match=r"bubblewrap 0.6.1 is too old.*--size.*upgrade the bubblewrap package"):
            run_program("print(1)\n", dataclasses.replace(FAST, isolation="bwrap"))
        with pytest.warns(RuntimeWarning, match=r"too old.*WITHOUT network"):
            assert run_program("print(2)\n", FAST).passed
    finally:
        isolation.runner.cache_clear()


@pytest.mark.skipif(os.geteuid() != 0, reason="the warning is about running untrusted code as root")
def test_staying_root_warns_that_the_budget_does_not_hold():
    isolation.runner.cache_clear()
    try:
        with pytest.warns(RuntimeWarning, match=r"RLIMIT_NPROC.*memory_budget_mb does not hold"):
            describe_isolation(dataclasses.replace(FAST, user=""))
    finally:
        isolation.runner.cache_clear()


def test_bad_isolation_is_rejected():
    with pytest.raises(ValueError, match="isolation='docker'.*auto, bwrap, process"):
        SandboxLimits(isolation="docker")


# ----------------------------------------------------------------------------- hostile code, bubblewrap alone


@needs_bwrap
def test_no_network_even_to_the_hosts_loopback():
    with socket.create_server(("127.0.0.1", 0)) as server:
        port = server.getsockname()[1]
        result = run_program(
            src(f"""
            import socket
            try:
                socket.create_connection(("127.0.0.1", {port}), timeout=2)
                print("connected")
            except OSError as err:
                print("refused:", err)
        """),
            HOSTILE,
        )
        server.settimeout(0.5)
        with pytest.raises(OSError):  # nothing ever reached the server
            server.accept()
    assert result.passed, result.detail
    assert "refused:" in result.output and "connected" not in result.output


@needs_bwrap
def test_secret_file_in_the_project_cannot_be_read():
    secret = PROJECT / f".sandbox-secret-{secrets.token_hex(4)}"
    value = secrets.token_hex(16)
    secret.write_text(value)
    secret.chmod(0o644)  # world-readable: only the hidden folder protects it
    try:
        result = run_program(f"print(open({str(secret)!r}).read())\n", HOSTILE)
        at_home = run_program("import os\nprint(os.listdir(os.path.expanduser('~')))\n", HOSTILE)
    finally:
        secret.unlink()
    assert not result.passed and "FileNotFoundError" in result.detail
    assert value not in result.output and value not in result.detail
    assert secret.name not in at_home.output


@needs_bwrap
def test_writes_outside_the_scratch_dir_fail_and_leave_nothing(tmp_path):
    targets = [
        tmp_path / "escaped.txt",
        PROJECT / f".escaped-{secrets.token_hex(4)}",
        Path("/var/tmp/escaped"),
        Path("/etc/escaped"),
    ]
    result = run_program(
        src(f"""
        for path in {[str(t) for t in targets]!r}:
            try:
                open(path, "w").write("x")
                print("wrote", path)
            except OSError as err:
                print("refused", path, type(err).__name__)
        open("/tmp/private.txt", "w").write("the private /tmp is writable")
        open("scratch.txt", "w").write("so is the scratch dir")
    """),
        HOSTILE,
    )
    assert result.passed, result.detail
    assert result.output.count("refused") == len(targets), result.output
    assert not any(t.exists() for t in targets)


@needs_bwrap
def test_memory_bomb_and_infinite_loop_are_stopped():
    memory = run_program(
        "b = []\nwhile True:\n    b.append(bytearray(10 * 2**20))\n",
        dataclasses.replace(HOSTILE, memory_mb=200, timeout_s=20),
    )
    assert memory.status == "memory", memory.detail
    loop = run_program("while True: pass\n", dataclasses.replace(HOSTILE, cpu_s=1, timeout_s=20))
    assert loop.status == "timeout" and "CPU" in loop.detail
    sleeper = run_program("import time\ntime.sleep(60)\n", dataclasses.replace(HOSTILE, timeout_s=1))
    assert sleeper.status == "timeout" and "wall-clock" in sleeper.detail


@needs_bwrap
def test_program_cannot_see_or_kill_the_parent_or_other_processes():
    victim = subprocess.Popen(["sleep", "60"])
    try:
        result = run_program(
            src(f"""
            import os
            print("pid", os.getpid(), "processes", sorted(int(p) for p in os.listdir("/proc") if p.isdigit()))
            for pid in (os.getppid(), {os.getpid()}, {victim.pid}):
                try:
                    os.kill(pid, 9)
                except OSError as err:
                    print("refused", pid, type(err).__name__)
        """),
            HOSTILE,
        )
        assert victim.poll() is None  # still running
    finally:
        victim.kill()
        victim.wait()
    assert result.passed, result.detail
    assert result.output.startswith("pid 2 processes [1, 2]"), result.output


@needs_bwrap
def test_setsid_escape_is_killed_with_the_namespace():
    marker = f"{secrets.randbelow(10**6) + 10**6}.5"  # a sleep duration no other process uses
    result = run_program(
        src(f"""
        import os
        if os.fork() == 0:
            os.setsid()
            os.execv("/bin/sleep", ["sleep", "{marker}"])
        print("parent done")
    """),
        HOSTILE,
    )
    assert result.passed, result.detail
    for _ in range(50):  # killed processes may take a moment to disappear
        if not _alive_with_args(marker):
            break
        time.sleep(0.1)
    assert _alive_with_args(marker) == []


# ----------------------------------------------------------------------------- total bounds (finding 5)


@needs_bwrap
@pytest.mark.parametrize("where", ["/tmp", "/dev/shm", "."])
def test_in_memory_file_systems_are_size_limited(where):
    """posix.open is not covered by the guard; only the tmpfs size stops the writes."""
    limits = dataclasses.replace(HOSTILE, guard=True, tmpfs_mb=8, timeout_s=20)
    result = run_program(
        src(f"""
        import posix
        written = 0
        try:
            for i in range(48):  # 48 files of 1 MiB, each well under the per-file limit
                fd = posix.open("{where}/f%d" % i, posix.O_WRONLY | posix.O_CREAT, 0o600)
                posix.write(fd, b"x" * 2**20)
                posix.close(fd)
                written += 1
        finally:
            print("written MiB", written, flush=True)
    """),
        limits,
    )
    assert not result.passed and result.status == "error", result.detail
    assert "No space left on device" in result.detail
    assert int(result.output.split()[-1]) <= limits.tmpfs_mb


@needs_bwrap
def test_dev_is_read_only():
    result = run_program("import posix\nposix.open('/dev/filler', posix.O_WRONLY | posix.O_CREAT, 0o600)\n", HOSTILE)
    assert not result.passed and "Read-only file system" in result.detail


@needs_bwrap
@needs_user_switch
def test_forked_children_cannot_together_hold_more_than_the_budget():
    limits = SandboxLimits(timeout_s=30, cpu_s=20, memory_mb=512, guard=False, isolation="bwrap")
    result = run_program(
        src("""
        import os, select, time
        read_end, write_end = os.pipe()
        for _ in range(4):
            try:
                if os.fork() == 0:
                    block = bytearray(b"x") * (400 * 2**20)  # touched: really held
                    os.write(write_end, b"+")
                    time.sleep(30)
                    os._exit(0)
            except OSError as err:
                print("fork refused:", err, flush=True)
        os.close(write_end)
        deadline = time.time() + 10  # a child that could allocate has done so by then
        held = 0
        while held < 4 and select.select([read_end], [], [], max(0, deadline - time.time()))[0]:
            held += len(os.read(read_end, 4))
        print("children holding 400 MiB:", held, flush=True)
    """),
        limits,
    )
    held = int(result.output.split()[-1])
    assert held < 4, result.output
    assert held * 400 + 400 <= limits.memory_budget_mb  # the children and their parent


@needs_bwrap
def test_proc_1_cmdline_names_no_host_path():
    hidden = [str(PROJECT), os.path.expanduser("~"), os.getcwd(), "mgpo-sandbox"]
    result = run_program(
        src(f"""
        for path in ("/proc/1/cmdline", "/proc/self/cmdline", "/proc/1/environ", "/proc/self/environ"):
            text = open(path, "rb").read().replace(b"\\0", b" ").decode(errors="replace")
            print(path, text[:20].strip(), [h for h in {hidden!r} if h in text])
    """),
        HOSTILE,
    )
    assert result.passed, result.detail
    assert "bwrap --arg" in result.output.splitlines()[0], result.output  # options came through a descriptor
    assert result.output.count("[]") == 4, result.output


@pytest.mark.parametrize("stream", ["stdout", "stderr"])
def test_a_1_gib_flood_on_either_stream_is_a_file_limit(stream):
    result = run_program(f"import sys\nfor _ in range(1024):\n    sys.{stream}.write('x' * 2**20)\n", FAST)
    assert not result.passed and result.status == "file_limit", result.detail
    judged = judge(
        f"import sys\ndef f():\n    for _ in range(1024):\n        sys.{stream}.write('x' * 2**20)\n    return 1\n",
        "f",
        "assert candidate() == 1\n",
        FAST,
    )
    assert not judged.passed and judged.status == "file_limit", judged.detail


needs_cgroup = pytest.mark.skipif(
    cgroup.cgroup_homes()[0] is None, reason=f"no memory cgroup for the programs here: {cgroup.cgroup_homes()[1]}"
)


@needs_cgroup
def test_memory_outside_the_address_space_is_bounded_by_the_cgroup():
    """memfd files that are never mapped count toward no rlimit; the cgroup charges them to the budget."""
    limits = SandboxLimits(timeout_s=20, memory_mb=256, max_processes=2, tmpfs_mb=8, memory_budget_mb=600, guard=False)
    result = run_program(
        src("""
        import os
        for i in range(60):  # 60 files x 15 MiB = 900 MiB, each under the per-file limit
            fd = os.memfd_create("hold")
            for _ in range(15):
                os.write(fd, b"x" * 2**20)
            print(i + 1, flush=True)
    """),
        limits,
    )
    assert not result.passed and result.status == "memory", result.detail
    assert "memory budget of 600 MiB" in result.detail
    assert int(result.output.split()[-1]) * 15 <= 600
    home_memory, home_pids = cgroup.cgroup_homes()[0]
    assert not [n for h in (home_memory, home_pids) for n in os.listdir(h) if n.startswith("mgpo-sandbox-")]


def test_a_budget_the_limits_exceed_is_refused():
    with pytest.raises(ValueError, match=r"8 x 512 \+ 2 x 64 = 4224 MiB exceeds memory_budget_mb=2560"):
        SandboxLimits(max_processes=8, memory_mb=512)
    assert SandboxLimits(max_processes=8, memory_mb=512, memory_budget_mb=4224).max_processes == 8


# ----------------------------------------------------------------------------- the judge


def test_judge_passes_plain_data_both_ways():
    program = "def echo(*args, **kwargs):\n    return [args, kwargs]\n"
    values = [
        0,
        -7,
        10**40,
        1.5,
        -0.0,
        float("inf"),
        "text ü",
        "",
        True,
        None,
        [1, [2, []]],
        (1, "a"),
        (),
        {1: "x", "k": [1.0]},
        {"a": {"b": (1,)}},
        {1, 2},
        frozenset({(1, 2)}),
    ]
    tests = src(f"""
        import math
        inf = math.inf
        values = {values!r}
        args, kwargs = candidate(*values, key=(1, 2), nan=float("nan"))
        assert type(args) is tuple and list(args) == values, args
        assert [type(v) for v in args] == [type(v) for v in values]
        assert kwargs["key"] == (1, 2) and math.isnan(kwargs["nan"])
        assert math.copysign(1.0, args[4]) == -1.0
    """)
    result = judge(program, "echo", tests, FAST)
    assert result.passed, result.detail


def test_judge_reports_each_way_of_not_passing():
    add = "def add(a, b):\n    return a + b\n"
    assert judge(add, "add", "assert candidate(2, 3) == 5\n", FAST).passed
    assert judge(add, "add", "assert candidate(2, 3) == 6\n", FAST).status == "failed"
    assert judge(add, "add", "candidate('a', 1)\n", FAST).status == "error"
    assert judge("def add(:\n", "add", "candidate(1, 2)\n", FAST).status == "error"
    assert judge(add, "missing", "candidate(1, 2)\n", FAST).status == "error"
    slow = judge(
        "def add(a, b):\n    while True: pass\n",
        "add",
        "candidate(1, 2)\n",
        dataclasses.replace(FAST, timeout_s=20, cpu_s=1),
    )
    assert slow.status == "timeout" and "CPU" in slow.detail, slow.detail
    hang = judge(
        "import time\ndef add(a, b):\n    time.sleep(60)\n",
        "add",
        "candidate(1, 2)\n",
        dataclasses.replace(FAST, timeout_s=1),
    )
    assert hang.status == "timeout" and "wall-clock" in hang.detail
    memory = judge("def add(a, b):\n    return bytearray(2**40)\n", "add", "candidate(1, 2)\n", FAST)
    assert memory.status == "memory", memory.detail
    huge = judge("def add(a, b):\n    return 'x' * 5 * 2**20\n", "add", "candidate(1, 2)\n", FAST)
    assert huge.status == "reply_limit" and "exceeds the limit of 4194304 bytes" in huge.detail, huge.detail
    with pytest.raises(ValueError, match="identifier"):
        judge(add, "not a name", "", FAST)


def test_the_programs_are_sent_as_the_codec_then_the_module_without_its_codec_import(tmp_path, monkeypatch):
    from mgpo.eval.sandbox import programs

    for name, text in (("launcher", programs.LAUNCHER), ("harness", programs.HARNESS)):
        compile(text, name, "exec")  # one valid module: the codec's names are defined above the program's code
        assert (
            "from .codec import" not in text
            and "def encode(" in text
            and text.index("def encode(") < text.index("def main(")
        )
    # a program that does not import the codec in one statement is refused by name, not sent half-built
    monkeypatch.setattr(programs, "_HERE", tmp_path)
    (tmp_path / "codec.py").write_text("X = 1\n")
    (tmp_path / "broken.py").write_text("import json\n")
    with pytest.raises(RuntimeError, match="broken.py must import the codec"):
        programs.source("broken")
