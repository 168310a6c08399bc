"""What the HumanEval sandbox costs: per-program start-up and all 164 canonical solutions, per isolation mode.

    python benchmarks/sandbox.py                 # both modes, 20 trivial programs + the 164 solutions each
    python benchmarks/sandbox.py --repeats 50

`bwrap` is bubblewrap's namespaces around the process sandbox; `process` is the process sandbox alone (rlimits,
user switch, Python guard). A trivial program (`pass`) measures the fixed cost of one sandboxed run; the 164
canonical HumanEval solutions, two at a time as `mgpo eval` runs them, measure what a user waits for.
Run it on an otherwise idle machine: it times wall clock.
"""
from __future__ import annotations

import argparse
import statistics
import time

from mgpo.eval.humaneval import build_program, load_problems
from mgpo.eval.sandbox import SandboxLimits, describe_isolation, run_program, run_programs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=20, help="trivial programs timed one at a time per mode")
    parser.add_argument("--workers", type=int, default=2, help="programs run at once for the 164 solutions")
    args = parser.parse_args()

    problems = load_problems()
    programs = [build_program(p, p["canonical_solution"]) for p in problems]
    print("| isolation | one trivial program, median (s) | min-max (s) | 164 canonical solutions (s) | passed |")
    print("|---|---:|---:|---:|---:|")
    for mode in ("process", "bwrap"):
        limits = SandboxLimits(isolation=mode)
        try:
            describe_isolation(limits)
        except RuntimeError as err:  # bwrap asked for but not usable here
            print(f"| {mode} | not available: {err} | | | |")
            continue
        run_program("pass\n", limits)  # warm the page cache and the runner choice
        times = []
        for _ in range(args.repeats):
            start = time.perf_counter()
            result = run_program("pass\n", limits)
            times.append(time.perf_counter() - start)
            assert result.passed, result.detail
        start = time.perf_counter()
        results = run_programs(programs, limits, workers=args.workers)
        total = time.perf_counter() - start
        passed = sum(r.passed for r in results)
        print(f"| {mode} | {statistics.median(times):.3f} | {min(times):.3f}-{max(times):.3f} | {total:.1f} "
              f"| {passed}/{len(programs)} |")


if __name__ == "__main__":
    main()
