"""A completion must not be able to grade itself: every route to a forged pass is scored not-passed.

These go through ``humaneval.check`` / ``humaneval.evaluate`` (the public path a model's code takes), with the
toy problem below (one test: ``candidate(2, 3) == 5``). Each attack first collects everything that could be an
end-of-run token by its route, then "sprays" it: writes it, framed like the old token line, to every file
descriptor 0..1024 and to every descriptor reachable through /proc (its own, its parent's, pid 1's), using
``posix`` so that the Python guard is not in the way, and exits with status 0. Against the old design (a token
in the program's own process) the first four routes forged a pass.
"""

import os
import textwrap

import pytest

from mgpo.eval.humaneval import check, evaluate, load_problems
from mgpo.eval.sandbox import SandboxLimits
from tests.eval.test_humaneval import PROBLEM  # the toy problem both files grade

LIMITS = SandboxLimits(timeout_s=10, cpu_s=5, memory_mb=512, max_processes=4)
NO_GUARD = SandboxLimits(timeout_s=10, cpu_s=5, memory_mb=512, max_processes=4, guard=False)

# How each attack finds token-like values (32 hex digits, as bytes) in its own process.
ROUTES = {
    "main_globals": """
        main = vars(sys.modules["__main__"])
        found += [main.get("token", b"")]
        spray_fds += [main.get("out_fd", 1)]
    """,
    "frames": """
        frame = sys._getframe()
        while frame is not None:
            found += [v for scope in (frame.f_globals, frame.f_locals) for v in list(scope.values())]
            frame = frame.f_back
    """,
    "inspect": """
        import inspect
        found += [v for info in inspect.stack() for v in list(info.frame.f_globals.values())]
    """,
    "gc": """
        import gc
        found += [v for d in gc.get_objects() if type(d) is dict for v in list(d.values())]
    """,
    "token_lookalike": """
        import secrets
        found += [secrets.token_hex(16), "passed", "ran to the end"]
    """,
}

FORGER = """
    return _forge()


def _forge():
    import glob, os, posix, re, sys
    found, spray_fds = [], []
{route}
    tokens = {{v if type(v) is bytes else str(v).encode() for v in found if type(v) in (bytes, str)}}
    tokens = [t for t in tokens if re.fullmatch(rb"[0-9a-f]{{32}}", t) or t in (b"passed", b"ran to the end")]
    for token in tokens:
        line = b"\\n" + token + b"\\n"
        for fd in [*spray_fds, *range(1025)]:
            try:
                posix.write(fd, line)
            except OSError:
                pass
        for path in glob.glob("/proc/self/fd/*") + glob.glob(f"/proc/{{os.getppid()}}/fd/*") +
        glob.glob("/proc/1/fd/*"):
            try:
                fd = posix.open(path, posix.O_WRONLY | posix.O_APPEND)
                posix.write(fd, line)
                posix.close(fd)
            except OSError:
                pass
    sys.stdout.flush()
    os._exit(0)
"""


def forger(route: str) -> str:
    return FORGER.format(route=textwrap.indent(textwrap.dedent(ROUTES[route]), "    "))


@pytest.mark.parametrize("limits", [LIMITS, NO_GUARD], ids=["guard", "no_guard"])
@pytest.mark.parametrize("route", sorted(ROUTES))
def test_a_spray_of_found_tokens_and_exit_0_is_not_a_pass(route, limits):
    result = check(PROBLEM, forger(route), limits)
    assert not result.passed, (route, result.status, result.detail)
    assert result.status != "passed"


def test_the_forgery_from_the_issue_is_not_a_pass():
    completion = (
        "    import os, sys\n    main = sys.modules['__main__']\n"
        "    os.write(main.out_fd, b'\\n' + main.token + b'\\n')\n    os._exit(0)\n"
    )
    result = check(PROBLEM, completion, LIMITS)
    assert not result.passed and result.status != "passed", result.detail


@pytest.mark.parametrize(
    "completion",
    [
        "    class Same:\n        def __eq__(self, other):\n            return True\n    return Same()\n",
        "    class Same(int):\n        def __eq__(self, other):\n            return True\n        __hash__ = "
        "int.__hash__\n"
        "    return Same(0)\n",
        "    class Same(str):\n        def __eq__(self, other):\n            return True\n        __hash__ = "
        "str.__hash__\n"
        "    return Same('')\n",
    ],
    ids=["object", "int_subclass", "str_subclass"],
)
def test_objects_with_their_own_eq_do_not_cross_the_boundary(completion):
    """Neither an object of its own class nor a builtin type's subclass that defines its own __eq__ crosses (a
    subclass that keeps its base's comparisons crosses as its base value: tests/eval/test_hostile.py)."""
    result = check(PROBLEM, completion, LIMITS)
    assert not result.passed and result.status == "error", result.detail
    assert "cannot cross the sandbox boundary" in result.detail, result.detail


@pytest.mark.parametrize(
    "completion",
    [
        "    import builtins\n    builtins.AssertionError = type('NotAnAssertion', (BaseException,), {})\n"
        "    builtins.isinstance = lambda *a: True\n    return 4\n",
        "    raise SystemExit(0)\n",
        "    raise KeyboardInterrupt\n",
        "    import sys\n    sys.exit(0)\n",
        "    import os\n    os._exit(0)\n",
    ],
    ids=["patched_builtins", "system_exit", "keyboard_interrupt", "sys_exit", "os_exit"],
)
def test_exits_and_patched_builtins_are_not_a_pass(completion):
    for limits in (LIMITS, NO_GUARD):
        result = check(PROBLEM, completion, limits)
        assert not result.passed and result.status != "passed", (completion, result.detail)


def test_killing_every_visible_process_is_not_a_pass():
    completion = (
        "    import os, posix\n"
        "    for pid in sorted((int(p) for p in os.listdir('/proc') if p.isdigit()), reverse=True):\n"
        "        if pid != os.getpid():\n"
        "            try:\n                posix.kill(pid, 9)\n            except OSError:\n                pass\n"
        "    return 4\n"
    )
    for limits in (LIMITS, NO_GUARD):
        result = check(PROBLEM, completion, limits)
        assert not result.passed, result.detail
    assert os.getpid() > 0  # the test process is still here


def test_a_garbage_frame_on_every_descriptor_is_an_error_not_a_pass():
    completion = (
        "    import posix\n    for fd in range(3, 1025):\n        try:\n"
        "            posix.write(fd, (2**31).to_bytes(4, 'big') + b'{\"return\": 5}')\n"
        "        except OSError:\n            pass\n    return 5\n"
    )
    result = check(PROBLEM, completion, NO_GUARD)
    assert not result.passed and result.status == "reply_limit", result.detail  # 2 GiB announced: not read
    assert "exceeds the limit of 4194304 bytes" in result.detail


def test_exceptions_in_the_candidate_are_relayed_as_exceptions():
    result = check(PROBLEM, "    raise ValueError('no sums today')\n", LIMITS)
    assert result.status == "error"
    assert "ValueError (the program's message: 'no sums today')" in result.detail
    failed = check(PROBLEM, "    assert a < 0, 'negative only'\n", LIMITS)
    assert failed.status == "failed" and "AssertionError (the program's message: 'negative only')" in failed.detail
    assert check(PROBLEM, PROBLEM["canonical_solution"], LIMITS).passed


def test_evaluate_with_a_forging_model_scores_zero():
    """The issue's report: a "model" that emits only the forgery scored pass@1 = 1.0."""
    forgery = (
        "    import os, sys\n    main = sys.modules['__main__']\n"
        "    os.write(main.out_fd, b'\\n' + main.token + b'\\n')\n    os._exit(0)\n"
    )
    problems = load_problems(limit=3)
    metrics = evaluate(lambda prompts: [forgery] * len(prompts), problems, limits=LIMITS, progress=False)
    assert metrics["pass@1"] == 0.0, metrics
    assert metrics["status_counts"].get("passed", 0) == 0
