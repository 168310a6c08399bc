"""PyTorch's private API that mgpo uses lives in mgpo.optim.torch_private alone: each name it lists exists on the
installed torch and does what mgpo relies on, failing with the name; and no other module in src/ touches one."""

from __future__ import annotations

import importlib
import re
from pathlib import Path

import pytest
import torch

from mgpo.optim import torch_private
from mgpo.optim.torch_private import PRIVATE_API

SRC = Path(__file__).resolve().parents[2] / "src" / "mgpo"
SEAM = SRC / "optim" / "torch_private.py"
ADAPT = f"torch {torch.__version__}: adapt src/mgpo/optim/torch_private.py (the one module that uses it)"


@pytest.mark.parametrize(("owner", "name"), PRIVATE_API)
def test_each_private_name_exists(owner, name):
    where = torch.zeros(1) if owner == "torch.Tensor" else importlib.import_module(owner)  # _version: per instance
    assert hasattr(where, name), f"{owner}.{name} is gone; {ADAPT}"


def test_version_counts_in_place_writes_only():
    t = torch.zeros(3)
    before = torch_private.version(t)
    t.add(1)  # out of place
    assert torch_private.version(t) == before, ADAPT
    t.add_(1)
    assert torch_private.version(t) > before, f"an in-place write left Tensor._version unchanged; {ADAPT}"


def test_disable_dynamo_keeps_a_function_out_of_the_graph():
    calls = []

    @torch_private.disable_dynamo
    def eager(x):
        calls.append(1)  # a Python side effect: runs at every call only if dynamo leaves it alone
        return x + 1

    compiled = torch.compile(lambda x: eager(x) * 2, backend="eager")
    for _ in range(3):
        assert torch.equal(compiled(torch.ones(2)), torch.full((2,), 4.0))
    assert len(calls) == 3, f"a function passed through _disable_dynamo was traced; {ADAPT}"


def test_no_other_module_touches_a_private_torch_name():
    names = "|".join(re.escape(name) for _, name in PRIVATE_API)
    pattern = re.compile(rf"\.({names})\b|torch\._compile\b")
    found = [
        f"{path.relative_to(SRC)}:{n}"
        for path in SRC.rglob("*.py")
        if path != SEAM
        for n, line in enumerate(path.read_text().splitlines(), 1)
        if pattern.search(line.split("#")[0])
    ]
    assert not found, f"private torch API outside mgpo.optim.torch_private: {found}"
