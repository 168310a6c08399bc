"""How long the README's first command takes: ``python3 -m mgpo demo`` (MiniLM on the movie reviews, four arms),
timed from a fresh process to its exit, with the load average before and after (run it on quiet cores: a
benchmark timed while tests run is worthless).

    python benchmarks/demo_time.py                 # one timed run, its table and wall time printed
    python benchmarks/demo_time.py --repeats 2     # the median of two
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=1, help="Timed runs (the median is reported).")
    parser.add_argument("--demo", default="sentiment", help="Which demo (sentiment or arithmetic).")
    args = parser.parse_args()
    walls = []
    for i in range(args.repeats):
        load_before = os.getloadavg()[0]
        with tempfile.TemporaryDirectory() as out:
            start = time.perf_counter()
            done = subprocess.run(
                [sys.executable, "-m", "mgpo", "demo", args.demo, "--output-dir", out], capture_output=True, text=True
            )
            wall = time.perf_counter() - start
        if done.returncode != 0:
            sys.exit(f"the demo failed (exit {done.returncode}):\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
        walls.append(wall)
        print(done.stdout if i == 0 else "", end="")
        print(
            f"run {i + 1}: {wall:.0f} s (1-minute load average {load_before:.2f} before, "
            f"{os.getloadavg()[0]:.2f} after, {os.cpu_count()} CPUs)"
        )
    print(f"mgpo demo {args.demo}: {statistics.median(walls):.0f} s wall time (median of {len(walls)})")


if __name__ == "__main__":
    main()
