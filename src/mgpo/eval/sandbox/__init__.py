"""Run untrusted, model-generated Python programs in a separate, limited process, and grade them.

* :func:`judge` grades a function of the untrusted program with trusted test code, in a harness process the
  program cannot reach: the verdict cannot be produced by the program.
* :func:`run_program` runs a whole program and reports how it ended. Its "passed" (ran to its end) is the
  program's own report, which code that wants to can fake: use it for trusted or diagnostic programs, not to grade
  untrusted ones.

What the sandbox guarantees, how (bubblewrap namespaces and mounts, seccomp, rlimits, a cgroup, the user switch,
a Python guard), and what does NOT hold: docs/sandbox.md. The modules: ``limits`` (SandboxLimits, RunResult),
``isolation`` (user, interpreter, bubblewrap, seccomp), ``cgroup``, ``run`` (running, judging, classifying), and
``programs/`` (the code that runs in the sandboxed process and in the judge's harness, sent as text).

Standard library only: the package can be copied and used on its own.
"""

from .limits import ISOLATIONS, RunResult, SandboxLimits
from .run import (
    answers_visible,
    describe_isolation,
    judge,
    judge_many,
    run_program,
    run_programs,
    switches_user,
    uses_namespaces,
)

__all__ = [
    "SandboxLimits",
    "RunResult",
    "run_program",
    "run_programs",
    "judge",
    "judge_many",
    "describe_isolation",
    "switches_user",
    "uses_namespaces",
    "answers_visible",
    "ISOLATIONS",
]
