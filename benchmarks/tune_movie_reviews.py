"""Does ``mgpo tune`` find a safe radius for MiniLM on the movie reviews, and does it hold on the test split?

1. ``mgpo tune configs/tune-movie-reviews.yaml`` (12 trials of 100 steps on the validation split, LoRA as trial 0).
2. The chosen setting and LoRA, 5 seeds each, 100 steps, scored on the **test** split (``mgpo sweep``), paired by
   seed: the chosen setting's test accuracy minus LoRA's, with its 95% t interval.
3. docs/tune-movie-reviews.md: what the study chose, where that lies against the paper's rho (0.05, which stalls
   MiniLM: docs/results.md) and our rho / 10, and the paired test comparison; the study's figure beside it.

Resumable (the study and the sweep both resume): rerun the same command. About an hour on 2 quiet CPU cores.

    python benchmarks/tune_movie_reviews.py                  # everything, into runs/bench-tune and docs/
    python benchmarks/tune_movie_reviews.py --seeds 5 --out docs/tune-movie-reviews.md
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import yaml

from mgpo.pipelines.measures import paired_t

ROOT = Path(__file__).resolve().parents[1]
PAPER_RHO, OUR_RHO = 0.05, 0.005  # the NLU profile's rho, and the rho / 10 of docs/results.md


def run(*args: str) -> float:
    """Run a command here; returns its wall time in seconds."""
    print("$", " ".join(args), flush=True)
    start = time.monotonic()
    subprocess.run(args, check=True, cwd=ROOT)
    return time.monotonic() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", default="runs/bench-tune", help="Folder of the study and the test sweep.")
    parser.add_argument("--seeds", type=int, default=5, help="Seeds of the test comparison.")
    parser.add_argument("--out", default="docs/tune-movie-reviews.md", help="The page written.")
    args = parser.parse_args()
    work = ROOT / args.work
    study = work / "study"
    load = os.getloadavg()[0]
    study_s = run(sys.executable, "-m", "mgpo", "tune", "configs/tune-movie-reviews.yaml", "--output-dir", str(study))
    best = yaml.safe_load((study / "best.yaml").read_text())
    rho = float(best["perturbation"]["rho"])
    base = {k: v for k, v in best.items() if k != "training"}
    base["training"] = {**best["training"], "max_steps": 100, "save_steps": 100}
    base["training"].pop("output_dir", None)
    spec = {
        "title": f"mgpo tune's choice (rho {rho:.3g}) against LoRA on the test split",
        "base": base,
        "grid": {"training.seed": list(range(args.seeds)), "perturbation.preset": ["lora", "lora-mgpo"]},
        "name": "{perturbation.preset}-s{training.seed}",
        "output_dir": str(work / "test"),
    }
    (work / "test.yaml").write_text(yaml.safe_dump(spec, sort_keys=False))
    test_s = run(sys.executable, "-m", "mgpo", "sweep", str(work / "test.yaml"))
    acc = {
        arm: [
            json.loads((work / "test" / f"{arm}-s{s}" / "metrics.json").read_text())["test_accuracy"]
            for s in range(args.seeds)
        ]
        for arm in ("lora", "lora-mgpo")
    }
    d = paired_t(acc["lora-mgpo"], acc["lora"])
    mean, low, high = d["mean"], d["low"], d["high"]
    summary = (study / "tune.md").read_text()
    verdict = next(line for line in summary.splitlines() if line.startswith("**Verdict**"))
    figures = ROOT / "docs" / "figures"
    figures.mkdir(exist_ok=True)
    shutil.copy(study / "score-vs-rho.png", figures / "tune-movie-reviews.png")
    below = (
        "significantly below"
        if high < 0
        else "significantly above"
        if low > 0
        else "not significantly different from (so not below)"
    )
    page = [
        "# mgpo tune on the movie reviews (MiniLM, CPU)",
        "",
        f"Command: `python benchmarks/tune_movie_reviews.py` (study: `mgpo tune configs/tune-movie-reviews.yaml`, "
        f"then {args.seeds} seeds of the choice and of LoRA on the test split).",
        "",
        f"- **Chosen rho: {rho:.3g}**, {PAPER_RHO / rho:.3g} times below the paper's {PAPER_RHO} (which stalls MiniLM "
        f"wherever APN sits at its cap: docs/results.md) and {rho / OUR_RHO:.3g} x our rho / 10 ({OUR_RHO}).",
        f"- Study verdict (validation split, one seed per trial): {verdict.removeprefix('**Verdict**: ')}",
        f"- **Test split, {args.seeds} seeds, 100 steps:** LoRA {sum(acc['lora']) / args.seeds:.4f}, the choice "
        f"{sum(acc['lora-mgpo']) / args.seeds:.4f}; paired difference {mean:+.4f} [{low:+.4f}, {high:+.4f}] "
        f"(95% t interval): the choice is {below} LoRA.",
        "",
        f"- **Cost on this machine** ({os.cpu_count()} CPU cores, load average {load:.2f} at the start; a resumed "
        f"run counts only this session's part): the study {study_s / 60:.1f} min (13 trials of at most 100 steps, "
        f"pruned ones shorter), the test comparison {test_s / 60:.1f} min ({2 * args.seeds} runs of 100 steps).",
        "",
        "![validation accuracy against rho](figures/tune-movie-reviews.png)",
        "",
        "## The study",
        "",
        *(line for line in summary.splitlines()[2:] if "score-vs-rho.png" not in line and "best.yaml" not in line),
        "",
        "## Test accuracy by seed",
        "",
        "| seed | LoRA | choice |",
        "|---|---|---|",
        *(f"| {s} | {acc['lora'][s]:.4f} | {acc['lora-mgpo'][s]:.4f} |" for s in range(args.seeds)),
        "",
    ]
    (ROOT / args.out).write_text("\n".join(page))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
