"""The optimizers' trajectories are bit-identical to those of the code before the refactor of issue 32, and the
state dicts that code saved still load and continue identically (fixtures written by tests/optim/trajectories.py)."""

from __future__ import annotations

import json

import pytest
import torch

from tests.optim import trajectories as tr

EXPECTED = json.loads(tr.HASHES.read_text())
RUNS = sorted(k for k in EXPECTED if not k.startswith("resumed/"))


def test_the_fixture_covers_every_configuration_and_they_differ():
    assert RUNS == sorted(f"{name}/{d}" for name in tr.CONFIGS for d in tr.DTYPES)
    # every run's end state (model, optimizer state, statistics) is its own: a setting that changed nothing would show
    models = {EXPECTED[k]["model"] for k in RUNS}
    assert len({tuple(EXPECTED[k].values()) for k in RUNS}) == len(RUNS) and len(models) > 0.8 * len(RUNS)


@pytest.mark.parametrize("key", RUNS)
def test_trajectory_is_bit_identical(key):
    name, dtype = key.split("/")
    assert tr.run(name, tr.DTYPES[dtype]) == EXPECTED[key]


@pytest.mark.parametrize("name", tr.SAVED)
def test_an_old_state_dict_loads_and_continues_identically(name):
    saved = torch.load(tr.STATES, weights_only=True)[name]
    got = tr.resumed(name, saved)
    assert got == EXPECTED[f"resumed/{name}"]
    full = EXPECTED[f"{name}/float32"]  # and it ends where the uninterrupted run does
    assert (got["model"], got["optimizer"]) == (full["model"], full["optimizer"])
