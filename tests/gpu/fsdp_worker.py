"""FSDP2 on two processes that share one GPU, for tests/gpu/test_cuda.py.

``torchrun --standalone --nproc_per_node 2 tests/gpu/fsdp_worker.py BACKEND OUT_FILE``. Both ranks use cuda:0.
The backend is first probed with the collectives FSDP2 uses (all-gather, reduce-scatter); if it cannot run them
with two ranks on one device (NCCL refuses that), rank 0 writes ``{"unsupported": reason}`` and exits 0.
Otherwise it trains tests/optim/dist_worker.py's float64 LoRA model under FSDP2 and writes the whole trainable
tensors per method (CPU copies)."""

from __future__ import annotations

import os
import sys

import torch

METHODS = ("mgpo", "random")
DEVICE = os.environ.get("MGPO_TEST_DEVICE", "cuda")  # "cpu" checks this worker itself (with gloo) without a GPU


def train(method: str, rank: int, world: int) -> dict[str, torch.Tensor]:
    """Five steps of dist_worker's case on DEVICE; with ``world > 1`` under FSDP2, this rank's rows of each batch."""
    from tests.optim import dist_worker as w
    from tests.optim.helpers import train_step

    model = w.make_model().to(DEVICE)
    if world > 1:
        model = w._shard_fsdp(model)
    cls, kwargs = w.METHODS[method]
    opt = cls(model, lr=1e-2, **kwargs)
    b = w.BATCH // world
    for x, y in w.data():
        train_step(model, opt, [(x[rank * b : (rank + 1) * b].to(DEVICE), y[rank * b : (rank + 1) * b].to(DEVICE))])
    return {k: v.cpu() for k, v in w.whole(model).items()}


def probe() -> str | None:
    """None if this group can all-gather and reduce-scatter tensors on DEVICE, else the error, in one line."""
    import torch.distributed as dist

    try:
        x = torch.ones(4, device=DEVICE)
        gathered = torch.empty(4 * dist.get_world_size(), device=DEVICE)
        dist.all_gather_into_tensor(gathered, x)
        dist.reduce_scatter_tensor(x, gathered)
        if DEVICE == "cuda":
            torch.cuda.synchronize()
        return None
    except Exception as e:  # noqa: BLE001 - any refusal is the answer we are after
        return f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}"[:300]


def main() -> None:
    import torch.distributed as dist

    backend, out = sys.argv[1], sys.argv[2]
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    if DEVICE == "cuda":
        torch.cuda.set_device(0)  # both ranks on the one GPU
    try:
        dist.init_process_group(backend)
        error = probe()
    except Exception as e:  # noqa: BLE001
        error = f"{type(e).__name__}: {str(e).strip()[:300]}"
    errors = [None] * world
    if error is None:
        dist.all_gather_object(errors, error)  # every rank must agree before training starts
    if error is not None or any(errors):
        if rank == 0:
            torch.save({"unsupported": error or next(e for e in errors if e)}, out)
        return  # no collective after a failure: the group may be unusable
    results = {m: train(m, rank, world) for m in METHODS}
    if rank == 0:
        torch.save({"params": results}, out)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
    main()
