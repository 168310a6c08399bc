"""GPU-hours the paper-scale sweeps need, estimated from their configurations (no GPU has run them yet).

    python scripts/gpu_hours.py                      # the paper-*.yaml sweeps, a markdown table
    python scripts/gpu_hours.py --mfu 0.15 SPEC...   # another utilisation, other sweeps

Per run: optimizer steps = epochs x training rows / (batch x grad_accum) (or max_steps), tokens per step = batch x
grad_accum x max_length (padded: an upper bound, GLUE's sentences are far shorter), and training FLOPs per token
= 6N for full fine-tuning, 4N with an adapter (the frozen weights need no gradient), + 2N with gradient
checkpointing (the forward again), x 2 for SAM (two passes). MGPO's rank-2r term is negligible. Hours at the
H100's dense bf16 peak (989 TFLOPS) times an assumed model-FLOPs utilisation (--mfu). Not counted: loading the
model, evaluation, generation for the benchmarks (math, HumanEval, MT-Bench), and queueing. The measured
per-step time of paper-cost-llama2.yaml, once run, replaces the assumption.
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

from mgpo.pipelines.sweep import load_sweep, plan

PEAK_FLOPS = 989e12  # H100 SXM, dense bf16
# parameters of the paper's models, and training rows of the data sets whose configs take all of them
PARAMS = {"google-t5/t5-base": 223e6, "meta-llama/Llama-2-7b-hf": 6.74e9, "meta-llama/Llama-3.1-8B": 8.03e9}
ROWS = {"glue/mnli": 392_702, "glue/sst2": 67_349, "glue/cola": 8_551, "glue/qnli": 104_743, "glue/mrpc": 3_668}
HELD_OUT = 0.1  # GLUE's validation split is its test split here: 10% of train is held out for the validation loss


def run_cost(cfg) -> tuple[int, float]:
    """(optimizer steps, training FLOPs) of one run."""
    t = cfg.training
    if t.max_steps and t.max_steps > 0:
        steps = t.max_steps
    else:
        rows = cfg.data.max_train_examples or ROWS[cfg.data.name] * (1 - HELD_OUT)
        steps = math.ceil(t.epochs * rows / (t.batch_size * t.grad_accum))
    n = PARAMS[cfg.model.name]
    per_token = (6 if cfg.adapter.method == "full" else 4) * n + (2 * n if t.gradient_checkpointing else 0)
    if cfg.perturbation.method in ("sam", "asam"):
        per_token *= 2
    return steps, steps * t.batch_size * t.grad_accum * cfg.model.max_length * per_token


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("specs", nargs="*", help="sweep files (default: configs/experiments/paper-*.yaml)")
    parser.add_argument("--mfu", type=float, default=0.3, help="model-FLOPs utilisation assumed (default 0.3)")
    args = parser.parse_args()
    specs = args.specs or sorted(str(p) for p in Path("configs/experiments").glob("paper-*.yaml"))
    print(f"| sweep | runs | optimizer steps | training PFLOP | GPU-hours at {args.mfu:.0%} MFU (H100) |")
    print("|---|---:|---:|---:|---:|")
    for spec in specs:
        costs = [run_cost(cfg) for cfg in plan(load_sweep(spec))]
        steps, flops = sum(s for s, _ in costs), sum(f for _, f in costs)
        hours = flops / (PEAK_FLOPS * args.mfu) / 3600
        print(f"| {Path(spec).stem} | {len(costs)} | {steps:,} | {flops / 1e15:,.0f} | {hours:,.0f} |")


if __name__ == "__main__":
    sys.exit(main())
