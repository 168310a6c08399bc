"""Where MGPO's extra time goes in one training step: forward+backward with the term vs without, and step().

    python benchmarks/breakdown.py [--rank 8] [--rounds 30]

Same model and batch as overhead.py; medians over interleaved rounds (printed in ms).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
import warnings

sys.path.insert(0, __import__("os").path.dirname(__import__("os").path.abspath(__file__)))
import overhead  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=30)
    args = parser.parse_args()
    warnings.filterwarnings("ignore", category=FutureWarning)
    s = overhead.Settings()
    batch = overhead.make_batch(s)
    models = {n: overhead.build_model(s, args.rank, s.layers) for n in ("AdamW", "MGPO")}
    opts = {n: overhead.build_optimizer(n, m, s, 100) for n, m in models.items()}
    for n in models:
        for _ in range(3):
            models[n](**batch).loss.backward()
            opts[n].step()
            opts[n].zero_grad()
    times: dict[str, list[float]] = {}
    for _ in range(args.rounds):
        for n in ("AdamW", "MGPO"):
            t0 = time.perf_counter()
            models[n](**batch).loss.backward()
            t1 = time.perf_counter()
            opts[n].step()
            t2 = time.perf_counter()
            opts[n].zero_grad()
            times.setdefault(f"{n} forward+backward", []).append(t1 - t0)
            times.setdefault(f"{n} step()", []).append(t2 - t1)
    for key, values in times.items():
        print(f"{key:28s} {statistics.median(values) * 1e3:8.1f} ms")


if __name__ == "__main__":
    main()
