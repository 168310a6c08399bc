"""Overhead of the perturbation optimizers against plain AdamW.

Three measurements, all printed as markdown tables (``--out FILE`` writes them too):

1. Whole training step (forward, backward, ``step()``, ``zero_grad()``) of a small randomly initialised Llama
   with PEFT LoRA, for AdamW, MGPO (weight space, the default), the authors' dense MGPO, MSAM, Momentum-SAM's
   fused AdamW update, SAM, RandomPerturbation and GGPO (the peers are in benchmarks/peers.py), at two LoRA
   ranks, and AdamW / MGPO / dense MGPO on a wider model (hidden 2048), the low-rank term's worst case. The methods are
   timed round-robin (one step of each per round, the order rotated every round) so that slow drifts of the
   machine hit every method alike; warm-up rounds are dropped.
2. Peak memory of one training step, each method alone in memory. CUDA: ``torch.cuda.max_memory_allocated``.
   CPU: live tensor bytes at the start of the step plus the highest point of the allocator's running balance
   during the step, read from torch's profiler (see benchmarks/README.md for why).
3. The optimizer alone on ~10M LoRA parameters with gradients pre-filled: ``step()`` for AdamW and the fused
   Momentum-SAM, and ``perturb(); step()`` for MGPO, dense MGPO and MSAM (applying the perturbation is part of
   their cost).

Every AdamW (the baseline and the one inside each method) uses the same implementation (``--foreach``, on by
default: the vectorised one, which the fused Momentum-SAM peer uses too).

Run ``python benchmarks/overhead.py --help`` for the options; ``--quick`` is a one-minute smoke run.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import os
import platform
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import torch

import mgpo

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from peers import DenseMGPO, FusedMSAM  # noqa: E402

METHODS = ("AdamW", "MGPO", "MGPO-dense", "MSAM", "MSAM-fused", "SAM", "RandomPerturbation", "GGPO")
WIDE_METHODS = ("AdamW", "MGPO", "MGPO-dense")
OPTIMIZER_ONLY = ("AdamW", "MGPO", "MGPO-dense", "MSAM", "MSAM-fused")
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
MIB = 2**20


@dataclass
class Settings:
    """What the benchmark runs; every field is a command-line option of the same name."""

    device: str = "cpu"  # "cpu" or "cuda"
    ranks: tuple[int, ...] = (8, 128)  # LoRA ranks of the whole-step benchmark
    hidden: int = 512  # hidden size of the Llama
    intermediate: int = 1376  # MLP size of the Llama
    layers: int = 4  # decoder layers of the whole-step model
    heads: int = 8  # attention heads
    vocab: int = 2048  # vocabulary size
    batch: int = 2  # sequences per batch
    seq_len: int = 64  # tokens per sequence
    warmup: int = 5  # round-robin rounds dropped before timing
    rounds: int = 80  # timed round-robin rounds (one step of every method each)
    memory_steps: int = 2  # measured steps per method for peak memory (after `warmup` unmeasured ones)
    opt_layers: int = 8  # decoder layers of the optimizer-only model (LoRA on all 7 projections)
    opt_rank: int = 128  # LoRA rank of the optimizer-only model
    opt_warmup: int = 3  # optimizer-only rounds dropped
    opt_rounds: int = 40  # optimizer-only timed rounds
    bootstrap: int = 2000  # bootstrap resamples for the ratio's 95% interval
    wide_hidden: int = 2048  # the wide shape: where the low-rank term costs the most
    wide_intermediate: int = 5504
    wide_layers: int = 2
    wide_rank: int = 64
    wide_rounds: int = 20
    seed: int = 0
    lr: float = 1e-4
    rho: float = 0.05
    foreach: bool = True  # the vectorised AdamW everywhere (baseline, inside every method, and the fused peer)


QUICK = dict(warmup=2, rounds=8, memory_steps=1, opt_warmup=1, opt_rounds=5, bootstrap=500, wide_rounds=3)


# --------------------------------------------------------------------------------------------- building blocks
def build_model(s: Settings, rank: int, layers: int) -> torch.nn.Module:
    """A randomly initialised LlamaForCausalLM with LoRA on every projection; same weights for the same seed."""
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=s.vocab,
        hidden_size=s.hidden,
        intermediate_size=s.intermediate,
        num_hidden_layers=layers,
        num_attention_heads=s.heads,
        num_key_value_heads=s.heads,
        max_position_embeddings=max(128, s.seq_len),
        attention_dropout=0.0,
    )
    torch.manual_seed(s.seed)
    base = LlamaForCausalLM(config)
    lora = LoraConfig(r=rank, lora_alpha=2 * rank, lora_dropout=0.0, target_modules=LORA_TARGETS)
    model = get_peft_model(base, lora).to(s.device)
    model.train()
    return model


def build_optimizer(name: str, model: torch.nn.Module, s: Settings, total_steps: int) -> torch.optim.Optimizer:
    adamw = dict(lr=s.lr, foreach=s.foreach)
    trainable = [p for p in model.parameters() if p.requires_grad]
    if name == "AdamW":
        return torch.optim.AdamW(trainable, **adamw)
    if name == "MGPO":
        return mgpo.MGPO(model, torch.optim.AdamW, rho=s.rho, **adamw)
    if name == "MGPO-dense":
        return DenseMGPO(model, rho=s.rho, **adamw)
    if name == "MSAM":
        return mgpo.MSAM(model, torch.optim.AdamW, rho=s.rho, **adamw)
    if name == "MSAM-fused":
        return FusedMSAM(trainable, lr=s.lr, rho=s.rho)
    if name == "SAM":
        return mgpo.SAM(model, torch.optim.AdamW, rho=s.rho, **adamw)
    if name == "RandomPerturbation":
        return mgpo.RandomPerturbation(model, rho=s.rho, total_steps=total_steps, **adamw)
    if name == "GGPO":
        return mgpo.GGPO(model, **adamw)
    raise ValueError(f"method={name!r} is unknown: choose one of {', '.join(METHODS)}.")


def make_batch(s: Settings) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(s.seed + 1)
    ids = torch.randint(0, s.vocab, (s.batch, s.seq_len), generator=gen).to(s.device)
    return {"input_ids": ids, "labels": ids}


def make_step(name: str, model: torch.nn.Module, opt: torch.optim.Optimizer, batch: dict) -> Callable[[], None]:
    """One whole training step of the method, as a user would write it."""
    if name == "SAM":

        def closure():
            model(**batch).loss.backward()

        def sam_step():
            model(**batch).loss.backward()
            opt.step(closure)
            opt.zero_grad()

        return sam_step

    def step():
        model(**batch).loss.backward()
        opt.step()
        opt.zero_grad()

    return step


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


# --------------------------------------------------------------------------------------------- statistics
def median(x: torch.Tensor) -> float:
    return float(torch.quantile(x.double(), 0.5))


def ratio_interval(times: torch.Tensor, reference: torch.Tensor, s: Settings) -> tuple[float, float]:
    """95% bootstrap interval of median(times) / median(reference), resampling whole rounds (paired)."""
    gen = torch.Generator().manual_seed(s.seed)
    idx = torch.randint(0, len(times), (s.bootstrap, len(times)), generator=gen)
    ratios = times.double()[idx].quantile(0.5, dim=1) / reference.double()[idx].quantile(0.5, dim=1)
    low, high = torch.quantile(ratios, torch.tensor([0.025, 0.975], dtype=torch.float64)).tolist()
    return low, high


def iqr(x: torch.Tensor) -> tuple[float, float]:
    low, high = torch.quantile(x.double(), torch.tensor([0.25, 0.75], dtype=torch.float64)).tolist()
    return low, high


# --------------------------------------------------------------------------------------------- timing
def round_robin(steps: dict[str, Callable[[], None]], warmup: int, rounds: int, device: str) -> dict[str, torch.Tensor]:
    """Seconds per call of every step, one call of each per round, order rotated each round; warm-up dropped."""
    names = list(steps)
    times: dict[str, list[float]] = {n: [] for n in names}
    for r in range(warmup + rounds):
        shift = r % len(names)
        for name in names[shift:] + names[:shift]:
            sync(device)
            start = time.perf_counter()
            steps[name]()
            sync(device)
            if r >= warmup:
                times[name].append(time.perf_counter() - start)
    return {n: torch.tensor(t) for n, t in times.items()}


def time_whole_step(s: Settings, rank: int, methods=METHODS) -> dict[str, torch.Tensor]:
    batch = make_batch(s)
    total = s.warmup + s.rounds
    steps = {}
    for name in methods:
        model = build_model(s, rank, s.layers)
        steps[name] = make_step(name, model, build_optimizer(name, model, s, total), batch)
    return round_robin(steps, s.warmup, s.rounds, s.device)


def term_share(s: Settings, rank: int) -> float:
    """Share of the LoRA layers' matrix-product FLOPs (forward + backward, per token) that the weight-space term
    adds: base ``2 in out`` (forward, input gradient), LoRA ``3 r (in + out)``, term ``4 r (in + out)``."""
    shapes = [(s.hidden, s.hidden)] * 4 + [(s.hidden, s.intermediate)] * 2 + [(s.intermediate, s.hidden)]
    term = sum(4 * rank * (i + o) for i, o in shapes)
    rest = sum(2 * i * o + 3 * rank * (i + o) for i, o in shapes)
    return term / (rest + term)


# --------------------------------------------------------------------------------------------- memory
def live_tensor_bytes() -> int:
    """Bytes of every distinct tensor storage reachable from Python (parameters, optimizer state, batch...)."""
    seen: dict[int, int] = {}
    with warnings.catch_warnings():  # isinstance() on some deprecated module objects warns
        warnings.simplefilter("ignore")
        objects = [obj for obj in gc.get_objects() if isinstance(obj, torch.Tensor)]
    for obj in objects:
        if obj.device.type == "cpu" and not obj.is_meta:
            try:
                storage = obj.untyped_storage()
            except (RuntimeError, NotImplementedError):  # sparse or otherwise storage-less tensors
                continue
            seen[storage.data_ptr()] = storage.nbytes()
    return sum(seen.values())


def cpu_step_peak(step: Callable[[], None]) -> int:
    """Peak live tensor bytes during one step on CPU.

    The CPU allocator has no high-water mark like CUDA's, so the profiler records every allocation and free
    (``profile_memory=True``); the peak of their running sum, added to the bytes alive when the step starts,
    is the step's peak.
    """
    from torch.profiler import ProfilerActivity, profile

    gc.collect()
    before = live_tensor_bytes()
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step()
    events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]" and e.device_type().name == "CPU"]
    balance = peak = 0
    for e in sorted(events, key=lambda e: e.start_ns()):
        balance += e.nbytes()
        peak = max(peak, balance)
    return before + peak


def peak_memory(s: Settings, rank: int, methods=METHODS) -> dict[str, int]:
    """Peak bytes of one training step for every method, each built and measured alone."""
    peaks = {}
    for name in methods:
        gc.collect()
        if s.device.startswith("cuda"):
            torch.cuda.empty_cache()
        model = build_model(s, rank, s.layers)
        opt = build_optimizer(name, model, s, s.warmup + s.memory_steps)
        step = make_step(name, model, opt, make_batch(s))
        for _ in range(s.warmup):
            step()
        best = 0
        for _ in range(s.memory_steps):
            if s.device.startswith("cuda"):
                sync(s.device)
                torch.cuda.reset_peak_memory_stats()
                step()
                sync(s.device)
                best = max(best, torch.cuda.max_memory_allocated())
            else:
                best = max(best, cpu_step_peak(step))
        peaks[name] = best
        del model, opt, step
    return peaks


# --------------------------------------------------------------------------------------------- optimizer only
def time_optimizer_only(s: Settings) -> tuple[dict[str, torch.Tensor], int]:
    """``step()`` (AdamW) or ``perturb(); step()`` (MGPO, MSAM) with fixed pre-filled gradients."""
    steps = {}
    n_params = 0
    for name in OPTIMIZER_ONLY:
        model = build_model(s, s.opt_rank, s.opt_layers)
        params = [p for p in model.parameters() if p.requires_grad]
        n_params = sum(p.numel() for p in params)
        gen = torch.Generator().manual_seed(s.seed + 2)
        for p in params:
            p.grad = (torch.randn(p.shape, generator=gen) * 1e-3).to(s.device)
        opt = build_optimizer(name, model, s, s.opt_warmup + s.opt_rounds)
        if name in ("AdamW", "MSAM-fused"):
            steps[name] = opt.step
        else:

            def perturb_and_step(opt=opt):
                opt.perturb()
                opt.step()

            steps[name] = perturb_and_step
    return round_robin(steps, s.opt_warmup, s.opt_rounds, s.device), n_params


# --------------------------------------------------------------------------------------------- report
def fmt_interval(low: float, high: float) -> str:
    return f"{low:.3f}–{high:.3f}"


def timing_rows(times: dict[str, torch.Tensor], s: Settings) -> tuple[list[str], dict[str, float]]:
    ref = times["AdamW"]
    ratios = {}
    rows = []
    for name, t in times.items():
        ratio = median(t) / median(ref)
        ratios[name] = ratio
        q1, q3 = iqr(t)
        spread = "—" if name == "AdamW" else fmt_interval(*ratio_interval(t, ref, s))
        rows.append(f"| {name} | {median(t) * 1e3:.1f} | {q1 * 1e3:.1f}–{q3 * 1e3:.1f} | {ratio:.3f} | {spread} |")
    return rows, ratios


def lora_param_count(s: Settings, rank: int, layers: int) -> int:
    per_layer = 4 * rank * 2 * s.hidden + 3 * rank * (s.hidden + s.intermediate)
    return per_layer * layers


def load() -> str:
    try:
        return "/".join(f"{x:.1f}" for x in os.getloadavg())
    except OSError:
        return "n/a"


def run(s: Settings) -> str:
    started = time.perf_counter()
    load_before = load()
    lines = [
        "## Setup",
        "",
        f"- device: {s.device} ({device_name(s.device)}), torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads, Python {platform.python_version()}",
        f"- model: random LlamaForCausalLM, hidden {s.hidden}, MLP {s.intermediate}, {s.layers} layers, "
        f"{s.heads} heads, vocab {s.vocab}; LoRA on {', '.join(LORA_TARGETS)}; batch {s.batch} x {s.seq_len} tokens",
        f"- optimizers: lr {s.lr}, rho {s.rho}; MGPO with its defaults (space='weight', apn='inverse', "
        f"norm='layer'); MGPO-dense and MSAM-fused from benchmarks/peers.py; GGPO defaults; AdamW "
        f"foreach={s.foreach} everywhere",
        f"- timing: {s.warmup} warm-up + {s.rounds} timed round-robin rounds; ratio = median(method) / "
        f"median(AdamW), 95% interval by paired bootstrap over rounds ({s.bootstrap} resamples)",
        "",
    ]
    summary = {}
    for rank in s.ranks:
        print(f"[overhead] whole step, rank {rank} ...", file=sys.stderr, flush=True)
        times = time_whole_step(s, rank)
        print(f"[overhead] peak memory, rank {rank} ...", file=sys.stderr, flush=True)
        peaks = peak_memory(s, rank)
        rows, ratios = timing_rows(times, s)
        mem_ratio = {n: peaks[n] / peaks["AdamW"] for n in METHODS}
        summary[rank] = (ratios, mem_ratio, times)
        lines += [
            f"## Whole training step, LoRA rank {rank} ({lora_param_count(s, rank, s.layers) / 1e6:.2f}M LoRA params)",
            "",
            f"The weight-space term adds {term_share(s, rank):.1%} to the LoRA layers' matrix-product FLOPs.",
            "",
            "| method | median ms/step | IQR ms | ratio to AdamW | 95% interval | peak MiB | memory ratio |",
            "|---|---:|---:|---:|---:|---:|---:|",
        ]
        for row, name in zip(rows, METHODS):
            lines.append(f"{row} {peaks[name] / MIB:.1f} | {mem_ratio[name]:.4f} |")
        lines.append("")

    ws = dataclasses.replace(s, hidden=s.wide_hidden, intermediate=s.wide_intermediate, layers=s.wide_layers,
                             rounds=s.wide_rounds, warmup=min(s.warmup, 2))
    print(f"[overhead] whole step, wide shape (hidden {ws.hidden}), rank {s.wide_rank} ...", file=sys.stderr, flush=True)
    wide_times = time_whole_step(ws, s.wide_rank, WIDE_METHODS)
    wide_rows, wide_ratios = timing_rows(wide_times, ws)
    lines += [
        f"## Whole training step, wide shape: hidden {ws.hidden}, MLP {ws.intermediate}, {ws.layers} layers, "
        f"LoRA rank {s.wide_rank}",
        "",
        f"{ws.warmup} warm-up + {ws.rounds} timed rounds. The weight-space term adds "
        f"{term_share(ws, s.wide_rank):.1%} to the LoRA layers' matrix-product FLOPs "
        "(base 2·in·out, LoRA 3r(in+out), term 4r(in+out) per token, forward and backward).",
        "",
        "| method | median ms/step | IQR ms | ratio to AdamW | 95% interval |",
        "|---|---:|---:|---:|---:|",
        *wide_rows,
        "",
    ]

    print("[overhead] optimizer only ...", file=sys.stderr, flush=True)
    opt_times, n_params = time_optimizer_only(s)
    rows, opt_ratios = timing_rows(opt_times, s)
    lines += [
        f"## Optimizer alone, {n_params / 1e6:.2f}M LoRA parameters (rank {s.opt_rank}, {s.opt_layers} layers)",
        "",
        "AdamW: `step()`; MGPO / MSAM: `perturb(); step()` (restore, EMA, base step, next perturbation). "
        f"{s.opt_warmup} warm-up + {s.opt_rounds} timed rounds.",
        "",
        "| method | median ms | IQR ms | ratio to AdamW | 95% interval |",
        "|---|---:|---:|---:|---:|",
        *rows,
        "",
    ]

    lines += ["## Targets", "", "| target | measured | met |", "|---|---:|:---:|"]
    if 8 in summary:
        got = summary[8][0]["MGPO"]
        lines.append(f"| whole step MGPO/AdamW <= 1.05 at rank 8 | {got:.3f} | {yes(got <= 1.05)} |")
    for rank, (ratios, _, _) in summary.items():
        got = ratios["MGPO"] / ratios["MGPO-dense"]
        lines.append(f"| MGPO <= 0.6 x dense MGPO at rank {rank} | {got:.3f} | {yes(got <= 0.6)} |")
    got = wide_ratios["MGPO"] / wide_ratios["MGPO-dense"]
    lines.append(f"| MGPO <= 0.6 x dense MGPO, wide shape rank {s.wide_rank} | {got:.3f} | {yes(got <= 0.6)} |")
    got = wide_ratios["MGPO"]
    lines.append(f"| whole step MGPO/AdamW <= 1.10, wide shape rank {s.wide_rank} | {got:.3f} | {yes(got <= 1.10)} |")
    for rank, (_, mem, _) in summary.items():
        lines.append(f"| peak memory MGPO/AdamW <= 1.01 at rank {rank} | {mem['MGPO']:.4f} | {yes(mem['MGPO'] <= 1.01)} |")
    for rank, (ratios, _, times) in summary.items():
        got = median(times["MSAM"]) / median(times["MSAM-fused"])
        low, high = ratio_interval(times["MSAM"], times["MSAM-fused"], s)
        lines.append(f"| MSAM / fused Momentum-SAM <= 1.00 (within the interval) at rank {rank} | {got:.3f} "
                     f"({fmt_interval(low, high)}) | {yes(low <= 1.0)} |")
    if 8 in summary:
        for name in ("RandomPerturbation", "GGPO"):
            got = summary[8][0][name]
            lines.append(f"| {name}/AdamW <= 1.5 at rank 8 | {got:.3f} | {yes(got <= 1.5)} |")
    for rank, (ratios, _, _) in summary.items():
        got = ratios["SAM"]
        lines.append(f"| SAM/AdamW near 2.0 (1.8–2.2) at rank {rank} | {got:.3f} | {yes(1.8 <= got <= 2.2)} |")
    lines += [
        "",
        f"Total benchmark time: {time.perf_counter() - started:.0f} s. Load average (1/5/15 min) at start "
        f"{load_before}, at end {load()}, on {os.cpu_count()} CPUs.",
        "",
    ]
    return "\n".join(lines)


def yes(ok: bool) -> str:
    return "yes" if ok else "**no**"


def device_name(device: str) -> str:
    if device.startswith("cuda"):
        return torch.cuda.get_device_name(torch.device(device))
    return platform.processor() or platform.machine()


# --------------------------------------------------------------------------------------------- CLI
def parse_args(argv: list[str] | None = None) -> tuple[Settings, str | None]:
    defaults = Settings()
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--device", default=defaults.device, help="cpu or cuda (cuda:N)")
    parser.add_argument("--ranks", type=int, nargs="+", default=list(defaults.ranks), help="LoRA ranks of the whole-step benchmark")
    parser.add_argument("--quick", action="store_true", help=f"smoke run (about a minute): {QUICK}")
    parser.add_argument("--out", default=None, help="also write the markdown report to this file")
    parser.add_argument("--no-foreach", action="store_true", help="use torch's default AdamW implementation")
    for name in ("hidden", "intermediate", "layers", "heads", "vocab", "batch", "seq_len", "warmup", "rounds",
                 "memory_steps", "opt_layers", "opt_rank", "opt_warmup", "opt_rounds", "bootstrap", "seed",
                 "wide_hidden", "wide_intermediate", "wide_layers", "wide_rank", "wide_rounds"):
        parser.add_argument(f"--{name.replace('_', '-')}", type=int, default=None,
                            help=f"default {getattr(defaults, name)} ({QUICK.get(name, getattr(defaults, name))} with --quick)")
    parser.add_argument("--lr", type=float, default=defaults.lr)
    parser.add_argument("--rho", type=float, default=defaults.rho)
    args = parser.parse_args(argv)

    values = dict(device=args.device, ranks=tuple(args.ranks), lr=args.lr, rho=args.rho, foreach=not args.no_foreach)
    if args.quick:
        values.update(QUICK)
    for name in Settings.__dataclass_fields__:
        given = getattr(args, name, None)
        if name not in ("device", "ranks", "lr", "rho", "foreach") and given is not None:
            values[name] = given
    s = Settings(**values)
    check(s)
    return s, args.out


def check(s: Settings) -> None:
    if s.device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit(f"--device {s.device}: no CUDA device is visible to torch {torch.__version__}; use --device cpu.")
    if not (s.device == "cpu" or s.device.startswith("cuda")):
        raise SystemExit(f"--device {s.device!r} is not supported: use cpu or cuda.")
    for name in ("hidden", "intermediate", "layers", "heads", "vocab", "batch", "seq_len", "rounds",
                 "memory_steps", "opt_layers", "opt_rank", "opt_rounds", "bootstrap"):
        if getattr(s, name) < 1:
            raise SystemExit(f"--{name.replace('_', '-')} {getattr(s, name)} is invalid: use a positive integer.")
    if s.warmup < 0 or s.opt_warmup < 0:
        raise SystemExit("--warmup/--opt-warmup must be >= 0.")
    if any(r < 1 for r in s.ranks):
        raise SystemExit(f"--ranks {list(s.ranks)} is invalid: every rank must be a positive integer.")
    if s.hidden % s.heads:
        raise SystemExit(f"--hidden {s.hidden} is not divisible by --heads {s.heads}: pick sizes that divide.")


def main(argv: list[str] | None = None) -> None:
    s, out = parse_args(argv)
    warnings.filterwarnings("ignore", category=FutureWarning)  # transformers/peft deprecation notices
    report = run(s)
    print(report)
    if out:
        with open(out, "w") as f:
            f.write(report)


if __name__ == "__main__":
    main()
