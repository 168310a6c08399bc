"""Checks that need a CUDA device: every method trains in bf16 and in fp16 with a GradScaler, bf16 restores are
exact, FSDP2 runs with two processes on one GPU (where the backend allows it), and the training metrics take
their peak memory from CUDA. Skipped without CUDA; ``bash scripts/gpu-check.sh`` runs them and writes a report.

``MGPO_TEST_DEVICE=cpu`` runs the device-independent ones on the CPU, to check the tests themselves on a
machine without a GPU (it says nothing about CUDA)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

import mgpo
from tests.optim.helpers import METHODS, batches, loss_fn, make_model, raw_params, train_step

DEVICE = os.environ.get("MGPO_TEST_DEVICE", "cuda")
ROOT = Path(__file__).resolve().parents[2]
NAMES = list(METHODS)  # the contract tests' list: every method and its main variants

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(DEVICE == "cuda" and not torch.cuda.is_available(), reason="needs a CUDA device"),
]
cuda_only = pytest.mark.skipif(DEVICE != "cuda", reason="measures CUDA itself")


def build(name, model, **base_kwargs):
    cls, kwargs, _ = METHODS[name]
    return cls(model, torch.optim.AdamW, **kwargs, **{"lr": 1e-2, **base_kwargs})


def on_device(data, dtype=torch.float32):
    return [(x.to(DEVICE, dtype), y.to(DEVICE)) for x, y in data]


def frozen(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}


def assert_trained(model, start: dict, frozen_start: dict, opt) -> None:
    """Every trainable tensor moved and is finite, every frozen one is bit-identical, no step was skipped."""
    now = raw_params(model)
    for n in start:
        assert torch.isfinite(now[n]).all(), f"{n} is not finite"
        if n in frozen_start:
            assert torch.equal(now[n], frozen_start[n]), f"frozen {n} changed"
        else:
            assert not torch.equal(now[n], start[n]), f"{n} did not train"
    assert opt.skipped_steps == 0


@pytest.mark.parametrize("name", NAMES)
def test_bf16_training_steps(name):
    model = make_model().to(DEVICE, torch.bfloat16)
    opt = build(name, model)
    start, frozen_start = raw_params(model), frozen(model)
    for batch in on_device(batches(4), torch.bfloat16):
        train_step(model, opt, [batch])
    assert_trained(model, start, frozen_start, opt)
    assert opt.last_stats.get("perturbation_norm", 0.0) > 0  # it perturbed, not only stepped


@pytest.mark.parametrize("name", NAMES)
def test_fp16_autocast_steps_with_a_grad_scaler(name):
    """fp32 weights, fp16 autocast, ``torch.amp.GradScaler``: the usual mixed-precision loop. SAM's second gradient
    is unscaled by hand, as PerturbationTrainer does (GradScaler.step takes no closure)."""
    model = make_model().to(DEVICE)
    opt = build(name, model)
    scaler = torch.amp.GradScaler(DEVICE, init_scale=2.0**10)
    start, frozen_start = raw_params(model), frozen(model)
    for batch in on_device(batches(4)):
        with torch.autocast(DEVICE, dtype=torch.float16):
            loss = loss_fn(model, batch)
        scaler.scale(loss).backward()
        scaler.unscale_(opt)
        if isinstance(opt, mgpo.SAM):

            def closure(batch=batch):
                with torch.autocast(DEVICE, dtype=torch.float16):
                    second = loss_fn(model, batch)
                scaler.scale(second).backward()
                torch._foreach_mul_(
                    [p.grad for p in model.parameters() if p.grad is not None], 1.0 / scaler.get_scale()
                )

            opt.step(closure)
        else:
            scaler.step(opt)
        scaler.update()
        opt.zero_grad()
    assert scaler.get_scale() == 2.0**10  # no overflow: every step was a real one
    assert_trained(model, start, frozen_start, opt)


@pytest.mark.parametrize("name", NAMES)
def test_bf16_perturb_and_restore_is_exact(name):
    """With lr 0 AdamW leaves every weight as it is (x + 0 * u == x), so after three steps of perturbing and
    restoring every tensor, trained or frozen, must be bit-identical to the start: any rounding left behind by a
    restore shows. The perturbation norm guards against a method that perturbed nothing."""
    model = make_model().to(DEVICE, torch.bfloat16)
    opt = build(name, model, lr=0.0)
    start = raw_params(model)
    norms = []
    for batch in on_device(batches(3), torch.bfloat16):
        train_step(model, opt, [batch])
        norms.append(opt.last_stats.get("perturbation_norm", 0.0))
    model.train()
    loss_fn(model, on_device(batches(1, seed=5), torch.bfloat16)[0]).backward()  # opens the next window
    opt.restore()
    now = raw_params(model)
    assert all(torch.equal(now[n], start[n]) for n in start), [n for n in start if not torch.equal(now[n], start[n])]
    assert max(norms) > 0


@cuda_only
def test_peak_memory_in_the_metrics_is_cuda_max_allocated():
    from mgpo.pipelines.train import cost_metrics

    torch.cuda.reset_peak_memory_stats()
    block = torch.empty(64 * 2**20, dtype=torch.uint8, device="cuda")  # 64 MiB at least at the peak
    model = make_model().cuda()
    trainer = SimpleNamespace(model=model, state=SimpleNamespace(global_step=4))
    metrics = cost_metrics(trainer, None, train_seconds=2.0)
    del block
    assert metrics["peak_memory_source"] == "cuda_max_allocated"
    assert metrics["peak_memory_mb"] == round(torch.cuda.max_memory_allocated() / 2**20, 1)
    assert metrics["peak_memory_mb"] >= 64


def test_fsdp2_two_processes_on_one_gpu(tmp_path):
    """FSDP2 with two ranks sharing the one GPU matches one process. NCCL refuses two ranks on one device, so
    gloo (on CUDA tensors) is tried next; a backend that cannot run FSDP's collectives there is reported by name
    in the skip reason, never passed."""
    from tests.gpu import fsdp_worker

    reference = {m: fsdp_worker.train(m, rank=0, world=1) for m in fsdp_worker.METHODS}
    refused = []
    for backend in ("nccl", "gloo"):
        out = tmp_path / f"{backend}.pt"
        env = {
            **os.environ,
            "OMP_NUM_THREADS": "1",
            "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), str(ROOT), os.environ.get("PYTHONPATH", "")]),
        }
        try:
            proc = subprocess.run(
                [
                    sys.executable,
                    "-m",
                    "torch.distributed.run",
                    "--standalone",
                    "--nproc_per_node",
                    "2",
                    str(ROOT / "tests" / "gpu" / "fsdp_worker.py"),
                    backend,
                    str(out),
                ],
                capture_output=True,
                text=True,
                timeout=100,
                env=env,
                cwd=ROOT,
            )
        except subprocess.TimeoutExpired:
            refused.append(f"{backend}: timed out after 100 s")
            continue
        result = torch.load(out, weights_only=False) if out.exists() else None
        if result is not None and "unsupported" in result:
            refused.append(f"{backend}: {result['unsupported']}")
            continue
        assert proc.returncode == 0 and result is not None, (proc.stdout + proc.stderr)[-4000:]
        for method, params in result["params"].items():
            for k, v in params.items():
                assert (v - reference[method][k]).abs().max() <= 1e-9, (backend, method, k)
        return
    pytest.skip("FSDP2 with 2 processes on one GPU is not possible here: " + "; ".join(refused))
