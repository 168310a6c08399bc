"""Every sweep in configs/experiments/ loads, expands and validates each run's configuration: its run plan is
built without training or downloading anything."""

from __future__ import annotations

from pathlib import Path

import pytest

from mgpo.pipelines.sweep import load_sweep, plan

EXPERIMENTS = sorted((Path(__file__).parents[2] / "configs" / "experiments").glob("*.yaml"))


def test_there_are_cpu_and_paper_scale_experiments():
    names = {p.stem for p in EXPERIMENTS}
    for kind in ("rank-sweep", "lr-sweep", "methods", "nlg-arithmetic", "ablation", "noise", "cost"):
        assert f"cpu-{kind}" in names
    assert len([n for n in names if n.startswith("paper-")]) >= 6


@pytest.mark.parametrize("path", EXPERIMENTS, ids=[p.stem for p in EXPERIMENTS])
def test_experiment_builds_its_run_plan(path, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # building the plan must not need the network
    sweep = load_sweep(path, output_dir=tmp_path / "sweep")
    assert sweep.runs and len({r.name for r in sweep.runs}) == len(sweep.runs)
    configs = plan(sweep)
    assert len(configs) == len(sweep.runs)
    assert all(c.training.output_dir.startswith(str(tmp_path / "sweep")) for c in configs)
    assert not any(tmp_path.iterdir())  # nothing was written by planning
