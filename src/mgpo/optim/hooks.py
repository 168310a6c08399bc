"""The window's mechanics: what the optimizers install in a model, and how it behaves when the model is copied.

A perturbation is applied from the first training-mode forward of a step until ``step()``, an eval-mode forward or
the model's ``state_dict()`` (docs/method.md, "Both spaces"). The model's hooks here hold the optimizer weakly and
call its ``perturb()`` / ``restore()``; the layers' hooks (MGPO's weight-space term, :mod:`mgpo.optim.weight_space`)
read a :class:`HookState`, never the optimizer.
"""

from __future__ import annotations

import copy
import types
import weakref
from collections.abc import Callable
from typing import Any, ParamSpec, Protocol, TypeAlias, TypeVar

import torch
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from mgpo.optim.torch_private import disable_dynamo

_P = ParamSpec("_P")
_T = TypeVar("_T")

# MGPO's pending weight-space terms: module id -> [(adapter, (A, m_A, B, m_B, c_l s), DoRA's (n / n~, 1 / n~,
# magnitude) or None)] (:mod:`mgpo.optim.weight_space`)
Terms: TypeAlias = dict[int, list[tuple[str, tuple[Tensor, ...], tuple[Tensor, Tensor, Tensor] | None]]]


class Window(Protocol):
    """What the model's hooks call on the optimizer."""

    def restore(self) -> None: ...

    def _on_forward(self, module: nn.Module) -> None: ...


def _no_hook(*_args: Any, **_kwargs: Any) -> None:
    """What an optimizer's hook becomes in a copy of the model: nothing."""
    return None


def _inert() -> Callable[..., None]:
    return _no_hook


def _own_method(module: nn.Module, name: str) -> Callable[..., Any]:
    """What an optimizer's override of ``module.name`` becomes in a copy of the model: the class's own method."""
    return types.MethodType(getattr(type(module), name), module)


class Installed:
    """A function an optimizer installs in a model: a hook, or (with ``module`` and ``name``) an override of
    ``module.name``. A copy of the model (``copy.deepcopy``, pickle, ``torch.save(model)``) gets an inert hook, or
    the class's own method, in its place: the copy is neither perturbed by this optimizer nor acts on it (a closure
    would be shared by both models, and cannot be pickled). ``before_copy`` runs first: the model's own hooks
    restore the clean weights there, as its ``state_dict()`` does, before the copy reaches its layers (a module's
    hooks are copied before its submodules)."""

    def __init__(
        self,
        fn: Callable[..., Any],
        module: nn.Module | None = None,
        name: str | None = None,
        before_copy: Callable[[], None] | None = None,
    ) -> None:
        self.fn, self.module, self.name, self.before_copy = fn, module, name, before_copy

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.fn(*args, **kwargs)

    def __deepcopy__(self, memo: dict[int, Any]) -> Callable[..., Any]:
        if self.before_copy is not None:
            self.before_copy()
        if self.module is None:
            return _no_hook
        assert self.name is not None  # given with the module (InstanceOverride)
        twin = memo.get(id(self.module))
        return _own_method(twin if twin is not None else copy.deepcopy(self.module, memo), self.name)

    def __reduce__(self) -> tuple[Callable[..., Any], tuple[Any, ...]]:
        if self.before_copy is not None:
            self.before_copy()
        return (_inert, ()) if self.module is None else (_own_method, (self.module, self.name))


class InstanceOverride:
    """Handle of an instance-level replacement of a module's method (``forward``, ``merge``); ``remove()`` puts the
    class's method back, unless something replaced it again since."""

    def __init__(self, module: nn.Module, name: str, fn: Callable[..., Any]) -> None:
        self.module, self.name, self.fn = module, name, Installed(fn, module, name)
        setattr(module, name, self.fn)

    def remove(self) -> None:
        if self.module.__dict__.get(self.name) is self.fn:
            delattr(self.module, self.name)


# What an optimizer keeps of what it installed (``remove()`` takes each away)
Handle: TypeAlias = RemovableHandle | InstanceOverride


def run_eagerly(fn: Callable[_P, _T]) -> Callable[_P, _T]:
    """``fn`` opaque to ``torch.compile``: it runs in Python at every call, a graph break around it.

    The model's pre-hook, the noise forwards and ``step()`` decide from the optimizer's Python state (is a
    perturbation pending? which tensors, which noise?) and change it. Traced by dynamo, they ran with the state of
    the first trace, and their writes to the optimizer were dropped: a model compiled after the optimizer was built
    trained as the plain base optimizer without a word. This is ``torch.compiler.disable``, imported at the first
    call (as torch.optim does for its own methods), so importing mgpo does not import dynamo."""
    return disable_dynamo(fn)


class HookState:
    """What the hooks inside the model read and write: a plain object, not the optimizer.

    torch.compile may trace a hook into its graph (MGPO's weight-space term is, to keep the model one graph). Dynamo
    guards on the plain attributes read here and replays the writes at every call of the compiled code; on an
    optimizer object it drops such writes. A hook holding this object does not keep the optimizer alive.
    """

    def __init__(self) -> None:
        self.applied = False  # the perturbation is on (the window is open)
        self.terms: Terms | None = None  # MGPO's pending weight-space terms, by module
        self.saw_layer = False  # a layer's hook ran in training mode since the last step (the hook guard)


def install_model_hooks(opt: Window, model: nn.Module) -> list[RemovableHandle]:
    """A forward pre-hook (apply at a training forward, restore at an eval one) and a state_dict pre-hook
    (restore) on the model. They hold the optimizer weakly: dropping it ends its effect. Returns the handles."""
    ref = weakref.ref(opt)
    handles: list[RemovableHandle] = []

    @run_eagerly
    def forward_hook(module: nn.Module, _args: Any) -> None:
        live = ref()
        if live is not None:
            live._on_forward(module)

    @run_eagerly
    def restore_hook(*_: Any) -> None:
        live = ref()
        if live is not None:
            live.restore()

    # prepend: before FSDP2's own pre-forward hook, so a perturbation moved in place into a sharded tensor is
    # what FSDP gathers for the forward (docs/distributed.md)
    handles.append(model.register_forward_pre_hook(Installed(forward_hook, before_copy=restore_hook), prepend=True))
    handles.append(_state_dict_pre_hook(model, Installed(restore_hook, before_copy=restore_hook)))
    get_base_model = getattr(model, "get_base_model", None)
    inner = get_base_model() if callable(get_base_model) else None
    if isinstance(inner, nn.Module) and inner is not model:
        # PEFT's generate() and get_base_model() reach the wrapped model without the PeftModel's forward or
        # state_dict(): an eval-mode generation (or a save) inside the window restores there too. Skipped
        # while traced (the wrapper's own hook serves compiled forwards), so it adds no graph break.
        def inner_hook(module: nn.Module, args: Any) -> None:
            if not torch.compiler.is_compiling():
                forward_hook(module, args)

        handles.append(inner.register_forward_pre_hook(Installed(inner_hook, before_copy=restore_hook), prepend=True))
        handles.append(_state_dict_pre_hook(inner, Installed(restore_hook, before_copy=restore_hook)))
    return handles


def _state_dict_pre_hook(module: nn.Module, hook: Installed) -> RemovableHandle:
    """``module.register_state_dict_pre_hook(hook)``, which torch leaves unannotated."""
    handle: RemovableHandle = module.register_state_dict_pre_hook(hook)  # type: ignore[no-untyped-call]
    return handle


class _Mergeable(Protocol):
    """A PEFT layer, which merges its adapters into its base layer."""

    def merge(self, *args: Any, **kwargs: Any) -> Any: ...


def guard_merges(opt: Window, model: nn.Module | None, moved: set[int]) -> list[InstanceOverride]:
    """PEFT's ``merge_adapter()`` / ``merge_and_unload()`` read each adapter's factors through its layer's
    ``merge()``, which no forward or state_dict hook sees: inside the window (a loop left between forward and
    step) they would merge factors moved in place. Each PEFT layer owning a tensor in ``moved`` (ids) gets a
    ``merge`` that restores first (a copy of the model gets the class's own); returns the handles."""
    ref = weakref.ref(opt)

    def merge(module: _Mergeable, *args: Any, **kwargs: Any) -> Any:
        live = ref()
        if live is not None:
            live.restore()
        return type(module).merge(module, *args, **kwargs)

    return [
        InstanceOverride(module, "merge", types.MethodType(merge, module))
        for module in (model.modules() if model is not None else ())
        if callable(getattr(module, "merge", None))
        and hasattr(module, "unmerge")
        and hasattr(module, "get_base_layer")
        and any(id(p) in moved for p in module.parameters())
    ]
