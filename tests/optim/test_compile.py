"""torch.compile: every idiom either perturbs exactly as eager mode or is refused by name; none trains as rho = 0.

Each idiom is compared with the same loop run eagerly (same weights) and with the rho = 0 run (different weights),
so a perturbation compiled away fails the test. docs/huggingface.md, section "torch.compile", states the results.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import pytest
import torch
from torch._dynamo.backends.registry import lookup_backend

import mgpo
from tests.optim.helpers import METHODS, assert_same, batches, loss_fn, make_model, raw_params

STEPS = 5  # momentum from step 1, so steps 2-5 are perturbed
SINGLE_PASS = ["mgpo", "mgpo-factors", "msam", "random", "ggpo"]
IDIOMS = [
    "optimizer on the compiled model",
    "torch.compile(model) after",
    "model.compile()",
    "compiled loss function",
    "compiled forward-backward function",
]


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()  # every test starts with empty caches (and leaves none behind)
    yield
    torch._dynamo.reset()


class CountingBackend:
    """A dynamo backend that counts the graphs it is given (first compilations and recompilations alike)."""

    def __init__(self, backend: str = "eager"):
        self.inner, self.graphs = lookup_backend(backend), 0

    def __call__(self, gm, example_inputs):
        self.graphs += 1
        return self.inner(gm, example_inputs)


def build(method: str, idiom: str | None, rho_on: bool = True, backend=None, warm: bool = False, **extra):
    """The model, the optimizer, ``forward_backward(batch)`` and ``loss(batch)`` (compiled the same way, for the
    eval forwards) for one idiom (None: eager). The optimizer is built before the compiled code first runs, except
    with ``warm``: then the compiled code runs once (forward and backward) before the optimizer exists."""
    cls, on, off = METHODS[method]
    kwargs = {**(on if rho_on else off), **extra}
    model = make_model()
    compile_ = functools.partial(torch.compile, backend=backend)
    target: Callable[..., Any] = model  # the module, or the compiled one
    opt = None if warm or idiom == "optimizer on the compiled model" else cls(model, lr=1e-2, **kwargs)
    loss: Callable[..., Any]
    if idiom is None:
        loss = functools.partial(loss_fn, model)
    elif idiom == "optimizer on the compiled model":
        target = compile_(model)
        loss = functools.partial(loss_fn, target)
    elif idiom == "torch.compile(model) after":
        loss = functools.partial(loss_fn, compile_(model))
    elif idiom == "model.compile()":
        model.compile(backend=backend)
        loss = functools.partial(loss_fn, model)
    elif idiom in ("compiled loss function", "compiled forward-backward function"):
        loss = compile_(lambda b: loss_fn(model, b))
    forward_backward = (
        compile_(lambda b: loss_fn(model, b).backward())
        if idiom == "compiled forward-backward function"
        else lambda b: loss(b).backward()
    )
    if warm:
        model.train()
        forward_backward(batches(1, seed=9)[0])
        model.zero_grad()
    if opt is None:
        opt = cls(target, lr=1e-2, **kwargs)
    return model, opt, forward_backward, loss


def train(
    model, opt, forward_backward, loss, steps: int = STEPS, on_step=None, step_fn=None
) -> dict[str, torch.Tensor]:
    """Two micro-batches per step (accumulation), an eval forward between steps (the window closes and reopens).
    ``step_fn(micro_batches)``, if given, does a whole training step instead."""
    data = batches(2 * steps + 1)
    for step in range(steps):
        model.train()
        micro = data[2 * step : 2 * step + 2]
        if step_fn is not None:
            step_fn(micro)
        else:
            for b in micro:
                forward_backward(b)
            if isinstance(opt, mgpo.SAM):
                opt.step(lambda: [forward_backward(b) for b in micro])
            else:
                opt.step()
            opt.zero_grad()
        model.eval()
        with torch.no_grad():
            loss(data[-1])
        assert not opt.is_perturbed
        if on_step is not None:
            on_step(step)
    return raw_params(model)


@functools.cache
def reference(method: str, rho_on: bool = True) -> dict[str, torch.Tensor]:
    return train(*build(method, None, rho_on))


def max_diff(a: dict, b: dict) -> float:
    return max((a[k] - b[k]).abs().max().item() for k in a)


def assert_as_eager(method: str, weights: dict, tol: float = 1e-6) -> None:
    assert max_diff(weights, reference(method)) <= tol, "compiled training differs from eager"
    gap = max_diff(reference(method), reference(method, rho_on=False))
    assert gap > 1e2 * max(tol, 1e-7)  # the perturbation is large enough to be seen
    assert max_diff(weights, reference(method, rho_on=False)) > gap / 2, "compiled training is the rho = 0 run"


# ------------------------------------------------------------------------------------------------ the idioms
@pytest.mark.parametrize("idiom", IDIOMS)
@pytest.mark.parametrize("method", SINGLE_PASS)
def test_every_idiom_perturbs_exactly_as_eager(method, idiom):
    backend = CountingBackend("eager")
    model, opt, *run = build(method, idiom, backend=backend)
    graphs = []
    weights = train(model, opt, *run, on_step=lambda _: graphs.append(backend.graphs))
    assert_as_eager(method, weights, tol=0.0)  # the eager backend runs the very same kernels
    assert not opt.is_perturbed and opt.last_stats["perturbation_norm"] > 0
    # bounded recompilation: after the first perturbed step (step 2) nothing is compiled again
    assert graphs[1] == graphs[-1], f"graphs compiled after each step: {graphs}"
    # MGPO / MSAM add no graph break inside the model; the noise methods break at each noisy layer (2 here)
    assert graphs[-1] <= (6 if method in ("mgpo", "mgpo-factors", "msam") else 12), graphs


@pytest.mark.parametrize("idiom", IDIOMS)
def test_sam_with_compile_is_eager_sam(idiom):
    model, opt, *run = build("sam", idiom, backend="eager")
    assert_as_eager("sam", train(model, opt, *run), tol=0.0)


@pytest.mark.parametrize("method", ["mgpo", "mgpo-factors", "random"])
def test_aot_autograd_is_eager_to_rounding(method):
    model, opt, *run = build(method, "torch.compile(model) after", backend="aot_eager")
    assert_as_eager(method, train(model, opt, *run), tol=1e-6)


def test_inductor_is_eager_to_rounding():
    """The default backend, once (it takes tens of seconds on a CPU): generated kernels, to float32 rounding."""
    model, opt, *run = build("mgpo", "torch.compile(model) after", backend="inductor")
    assert_as_eager("mgpo", train(model, opt, *run), tol=1e-5)


# ------------------------------------------------------------------------------------------------ the graphs
# mgpo: train before / after the first perturbation, eval; factors: train, eval; random: a graph break at each of
# the 2 noisy layers, so 4 graphs in train and 4 in eval mode
@pytest.mark.parametrize("method, expected", [("mgpo", 3), ("mgpo-factors", 2), ("random", 8)])
def test_compilations_stop_after_warm_up(method, expected):
    """``torch.compile(model)`` after the optimizer, 8 steps with an eval forward after each: the graphs compiled
    (first compilations and recompilations) stop growing after the first perturbed step; docs/huggingface.md."""
    backend = CountingBackend("eager")
    model, opt, *run = build(method, "torch.compile(model) after", backend=backend)
    graphs = []
    train(model, opt, *run, steps=8, on_step=lambda _: graphs.append(backend.graphs))
    assert graphs[1:] == [graphs[1]] * 7, graphs
    assert graphs[-1] == expected, graphs


def test_a_compiled_training_step_that_calls_opt_step_is_eager():
    """``torch.compile`` of the whole training step, ``opt.step()`` included: step() (and SAM's closure in it) is
    opaque to dynamo and runs eagerly, for every method."""
    for method in SINGLE_PASS + ["sam"]:
        torch._dynamo.reset()
        model, opt, _, loss = build(method, None)

        def training_step(micro):
            for b in micro:
                loss(b).backward()
            if isinstance(opt, mgpo.SAM):
                opt.step(lambda: [loss(b).backward() for b in micro])
            else:
                opt.step()
            opt.zero_grad()

        compiled_step = torch.compile(training_step, backend="eager")
        weights = train(model, opt, lambda _: None, loss, on_step=None, step_fn=lambda micro: compiled_step(micro))
        assert_as_eager(method, weights, tol=0.0)


# ------------------------------------------------------------------------------------------------ refused idioms
# Compiled code that ran before the optimizer was built does not see the hooks added afterwards (dynamo does not
# re-check them). Per idiom, the methods that are then refused at their first step; the others stay exact.
REFUSED_WHEN_WARM = {
    "torch.compile(model) after": ({"mgpo"}, "none of the hooks on its LoRA layers"),
    "model.compile()": ({"mgpo"}, "none of the hooks on its LoRA layers"),
    "compiled loss function": ({"mgpo", "mgpo-factors", "msam"}, "reached its forward pre-hook"),
}


@pytest.mark.parametrize("idiom", list(REFUSED_WHEN_WARM))
@pytest.mark.parametrize("method", SINGLE_PASS)
def test_compiled_code_run_before_the_optimizer_is_refused_or_exact(method, idiom):
    model, opt, forward_backward, loss = build(method, idiom, backend="eager", warm=True)
    refused, says = REFUSED_WHEN_WARM[idiom]
    if method in refused:
        before = raw_params(model)
        model.train()
        forward_backward(batches(1, seed=9)[0])
        with pytest.raises(RuntimeError, match=r"torch\._dynamo\.reset\(\)") as err:
            opt.step()
        assert says in str(err.value) and "plain base optimizer" in str(err.value)
        assert_same(raw_params(model), before)  # refused before anything changed
        assert not opt.base_optimizer.state
        opt.zero_grad()
        torch._dynamo.reset()  # the fix the message names: the hooks are traced from now on
    assert_as_eager(method, train(model, opt, forward_backward, loss), tol=0.0)


# ------------------------------------------------------------------------------------------------ the guard
@pytest.mark.parametrize("method", ["mgpo", "mgpo-factors"])
def test_manual_perturb_under_compile_is_eager(method):
    """auto_perturb=False: opt.perturb() before each step's forwards. Not refused, and the traced weight-space
    term follows the window as in eager mode."""

    def run(idiom):
        torch._dynamo.reset()
        model, opt, forward_backward, loss = build(method, idiom, backend="eager", auto_perturb=False)
        data = batches(2 * STEPS)
        for step in range(STEPS):
            model.train()
            opt.perturb()
            for b in data[2 * step : 2 * step + 2]:
                forward_backward(b)
            opt.step()
            opt.zero_grad()
        return raw_params(model), opt

    eager, _ = run(None)
    compiled, opt = run("compiled loss function")
    assert max_diff(compiled, eager) == 0.0
    assert opt.last_stats["perturbation_norm"] > 0


@pytest.mark.parametrize("method", SINGLE_PASS)
def test_rho_zero_under_compile_is_not_refused(method):
    model, opt, *run = build(method, "compiled loss function", rho_on=False, backend="eager", warm=True)
    assert max_diff(train(model, opt, *run), reference(method, rho_on=False)) == 0.0


def test_the_guard_stays_quiet_where_nothing_was_skipped():
    model, opt, forward_backward, loss = build("mgpo", None)
    data = batches(4)
    model.train()
    forward_backward(data[0])
    opt.step()  # first step: nothing pending yet
    forward_backward(data[1])
    opt.step()
    opt.step()  # the same gradients again, no forward since: the user's choice, not a skipped hook
    opt.zero_grad()
    with opt.unperturbed():  # a training forward at clean weights, on purpose
        forward_backward(data[2])
    opt.step()
    opt.zero_grad()
    model.eval()
    with torch.no_grad():  # eval only: no gradients, nothing to check
        loss(data[3])
    opt.step()
    model.train()
    forward_backward(data[3])
    opt.step()
    assert opt.last_stats["perturbation_norm"] > 0


@pytest.mark.parametrize("how", ["eval mode", "another module"])
def test_a_training_forward_the_hook_never_saw_is_refused_in_eager_mode_too(how):
    """Not only compile: gradients from a forward in eval mode, or through a module other than the one given to
    the optimizer, would train as the base optimizer; the step says so."""
    model, opt, forward_backward, _ = build("mgpo", None)
    model.train()
    forward_backward(batches(1)[0])
    opt.step()
    opt.zero_grad()
    if how == "eval mode":
        model.eval()
        forward_backward(batches(1)[0])
    else:  # the layers called one by one: a path past both the PeftModel's hook and its wrapped model's
        net, (x, y) = model.get_base_model(), batches(1)[0]
        torch.nn.functional.cross_entropy(net.head(torch.tanh(net.fc2(torch.tanh(net.fc1(x))))), y).backward()
    with pytest.raises(RuntimeError, match="train mode"):
        opt.step()


def test_a_training_forward_through_the_wrapped_model_is_perturbed_like_one_through_the_peft_model():
    """PEFT's LoraModel (model.base_model) and generate() call the wrapped model directly: its own hook perturbs
    that forward as the PeftModel's would, so the step's gradient is the same."""
    grads = []
    for through in ("peft model", "wrapped model"):
        model, opt, forward_backward, _ = build("mgpo", None)
        model.train()
        forward_backward(batches(1)[0])
        opt.step()
        opt.zero_grad()
        loss_fn(model if through == "peft model" else model.base_model, batches(2)[1]).backward()
        grads.append([p.grad.clone() for p in model.parameters() if p.requires_grad])
        opt.step()
        assert opt.last_stats["perturbation_norm"] > 0
    for a, b in zip(*grads):
        assert torch.equal(a, b)
