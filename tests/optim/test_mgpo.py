"""MGPO / MSAM against independent float64 re-computations of docs/method.md, plus the special cases."""

from __future__ import annotations

import math
import warnings

import pytest
import torch

import mgpo


def problem(seed=0):
    """Least squares with two tensors of very different gradient scale (two layers without a model)."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(32, 5, generator=gen, dtype=torch.float64)
    y = torch.randn(32, 3, generator=gen, dtype=torch.float64)
    w = torch.randn(5, 3, generator=gen, dtype=torch.float64) * 0.5
    b = torch.randn(3, generator=gen, dtype=torch.float64) * 0.1
    return x, y, [w, b]


def loss_and_grads(x, y, params):
    w, b = [p.detach().clone().requires_grad_() for p in params]
    loss = ((x @ w + 10 * b - y) ** 2).mean()  # b scaled by 10: a larger gradient norm than w's
    return torch.autograd.grad(loss, [w, b])


def reference(steps, *, rho, beta, apn, momentum, lr=0.05, wd=0.0, max_scale=10.0):
    """The factor-space spec (norm="global"), step by step, in float64 with a hand-written AdamW (or SGD when
    momentum is a float). Without a model each tensor is its own layer."""
    x, y, params = problem()
    params = [p.clone() for p in params]
    m = [torch.zeros_like(p) for p in params]
    v2 = [torch.zeros_like(p) for p in params]
    own = [torch.zeros_like(p) for p in params]
    eps = [torch.zeros_like(p) for p in params]
    gbar = [None, None]
    b1, b2, adam_eps = 0.9, 0.999, 1e-8
    trajectory = []
    for t in range(1, steps + 1):
        grads = loss_and_grads(x, y, [p + e for p, e in zip(params, eps)])  # forward/backward at W~_t
        for i, g in enumerate(grads):  # eq. 8
            n = g.norm()
            gbar[i] = n if gbar[i] is None else beta * gbar[i] + (1 - beta) * n
        if momentum == "optimizer":  # AdamW update of the clean weights; v_t is its first moment
            for i, g in enumerate(grads):
                params[i] = params[i] * (1 - lr * wd)
                m[i] = b1 * m[i] + (1 - b1) * g
                v2[i] = b2 * v2[i] + (1 - b2) * g * g
                mhat, vhat = m[i] / (1 - b1**t), v2[i] / (1 - b2**t)
                params[i] = params[i] - lr * mhat / (vhat.sqrt() + adam_eps)
            vel = m
        else:  # plain SGD base, MGPO's own buffer v_t = mu v_{t-1} + g_t (eq. 5)
            for i, g in enumerate(grads):
                params[i] = params[i] - lr * g
                own[i] = momentum * own[i] + g
            vel = own
        vnorm = math.sqrt(sum(float(v.norm()) ** 2 for v in vel))
        inv = [1 / float(gb) for gb in gbar]
        if apn == "off":
            eps = [-rho * v / vnorm for v in vel]
        elif apn == "inverse":  # k_l = min(1/gbar_l, max_scale)
            eps = [-rho * v / vnorm * min(s, max_scale) for v, s in zip(vel, inv)]
        else:
            u = [v * s for v, s in zip(vel, inv)]
            unorm = math.sqrt(sum(float(z.norm()) ** 2 for z in u))
            eps = [-rho * z / unorm for z in u]
        trajectory.append([p.clone() for p in params])
    return trajectory


def run_mgpo(steps, *, rho, beta, apn, momentum, lr=0.05):
    x, y, params = problem()
    params = [p.float().clone().requires_grad_() for p in params]
    base = torch.optim.AdamW if momentum == "optimizer" else torch.optim.SGD
    kwargs = dict(weight_decay=0.0) if momentum == "optimizer" else {}
    opt = mgpo.MGPO(
        params,
        base,
        lr=lr,
        rho=rho,
        beta=beta,
        apn=apn,
        momentum=momentum,
        space="factors",
        norm="global",
        auto_perturb=False,
        **kwargs,
    )
    xf, yf = x.float(), y.float()
    trajectory = []
    for _ in range(steps):
        opt.perturb()  # no model: the explicit two-phase API
        loss = ((xf @ params[0] + 10 * params[1] - yf) ** 2).mean()
        loss.backward()
        opt.step()
        opt.zero_grad()
        trajectory.append([p.detach().double().clone() for p in params])
    return trajectory, opt


@pytest.mark.parametrize("apn", ["off", "inverse", "normalized"])
@pytest.mark.parametrize("momentum", ["optimizer", 0.9])
def test_factor_space_matches_a_float64_recomputation_of_the_spec(apn, momentum):
    rho = 0.05 if apn != "inverse" else 0.005  # "inverse" divides by gbar ~ 1e-1..1: keep its radius moderate
    ours, _ = run_mgpo(12, rho=rho, beta=0.9, apn=apn, momentum=momentum)
    ref = reference(12, rho=rho, beta=0.9, apn=apn, momentum=momentum)
    unperturbed = reference(12, rho=0.0, beta=0.9, apn=apn, momentum=momentum)
    for step, (a, b, c) in enumerate(zip(ours, ref, unperturbed)):
        for p, q, r in zip(a, b, c):
            torch.testing.assert_close(p, q, rtol=2e-5, atol=2e-6, msg=f"step {step + 1}")
    # and the perturbation mattered: far more than the tolerance above
    assert max(float((p - r).abs().max()) for p, r in zip(ours[-1], unperturbed[-1])) > 1e-3


def test_gbar_is_the_ema_of_layer_gradient_norms():
    _, opt = run_mgpo(3, rho=0.05, beta=0.5, apn="normalized", momentum="optimizer")
    assert opt.gbar.shape == (2,) and bool((opt.gbar > 0).all())
    assert set(opt.last_stats) >= {"perturbation_norm", "momentum_norm", "gbar_mean", "skipped_steps"}
    # apn="normalized" keeps the total radius at rho
    assert opt.last_stats["perturbation_norm"] == pytest.approx(0.05, rel=1e-5)


def msam_published(steps, *, rho, lr=0.05):
    """Momentum-SAM's AdamW variant as published (Becker et al. 2024), float64, weight decay 0: undo the
    perturbation with the old first moment, Adam step, perturb along -exp_avg/||exp_avg||."""
    x, y, params = problem()
    params = [p.clone() for p in params]
    m = [torch.zeros_like(p) for p in params]
    v = [torch.zeros_like(p) for p in params]
    b1, b2, eps = 0.9, 0.999, 1e-8
    out = []
    perturbed = [p.clone() for p in params]
    for t in range(1, steps + 1):
        grads = loss_and_grads(x, y, perturbed)
        norm = math.sqrt(sum(float(z.norm()) ** 2 for z in m)) if t > 1 else 0.0
        clean = [p + rho * z / norm for p, z in zip(perturbed, m)] if t > 1 else perturbed
        for i, g in enumerate(grads):
            m[i] = b1 * m[i] + (1 - b1) * g
            v[i] = b2 * v[i] + (1 - b2) * g * g
            clean[i] = clean[i] - lr * (m[i] / (1 - b1**t)) / ((v[i] / (1 - b2**t)).sqrt() + eps)
        out.append([p.clone() for p in clean])
        norm = math.sqrt(sum(float(z.norm()) ** 2 for z in m))
        perturbed = [p - rho * z / norm for p, z in zip(clean, m)]
    return out


def test_msam_matches_the_published_momentum_sam_adamw():
    x, y, params = problem()
    params = [p.float().clone().requires_grad_() for p in params]
    opt = mgpo.MSAM(params, torch.optim.AdamW, lr=0.05, rho=0.1, weight_decay=0.0, auto_perturb=False)
    ours = []
    for _ in range(10):
        opt.perturb()
        ((x.float() @ params[0] + 10 * params[1] - y.float()) ** 2).mean().backward()
        opt.step()
        opt.zero_grad()
        ours.append([p.detach().double() for p in params])
    for a, b in zip(ours, msam_published(10, rho=0.1)):
        for p, q in zip(a, b):
            torch.testing.assert_close(p, q, rtol=2e-5, atol=2e-6)


def test_nan_gradient_is_skipped_and_every_weight_stays_finite():
    x, y, params = problem()
    params = [p.float().clone().requires_grad_() for p in params]
    opt = mgpo.MGPO(params, lr=0.05, rho=0.05, auto_perturb=False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for step in range(6):
            opt.perturb()
            ((x.float() @ params[0] + 10 * params[1] - y.float()) ** 2).mean().backward()
            if step in (2, 3):
                params[0].grad[0, 0] = float("nan")
            with opt.unperturbed():
                before = [p.detach().clone() for p in params]
            opt.step()
            if step in (2, 3):
                for p, q in zip(params, before):
                    assert torch.equal(p.detach(), q)  # only the (exact) restore ran
            opt.zero_grad()
    assert opt.skipped_steps == 2
    assert sum("non-finite" in str(w.message) for w in caught) == 1  # warned once
    assert all(bool(torch.isfinite(p).all()) for p in params)
    assert all(bool(torch.isfinite(s["exp_avg"]).all()) for s in opt.base_optimizer.state.values())


def test_a_skipped_step_leaves_gbar_and_the_next_perturbation_as_they_were_with_micro_batch_gbar():
    """gbar_update="micro_batch" updates gbar after each micro-batch; when a later one brings a NaN, the step is
    skipped and must leave gbar (and so the next perturbation) as they were before its first micro-batch (the spec:
    no EMA update on a skipped step). It kept the earlier micro-batches' updates."""
    from tests.optim.helpers import batches, loss_fn, make_model

    model = make_model()
    opt = mgpo.MGPO(model, lr=1e-2, gbar_update="micro_batch")
    data = batches(6)
    kept = []  # gbar and the coefficients after each step
    for step in range(3):
        for micro, mb in enumerate(data[2 * step : 2 * step + 2]):
            loss_fn(model, mb).backward()
            if step == 2 and micro == 1:
                next(p for p in model.parameters() if p.requires_grad).grad.view(-1)[0] = float("nan")
            opt.record_gradients()
        opt.step()
        opt.zero_grad()
        kept.append((opt.gbar.clone(), opt.coef.clone()))
    assert opt.skipped_steps == 1
    (gbar, coef), (after_gbar, after_coef) = kept[1], kept[2]
    assert torch.equal(after_gbar, gbar) and torch.equal(after_coef, coef)


def test_bf16_weights_are_restored_exactly():
    torch.manual_seed(0)
    w = torch.randn(64, 64, dtype=torch.bfloat16, requires_grad=True)
    opt = mgpo.MGPO([w], lr=1e-2, rho=0.5, auto_perturb=False)
    for _ in range(3):
        opt.perturb()
        (w.float() ** 2).sum().backward()
        before_restore_clean = None
        with opt.unperturbed():
            before_restore_clean = w.detach().clone()
        assert opt.is_perturbed
        opt.restore()
        assert torch.equal(w.detach(), before_restore_clean)
        opt.step()
        opt.zero_grad()
    clean = w.detach().clone()
    for _ in range(5):  # repeated apply/restore cycles never drift in bf16
        opt.perturb()
        assert not torch.equal(w.detach(), clean)
        opt.restore()
        assert torch.equal(w.detach(), clean)


def test_fp32_subtractive_restore_drifts_by_at_most_a_few_ulp():
    torch.manual_seed(0)
    w = torch.randn(256, 256, requires_grad=True)
    opt = mgpo.MGPO([w], lr=1e-2, rho=0.5, auto_perturb=False, exact_restore=False)
    (w**2).sum().backward()
    opt.step()
    opt.zero_grad()
    clean = w.detach().clone()
    opt.perturb()
    assert not torch.equal(w.detach(), clean)
    opt.restore()
    ulp = torch.finfo(torch.float32).eps * clean.abs().clamp_min(0.5)
    assert bool(((w.detach() - clean).abs() <= 2 * ulp).all())


def test_momentum_optimizer_allocates_no_per_tensor_state():
    torch.manual_seed(0)
    w = torch.randn(16, 16, requires_grad=True)
    opt = mgpo.MGPO([w], lr=1e-2, auto_perturb=False)
    for _ in range(3):
        (w**2).sum().backward()
        opt.step()
        opt.zero_grad()
    assert all(not isinstance(v, torch.Tensor) for s in opt.state.values() for v in s.values())


def test_explicit_perturb_is_a_harmless_no_op_when_applied():
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 2)
    opt = mgpo.MGPO(model, lr=1e-2, rho=0.1)
    for _ in range(2):
        model(torch.randn(3, 4)).sum().backward()
        opt.step()
        opt.zero_grad()
    opt.perturb()
    once = model.weight.detach().clone()
    opt.perturb()
    model(torch.randn(3, 4))  # training forward: auto-perturb sees it is applied
    assert torch.equal(model.weight.detach(), once)


@pytest.mark.parametrize("apn", ["inverse", "weight"])
def test_a_state_saved_without_layer_sizes_resumes_with_diagnostics_on(apn):
    """A state saved with diagnostics off (or by an mgpo from before the layer sizes were kept) resumes with
    diagnostics on: the trajectory is the uninterrupted one, bit for bit, and the diagnostics are finite from the
    first step after the resume (the micro-batch re-scale before that step used to raise KeyError)."""
    import copy

    from tests.optim.helpers import batches, loss_fn, make_model, snapshot

    def build(model, diagnostics):
        return mgpo.MGPO(
            model, torch.optim.AdamW, lr=1e-2, rho=0.01, apn=apn, gbar_update="micro_batch", diagnostics=diagnostics
        )

    def step(model, opt, batch):
        model.train()
        loss_fn(model, batch).backward()
        opt.record_gradients()  # re-scales the pending perturbation: reads the layer sizes before step()
        opt.step()
        opt.zero_grad()

    data = batches(6)
    full = make_model()
    full_opt = build(full, False)
    for b in data:
        step(full, full_opt, b)
    model = make_model()
    opt = build(model, False)
    for b in data[:3]:
        step(model, opt, b)
    saved = copy.deepcopy(opt.state_dict())
    if apn == "weight":
        del saved["extra"]["sizes"]  # as an mgpo from before the sizes were kept wrote it
    fresh = make_model(seed=5)
    fresh.load_state_dict(copy.deepcopy(model.state_dict()))
    fresh_opt = build(fresh, True)
    fresh_opt.load_state_dict(saved)
    for b in data[3:]:
        step(fresh, fresh_opt, b)
        assert math.isfinite(fresh_opt.last_stats["radius_to_weight_mean"])
    got, want = snapshot(fresh), snapshot(full)
    assert all(torch.equal(got[k], want[k]) for k in want)


def _applied_perturbation_norm(model, opt, space: str) -> float:
    """||eps|| of the perturbation on now, measured from the model: the tensors' displacement (factor space), or
    per LoRA layer the change of its output for the identity input, eps_l^T (weight space)."""
    with torch.no_grad():
        if space == "factors":
            moved = {n: p.clone() for n, p in model.named_parameters() if p.requires_grad}
            with opt.unperturbed():
                return math.sqrt(
                    sum(float((moved[n] - p).square().sum()) for n, p in model.named_parameters() if p.requires_grad)
                )
        total = 0.0
        for module in (model.get_base_model().fc1, model.get_base_model().fc2):
            x = torch.eye(module.in_features)
            perturbed = module(x)
            with opt.unperturbed():
                total += float((perturbed - module(x)).square().sum())
        return math.sqrt(total)


@pytest.mark.parametrize("space", ["weight", "factors"])
def test_perturbation_norm_is_that_of_the_perturbation_the_steps_forwards_ran_at(space):
    """The statistic lands in the row of the step's loss, so it is the perturbation that loss was taken at, not the
    one set up for the next step: 0 at step 1 (no momentum yet) and for a step run inside unperturbed()."""
    from tests.optim.helpers import batches, loss_fn, make_model

    rho = 0.05
    model = make_model()
    opt = mgpo.MGPO(model, lr=1e-2, rho=rho, apn="normalized", space=space)  # "normalized": total radius rho
    data = batches(3)
    model.train()
    loss_fn(model, data[0]).backward()
    opt.step()
    opt.zero_grad()
    assert opt.last_stats["perturbation_norm"] == 0.0  # step 1 ran at the clean weights
    loss_fn(model, data[1]).backward()
    ran_at = _applied_perturbation_norm(model, opt, space)
    opt.step()
    opt.zero_grad()
    assert ran_at == pytest.approx(rho, rel=1e-4)
    assert opt.last_stats["perturbation_norm"] == pytest.approx(ran_at, rel=1e-4)
    with opt.unperturbed():
        loss_fn(model, data[2]).backward()
    opt.step()
    assert opt.last_stats["perturbation_norm"] == 0.0
