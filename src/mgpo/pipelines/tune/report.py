"""What ``mgpo tune`` leaves in its folder: trials.csv (every trial, with its radius diagnostics), tune.md (the
verdict against LoRA, the best settings with their interval over seeds), score-vs-rho.png and best.yaml (a config
ready for ``mgpo train``)."""

from __future__ import annotations

import csv
import math
from dataclasses import dataclass
from pathlib import Path

import yaml
from omegaconf import OmegaConf

from mgpo.pipelines.tune.config import BASELINE, PARAMS, SEARCH, SEEDS, Tune

COLUMNS = (
    "trial",
    "arm",
    "phase",
    "seed",
    "of",
    "state",
    "score",
    "pruned_at",
    "pruned_score",
    *PARAMS,
    "apn_capped",
    "radius_to_weight",
    "wall_s",
    "run",
    "error",
)


def trial_rows(study) -> list[dict]:
    """One row per trial, in trial order."""
    rows = []
    for t in study.get_trials(deepcopy=False):
        attrs, diag = t.user_attrs, t.user_attrs.get("diagnostics") or {}
        arm = attrs.get("arm", "mgpo")
        rows.append(
            {
                "trial": t.number,
                "arm": arm,
                "phase": attrs.get("phase", SEARCH),
                "seed": attrs.get("seed"),
                "of": attrs.get("of", t.number),
                "state": t.state.name.lower(),
                # a trial's score is its final validation score: Optuna gives a pruned trial the last score it
                # reported as its value, which is kept apart (the score at the step it was stopped)
                "score": t.value if t.state.name == "COMPLETE" else None,
                "pruned_at": attrs.get("pruned_at"),
                "pruned_score": t.value if t.state.name == "PRUNED" else None,
                **{name: t.params.get(name) for name in PARAMS},
                "apn_capped": None if arm == BASELINE else diag.get("apn_capped"),
                "radius_to_weight": None if arm == BASELINE else diag.get("radius_to_weight_mean"),
                "wall_s": attrs.get("wall_s"),
                "run": attrs.get("run"),
                "error": attrs.get("error"),
            }
        )
    return rows


@dataclass
class Setting:
    """One searched setting (or LoRA) with its scores over seeds, paired with LoRA's by seed."""

    trial: int  # the search trial that found it
    arm: str
    params: dict
    scores: dict  # seed -> validation score
    diff: float | None = None  # mean over seeds of (this - LoRA), sign as the metric's "better"
    low: float | None = None  # t interval of that mean (95%), None with one seed
    high: float | None = None

    @property
    def mean(self) -> float:
        return sum(self.scores.values()) / len(self.scores)


def settings(rows: list[dict], maximize: bool) -> tuple[Setting | None, list[Setting]]:
    """LoRA's setting and the searched ones that completed, best first (among those with the most seeds), each with
    all its seeds' scores."""
    by_trial: dict[int, Setting] = {}
    for row in rows:
        if row["state"] != "complete":
            continue
        if row["phase"] == SEARCH:
            by_trial.setdefault(
                row["trial"], Setting(row["trial"], row["arm"], {k: row[k] for k in PARAMS if row[k] is not None}, {})
            )
    for row in rows:
        if row["state"] == "complete" and row["of"] in by_trial:
            by_trial[row["of"]].scores[row["seed"]] = row["score"]
    lora = next((s for s in by_trial.values() if s.arm == BASELINE), None)
    found = [s for s in by_trial.values() if s.arm != BASELINE]
    if lora is not None:
        for s in found:
            _paired(s, lora, maximize)
    # the most-tested settings first (those --seeds re-ran), best mean among them: a setting whose re-runs pulled its
    # mean down must not lose to one scored on a single lucky seed, which best.yaml would then train untested
    found.sort(key=lambda s: (len(s.scores), s.mean if maximize else -s.mean), reverse=True)
    return lora, found


def _paired(setting: Setting, lora: Setting, maximize: bool) -> None:
    from scipy import stats

    seeds = sorted(set(setting.scores) & set(lora.scores))
    sign = 1.0 if maximize else -1.0
    diffs = [sign * (setting.scores[s] - lora.scores[s]) for s in seeds]
    if not diffs:
        return
    setting.diff = sum(diffs) / len(diffs)
    if len(diffs) > 1:
        sd = math.sqrt(sum((d - setting.diff) ** 2 for d in diffs) / (len(diffs) - 1))
        half = stats.t.ppf(0.975, len(diffs) - 1) * sd / math.sqrt(len(diffs))
        setting.low, setting.high = setting.diff - half, setting.diff + half


def _shown(params: dict) -> str:
    return ", ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in params.items())


def verdict(tune: Tune, lora: Setting | None, found: list[Setting]) -> str:
    """One honest sentence: does a radius beat LoRA on the validation split, at this trial length?"""
    length = f"at {tune.config.max_steps} steps"
    if lora is None:
        return "LoRA's trial did not complete, so nothing can be compared with it."
    if not found:
        return f"no searched setting completed {length}; LoRA scored {lora.mean:.4g}."
    best = found[0]
    seeds = len(set(best.scores) & set(lora.scores))
    better = "higher" if tune.direction == "maximize" else "lower"
    if seeds < 2:
        if best.diff is not None and best.diff > 0:
            return (
                f"{_shown(best.params)} scored {abs(best.diff):.4g} {better} than LoRA on one seed: not a test; "
                "rerun with --seeds 3 (or more) before relying on it."
            )
        return f"no radius helps on this task {length}: LoRA is as good (one seed; --seeds 3 to check)."
    interval = f"{best.diff:+.4g} [{best.low:+.4g}, {best.high:+.4g}] over {seeds} seeds"
    if best.low is not None and best.low > 0:
        return f"{_shown(best.params)} beats LoRA on the validation {tune.metric}: {interval} ({better} is better)."
    return (
        f"no radius helps on this task {length}; LoRA is as good (the best, {_shown(best.params)}: {interval}, "
        f"{better} is better)."
    )


def write_csv(rows: list[dict], path: Path) -> None:
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS)
        writer.writeheader()
        for row in rows:
            writer.writerow({k: "" if row[k] is None else row[k] for k in COLUMNS})


def plot(tune: Tune, rows: list[dict], lora: Setting | None, path: Path) -> None:
    """Validation score against rho (log axis): completed and pruned trials, LoRA's line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4))
    done = [r for r in rows if r["arm"] != BASELINE and r["rho"] is not None and r["state"] == "complete"]
    first = [r for r in done if r["phase"] == SEARCH]
    ax.scatter([r["rho"] for r in first], [r["score"] for r in first], color="C0", label="search trial", zorder=3)
    again = [r for r in done if r["phase"] == SEEDS]
    if again:
        ax.scatter(
            [r["rho"] for r in again],
            [r["score"] for r in again],
            color="C0",
            marker="s",
            alpha=0.5,
            label="seed re-run",
            zorder=3,
        )
    pruned = [r for r in rows if r["state"] == "pruned" and r["rho"] is not None]
    if pruned:
        ax.scatter(
            [r["rho"] for r in pruned],
            [0] * len(pruned),
            marker="|",
            color="0.5",
            s=200,
            transform=ax.get_xaxis_transform(),
            label="pruned (rho only)",
        )
    if lora is not None:
        ax.axhline(
            lora.mean,
            color="C3",
            linestyle="--",
            label=f"LoRA ({len(lora.scores)} seed{'s' if len(lora.scores) > 1 else ''})",
        )
    ax.axvline(tune.default_rho, color="0.6", linestyle=":", label=f"profile's rho {tune.default_rho:g}")
    ax.set_xscale("log")
    ax.set_xlabel("rho")
    ax.set_ylabel(f"validation {tune.metric}")
    ax.set_title(f"mgpo tune: validation {tune.metric} against rho ({tune.config.max_steps} steps a trial)")
    ax.legend(loc="center left", bbox_to_anchor=(1.02, 0.5), frameon=False)
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)


def best_config(tune: Tune, best: Setting | None, note: str) -> str:
    """A config for ``mgpo train``: the tuned config with the command's overrides and the best settings."""
    base = OmegaConf.create(yaml.safe_load(tune.base_text) or {})
    chosen = [f"{PARAMS[k][0]}={v}" for k, v in (best.params if best else {}).items()]
    cfg = OmegaConf.merge(
        base,
        OmegaConf.from_dotlist([*tune.overrides, *chosen, f"training.output_dir=runs/{tune.output_dir.name}-best"]),
    )
    header = (
        f"# mgpo tune's best setting (trial {best.trial if best else '-'}), from {tune.output_dir}.\n"
        f"# Verdict: {note}\n#   mgpo train {tune.output_dir / 'best.yaml'}\n"
    )
    return header + OmegaConf.to_yaml(cfg)


def write_report(tune: Tune, study) -> dict:
    """Write trials.csv, tune.md, score-vs-rho.png and best.yaml into the tune folder; returns the summary."""
    rows = trial_rows(study)
    lora, found = settings(rows, tune.direction == "maximize")
    note = verdict(tune, lora, found)
    out = tune.output_dir
    write_csv(rows, out / "trials.csv")
    plot(tune, rows, lora, out / "score-vs-rho.png")
    (out / "best.yaml").write_text(best_config(tune, found[0] if found else None, note))
    (out / "tune.md").write_text(markdown(tune, rows, lora, found, note))
    return {"verdict": note, "best": found[0] if found else None, "lora": lora, "rows": rows}


def markdown(tune: Tune, rows: list[dict], lora: Setting | None, found: list[Setting], note: str) -> str:
    c = tune.config
    states: dict[str, int] = {}
    for row in rows:
        states[row["state"]] = states.get(row["state"], 0) + 1
    wall = sum(r["wall_s"] or 0 for r in rows)
    lines = [
        f"# mgpo tune: {tune.output_dir.name}",
        "",
        f"Searched: {'; '.join(s.describe() for s in tune.space)}. Scored by the validation {tune.metric} "
        f"({'higher' if tune.direction == 'maximize' else 'lower'} is better) after {c.max_steps} steps, "
        f"{c.evals} evaluations a trial, pruner {c.pruner}, TPE seed {c.sampler_seed}.",
        f"Trials: {', '.join(f'{n} {s}' for s, n in sorted(states.items()))}; {wall / 60:.1f} min of training in all.",
        "",
        f"**Verdict**: {note}",
        "",
    ]
    if found or lora:
        lines += ["| setting | trial | seeds | mean | minus LoRA, paired (95% t interval) |", "|---|---|---|---|---|"]
        for s in ([lora] if lora else []) + found:
            paired = (
                ""
                if s.diff is None
                else f"{s.diff:+.4g}" + (f" [{s.low:+.4g}, {s.high:+.4g}]" if s.low is not None else "")
            )
            lines.append(
                f"| {'LoRA' if s.arm == BASELINE else _shown(s.params)} | {s.trial} | {len(s.scores)} | "
                f"{s.mean:.4g} | {paired} |"
            )
        lines.append("")
    lines += [
        "Each trial (apn_capped: share of layers whose APN factor sat at its cap; radius / ‖W‖: the "
        "perturbation's size relative to the weight's, means over the logged steps):",
        "",
        "| trial | arm | seed | state | score | rho | apn_capped | radius / ‖W‖ |",
        "|---|---|---|---|---|---|---|---|",
    ]

    def num(v, fmt=".4g"):
        return "" if v is None else format(v, fmt)

    for r in rows:
        state = r["state"] if r["pruned_at"] is None else f"{r['state']} at step {r['pruned_at']}"
        if r["pruned_score"] is not None:
            state += f" (scored {num(r['pruned_score'])} there)"
        lines.append(
            f"| {r['trial']} | {r['arm']} | {r['seed']} | {state} | {num(r['score'])} | "
            f"{num(r['rho'], '.3g')} | {num(r['apn_capped'], '.0%')} | {num(r['radius_to_weight'], '.3g')} |"
        )
    lines += [
        "",
        "![validation score against rho](score-vs-rho.png)",
        "",
        f"`best.yaml` trains the best setting: `mgpo train {tune.output_dir / 'best.yaml'}`.",
        "",
    ]
    return "\n".join(lines)
