"""Short training runs of every method configuration of the contract, reduced to exact hashes.

The fixtures under tests/optim/data/ were written by ``python -m tests.optim.trajectories`` on the code before the
optimizers were refactored (issue 32); tests/optim/test_trajectories.py recomputes them with the current code and
requires identical bytes: the refactor changed no bit of any trajectory, statistic or saved state. The optimizer
hashes were rewritten once since (2026-12-07, ``--optimizer-only``: ``exact_restore`` joined the saved
hyper-parameters), with every model and statistics hash checked unchanged; the saved states are the old code's.
"""

from __future__ import annotations

import hashlib
import io
import json
from pathlib import Path

import torch
from torch import nn

import mgpo
from mgpo.optim._base import PerturbedOptimizer
from tests.optim.helpers import Net, batches, loss_fn, make_model

DATA = Path(__file__).parent / "data"
HASHES = DATA / "trajectories.json"
STATES = DATA / "state_dicts.pt"
STEPS, SAVE_AT = 5, 3

# name -> (class, keywords, how it is trained: accum (micro-batches per step), clip, record (record_gradients()
# before clipping / after every backward), model ("lora", "dora", "full"), base)
CONFIGS: dict[str, tuple] = {
    "mgpo": (mgpo.MGPO, dict(rho=0.05), {}),
    "mgpo-off": (mgpo.MGPO, dict(rho=0.05, apn="off"), {}),
    "mgpo-normalized": (mgpo.MGPO, dict(rho=0.05, apn="normalized"), {}),
    "mgpo-weight": (mgpo.MGPO, dict(rho=0.05, apn="weight"), {}),
    "mgpo-update": (mgpo.MGPO, dict(rho=0.5, apn="update"), {}),
    "mgpo-global": (mgpo.MGPO, dict(rho=0.05, norm="global"), {}),
    "mgpo-global-normalized": (mgpo.MGPO, dict(rho=0.05, norm="global", apn="normalized"), {}),
    "mgpo-uncapped": (mgpo.MGPO, dict(rho=0.05, max_scale=None), {}),
    "mgpo-lowcap": (mgpo.MGPO, dict(rho=0.05, max_scale=0.5, diagnostics=True), {}),
    "mgpo-mu": (mgpo.MGPO, dict(rho=0.05, momentum=0.9), {}),
    "mgpo-head": (mgpo.MGPO, dict(rho=0.05, perturb_non_lora=True), {}),
    "mgpo-diagnostics": (mgpo.MGPO, dict(rho=0.05, diagnostics=True), {}),
    "mgpo-diagnostics-factors": (mgpo.MGPO, dict(rho=0.05, diagnostics=True, space="factors"), {}),
    "mgpo-accum": (mgpo.MGPO, dict(rho=0.05), dict(accum=2)),
    "mgpo-clip": (mgpo.MGPO, dict(rho=0.05), dict(clip=0.5, record=True)),
    "mgpo-clip-unrecorded": (mgpo.MGPO, dict(rho=0.05), dict(clip=0.5)),
    "mgpo-micro": (mgpo.MGPO, dict(rho=0.05, gbar_update="micro_batch"), dict(accum=2, record=True)),
    "mgpo-micro-update": (
        mgpo.MGPO,
        dict(rho=0.5, apn="update", gbar_update="micro_batch"),
        dict(accum=2, record=True),
    ),
    "mgpo-sgd": (mgpo.MGPO, dict(rho=0.05, base_kwargs={"momentum": 0.9}), dict(base=torch.optim.SGD)),
    "mgpo-dora": (mgpo.MGPO, dict(rho=0.05, diagnostics=True), dict(model="dora")),
    "mgpo-full": (mgpo.MGPO, dict(rho=0.05, diagnostics=True), dict(model="full")),
    "mgpo-full-exact": (mgpo.MGPO, dict(rho=0.05, exact_restore=True, apn="update"), dict(model="full")),
    "mgpo-factors": (mgpo.MGPO, dict(rho=0.05, space="factors"), {}),
    "mgpo-factors-off": (mgpo.MGPO, dict(rho=0.05, space="factors", apn="off"), {}),
    "mgpo-factors-normalized": (mgpo.MGPO, dict(rho=0.05, space="factors", apn="normalized"), {}),
    "mgpo-factors-global": (mgpo.MGPO, dict(rho=0.05, space="factors", norm="global"), {}),
    "mgpo-factors-weight": (mgpo.MGPO, dict(rho=0.05, space="factors", apn="weight"), {}),
    "mgpo-factors-subtract": (mgpo.MGPO, dict(rho=0.05, space="factors", exact_restore=False), {}),
    "msam": (mgpo.MSAM, dict(rho=0.05), {}),
    "msam-accum": (mgpo.MSAM, dict(rho=0.05), dict(accum=2, clip=0.5)),
    "sam": (mgpo.SAM, dict(rho=0.05), {}),
    "asam": (mgpo.SAM, dict(rho=0.5, adaptive=True), {}),
    "random": (mgpo.RandomPerturbation, dict(rho=0.05, total_steps=8), {}),
    "random-accum": (mgpo.RandomPerturbation, dict(rho=0.05), dict(accum=2)),
    "ggpo": (mgpo.GGPO, dict(), {}),
    "ggpo-full": (mgpo.GGPO, dict(), dict(model="full")),
}
# the configurations whose state_dict() after SAVE_AT steps is kept (float32): every APN rule and every method
SAVED = (
    "mgpo",
    "mgpo-off",
    "mgpo-normalized",
    "mgpo-weight",
    "mgpo-update",
    "mgpo-micro-update",
    "mgpo-diagnostics",
    "mgpo-mu",
    "mgpo-factors",
    "msam",
    "sam",
    "asam",
    "random",
    "ggpo",
)
DTYPES = {"float32": torch.float32, "float64": torch.float64}


def build_model(kind: str, dtype: torch.dtype) -> nn.Module:
    if kind == "full":
        torch.manual_seed(0)
        model: nn.Module = Net()
    elif kind == "dora":
        import peft

        torch.manual_seed(0)
        config = peft.LoraConfig(
            r=4, lora_alpha=8, target_modules=["fc1", "fc2"], init_lora_weights="gaussian", use_dora=True
        )
        model = peft.get_peft_model(Net(), config)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "lora_B" in name:
                    p.normal_(0, 0.1)
    else:
        model = make_model()
    return model.to(dtype)


def build(name: str, dtype: torch.dtype) -> tuple[nn.Module, PerturbedOptimizer, dict]:
    cls, kwargs, how = CONFIGS[name]
    model = build_model(how.get("model", "lora"), dtype)
    opt = cls(model, how.get("base", torch.optim.AdamW), lr=1e-2, **kwargs)
    return model, opt, how


def train(model: nn.Module, opt: PerturbedOptimizer, how: dict, steps: range, dtype: torch.dtype) -> list:
    """Train ``steps`` (indices into one fixed stream of batches); returns each step's statistics."""
    accum, clip, record = how.get("accum", 1), how.get("clip"), how.get("record", False)
    data = [(x.to(dtype), y) for x, y in batches(STEPS * accum, seed=3)]
    micro = getattr(opt, "hparams", {}).get("gbar_update") == "micro_batch"
    stats = []
    model.train()
    for s in steps:
        group = data[s * accum : (s + 1) * accum]

        def backward(group=group) -> None:
            for mb in group:
                (loss_fn(model, mb) / accum).backward()
                if record and micro:
                    assert isinstance(opt, mgpo.MGPO)  # recording is MGPO's
                    opt.record_gradients()
            if record and not micro:
                assert isinstance(opt, mgpo.MGPO)
                opt.record_gradients()
            if clip is not None:
                torch.nn.utils.clip_grad_norm_(model.parameters(), clip)

        backward()
        opt.step(backward) if isinstance(opt, mgpo.SAM) else opt.step()
        opt.zero_grad()
        stats.append({k: v.clone() for k, v in opt.stats_tensors.items()})
    return stats


def _tensors(obj, prefix: str = "") -> list[tuple[str, torch.Tensor]]:
    """Every tensor inside ``obj`` (dicts, lists, tuples), with a path, in a fixed order."""
    if torch.is_tensor(obj):
        return [(prefix, obj)]
    if isinstance(obj, dict):
        return [t for k in sorted(obj, key=str) for t in _tensors(obj[k], f"{prefix}/{k}")]
    if isinstance(obj, (list, tuple)):
        return [t for i, v in enumerate(obj) for t in _tensors(v, f"{prefix}/{i}")]
    return []


def digest(obj) -> str:
    """sha256 of the bytes, dtypes and shapes of every tensor in ``obj``, and of the other values' repr."""
    h = hashlib.sha256()
    for path, t in _tensors(obj):
        t = t.detach().cpu().contiguous()
        h.update(f"{path}:{t.dtype}:{tuple(t.shape)}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    h.update(repr(_plain(obj)).encode())
    return h.hexdigest()


def _plain(obj):
    if torch.is_tensor(obj):
        return "T"
    if isinstance(obj, dict):
        return sorted(((str(k), _plain(v)) for k, v in obj.items()))
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    return repr(obj)


def fingerprint(model: nn.Module, opt: torch.optim.Optimizer, stats: list) -> dict[str, str]:
    """The run's end state: the model's tensors, the base optimizer's state and the method's, the statistics."""
    return {"model": digest(dict(model.state_dict())), "optimizer": digest(opt.state_dict()), "stats": digest(stats)}


def run(name: str, dtype: torch.dtype) -> dict[str, str]:
    model, opt, how = build(name, dtype)
    stats = train(model, opt, how, range(STEPS), dtype)
    return fingerprint(model, opt, stats)


def resumed(name: str, saved: dict) -> dict[str, str]:
    """Load a state saved after SAVE_AT steps into a fresh model and optimizer and train the remaining steps."""
    model, opt, how = build(name, torch.float32)
    model.load_state_dict(saved["model"])
    opt.load_state_dict(saved["optimizer"])
    stats = train(model, opt, how, range(SAVE_AT, STEPS), torch.float32)
    return fingerprint(model, opt, stats)


def main() -> None:
    DATA.mkdir(exist_ok=True)
    hashes = {f"{name}/{d}": run(name, dtype) for name in CONFIGS for d, dtype in DTYPES.items()}
    states = {}
    for name in SAVED:
        model, opt, how = build(name, torch.float32)
        train(model, opt, how, range(SAVE_AT), torch.float32)
        states[name] = {"model": model.state_dict(), "optimizer": opt.state_dict()}
    buffer = io.BytesIO()
    torch.save(states, buffer)  # before resuming: loading may share tensors with the dict, training changes them
    STATES.write_bytes(buffer.getvalue())
    saved = torch.load(STATES, weights_only=True)
    for name in SAVED:
        hashes[f"resumed/{name}"] = resumed(name, saved[name])
    HASHES.write_text(json.dumps(hashes, indent=1, sort_keys=True) + "\n")
    print(f"{len(hashes)} trajectories, {len(states)} state dicts ({len(buffer.getvalue()) // 1024} KiB)")


def refresh_optimizer_hashes() -> None:
    """Rewrite only the optimizer-state hashes, from the saved states as they are, after a change that adds to what
    a state dict holds (a new saved hyper-parameter) and nothing else: every model and statistics hash must come out
    as before, or nothing is written. ``python -m tests.optim.trajectories --optimizer-only``."""
    hashes = json.loads(HASHES.read_text())
    saved = torch.load(STATES, weights_only=True)
    new = {f"{name}/{d}": run(name, dtype) for name in CONFIGS for d, dtype in DTYPES.items()}
    new.update({f"resumed/{name}": resumed(name, saved[name]) for name in SAVED})
    moved = [k for k in hashes if (new[k]["model"], new[k]["stats"]) != (hashes[k]["model"], hashes[k]["stats"])]
    if moved or set(new) != set(hashes):
        raise SystemExit(f"not written: a trajectory moved ({', '.join(moved) or 'the set of runs changed'})")
    changed = sum(new[k]["optimizer"] != hashes[k]["optimizer"] for k in hashes)
    HASHES.write_text(json.dumps(new, indent=1, sort_keys=True) + "\n")
    print(f"{changed} of {len(hashes)} optimizer hashes rewritten; every model and statistics hash as before")


if __name__ == "__main__":
    import sys

    refresh_optimizer_hashes() if "--optimizer-only" in sys.argv[1:] else main()
