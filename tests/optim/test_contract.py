"""The guarantees at the end of docs/method.md, checked for every method alike."""

from __future__ import annotations

import copy
import subprocess
import sys
import textwrap
from typing import Any

import pytest
import torch

import mgpo
from tests.optim.helpers import (
    METHODS,
    assert_same,
    batches,
    loss_fn,
    make_model,
    raw_params,
    snapshot,
    train_step,
)

NAMES = list(METHODS)


def build(name, model, *, off=False, base=torch.optim.AdamW, **base_kwargs):
    cls, on_kwargs, off_kwargs = METHODS[name]
    kwargs = dict(off_kwargs if off else on_kwargs)
    base_kwargs.setdefault("lr", 1e-2)
    return cls(model, base, **kwargs, **base_kwargs)


def run(
    name, steps=6, *, off=False, accum=1, clip=None, sched=False, base=torch.optim.AdamW, dropout=0.0, **base_kwargs
):
    model = make_model(dropout=dropout)
    opt = build(name, model, off=off, base=base, **base_kwargs)
    scheduler = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 / (1 + s)) if sched else None
    data = batches(steps * accum)
    for s in range(steps):
        train_step(model, opt, data[s * accum : (s + 1) * accum], clip=clip, scheduler=scheduler)
    return model, opt


def run_base(steps=6, *, accum=1, clip=None, sched=False, base=torch.optim.AdamW, dropout=0.0, **base_kwargs):
    model = make_model(dropout=dropout)
    base_kwargs.setdefault("lr", 1e-2)
    opt = base([p for p in model.parameters() if p.requires_grad], **base_kwargs)
    scheduler = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 / (1 + s)) if sched else None
    data = batches(steps * accum)
    for s in range(steps):
        train_step(model, opt, data[s * accum : (s + 1) * accum], clip=clip, scheduler=scheduler)
    return model


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("dropout", [0.0, 0.5])
def test_zero_strength_is_the_base_optimizer_bit_for_bit(name, dropout):
    """With dropout too: a method that runs a second pass at rho = 0 (SAM did) draws a second dropout mask, and
    steps with that pass's gradient."""
    model, _ = run(name, off=True, dropout=dropout)
    assert_same(snapshot(model), snapshot(run_base(dropout=dropout)))


@pytest.mark.parametrize("name", NAMES)
def test_with_strength_the_trajectory_differs(name):
    """Guards the test above: a method that perturbs nothing would pass it trivially."""
    model, _ = run(name)
    reference = snapshot(run_base())
    assert any(not torch.equal(v, reference[k]) for k, v in snapshot(model).items())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("name", NAMES + ["mgpo-subtract"])
def test_weights_are_clean_outside_the_window(name, dtype):
    """Bit-identical, in fp32 and bf16, for every method (MGPO's weight-space term writes nothing; tensors moved
    in place are restored from a copy). "mgpo-subtract" is the documented exception, full fine-tuning's
    subtractive restore (exact_restore=False), held to a few ulp in fp32."""
    model = make_model().to(dtype)
    if name == "mgpo-subtract":
        if dtype != torch.float32:
            pytest.skip("subtractive restore is only the default for fp32 full fine-tuning")
        opt = mgpo.MGPO(model, lr=1e-2, exact_restore=False, space="factors")
    else:
        opt = build(name, model)
    exact = name != "mgpo-subtract"
    data = [(x.to(dtype), y) for x, y in batches(5)]
    probe = data[0][0]
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}

    def same(now, clean):
        for k in clean:
            if exact:
                assert torch.equal(now[k], clean[k]), k
            else:
                torch.testing.assert_close(now[k], clean[k], rtol=4 * torch.finfo(torch.float32).eps, atol=1e-9)

    for step, batch in enumerate(data):
        clean = raw_params(model)
        model.eval()
        with torch.no_grad():
            clean_eval = model(probe)
        model.train()
        loss = loss_fn(model, batch)  # window opens: the perturbation is applied
        if step >= 1 and not opt.two_pass:
            assert opt.is_perturbed
        loss.backward()
        # inside the window: eval forwards, state_dict() and unperturbed() all see clean weights
        with opt.unperturbed():
            same(raw_params(model), clean)
        model.eval()
        with torch.no_grad():
            out = model(probe)
        assert torch.equal(out, clean_eval) if exact else torch.allclose(out, clean_eval, rtol=1e-5, atol=1e-6)
        model.train()
        same({n: p for n, p in model.state_dict().items() if n in clean}, clean)
        if opt.two_pass:
            opt.step(lambda: loss_fn(model, batch).backward())
        else:
            opt.step()
        opt.zero_grad()
        assert not opt.is_perturbed
    for n, p in model.named_parameters():  # frozen weights never change, bit for bit
        if not p.requires_grad:
            assert torch.equal(p, frozen[n]), n


@pytest.mark.parametrize("name", NAMES)
def test_state_dict_round_trip_resumes_bit_identically(name):
    full, _ = run(name, steps=6)
    model, opt = run(name, steps=3)
    saved_model, saved_opt = copy.deepcopy(model.state_dict()), copy.deepcopy(opt.state_dict())
    fresh = make_model(seed=123)  # different init: everything must come from the checkpoint
    fresh.load_state_dict(saved_model)
    fresh_opt = build(name, fresh)
    fresh_opt.load_state_dict(saved_opt)
    assert fresh_opt.param_groups is fresh_opt.base_optimizer.param_groups
    for batch in batches(6)[3:]:
        train_step(fresh, fresh_opt, [batch])
    assert_same(snapshot(fresh), snapshot(full))


@pytest.mark.parametrize("name", NAMES)
def test_a_state_saved_with_other_settings_is_refused_by_name(name):
    """A resume never changes the method's settings silently: loading a state saved with another radius (GGPO:
    another sigma) is a ValueError naming the setting, for every method."""
    model, opt = run(name, steps=1)
    cls, on_kwargs, _ = METHODS[name]
    key = "sigma" if cls is mgpo.GGPO else "rho"
    other = {**on_kwargs, key: 2 * on_kwargs.get(key, 0.03)}
    fresh = cls(make_model(), torch.optim.AdamW, lr=1e-2, **other)
    with pytest.raises(ValueError, match=f"saved with {key}="):
        fresh.load_state_dict(opt.state_dict())


def test_resume_in_a_fresh_process(tmp_path):
    full, _ = run("mgpo", steps=6)
    model, opt = run("mgpo", steps=3)
    torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, tmp_path / "ckpt.pt")
    script = textwrap.dedent(f"""
        import torch
        from tests.optim.helpers import METHODS, batches, make_model, train_step
        ckpt = torch.load({str(tmp_path / "ckpt.pt")!r}, weights_only=False)
        model = make_model(seed=7); model.load_state_dict(ckpt["model"])
        cls, kwargs, _ = METHODS["mgpo"]
        opt = cls(model, torch.optim.AdamW, lr=1e-2, **kwargs); opt.load_state_dict(ckpt["opt"])
        for batch in batches(6)[3:]:
            train_step(model, opt, [batch])
        torch.save(model.state_dict(), {str(tmp_path / "final.pt")!r})
    """)
    subprocess.run([sys.executable, "-c", script], check=True, cwd=str(__import__("pathlib").Path(__file__).parents[2]))
    resumed = torch.load(tmp_path / "final.pt")
    assert_same({k: v for k, v in resumed.items()}, snapshot(full))


@pytest.mark.parametrize("name", NAMES)
def test_schedulers_act_on_the_shared_param_groups(name):
    model, opt = run(name, steps=4, sched=True)
    assert opt.param_groups is opt.base_optimizer.param_groups
    assert opt.base_optimizer.param_groups[0]["lr"] == pytest.approx(1e-2 / 5)
    off_model, _ = run(name, steps=4, sched=True, off=True)
    assert_same(snapshot(off_model), snapshot(run_base(steps=4, sched=True)))


@pytest.mark.parametrize("name", NAMES)
def test_loraplus_style_param_groups(name):
    model = make_model()
    a = [p for n, p in model.named_parameters() if p.requires_grad and "lora_B" not in n]
    b = [p for n, p in model.named_parameters() if "lora_B" in n]
    cls, kwargs, _ = METHODS[name]
    opt = cls([{"params": a, "lr": 1e-3}, {"params": b, "lr": 1.6e-2}], torch.optim.AdamW, model=model, **kwargs)
    assert any("[default]" in layer for layer in opt.layers)  # A and B of one module form one layer
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    for batch in batches(3):
        train_step(model, opt, [batch])
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert any(not torch.equal(p, before[n]) for n, p in model.named_parameters() if "lora_B" in n)


@pytest.mark.parametrize("name", NAMES)
def test_gradient_accumulation_holds_one_perturbation_per_step(name):
    model = make_model()
    opt = build(name, model)
    x, y = batches(1)[0]
    per_step = []
    for _ in range(4):
        outputs = []
        model.train()
        for _ in range(3):  # three identical micro-batches: identical perturbation => identical outputs
            out = model(x)
            outputs.append(out.detach().clone())
            (torch.nn.functional.cross_entropy(out, y) / 3).backward()
        assert all(torch.equal(o, outputs[0]) for o in outputs)
        per_step.append(outputs[0])
        if opt.two_pass:
            opt.step(lambda: torch.nn.functional.cross_entropy(model(x), y).backward())
        else:
            opt.step()
        opt.zero_grad()
    assert not torch.equal(per_step[-1], per_step[-2])
    off, _ = run(name, steps=3, accum=3, off=True)
    assert_same(snapshot(off), snapshot(run_base(steps=3, accum=3)))


@pytest.mark.parametrize("name", NAMES)
def test_gradient_clipping_between_backward_and_step(name):
    off, _ = run(name, steps=4, clip=0.05, off=True)
    assert_same(snapshot(off), snapshot(run_base(steps=4, clip=0.05)))
    on, _ = run(name, steps=4, clip=0.05)
    assert all(torch.isfinite(p).all() for p in on.parameters())


@pytest.mark.parametrize("name", NAMES)
def test_sgd_with_momentum_as_base(name):
    off, _ = run(name, steps=3, off=True, base=torch.optim.SGD, base_kwargs=dict(momentum=0.9))
    assert_same(snapshot(off), snapshot(run_base(steps=3, base=torch.optim.SGD, momentum=0.9)))
    on, _ = run(name, steps=3, base=torch.optim.SGD, base_kwargs=dict(momentum=0.9))
    assert all(torch.isfinite(p).all() for p in on.parameters())


INVALID: dict[str, list[tuple[str, Any]]] = {
    "mgpo": [
        ("rho", -0.1),
        ("rho", float("nan")),
        ("beta", 1.0),
        ("beta", -0.5),
        ("apn", "sqrt"),
        ("momentum", 1.0),
        ("momentum", "adam"),
        ("max_scale", 0.0),
        ("space", "dense"),
        ("norm", "row"),
        ("exact_restore", "yes"),
    ],
    "msam": [("rho", -1.0)],
    "sam": [("rho", -0.01), ("adaptive", "yes")],
    "random": [("rho", -0.1), ("total_steps", 0), ("total_steps", 2.5), ("seed", "x")],
    "ggpo": [("sigma", -0.1), ("beta_g", float("inf")), ("seed", 1.5)],
}
INVALID_CASES = [(n, k, v) for n, cases in INVALID.items() for k, v in cases]


@pytest.mark.parametrize("name,key,value", INVALID_CASES)
def test_invalid_hyper_parameters_raise_value_error_naming_them(name, key, value):
    cls = METHODS[name][0]
    with pytest.raises(ValueError, match=key) as err:
        cls(make_model(), torch.optim.AdamW, lr=1e-3, **{key: value})
    assert repr(value) in str(err.value) or str(value) in str(err.value)


def test_optimizer_momentum_without_momentum_state_is_a_type_error_naming_the_fix():
    with pytest.raises(TypeError, match="momentum=0.9"):
        mgpo.MGPO(make_model(), torch.optim.SGD, lr=0.1, momentum="optimizer")
    with pytest.raises(TypeError, match="momentum=0.9"):
        mgpo.MGPO(make_model(), torch.optim.Adagrad, lr=0.1)
    mgpo.MGPO(make_model(), torch.optim.SGD, lr=0.1, momentum=0.9)  # own buffer: fine
    with pytest.raises(ValueError, match="base_kwargs"):
        mgpo.MGPO(make_model(), torch.optim.SGD, lr=0.1, base_kwargs=dict(lr=0.2))


def test_the_sgd_momentum_fix_says_how_to_give_sgd_its_momentum():
    """MGPO(model, SGD, momentum=0.9) sets MGPO's own buffer and leaves SGD without momentum: the fix "SGD with
    momentum>0" written that way would train another base optimizer than meant, so the message shows base_kwargs."""
    with pytest.raises(TypeError, match=r"base_kwargs=\{'momentum': 0.9\}") as err:
        mgpo.MGPO(make_model(), torch.optim.SGD, lr=0.1)
    opt = mgpo.MGPO(make_model(), torch.optim.SGD, lr=0.1, base_kwargs={"momentum": 0.9})  # the fix it names
    assert opt.base_optimizer.defaults["momentum"] == 0.9 and "momentum=0.9" in str(err.value)


class _Adam8bitLike(torch.optim.Adam):
    """Adam keeping its moments under other names, as bitsandbytes' Adam8bit / AdamW8bit / Lion do ('state1')."""

    def step(self, closure=None):
        for st in self.state.values():
            if "state1" in st:
                st["exp_avg"], st["exp_avg_sq"] = st.pop("state1"), st.pop("state2")
        super().step(closure)
        for st in self.state.values():
            st["state1"], st["state2"] = st.pop("exp_avg"), st.pop("exp_avg_sq")


@pytest.mark.parametrize("space", ["weight", "factors"])
def test_optimizer_momentum_kept_under_another_name_is_refused_not_trained_as_the_base(space):
    """Betas but no 'exp_avg' (bitsandbytes' 8-bit optimizers, args.optim='adamw_bnb_8bit'): no momentum was found,
    so nothing was perturbed and MGPO trained as the plain base optimizer without a word."""
    model = make_model()
    opt = mgpo.MGPO(model, _Adam8bitLike, lr=1e-2, rho=0.05, space=space)
    with pytest.raises(TypeError, match=r"_Adam8bitLike keeps its state as .*'state1'.*momentum=0\.9"):
        train_step(model, opt, batches(1))
    model = make_model()
    opt = mgpo.MGPO(model, _Adam8bitLike, lr=1e-2, rho=0.05, space=space, momentum=0.9)  # the fix it names
    for batch in batches(3):
        train_step(model, opt, [batch])
    assert opt.last_stats["perturbation_norm"] > 0


def test_hyper_parameters_do_not_leak_into_the_base_optimizer():
    opt = mgpo.MGPO(make_model(), torch.optim.AdamW, lr=1e-3, rho=0.1, beta=0.5, eps=1e-6)
    assert opt.base_optimizer.param_groups[0]["eps"] == 1e-6 and opt.hparams["rho"] == 0.1
    assert "rho" not in opt.base_optimizer.param_groups[0] and "beta" not in opt.base_optimizer.param_groups[0]


@pytest.mark.parametrize("name", NAMES)
def test_an_unknown_keyword_names_the_method_its_settings_and_the_base_optimizers(name):
    """Not AdamW's bare 'unexpected keyword argument', which names neither the method nor what it takes."""
    cls = METHODS[name][0]
    with pytest.raises(
        TypeError,
        match=rf"^{cls.__name__} got an unexpected keyword argument 'wieght_decay' "
        r"\(did you mean 'weight_decay'\?\)",
    ) as err:
        cls(make_model(), torch.optim.AdamW, lr=1e-3, wieght_decay=0.01)
    said = str(err.value)
    assert f"{cls.__name__}'s settings: {', '.join(cls.settings())};" in said
    assert "every other keyword goes to the base optimizer AdamW, which takes: lr, betas, eps, weight_decay" in said


def test_a_misspelt_or_another_methods_setting_is_named():
    with pytest.raises(TypeError, match=r"^MGPO got an unexpected keyword argument 'rhoo' \(did you mean 'rho'\?\)"):
        mgpo.MGPO(make_model(), lr=1e-3, rhoo=0.05)
    with pytest.raises(TypeError, match=r"^GGPO got an unexpected keyword argument 'rho'.*settings: sigma, beta_g"):
        mgpo.GGPO(make_model(), lr=1e-3, rho=0.05)
    assert mgpo.GGPO.settings()[:2] == ["sigma", "beta_g"] and "rho" not in mgpo.GGPO.settings()
    assert "apn" in mgpo.MGPO.settings() and not set(mgpo.MSAM.FIXED) & set(mgpo.MSAM.settings())


@pytest.mark.parametrize("name", ["random", "ggpo"])
def test_noise_methods_need_the_model(name):
    model = make_model()
    with pytest.raises(TypeError, match="model=model"):
        METHODS[name][0](model.parameters(), torch.optim.AdamW, lr=1e-3)


def test_base_optimizer_must_be_a_class():
    with pytest.raises(TypeError, match="base_optimizer"):
        mgpo.MGPO(make_model(), torch.optim.AdamW(make_model().parameters()))


def test_loading_a_foreign_state_dict_names_the_fix():
    model = make_model()
    opt = mgpo.MGPO(model, lr=1e-3)
    plain = torch.optim.AdamW(model.parameters(), lr=1e-3)
    with pytest.raises(ValueError, match="base_optimizer.load_state_dict"):
        opt.load_state_dict(plain.state_dict())


# older: a state saved before the method was recorded in it, told apart by the names of its settings (MSAM is
# MGPO with fixed settings: the same names)
@pytest.mark.parametrize(
    "saved, loaded, older",
    [
        ("mgpo", "sam", False),
        ("sam", "mgpo", False),
        ("random", "ggpo", False),
        ("mgpo", "msam", False),
        ("mgpo", "sam", True),
        ("sam", "mgpo", True),
        ("random", "ggpo", True),
    ],
)
def test_loading_another_methods_state_names_both_methods(saved, loaded, older):
    """A state saved by one method loaded into another ended in a misleading fix ('saved with adaptive=None, build
    it with adaptive=None') instead of naming the two methods."""
    model = make_model()
    cls, kwargs, _ = METHODS[saved]
    opt = cls(model, torch.optim.AdamW, lr=1e-2, **kwargs)
    train_step(model, opt, batches(1))
    state = opt.state_dict()
    if older:
        del state["extra"]["method"]
    cls, kwargs, _ = METHODS[loaded]
    other = cls(model, torch.optim.AdamW, lr=1e-2, **kwargs)
    by = METHODS[saved][0].__name__ if not older else "another method"
    with pytest.raises(ValueError, match=rf"saved by {by}.*not by {cls.__name__}.*never changes the method"):
        other.load_state_dict(state)


@pytest.mark.parametrize("name", NAMES)
def test_add_param_group_after_construction(name):
    model = make_model()
    head = [p for n, p in model.named_parameters() if "head" in n and p.requires_grad]
    rest = [p for n, p in model.named_parameters() if "head" not in n and p.requires_grad]
    cls, kwargs, _ = METHODS[name]
    opt = cls(rest, torch.optim.AdamW, model=model, lr=1e-2, **kwargs)
    for batch in batches(4)[:2]:
        train_step(model, opt, [batch])
    opt.add_param_group({"params": head, "lr": 1e-3})
    before = [p.detach().clone() for p in head]
    for batch in batches(4)[2:]:
        train_step(model, opt, [batch])
    assert any(not torch.equal(p, q) for p, q in zip(head, before))


@pytest.mark.parametrize("name", ["random", "ggpo"])
def test_noise_seed_is_part_of_the_state(name):
    model = make_model()
    opt = METHODS[name][0](model, torch.optim.AdamW, lr=1e-2, seed=11)
    fresh = METHODS[name][0](make_model(), torch.optim.AdamW, lr=1e-2, seed=0)
    fresh.load_state_dict(opt.state_dict())
    assert fresh.hparams["seed"] == 11


@pytest.mark.parametrize("name", NAMES)
def test_step_without_any_gradient_does_nothing(name):
    model = make_model()
    opt = build(name, model)
    train_step(model, opt, batches(1))
    before = snapshot(model)
    if opt.two_pass:
        opt.step(lambda: None)
    else:
        opt.step()
    assert_same(snapshot(model), before)


def test_the_optimizer_layer_imports_no_huggingface_package():
    code = (
        "import sys, mgpo; bad = [m for m in ('transformers', 'peft', 'datasets', 'accelerate') if m in sys.modules]; "
        "assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
