"""What the HumanEval sandbox costs: per-program start-up and all 164 canonical solutions, per isolation mode.

`run_program` runs one trivial program (`pass`); `judge` grades a trivial function with one call from the harness
(the sandboxed program plus the harness process); the 164 canonical solutions are graded with `judge_many`, as
`mgpo train` does with `generation.benchmark=humaneval` (the answer file hidden; in process isolation, which
cannot hide it, with `allow_visible_answers`).

    python benchmarks/sandbox.py                 # both modes, 20 trivial programs + the 164 solutions each
    python benchmarks/sandbox.py --repeats 50

`bwrap` is bubblewrap's namespaces around the process sandbox; `process` is the process sandbox alone (rlimits,
user switch, Python guard). A trivial program (`pass`) measures the fixed cost of one sandboxed run; the 164
canonical HumanEval solutions, two at a time as `mgpo train` grades them, measure what a user waits for.
Run it on an otherwise idle machine: it times wall clock.
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import time

from mgpo.eval.humaneval import answer_files, build_program, build_tests, load_problems
from mgpo.eval.sandbox import SandboxLimits, describe_isolation, judge, judge_many, run_program


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=20, help="trivial programs timed one at a time per mode")
    parser.add_argument("--workers", type=int, default=2, help="programs run at once for the 164 solutions")
    args = parser.parse_args()

    problems = load_problems()
    jobs = [(build_program(p, p["canonical_solution"]), p["entry_point"], build_tests(p)) for p in problems]
    trivial = {
        "run_program": lambda limits: run_program("pass\n", limits),
        "judge": lambda limits: judge("def f():\n    return 1\n", "f", "assert candidate() == 1\n", limits),
    }
    print(f"load average before: {os.getloadavg()[0]:.2f}")
    print(
        "| isolation | trivial run_program, median (s) | min-max (s) | trivial judge, median (s) | min-max (s) "
        "| 164 canonical solutions, judged (s) | their CPU time (s) | passed |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for mode in ("process", "bwrap"):
        # process isolation cannot hide HumanEval's answers: it grades only when told to accept that
        limits = SandboxLimits(isolation=mode, allow_visible_answers=mode == "process")
        try:
            describe_isolation(limits)
        except RuntimeError as err:  # bwrap asked for but not usable here
            print(f"| {mode} | not available: {err} | | | | | | |")
            continue
        cells = []
        for run in trivial.values():
            run(limits)  # warm the page cache and the runner choice
            times = []
            for _ in range(args.repeats):
                start = time.perf_counter()
                result = run(limits)
                times.append(time.perf_counter() - start)
                assert result.passed, result.detail
            cells.append(f"{statistics.median(times):.3f} | {min(times):.3f}-{max(times):.3f}")
        # CPU time of the sandboxed programs, harnesses and bwrap (all waited-for children): unlike wall clock,
        # it hardly depends on what else the machine runs
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        start = time.perf_counter()
        results = judge_many(jobs, limits, workers=args.workers, hidden=answer_files())  # as humaneval grades
        total = time.perf_counter() - start
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        cpu = after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime
        passed = sum(r.passed for r in results)
        cpu_cell = f"{cpu:.1f}" if mode == "process" else "-"  # bwrap is killed before it reaps its children
        print(f"| {mode} | {' | '.join(cells)} | {total:.1f} | {cpu_cell} | {passed}/{len(jobs)} |")
    print(f"load average after: {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
