"""The private PyTorch API mgpo uses, in this module alone (``torch._foreach_*``, which torch.optim itself is built
on, aside). tests/optim/test_torch_private.py checks each name on the installed torch and that no other module
touches one, so a torch release that moves one fails there, by name."""

from __future__ import annotations

from collections.abc import Callable
from typing import ParamSpec, TypeVar

import torch

_P = ParamSpec("_P")
_T = TypeVar("_T")

# what this module reaches into, for the test: (owner, attribute)
PRIVATE_API = (("torch.Tensor", "_version"), ("torch._compile", "_disable_dynamo"))


def version(t: torch.Tensor) -> int:
    """The counter autograd keeps of a tensor's in-place writes: equal at two times (for the same tensor) means no
    in-place write between them. Host-side; reading it never syncs the device."""
    return t._version


def disable_dynamo(fn: Callable[_P, _T]) -> Callable[_P, _T]:
    """``fn`` opaque to ``torch.compile``, importing dynamo at its first call (``torch.compiler.disable`` imports it
    at once, as torch.optim avoids for its own methods)."""
    from torch._compile import _disable_dynamo

    return _disable_dynamo(fn)
