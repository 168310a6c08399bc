"""What the report calls things: method labels from a run's config, the metrics it looks for, and the names
of its columns. What an APN rule is comes from the registry (mgpo.optim.apn), asked in :func:`_apn_label` and
:func:`_apn_caps`."""

from __future__ import annotations

from typing import Any

import numpy as np

from mgpo.optim import apn as apn_rules
from mgpo.optim.configs import DEFAULT_RHO, PRESETS, PROFILES
from mgpo.pipelines.runlog import PERTURBED_FORWARD

# The first of these a run's metrics.json holds is its primary metric (override with --metric).
PRIMARY_METRICS = (
    "test_accuracy",
    "test_pearson",
    "after_accuracy",
    "after_pass@1",
    "after_score",
    "validation_accuracy",
    "validation_pearson",
    "test_loss",
    "validation_loss",
    "final_clean_loss",
    "final_loss",
)
ADAPTER_NAMES = {
    "lora": "LoRA",
    "dora": "DoRA",
    "rslora": "rsLoRA",
    "pissa": "PiSSA",
    "loraplus": "LoRA+",
    "adalora": "AdaLoRA",
    "lora-ga": "LoRA-GA",
    "full": "Full FT",
}
METHOD_SUFFIX = {
    "adamw": "",
    "mgpo": "-MGPO",
    "msam": " + MSAM",
    "sam": " + SAM",
    "random": " + random noise",
    "ggpo": "-GGPO",
}
PRESET_SUFFIX = {"lora": "", "lora-mgpo": "-MGPO", "mgpo-no-apn": "-MGPO w/o APN", "msam": " + MSAM"}
# What follows the last "-" of a label "X-MGPO ..." that names a perturbation added to adapter X.
DASH_SUFFIXES = {"MGPO", "GGPO"}
# Grid axes that name the method when a sweep has no `method:` axis (the label then comes from the config).
METHOD_FIELDS = ("adapter.method", "perturbation.method", "perturbation.preset")
# Paired differences to the baseline on the clean training loss (lower is better): key -> what it is.
CLEAN_LOSS_DIFFS = {
    "final_clean_loss": "final clean training loss (probe)",
    "clean_dd_rise_rel": "double-descent rise on the clean loss (fraction of its running minimum)",
}
# A run whose clean loss fell by less than this fraction of its start barely trained: its double-descent rise is
# small because there was no descent to rise from, which a lower rise must not be read as (smoother training).
STALLED_FALL = 0.10
# The optimizer's per-step diagnostics (perturbation.diagnostics) the report summarises: key -> column.
DIAGNOSTICS = {
    "radius_to_weight_mean": "radius / ‖W‖",
    "radius_to_update_mean": "radius / last update",
    "apn_factor_mean": "radius factor k",
    "apn_capped": "layers at the APN cap",
}
# Columns over several panels (settings): a mean of the panels' means, and the paired differences of every panel
# pooled (each pair still within one panel, but the interval then mixes settings whose spread can differ a lot)
MEAN_OF_PANELS = "mean of panels"
POOLED = "all panels pooled"
NO_CAP = "no cap"  # the apn_capped cell of a run whose radius rule has no APN cap
# Which training loss a run's curve is: the clean-loss probe, or (runs without it) the loss the steps saw.
LOSS_KINDS = {"clean": "clean (probe)", "perturbed": "as trained (at the perturbed weights)", "trained": "as trained"}


LOWER_IS_BETTER = ("loss", "perplexity", "error", "time", "memory")  # a metric whose name holds one of these


def higher_is_better(metric: str) -> bool:
    return not any(word in metric for word in LOWER_IS_BETTER)


def _apn_label(apn: str | None) -> str:
    """What a method label adds for its radius rule: nothing for the paper's (the registry's default)."""
    return "" if apn_rules.is_default(apn) else f" apn={apn}"


def _apn_caps(perturbation: dict[str, Any]) -> bool:
    """Whether a run's radius rule has an APN cap (the registry says which rules cap) with a ``max_scale``."""
    return apn_rules.caps(perturbation.get("apn"), perturbation.get("max_scale", 1))


def method_label(cfg: dict) -> str:
    """'LoRA', 'LoRA-MGPO', 'DoRA + SAM', 'DoRA-MGPO rho/10', ... from a run's config.yaml (a preset, when set,
    names itself). An MGPO arm whose rho is not its profile's, or whose radius rule is not APN's, says so: two
    runs share a label only if they share the method."""
    p, a = cfg.get("perturbation", {}), cfg.get("adapter", {})
    adapter = ADAPTER_NAMES.get(a.get("method", "lora"), a.get("method", "?"))
    if p.get("preset"):
        label = adapter + PRESET_SUFFIX.get(p["preset"], f" + {p['preset']}")
        mgpo = PRESETS.get(p["preset"]) is not None
    else:
        method = p.get("method", "adamw")
        label = adapter + METHOD_SUFFIX.get(method, f" + {method}")
        mgpo = method in ("mgpo", "msam")
    if mgpo:
        if _apn_label(p.get("apn")) and (not p.get("preset") or (PRESETS[p["preset"]] or {}).get("apn") is None):
            label += _apn_label(p.get("apn"))
        paper = PROFILES.get(p.get("profile"), {}).get("rho", DEFAULT_RHO)
        rho = p.get("rho")
        if rho is not None and not np.isclose(rho, paper):
            label += " rho/10" if np.isclose(rho, paper / 10) else f" rho={rho:g}"
    return label


def _panel_label(axis: str, value: Any) -> str:
    section, _, name = axis.rpartition(".")
    short = section if name == "name" else (name or axis)
    return f"{short}={value}"


def trains_at_perturbed_weights(cfg: dict) -> bool:
    """Whether a run's training forwards ran at perturbed weights (so its logged `loss` is not the clean one)."""
    p = cfg.get("perturbation") or {}
    if p.get("preset"):
        return PRESETS.get(p["preset"]) is not None  # a preset is plain LoRA (None) or an MGPO arm
    return p.get("method", "adamw") in PERTURBED_FORWARD


def _order(values: Any) -> list:
    return list(dict.fromkeys(values))


def _fmt(x: float | None, digits: int = 4) -> str:
    """'-' for no value; a NaN or infinite value as itself ('nan', 'inf'), not as a missing one."""
    if x is None:
        return "-"
    return f"{x:.{digits}f}"


def _mean_std(values: Any) -> tuple[float, float]:
    v = np.asarray(values, dtype=float)
    return float(v.mean()), float(v.std(ddof=1)) if len(v) > 1 else 0.0


def mean_std_cell(values: Any, digits: int = 4) -> str:
    """'mean ± std' over seeds (sample std, ddof 1); the mean alone for a single run."""
    if not len(values):
        return "-"
    mean, std = _mean_std(values)
    return _fmt(mean, digits) if len(values) == 1 else f"{_fmt(mean, digits)} ± {_fmt(std, digits)}"
