"""Multi-process cases for tests/optim/test_distributed.py, all in one launch (start-up costs more than the cases).

Run as ``torchrun --standalone --nproc_per_node 2 tests/optim/dist_worker.py OUT_FILE`` (gloo, CPU). Every case
trains the same float64 LoRA model for 5 steps on the same data, the global batch of 8 split over the ranks,
under DDP or FSDP2 (``fully_shard`` on each block, then on the root). Rank 0 writes one ``torch.save`` file:
per case, each rank's final trainable tensors (whole), its per-step perturbation norms, and the collectives each
``opt.step()`` issued. :func:`run_case` with ``world=1`` is the single-process reference (imported by the test).
"""

from __future__ import annotations

import sys
import warnings
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

import mgpo
from mgpo.optim import distributed
from mgpo.optim._base import PerturbedOptimizer

STEPS, BATCH, D_IN, D_HID, D_OUT, RANK = 5, 8, 6, 9, 3, 4  # D_HID=9: uneven shards (5 + 4 rows)

METHODS: dict[str, tuple[Callable[..., PerturbedOptimizer], dict[str, Any]]] = {  # name -> (class, kwargs)
    "mgpo": (mgpo.MGPO, dict(rho=0.05)),
    "mgpo-factors": (mgpo.MGPO, dict(rho=0.05, space="factors")),
    "mgpo-mu": (mgpo.MGPO, dict(rho=0.05, momentum=0.9, norm="global")),
    "sam": (mgpo.SAM, dict(rho=0.05)),
    "random": (mgpo.RandomPerturbation, dict(rho=0.05, total_steps=STEPS)),
}


class Block(nn.Module):
    def __init__(self, d_in, d_out):
        super().__init__()
        self.fc = nn.Linear(d_in, d_out)

    def forward(self, x):
        return torch.tanh(self.fc(x))


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.blocks = nn.ModuleList([Block(D_IN, D_HID), Block(D_HID, D_HID)])
        self.head = nn.Linear(D_HID, D_OUT)

    def forward(self, x):
        for block in self.blocks:
            x = block(x)
        return self.head(x)


def make_model(head: bool = False) -> nn.Module:
    """LoRA (rank 4, B non-zero) on both blocks' ``fc``; ``head=True`` also trains the head (a layer moved in
    place). Float64, same initialisation on every rank."""
    import peft

    torch.manual_seed(0)
    config = peft.LoraConfig(
        r=RANK,
        lora_alpha=8,
        target_modules=["fc"],
        init_lora_weights="gaussian",
        modules_to_save=["head"] if head else None,
    )
    model = peft.get_peft_model(Net().double(), config).double()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1)
    return model


def data():
    gen = torch.Generator().manual_seed(1)
    return [
        (torch.randn(BATCH, D_IN, generator=gen, dtype=torch.float64), torch.randint(0, D_OUT, (BATCH,), generator=gen))
        for _ in range(STEPS)
    ]


def _shard_fsdp(model):
    from torch.distributed.fsdp import fully_shard

    for block in model.base_model.model.blocks:
        fully_shard(block)
    fully_shard(model)
    return model


def whole(model) -> dict[str, torch.Tensor]:
    """Trainable tensors by their plain name (no DDP ``module.`` prefix), gathered whole."""
    out = {}
    for name, p in model.named_parameters():
        if p.requires_grad:
            t = p.full_tensor() if distributed.is_sharded(p) else p
            out[name.removeprefix("module.")] = t.detach().clone()
    return out


class Counter:
    """Collectives issued inside one ``opt.step()``: every c10d op (CommDebugMode), and the elements that our
    own calls (``dist.all_reduce``, ``dist.all_gather_single``) moved."""

    def __init__(self):
        import torch.distributed as dist

        self.dist, self.calls = dist, []
        self._orig = {name: getattr(dist, name) for name in ("all_reduce", "all_gather_single")}

    def __enter__(self):
        from torch.distributed.tensor.debug import CommDebugMode

        for name, fn in self._orig.items():

            def wrapped(tensor, *args, _fn=fn, _name=name, **kwargs):
                self.calls.append((_name, tensor.numel()))
                return _fn(tensor, *args, **kwargs)

            setattr(self.dist, name, wrapped)
        self.mode = CommDebugMode()
        self.mode.__enter__()
        return self

    def __exit__(self, *exc):
        self.mode.__exit__(*exc)
        for name, fn in self._orig.items():
            setattr(self.dist, name, fn)

    def summary(self) -> dict:
        return {"total": self.mode.get_total_counts(), "ours": list(self.calls)}


def _build(method: str, strategy: str, head: bool):
    model = make_model(head)
    if strategy == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        model = DistributedDataParallel(model)
    elif strategy == "fsdp":
        model = _shard_fsdp(model)
    cls, kwargs = METHODS[method]
    return model, cls(model, lr=1e-2, **kwargs)


def _resume(model, opt, method: str, strategy: str, head: bool):
    """A fresh model and optimizer continuing from this rank's checkpoint: its weight shards, and its optimizer
    state saved per rank (``local_state``: plain tensors) and loaded back (``sharded_state``)."""
    import io

    buffer = io.BytesIO()
    torch.save(distributed.local_state(opt.state_dict()), buffer)
    new_model, new_opt = _build(method, strategy, head)
    with torch.no_grad():
        for old, new in zip(model.parameters(), new_model.parameters()):
            distributed.local(new).copy_(distributed.local(old))
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=False)
    new_opt.load_state_dict(distributed.sharded_state(saved, new_opt))
    opt.close()
    return new_model, new_opt


def run_case(
    method: str,
    strategy: str = "none",
    rank: int = 0,
    world: int = 1,
    head: bool = False,
    count: bool = False,
    resume_at: int | None = None,
) -> dict:
    """Train 5 steps; this rank sees rows ``[rank * b, (rank + 1) * b)`` of each global batch (b = 8 / world).
    ``resume_at=k``: after k steps continue in a fresh model and optimizer from a per-rank checkpoint."""
    from tests.optim.helpers import train_step

    model, opt = _build(method, strategy, head)
    b = BATCH // world
    norms, counts = [], []
    for step, (x, y) in enumerate(data()):
        if step == resume_at:
            model, opt = _resume(model, opt, method, strategy, head)
        mb = (x[rank * b : (rank + 1) * b], y[rank * b : (rank + 1) * b])
        if count:
            original_step = opt.step
            counter = Counter()

            def counted(*args, _step=original_step, _counter=counter, **kwargs):
                with _counter:
                    return _step(*args, **kwargs)

            opt.step = counted
            train_step(model, opt, [mb])
            opt.step = original_step
            counts.append(counter.summary())
        else:
            train_step(model, opt, [mb])
        norms.append(opt.stats_tensors.get("perturbation_norm", torch.tensor(float("nan"))).double().clone())
    return {"params": whole(model), "perturbation_norm": torch.stack(norms), "counts": counts}


CASES = [  # (name, method, strategy, head, count collectives)
    ("ddp-mgpo", "mgpo", "ddp", False, True),
    ("ddp-mgpo-factors", "mgpo-factors", "ddp", True, False),
    ("ddp-sam", "sam", "ddp", False, False),
    ("ddp-random", "random", "ddp", False, False),
    ("fsdp-mgpo", "mgpo", "fsdp", False, True),
    ("fsdp-mgpo-head", "mgpo", "fsdp", True, True),
    ("fsdp-mgpo-factors", "mgpo-factors", "fsdp", True, True),
    ("fsdp-mgpo-mu", "mgpo-mu", "fsdp", True, False),
    ("fsdp-mgpo-mu-resumed", "mgpo-mu", "fsdp", True, False),  # resumed after 3 steps: see main()
    ("fsdp-sam", "sam", "fsdp", False, False),
    ("fsdp-random", "random", "fsdp", False, False),
]
# 1/gbar stays below APN's cap of 10 on this model, so the default MGPO sees the reduced gbar (and the test fails
# without it), not only the direction norms
NEGATIVE = [
    ("noreduce-fsdp-mgpo", "mgpo", "fsdp", False, False),
    ("noreduce-fsdp-mgpo-factors", "mgpo-factors", "fsdp", True, False),
]


def refusals(rank: int, world: int) -> dict[str, str]:
    """Set-ups refused at construction: the message each gives."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor

    out = {}
    mesh = init_device_mesh("cpu", (world,))
    for name, placement in (("tensor-parallel", Shard(1)), ("replicated-dtensor", Replicate())):
        weight = nn.Parameter(distribute_tensor(torch.randn(4, 6, dtype=torch.float64), mesh, [placement]))
        try:
            mgpo.MGPO([weight], model=nn.Linear(6, 4), lr=1e-3)
            out[name] = "accepted"
        except ValueError as err:
            out[name] = str(err)
    model: Any = make_model()  # a PeftModel: its module tree is read by attribute
    from torch.distributed.fsdp import fully_shard

    for block in model.base_model.model.blocks:  # the root is left unsharded: mixed layouts
        fully_shard(block)
    extra = nn.Parameter(torch.zeros(3, dtype=torch.float64))
    try:
        mgpo.MGPO([p for p in model.parameters() if p.requires_grad] + [extra], model=model, lr=1e-3)
        out["mixed"] = "accepted"
    except ValueError as err:
        out["mixed"] = str(err)
    model = make_model()  # the optimizer built first, then the model sharded and its parameters swapped (as
    opt = mgpo.MGPO(model, lr=1e-3)  # accelerate does for an optimizer prepared together with an FSDP2 model)
    names = {id(p): n for n, p in model.named_parameters()}
    keys = [names[id(p)] for g in opt.param_groups for p in g["params"]]
    _shard_fsdp(model)
    sharded = dict(model.named_parameters())
    opt.param_groups[0]["params"] = [sharded[k] for k in keys]
    from tests.optim.helpers import train_step

    try:
        train_step(model, opt, [(data()[0][0][:4], data()[0][1][:4])])
        out["built-before-sharding"] = "accepted"
    except RuntimeError as err:
        out["built-before-sharding"] = str(err)
    try:
        mgpo.GGPO(_shard_fsdp(make_model()), lr=1e-3)
        out["ggpo-fsdp"] = "accepted"
    except ValueError as err:
        out["ggpo-fsdp"] = str(err)
    return out


def main(out_file: str) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    results: dict[str, Any] = {}
    with warnings.catch_warnings(record=True) as caught:  # what mgpo's own calls make torch warn about
        warnings.simplefilter("always")
        for name, method, strategy, head, count in CASES + NEGATIVE:
            distributed.REDUCE = not name.startswith("noreduce")
            resume_at = 3 if name.endswith("-resumed") else None
            results[name] = run_case(method, strategy, rank, world, head, count, resume_at)
    # every deprecation warning raised while the optimizers ran (torch attributes its own to its wrappers, so
    # they are not filtered by file): none is expected
    results["mgpo_warnings"] = sorted(
        {
            f"{w.category.__name__}: {w.message}"
            for w in caught
            if issubclass(w.category, (FutureWarning, DeprecationWarning))
        }
    )
    distributed.REDUCE = True
    results["refusals"] = refusals(rank, world)
    gathered = [None] * world
    dist.all_gather_object(gathered, results)
    if rank == 0:
        torch.save({"world": world, "ranks": gathered}, out_file)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parents[2]))  # for tests.optim.helpers
    main(sys.argv[1])
