"""The Hugging Face pins in pyproject.toml match the code: transformers 5 (not 4.x, whose warm-up and dtype
arguments mean something else) and the PEFT / TRL / accelerate releases installed and tested with it; openai (the
MT-Bench judge client) within the major release it was written against."""

from __future__ import annotations

from importlib.metadata import version
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.version import Version

try:
    import tomllib
except ImportError:  # Python 3.10
    tomllib = pytest.importorskip("tomli")

PYPROJECT = Path(__file__).resolve().parents[1] / "pyproject.toml"
PINNED = ("transformers", "peft", "trl", "accelerate", "openai")


def requirements() -> dict[str, Requirement]:
    project = tomllib.loads(PYPROJECT.read_text())["project"]
    listed = [*project["dependencies"], *(r for group in project["optional-dependencies"].values() for r in group)]
    return {req.name: req for req in map(Requirement, listed)}


@pytest.mark.parametrize("name", PINNED)
def test_installed_version_is_within_the_pin(name):
    req = requirements()[name]
    assert req.specifier.contains(Version(version(name)), prereleases=True), (
        f"{name} {version(name)} is installed but pyproject.toml asks for {req}"
    )


@pytest.mark.parametrize("name", PINNED)
def test_pin_has_an_upper_bound(name):
    assert any(spec.operator in ("<", "<=", "~=", "==") for spec in requirements()[name].specifier), (
        f"{name} has no upper bound in pyproject.toml: a new major release could change what the code relies on"
    )


def test_transformers_4_is_excluded():
    spec = requirements()["transformers"].specifier
    assert not spec.contains("4.57.0") and spec.contains("5.0.0")
