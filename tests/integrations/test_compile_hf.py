"""torch.compile through Hugging Face: ``TrainingArguments(torch_compile=True)`` with an mgpo optimizer handed to a
plain ``Trainer``, and ``PerturbationTrainer``. Each run is compared with the same Trainer without compile (same
weights) and with rho = 0 (different weights), so a perturbation compiled away fails. Tiny BERT, CPU, offline."""

from __future__ import annotations

import functools
import gc
import warnings

import pytest
import torch
from torch._dynamo.utils import counters
from transformers import Trainer, TrainerCallback

from mgpo.integrations.trainer import PerturbationConfig, PerturbationTrainer, build_optimizer, unwrap_optimizer
from tests.integrations.test_trainer import cls_data, make_args, summed_ce, tiny_bert, trainable

warnings.filterwarnings("ignore", category=FutureWarning)

STEPS = 4  # two micro-batches each (make_args); momentum from step 1, so steps 2-4 are perturbed


@pytest.fixture(autouse=True, scope="module")
def _fast_gc():
    gc.freeze()  # as in test_trainer: Trainer.train() runs gc.collect()
    yield
    gc.unfreeze()


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


class GraphCount(TrainerCallback):
    """The graphs dynamo has compiled so far (first compilations and recompilations), after every optimizer step."""

    def __init__(self):
        self.after_step = []

    def on_step_end(self, args, state, control, **kwargs):
        self.after_step.append(counters["stats"]["unique_graphs"])


def run(how: str, method: str, backend: str | None = None, rho_on: bool = True, tmp="/tmp/mgpo-compile-hf"):
    """Trained weights, the trainer and its graph counts; ``backend`` None: no compile."""
    counters.clear()
    model = tiny_bert()
    compile_args = {} if backend is None else dict(torch_compile=True, torch_compile_backend=backend)
    args = make_args(tmp, max_steps=STEPS, **compile_args)
    cfg = PerturbationConfig(
        method=method, rho=0.1 if rho_on else 0.0, sigma=0.05 if rho_on else 0.0, beta_g=0.05 if rho_on else 0.0
    )
    common = dict(model=model, args=args, train_dataset=cls_data(2 * STEPS * 4), compute_loss_func=summed_ce)
    if how == "plain Trainer":  # the optimizer built by hand on the model, before the Trainer compiles it
        opt = build_optimizer(
            model, cfg, [{"params": [p for p in model.parameters() if p.requires_grad]}], lr=1e-2, total_steps=STEPS
        )
        trainer = Trainer(optimizers=(opt, None), **common)
    else:
        trainer = PerturbationTrainer(perturbation=cfg, **common)
    graphs = GraphCount()
    trainer.add_callback(graphs)
    trainer.train()
    return trainable(model), trainer, graphs.after_step


@functools.cache
def reference(how: str, method: str, rho_on: bool = True) -> dict[str, torch.Tensor]:
    return run(how, method, rho_on=rho_on)[0]


def max_diff(a: dict, b: dict) -> float:
    return max((a[k] - b[k]).abs().max().item() for k in a)


# GGPO's hooks are RandomPerturbation's (a subclass); tests/optim/test_compile.py runs both in every idiom
@pytest.mark.parametrize(
    "how, method, backend",
    [
        ("plain Trainer", "mgpo", "aot_eager"),
        ("plain Trainer", "msam", "eager"),
        ("PerturbationTrainer", "mgpo", "eager"),
        ("PerturbationTrainer", "random", "eager"),
        ("PerturbationTrainer", "sam", "eager"),
    ],
)
def test_torch_compile_true_trains_as_eager(how, method, backend, tmp_path):
    weights, trainer, graphs = run(how, method, backend, tmp=tmp_path)
    assert type(trainer.model_wrapped).__name__ == "OptimizedModule"  # the Trainer did compile the model
    eager, rho0 = reference(how, method), reference(how, method, rho_on=False)
    gap = max_diff(eager, rho0)
    assert gap > 1e-3
    assert max_diff(weights, eager) <= (0.0 if backend == "eager" else 1e-6), "compiled differs from eager"
    assert max_diff(weights, rho0) > gap / 2, "compiled training is the rho = 0 run"
    opt = unwrap_optimizer(trainer.optimizer)
    assert not opt.is_perturbed and opt.last_stats["perturbation_norm"] > 0
    # bounded recompilation: nothing new is compiled after the first perturbed step (step 2)
    assert graphs[1:] == [graphs[1]] * (STEPS - 1), graphs
