"""Perturbation methods inside the Hugging Face ``Trainer`` (and TRL trainers built on it).

Single-pass methods (MGPO, MSAM, random noise, GGPO) need nothing from the Trainer: their perturbation is put on
by a forward pre-hook on the model and taken off in ``step()``, at eval-mode forwards and at ``state_dict()``.
Building the optimizer with the model is the one or two lines it takes::

    opt = mgpo.MGPO(model, lr=2e-4, rho=0.05)                     # or build_optimizer(model, cfg, groups, lr=...)
    Trainer(model=model, args=args, train_dataset=ds, optimizers=(opt, None)).train()

SAM needs its second forward/backward run by the trainer, and AdaLoRA its per-step rank allocation: for those
(and for statistics in the logs) use :class:`PerturbationTrainer`. A plain Trainer with SAM stops with an error
that says so.

:class:`PerturbationTrainer` (or ``perturbed(trl.SFTTrainer)``) does more, and is what the CLI uses:

* builds the optimizer from a :class:`PerturbationConfig` and the adapter's param groups (LoRA+ groups for
  ``loraplus``), with the learning rate, weight decay and Adam betas/eps of the ``TrainingArguments``; the
  learning-rate schedule stays the Trainer's own. ``args.optim`` is not used: the base optimizer is the
  ``base_optimizer`` class (AdamW unless given);
* runs SAM's second forward/backward: the micro-batches of the gradient-accumulation window are kept, and at the
  optimizer step they are replayed at the perturbed weights (``optimizer.closure``). The second gradient is
  clipped to ``max_grad_norm`` like the first. Metrics a trainer computes inside ``training_step`` (TRL's
  token accuracy, say) are counted for both passes;
* takes any perturbation off before evaluation and checkpointing (the model's ``state_dict()`` hook does so as
  well), so evaluation, checkpoints and the final model are always at clean weights;
* calls :func:`~mgpo.integrations.peft_variants.adapter_step` (AdaLoRA's rank re-allocation) after every
  optimizer step, before the gradients are cleared;
* adds the optimizer's per-step statistics (``perturbation_norm``, ``momentum_norm``, ``gbar_*``, averaged over
  the steps since the last log; ``skipped_steps`` as the running count) to the training logs, so they reach
  TensorBoard, W&B and ``trainer_state.json``.

Resuming (``trainer.train(resume_from_checkpoint=...)``) needs nothing special: the Trainer saves and loads
``optimizer.state_dict()``, which holds the whole method state (keys ``base``, ``own``, ``extra``).

The Trainer may wrap the optimizer (accelerate's ``AcceleratedOptimizer``); :func:`unwrap_optimizer` or the
``trainer.perturbation_optimizer`` property give the mgpo optimizer itself (``last_stats``, ``is_perturbed``).
"""

from __future__ import annotations

import contextlib
import math
import weakref
from collections.abc import Mapping
import dataclasses
from dataclasses import dataclass, field
from typing import Any

import torch
import transformers
from torch import nn
from transformers import TrainerCallback

from mgpo.integrations.peft_variants import AdapterConfig, adapter_step, optimizer_param_groups
from mgpo.optim import GGPO, MGPO, MSAM, SAM, RandomPerturbation
from mgpo.optim._base import PerturbedOptimizer, check_range
from mgpo.optim.distributed import local_state, sharded_state
from mgpo.optim.mgpo import APN_MODES, NORMS, PRESETS, PROFILES, SPACES, preset

METHODS = ("adamw", "mgpo", "msam", "sam", "random", "ggpo")


@dataclass
class PerturbationConfig:
    """Which weight-perturbation method to train with, and its hyper-parameters (defaults: the paper's MGPO)."""

    method: str = field(default="mgpo", metadata={
        "help": f"Perturbation method, one of: {', '.join(METHODS)}. 'adamw' is the plain base optimizer "
                "(no perturbation)."})
    preset: str | None = field(default=None, metadata={
        "help": f"Named arm of the paper's ablation (Figure 4), one of: {', '.join(PRESETS)}. 'lora' = plain "
                "AdamW, 'mgpo-no-apn' = MGPO with apn=off, 'lora-mgpo' = the paper's MGPO, 'msam' = Momentum-SAM "
                "(factor space). Sets method, apn, space and norm; unset: use those fields as given."})
    profile: str | None = field(default=None, metadata={
        "help": f"The paper's hyper-parameter profile, one of: {', '.join(PROFILES)} (nlu: rho 0.05, beta 0.9, "
                "mu 0.9; nlg: rho 0.01, beta 0.8, mu 0.8). Sets rho, beta and AdamW's beta1 = mu (the authors' "
                "momentum is AdamW's exp_avg); unset: use rho, beta and the training betas as given."})
    rho: float = field(default=0.05, metadata={
        "help": "Perturbation radius (>= 0) of mgpo, msam and sam; noise scale relative to the weight row norm "
                "for random. 0 gives the plain base optimizer."})
    beta: float = field(default=0.9, metadata={
        "help": "mgpo: EMA factor of the per-layer weight-space gradient norm (APN), in [0, 1)."})
    apn: str = field(default="inverse", metadata={
        "help": f"mgpo: adaptive perturbation normalization, one of: {', '.join(APN_MODES)} (inverse: the paper, "
                "radius scaled by min(1/gbar, max_scale); off: no APN; normalized: 1/gbar re-weighting at total "
                "radius rho)."})
    space: str = field(default="weight", metadata={
        "help": f"mgpo: where the perturbation lives, one of: {', '.join(SPACES)} (weight: each LoRA layer's "
                "weight space, the paper; factors: the LoRA factors A, B themselves, Momentum-SAM's way)."})
    norm: str = field(default="layer", metadata={
        "help": f"mgpo: one of: {', '.join(NORMS)} (layer: each layer its own radius, as the authors' code; "
                "global: total radius rho)."})
    max_scale: float | None = field(default=10.0, metadata={
        "help": "mgpo: cap of the APN factor 1/gbar (> 0); null: no cap."})
    momentum: str = field(default="optimizer", metadata={
        "help": "mgpo: 'optimizer' to reuse the base optimizer's first moment (AdamW's exp_avg), or a number mu in "
                "[0, 1) (e.g. 0.9) for mgpo's own momentum buffer."})
    adaptive: bool = field(default=False, metadata={
        "help": "sam: scale the perturbation by |w| (ASAM)."})
    sigma: float = field(default=0.03, metadata={
        "help": "ggpo: weight-norm coefficient of the noise standard deviation (>= 0)."})
    beta_g: float = field(default=0.01, metadata={
        "help": "ggpo: gradient-norm coefficient of the noise standard deviation (>= 0)."})
    seed: int = field(default=0, metadata={
        "help": "random, ggpo: seed of the noise generator (the global RNG is left alone)."})
    exact_restore: bool | None = field(default=None, metadata={
        "help": "mgpo, msam: tensors moved in place are restored from a copy (bit-exact). Unset: on, except full "
                "fine-tuning in fp32, where the perturbation is subtracted again (exact to a few ulp)."})

    def resolved(self) -> PerturbationConfig:
        """A copy with ``preset`` and ``profile`` applied to the fields they set."""
        out = dataclasses.replace(self)
        if out.preset is not None:
            arm = preset(out.preset)
            out.method = "adamw" if arm is None else "mgpo"
            for key, value in (arm or {}).items():
                setattr(out, key, value)
        if out.profile is not None:
            p = PROFILES[out.profile]
            out.rho, out.beta = p["rho"], p["beta"]
        return out

    @property
    def adam_beta1(self) -> float | None:
        """AdamW's beta1 the profile asks for (mu), or None."""
        return None if self.profile is None else PROFILES[self.profile]["mu"]

    def momentum_value(self) -> str | float:
        """``momentum`` as the optimizer takes it: the string 'optimizer' or a float."""
        if isinstance(self.momentum, str) and self.momentum.strip().lower() == "optimizer":
            return "optimizer"
        try:
            if isinstance(self.momentum, bool):
                raise ValueError
            value = float(self.momentum)
        except (TypeError, ValueError):
            value = math.nan
        if not (0.0 <= value < 1.0):
            raise ValueError(f"perturbation.momentum={self.momentum!r} is invalid: use 'optimizer' (reuse the base "
                             "optimizer's momentum) or a number in [0, 1), e.g. 0.9.")
        return value

    def validate(self) -> None:
        """Raise ValueError naming the first field whose value is not allowed, and the allowed values."""
        for name, allowed in (("method", METHODS), ("apn", APN_MODES), ("space", SPACES), ("norm", NORMS),
                              ("preset", tuple(PRESETS) + (None,)), ("profile", tuple(PROFILES) + (None,))):
            if getattr(self, name) not in allowed:
                raise ValueError(f"perturbation.{name}={getattr(self, name)!r} is unknown: choose one of "
                                 f"{', '.join(str(a) for a in allowed)}.")
        if self.max_scale is not None:
            check_range("perturbation.max_scale", self.max_scale, 0.0, float("inf"), low_open=True)
        self.momentum_value()
        inf = float("inf")
        for name, low, high in (("rho", 0.0, inf), ("beta", 0.0, 1.0), ("sigma", 0.0, inf), ("beta_g", 0.0, inf)):
            check_range(f"perturbation.{name}", getattr(self, name), low, high)
        checks = [
            ("adaptive", isinstance(self.adaptive, bool), "true or false"),
            ("seed", isinstance(self.seed, int) and not isinstance(self.seed, bool), "an integer"),
            ("exact_restore", self.exact_restore is None or isinstance(self.exact_restore, bool),
             "true, false or unset (null)"),
        ]
        for name, ok, allowed in checks:
            if not ok:
                raise ValueError(f"perturbation.{name}={getattr(self, name)!r} is invalid: it must be {allowed}.")


def build_optimizer(
    model: nn.Module,
    cfg: PerturbationConfig,
    param_groups: list[dict],
    *,
    lr: float,
    weight_decay: float = 0.0,
    total_steps: int | None = None,
    base_optimizer: type[torch.optim.Optimizer] = torch.optim.AdamW,
    **base_kwargs,
) -> torch.optim.Optimizer:
    """The optimizer of ``cfg.method`` over ``param_groups`` (e.g. from ``optimizer_param_groups``).

    ``adamw`` gives ``base_optimizer(param_groups, lr=lr, weight_decay=weight_decay)`` itself; every other method
    wraps ``base_optimizer`` and gets ``model`` (for its forward hooks and LoRA layer grouping). ``total_steps``
    is the run's number of optimizer steps, the length of the random method's noise ramp (None: no ramp).
    ``base_kwargs`` (e.g. ``betas``, ``eps``) go to the base optimizer. Group entries override ``lr`` and
    ``weight_decay``.
    """
    cfg.validate()
    cfg = cfg.resolved()
    groups = [dict(group) for group in param_groups]  # the optimizers add keys; leave the caller's dicts alone
    if cfg.adam_beta1 is not None and "betas" in base_kwargs:  # the profile's mu is AdamW's beta1
        base_kwargs = {**base_kwargs, "betas": (cfg.adam_beta1, base_kwargs["betas"][1])}
    elif cfg.adam_beta1 is not None and issubclass(base_optimizer, (torch.optim.Adam, torch.optim.AdamW)):
        base_kwargs = {**base_kwargs, "betas": (cfg.adam_beta1, 0.999)}
    base = dict(lr=lr, weight_decay=weight_decay, **base_kwargs)
    method = cfg.method
    if method == "adamw":
        return base_optimizer(groups, **base)
    common = dict(model=model, base_kwargs=base)
    if method == "mgpo":
        return MGPO(groups, base_optimizer, rho=cfg.rho, beta=cfg.beta, apn=cfg.apn, norm=cfg.norm,
                    max_scale=cfg.max_scale, momentum=cfg.momentum_value(), space=cfg.space,
                    exact_restore=cfg.exact_restore, **common)
    if method == "msam":
        return MSAM(groups, base_optimizer, rho=cfg.rho, exact_restore=cfg.exact_restore, **common)
    if method == "sam":
        return SAM(groups, base_optimizer, rho=cfg.rho, adaptive=cfg.adaptive, **common)
    if method == "random":
        return RandomPerturbation(groups, base_optimizer, rho=cfg.rho, total_steps=total_steps, seed=cfg.seed,
                                  **common)
    return GGPO(groups, base_optimizer, sigma=cfg.sigma, beta_g=cfg.beta_g, seed=cfg.seed, **common)


def unwrap_optimizer(optimizer: torch.optim.Optimizer | None) -> torch.optim.Optimizer | None:
    """The optimizer inside the Trainer's wrappers (accelerate's ``AcceleratedOptimizer`` keeps it in
    ``.optimizer``): the mgpo optimizer itself, or the plain base optimizer for ``adamw``."""
    while optimizer is not None and isinstance(getattr(optimizer, "optimizer", None), torch.optim.Optimizer):
        optimizer = optimizer.optimizer
    return optimizer


class _PerturbationCallback(TrainerCallback):
    """Runs between the optimizer step and the Trainer's ``model.zero_grad()``: statistics, AdaLoRA, SAM's store."""

    def __init__(self, trainer: PerturbationTrainerMixin):
        self._trainer = weakref.ref(trainer)

    def on_train_begin(self, args, state, control, **kwargs):
        trainer = self._trainer()
        if trainer is not None:
            trainer._reset_stats()
            trainer._sam_window.clear()

    def on_optimizer_step(self, args, state, control, **kwargs):
        trainer = self._trainer()
        if trainer is None:
            return
        trainer._sam_window.clear()
        if not trainer.accelerator.optimizer_step_was_skipped:  # e.g. an fp16 overflow: no new statistics
            trainer._add_stats(trainer.perturbation_optimizer)
        if trainer.adapter is not None:
            # Gradients are still there (zero_grad comes later); global_step is the 0-based number of this step,
            # the counter PEFT's own AdaLoRA examples pass.
            adapter_step(trainer.accelerator.unwrap_model(trainer.model), trainer.adapter, state.global_step)


class PerturbationTrainerMixin:
    """Mix into ``transformers.Trainer`` or any subclass (``trl.SFTTrainer``); see the module docstring.

    Extra keyword arguments:
        perturbation: the method and its hyper-parameters (default: ``PerturbationConfig()``, MGPO).
        adapter: the adapter the model was built with (``apply_adapter``): LoRA+ param groups and AdaLoRA's
            per-step rank allocation come from it. None: one param group of all trainable parameters.
        base_optimizer: the optimizer class the method wraps (``torch.optim.AdamW``).

    An optimizer passed as ``optimizers=(opt, scheduler)`` is used as given.
    """

    def __init__(self, *args, perturbation: PerturbationConfig | None = None, adapter: AdapterConfig | None = None,
                 base_optimizer: type[torch.optim.Optimizer] = torch.optim.AdamW, **kwargs):
        self.perturbation = perturbation if perturbation is not None else PerturbationConfig()
        self.perturbation.validate()
        if adapter is not None:
            adapter.validate()
        self.adapter = adapter
        self.base_optimizer = base_optimizer
        self._sam_window: list[tuple[nn.Module, Any, Any]] = []
        self._stats_sum: dict[str, torch.Tensor] = {}
        self._stats_count = 0
        self._total_steps: int | None = None
        super().__init__(*args, **kwargs)
        self.add_callback(_PerturbationCallback(self))

    # ------------------------------------------------------------------------------------------- optimizer
    @property
    def perturbation_optimizer(self) -> torch.optim.Optimizer | None:
        """The optimizer itself (not accelerate's wrapper): ``last_stats``, ``is_perturbed``, ``unperturbed()``."""
        return unwrap_optimizer(self.optimizer)

    def create_optimizer_and_scheduler(self, num_training_steps: int):
        self._total_steps = num_training_steps
        return super().create_optimizer_and_scheduler(num_training_steps)

    def create_optimizer(self, model=None):
        if self.optimizer is None:
            opt_model = self.model if model is None else model
            args = self.args
            groups = optimizer_param_groups(opt_model, self.adapter or AdapterConfig(), args.learning_rate,
                                            args.weight_decay)
            base_kwargs = {}
            if issubclass(self.base_optimizer, (torch.optim.Adam, torch.optim.AdamW)):
                base_kwargs = dict(betas=(args.adam_beta1, args.adam_beta2), eps=args.adam_epsilon)
            total_steps = self._total_steps or (self.state.max_steps if self.state.max_steps > 0 else None)
            self.optimizer = build_optimizer(opt_model, self.perturbation, groups, lr=args.learning_rate,
                                             weight_decay=args.weight_decay, total_steps=total_steps,
                                             base_optimizer=self.base_optimizer, **base_kwargs)
        return self.optimizer

    # ------------------------------------------------------------------------------------------- SAM
    def training_step(self, model, inputs, num_items_in_batch=None):
        opt = self.perturbation_optimizer
        if getattr(opt, "two_pass", False):
            # Kept for the second pass at the optimizer step; a shallow copy, since compute_loss may pop keys.
            self._sam_window.append((model, dict(inputs) if isinstance(inputs, Mapping) else inputs,
                                     num_items_in_batch))
            opt.closure = self._second_pass
        return super().training_step(model, inputs, num_items_in_batch)

    def _second_pass(self) -> torch.Tensor:
        """SAM's closure: forward/backward over the stored micro-batches (weights now at W + eps)."""
        window, self._sam_window = self._sam_window, []
        if not window:
            raise RuntimeError("SAM's second pass found no stored micro-batches: the optimizer was stepped outside "
                               "PerturbationTrainer.training_step. Train through trainer.train().")
        loss = None
        for i, (model, inputs, num_items) in enumerate(window):
            sync = contextlib.nullcontext() if i == len(window) - 1 else self.accelerator.no_sync(model)
            with sync:
                step_loss = super().training_step(model, inputs, num_items)
            loss = step_loss if loss is None else loss + step_loss
        model = window[-1][0]
        scaler = getattr(self.accelerator, "scaler", None)
        if scaler is not None and scaler.is_enabled():
            # The Trainer unscaled the first gradient before step(); the second one is unscaled here (a second
            # scaler.unscale_ in one iteration is an error).
            grads = [p.grad for p in model.parameters() if p.grad is not None]
            if grads:
                torch._foreach_mul_(grads, 1.0 / float(scaler.get_scale()))
            if self.args.max_grad_norm and self.args.max_grad_norm > 0:
                torch.nn.utils.clip_grad_norm_(model.parameters(), self.args.max_grad_norm)
        elif self.args.max_grad_norm and self.args.max_grad_norm > 0:
            self._clip_grad_norm(model)
        return loss

    # ------------------------------------------------------------------------------------------- FSDP checkpoints
    def _fsdp_optimizer_file(self, folder: str) -> str:
        return f"{folder}/mgpo_optimizer_rank{self.args.process_index}-of-{self.args.world_size}.pt"

    def _ours_under_fsdp(self) -> bool:
        return getattr(self, "is_fsdp_enabled", False) and isinstance(self.perturbation_optimizer, PerturbedOptimizer)

    def _save_optimizer_and_scheduler(self, output_dir: str) -> None:
        """Under FSDP each rank saves its shard of the method's state (torch's FSDP optimizer checkpointing
        expects a plain optimizer's state-dict layout); otherwise as the Trainer does."""
        if not self._ours_under_fsdp():
            return super()._save_optimizer_and_scheduler(output_dir)
        from accelerate.utils import save_fsdp_model
        from transformers.distributed.fsdp import get_fsdp_ckpt_kwargs
        from transformers.trainer import SCHEDULER_NAME

        save_fsdp_model(self.accelerator.state.fsdp_plugin, self.accelerator, self.model, output_dir,
                        **get_fsdp_ckpt_kwargs())
        torch.save(local_state(self.perturbation_optimizer.state_dict()), self._fsdp_optimizer_file(output_dir))
        if self.args.should_save:
            torch.save(self.lr_scheduler.state_dict(), f"{output_dir}/{SCHEDULER_NAME}")

    def _load_optimizer_and_scheduler(self, checkpoint: str | None) -> None:
        if checkpoint is None or not self._ours_under_fsdp():
            return super()._load_optimizer_and_scheduler(checkpoint)
        from pathlib import Path

        from transformers.trainer import SCHEDULER_NAME

        mine = Path(self._fsdp_optimizer_file(checkpoint))
        if not mine.is_file():
            found = sorted(p.name for p in Path(checkpoint).glob("mgpo_optimizer_rank*.pt"))
            raise ValueError(
                f"--resume under FSDP: {checkpoint} has no optimizer shard for rank {self.args.process_index} of "
                f"{self.args.world_size} ({', '.join(found) or 'none'} found). Resume an FSDP run with the number "
                "of processes it was saved with.")
        opt = self.perturbation_optimizer
        opt.load_state_dict(sharded_state(torch.load(mine, map_location=self.args.device, weights_only=False), opt))
        self.lr_scheduler.load_state_dict(torch.load(f"{checkpoint}/{SCHEDULER_NAME}", weights_only=True))

    # ------------------------------------------------------------------------------------------- clean weights
    def _take_off_perturbation(self) -> None:
        opt = self.perturbation_optimizer
        if isinstance(opt, PerturbedOptimizer):
            opt.restore()

    def evaluate(self, *args, **kwargs):
        self._take_off_perturbation()
        return super().evaluate(*args, **kwargs)

    def save_model(self, *args, **kwargs):
        self._take_off_perturbation()
        return super().save_model(*args, **kwargs)

    # ------------------------------------------------------------------------------------------- logging
    def _reset_stats(self) -> None:
        self._stats_sum, self._stats_count = {}, 0

    def _add_stats(self, opt) -> None:
        """Sums the step's statistics on the device; they are read back only when the Trainer logs."""
        stats = getattr(opt, "stats_tensors", None)
        if not stats:
            return
        for key, value in stats.items():
            self._stats_sum[key] = value.detach().float() + self._stats_sum.get(key, 0.0)
        self._stats_count += 1

    def log(self, logs: dict[str, float], *args, **kwargs) -> None:
        if "loss" in logs and self._stats_count:
            keys = list(self._stats_sum)
            values = torch.stack([self._stats_sum[k] for k in keys]).tolist()  # one transfer per log
            logs.update({k: v / self._stats_count for k, v in zip(keys, values)})
            opt = self.perturbation_optimizer
            if isinstance(opt, PerturbedOptimizer):
                logs["skipped_steps"] = float(opt.skipped_steps)
            self._reset_stats()
        return super().log(logs, *args, **kwargs)


class PerturbationTrainer(PerturbationTrainerMixin, transformers.Trainer):
    """``transformers.Trainer`` training with a perturbation method (see :class:`PerturbationTrainerMixin`)."""


def perturbed(trainer_cls: type) -> type:
    """``trainer_cls`` with :class:`PerturbationTrainerMixin` mixed in, e.g. ``perturbed(trl.SFTTrainer)``."""
    if not (isinstance(trainer_cls, type) and issubclass(trainer_cls, transformers.Trainer)):
        raise TypeError(f"perturbed() needs a transformers.Trainer subclass (e.g. trl.SFTTrainer), got "
                        f"{trainer_cls!r}.")
    if issubclass(trainer_cls, PerturbationTrainerMixin):
        return trainer_cls
    return type(f"Perturbed{trainer_cls.__name__}", (PerturbationTrainerMixin, trainer_cls),
                {"__module__": __name__, "__doc__": f"{trainer_cls.__name__} with a perturbation method."})
