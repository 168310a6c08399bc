"""A real one-node Slurm cluster for the tests: `local_slurm` starts scripts/slurm-local.sh once per session (as root,
state under /tmp/mgpo-slurm-test, its own ports so a cluster started by hand on the default ones can run beside it),
points SLURM_CONF at it and stops it at the end; `needs_slurm` skips where it cannot run. Use:

    from tests.slurm import local_slurm, needs_slurm, sbatch, wait_for  # noqa: F401 (local_slurm is a fixture)

    @needs_slurm
    def test_x(local_slurm): ...

There is no accounting (no slurmdbd, so no sacct): a job's state comes from squeue/scontrol, which forget a finished
job MinJobAge (60 s) to ~2 min after it ends; `job_state` then answers None.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "slurm-local.sh"
STATE_DIR = Path(os.environ.get("MGPO_SLURM_TEST_DIR", "/tmp/mgpo-slurm-test"))
PORTS = {"MGPO_SLURMCTLD_PORT": "6827", "MGPO_SLURMD_PORT": "6828"}
DAEMONS = ("munged", "slurmctld", "slurmd")
CLIENTS = ("sbatch", "squeue", "sinfo", "scontrol", "scancel")
FINISHED = {
    "COMPLETED",
    "FAILED",
    "CANCELLED",
    "TIMEOUT",
    "NODE_FAIL",
    "PREEMPTED",
    "OUT_OF_MEMORY",
    "BOOT_FAIL",
    "DEADLINE",
}


def _which(tool: str) -> str | None:
    return shutil.which(tool, path=os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin", "/sbin"]))


def why_no_slurm() -> str | None:
    """Why a local Slurm cluster cannot be started here, or None when it can."""
    if not hasattr(os, "geteuid") or os.geteuid() != 0:
        return "not root (the Slurm daemons run as root)"
    missing = [tool for tool in (*DAEMONS, *CLIENTS) if _which(tool) is None]
    return f"{', '.join(missing)} not installed" if missing else None


_WHY = why_no_slurm()
needs_slurm = pytest.mark.skipif(
    _WHY is not None,
    reason=f"needs a local one-node Slurm cluster ({_WHY}): run as root, after `bash scripts/install.sh --test` "
    "(which installs slurm-wlm and munge)",
)


@dataclass(frozen=True)
class LocalSlurm:
    state_dir: Path
    conf: Path  # what SLURM_CONF points at
    cpus: int  # the node's CPUs (nproc)
    partition: str = "debug"


def _script(command: str, timeout: float = 120) -> subprocess.CompletedProcess:
    env = {**os.environ, **PORTS}
    return subprocess.run(
        ["bash", str(SCRIPT), command, str(STATE_DIR)], capture_output=True, text=True, env=env, timeout=timeout
    )


@pytest.fixture(scope="session")
def local_slurm():
    """The cluster, up for the whole session (left running if it already was), with SLURM_CONF set."""
    if _WHY is not None:
        pytest.skip(f"no local Slurm: {_WHY}; run as root after `bash scripts/install.sh --test`")
    already_up = _script("status").returncode == 0
    started = _script("start")
    if started.returncode != 0:
        pytest.fail(
            f"scripts/slurm-local.sh start failed ({started.returncode}):\n{started.stdout}{started.stderr}",
            pytrace=False,
        )
    conf = STATE_DIR / "slurm.conf"
    previous = os.environ.get("SLURM_CONF")
    os.environ["SLURM_CONF"] = str(conf)
    try:
        yield LocalSlurm(STATE_DIR, conf, int(slurm("sinfo", "-h", "-o", "%c").split()[0]))
    finally:
        if previous is None:
            os.environ.pop("SLURM_CONF", None)
        else:
            os.environ["SLURM_CONF"] = previous
        if not already_up:
            _script("stop")


def slurm(*args: str, timeout: float = 30) -> str:
    """A Slurm client command's stdout (SLURM_CONF from the environment); raises on a non-zero exit."""
    done = subprocess.run(list(args), capture_output=True, text=True, timeout=timeout)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(args)} failed ({done.returncode}): {done.stderr.strip()}")
    return done.stdout


def sbatch(*args: str) -> str:
    """Submits with sbatch --parsable; returns the job id."""
    return slurm("sbatch", "--parsable", *args).strip().split(";")[0]


def job_state(job_id: str) -> str | None:
    """RUNNING, PENDING, COMPLETED, CANCELLED, ... or None once Slurm has forgotten the job (MinJobAge after its
    end)."""
    done = subprocess.run(
        ["squeue", "-h", "-t", "all", "-j", job_id, "-o", "%T"], capture_output=True, text=True, timeout=30
    )
    if done.returncode != 0 and "Invalid job id" not in done.stderr:  # what squeue says of a forgotten job
        raise RuntimeError(f"squeue -j {job_id} failed ({done.returncode}): {done.stderr.strip()}")
    out = done.stdout.split()
    return out[0] if done.returncode == 0 and out else None


def wait_for(job_id: str, states=FINISHED, timeout: float = 60) -> str:
    """Polls until the job is in one of `states` (default: any finished state); returns that state."""
    deadline, state = time.monotonic() + timeout, None
    while time.monotonic() < deadline:
        state = job_state(job_id)
        if state is not None and state in states:
            return state
        time.sleep(0.2)
    raise TimeoutError(f"job {job_id} still {state} after {timeout}s (waiting for {sorted(states)})")
