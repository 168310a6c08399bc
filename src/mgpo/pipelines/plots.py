"""Loss curves a person can look at (matplotlib, headless)."""

from __future__ import annotations

import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def _read_losses(path: Path) -> tuple[list[int], list[float]]:
    """(steps, losses) of the logged training loss; when none was logged (fewer steps than logging_steps),
    the run's mean loss from the Trainer's final summary, as one point."""
    steps, losses, mean = [], [], None
    for line in Path(path).read_text().splitlines():
        row = json.loads(line) if line.strip() else {}
        if "loss" in row:
            steps.append(row["step"])
            losses.append(row["loss"])
        elif "train_loss" in row:
            mean = (row["step"], row["train_loss"])
    if not steps and mean is not None:
        return [mean[0]], [mean[1]]
    return steps, losses


def _smooth(values: list[float], window: int) -> list[float]:
    out, total = [], 0.0
    for i, v in enumerate(values):
        total += v
        if i >= window:
            total -= values[i - window]
        out.append(total / min(i + 1, window))
    return out


def plot_loss_curves(runs: dict[str, Path], out_png: Path, *, title: str = "training loss",
                     smooth: int | None = None) -> Path:
    """One line per run (label -> log.jsonl); raw loss faint, moving average bold."""
    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=120)
    plotted = False
    for label, path in runs.items():
        steps, losses = _read_losses(path)
        if not steps:
            continue
        window = smooth or max(1, len(steps) // 20)
        (line,) = ax.plot(steps, losses, alpha=0.25, linewidth=0.8, marker="o" if len(steps) == 1 else None)
        ax.plot(steps, _smooth(losses, window), color=line.get_color(), linewidth=2,
                label=f"{label} (moving avg {window})")
        plotted = True
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("training loss")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    if plotted:
        ax.legend()
    else:
        ax.text(0.5, 0.5, "no training loss was logged\n(fewer steps than training.logging_steps?)",
                ha="center", va="center", transform=ax.transAxes)
    fig.tight_layout()
    out_png = Path(out_png)
    out_png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_png)
    plt.close(fig)
    return out_png
