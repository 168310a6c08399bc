"""The GPU check behind ``bash scripts/gpu-check.sh``: on one CUDA GPU, run the CUDA-only tests
(tests/gpu/test_cuda.py) and the 1B-class benchmark (``benchmarks/overhead.py --device cuda --shape 1b``), and
write one markdown report: the GPU, driver and library versions, each test's result, the benchmark tables.

Installs nothing (set up with ``bash scripts/install.sh --test`` first, as the README says). Without a GPU it
says so and exits 0 without writing anything. ``--dry-run`` counts the work and estimates its time instead.
"""

from __future__ import annotations

import argparse
import datetime
import os
import re
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TESTS = "tests/gpu/test_cuda.py"
BENCH_ARGS = ["--shape", "1b", "--warmup", "2", "--memory-steps", "1"]
BENCH_DEVICE = "cuda"
LIMIT_S = 480  # the whole check must fit in 8 minutes on one H100-class GPU
# Seconds per unit of work for --dry-run, on one H100-class GPU. Deliberately pessimistic: a 1B-class fp32 step
# on 2 x 512 tokens is about 3.7 TFLOP (forward, and backward through the frozen weights), ~0.07 s at H100's fp32
# rate, taken as 0.3 s; SAM would count twice (two passes).
ASSUMED = {
    "start": 30.0,  # Python, torch and CUDA start-up, pytest collection, library imports (once per phase)
    "test": 3.0,  # one small-model test: a few steps of a 2-layer LoRA model
    "fsdp": 120.0,  # the FSDP2 test: a torchrun launch per backend tried (NCCL, then gloo), five steps each
    "build": 5.0,  # building one 1B-class LoRA Llama on the GPU (initialisation and PEFT wrapping)
    "step": 0.3,  # one whole 1B-class training step
    "opt_step": 0.05,  # one optimizer-only step (40M LoRA parameters)
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    folder = Path(os.environ["OUT"]) if os.environ.get("OUT") else ROOT / "results"
    default_out = folder / "gpu-check.md"
    parser.add_argument("--out", type=Path, default=default_out, help=f"the report (default {default_out})")
    parser.add_argument("--dry-run", action="store_true", help="count the work and estimate its time; run nothing")
    args = parser.parse_args(argv)
    sys.path[:0] = [str(ROOT / "src"), str(ROOT / "benchmarks")]  # this checkout, not another installed copy

    if args.dry_run:
        return dry_run()
    import torch

    if not torch.cuda.is_available():
        print(
            f"gpu-check: no CUDA GPU is visible to torch {torch.__version__} (torch.cuda.is_available() is "
            "False): nothing was run and no report was written."
        )
        return 0
    import importlib.util

    missing = [name for name in ("peft", "pytest", "transformers") if importlib.util.find_spec(name) is None]
    if missing:
        print(f"gpu-check: {missing[0]} is missing; set up first with: bash scripts/install.sh --test", file=sys.stderr)
        return 2
    return check(args.out)


# --------------------------------------------------------------------------------------------- the plan
def plan() -> dict:
    """The work the check does, counted from the test module and the benchmark's own settings."""
    import dataclasses

    import overhead

    tests = collect_tests()
    s, _ = overhead.parse_args(BENCH_ARGS)  # parsed for the CPU (no GPU needed to count), run on cuda
    s = dataclasses.replace(s, device="cuda")
    weight = {m: 2 if m == "SAM" else 1 for m in s.methods}
    configs = overhead.whole_step_configs(s)
    opt_methods = overhead.optimizer_only_methods(s)
    return {
        "settings": s,
        "tests": tests,
        "fsdp_tests": [t for t in tests if "fsdp" in t],
        "configs": configs,
        "timed_steps": sum(weight[m] * (s.warmup + rounds) for _, _, rounds in configs for m in s.methods),
        "memory_steps": sum(weight[m] * (s.warmup + s.memory_steps) for _ in configs for m in s.methods),
        "builds": 2 * len(configs) * len(s.methods) + len(opt_methods),
        "opt_methods": opt_methods,
        "opt_steps": len(opt_methods) * (s.opt_warmup + s.opt_rounds),
    }


def collect_tests() -> list[str]:
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider", TESTS],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env=child_env(),
    )
    tests = [line.strip() for line in proc.stdout.splitlines() if "::" in line]
    if proc.returncode != 0 or not tests:
        raise SystemExit(f"gpu-check: could not collect {TESTS}:\n{proc.stdout[-2000:]}{proc.stderr[-2000:]}")
    return tests


def dry_run() -> int:
    p = plan()
    s, a = p["settings"], ASSUMED
    n_fsdp = len(p["fsdp_tests"])
    n_small = len(p["tests"]) - n_fsdp
    n_steps = p["timed_steps"] + p["memory_steps"]
    parts = [  # (what, seconds, how they were counted)
        ("start-up of the two phases", 2 * a["start"], f"2 x {a['start']:.0f} s"),
        (f"{n_small} small-model tests", n_small * a["test"], f"{n_small} x {a['test']} s"),
        (f"{n_fsdp} FSDP2 test", n_fsdp * a["fsdp"], f"{n_fsdp} x {a['fsdp']:.0f} s"),
        (f"{p['builds']} model builds", p["builds"] * a["build"], f"{p['builds']} x {a['build']} s"),
        (
            f"{n_steps} whole 1B-class steps",
            n_steps * a["step"],
            f"({p['timed_steps']} timed incl. warm-up + {p['memory_steps']} for peak memory) x {a['step']} s",
        ),
        (
            f"{p['opt_steps']} optimizer-only steps",
            p["opt_steps"] * a["opt_step"],
            f"{p['opt_steps']} x {a['opt_step']} s",
        ),
    ]
    total = sum(seconds for _, seconds, _ in parts)
    print("gpu-check --dry-run: the work, and its time on one H100-class GPU from the assumptions below")
    print(f"- tests: {len(p['tests'])} in {TESTS}")
    print(
        f"- benchmark: python benchmarks/overhead.py --device cuda {' '.join(BENCH_ARGS)}: hidden {s.hidden}, "
        f"{s.layers} layers, vocab {s.vocab}, methods {', '.join(s.methods)}"
    )
    for seq_len, rank, rounds in p["configs"]:
        print(
            f"  - {s.batch} x {seq_len} tokens, LoRA rank {rank}: {len(s.methods)} methods x ({s.warmup} warm-up + "
            f"{rounds} timed rounds), then each alone for peak memory ({s.warmup} + {s.memory_steps} steps)"
        )
    print(
        f"  - optimizer alone (rank {s.opt_rank}, {s.opt_layers} layers): "
        f"{len(p['opt_methods'])} methods x ({s.opt_warmup} + {s.opt_rounds}) rounds"
    )
    print("- estimate (pessimistic per-unit times; a 1B-class fp32 step of 2 x 512 tokens is ~3.7 TFLOP):")
    for what, seconds, how in parts:
        print(f"  - {what}: {how} = {seconds:.0f} s")
    fits = total <= LIMIT_S
    print(f"- total: {total:.0f} s of the {LIMIT_S} s limit (8 minutes): {'fits' if fits else 'does NOT fit'}")
    return 0 if fits else 1


# --------------------------------------------------------------------------------------------- the check
def child_env() -> dict:
    paths = [str(ROOT / "src"), str(ROOT), os.environ.get("PYTHONPATH", "")]  # this checkout's mgpo and tests
    return {**os.environ, "PYTHONPATH": os.pathsep.join(paths)}


def check(out: Path) -> int:
    started = time.perf_counter()
    lines = ["# GPU check", "", *environment(), ""]
    with tempfile.TemporaryDirectory() as tmp:
        print(f"gpu-check: running {TESTS} ...", flush=True)
        junit = Path(tmp) / "junit.xml"
        timeout = ["--timeout", "300"] if has_module("pytest_timeout") else []
        tests = subprocess.run(
            [
                sys.executable,
                "-m",
                "pytest",
                "-q",
                "-p",
                "no:cacheprovider",
                "-rs",
                TESTS,
                f"--junitxml={junit}",
                *timeout,
            ],
            cwd=ROOT,
            env=child_env(),
            text=True,
            capture_output=True,
        )
        results = read_junit(junit) if junit.exists() else []
        counts = {r: sum(1 for _, res, _ in results if res == r) for r in ("passed", "failed", "skipped")}
        lines += [
            f"## Tests: {TESTS}",
            "",
            f"{counts['passed']} passed, {counts['failed']} failed, {counts['skipped']} skipped "
            f"(pytest exit status {tests.returncode}).",
            "",
            "| test | result | detail |",
            "|---|---|---|",
        ]
        lines += [
            f"| {name} | {'**failed**' if res == 'failed' else res} | {detail} |" for name, res, detail in results
        ]
        if not results:
            lines += [
                "",
                "pytest wrote no results; its output ends with:",
                "",
                "```",
                tests.stdout[-3000:],
                tests.stderr[-3000:],
                "```",
            ]
        lines.append("")

        print("gpu-check: running the benchmark ...", flush=True)
        report = Path(tmp) / "bench.md"
        command = [
            sys.executable,
            "benchmarks/overhead.py",
            "--device",
            BENCH_DEVICE,
            *BENCH_ARGS,
            "--out",
            str(report),
        ]
        bench = subprocess.run(command, cwd=ROOT, env=child_env(), text=True, capture_output=True)
        lines += [f"## Benchmark: `python {' '.join(command[1:-2])}`", ""]
        if bench.returncode == 0 and report.exists():
            lines.append(re.sub(r"^## ", "### ", report.read_text(), flags=re.M))  # under this section
        else:
            lines += [
                f"The benchmark failed (exit status {bench.returncode}); its output ends with:",
                "",
                "```",
                bench.stderr[-4000:],
                "```",
            ]
    ok = tests.returncode == 0 and counts["failed"] == 0 and bench.returncode == 0
    verdict = "all passed" if ok else "FAILURES above"
    lines += ["", f"Whole check: {time.perf_counter() - started:.0f} s; {verdict}.", ""]
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(lines))
    print(
        f"gpu-check: {counts['passed']} passed, {counts['failed']} failed, {counts['skipped']} skipped; "
        f"benchmark {'done' if bench.returncode == 0 else 'FAILED'}; report: {out}"
    )
    return 0 if ok else 1


def environment() -> list[str]:
    import peft
    import torch
    import transformers

    props = torch.cuda.get_device_properties(0)
    try:
        driver = (
            subprocess.run(
                ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                capture_output=True,
                text=True,
                timeout=30,
            )
            .stdout.strip()
            .splitlines()[0]
        )
    except (OSError, subprocess.SubprocessError, IndexError):
        driver = "unknown (nvidia-smi not available)"
    try:
        commit = (
            subprocess.run(
                ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=ROOT, timeout=30
            ).stdout.strip()
            or "unknown"
        )
    except (OSError, subprocess.SubprocessError):
        commit = "unknown"
    return [
        f"- date: {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC; commit {commit}",
        f"- GPU: {props.name}, {props.total_memory / 2**30:.0f} GiB, compute capability {props.major}.{props.minor}; "
        f"{torch.cuda.device_count()} visible (the check uses the first)",
        f"- driver {driver}; torch {torch.__version__} (CUDA {torch.version.cuda}, cuDNN "
        f"{torch.backends.cudnn.version()}); transformers {transformers.__version__}; peft {peft.__version__}; "
        f"Python {sys.version.split()[0]}",
    ]


def has_module(name: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(name) is not None


def read_junit(path: Path) -> list[tuple[str, str, str]]:
    """(test id, passed/failed/skipped, first line of the reason) for every test case of a JUnit XML file."""
    rows = []
    for case in ET.parse(path).getroot().iter("testcase"):
        name = f"{case.get('classname', '').rsplit('.', 1)[-1]}::{case.get('name')}"
        result, detail = "passed", ""
        for tag, res in (("failure", "failed"), ("error", "failed"), ("skipped", "skipped")):
            found = case.find(tag)
            if found is not None:
                result = res
                detail = (
                    (found.get("message") or found.text or "").strip().splitlines()[0]
                    if (found.get("message") or found.text or "").strip()
                    else ""
                )
                break
        rows.append((name, result, detail.replace("|", "\\|")[:200]))
    return rows


if __name__ == "__main__":
    sys.exit(main())
