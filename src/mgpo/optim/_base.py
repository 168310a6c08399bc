"""What every perturbation method shares: wrapping a base optimizer, and keeping weights clean outside the window.

A method subclasses :class:`PerturbedOptimizer` and fills in three hooks:

* ``_apply()``   put the pending perturbation on (weights or forward hooks);
* ``_remove()``  take it off again, leaving clean weights;
* ``_update()``  the method's ``step()`` body, run on clean weights with finite gradients (their norms given).

The base class owns the state machine. A perturbation is *pending* after ``step()`` and *applied* from the
first training-mode forward (or an explicit ``perturb()``) until ``step()``, an eval-mode forward, the model's
``state_dict()`` or an ``unperturbed()`` block takes it off again. Gradient-accumulation micro-batches therefore
all see the same perturbation, and evaluation, checkpoints and the end of training only ever see clean weights.
"""

from __future__ import annotations

import contextlib
import math
import warnings
import weakref
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn

from mgpo.optim.layers import discover_layers

# Base optimizers whose first moment MGPO can reuse, by the name of the state entry holding it.
_ADAM_MOMENT = "exp_avg"  # Adam, AdamW, NAdam, RAdam, Adamax
_SGD_MOMENT = "momentum_buffer"  # SGD / RMSprop with momentum > 0


def check_range(name: str, value: Any, low: float, high: float, *, low_open=False, high_open=True) -> None:
    """Raise ``ValueError`` naming the hyper-parameter, its value and the allowed interval."""
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if ok:
        ok = (value > low if low_open else value >= low) and (value < high if high_open else value <= high)
    if not ok:
        interval = f"{'(' if low_open else '['}{low}, {high}{')' if high_open else ']'}"
        raise ValueError(f"{name}={value!r} is invalid: {name} must be a finite number in {interval}.")


def _split_model(params: Any, model: nn.Module | None) -> tuple[Any, nn.Module | None]:
    if isinstance(params, nn.Module):
        if model is not None and model is not params:
            raise ValueError("Pass the model either as the first argument or as model=..., not two different ones.")
        return [p for p in params.parameters() if p.requires_grad], params
    return params, model


class PerturbedOptimizer(torch.optim.Optimizer):
    """Base class; see the module docstring. Not used directly."""

    two_pass = False  # SAM overrides: needs step(closure)

    def __init__(
        self,
        params: Iterable[torch.Tensor] | Iterable[dict] | nn.Module,
        base_optimizer: type[torch.optim.Optimizer],
        hparams: dict,
        *,
        model: nn.Module | None = None,
        auto_perturb: bool = True,
        base_kwargs: dict | None = None,
        **more_base_kwargs,
    ):
        if not (isinstance(base_optimizer, type) and issubclass(base_optimizer, torch.optim.Optimizer)):
            raise TypeError(
                f"base_optimizer={base_optimizer!r} is not a torch.optim.Optimizer class; pass the class itself, "
                "e.g. base_optimizer=torch.optim.AdamW, and its arguments (lr=...) as keywords."
            )
        clash = set(base_kwargs or {}) & set(more_base_kwargs)
        if clash:
            raise ValueError(f"{sorted(clash)} given both as keywords and in base_kwargs; give each once.")
        base_kwargs = {**(base_kwargs or {}), **more_base_kwargs}
        params, model = _split_model(params, model)
        super().__init__(params, {})
        # Share param_groups with the base optimizer (as davda54/sam does), so schedulers act on both. The
        # method's own hyper-parameters live in self.hparams, not in the groups, where names like "eps",
        # "momentum" or "rho" would collide with the base optimizer's (Adam's eps, SGD's momentum, Adadelta's rho).
        self.base_optimizer = base_optimizer(self.param_groups, **base_kwargs)
        self.param_groups = self.base_optimizer.param_groups
        self.defaults = self.base_optimizer.defaults
        self.hparams = hparams
        self.model = model
        self.layers = discover_layers(self.param_groups, model)
        self._applied = False
        self._held = False
        self.skipped_steps = 0
        self.last_stats: dict[str, float] = {}
        self._hooks: list = []
        if auto_perturb and not self.two_pass:
            self._install_hooks(model)

    # ----------------------------------------------------------------------------------------- the window
    @torch.no_grad()
    def perturb(self) -> None:
        """Apply the pending perturbation now. A no-op if it is already applied (or there is none yet)."""
        if not self._applied:
            self._apply()
            self._applied = True

    @torch.no_grad()
    def restore(self) -> None:
        """Take the perturbation off, leaving clean weights. A no-op if none is applied."""
        if self._applied:
            self._remove()
            self._applied = False

    @contextlib.contextmanager
    def unperturbed(self):
        """``with opt.unperturbed():`` clean weights inside the block; the perturbation comes back after it."""
        was_applied, was_held = self._applied, self._held
        self.restore()
        self._held = True  # forwards inside the block do not re-apply it
        try:
            yield
        finally:
            self._held = was_held
            if was_applied:
                self.perturb()

    @property
    def is_perturbed(self) -> bool:
        return self._applied

    def _on_forward(self, module: nn.Module) -> None:
        if self._held:
            return
        if module.training and torch.is_grad_enabled():
            self.perturb()
        elif not module.training:
            self.restore()

    def _install_hooks(self, model: nn.Module | None) -> None:
        ref = weakref.ref(self)

        def restore_hook(*_):
            opt = ref()
            if opt is not None:
                opt.restore()

        if model is not None:

            def forward_hook(module, _args):
                opt = ref()
                if opt is not None:
                    opt._on_forward(module)

            self._hooks.append(model.register_forward_pre_hook(forward_hook))
            self._hooks.append(model.register_state_dict_pre_hook(restore_hook))
            return
        # Only tensors were given: watch every module's forward, and act on the first one owning our tensors.
        # The ownership check runs once per module and is cached by identity.
        ours = {id(p) for g in self.param_groups for p in g["params"]}
        owners: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()

        def global_hook(module, _args):
            opt = ref()
            if opt is None or not (opt._applied or module.training):
                return
            owns = owners.get(module)
            if owns is None:
                owns = owners[module] = any(id(p) in ours for p in module.parameters())
            if owns:
                opt._on_forward(module)

        self._hooks.append(nn.modules.module.register_module_forward_pre_hook(global_hook))

    def __del__(self):
        for handle in getattr(self, "_hooks", []):
            handle.remove()

    # ----------------------------------------------------------------------------------------- the step
    def _params_with_grad(self) -> list[torch.Tensor]:
        return [p for g in self.param_groups for p in g["params"] if p.grad is not None]

    def _check_grads(self, params: list[torch.Tensor]) -> torch.Tensor | None:
        """Per-tensor gradient norms (float32, one vector), or None when any gradient is NaN/Inf (the step
        is then skipped, counted, and warned about once)."""
        if not params:
            return torch.zeros(0)
        norms = torch.stack(torch._foreach_norm([p.grad for p in params])).float()
        if bool(torch.isfinite(norms).all()):
            return norms
        self.skipped_steps += 1
        if self.skipped_steps == 1:
            warnings.warn(
                f"{type(self).__name__}: non-finite gradient (NaN/Inf); this step is skipped and the weights are "
                "left unchanged. Further skips are counted in opt.skipped_steps without another warning.",
                RuntimeWarning,
                stacklevel=3,
            )
        return None

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None):
        """Restore clean weights, update them with the gradients, and prepare the next perturbation."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self.restore()  # eq. (7) / method-spec step 1: the base step always sees clean weights
        params = self._params_with_grad()
        if not params:  # nothing has a gradient: like the base optimizer, do nothing
            return loss
        grad_norms = self._check_grads(params)
        if grad_norms is not None:
            self._update(params, grad_norms)
        self.last_stats["skipped_steps"] = float(self.skipped_steps)
        return loss

    def _apply(self) -> None:
        raise NotImplementedError

    def _remove(self) -> None:
        raise NotImplementedError

    def _update(self, params: list[torch.Tensor], grad_norms: torch.Tensor) -> None:
        raise NotImplementedError

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.base_optimizer.zero_grad(set_to_none)

    def add_param_group(self, param_group: dict) -> None:
        if not hasattr(self, "base_optimizer"):  # called by Optimizer.__init__
            return super().add_param_group(param_group)
        self.base_optimizer.add_param_group(param_group)
        self.layers = discover_layers(self.param_groups, self.model)

    # ----------------------------------------------------------------------------------------- checkpoints
    def _extra_state(self) -> dict:
        """Method-specific scalars/tensors not kept per parameter in ``self.state`` (override to add)."""
        return {"skipped_steps": self.skipped_steps}

    def _load_extra_state(self, extra: dict) -> None:
        self.skipped_steps = extra["skipped_steps"]

    def state_dict(self) -> dict:
        return {
            "base": self.base_optimizer.state_dict(),
            "own": super().state_dict(),
            "extra": self._extra_state(),
        }

    def load_state_dict(self, state_dict: dict) -> None:
        if not {"base", "own", "extra"} <= set(state_dict):
            raise ValueError(
                f"{type(self).__name__}.load_state_dict got a state dict with keys {sorted(state_dict)}; expected "
                "one saved by the same mgpo optimizer (keys 'base', 'own', 'extra'). To load a plain "
                f"{type(self.base_optimizer).__name__} state, use opt.base_optimizer.load_state_dict(...)."
            )
        self.restore()
        super().load_state_dict(state_dict["own"])
        self.base_optimizer.load_state_dict(state_dict["base"])
        self.param_groups = self.base_optimizer.param_groups  # both loads made new group dicts: share again
        self._load_extra_state(state_dict["extra"])

    def __repr__(self) -> str:
        return f"{type(self).__name__}(base={type(self.base_optimizer).__name__}, layers={len(self.layers)})"


def moment_key(base: torch.optim.Optimizer) -> str:
    """The state entry of ``base`` that holds its momentum, or a TypeError naming the fix."""
    if "betas" in base.defaults:
        return _ADAM_MOMENT
    if all(g.get("momentum", 0) > 0 for g in base.param_groups):
        return _SGD_MOMENT
    raise TypeError(
        f"momentum='optimizer' reuses the base optimizer's momentum, but {type(base).__name__} with these "
        "settings keeps none. Fix: use an optimizer with momentum (AdamW, Adam, or SGD with momentum>0), or "
        "pass momentum=0.9 so MGPO keeps its own momentum buffer (paper eq. 5)."
    )
