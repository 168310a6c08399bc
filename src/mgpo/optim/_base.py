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
import difflib
import inspect
import warnings
import weakref
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any, Protocol, TypeAlias

import torch
from torch import nn

from mgpo.checks import check_range as check_range  # re-exported: the optimizers import it from here
from mgpo.optim.distributed import Exchange, is_sharded, local, local_grad
from mgpo.optim.guards import NOT_COMPARED as NOT_COMPARED  # re-exported: older imports
from mgpo.optim.guards import check_same_method, refuse_unsupported
from mgpo.optim.guards import moment_key as moment_key  # re-exported
from mgpo.optim.hooks import Handle, HookState, install_model_hooks
from mgpo.optim.hooks import Installed as Installed  # re-exported: older imports
from mgpo.optim.hooks import InstanceOverride as InstanceOverride  # re-exported
from mgpo.optim.hooks import guard_merges as guard_merges  # re-exported
from mgpo.optim.hooks import run_eagerly as run_eagerly  # re-exported
from mgpo.optim.layers import discover_layers
from mgpo.optim.torch_private import version

# What an optimizer is built on: the model, or its tensors or param groups (with ``model=``)
Params: TypeAlias = Iterable[torch.Tensor] | Iterable[dict[str, Any]] | nn.Module
# A gradient as the hook guard saw it: a weak reference and its version counter
GradMark: TypeAlias = tuple["weakref.ref[torch.Tensor]", int]


class _Event(Protocol):
    """A recorded CUDA event (``torch.cuda.Event``): has the device reached it?"""

    def query(self) -> bool: ...


def _grad(p: torch.Tensor) -> torch.Tensor:
    """``p.grad`` of a tensor that has a gradient (``_params_with_grad()``)."""
    assert p.grad is not None
    return p.grad


def _split_model(
    params: Params, model: nn.Module | None
) -> tuple[Iterable[torch.Tensor] | Iterable[dict[str, Any]], nn.Module | None]:
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
        params: Params,
        base_optimizer: type[torch.optim.Optimizer],
        hparams: dict[str, Any],
        *,
        model: nn.Module | None = None,
        auto_perturb: bool = True,
        base_kwargs: dict[str, Any] | None = None,
        **more_base_kwargs: Any,
    ) -> None:
        if not (isinstance(base_optimizer, type) and issubclass(base_optimizer, torch.optim.Optimizer)):
            raise TypeError(
                f"base_optimizer={base_optimizer!r} is not a torch.optim.Optimizer class; pass the class itself, "
                "e.g. base_optimizer=torch.optim.AdamW, and its arguments (lr=...) as keywords."
            )
        clash = set(base_kwargs or {}) & set(more_base_kwargs)
        if clash:
            raise ValueError(f"{sorted(clash)} given both as keywords and in base_kwargs; give each once.")
        base_kwargs = {**(base_kwargs or {}), **more_base_kwargs}
        self._check_base_kwargs(base_optimizer, base_kwargs)
        groups, model = _split_model(params, model)
        if auto_perturb and not self.two_pass and model is None:
            name = type(self).__name__
            raise TypeError(
                f"{name} puts its perturbation on inside the model's forward, so it needs the model: pass it as "
                f"the first argument ({name}(model, lr=...)) or as model=model next to param groups. Without a "
                "model, pass auto_perturb=False and call opt.perturb() yourself before each training forward."
            )
        self._hooks: list[Handle] = []
        self._closed = False
        self._shared = HookState()
        super().__init__(groups, {})
        refuse_unsupported(self.param_groups, model)
        # Share param_groups with the base optimizer (as davda54/sam does), so schedulers act on both. The
        # method's own hyper-parameters live in self.hparams, not in the groups, where names like "eps",
        # "momentum" or "rho" would collide with the base optimizer's (Adam's eps, SGD's momentum, Adadelta's rho).
        self.base_optimizer = base_optimizer(self.param_groups, **base_kwargs)
        self.param_groups = self.base_optimizer.param_groups
        self.defaults = self.base_optimizer.defaults
        self.hparams = hparams
        self.model = model
        self.layers = discover_layers(self.param_groups, model)
        self.exchange = Exchange([p for g in self.param_groups for p in g["params"]])  # inert unless FSDP-sharded
        self._held = False
        self._skipped: torch.Tensor | None = None  # device counter of skipped (non-finite) steps
        # (host copy of the counter, CUDA event or None), read a step later
        self._skip_seen: tuple[torch.Tensor, _Event | None] | None = None
        self._warned = False
        self._stats: dict[str, torch.Tensor] = {}  # device scalars of the last step; floats on request
        # Host-side flags of the hook guard (_check_hooks_ran), reset at every step(): did a training forward reach
        # the model's pre-hook, was the window opened, did a layer's hook (weight-space term, noise) run?
        self._auto = auto_perturb and not self.two_pass
        self._saw_forward = self._opened = self._window_was_open = False
        self._grad_marks = self._mark_grads(self._params_with_grad())  # gradients already there are not this step's
        if self._auto:
            assert model is not None  # refused above
            self._hooks += install_model_hooks(self, model)

    @classmethod
    def settings(cls) -> list[str]:
        """The keywords the method itself takes; every other keyword goes to the base optimizer."""
        return [
            name
            for name, p in inspect.signature(cls.__init__).parameters.items()
            if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY) and name not in ("self", "params", "base_optimizer")
        ]

    def _check_base_kwargs(self, base_optimizer: type[torch.optim.Optimizer], base_kwargs: dict[str, Any]) -> None:
        """A keyword neither the method nor the base optimizer takes (a misspelt or another method's setting) is
        refused here, naming the method and both lists, rather than as the base optimizer's bare TypeError."""
        try:
            taken = inspect.signature(base_optimizer).parameters
        except (TypeError, ValueError):  # no signature to read: the base optimizer itself will say
            return
        if any(p.kind is p.VAR_KEYWORD for p in taken.values()):
            return
        base = [name for name in taken if name != "params"]
        unknown = [name for name in base_kwargs if name not in base]
        if not unknown:
            return
        name, own = unknown[0], self.settings()
        close = difflib.get_close_matches(name, own + base, n=1)
        raise TypeError(
            f"{type(self).__name__} got an unexpected keyword argument {name!r}"
            + (f" (did you mean {close[0]!r}?)" if close else "")
            + f". {type(self).__name__}'s settings: {', '.join(own)}; every other keyword goes to the base optimizer "
            f"{base_optimizer.__name__}, which takes: {', '.join(base)}."
        )

    # ----------------------------------------------------------------------------------------- the window
    @run_eagerly
    @torch.no_grad()
    def perturb(self) -> None:
        """Apply the pending perturbation now. A no-op if it is already applied (or there is none yet)."""
        if self._closed:
            raise RuntimeError(f"this {type(self).__name__} was closed; build a new one to perturb again.")
        self._opened = True
        if not self._applied:
            self._apply()
            self._applied = True

    @run_eagerly
    @torch.no_grad()
    def restore(self) -> None:
        """Take the perturbation off, leaving clean weights. A no-op if none is applied."""
        if self._applied:
            self._remove()
            self._applied = False

    @contextlib.contextmanager
    def unperturbed(self) -> Iterator[None]:
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

    @property
    def _applied(self) -> bool:  # kept in the hooks' state: the layers' hooks read it
        return self._shared.applied

    @_applied.setter
    def _applied(self, value: bool) -> None:
        self._shared.applied = value

    def _on_forward(self, module: nn.Module) -> None:
        if module.training and torch.is_grad_enabled():
            self._saw_forward = True  # a training forward reached the hook (also inside unperturbed())
        if self._held:
            return
        if module.training and torch.is_grad_enabled():  # eq. (3): the loss is taken at W + eps
            self.perturb()
        elif not module.training:
            self.restore()

    def close(self) -> None:
        """Take the perturbation off and remove every hook this optimizer installed. Idempotent; garbage
        collection does the same. The base optimizer stays usable (``opt.base_optimizer``); ``reopen()`` puts the
        hooks back to train on. Call it when training is over (the trainer integrations do): until then a
        train-mode forward with gradients still runs at the perturbed weights."""
        if self._closed:
            return
        self.restore()
        for handle in self._hooks:
            handle.remove()
        self._hooks.clear()
        self._closed = True

    def reopen(self) -> None:
        """Undo ``close()``: install the hooks again, to go on training with the same state. A no-op if open."""
        if not self._closed:
            return
        self._closed = False
        if self._auto and not self.two_pass:
            assert self.model is not None  # _auto: built with the model
            self._hooks += install_model_hooks(self, self.model)
        self._install_method_hooks()

    @property
    def closed(self) -> bool:
        return self._closed

    def _install_method_hooks(self) -> None:
        """A method's own hooks (MGPO's weight-space term, the noise methods' forwards), for ``reopen()``."""

    def _guard_merges(self, moved: set[int]) -> list[InstanceOverride]:
        """PEFT's ``merge()`` restores first on every layer owning a tensor in ``moved``
        (:func:`hooks.guard_merges`)."""
        return guard_merges(self, self.model, moved)

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:  # interpreter shutdown: modules may already be gone
            pass

    # ----------------------------------------------------------------------------------------- the step
    def _params_with_grad(self) -> list[torch.Tensor]:
        return [p for g in self.param_groups for p in g["params"] if p.grad is not None]

    def _check_layout(self, params: list[torch.Tensor]) -> None:
        """The tensors are laid out as at construction: an optimizer built before ``fully_shard`` (or before
        ``accelerator.prepare`` swapped its parameters for FSDP's) would compute per-rank norms silently."""
        if any(is_sharded(p) for p in params) != self.exchange.sharded:
            raise RuntimeError(
                f"{type(self).__name__}: the parameters were sharded by FSDP after this optimizer was built, so "
                "its layers and norms refer to the unsharded tensors. Build the optimizer after fully_shard(model) "
                "(or after accelerator.prepare(model)), from the sharded model."
            )

    @staticmethod
    def _norm_dtype(params: list[torch.Tensor]) -> torch.dtype:
        return torch.float64 if any(p.dtype == torch.float64 for p in params) else torch.float32

    def _sum_over_ranks(self, parts: torch.Tensor) -> torch.Tensor:
        """Under FSDP: ``parts`` (per-rank partial sums) summed over the ranks. One all-reduce here; a method that
        gathers anyway at this point lets them ride along (MGPO)."""
        return self.exchange.all_reduce(parts)

    def _tensor_grad_norms(self, params: list[torch.Tensor]) -> torch.Tensor:
        """Per-tensor gradient norms, float32 at least, as one device vector; whole-tensor norms under FSDP."""
        norms = torch.stack(torch._foreach_norm([local_grad(p) for p in params], dtype=self._norm_dtype(params)))
        if self.exchange.sharded:  # sums of squares add up over the ranks; NaN/Inf on any rank reaches all
            norms = self._sum_over_ranks(norms.square()).sqrt()
        return norms

    def _grad_norms(self, params: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-tensor gradient norms (float32 at least, one vector) and ``ok``: a device bool, False when any
        gradient is NaN/Inf. Nothing is read back to the host. Under FSDP the squared norms of the local shards
        are summed over the ranks (``_sum_over_ranks``), so every rank takes the same decision."""
        norms = self._tensor_grad_norms(params)
        ok = torch.isfinite(norms).all()
        bad = (~ok).to(torch.int64)
        self._skipped = bad if self._skipped is None else self._skipped + bad
        if not self._warned:  # copy the counter to the host without waiting; read it at the next step
            if self._skipped.is_cuda:
                host = torch.empty((), dtype=torch.int64, pin_memory=True).copy_(self._skipped, non_blocking=True)
                event = torch.cuda.Event()  # type: ignore[no-untyped-call]  # torch leaves it unannotated
                event.record()
                self._skip_seen = (host, event)
            else:
                self._skip_seen = (self._skipped, None)
        return norms, ok

    def _warn_no_gradient(self, what: str = "no tensor it trains") -> None:
        """Once: a step found nothing to perturb/update, which is almost always a set-up mistake."""
        if getattr(self, "_warned_no_grad", False):
            return
        self._warned_no_grad = True
        foreign = 0
        if self.model is not None:
            mine = {id(p) for g in self.param_groups for p in g["params"]}
            foreign = sum(1 for p in self.model.parameters() if p.grad is not None and id(p) not in mine)
        seen = f" while {foreign} tensor(s) of the model that it does not hold did" if foreign else ""
        warnings.warn(
            f"{type(self).__name__}.step(): {what} received a gradient{seen}, so this step perturbed nothing. Likely "
            "cause: the adapter was switched (model.set_adapter(...)) or other tensors were made trainable after "
            "the optimizer was built; build the optimizer after choosing what to train. Warned once.",
            RuntimeWarning,
            stacklevel=3,
        )

    def _poll_skips(self) -> None:
        """Warn once about skipped steps, from a host copy made a step earlier (never waits for the device)."""
        if self._warned or self._skip_seen is None:
            return
        host, event = self._skip_seen
        if event is not None and not event.query():
            return
        if host.numpy() > 0:  # a host tensor: no device synchronisation
            self._warned = True
            warnings.warn(
                f"{type(self).__name__}: non-finite gradient (NaN/Inf); that step was skipped and the weights left "
                "unchanged. Further skips are counted in opt.skipped_steps without another warning.",
                RuntimeWarning,
                stacklevel=4,
            )

    @property
    def skipped_steps(self) -> int:
        """Steps skipped for non-finite gradients (reading it waits for the device)."""
        return 0 if self._skipped is None else int(self._skipped)

    @property
    def last_stats(self) -> dict[str, float]:
        """The last step's statistics as floats. Computed on the device during the step; converting them here
        (one transfer for all) is the only host synchronisation, and happens only when you ask."""
        stats = (
            dict(zip(self._stats, torch.stack([v.float() for v in self._stats.values()]).tolist()))
            if self._stats
            else {}
        )
        stats["skipped_steps"] = float(self.skipped_steps)
        return stats

    @property
    def stats_tensors(self) -> dict[str, torch.Tensor]:
        """The last step's statistics as device scalars (for loggers that average without syncing)."""
        return dict(self._stats)

    @staticmethod
    def _decide_on_host(ok: torch.Tensor) -> bool:
        """Whether the skip decision may read ``ok`` on the host: only for CPU tensors, where there is no
        asynchronous device to stall. Accelerators take the device-side path below."""
        return ok.device.type == "cpu"

    def _base_step(self, params: list[torch.Tensor], ok: torch.Tensor, extra: Sequence[torch.Tensor] = ()) -> None:
        """The base optimizer's step, skipped when ``ok`` is False (a non-finite gradient).

        On an accelerator the decision stays on the device:
        A fused base optimizer (``AdamW(fused=True)``, ...) skips inside its kernel through ``found_inf``. Any other
        one steps on sanitised gradients and its parameters and state (and ``extra`` tensors the method updates
        itself, e.g. its own momentum) are blended back to their old values with weight ``not ok``: exact (a lerp
        with weight 0 or 1), no host synchronisation, at the cost of one copy of the trainable tensors and their
        state during the step.
        """
        base = self.base_optimizer
        if self._decide_on_host(ok):  # CPU: execution is synchronous, reading the flag stalls nothing
            if bool(ok):
                base.step()
            return
        if getattr(base, "_step_supports_amp_scaling", False) and not extra:
            # the attributes a fused step reads, set as torch's GradScaler sets them (Optimizer does not declare them)
            base.__dict__.update(grad_scale=None, found_inf=(~ok).float())
            try:
                base.step()
            finally:
                del base.__dict__["grad_scale"], base.__dict__["found_inf"]
            return
        for p in params:  # NaN/Inf -> 0, so the (discarded) update is finite and the blend below is exact
            local_grad(p).nan_to_num_(0.0, 0.0, 0.0)
        state = base.state
        had = {
            p: [k for k, v in state[p].items() if torch.is_tensor(v) and v.is_floating_point()]
            for p in params
            if p in state
        }
        saved_from = [local(t) for t in list(params) + [state[p][k] for p in had for k in had[p]] + list(extra)]
        saved = torch._foreach_mul(saved_from, 1.0)  # an exact copy (keeps -0.0)
        base.step()
        now = [local(t) for t in list(params) + [state[p][k] for p in had for k in had[p]] + list(extra)]
        fresh = [
            local(v)
            for p in params
            if p not in had and p in state
            for v in state[p].values()
            if torch.is_tensor(v) and v.is_floating_point()
        ]
        bad = (~ok).float()
        # Non-capturable optimizers keep step counters on the CPU beside CUDA parameters: reverting those would
        # need the flag on the host, so they are left advanced by one on a skipped step (docs/method.md).
        keep = [i for i, t in enumerate(now) if t.device == bad.device]
        # one 0-dim weight tensor per tensor (the List overload): passed alone, torch would take it as a Scalar and
        # read it back to the host (a sync on every skip-guarded step)
        torch._foreach_lerp_([now[i] for i in keep], [saved[i] for i in keep], [bad] * len(keep))
        fresh = [t for t in fresh if t.device == bad.device]
        if fresh:  # state created by this step: back to the zeros a first step starts from
            torch._foreach_mul_(fresh, ok.float())

    @run_eagerly  # also inside a compiled training step: host-side decisions and state, never traced
    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """Restore clean weights, update them with the gradients, and prepare the next perturbation."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self._poll_skips()
        self.restore()  # docs/method.md: the base step always sees clean weights
        params = self._params_with_grad()
        if not params:  # nothing has a gradient: like the base optimizer, do nothing (and say so, once)
            self._warn_no_gradient()
            return loss
        self._check_layout(params)
        # Whether this step's forwards ran with the window open (read before the hook guard resets the flag): the
        # step's statistics report the perturbation they ran at, 0 when they ran at the clean weights.
        self._window_was_open = self._opened
        self._check_hooks_ran(params)
        grad_norms, ok = self._grad_norms(params)
        self._update(params, grad_norms, ok)
        self._grad_marks = self._mark_grads(params)  # after _update, which may sanitise gradients in place
        return loss

    # ----------------------------------------------------------------------------------------- the hook guard
    def _would_perturb(self) -> bool:
        """Whether this method's settings perturb at all (rho > 0); a Python bool, no device value."""
        return False

    def _has_layer_hooks(self) -> bool:
        """Whether the method acts through hooks on the model's layers (weight-space terms, noise forwards)."""
        return False

    @staticmethod
    def _mark_grads(params: list[torch.Tensor]) -> list[GradMark]:
        # weak references and version counters: host-side, and no gradient kept alive
        return [(weakref.ref(grad), version(grad)) for grad in map(_grad, params)]

    def _check_hooks_ran(self, params: list[torch.Tensor]) -> None:
        """Refuse a step whose gradients come from a forward our hooks never saw: it would train as the plain base
        optimizer without a word. The usual cause is torch.compile: dynamo does not re-check hooks added after it
        traced a module, so a model (or a function calling it) compiled and run before the optimizer was built runs
        without them. Host-side flags only. Gradients the last step already used (the same tensors at the same
        version: no backward since) are not checked."""
        saw_forward, opened, saw_layer = self._saw_forward, self._opened, self._shared.saw_layer
        self._saw_forward = self._opened = self._shared.saw_layer = False
        marks = self._grad_marks
        if self.two_pass or self._closed or not self._would_perturb():
            return  # SAM, rho = 0: nothing for the hooks to do
        fresh = len(marks) != len(params) or any(
            ref() is not grad or seen != version(grad) for (ref, seen), grad in zip(marks, map(_grad, params))
        )
        if not fresh:
            return
        if not self._auto:  # manual perturb(): after a first step, a step whose forward it never preceded
            if marks and not opened and not getattr(self, "_warned_manual", False):
                self._warned_manual = True
                warnings.warn(
                    f"{type(self).__name__}(auto_perturb=False).step(): opt.perturb() was not called since the last "
                    "step, so this step's forward ran at the clean weights and it trained as the plain base "
                    "optimizer. Call opt.perturb() before each training forward (or pass the model with "
                    "auto_perturb=True). Warned once.",
                    RuntimeWarning,
                    stacklevel=7,
                )
            return
        name = type(self).__name__
        fix = (
            f"Fix: build the optimizer before the first call of anything compiled that runs the model (opt = "
            f"{name}(model, ...), then torch.compile(model), model.compile() or a compiled loss function; or "
            f"{name}(torch.compile(model), ...)), or call torch._dynamo.reset() once after building it."
        )
        if not saw_forward and not opened:
            raise RuntimeError(
                f"{name}.step(): there are new gradients, but no training-mode forward of the model given to the "
                "optimizer reached its forward pre-hook, so the perturbation was never applied and this step would "
                "train as the plain base optimizer. Under torch.compile: the model was compiled and run before the "
                f"optimizer was built, and dynamo does not see hooks added after it traced a module. {fix} Without "
                "compile: run the training forward in train mode (model.train()) through the module given to the "
                "optimizer, or pass auto_perturb=False and call opt.perturb() before each forward yourself."
            )
        if saw_forward and self._has_layer_hooks() and not saw_layer:
            raise RuntimeError(
                f"{name}.step(): the training forward reached the model's pre-hook but none of the hooks on its LoRA "
                "layers, so the perturbation was never added and this step would train as the plain base "
                "optimizer: torch.compile traced those layers (the model, a region of it or a function calling it, "
                f"compiled and run) before the optimizer installed its hooks. {fix}"
            )

    def _apply(self) -> None:
        raise NotImplementedError

    def _remove(self) -> None:
        raise NotImplementedError

    def _update(self, params: list[torch.Tensor], grad_norms: torch.Tensor, ok: torch.Tensor) -> None:
        raise NotImplementedError

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.base_optimizer.zero_grad(set_to_none)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        if not hasattr(self, "base_optimizer"):  # called by Optimizer.__init__
            return super().add_param_group(param_group)
        self.base_optimizer.add_param_group(param_group)
        refuse_unsupported(self.param_groups, self.model)
        self.layers = discover_layers(self.param_groups, self.model)
        self.exchange = Exchange([p for g in self.param_groups for p in g["params"]])

    # ----------------------------------------------------------------------------------------- checkpoints
    def _extra_state(self) -> dict[str, Any]:
        """Method-specific scalars/tensors not kept per parameter in ``self.state`` (override to add)."""
        return {"method": type(self).__name__, "skipped_steps": self._skipped, "hparams": dict(self.hparams)}

    def _load_extra_state(self, extra: dict[str, Any]) -> None:
        check_same_method(extra, type(self).__name__, self.hparams)  # a resume never changes the method
        skipped = extra["skipped_steps"]
        self._skipped = torch.as_tensor(skipped) if skipped is not None and not torch.is_tensor(skipped) else skipped

    def state_dict(self) -> dict[str, Any]:
        return {
            "base": self.base_optimizer.state_dict(),
            "own": super().state_dict(),
            "extra": self._extra_state(),
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if not {"base", "own", "extra"} <= set(state_dict):
            raise ValueError(
                f"{type(self).__name__}.load_state_dict got a state dict with keys {sorted(state_dict)}: a plain "
                "optimizer's (a run with method 'adamw', no perturbation), not one saved by the same mgpo optimizer "
                "(keys 'base', 'own', 'extra'). A resume never changes the method: resume with the method that "
                f"wrote it, or load it into the base optimizer alone (opt.base_optimizer.load_state_dict(...))."
            )
        self.restore()
        self._load_extra_state(state_dict["extra"])  # first: a mismatch raises before anything is changed
        super().load_state_dict(state_dict["own"])
        self.base_optimizer.load_state_dict(state_dict["base"])
        self.param_groups = self.base_optimizer.param_groups  # both loads made new group dicts: share again

    def __repr__(self) -> str:
        return f"{type(self).__name__}(base={type(self.base_optimizer).__name__}, layers={len(self.layers)})"
