"""The ``tune:`` section of a training config, and the study plan ``mgpo tune`` checks before it runs anything."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from omegaconf import OmegaConf

from mgpo.pipelines.config import ConfigError, _help, load_config, read_yaml
from mgpo.pipelines.executors import SlurmConfig

BASE = "train.yaml"  # the training config every trial starts from: the given config without its tune: section
TRIALS = "trials"
STUDY = "mgpo-tune"
# Tunable settings: name -> (the config field it sets, how it is searched). The checks, trials and report read it.
PARAMS = {
    "rho": ("perturbation.rho", "log"),
    "lr": ("training.lr", "log"),
    "max_scale": ("perturbation.max_scale", "log"),
    "apn": ("perturbation.apn", "choice"),
}
METRICS = ("task", "loss")
PRUNERS = ("median", "hyperband", "none")
# The validation metric of each task's runs (validation_<name> in metrics.json); higher is better but for the loss.
TASK_METRIC = {"classification": "accuracy", "text-to-text": "accuracy", "regression": "pearson"}
BASELINE = "lora"  # trial 0's arm: LoRA without perturbation (perturbation.preset=lora)
SEARCH, SEEDS = "search", "seeds"  # a trial's phase (user attribute)
MAX_FAILURES = 3  # failed trials in a row after which the study stops: the config, not bad luck


@dataclass
class TuneConfig:
    """The ``tune:`` section of a training config: what ``mgpo tune`` searches and how."""

    trials: int = _help("Search trials to finish (completed or pruned); LoRA's trial 0 is not counted.", 12)
    max_steps: int = _help("Optimizer steps of each trial (its run's training.max_steps).", 100)
    evals: int = _help("Validation evaluations per trial; the pruner decides at each.", 4)
    metric: str = _help(
        f"What a trial is scored by, on the validation split: {' or '.join(METRICS)} (task: "
        "accuracy for classification and text-to-text, Pearson r for regression).",
        "task",
    )
    pruner: str = _help(f"Optuna's pruner: {', '.join(PRUNERS)}.", "median")
    sampler_seed: int = _help("Seed of Optuna's TPE sampler: with one worker the same seed gives the same trials.", 0)
    top: int = _help("With --seeds S: how many of the best settings are re-run with S seeds each, beside LoRA.", 2)
    search: dict = _help(
        "The settings searched: rho always (default: the profile's rho / 100 to x 10), and "
        "optionally lr and max_scale as {low: ..., high: ...} (log-uniform) and apn as a list.",
        factory=dict,
    )
    slurm: dict = _help("--executor slurm: each worker's resources, as in a sweep's slurm: section.", factory=dict)

    @property
    def eval_steps(self) -> int:
        """Steps between a trial's validation evaluations (its run's training.eval_steps)."""
        return max(1, self.max_steps // self.evals)

    @property
    def prunes(self) -> bool:
        """Whether a pruner may stop trials (any but ``none``)."""
        return self.pruner != "none"

    @property
    def evaluated_steps(self) -> set[int]:
        """The steps at which a finished trial has logged a validation score: each evaluation during training, and
        ``mgpo train``'s final one at max_steps."""
        return {*range(self.eval_steps, self.max_steps + 1, self.eval_steps), self.max_steps}


@dataclass(frozen=True)
class Space:
    """One searched setting: a log-uniform range, or a list of choices."""

    name: str
    low: float = 0.0
    high: float = 0.0
    choices: tuple = ()

    def suggest(self, trial) -> Any:
        if self.choices:
            return trial.suggest_categorical(self.name, list(self.choices))
        return trial.suggest_float(self.name, self.low, self.high, log=True)

    def describe(self) -> str:
        if self.choices:
            return f"{self.name} in {{{', '.join(map(str, self.choices))}}}"
        return f"{self.name} log-uniform in [{self.low:g}, {self.high:g}]"


@dataclass
class Tune:
    """A checked study plan: its folder, base config, settings and search space."""

    output_dir: Path
    base_text: str  # the training config without its tune: section (written to output_dir / BASE)
    overrides: list[str]  # the command line's, applied to every trial
    config: TuneConfig
    space: list[Space]
    metric: str  # accuracy, pearson or loss
    storage: str  # SQLAlchemy URL of the study's database
    seed: int  # the base config's training.seed: search trials use it, --seeds counts up from it
    default_rho: float  # the profile's (or the default) rho, the centre of the default range
    slurm: SlurmConfig = field(default_factory=SlurmConfig)

    @property
    def base(self) -> Path:
        return self.output_dir / BASE

    @property
    def sqlite(self) -> bool:
        """Whether the study is a SQLite file (no row locks: workers in several processes need a lock of their own,
        and a shared file system that locks correctly)."""
        return self.storage.startswith("sqlite")

    @property
    def key(self) -> str:
        """The trial's score in its metrics.json: ``mgpo train``'s final evaluation of the validation split."""
        return f"validation_{self.metric}"

    @property
    def progress_keys(self) -> tuple[str, str]:
        """The score as log.jsonl has it while the trial trains: the Trainer logs its evaluations during training
        as ``eval_*``, and ``mgpo train`` its final one as ``validation_*``."""
        return (f"eval_{self.metric}", self.key)

    @property
    def direction(self) -> str:
        return "minimize" if self.metric == "loss" else "maximize"


def _error(path, message: str) -> ConfigError:
    return ConfigError(f"tune config {str(path)!r}: {message}")


def _tune_config(path, section) -> TuneConfig:
    if not isinstance(section, dict):
        raise _error(path, f"`tune:` must map settings to values, not {section!r}.")
    known = {f.name for f in dataclasses.fields(TuneConfig)}
    unknown = sorted(set(section) - known)
    if unknown:
        raise _error(path, f"unknown tune setting {unknown[0]!r}; settings: {', '.join(sorted(known))}.")
    config = TuneConfig(**section)
    for name in ("trials", "max_steps", "evals", "top"):
        value = getattr(config, name)
        if not (isinstance(value, int) and not isinstance(value, bool) and value >= 1):
            raise _error(path, f"tune.{name}={value!r} must be a whole number of at least 1.")
    if config.evals > config.max_steps:
        raise _error(
            path,
            f"tune.evals={config.evals} exceeds tune.max_steps={config.max_steps}: a trial "
            "evaluates at most once a step.",
        )
    for name, allowed in (("metric", METRICS), ("pruner", PRUNERS)):
        if getattr(config, name) not in allowed:
            raise _error(path, f"tune.{name}={getattr(config, name)!r} is unknown: choose one of {', '.join(allowed)}.")
    if not isinstance(config.search, dict):
        raise _error(path, f"tune.search must map settings to ranges, not {config.search!r}.")
    return config


def _range(path, name: str, value) -> Space:
    if not (isinstance(value, dict) and set(value) == {"low", "high"}):
        raise _error(path, f"tune.search.{name} must be {{low: ..., high: ...}}, not {value!r}.")
    low, high = value["low"], value["high"]
    if not all(
        isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and v > 0 for v in (low, high)
    ):
        raise _error(
            path,
            f"tune.search.{name}: low={low!r} and high={high!r} must be numbers above 0 (the range "
            "is searched on a log scale).",
        )
    if low >= high:
        raise _error(path, f"tune.search.{name}: low={low!r} must be below high={high!r}.")
    return Space(name, float(low), float(high))


def _spaces(path, search: dict, default_rho: float, check: Callable[[list[str]], object]) -> list[Space]:
    """The searched settings, rho always among them."""
    unknown = sorted(set(search) - set(PARAMS))
    if unknown:
        raise _error(path, f"unknown parameter {unknown[0]!r} in tune.search; tunable: {', '.join(PARAMS)}.")
    spaces = []
    for name, (where, kind) in PARAMS.items():
        if name not in search and name != "rho":
            continue
        value = search.get(name) or {"low": default_rho / 100, "high": default_rho * 10}
        if kind == "choice":
            if not (isinstance(value, list) and value):
                raise _error(path, f"tune.search.{name} must be a non-empty list, e.g. [inverse, off].")
            for choice in value:
                check([f"{where}={choice}"])  # the training config's own check names what is valid
            spaces.append(Space(name, choices=tuple(value)))
        else:
            spaces.append(_range(path, name, value))
    return spaces


def load_tune(
    config_path: str | Path,
    overrides: Sequence[str] = (),
    output_dir: str | Path | None = None,
    storage: str | None = None,
) -> Tune:
    """Read and check a tune config (a training config with a ``tune:`` section); writes nothing."""
    path = Path(config_path)
    if not path.is_file():
        raise ConfigError(f"config file {str(path)!r} does not exist; see configs/ for examples.")
    raw = OmegaConf.to_container(read_yaml(path))
    raw = raw if isinstance(raw, dict) else {}
    config = _tune_config(path, raw.pop("tune", None) or {})
    base_text = yaml.safe_dump(raw, sort_keys=False)
    out = Path(output_dir) if output_dir else Path("runs") / f"tune-{path.stem.removeprefix('tune-')}"
    overrides = list(overrides)

    def check(extra: list[str]):
        return base_config(base_text, [*overrides, *extra], out / TRIALS / "check")

    cfg = check([])
    if cfg.data.task == "causal-lm":
        raise _error(
            path,
            "it has no validation split of its own: causal-lm runs take their validation loss on "
            "the test split (docs/tasks.md), and trials are never scored on test data. mgpo tune "
            "tunes classification, regression and text-to-text tasks.",
        )
    metric = TASK_METRIC[cfg.data.task] if config.metric == "task" else "loss"
    default_rho = cfg.perturbation.resolved().rho
    spaces = _spaces(path, config.search, default_rho, check)
    url = storage or f"sqlite:///{(out / 'study.db').resolve()}"
    slurm = SlurmConfig.from_spec(path, config.slurm or None)
    return Tune(out, base_text, overrides, config, spaces, metric, url, cfg.training.seed, default_rho, slurm)


def base_config(base_text: str, overrides: list[str], output_dir: Path):
    """The checked training config of ``base_text`` with ``overrides`` (what a trial's ``mgpo train`` loads)."""
    import tempfile

    with tempfile.NamedTemporaryFile("w", suffix=".yaml", delete=False) as f:
        f.write(base_text)
    try:
        return load_config(f.name, [*overrides, f"training.output_dir={output_dir}"])
    finally:
        Path(f.name).unlink()


def trial_overrides(tune: Tune, params: dict, arm: str, seed: int, out: Path) -> list[str]:
    """The ``mgpo train`` overrides of one trial."""
    c = tune.config
    settings = (
        ["perturbation.preset=lora"]
        if arm == BASELINE
        else [f"{PARAMS[name][0]}={value}" for name, value in params.items()]
    )
    return [
        *tune.overrides,
        *settings,
        f"training.max_steps={c.max_steps}",
        f"training.eval_steps={c.eval_steps}",
        f"training.save_steps={c.max_steps}",
        f"training.seed={seed}",
        f"training.output_dir={out}",
    ]
