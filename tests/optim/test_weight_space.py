"""MGPO's default (space="weight", the paper's algorithm) against a dense float64 re-computation of docs/method.md.

The reference materialises every layer's ``D_l = s (m_B A + B m_A)`` as an out x in matrix, adds ``eps_l`` to a
copy of the base weight for the forward/backward, computes ``n_l = ||s (g_B A + B g_A)||`` densely, and steps
AdamW: everything the optimizer does with rank-2r terms and Gram matrices, done the obvious way.
"""

from __future__ import annotations

import copy
import warnings

import peft
import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

import mgpo

PROJ = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
TINY = 1e-12


def tiny_llama(seed=0, dtype=torch.float64, dora=False, dropout=0.0):
    cfg = LlamaConfig(
        vocab_size=48,
        hidden_size=16,
        intermediate_size=24,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=32,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(cfg).to(dtype)
    model = peft.get_peft_model(
        model,
        peft.LoraConfig(
            r=2, lora_alpha=4, target_modules=PROJ, lora_dropout=dropout, init_lora_weights="gaussian", use_dora=dora
        ),
    )
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.05)
    return model


def data(steps, accum=1, seed=1):
    gen = torch.Generator().manual_seed(seed)
    return [[torch.randint(0, 48, (2, 8), generator=gen) for _ in range(accum)] for _ in range(steps)]


def lora_modules(model):
    return [m for m in model.modules() if hasattr(m, "lora_A") and "default" in getattr(m, "lora_A", {})]


def reference(
    model,
    batches,
    *,
    rho,
    beta,
    apn,
    norm,
    momentum,
    max_scale=10.0,
    lr=1e-2,
    clip=None,
    head=None,
    per_micro_batch=False,
):
    """The spec's list, dense, float64, with torch's AdamW as the base optimizer.

    ``clip``: gradients clipped to this total norm after gbar's update and before AdamW (HF Trainer's order).
    ``head``: a trainable non-LoRA tensor perturbed in place as a layer of its own (D = m, n = ||g||).
    ``per_micro_batch``: the authors' schedule: gbar updated after every micro-batch from the gradient
    accumulated so far, and the perturbation of the next micro-batch computed with it (norm="layer")."""
    layers = lora_modules(model)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    w0 = [m.base_layer.weight.detach().clone() for m in layers]
    dirs = [torch.zeros_like(w) for w in w0] + ([torch.zeros_like(head)] if head is not None else [])
    own = {id(p): torch.zeros_like(p) for p in params}
    gbar = [None] * (len(layers) + (head is not None))
    sizes = {"weight": [], "update": []}  # per layer, after each step: ||W_l||, ||W_l - W_l(before the step)||
    trajectory = []

    @torch.no_grad()
    def grads():  # eq. 8 inputs: ||s (g_B A + B g_A)|| per LoRA layer, ||g|| for the head
        out = []
        for m in layers:
            a, b, s = m.lora_A["default"].weight, m.lora_B["default"].weight, m.scaling["default"]
            out.append((s * (b.grad @ a + b @ a.grad)).norm())
        return out + ([head.grad.norm()] if head is not None else [])

    def update_gbar():
        for i, n in enumerate(grads()):
            gbar[i] = n if gbar[i] is None else beta * gbar[i] + (1 - beta) * n

    def perturbations(dirs):
        if apn == "inverse":
            k = [1.0 if g is None else min(1 / (float(g) + TINY), max_scale) for g in gbar]
        elif apn in ("weight", "update"):
            k = [float(x) for x in sizes[apn]]
        else:
            k = [1.0] * len(gbar)
        if apn == "normalized":
            ku = [1 / (float(g) + TINY) for g in gbar]
            total = sum(float((c * d).norm()) ** 2 for c, d in zip(ku, dirs)) ** 0.5
            return [-rho * c * d / (total + TINY) for c, d in zip(ku, dirs)]
        if norm == "global":
            total = sum(float((c * d).norm()) ** 2 for c, d in zip(k, dirs)) ** 0.5
            return [-rho * c * d / (total + TINY) for c, d in zip(k, dirs)]
        return [-rho * c * d / (float(d.norm()) + TINY) for c, d in zip(k, dirs)]

    def put(eps):
        with torch.no_grad():
            for m, w, e in zip(layers, w0, eps):
                m.base_layer.weight.copy_(w + e)  # forward/backward at W0 + s B A + eps_l
            if head is not None:
                head.copy_(head_clean + eps[-1])

    for step, micro in enumerate(batches):
        head_clean = head.detach().clone() if head is not None else None
        eps = perturbations(dirs) if step else [torch.zeros_like(d) for d in dirs]
        put(eps)
        for ids in micro:
            (model(input_ids=ids, labels=ids).loss / len(micro)).backward()
            if per_micro_batch:
                update_gbar()
                if step:
                    put(perturbations(dirs))
        with torch.no_grad():
            put([torch.zeros_like(d) for d in dirs])
            if not per_micro_batch:
                update_gbar()
            if clip is not None:
                torch.nn.utils.clip_grad_norm_(params, clip)
            dense = lambda m: m.scaling["default"] * m.lora_B["default"].weight @ m.lora_A["default"].weight  # noqa
            before = [dense(m).clone() for m in layers] + ([head.detach().clone()] if head is not None else [])
            opt.step()
            after = [w + dense(m) for m, w in zip(layers, w0)] + ([head.detach()] if head is not None else [])
            sizes["weight"] = [w.norm() for w in after]
            sizes["update"] = [(dense(m) - b).norm() for m, b in zip(layers, before)] + (
                [(head - before[-1]).norm()] if head is not None else []
            )
            if momentum != "optimizer":
                for p in params:
                    own[id(p)] = momentum * own[id(p)] + p.grad
            opt.zero_grad()
            mom = (lambda p: opt.state[p]["exp_avg"]) if momentum == "optimizer" else (lambda p: own[id(p)])
            dirs = []
            for m in layers:
                a, b, s = m.lora_A["default"].weight, m.lora_B["default"].weight, m.scaling["default"]
                dirs.append(s * (mom(b) @ a + b @ mom(a)))  # D_l, dense
            if head is not None:
                dirs.append(mom(head).clone())
        trajectory.append([p.detach().clone() for p in params])
    return trajectory


def ours(model, batches, lr=1e-2, clip=None, record=False, **kwargs):
    """``record``: call ``opt.record_gradients()`` as documented (after each backward with
    gbar_update="micro_batch", else once before clipping)."""
    opt = mgpo.MGPO(model, torch.optim.AdamW, lr=lr, weight_decay=0.0, **kwargs)
    params = [p for p in model.parameters() if p.requires_grad]
    trajectory = []
    model.train()
    for micro in batches:
        for ids in micro:
            (model(input_ids=ids, labels=ids).loss / len(micro)).backward()
            if record and kwargs.get("gbar_update") == "micro_batch":
                opt.record_gradients()
        if record and kwargs.get("gbar_update") != "micro_batch":
            opt.record_gradients()
        if clip is not None:
            torch.nn.utils.clip_grad_norm_(params, clip)
        opt.step()
        opt.zero_grad()
        trajectory.append([p.detach().clone() for p in params])
    return trajectory, opt


def max_relative_error(a, b):
    return max(float((p - q).norm() / q.norm()) for ps, qs in zip(a, b) for p, q in zip(ps, qs))


# every APN mode, both norms and both momentum sources, each value at least twice (normalized ignores norm)
CASES = [
    dict(apn="inverse", norm="layer", momentum="optimizer"),
    dict(apn="inverse", norm="global", momentum=0.9),
    dict(apn="off", norm="layer", momentum=0.9),
    dict(apn="off", norm="global", momentum="optimizer"),
    dict(apn="normalized", norm="layer", momentum="optimizer"),
    dict(apn="normalized", norm="layer", momentum=0.9),
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(map(str, c.values())))
def test_weight_space_matches_a_dense_float64_recomputation(case):
    hp = dict(rho=0.02, beta=0.9, **case)
    batches = data(10)
    model = tiny_llama()
    ref = reference(copy.deepcopy(model), batches, **hp)
    got, opt = ours(model, batches, **hp)
    assert len(opt.plan.pairs) == 2 * len(PROJ)  # every projection is a weight-space layer
    assert max_relative_error(got, ref) < 1e-9


def test_defaults_are_the_papers_and_match_the_dense_recomputation_with_gradient_accumulation():
    """3 micro-batches per step: one perturbation per step, gbar updated once per step from the accumulated
    gradient (the authors' code updates it per micro-batch; docs/method.md)."""
    opt = mgpo.MGPO(tiny_llama(), lr=1e-2)
    assert {k: opt.hparams[k] for k in ("space", "apn", "norm", "max_scale", "momentum", "rho", "beta")} == dict(
        space="weight", apn="inverse", norm="layer", max_scale=10.0, momentum="optimizer", rho=0.05, beta=0.9
    )
    batches = data(6, accum=3)
    model = tiny_llama()
    ref = reference(
        copy.deepcopy(model), batches, rho=0.05, beta=0.9, apn="inverse", norm="layer", momentum="optimizer"
    )
    got, _ = ours(model, batches)
    assert max_relative_error(got, ref) < 1e-9


def test_plain_adamw_does_not_match():
    batches = data(10)
    model = tiny_llama()
    ref = reference(
        copy.deepcopy(model), batches, rho=0.05, beta=0.9, apn="inverse", norm="layer", momentum="optimizer"
    )
    got, _ = ours(model, batches, rho=0.0)
    assert max_relative_error(got, ref) > 1e-4


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_base_weights_and_factors_are_never_written(dtype):
    """The weight-space term is added in the forward: base weights stay bit-identical and between steps the
    factors are exactly what the base optimizer made of them."""
    model = tiny_llama(dtype=dtype)
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    opt = mgpo.MGPO(model, lr=1e-2, rho=0.5)
    for micro in data(4, accum=2):
        for ids in micro:
            before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
            model(input_ids=ids, labels=ids).loss.backward()
            assert opt.is_perturbed or opt.coef is None
            for n, p in model.named_parameters():  # nothing written inside the window
                if p.requires_grad:
                    assert torch.equal(p, before[n]), n
        opt.step()
        opt.zero_grad()
    for n, p in model.named_parameters():
        if not p.requires_grad:
            assert torch.equal(p, frozen[n]), n
    assert float(opt.last_stats["perturbation_norm"]) > 0


def test_the_term_is_the_dense_perturbation_and_disable_adapter_gets_none():
    model = tiny_llama()
    opt = mgpo.MGPO(model, lr=1e-2, rho=0.3)
    ids = data(1)[0][0]
    model(input_ids=ids, labels=ids).loss.backward()
    opt.step()
    opt.zero_grad()
    model.train()
    with torch.no_grad():
        opt.perturb()  # a no-grad forward does not open the window by itself
        perturbed = model(input_ids=ids).logits
        with opt.unperturbed():  # dense: add eps_l = c_l D_l to every base weight of a copy
            dense = copy.deepcopy(model)
            for (layer, module, adapter, a, b, s, _), m in zip(opt.plan.pairs, lora_modules(dense)):
                mom = opt.base_optimizer.state
                d = s * (mom[b]["exp_avg"] @ a + b @ mom[a]["exp_avg"])
                m.base_layer.weight += opt.coef[layer] * d
            dense.train()
            expected = dense(input_ids=ids).logits
            clean = model(input_ids=ids).logits
        torch.testing.assert_close(perturbed, expected, rtol=1e-10, atol=1e-12)
        assert not torch.allclose(perturbed, clean)
        opt.perturb()
        with model.disable_adapter():
            base_only = model(input_ids=ids).logits
            assert opt.is_perturbed  # the window is open, yet the disabled adapters add nothing
        with opt.unperturbed(), model.disable_adapter():
            torch.testing.assert_close(base_only, model(input_ids=ids).logits, rtol=0, atol=0)


PAPER = dict(rho=0.05, beta=0.9, apn="inverse", norm="layer", momentum="optimizer")


@pytest.mark.parametrize("clip", [0.1, 0.05])
def test_gbar_from_gradients_before_clipping_matches_the_dense_recomputation(clip):
    """Clipping active: record_gradients() before clip_grad_norm_ gives gbar from the unclipped gradients (the
    authors update it in training_step, before the HF Trainer clips); without the call it sees clipped ones."""
    batches = data(10)
    model = tiny_llama()
    ref = reference(copy.deepcopy(model), batches, clip=clip, **PAPER)
    got, opt = ours(copy.deepcopy(model), batches, clip=clip, record=True)
    assert max_relative_error(got, ref) < 1e-9
    assert float(opt.last_stats["gbar_max"]) > 0
    unrecorded, _ = ours(model, batches, clip=clip)  # gbar from the clipped gradients: a different trajectory
    assert max_relative_error(unrecorded, ref) > 1e-6


def test_per_micro_batch_gbar_reproduces_the_authors_schedule():
    """gbar_update="micro_batch" with record_gradients() after every backward: gbar after each micro-batch from
    the partial sum, and the next micro-batch's perturbation re-scaled with it; clipping active as well."""
    batches = data(6, accum=3)
    model = tiny_llama()
    ref = reference(copy.deepcopy(model), batches, clip=0.1, per_micro_batch=True, **PAPER)
    got, _ = ours(copy.deepcopy(model), batches, clip=0.1, record=True, gbar_update="micro_batch")
    assert max_relative_error(got, ref) < 1e-9
    per_step, _ = ours(model, batches, clip=0.1, record=True)
    assert max_relative_error(per_step, ref) > 1e-6  # the default schedule is a different one
    with pytest.warns(RuntimeWarning, match="record_gradients\\(\\) was not called"):  # a plain loop that forgets
        ours(tiny_llama(), data(2, accum=2), gbar_update="micro_batch")


@pytest.mark.parametrize("perturb_head", [False, True])
def test_trainable_head_is_left_alone_by_default_and_perturbed_with_the_option(perturb_head):
    """A trained lm_head next to LoRA: not perturbed by default (the authors' code); with perturb_non_lora a
    layer of its own (D = m, n = ||g||). Both against the dense re-computation."""
    model = tiny_llama()
    model.base_model.model.lm_head.weight.requires_grad_(True)
    batches = data(8)
    twin = copy.deepcopy(model)
    ref = reference(twin, batches, head=twin.base_model.model.lm_head.weight if perturb_head else None, **PAPER)
    got, opt = ours(copy.deepcopy(model), batches, perturb_non_lora=perturb_head)
    assert max_relative_error(got, ref) < 1e-9
    other, _ = ours(model, batches, perturb_non_lora=not perturb_head)
    assert max_relative_error(other, ref) > 1e-6
    assert (not opt.plan.unperturbed) == perturb_head


def test_non_lora_layers_are_moved_in_place_and_restored_exactly():
    """A trained head next to LoRA with perturb_non_lora: its own layer, D = m, exact restore from a copy."""
    model = tiny_llama(dtype=torch.float32)
    head = model.base_model.model.lm_head.weight
    head.requires_grad_(True)
    opt = mgpo.MGPO(model, lr=1e-2, rho=0.5, perturb_non_lora=True)
    assert "base_model.model.lm_head.weight" in opt.layers
    for micro in data(3):
        clean = head.detach().clone()
        model.train()
        model(input_ids=micro[0], labels=micro[0]).loss.backward()
        if opt.coef is not None:
            assert not torch.equal(head, clean)  # perturbed in place inside the window
        opt.step()
        opt.zero_grad()
    clean = head.detach().clone()
    opt.perturb()
    opt.restore()
    assert torch.equal(head, clean)


def test_dora_gets_the_authors_weight_space_rule():
    """DoRA: the authors add eps_l = -rho k D/||D|| (D from A, B and their momenta, magnitude ignored) to the base
    weight and let DoRA normalise the perturbed weight. Ours applies it to the output (row norms from rank-2r
    products); against the dense float64 re-computation that writes W0 + eps, magnitudes trained and unperturbed."""
    batches = data(10)
    model = tiny_llama(dora=True)
    with torch.no_grad():  # magnitudes away from the clean row norms, so DoRA's scaling matters
        for n, p in model.named_parameters():
            if "lora_magnitude_vector" in n:
                p.mul_(1 + 0.3 * torch.rand_like(p))
    ref = reference(copy.deepcopy(model), batches, **PAPER)
    got, opt = ours(copy.deepcopy(model), batches)
    assert len(opt.plan.dora) == 2 * len(PROJ) and not opt.plan.inplace  # every projection, nothing moved in place
    assert max_relative_error(got, ref) < 1e-9
    factors, _ = ours(model, batches, space="factors")  # the factor-space rule is a different trajectory
    assert max_relative_error(factors, ref) > 1e-4


def test_a_dora_step_forms_no_out_by_in_tensor():
    """W0's row norms are computed once, not in every step (the spec: extra memory never O(in * out)): after the
    first step, no operation of ``step()`` returns a tensor a quarter as large as the layer's weight (128 x 96)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Sizes(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.seen = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for t in out if isinstance(out, (tuple, list)) else [out]:
                if isinstance(t, torch.Tensor):
                    self.seen.append((func.__name__, t.numel()))
            return out

    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(96, 128), torch.nn.Tanh(), torch.nn.Linear(128, 2))
    model = peft.get_peft_model(net, peft.LoraConfig(r=2, target_modules=["0"], use_dora=True))
    with torch.no_grad():
        model.base_model.model[0].lora_B["default"].weight.normal_(0, 0.05)
    opt = mgpo.MGPO(model, lr=1e-2)
    assert len(opt.plan.dora) == 1
    x, y = torch.randn(4, 96), torch.randint(0, 2, (4,))
    for step in range(3):
        model.train()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        if step == 0:
            opt.step()  # W0's row norms are computed here, once
        else:
            with Sizes() as sizes:
                opt.step()
            large = [(f, n) for f, n in sizes.seen if n >= 96 * 128 // 4]
            assert not large, large
        opt.zero_grad()
    assert opt.coef is not None and bool((opt.coef != 0).any())


def test_dora_with_dropout_says_it_falls_back_to_factor_space():
    with pytest.warns(RuntimeWarning, match=r"DoRA layer.*lora_dropout > 0.*factor space"):
        opt = mgpo.MGPO(tiny_llama(dora=True, dropout=0.1), lr=1e-2)
    assert not opt.plan.dora and len(opt.plan.inplace) == 3 * 2 * len(PROJ)  # A, B and magnitude, in place


def test_lora_on_a_conv1d_says_it_falls_back_to_factor_space():
    """GPT-2's Conv1D (fan_in_fan_out): the paper's weight-space rule was replaced by the factor-space one without a
    word, unlike DoRA's fallback. Named now; nn.Linear layers keep the weight-space rule, and MSAM stays quiet."""
    from transformers.pytorch_utils import Conv1D

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.c_fc, self.fc = Conv1D(8, 6), torch.nn.Linear(8, 3)

        def forward(self, x):
            return self.fc(torch.tanh(self.c_fc(x)))

    def model():
        torch.manual_seed(0)
        return peft.get_peft_model(Net(), peft.LoraConfig(r=2, target_modules=["c_fc", "fc"], fan_in_fan_out=True))

    with pytest.warns(RuntimeWarning, match=r"1 LoRA layer\(s\) wrap .*c_fc \(Conv1D\).*factor space"):
        opt = mgpo.MGPO(model(), lr=1e-2)
    assert [type(m.get_base_layer()) for _, m, *_ in opt.plan.pairs] == [torch.nn.Linear] and len(opt.plan.inplace) == 2
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        mgpo.MSAM(model(), lr=1e-2)


@pytest.mark.parametrize(
    "apn,norm", [("weight", "layer"), ("update", "layer"), ("weight", "global"), ("update", "global")]
)
def test_candidate_radius_rules_match_the_dense_recomputation(apn, norm):
    """apn="weight": radius rho ||W0 + s B A||_F; apn="update": rho ||W_l(t) - W_l(t-1)||_F (a look-ahead of rho
    of the layer's last updates); both against the dense float64 reference, with a trainable head perturbed too."""
    hp = dict(rho=0.01 if apn == "weight" else 2.0, beta=0.9, apn=apn, norm=norm, momentum="optimizer")
    batches = data(8)
    model = tiny_llama()
    model.base_model.model.lm_head.weight.requires_grad_(True)
    twin, plain = copy.deepcopy(model), copy.deepcopy(model)
    ref = reference(twin, batches, head=twin.base_model.model.lm_head.weight, **hp)
    got, opt = ours(model, batches, perturb_non_lora=True, **hp)
    assert max_relative_error(got, ref) < 1e-9
    adamw, _ = ours(plain, batches, perturb_non_lora=True, **{**hp, "rho": 0.0})
    assert max_relative_error(got[:1], adamw[:1]) < 1e-12 and max_relative_error(got, adamw) > 1e-4  # it does act


def test_diagnostics_are_the_dense_ratios_and_change_nothing():
    """radius_to_weight / radius_to_update / apn_factor against dense float64 per-layer values after each step,
    and the trajectory bit-identical to a run without diagnostics."""
    batches = data(5)
    model = tiny_llama()
    plain, _ = ours(copy.deepcopy(model), batches)
    opt = mgpo.MGPO(model, torch.optim.AdamW, lr=1e-2, weight_decay=0.0, diagnostics=True)
    layers = lora_modules(model)
    dense = lambda m: m.scaling["default"] * m.lora_B["default"].weight @ m.lora_A["default"].weight  # noqa: E731
    model.train()
    for micro in batches:
        model(input_ids=micro[0], labels=micro[0]).loss.backward()
        before = [dense(m).detach().clone() for m in layers]
        opt.step()
        opt.zero_grad()
        stats = opt.last_stats  # of the perturbation this step set up for the next forward
        with torch.no_grad():
            radius, weight, update, k = [], [], [], []
            for j, m in enumerate(layers):
                a, b, s = m.lora_A["default"].weight, m.lora_B["default"].weight, m.scaling["default"]
                st = opt.base_optimizer.state
                d = s * (st[b]["exp_avg"] @ a + b @ st[a]["exp_avg"])
                g = float(opt.gbar[opt.plan.pairs[j].layer])
                k.append(min(1 / (g + TINY), 10.0))
                radius.append(0.05 * k[-1] * float(d.norm()) / (float(d.norm()) + TINY))  # ||eps_l||
                weight.append(float((m.base_layer.weight + dense(m)).norm()))
                update.append(float((dense(m) - before[j]).norm()))
        to_weight = [r / w for r, w in zip(radius, weight)]
        to_update = [r / u for r, u in zip(radius, update)]
        assert stats["radius_to_weight_mean"] == pytest.approx(
            sum(to_weight) / len(to_weight), rel=1e-6
        )  # last_stats are float32
        assert stats["radius_to_weight_max"] == pytest.approx(max(to_weight), rel=1e-6)  # last_stats are float32
        assert stats["radius_to_update_mean"] == pytest.approx(
            sum(to_update) / len(to_update), rel=1e-6
        )  # last_stats are float32
        assert stats["radius_to_update_max"] == pytest.approx(max(to_update), rel=1e-6)  # last_stats are float32
        assert stats["apn_factor_mean"] == pytest.approx(sum(k) / len(k), rel=1e-6)  # last_stats are float32
        assert stats["apn_factor_min"] == pytest.approx(min(k), rel=1e-6)  # last_stats are float32
    got = [p.detach() for p in model.parameters() if p.requires_grad]
    assert all(x.equal(y) for x, y in zip(got, plain[-1]))  # diagnostics only read


@pytest.mark.parametrize("space", ["weight", "factors"])
def test_a_layer_frozen_during_training_is_left_clean(space):
    """Freezing a LoRA layer mid-training (requires_grad False) stops its updates; its old momentum must not keep
    moving it by a constant offset in every forward."""
    model = tiny_llama()
    opt = mgpo.MGPO(model, lr=1e-2, rho=0.3, space=space)
    batches = data(3)
    frozen, other = lora_modules(model)[0], lora_modules(model)[1]
    for i, (ids,) in enumerate(batches):
        if i == 2:
            for p in frozen.parameters():
                p.requires_grad_(False)
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad()
    outputs = {}
    hooks = [
        m.register_forward_hook(lambda mod, args, out, name=name: outputs.__setitem__(name, out.detach()))
        for name, m in (("frozen", frozen), ("other", other))
    ]
    ids = batches[0][0]
    model.train()
    with torch.no_grad():
        opt.perturb()
        model(input_ids=ids)
        perturbed = dict(outputs)
        with opt.unperturbed():
            model(input_ids=ids)
    for h in hooks:
        h.remove()
    assert torch.equal(perturbed["frozen"], outputs["frozen"])
    assert not torch.allclose(perturbed["other"], outputs["other"])


@pytest.mark.parametrize("space", ["weight", "factors"])
def test_merging_inside_the_window_merges_the_clean_factors(space):
    """A loop left between forward and step, then merge_and_unload(): in factor space A and B are moved in place at
    that moment; the merge must still see the clean ones (and a deep copy must merge its own layers)."""
    model = tiny_llama()
    opt = mgpo.MGPO(model, lr=1e-2, rho=0.3, space=space)
    for (ids,) in data(2):
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad()
    model.train()
    clean = {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" in n}
    expected = {
        n: (m.base_layer.weight + m.get_delta_weight("default")).detach().clone()
        for n, m in model.named_modules()
        if m in lora_modules(model)
    }
    ids = data(1, seed=3)[0][0]
    model(input_ids=ids, labels=ids).loss.backward()  # the window is open
    assert opt.is_perturbed
    moved = any(not torch.equal(p, clean[n]) for n, p in model.named_parameters() if "lora_" in n)
    assert moved == (space == "factors")
    twin = copy.deepcopy(model)
    merged = model.merge_and_unload()
    weights = {n: m.weight for n, m in merged.named_modules() if isinstance(m, torch.nn.Linear)}
    for name, w in expected.items():
        torch.testing.assert_close(weights[name.replace("base_model.model.", "", 1)], w, rtol=0, atol=1e-12)
    twin_lora = lora_modules(twin)[0]
    before = twin_lora.base_layer.weight.detach().clone()
    twin.merge_adapter()  # the copy's guard is bound to the copy: it merges its own layers, not the original's
    assert not torch.equal(twin_lora.base_layer.weight, before)
