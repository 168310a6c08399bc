"""Side effects and lifetime (docs/method.md, "What every method guarantees"): an optimizer's effect ends with it,
nothing is registered process-wide, no host synchronisation in a step, no dense allocation, refusals."""

from __future__ import annotations

import gc
import os
import sys
import warnings
import weakref

import peft
import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

import mgpo
from mgpo.optim._base import PerturbedOptimizer
from tests.optim.helpers import METHODS, batches, loss_fn, make_model, raw_params, snapshot, train_step

SINGLE_PASS = [n for n in METHODS if METHODS[n][0] is not mgpo.SAM]


def build(name, model, **kwargs):
    cls, on, _ = METHODS[name]
    return cls(model, torch.optim.AdamW, lr=1e-2, **{**on, **kwargs})


def outputs(model, x):
    model.train()
    with torch.no_grad():
        return model(x)


@pytest.mark.parametrize("name", SINGLE_PASS)
def test_dropping_the_optimizer_mid_window_leaves_clean_weights_and_later_forwards_unaffected(name):
    model = make_model()
    opt = build(name, model)
    data = batches(3)
    for batch in data[:2]:
        train_step(model, opt, [batch])
    clean = raw_params(model)
    model.train()
    loss_fn(model, data[2]).backward()  # window open: perturbation applied
    assert opt.is_perturbed
    ref = weakref.ref(opt)
    del opt
    gc.collect()
    assert ref() is None, "a hook or closure keeps the optimizer alive"
    for n, p in raw_params(model).items():
        assert torch.equal(p, clean[n]), n
    assert not model._forward_pre_hooks and not model._state_dict_pre_hooks
    x = data[0][0]
    twin = make_model()
    twin.load_state_dict(model.state_dict())
    assert torch.equal(outputs(model, x), outputs(twin, x))  # no leftover noise or weight-space term
    for module in model.modules():
        assert not module._forward_hooks and "forward" not in module.__dict__, module


@pytest.mark.parametrize("name", SINGLE_PASS)
def test_close_restores_and_removes_every_hook(name):
    model = make_model()
    opt = build(name, model)
    data = batches(3)
    for batch in data[:2]:
        train_step(model, opt, [batch])
    clean = raw_params(model)
    opt.perturb()
    opt.close()
    opt.close()  # idempotent
    assert not opt.is_perturbed
    for n, p in raw_params(model).items():
        assert torch.equal(p, clean[n]), n
    assert all(
        not m._forward_hooks and not m._forward_pre_hooks and "forward" not in m.__dict__ for m in model.modules()
    )
    with pytest.raises(RuntimeError, match="closed"):
        opt.perturb()


def test_two_optimizers_on_two_models_do_not_interact():
    """Each model trained beside another optimizer follows exactly its solo trajectory."""
    solo_a, solo_b = make_model(), make_model(seed=5)
    opt_a, opt_b = build("mgpo", solo_a), build("random", solo_b)
    for batch in batches(4):
        train_step(solo_a, opt_a, [batch])
    for batch in batches(4):
        train_step(solo_b, opt_b, [batch])
    a, b = make_model(), make_model(seed=5)
    opt_a2, opt_b2 = build("mgpo", a), build("random", b)
    for batch in batches(4):  # interleaved, with both windows open at once
        a.train(), b.train()
        loss_fn(a, batch).backward()
        loss_fn(b, batch).backward()
        opt_a2.step(), opt_b2.step()
        opt_a2.zero_grad(), opt_b2.zero_grad()
    for x, y in ((a, solo_a), (b, solo_b)):
        for (n, p), q in zip(snapshot(x).items(), snapshot(y).values()):
            assert torch.equal(p, q), n


@pytest.mark.parametrize("how", ["deepcopy", "torch.save"])
@pytest.mark.parametrize("name", SINGLE_PASS)
def test_a_copy_of_the_model_is_clean_and_detached_from_the_optimizer(name, how, tmp_path):
    """A copy made inside the window (an EMA or reference model, a snapshot) holds the clean weights, is not
    perturbed by the original's optimizer in its own training forwards, and leaves that optimizer alone; the
    original trains on exactly as without the copy. torch.save(model) works (the hooks were closures)."""
    import copy

    data = batches(5)
    solo = make_model()
    solo_opt = build(name, solo)
    for batch in data[:4]:
        train_step(solo, solo_opt, [batch])
    model = make_model()
    opt = build(name, model)
    for batch in data[:2]:
        train_step(model, opt, [batch])
    clean = {k: v.clone() for k, v in model.state_dict().items()}
    model.train()
    loss_fn(model, data[2]).backward()  # window open: the perturbation is applied
    assert opt.is_perturbed
    if how == "deepcopy":
        twin = copy.deepcopy(model)
    else:
        torch.save(model, tmp_path / "model.pt")
        twin = torch.load(tmp_path / "model.pt", weights_only=False)
    reference = make_model()
    reference.load_state_dict(clean)
    x = data[4][0]
    for mode in ("train", "eval"):
        getattr(twin, mode)(), getattr(reference, mode)()
        assert torch.equal(twin(x), reference(x)), mode  # train mode with gradients: no perturbation
    assert all(torch.equal(v, clean[k]) for k, v in raw_params(twin).items() if k in clean)
    opt.step()
    opt.zero_grad()
    twin.train()
    loss_fn(twin, data[4]).backward()  # the copy's training forward: nothing reaches the original's optimizer
    train_step(model, opt, [data[3]])
    for (n, p), q in zip(snapshot(model).items(), snapshot(solo).values()):
        assert torch.equal(p, q), n


def test_two_optimizers_on_one_model_with_disjoint_tensors():
    model = make_model()
    head = [p for n, p in model.named_parameters() if p.requires_grad and "head" in n]
    lora = [p for n, p in model.named_parameters() if p.requires_grad and "head" not in n]
    o1 = mgpo.MGPO(lora, lr=1e-2, model=model)
    o2 = mgpo.MGPO(head, lr=1e-2, model=model, space="factors")
    for batch in batches(3):
        train_step(model, o1, [batch])
        o2.step()
        o2.zero_grad()
    assert not o1.is_perturbed and not o2.is_perturbed
    o1.close()
    assert not o2._closed and o2.model is model


def test_nothing_is_registered_process_wide():
    from torch.nn.modules import module as nn_module

    before = (dict(nn_module._global_forward_pre_hooks), dict(nn_module._global_forward_hooks))
    model = make_model()
    for name in METHODS:
        build(name, model).close()
    mgpo.MGPO(model.parameters(), lr=1e-2, auto_perturb=False)
    assert (dict(nn_module._global_forward_pre_hooks), dict(nn_module._global_forward_hooks)) == before


def test_tensors_only_needs_explicit_perturb_and_says_so():
    model = make_model()
    with pytest.raises(TypeError, match=r"MGPO\(model"):
        mgpo.MGPO(model.parameters(), lr=1e-2)
    opt = mgpo.MGPO(model.parameters(), lr=1e-2, auto_perturb=False)
    data = batches(3)
    for batch in data:
        clean = raw_params(model)
        opt.perturb()
        if opt.coef is not None:
            assert any(not torch.equal(p, clean[n]) for n, p in raw_params(model).items())
        loss_fn(model, batch).backward()
        opt.step()
        opt.zero_grad()


@pytest.mark.parametrize("space", ["weight", "factors"])
def test_manual_perturb_forgotten_is_named_not_trained_silently(space):
    """auto_perturb=False and no opt.perturb() before the forwards: every step trained as the plain base optimizer
    without a word. Warned once (a first step has nothing to apply yet); calling perturb() or rho = 0 stays quiet."""

    def run(call_perturb, rho=0.05):
        model = make_model()
        opt = mgpo.MGPO(model.parameters(), lr=1e-2, rho=rho, space=space, auto_perturb=False)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            for batch in batches(4):
                if call_perturb:
                    opt.perturb()
                loss_fn(model, batch).backward()
                opt.step()
                opt.zero_grad()
        return [str(w.message) for w in caught if "perturb() was not called" in str(w.message)]

    forgotten = run(call_perturb=False)
    assert len(forgotten) == 1 and "trained as the plain base optimizer" in forgotten[0]
    assert run(call_perturb=True) == [] and run(call_perturb=False, rho=0.0) == []


class NoSync(Exception):
    pass


class HostReads(TorchDispatchMode):
    """Records every device-to-host read (``aten._local_scalar_dense``, what ``.item()`` and a tensor converted to
    a Scalar inside a torch call run) whose Python caller is mgpo's own code."""

    def __init__(self):
        super().__init__()
        self.callers = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten._local_scalar_dense.default:
            frame = sys._getframe(1)
            while frame is not None and f"{os.sep}torch{os.sep}" in frame.f_code.co_filename:
                frame = frame.f_back  # through torch's Python wrappers to the code that called them
            caller = frame.f_code.co_filename if frame is not None else "?"
            if f"{os.sep}mgpo{os.sep}" in caller and f"{os.sep}tests{os.sep}" not in caller:
                self.callers.append(f"{caller}:{frame.f_lineno}")
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("name", list(METHODS))
def test_step_reads_nothing_back_from_the_device(name, monkeypatch):
    """On CPU a host sync cannot be counted, so the step is run with every tensor-to-Python conversion
    raising: statistics stay device tensors until someone reads ``last_stats``. The skip decision takes the
    path an accelerator takes (on CPU tensors it reads the flag, which stalls nothing)."""
    monkeypatch.setattr(PerturbedOptimizer, "_decide_on_host", staticmethod(lambda ok: False))
    model = make_model()
    opt = build(name, model)
    data = batches(4)
    train_step(model, opt, [data[0]])
    data[1][0][0, 0] = float("nan")  # and a skipped step on the way

    def forbid(attr):
        original = getattr(torch.Tensor, attr)

        def guarded(self, *a, **k):  # only mgpo's own code is held to it: torch's for-loop AdamW reads its
            caller = sys._getframe(1).f_code.co_filename  # CPU step counter with .item() by design
            if f"{os.sep}mgpo{os.sep}" in caller and f"{os.sep}tests{os.sep}" not in caller:
                raise NoSync(f"Tensor.{attr} called from {caller}")
            return original(self, *a, **k)

        monkeypatch.setattr(torch.Tensor, attr, guarded)

    for attr in ("item", "tolist", "__bool__", "__float__", "__int__", "__index__"):
        forbid(attr)
    with HostReads() as reads:  # and the reads torch makes in C++ for mgpo's calls (a tensor passed as a Scalar)
        for batch in data[1:]:
            model.train()
            loss = loss_fn(model, batch)
            loss.backward()
            if opt.two_pass:
                opt.step(lambda: loss_fn(model, batch).backward())
            else:
                opt.step()
            opt.zero_grad()
    monkeypatch.undo()
    assert reads.callers == []
    assert opt.skipped_steps == 1
    # the device-side skip left the weights exactly as a host-side skip does
    model2 = make_model()
    opt2 = build(name, model2)
    train_step(model2, opt2, [data[0]])
    for batch in data[1:]:
        train_step(model2, opt2, [batch])
    assert opt2.skipped_steps == 1
    for (n, p), q in zip(snapshot(model).items(), snapshot(model2).values()):
        assert torch.equal(p, q), n
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert isinstance(opt.last_stats["skipped_steps"], float)


class PeakMemory(TorchDispatchMode):
    """Tracks the bytes of tensor storages created inside the block that are still alive: the peak is the
    extra memory the block needed."""

    def __init__(self):
        super().__init__()
        self.live, self.now, self.peak = {}, 0, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {
            t.untyped_storage().data_ptr()
            for t in torch.utils._pytree.tree_leaves((args, kwargs))
            if isinstance(t, torch.Tensor)
        }
        for t in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(t, torch.Tensor) and t.device.type == "cpu" and not t._is_view():
                storage = t.untyped_storage()
                key = storage.data_ptr()
                if key and key not in self.live and key not in inputs:  # new storage, not an in-place result
                    self.live[key] = storage.nbytes()
                    self.now += storage.nbytes()
                    self.peak = max(self.peak, self.now)
                    weakref.finalize(storage, self._free, key)
        return out

    def _free(self, key):
        self.now -= self.live.pop(key, 0)


def peak_per_phase(make_opt, steps=3):
    """Peak bytes created by the step and by a training forward/backward, over a few steps."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4096, 4096, bias=False))
    model = peft.get_peft_model(
        net, peft.LoraConfig(r=4, lora_alpha=8, target_modules=["0"], init_lora_weights="gaussian")
    )
    opt = make_opt(model)
    x = torch.randn(2, 4096)
    step_peak = window_peak = 0
    for _ in range(steps):
        model.train()
        with PeakMemory() as mem:
            model(x).square().mean().backward()
        window_peak = max(window_peak, mem.peak)
        with PeakMemory() as mem:
            opt.step()
        step_peak = max(step_peak, mem.peak)
        opt.zero_grad()
    return step_peak, window_peak, opt


def test_no_out_by_in_allocation_on_a_4096_layer():
    """in = out = 4096, r = 4: MGPO's peak memory beyond AdamW's, in the step and in the forward/backward of the
    perturbed window, stays below 1% of one dense weight (64 MiB)."""
    dense = 4096 * 4096 * 4
    step_ref, window_ref, _ = peak_per_phase(
        lambda m: torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-3)
    )
    step, window, opt = peak_per_phase(lambda m: mgpo.MGPO(m, lr=1e-3))
    assert opt.coef is not None and bool((opt.coef != 0).any())  # the term was really applied
    assert step - step_ref < 0.01 * dense, (step, step_ref)
    assert window - window_ref < 0.01 * dense, (window, window_ref)


def test_state_dict_holds_the_hyper_parameters_and_a_mismatch_is_refused():
    model = make_model()
    opt = mgpo.MGPO(model, lr=1e-2, rho=0.05)
    train_step(model, opt, batches(1))
    state = opt.state_dict()
    assert state["extra"]["hparams"]["rho"] == 0.05
    other = mgpo.MGPO(make_model(), lr=1e-2, rho=0.1)
    with pytest.raises(ValueError, match=r"rho=0.05"):
        other.load_state_dict(state)
    space = mgpo.MGPO(make_model(), lr=1e-2, space="factors")
    with pytest.raises(ValueError, match="space"):
        space.load_state_dict(state)
    subtract = mgpo.MGPO(make_model(), lr=1e-2, rho=0.05, exact_restore=False)
    with pytest.raises(ValueError, match="exact_restore"):
        subtract.load_state_dict(state)


def test_sam_step_with_a_closure_and_no_prior_backward_trains():
    model = make_model()
    opt = mgpo.SAM(model, lr=1e-2)
    x, y = batches(1)[0]
    before = snapshot(model)
    calls = []

    def closure():
        calls.append(1)
        loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        return loss

    loss = opt.step(closure)  # the torch convention: no backward before step
    assert len(calls) == 2 and loss is not None
    assert any(not torch.equal(v, before[k]) for k, v in snapshot(model).items())


def test_parameters_on_several_devices_are_refused():
    a = torch.zeros(3, requires_grad=True)
    b = torch.zeros(3, device="meta", requires_grad=True)
    with pytest.raises(ValueError, match="several devices"):
        mgpo.MGPO([a, b], lr=1e-2, auto_perturb=False)


@pytest.mark.parametrize("cls", [mgpo.RandomPerturbation, mgpo.GGPO])
def test_noise_methods_refuse_quantized_base_layers(cls):
    class Linear4bit(nn.Linear):  # stands in for bitsandbytes' class (not installed here)
        pass

    Linear4bit.__module__ = "bitsandbytes.nn.modules"
    net = nn.Sequential(Linear4bit(8, 8))
    model = peft.get_peft_model(net, peft.LoraConfig(r=2, target_modules=["0"]))
    with pytest.raises(ValueError, match="quantized"):
        cls(model, lr=1e-3)
    mgpo.MGPO(model, lr=1e-3)  # MGPO never touches the base weight: fine


def test_deepspeed_is_refused():
    class DeepSpeedEngine(nn.Module):
        pass

    engine = DeepSpeedEngine()
    engine.w = nn.Parameter(torch.zeros(2))
    with pytest.raises(ValueError, match="DeepSpeed"):
        mgpo.MGPO(engine, lr=1e-3)
