"""Perturbation methods inside the Hugging Face ``Trainer`` (and TRL trainers built on it).

Single-pass methods (MGPO, MSAM, random noise, GGPO) need nothing from the Trainer: their perturbation is put on
by a forward pre-hook on the model and taken off in ``step()``, at eval-mode forwards and at ``state_dict()``.
Building the optimizer with the model is the one or two lines it takes::

    opt = mgpo.create_optimizer(model, torch.optim.AdamW, {"lr": 2e-4}, method="mgpo", rho=0.05)
    Trainer(model=model, args=args, train_dataset=ds, optimizers=(opt, None)).train()
    # or: Trainer(..., optimizer_cls_and_kwargs=(mgpo.MGPO, {"model": model, "lr": 2e-4, "rho": 0.05}))

SAM needs its second forward/backward run by the trainer, and AdaLoRA its per-step rank allocation: for those
(and for statistics in the logs) use :class:`PerturbationTrainer`. A plain Trainer with SAM stops with an error
that says so.

:class:`PerturbationTrainer` (or ``perturbed(trl.SFTTrainer)``) does more, and is what the CLI uses:

* builds the optimizer at ``train()`` from ``self.model`` (so after ``trl.SFTTrainer(peft_config=...)`` has
  wrapped it), the method's settings (:class:`PerturbationTrainingArguments` fields, or ``perturbation=``) and
  Hugging Face's parameter groups (no weight decay on biases and norm weights; PEFT's LoRA+ groups for
  ``loraplus``), around the base optimizer ``args.optim`` names (``adamw_torch`` by default) with its learning
  rate, betas and eps; the learning-rate schedule stays the Trainer's own;
* runs SAM's second forward/backward: the micro-batches of the gradient-accumulation window are kept, and at the
  optimizer step they are replayed at the perturbed weights (``optimizer.closure``). The second gradient is
  clipped to ``max_grad_norm`` like the first. Metrics a trainer computes inside ``training_step`` (TRL's
  token accuracy, say) are counted for both passes;
* takes any perturbation off before evaluation and checkpointing (the model's ``state_dict()`` hook does so as
  well), so evaluation, checkpoints and the final model are always at clean weights;
* calls :func:`~mgpo.integrations.peft_variants.adapter_step` (AdaLoRA's rank re-allocation, for ``adapter``
  or a model wrapped with PEFT's ``AdaLoraConfig``) after every optimizer step, before the gradients are
  cleared;
* adds the optimizer's per-step statistics (``perturbation_norm``, ``momentum_norm``, ``gbar_*``, averaged over
  the steps since the last log; ``skipped_steps`` as the running count) to the training logs, so they reach
  TensorBoard, W&B and ``trainer_state.json``;
* with ``clean_loss_probe=<dataset>``, logs ``clean_loss`` beside ``loss``: the mean loss of those examples at
  the clean weights (:func:`mgpo.clean_loss`: eval mode, no grad, inside ``optimizer.unperturbed()``). The
  Trainer's ``loss`` is the loss each training forward saw, which for MGPO, MSAM and the noise methods is the loss
  at the perturbed weights (SAM's is its first, clean pass); ``clean_loss`` is measured alike for every method.
  Both ``clean_loss`` and evaluation losses are the task's loss alone: AdaLoRA's orthogonality penalty, which
  PEFT adds to every loss it computes, is in the logged training ``loss`` (the objective) but not in them.

Resuming (``trainer.train(resume_from_checkpoint=...)``) needs nothing special: the Trainer saves and loads
``optimizer.state_dict()``, which holds the whole method state (keys ``base``, ``own``, ``extra``; ``extra`` names
the method). A checkpoint written by another method (or by plain AdamW) is refused with a ValueError naming both.

The Trainer may wrap the optimizer (accelerate's ``AcceleratedOptimizer``); :func:`unwrap_optimizer` or the
``trainer.perturbation_optimizer`` property give the mgpo optimizer itself (``last_stats``, ``is_perturbed``).
"""

from __future__ import annotations

import contextlib
import inspect
import warnings
import weakref
from collections.abc import Mapping
from typing import Any, cast

import torch
import transformers
from torch import nn
from transformers import TrainerCallback
from transformers.trainer_utils import unwrap_peft_model

from mgpo.factory import _method_class, build_optimizer, create_optimizer, decay_groups, profile_betas
from mgpo.integrations import hf_private
from mgpo.integrations.hf_private import TrainerOverrides
from mgpo.integrations.peft_variants import AdapterConfig, adapter_step
from mgpo.optim import apn as apn_rules
from mgpo.optim._base import NOT_COMPARED, PerturbedOptimizer
from mgpo.optim.configs import DEFAULT_RHO, METHODS, PROFILES, PerturbationConfig
from mgpo.optim.distributed import local_state, sharded_state
from mgpo.optim.mgpo import MGPO
from mgpo.probe import task_loss_only

# The step after which the cap warning reads apn_capped, as the README tells a user to (gbar's EMA settles first)
CAP_READ_STEPS = 50

__all__ = [
    "METHODS",
    "PerturbationConfig",
    "PerturbationTrainer",
    "PerturbationTrainerMixin",
    "build_optimizer",
    "base_optimizer_from_args",
    "perturbed",
    "unwrap_optimizer",
]

# args.optim values whose class we can wrap (others that name a torch.optim.Optimizer class work as well).
WRAPPABLE_OPTIM = ("adamw_torch", "adamw_torch_fused", "adafactor", "sgd", "adagrad", "rmsprop")


def base_optimizer_from_args(
    args: transformers.TrainingArguments, model: nn.Module | None = None
) -> tuple[type[torch.optim.Optimizer], dict]:
    """The base optimizer class and its keywords (``lr``, ``betas``, ...) that ``args.optim`` names, through
    ``Trainer.get_optimizer_cls_and_kwargs``. Refuses optimizers that are not a plain optimizer class over
    param groups (GaLore, LOMO, Muon, layer-wise ones), naming the value and the ones we can wrap."""
    optim = getattr(args.optim, "value", args.optim)
    supported = f"use one of {', '.join(WRAPPABLE_OPTIM)} (or another that names a torch.optim.Optimizer class)"
    try:
        # transformers annotates model as PreTrainedModel; any module does (it reads the modules' names)
        optimizer_cls, kwargs = transformers.Trainer.get_optimizer_cls_and_kwargs(args, model)  # type: ignore[arg-type]
    except (ImportError, ValueError) as err:
        raise ValueError(
            f"args.optim={optim!r} cannot be used: {err} To train with a perturbation method, {supported}."
        ) from None
    special = {"params", "model", "optimizer_dict"} & set(kwargs)
    if not (isinstance(optimizer_cls, type) and issubclass(optimizer_cls, torch.optim.Optimizer)) or special:
        raise ValueError(
            f"args.optim={optim!r} builds its own parameter groups or optimizer, which a perturbation "
            f"method cannot wrap; {supported}."
        )
    return optimizer_cls, dict(kwargs)


def unwrap_optimizer(optimizer: torch.optim.Optimizer | None) -> torch.optim.Optimizer | None:
    """The optimizer inside the Trainer's wrappers (accelerate's ``AcceleratedOptimizer`` keeps it in
    ``.optimizer``): the mgpo optimizer itself, or the plain base optimizer for ``adamw``."""
    while isinstance(inner := getattr(optimizer, "optimizer", None), torch.optim.Optimizer):
        optimizer = inner
    return optimizer


class _StepState:
    """What the trainer keeps between its hooks, shared with :class:`_PerturbationCallback`: SAM's stored
    micro-batches of the accumulation window, and the optimizer's statistics summed since the last log."""

    def __init__(self) -> None:
        self.sam_window: list[tuple[nn.Module, Any, Any]] = []
        self.stats_sum: dict[str, torch.Tensor] = {}
        self.stats_count = 0

    def reset_stats(self) -> None:
        self.stats_sum, self.stats_count = {}, 0

    def add_stats(self, opt: torch.optim.Optimizer | None) -> None:
        """Sums the step's statistics on the device; they are read back only when the Trainer logs."""
        stats = getattr(opt, "stats_tensors", None)
        if not stats:
            return
        for key, value in stats.items():
            self.stats_sum[key] = value.detach().float() + self.stats_sum.get(key, 0.0)
        self.stats_count += 1


class _PerturbationCallback(TrainerCallback):
    """Runs between the optimizer step and the Trainer's ``model.zero_grad()``: statistics, AdaLoRA, SAM's store."""

    def __init__(self, trainer: PerturbationTrainerMixin, steps: _StepState):
        self._trainer = weakref.ref(trainer)
        self.steps = steps

    def on_train_begin(self, args, state, control, **kwargs):
        if self._trainer() is not None:
            self.steps.reset_stats()
            self.steps.sam_window.clear()

    def on_train_end(self, args, state, control, **kwargs):
        """Training is over: take the perturbation off and remove the optimizer's hooks, so that a later train-mode
        forward (a user's own loop, generation with gradients) runs at the clean weights. ``train()`` again
        re-installs them."""
        trainer = self._trainer()
        opt = trainer.perturbation_optimizer if trainer is not None else None
        if isinstance(opt, PerturbedOptimizer):
            opt.close()

    def on_optimizer_step(self, args, state, control, **kwargs):
        trainer = self._trainer()
        if trainer is None:
            return
        self.steps.sam_window.clear()
        if not trainer.accelerator.optimizer_step_was_skipped:  # e.g. an fp16 overflow: no new statistics
            self.steps.add_stats(trainer.perturbation_optimizer)
        # AdaLoRA's allocation (``adapter``, else the model's own PEFT config). Gradients are still there
        # (zero_grad comes later); global_step is the 0-based number of this step, the counter PEFT's own AdaLoRA
        # examples pass.
        adapter_step(trainer.accelerator.unwrap_model(trainer.model), trainer.adapter, state.global_step)


class PerturbationTrainerMixin(TrainerOverrides):
    """Mix into ``transformers.Trainer`` or any subclass (``trl.SFTTrainer``); see the module docstring.

    The method's settings come from the arguments when they are :class:`PerturbationTrainingArguments` (or
    ``PerturbationSFTConfig``): saved with the run in ``training_args.bin``, readable by ``HfArgumentParser``.
    Extra keyword arguments:
        perturbation: the method and its hyper-parameters, for plain ``TrainingArguments`` (default:
            ``PerturbationConfig()``, MGPO). With :class:`PerturbationTrainingArguments` the arguments hold them.
        adapter: the adapter the model was built with (``apply_adapter``): LoRA+ param groups and AdaLoRA's
            per-step rank allocation come from it. None: Hugging Face's decay groups of all trainable tensors
            (PEFT's LoRA+ groups when ``args.loraplus_lr_ratio`` is set), AdaLoRA when the model's PEFT config is.
        base_optimizer: the optimizer class the method wraps. None (default): the one ``args.optim`` names
            (``adamw_torch``: AdamW), with the arguments' betas and eps.
        clean_loss_probe: a fixed set of training examples (a dataset the collator takes, like
            ``train_dataset``). At logged steps the mean loss of these examples at the clean weights is logged as
            ``clean_loss`` in the same row as ``loss``: eval mode, no grad, inside the mgpo optimizer's
            ``unperturbed()`` window, batches of ``per_device_eval_batch_size`` through the Trainer's collator and
            ``compute_loss``, each batch weighted by its examples. None (default): no probe. Every process
            computes the whole probe (it is not sharded over ranks), so under DDP all ranks log the same value;
            under FSDP the ranks' forwards run together, as every rank logs at the same steps.
        clean_loss_every: probe at the logged steps that are a multiple of this (a multiple of
            ``args.logging_steps``); None (default): at every logged step; 0: never.

    An optimizer passed as ``optimizers=(opt, scheduler)``, or ``optimizer_cls_and_kwargs``, is used as given; when
    the method is named as well (``perturbation_*`` arguments or ``perturbation=``), it must be that method with
    those settings, or ``train()`` refuses it (ValueError naming the method or setting).
    The optimizer is built at ``train()``, from ``self.model``: after a trainer such as ``trl.SFTTrainer`` has
    wrapped the model with ``peft_config``.
    """

    def __init__(
        self,
        *args,
        perturbation: PerturbationConfig | None = None,
        adapter: AdapterConfig | None = None,
        base_optimizer: type[torch.optim.Optimizer] | None = None,
        clean_loss_probe: Any = None,
        clean_loss_every: int | None = None,
        **kwargs,
    ):
        training_args: Any = kwargs.get("args", args[1] if len(args) > 1 else None)
        if hasattr(training_args, "perturbation_config"):
            from_args = training_args.perturbation_config()
            if perturbation is not None and perturbation != from_args:
                raise ValueError(
                    f"the perturbation method is given twice and the two disagree: perturbation="
                    f"{perturbation} and the arguments' perturbation_* fields ({from_args}); set it "
                    "in the arguments only."
                )
            perturbation = from_args
        self._perturbation_given = perturbation is not None  # the method was named: a given optimizer must be it
        self.perturbation = perturbation if perturbation is not None else PerturbationConfig()
        self.perturbation.validate()
        if adapter is not None:
            adapter.validate()
        self.adapter = adapter
        self.base_optimizer = base_optimizer
        self._steps = _StepState()
        self._total_steps: int | None = None
        self.clean_loss_probe = clean_loss_probe
        self.clean_loss_every = clean_loss_every
        self._probe_loader: torch.utils.data.DataLoader[Any] | None = None
        # micro-batches whose training loss was NaN/Inf: a device counter, never read during a step
        self.nonfinite_losses = torch.zeros((), dtype=torch.int64)
        super().__init__(*args, **kwargs)
        self._check_clean_loss_every()
        inner = unwrap_peft_model(self.accelerator.unwrap_model(self.model))
        if self.model_accepts_loss_kwargs and not hasattr(inner, "accepts_loss_kwargs") and not _scales_by_items(inner):
            # transformers takes a forward with **kwargs as dividing its loss by num_items_in_batch itself and
            # then skips its own division by gradient_accumulation_steps. Encoder classifiers (BERT and kin) and
            # T5 take **kwargs but return a plain mean, so their gradient came out grad_accum times too large, and
            # with it MGPO's gbar and so the APN radius of every layer below the cap. The Trainer divides instead.
            self.model_accepts_loss_kwargs = False
        self.add_callback(_PerturbationCallback(self, self._steps))

    def _check_clean_loss_every(self) -> None:
        every, args = self.clean_loss_every, self.args
        if every is None:
            return
        if isinstance(every, bool) or not isinstance(every, int) or every < 0:
            raise ValueError(
                f"clean_loss_every={every!r} is invalid: use 0 (off), a positive number of steps, or "
                "None (every logged step)."
            )
        by_steps = getattr(args.logging_strategy, "value", args.logging_strategy) == "steps"
        if every and by_steps and args.logging_steps >= 1 and every % args.logging_steps:
            raise ValueError(
                f"clean_loss_every={every} is invalid: the clean loss is logged in the rows of the "
                f"training loss, so use a multiple of logging_steps={args.logging_steps:g} (e.g. "
                f"{-(-every // args.logging_steps) * int(args.logging_steps)}), 0 or None."
            )

    # ------------------------------------------------------------------------------------------- optimizer
    @property
    def perturbation_optimizer(self) -> torch.optim.Optimizer | None:
        """The optimizer itself (not accelerate's wrapper): ``last_stats``, ``is_perturbed``, ``unperturbed()``."""
        return unwrap_optimizer(self.optimizer)

    def train(self, *args, **kwargs):
        opt = self.perturbation_optimizer
        if isinstance(opt, PerturbedOptimizer) and opt.closed:  # closed at the end of an earlier train()
            opt.reopen()
        return super().train(*args, **kwargs)

    def create_optimizer_and_scheduler(self, num_training_steps: int):
        self._total_steps = num_training_steps
        return super().create_optimizer_and_scheduler(num_training_steps)

    def create_optimizer(self, model=None):
        if self.optimizer is not None or getattr(self, "optimizer_cls_and_kwargs", None) is not None:
            optimizer = super().create_optimizer(model)
            self._check_given_optimizer()
            return optimizer
        opt_model = self.model if model is None else model
        args = self.args
        if self.base_optimizer is None:
            base_cls, base_kwargs = base_optimizer_from_args(args, opt_model)
        else:
            base_cls, base_kwargs = self.base_optimizer, {"lr": args.learning_rate}
            takes = inspect.signature(base_cls).parameters  # Adam-like (NAdam, RAdam, Adamax too): args' betas, eps
            base_kwargs.update(
                {
                    k: v
                    for k, v in (("betas", (args.adam_beta1, args.adam_beta2)), ("eps", args.adam_epsilon))
                    if k in takes
                }
            )
        lr = base_kwargs.pop("lr")
        cfg = self.perturbation.resolved()
        ratio = getattr(args, "loraplus_lr_ratio", None)
        if ratio is None and self.adapter is not None and self.adapter.method == "loraplus":
            ratio = self.adapter.loraplus_lr_ratio
        if ratio is not None:
            base_kwargs = profile_betas(cfg, base_cls, base_kwargs)
            method = cfg.method_config()
            settings = {} if method is None else method.kwargs()
            if cfg.method == "random":
                settings["total_steps"] = self._total_steps
            self.optimizer = create_optimizer(
                opt_model,
                base_cls,
                {"lr": lr, "weight_decay": args.weight_decay, **base_kwargs},
                method=cfg.method,
                loraplus_lr_ratio=ratio,
                **settings,
            )
            return self.optimizer
        groups = decay_groups(opt_model, args.weight_decay, set(self.get_decay_parameter_names(opt_model)))
        total_steps = self._total_steps or (self.state.max_steps if self.state.max_steps > 0 else None)
        self.optimizer = build_optimizer(
            opt_model,
            self.perturbation,
            groups,
            lr=lr,
            weight_decay=args.weight_decay,
            total_steps=total_steps,
            base_optimizer=base_cls,
            **base_kwargs,
        )
        return self.optimizer

    def _check_given_optimizer(self) -> None:
        """An optimizer passed in (``optimizers=``, ``optimizer_cls_and_kwargs``) while the method is named
        (``perturbation_*`` arguments or ``perturbation=``) must be that method with those settings: otherwise the
        run trains with another method (plain AdamW, say) while its saved arguments say the named one."""
        if not self._perturbation_given:
            return
        cfg, opt = self.perturbation.resolved(), self.perturbation_optimizer
        expected = None if cfg.method == "adamw" else _method_class(cfg.method)
        given = type(opt).__name__
        ok = not isinstance(opt, PerturbedOptimizer) if expected is None else isinstance(opt, expected)
        if not ok:
            raise ValueError(
                f"perturbation_method={cfg.method!r} is named (arguments or perturbation=), but the optimizer passed "
                f"to the trainer (optimizers= or optimizer_cls_and_kwargs) is {given}: the run would train as "
                f"{given} while its saved arguments say {cfg.method!r}. Drop optimizers= / optimizer_cls_and_kwargs "
                "to let the trainer build the method's optimizer, or pass one of the named method."
            )
        method = cfg.method_config()  # None for adamw, as expected
        settings = {} if method is None else method.kwargs()
        hparams = getattr(opt, "hparams", {})
        for key in sorted(set(settings) & set(hparams) - NOT_COMPARED):
            if settings[key] != hparams[key]:
                raise ValueError(
                    f"perturbation_{key}={settings[key]!r} is named (arguments or perturbation=), but the optimizer "
                    f"passed to the trainer has {key}={hparams[key]!r}. Give the same value to both, or drop "
                    "optimizers= / optimizer_cls_and_kwargs to let the trainer build it from the arguments."
                )

    # ------------------------------------------------------------------------------------------- SAM, gbar
    def training_step(self, model, inputs, num_items_in_batch=None):
        opt = self.perturbation_optimizer
        if getattr(opt, "two_pass", False):
            # Kept for the second pass at the optimizer step; a shallow copy, since compute_loss may pop keys.
            self._steps.sam_window.append(
                (model, dict(inputs) if isinstance(inputs, Mapping) else inputs, num_items_in_batch)
            )
            opt.closure = self._second_pass
        loss = super().training_step(model, inputs, num_items_in_batch)
        if self.nonfinite_losses.device != loss.device:
            self.nonfinite_losses = self.nonfinite_losses.to(loss.device)
        self.nonfinite_losses += (~torch.isfinite(loss.detach())).to(torch.int64)
        if getattr(opt, "hparams", {}).get("gbar_update") == "micro_batch":  # the authors' schedule
            opt.record_gradients(self._grad_unscale())
        return loss

    def _gradients_before_clipping(self) -> None:
        """Called just before the Trainer clips (hf_private.TrainerOverrides): MGPO's gbar is taken from the
        gradients before clipping, as in the authors' code (their EMA is updated in ``training_step``); the base
        update then uses the clipped ones."""
        opt = self.perturbation_optimizer
        if isinstance(opt, MGPO) and opt.hparams.get("gbar_update") == "step":  # gbar is MGPO's alone
            opt.record_gradients(self._grad_unscale())

    def _grad_unscale(self) -> float:
        """1 / loss scale while fp16's GradScaler still holds scaled gradients (read once per call), else 1."""
        scaler = getattr(self.accelerator, "scaler", None)
        return 1.0 / float(scaler.get_scale()) if scaler is not None and scaler.is_enabled() else 1.0

    def _second_pass(self) -> torch.Tensor:
        """SAM's closure: forward/backward over the stored micro-batches (weights now at W + eps)."""
        window, self._steps.sam_window = self._steps.sam_window, []
        if not window:
            raise RuntimeError(
                "SAM's second pass found no stored micro-batches: the optimizer was stepped outside "
                "PerturbationTrainer.training_step. Train through trainer.train()."
            )
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
            hf_private.clip_grad_norm(self, model)
        assert loss is not None  # the window is not empty
        return loss

    # ------------------------------------------------------------------------------------------- FSDP checkpoints
    def _fsdp_optimizer_file(self, folder: str) -> str:
        return f"{folder}/mgpo_optimizer_rank{self.args.process_index}-of-{self.args.world_size}.pt"

    def _ours_under_fsdp(self) -> bool:
        return getattr(self, "is_fsdp_enabled", False) and isinstance(self.perturbation_optimizer, PerturbedOptimizer)

    def _save_method_state(self, output_dir: str) -> bool:
        """Under FSDP each rank saves its shard of the method's state (torch's FSDP optimizer checkpointing
        expects a plain optimizer's state-dict layout): True. Otherwise False, and the Trainer saves as usual."""
        if not self._ours_under_fsdp():
            return False
        from accelerate.utils import save_fsdp_model

        save_fsdp_model(
            self.accelerator.state.fsdp_plugin,
            self.accelerator,
            self.model,
            output_dir,
            **hf_private.fsdp_checkpoint_kwargs(),
        )
        opt, scheduler = self.perturbation_optimizer, self.lr_scheduler
        assert isinstance(opt, PerturbedOptimizer) and scheduler is not None  # ours, and training has begun
        torch.save(local_state(opt.state_dict()), self._fsdp_optimizer_file(output_dir))
        if self.args.should_save:
            torch.save(scheduler.state_dict(), f"{output_dir}/{hf_private.scheduler_file_name()}")
        return True

    def _load_method_state(self, checkpoint: str | None) -> bool:
        """Under FSDP each rank loads its own shard (saved by :meth:`_save_method_state`): True. Otherwise
        False, and the Trainer loads as usual."""
        if checkpoint is None or not self._ours_under_fsdp():
            return False
        from pathlib import Path

        mine = Path(self._fsdp_optimizer_file(checkpoint))
        if not mine.is_file():
            found = sorted(p.name for p in Path(checkpoint).glob("mgpo_optimizer_rank*.pt"))
            raise ValueError(
                f"--resume under FSDP: {checkpoint} has no optimizer shard for rank {self.args.process_index} of "
                f"{self.args.world_size} ({', '.join(found) or 'none'} found). Resume an FSDP run with the number "
                "of processes it was saved with."
            )
        opt, scheduler = self.perturbation_optimizer, self.lr_scheduler
        assert isinstance(opt, PerturbedOptimizer) and scheduler is not None  # ours, and training has begun
        opt.load_state_dict(sharded_state(torch.load(mine, map_location=self.args.device, weights_only=False), opt))
        scheduler.load_state_dict(torch.load(f"{checkpoint}/{hf_private.scheduler_file_name()}", weights_only=True))
        return True

    def _refuse_other_method(self, checkpoint: str) -> None:
        """The checkpoint's optimizer state was saved by a perturbation method and this run's optimizer is a plain
        one: a ValueError naming both (torch's own error is a bare KeyError)."""
        from pathlib import Path

        path = Path(checkpoint) / hf_private.optimizer_file_name()
        saved = torch.load(path, map_location="cpu", weights_only=False) if path.is_file() else None
        if not (isinstance(saved, dict) and {"base", "own", "extra"} <= set(saved)):
            return
        by = saved["extra"].get("method") or "a perturbation method"
        method = getattr(self.perturbation.resolved(), "method", "adamw") if self._perturbation_given else None
        mine = type(self.perturbation_optimizer).__name__ + (f" (perturbation method {method!r})" if method else "")
        raise ValueError(
            f"resume_from_checkpoint={checkpoint!r}: its optimizer state was saved by {by}, but this run trains "
            f"with a plain {mine}. A resume never changes the method: resume with the method that wrote the "
            "checkpoint (perturbation_method=...), or start a new run without resume_from_checkpoint."
        ) from None

    # ------------------------------------------------------------------------------------------- clean weights
    def _take_off_perturbation(self) -> None:
        opt = self.perturbation_optimizer
        if isinstance(opt, PerturbedOptimizer):
            opt.restore()

    def evaluate(self, *args, **kwargs):
        self._take_off_perturbation()
        return super().evaluate(*args, **kwargs)

    def prediction_step(self, *args, **kwargs):
        with task_loss_only(self.model):  # the task loss alone, for AdaLoRA too (mgpo.probe.task_loss_only)
            return super().prediction_step(*args, **kwargs)

    def save_model(self, *args, **kwargs):
        self._take_off_perturbation()
        return super().save_model(*args, **kwargs)

    # ------------------------------------------------------------------------------------------- logging
    # ------------------------------------------------------------------------------------------- clean loss
    def clean_loss(self) -> float:
        """The mean loss of ``clean_loss_probe`` at the clean weights now (see the class docstring)."""
        import datasets

        from mgpo.probe import clean_loss

        if self.clean_loss_probe is None:
            raise ValueError(
                "clean_loss() needs a probe: pass clean_loss_probe=<a dataset of training examples> to the trainer."
            )
        if self._probe_loader is None:  # the probe's batches, kept for the run; no sampler shards them over ranks
            probe, collator = self.clean_loss_probe, self.data_collator
            if isinstance(probe, datasets.Dataset):
                probe = hf_private.remove_unused_columns(self, probe, "clean-loss probe")
            else:
                collator = hf_private.collator_with_removed_columns(self, collator, "clean-loss probe")
            self._probe_loader = torch.utils.data.DataLoader(
                probe, batch_size=self.args.per_device_eval_batch_size, collate_fn=collator, shuffle=False
            )
        assert self.model is not None  # the Trainer has built it
        return clean_loss(self.model, self._probe_loader, optimizer=self.optimizer, loss_fn=self._probe_batch_loss)

    def _probe_batch_loss(self, model, batch) -> torch.Tensor:
        inputs = hf_private.prepare_inputs(self, dict(batch))
        with self.compute_loss_context_manager():  # autocast as in training (bf16 / fp16)
            # the model's own mean over the batch (no num_items_in_batch); a tensor, as return_outputs=False
            return cast(torch.Tensor, self.compute_loss(model, inputs))

    def _clean_loss_due(self) -> bool:
        every = self.clean_loss_every
        if self.clean_loss_probe is None or every == 0:
            return False
        return every is None or self.state.global_step % every == 0

    def log(self, logs: dict[str, float], *args, **kwargs) -> None:
        if "loss" in logs and self._clean_loss_due():
            logs["clean_loss"] = self.clean_loss()
        steps = self._steps
        if "loss" in logs and steps.stats_count:
            keys = list(steps.stats_sum)
            values = torch.stack([steps.stats_sum[k] for k in keys]).tolist()  # one transfer per log
            logs.update({k: v / steps.stats_count for k, v in zip(keys, values)})
            opt = self.perturbation_optimizer
            if isinstance(opt, PerturbedOptimizer):
                logs["skipped_steps"] = float(opt.skipped_steps)
            steps.reset_stats()
            self._warn_if_capped(logs)
        return super().log(logs, *args, **kwargs)

    def _warn_if_capped(self, logs: dict[str, float]) -> None:
        """Once per run, on the main process: most layers' APN factor at its cap means every one of them is
        perturbed at max_scale x rho whatever its gradient, a setting in which training can stall (docs/method.md).
        Read as the README says: after the first CAP_READ_STEPS steps (a shorter run is told it is early)."""
        if logs.get("apn_capped", 0.0) < 0.5 or getattr(self, "_warned_capped", False):
            return
        opt = self.perturbation_optimizer
        assert isinstance(opt, PerturbedOptimizer)  # apn_capped is MGPO's statistic
        hp, step = opt.hparams, self.state.global_step
        if not hp.get("rho") or not apn_rules.caps(hp.get("apn"), hp.get("max_scale")):
            return  # rho = 0 perturbs nothing; a rule without a cap has no apn_capped to read
        if step < CAP_READ_STEPS and step < self.state.max_steps:
            return  # the share at the first logs says little: gbar's EMA is young
        self._warned_capped = True
        if not self.is_world_process_zero():
            return  # one warning per run, not one per rank
        early = (
            f" (early: after {step} of the ~{CAP_READ_STEPS} steps the README reads it after)"
            if step < CAP_READ_STEPS
            else ""
        )
        paper = PROFILES.get(self.perturbation.profile or "", {}).get("rho", DEFAULT_RHO)  # none: the default
        if hp["rho"] > paper / 10 * (1 + 1e-9):
            advice = (
                f"The README's rule: divide rho by ten (rho={hp['rho'] / 10:.3g}) and read apn_capped again; "
                "`mgpo tune` searches it on your validation data"
            )
        else:
            advice = (
                f"rho={hp['rho']:g} is already a tenth of the profile's {paper:g} or less, so the README's rule "
                "(divide once) is done: on small models the cap stays (docs/results.md: level with LoRA there). "
                "If the loss stalls, `mgpo tune` searches rho on your validation data"
            )
        warnings.warn(
            f"MGPO: at step {step}{early}, {logs['apn_capped']:.0%} of the layers are at the APN cap: "
            f"{apn_rules.cap_meaning(hp.get('apn'))} = {hp['max_scale'] * hp['rho']:.3g}. {advice}; docs/method.md, "
            "'the radius a layer gets'.",
            RuntimeWarning,
            stacklevel=2,
        )


def _scales_by_items(model: nn.Module) -> bool:
    """Whether the forward of ``model`` can divide its loss by ``num_items_in_batch``: its code calls
    ``self.loss_function`` (transformers' losses take the count) or reads the count itself. A heuristic on the
    code (no way to ask a model); True when the code cannot be read, leaving transformers' own choice in place."""
    try:
        source = inspect.getsource(type(model).forward)
    except (OSError, TypeError):
        return True
    return "loss_function" in source or "num_items_in_batch" in source


class PerturbationTrainer(PerturbationTrainerMixin, transformers.Trainer):
    """``transformers.Trainer`` training with a perturbation method (see :class:`PerturbationTrainerMixin`)."""


def perturbed(trainer_cls: type) -> type:
    """``trainer_cls`` with :class:`PerturbationTrainerMixin` mixed in, e.g. ``perturbed(trl.SFTTrainer)``."""
    if not (isinstance(trainer_cls, type) and issubclass(trainer_cls, transformers.Trainer)):
        raise TypeError(
            f"perturbed() needs a transformers.Trainer subclass (e.g. trl.SFTTrainer), got {trainer_cls!r}."
        )
    if issubclass(trainer_cls, PerturbationTrainerMixin):
        return trainer_cls
    return type(
        f"Perturbed{trainer_cls.__name__}",
        (PerturbationTrainerMixin, trainer_cls),
        {"__module__": __name__, "__doc__": f"{trainer_cls.__name__} with a perturbation method."},
    )
