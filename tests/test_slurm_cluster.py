"""The one-node Slurm cluster of scripts/slurm-local.sh (started by tests/slurm.py) is a working cluster: the node is
up with the settings the sweeps rely on, a batch job runs to completion, and two one-CPU jobs run at the same time."""

from __future__ import annotations

import subprocess

import pytest

from tests.slurm import SCRIPT, local_slurm, needs_slurm, sbatch, slurm, wait_for  # noqa: F401 (local_slurm: a fixture)

pytestmark = [needs_slurm, pytest.mark.timeout(180)]


def test_cluster_is_up_with_requeue_and_no_accounting(local_slurm):
    assert slurm("sinfo", "-h", "-p", "debug", "-o", "%T").split()[0] in ("idle", "mixed", "allocated")
    config = {
        key.strip(): value.strip()
        for key, _, value in (
            line.partition("=") for line in slurm("scontrol", "show", "config").splitlines() if "=" in line
        )
    }
    assert config["SlurmctldHost[0]"].startswith(subprocess.check_output(["hostname", "-s"], text=True).strip())
    assert config["JobRequeue"] == "1"
    assert config["AccountingStorageType"] == "accounting_storage/none"  # hence no sacct
    assert config["ProctrackType"] == "proctrack/linuxproc" and config["TaskPlugin"] == "task/none"
    assert config["SelectTypeParameters"] == "CR_CPU"
    assert str(local_slurm.conf) == config["SLURM_CONF"]
    status = subprocess.run(["bash", str(SCRIPT), "status", str(local_slurm.state_dir)], capture_output=True, text=True)
    assert status.returncode == 0 and status.stdout.startswith("up:"), status.stdout + status.stderr


def test_sbatch_wrap_runs_to_completion(local_slurm, tmp_path):
    job = sbatch(
        "--time=1", f"--output={tmp_path}/out-%j.txt", "--wrap", 'echo "hello from $SLURM_JOB_ID on $(hostname)"'
    )
    assert wait_for(job) == "COMPLETED"
    host = subprocess.check_output(["hostname"], text=True).strip()
    assert (tmp_path / f"out-{job}.txt").read_text() == f"hello from {job} on {host}\n"


def test_two_one_cpu_jobs_run_at_once(local_slurm, tmp_path):
    if local_slurm.cpus < 2:
        pytest.skip(f"the node has {local_slurm.cpus} CPU")
    # each job marks that it runs, then waits (30 s at most) for the other's mark: both complete only if both ran at
    # once
    script = 'touch "{dir}/{me}"; for i in $(seq 300); do [ -e "{dir}/{other}" ] && exit 0; sleep 0.1; done; exit 1'
    jobs = [
        sbatch(
            "--ntasks=1",
            "--cpus-per-task=1",
            "--time=1",
            f"--output={tmp_path}/{me}.log",
            "--wrap",
            script.format(dir=tmp_path, me=me, other=other),
        )
        for me, other in (("a", "b"), ("b", "a"))
    ]
    assert [wait_for(job) for job in jobs] == ["COMPLETED", "COMPLETED"]
