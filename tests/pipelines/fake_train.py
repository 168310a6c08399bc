"""A stand-in for ``python -m mgpo train`` in the tuner's tests: it writes what a run writes (log.jsonl with an
``eval_*`` row at each evaluation during training and the final ``validation_*`` row, metrics.json at the end) for
a score that is a known function of rho and the seed, so the study's bookkeeping (budget, pruning, resume,
determinism) can be checked in seconds.

Called as ``fake_train.py -m mgpo train BASE k=v ... --restart``; FAKE_STEP_S sets the seconds per step, and
FAKE_EVAL_PREFIX the prefix of the evaluations during training (``eval_``, as the Trainer's)."""

import json
import math
import os
import signal
import sys
import time
from pathlib import Path


def score(rho: float | None, seed: int, lora: bool) -> float:
    if lora:
        return 0.78 + 0.002 * seed
    assert rho is not None  # a search trial has its rho
    return 0.8 - 0.05 * (math.log10(rho) + 2.5) ** 2 + 0.002 * seed  # best near rho = 0.003


def main() -> None:
    args = sys.argv[sys.argv.index("train") + 2 :]
    settings = dict(a.split("=", 1) for a in args if "=" in a)
    out = Path(settings["training.output_dir"])
    out.mkdir(parents=True, exist_ok=True)
    steps, every = int(settings["training.max_steps"]), int(settings["training.eval_steps"])
    lora = settings.get("perturbation.preset") == "lora"
    rho = float(settings.get("perturbation.rho", 0.05))
    final = score(rho, int(settings["training.seed"]), lora)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    with (out / "log.jsonl").open("w") as log:
        for step in range(1, steps + 1):
            time.sleep(float(os.environ.get("FAKE_STEP_S", "0.01")))
            row = {"step": step, "loss": 1.0 / step}
            if not lora:
                row.update(apn_capped=0.5, radius_to_weight_mean=rho * 10)
            log.write(json.dumps(row) + "\n")
            if step % every == 0:  # as the Trainer logs its evaluations during training
                prefix = os.environ.get("FAKE_EVAL_PREFIX", "eval_")
                log.write(json.dumps({"step": step, f"{prefix}accuracy": final * (0.5 + 0.5 * step / steps)}) + "\n")
            log.flush()
        log.write(json.dumps({"step": steps, "validation_accuracy": final}) + "\n")  # mgpo train's final evaluation
    (out / "metrics.json").write_text(json.dumps({"steps": steps, "validation_accuracy": final}))


if __name__ == "__main__":
    main()
