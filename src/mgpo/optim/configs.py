"""The methods' settings as plain dataclasses with help text, one per optimizer (PEFT-style), plus the flat
:class:`PerturbationConfig` the CLI, the Trainer arguments and sweeps use.

Pure Python: importing this module loads neither torch nor transformers, so ``mgpo config --explain`` is quick.
Every setting is explained next to its equation in docs/method.md.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

from mgpo.checks import check, check_choice, check_range
from mgpo.optim.apn import DEFAULT as APN_DEFAULT  # the APN rules' registry (pure Python)
from mgpo.optim.apn import NAMES as APN_MODES

METHODS = ("adamw", "mgpo", "msam", "sam", "random", "ggpo")
SPACES = ("weight", "factors")
NORMS = ("layer", "global")
GBAR_UPDATES = ("step", "micro_batch")

# The paper's ablation arms (Figure 4) and Momentum-SAM, by name; None means the plain base optimizer.
PRESETS: dict[str, dict[str, str] | None] = {
    "lora": None,
    "mgpo-no-apn": {"apn": "off"},
    "lora-mgpo": {},
    "msam": {"space": "factors", "apn": "off", "norm": "global"},
}
# The paper's hyper-parameters (Section 4.1). mu is AdamW's beta1 in the authors' code (momentum = exp_avg).
PROFILES: dict[str, dict[str, float]] = {
    "nlu": {"rho": 0.05, "beta": 0.9, "mu": 0.9},
    "nlg": {"rho": 0.01, "beta": 0.8, "mu": 0.8},
}

HELP = {
    "method": f"Perturbation method, one of: {', '.join(METHODS)}. 'adamw' is the plain base optimizer "
    "(no perturbation).",
    "preset": f"Named arm of the paper's ablation (Figure 4), one of: {', '.join(PRESETS)}. 'lora' = plain "
    "AdamW, 'mgpo-no-apn' = MGPO with apn=off, 'lora-mgpo' = the paper's MGPO, 'msam' = Momentum-SAM "
    "(factor space). Sets method, apn, space and norm; unset: use those fields as given.",
    "profile": f"The paper's hyper-parameter profile, one of: {', '.join(PROFILES)} (nlu: rho 0.05, beta 0.9, "
    "mu 0.9; nlg: rho 0.01, beta 0.8, mu 0.8). Sets AdamW's beta1 = mu (the authors' momentum is "
    "AdamW's exp_avg), and rho and beta where they are not given explicitly; unset: rho, beta and the "
    "training betas as given.",
    "rho": "Perturbation radius (>= 0) of mgpo, msam and sam; noise scale relative to the weight row norm for "
    "random. 0 gives the plain base optimizer.",
    "beta": "mgpo: EMA factor of the per-layer weight-space gradient norm (APN), in [0, 1).",
    "apn": f"mgpo: adaptive perturbation normalization, one of: {', '.join(APN_MODES)} (inverse: the paper, "
    "radius scaled by min(1/gbar, max_scale); off: no APN; normalized: 1/gbar re-weighting at total "
    "radius rho; weight: radius rho x the layer's weight norm ||W0 + s B A||, so rho is relative, e.g. "
    "1e-3; update: radius rho x the size of the layer's last update, a look-ahead of rho steps). weight "
    "and update are candidate rules for a radius that transfers across model scale (docs/method.md), "
    "not the paper's.",
    "space": f"mgpo: where the perturbation lives, one of: {', '.join(SPACES)} (weight: each LoRA layer's weight "
    "space, the paper; factors: the LoRA factors A, B themselves, Momentum-SAM's way).",
    "norm": f"mgpo: one of: {', '.join(NORMS)} (layer: each layer its own radius, as the authors' code; global: "
    "total radius rho).",
    "max_scale": "mgpo: cap of the APN factor 1/gbar (> 0); null: no cap.",
    "momentum": "mgpo: 'optimizer' to reuse the base optimizer's first moment (AdamW's exp_avg), or a number mu "
    "in [0, 1) (e.g. 0.9) for mgpo's own momentum buffer.",
    "perturb_non_lora": "mgpo: also perturb trainable tensors that are not LoRA factors (a classification head, "
    "lm_head, modules_to_save) when the model has LoRA layers, each with D = its momentum. "
    "Default false: the authors' code perturbs LoRA layers only. Full fine-tuning (no LoRA "
    "layers) always perturbs every trained tensor.",
    "gbar_update": f"mgpo: when the APN statistic gbar is updated, one of: {', '.join(GBAR_UPDATES)} (step: once per "
    "optimizer step from the accumulated, unclipped gradient; micro_batch: after every "
    "micro-batch from the gradient accumulated so far, re-scaling the pending perturbation, as "
    "the authors' code does). The two agree without gradient accumulation.",
    "diagnostics": "mgpo: also compute, every step, each layer's radius relative to its weight norm ||W0 + s B "
    "A|| and to the size of its last update, and the APN factor, summarised over layers in the "
    "statistics (radius_to_weight_*, radius_to_update_*, apn_factor_*). Costs a copy of the "
    "trained tensors and one out x in x r product per layer per step.",
    "adaptive": "sam: scale the perturbation by |w| (ASAM).",
    "sigma": "ggpo: weight-norm coefficient of the noise standard deviation (>= 0).",
    "beta_g": "ggpo: gradient-norm coefficient of the noise standard deviation (>= 0).",
    "seed": "random, ggpo: seed of the noise generator (the global RNG is left alone).",
    "exact_restore": "mgpo, msam: tensors moved in place are restored from a copy (bit-exact). Unset: on, except "
    "full fine-tuning in fp32, where the perturbation is subtracted again (exact to a few ulp).",
}


DEFAULT_RHO, DEFAULT_BETA = 0.05, 0.9  # without a profile


def profile(name: str, beta2: float = 0.999) -> dict[str, Any]:
    """MGPO keywords for a paper profile, AdamW's ``betas=(mu, beta2)`` included: ``MGPO(model, **profile("nlg"))``."""
    if name not in PROFILES:
        raise ValueError(f"profile={name!r} is unknown: choose one of {', '.join(map(repr, PROFILES))}.")
    p = PROFILES[name]
    return {"rho": p["rho"], "beta": p["beta"], "betas": (p["mu"], beta2)}


def preset(name: str) -> dict[str, Any] | None:
    """MGPO keywords of an ablation arm (``None``: train with the plain base optimizer)."""
    if name not in PRESETS:
        raise ValueError(f"preset={name!r} is unknown: choose one of {', '.join(map(repr, PRESETS))}.")
    arm = PRESETS[name]
    return None if arm is None else dict(arm)


def _f(name: str, default: Any) -> Any:
    return field(default=default, metadata={"help": HELP[name]})


def momentum_value(value: Any, name: str = "momentum") -> str | float:
    """``momentum`` as the optimizer takes it: the string 'optimizer' or a float in [0, 1)."""
    if isinstance(value, str) and value.strip().lower() == "optimizer":
        return "optimizer"
    try:
        if isinstance(value, bool):
            raise ValueError
        number = float(value)
    except (TypeError, ValueError):
        number = math.nan
    check(
        0.0 <= number < 1.0,
        name,
        value,
        "use 'optimizer' (reuse the base optimizer's momentum) or a number in [0, 1), e.g. 0.9",
    )
    return number


def _check_exact_restore(prefix: str, value: object) -> None:
    check(
        value is None or isinstance(value, bool),
        f"{prefix}exact_restore",
        value,
        "it must be true, false or unset (null)",
    )


def _check_seed(prefix: str, value: object) -> None:
    check(isinstance(value, int) and not isinstance(value, bool), f"{prefix}seed", value, "it must be an integer")


@dataclass
class _MethodConfig:
    """What every method's config shares: its fields are the optimizer's keywords."""

    def kwargs(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def validate(self, prefix: str = "") -> None:
        """Raise ValueError naming the first field (after ``prefix``) whose value is not allowed."""
        raise NotImplementedError


@dataclass
class MGPOConfig(_MethodConfig):
    """:class:`mgpo.MGPO` (the paper's method); ``MGPO(model, **MGPOConfig().kwargs())``."""

    rho: float = _f("rho", 0.05)
    beta: float = _f("beta", 0.9)
    apn: str = _f("apn", APN_DEFAULT)
    space: str = _f("space", "weight")
    norm: str = _f("norm", "layer")
    max_scale: float | None = _f("max_scale", 10.0)
    momentum: str | float = _f("momentum", "optimizer")
    perturb_non_lora: bool = _f("perturb_non_lora", False)
    gbar_update: str = _f("gbar_update", "step")
    exact_restore: bool | None = _f("exact_restore", None)
    diagnostics: bool = _f("diagnostics", False)

    def validate(self, prefix: str = "") -> None:
        for name in ("perturb_non_lora", "diagnostics"):
            check(
                isinstance(getattr(self, name), bool),
                f"{prefix}{name}",
                getattr(self, name),
                "it must be true or false",
            )
        for name, allowed in (("apn", APN_MODES), ("space", SPACES), ("norm", NORMS), ("gbar_update", GBAR_UPDATES)):
            check_choice(f"{prefix}{name}", getattr(self, name), allowed)
        if self.max_scale is not None:
            check_range(f"{prefix}max_scale", self.max_scale, 0.0, math.inf, low_open=True)
        momentum_value(self.momentum, f"{prefix}momentum")
        check_range(f"{prefix}rho", self.rho, 0.0, math.inf)
        check_range(f"{prefix}beta", self.beta, 0.0, 1.0)
        _check_exact_restore(prefix, self.exact_restore)

    def kwargs(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["momentum"] = momentum_value(self.momentum)
        return out


@dataclass
class MSAMConfig(_MethodConfig):
    """:class:`mgpo.MSAM` (Momentum-SAM: MGPO in factor space, no APN, one global norm)."""

    rho: float = _f("rho", 0.05)
    exact_restore: bool | None = _f("exact_restore", None)

    def validate(self, prefix: str = "") -> None:
        check_range(f"{prefix}rho", self.rho, 0.0, math.inf)
        _check_exact_restore(prefix, self.exact_restore)


@dataclass
class SAMConfig(_MethodConfig):
    """:class:`mgpo.SAM` (two forward/backward passes per step; ASAM with ``adaptive``)."""

    rho: float = _f("rho", 0.05)
    adaptive: bool = _f("adaptive", False)

    def validate(self, prefix: str = "") -> None:
        check_range(f"{prefix}rho", self.rho, 0.0, math.inf)
        check(isinstance(self.adaptive, bool), f"{prefix}adaptive", self.adaptive, "it must be true or false")


@dataclass
class RandomConfig(_MethodConfig):
    """:class:`mgpo.RandomPerturbation` (Gaussian weight noise scaled by the weight row norms)."""

    rho: float = _f("rho", 0.05)
    seed: int = _f("seed", 0)

    def validate(self, prefix: str = "") -> None:
        check_range(f"{prefix}rho", self.rho, 0.0, math.inf)
        _check_seed(prefix, self.seed)


@dataclass
class GGPOConfig(_MethodConfig):
    """:class:`mgpo.GGPO` (noise scaled by weight and gradient norms)."""

    sigma: float = _f("sigma", 0.03)
    beta_g: float = _f("beta_g", 0.01)
    seed: int = _f("seed", 0)

    def validate(self, prefix: str = "") -> None:
        check_range(f"{prefix}sigma", self.sigma, 0.0, math.inf)
        check_range(f"{prefix}beta_g", self.beta_g, 0.0, math.inf)
        _check_seed(prefix, self.seed)


# method name -> (its config class, the name of its optimizer class in mgpo)
METHOD_CONFIGS: dict[str, tuple[type[_MethodConfig], str]] = {
    "mgpo": (MGPOConfig, "MGPO"),
    "msam": (MSAMConfig, "MSAM"),
    "sam": (SAMConfig, "SAM"),
    "random": (RandomConfig, "RandomPerturbation"),
    "ggpo": (GGPOConfig, "GGPO"),
}


@dataclass
class PerturbationConfig:
    """Which weight-perturbation method to train with, and its hyper-parameters (defaults: the paper's MGPO).

    The union of the per-method configs' fields, plus ``method``, ``preset`` and ``profile``: what the CLI's
    ``perturbation`` section and :class:`~mgpo.integrations.arguments.PerturbationTrainingArguments` hold.
    """

    method: str = _f("method", "mgpo")
    preset: str | None = _f("preset", None)
    profile: str | None = _f("profile", None)
    rho: float | None = field(default=None, metadata={"help": HELP["rho"] + " Unset: the profile's, else 0.05."})
    beta: float | None = field(default=None, metadata={"help": HELP["beta"] + " Unset: the profile's, else 0.9."})
    apn: str = _f("apn", APN_DEFAULT)
    space: str = _f("space", "weight")
    norm: str = _f("norm", "layer")
    max_scale: float | None = _f("max_scale", 10.0)
    momentum: str = _f("momentum", "optimizer")
    perturb_non_lora: bool = _f("perturb_non_lora", False)
    gbar_update: str = _f("gbar_update", "step")
    adaptive: bool = _f("adaptive", False)
    sigma: float = _f("sigma", 0.03)
    beta_g: float = _f("beta_g", 0.01)
    seed: int = _f("seed", 0)
    exact_restore: bool | None = _f("exact_restore", None)
    diagnostics: bool = field(
        default=True,
        metadata={
            "help": HELP["diagnostics"] + " On by default here (the CLI, "
            "the Trainer arguments); mgpo.MGPO's own default is off."
        },
    )

    def resolved(self) -> PerturbationConfig:
        """A copy with ``preset`` and ``profile`` applied to the fields they set."""
        out = dataclasses.replace(self)
        if out.preset is not None:
            arm = PRESETS[out.preset]
            out.method = "adamw" if arm is None else "mgpo"
            for key, value in (arm or {}).items():
                setattr(out, key, value)
        # rho and beta given explicitly win over the profile; unset, they take its values (else the defaults)
        default = {"rho": DEFAULT_RHO, "beta": DEFAULT_BETA}
        profile = default if out.profile is None else PROFILES.get(out.profile, default)
        out.rho = profile["rho"] if out.rho is None else out.rho
        out.beta = profile["beta"] if out.beta is None else out.beta
        return out

    @property
    def adam_beta1(self) -> float | None:
        """AdamW's beta1 the profile asks for (mu), or None."""
        return None if self.profile is None else PROFILES[self.profile]["mu"]

    def momentum_value(self) -> str | float:
        """``momentum`` as the optimizer takes it: the string 'optimizer' or a float."""
        return momentum_value(self.momentum, "perturbation.momentum")

    def method_config(self) -> _MethodConfig | None:
        """The per-method config (:class:`MGPOConfig`, ...) of the resolved method; None for 'adamw'."""
        cfg = self.resolved()
        if cfg.method == "adamw":
            return None
        config_cls = METHOD_CONFIGS[cfg.method][0]
        return config_cls(**{f.name: getattr(cfg, f.name) for f in dataclasses.fields(config_cls)})

    def validate(self) -> None:
        """Raise ValueError naming the first field whose value is not allowed, and the allowed values."""
        for name, allowed in (
            ("method", METHODS),
            ("preset", tuple(PRESETS) + (None,)),
            ("profile", tuple(PROFILES) + (None,)),
        ):
            check_choice(f"perturbation.{name}", getattr(self, name), allowed)
        if self.preset is not None:  # a field the preset sets, given another value too, would be overridden quietly
            arm = PRESETS[self.preset]
            sets = {"method": "adamw" if arm is None else "mgpo", **(arm or {})}
            for name, value in sets.items():
                given, default = getattr(self, name), PerturbationConfig.__dataclass_fields__[name].default
                if given not in (value, default):
                    raise ValueError(
                        f"perturbation.preset={self.preset!r} sets {name}={value!r}, but "
                        f"perturbation.{name}={given!r} is given too, and would be ignored: drop one "
                        "(without a preset, method, apn, space and norm are used as given)."
                    )
        resolved = self.resolved()
        for config_cls, _ in METHOD_CONFIGS.values():  # every field, whichever method is chosen
            config_cls(**{f.name: getattr(resolved, f.name) for f in dataclasses.fields(config_cls)}).validate(
                "perturbation."
            )
