"""transformers' private API that mgpo uses lives in mgpo.integrations.hf_private alone. Here every private name it
lists is checked on the installed transformers (it exists, takes the parameters mgpo passes, and, for the methods
mgpo overrides, the Trainer still calls it), failing with the name; and no other module in src/ touches one."""

from __future__ import annotations

import importlib
import inspect
import re
from pathlib import Path

import pytest
import transformers

from mgpo.integrations import hf_private
from mgpo.integrations.hf_private import INTERNAL_NAMES, PRIVATE_API, PRIVATE_INSTANCE_ATTRIBUTES, TrainerOverrides

SRC = Path(__file__).resolve().parents[2] / "src" / "mgpo"
SEAM = SRC / "integrations" / "hf_private.py"
VERSION = f"transformers {transformers.__version__}"
ADAPT = "adapt src/mgpo/integrations/hf_private.py (the one module that uses it)"


def _owner(name: str) -> type:
    owner = name.split(".")[0]
    return getattr(transformers, owner) if hasattr(transformers, owner) else getattr(transformers.integrations, owner)


@pytest.mark.parametrize("name", sorted(PRIVATE_API))
def test_each_private_method_exists_and_takes_what_mgpo_passes(name):
    attr = name.split(".")[1]
    method = getattr(_owner(name), attr, None)
    assert callable(method), f"{VERSION} has no {name}: {ADAPT}."
    params = list(inspect.signature(method).parameters.values())[1:]  # after self
    expected = PRIVATE_API[name]
    names = [p.name for p in params]
    assert names[: len(expected)] == list(expected), (
        f"{VERSION}: {name} takes ({', '.join(names)}); mgpo calls it with ({', '.join(expected)}): {ADAPT}."
    )
    extra = [
        p.name
        for p in params[len(expected) :]
        if p.default is inspect.Parameter.empty and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)
    ]
    assert not extra, f"{VERSION}: {name} now requires {extra}, which mgpo does not pass: {ADAPT}."


@pytest.mark.parametrize("name", sorted(set(vars(TrainerOverrides)) & {n.split(".")[1] for n in PRIVATE_API}))
def test_the_trainer_still_calls_each_method_mgpo_overrides(name):
    """An override the Trainer no longer calls would be skipped silently (gbar from clipped gradients, FSDP
    checkpoints without the method's state)."""
    source = inspect.getsource(importlib.import_module("transformers.trainer"))
    assert f"self.{name}(" in source, (
        f"{VERSION}: transformers.Trainer no longer calls {name}, which mgpo overrides: {ADAPT}."
    )


@pytest.mark.parametrize("name", sorted(PRIVATE_INSTANCE_ATTRIBUTES))
def test_each_private_instance_attribute_exists(name):
    owner, attr = name.split(".")
    instance = _owner(name)()
    assert hasattr(instance, attr), (
        f"{VERSION}: a {owner} has no {attr} ({PRIVATE_INSTANCE_ATTRIBUTES[name]}): {ADAPT}."
    )


@pytest.mark.parametrize("name", INTERNAL_NAMES)
def test_each_internal_name_resolves(name):
    module, attr = name.rsplit(".", 1)
    try:
        found = getattr(importlib.import_module(module), attr, None)
    except ImportError:
        found = None
    assert found is not None, f"{VERSION} has no {name}: {ADAPT}."


def test_the_seams_helpers_return_what_the_callers_use():
    assert hf_private.optimizer_file_name() == "optimizer.pt"
    assert hf_private.scheduler_file_name() == "scheduler.pt"
    assert isinstance(hf_private.fsdp_checkpoint_kwargs(), dict)
    from mgpo.integrations.trainer import PerturbationTrainer

    for name in ("_clip_grad_norm", "_save_optimizer_and_scheduler", "_load_optimizer_and_scheduler"):
        assert getattr(PerturbationTrainer, name) is getattr(TrainerOverrides, name), name


def _private_names() -> list[str]:
    return sorted({n.split(".")[1] for n in [*PRIVATE_API, *PRIVATE_INSTANCE_ATTRIBUTES]})


def test_no_other_module_touches_transformers_private_names():
    """Outside the seam: no `trainer._...` attribute, none of the names the seam lists, no import from
    transformers' internal modules."""
    names = "|".join(map(re.escape, _private_names()))
    internal = "|".join(re.escape(n.rsplit(".", 1)[0]) for n in INTERNAL_NAMES)
    patterns = {
        "a trainer's private attribute": re.compile(r"\btrainer\._\w"),
        "a transformers private name": re.compile(rf"\b({names})\b"),
        "an internal transformers module": re.compile(rf"\b({internal})\b"),
    }
    found = []
    for path in sorted(SRC.rglob("*.py")):
        if path == SEAM:
            continue
        for number, line in enumerate(path.read_text().splitlines(), 1):
            found += [
                f"{path.relative_to(SRC.parent)}:{number}: {what}: {line.strip()}"
                for what, pattern in patterns.items()
                if pattern.search(line)
            ]
    assert not found, "transformers' private API outside mgpo/integrations/hf_private.py:\n" + "\n".join(found)
