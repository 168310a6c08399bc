"""Loss curves a person can look at (matplotlib, headless)."""

from __future__ import annotations

import json
import textwrap
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


def _read_clean(path: Path) -> tuple[list[int], list[float]]:
    """(steps, clean_loss) of the clean-loss probe rows (empty for runs without the probe)."""
    rows = [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]
    rows = [r for r in rows if "clean_loss" in r]
    return [r["step"] for r in rows], [r["clean_loss"] for r in rows]


CLEAN_LABEL = "clean training loss (probe)"


def plot_loss_curves(
    runs: dict[str, Path],
    out_png: Path,
    *,
    title: str = "training loss",
    smooth: int | None = None,
    as_trained: str = "training loss as trained",
) -> Path:
    """One colour per run (label -> log.jsonl). Runs with the clean-loss probe: the clean loss solid, the loss as
    trained (``as_trained`` says what it is, e.g. "training loss at the perturbed weights") as a dashed moving
    average. Runs without it: the loss as trained, raw faint and moving average bold. The title says which is
    which."""
    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=120)
    plotted, with_clean = 0, 0
    for label, path in runs.items():
        steps, losses = _read_losses(path)
        clean_steps, clean = _read_clean(path)
        if not steps and not clean:
            continue
        color = f"C{plotted % 10}"
        plotted += 1
        window = smooth or max(1, len(steps) // 20)
        if clean:
            with_clean += 1
            ax.plot(
                clean_steps,
                clean,
                color=color,
                linewidth=2,
                marker="o" if len(clean) < 20 else None,
                markersize=3,
                label=f"{label}: clean (probe)",
            )
            if steps:
                ax.plot(
                    steps,
                    _smooth(losses, window),
                    color=color,
                    linewidth=1,
                    linestyle="--",
                    alpha=0.7,
                    label=f"{label}: as trained (moving avg {window})",
                )
            continue
        ax.plot(steps, losses, color=color, alpha=0.25, linewidth=0.8, marker="o" if len(steps) == 1 else None)
        ax.plot(
            steps, _smooth(losses, window), color=color, linewidth=2, label=f"{label}: as trained (moving avg {window})"
        )
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("training loss")
    if not plotted:
        note = ""
    elif with_clean:
        note = (
            f"clean (probe): the {CLEAN_LABEL}, a fixed set of training examples at the clean weights in "
            f"eval mode; as trained: {as_trained}"
        )
    else:
        note = f"as trained: {as_trained} (no clean-loss probe was logged)"
    ax.set_title("\n".join([title, *textwrap.wrap(note, 90)]), fontsize=9)
    ax.grid(alpha=0.3)
    if plotted:
        ax.legend(fontsize=7)
    else:
        ax.text(
            0.5,
            0.5,
            "no training loss was logged\n(fewer steps than training.logging_steps?)",
            ha="center",
            va="center",
            transform=ax.transAxes,
        )
    fig.tight_layout()
    out_png = Path(out_png)
    out_png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_png)
    plt.close(fig)
    return out_png


def plot_demo(runs: dict[str, Path], out_png: Path, *, title: str, as_trained: str) -> Path:
    """The demo's figure, read at a glance: the clean losses in one panel, the losses as trained (moving averages)
    in a second, fainter one below, one colour per arm, the legend beside the panels, a one-line title."""
    fig, (clean_ax, trained_ax) = plt.subplots(
        2, 1, figsize=(8, 5.6), dpi=120, sharex=True, gridspec_kw={"height_ratios": [3, 2]}
    )
    for i, (label, path) in enumerate(runs.items()):
        color = f"C{i % 10}"
        clean_steps, clean = _read_clean(path)
        steps, losses = _read_losses(path)
        clean_ax.plot(clean_steps, clean, color=color, linewidth=2, marker="o", markersize=3, label=label)
        window = max(1, len(steps) // 20)
        trained_ax.plot(steps, _smooth(losses, window), color=color, linewidth=1, alpha=0.6)
    clean_ax.set_ylabel("clean loss")
    clean_ax.set_title(title, fontsize=10)
    clean_ax.text(
        0.01,
        0.02,
        f"{CLEAN_LABEL}: fixed training examples at the clean weights, eval mode",
        transform=clean_ax.transAxes,
        fontsize=7,
        color="0.4",
    )
    trained_ax.set_ylabel("loss as trained", color="0.4")
    trained_ax.text(
        0.01,
        0.04,
        textwrap.shorten(f"{as_trained} (moving average)", 110),
        transform=trained_ax.transAxes,
        fontsize=7,
        color="0.4",
    )
    trained_ax.set_xlabel("optimizer step")
    for ax in (clean_ax, trained_ax):
        ax.grid(alpha=0.3)
    trained_ax.tick_params(colors="0.4")
    clean_ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False, fontsize=8)
    fig.tight_layout()
    out_png = Path(out_png)
    out_png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_png, bbox_inches="tight")
    plt.close(fig)
    return out_png
