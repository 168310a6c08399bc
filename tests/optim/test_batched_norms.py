"""Weight-space MGPO's step does its low-rank norms for layers of equal shape together (``layers.lowrank_sq_norms``,
batched products) and its term reads the factors themselves: both against the obvious per-layer loop, in float64."""

from __future__ import annotations

import copy

import peft
import pytest
import torch
from torch.profiler import ProfilerActivity, profile
from transformers import LlamaConfig, LlamaForCausalLM

import mgpo
from mgpo.optim import lowrank as layers_mod  # the Gram norms moved there (issue 32)
from mgpo.optim.layers import lowrank_sq_norms
from tests.optim.test_weight_space import PROJ, data, max_relative_error, ours


def dense_sq(item):
    return sum((x.double() @ y.double() for x, y in item), torch.zeros(())).square().sum()


def mixed_items(gen):
    """Items of interleaved shapes, ranks, dtypes and numbers of products (k = 1, 2, 3)."""
    shapes = [
        (5, 7, 2, torch.float64, 2),
        (3, 4, 2, torch.float64, 2),
        (5, 7, 2, torch.float64, 2),
        (5, 7, 3, torch.float64, 2),
        (6, 2, 1, torch.float32, 2),
        (5, 7, 2, torch.float64, 1),
        (3, 4, 2, torch.float64, 2),
        (4, 4, 2, torch.float32, 3),
        (6, 2, 1, torch.float32, 2),
    ]
    return [
        tuple((torch.randn(o, r, generator=gen).to(dt), torch.randn(r, i, generator=gen).to(dt)) for _ in range(k))
        for o, i, r, dt, k in shapes
    ]


@pytest.mark.parametrize("stack_elements", [None, 1, 40])
def test_lowrank_sq_norms_equal_the_dense_norms_in_item_order(monkeypatch, stack_elements):
    """Mixed shapes, ranks, dtypes and k, interleaved, stacked whole or one item (or a few) at a time."""
    if stack_elements is not None:
        monkeypatch.setattr(layers_mod, "STACK_ELEMENTS", stack_elements)
    items = mixed_items(torch.Generator().manual_seed(0))
    got = lowrank_sq_norms(items)
    assert got.dtype == torch.float64 and got.shape == (len(items),)
    for value, item in zip(got, items):
        tol = 1e-12 if item[0][0].dtype == torch.float64 else 1e-5
        ref = dense_sq(item)
        assert abs(float(value - ref)) <= tol * float(ref), (value, ref)
    only32 = [it for it in items if it[0][0].dtype == torch.float32]
    assert lowrank_sq_norms(only32).dtype == torch.float32  # float32 at least, not more than needed


def mixed_llama(seed=0, dora=False):
    """A tiny Llama whose LoRA layers come in four shapes: ranks differ by module (rank_pattern), and a trainable
    head that is not a LoRA factor (a layer of its own between the pairs)."""
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
    model = LlamaForCausalLM(cfg).to(torch.float64)
    config = peft.LoraConfig(
        r=2,
        lora_alpha=4,
        target_modules=PROJ,
        init_lora_weights="gaussian",
        use_dora=dora,
        rank_pattern={"q_proj": 3, "down_proj": 1},
        modules_to_save=["lm_head"],
    )
    model = peft.get_peft_model(model, config)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.05)
    return model


def dense_norms(opt, moment):
    """Per layer, the obvious loop: ``s ||X_B A + B X_A||`` for every pair (X = the gradient or the momentum),
    ``||X||`` for a tensor moved in place."""
    out = torch.zeros(len(opt.layers), dtype=torch.float64)
    for i, _, _, a, b, s, _ in opt.plan.pairs:
        out[i] = (s * (moment(b) @ a + b @ moment(a))).norm()
    for i, p in opt.plan.inplace:
        out[i] = moment(p).norm()
    return out


@pytest.mark.parametrize("dora", [False, True], ids=["lora", "dora"])
def test_step_norms_equal_the_per_layer_loop_for_mixed_shapes(dora):
    """eq. (8)'s n_l (gbar after the first step) and the direction norms ||D_l|| (after each step), with LoRA (or
    DoRA) layers of four shapes and a head moved in place, equal the per-layer dense loop."""
    model = mixed_llama(dora=dora)
    opt = mgpo.MGPO(model, torch.optim.AdamW, lr=1e-2, weight_decay=0.0, perturb_non_lora=True)
    shapes = {(tuple(a.shape), tuple(b.shape)) for _, _, _, a, b, _, _ in opt.plan.pairs}
    assert (
        len(shapes) == 4 and len(opt.plan.inplace) == 1 and len(opt.plan.dora) == (len(opt.plan.pairs) if dora else 0)
    )
    model.train()
    for step, (ids,) in enumerate(data(3)):
        model(input_ids=ids, labels=ids).loss.backward()
        if step == 0:
            with torch.no_grad():
                n_ref = dense_norms(opt, lambda p: p.grad)
        opt.step()
        with torch.no_grad():
            d_ref = dense_norms(opt, lambda p: opt.base_optimizer.state[p]["exp_avg"])
        if step == 0:
            assert torch.allclose(opt.gbar, n_ref, rtol=1e-12, atol=0)
        assert torch.allclose(opt.direction.norm, d_ref, rtol=1e-12, atol=0)
        opt.zero_grad()


def test_pending_terms_hold_no_copies():
    """Between steps the weight-space terms refer to the factors and momenta themselves: every tensor they hold
    (besides the scalar c_l s) shares storage with a parameter or the optimizer's state."""
    model = mixed_llama()
    opt = mgpo.MGPO(model, lr=1e-2)
    model.train()
    for (ids,) in data(2):
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad()
    owned = {p.untyped_storage().data_ptr() for p in model.parameters()}
    owned |= {
        t.untyped_storage().data_ptr()
        for st in opt.base_optimizer.state.values()
        for t in st.values()
        if torch.is_tensor(t)
    }
    terms = [t for entries in opt.terms.values() for _, factors, _ in entries for t in factors]
    assert len(terms) == 5 * len(opt.plan.pairs)
    for t in terms:
        assert t.dim() == 0 or t.untyped_storage().data_ptr() in owned


def test_stacking_a_few_layers_at_a_time_gives_the_same_trajectory(monkeypatch):
    """The bound on how much is stacked at once changes nothing but the grouping (float64, to rounding)."""
    model = mixed_llama()
    batches = data(4)
    whole, _ = ours(copy.deepcopy(model), batches)
    monkeypatch.setattr(layers_mod, "STACK_ELEMENTS", 1)  # one layer at a time
    single, _ = ours(copy.deepcopy(model), batches)
    assert max_relative_error(single, whole) < 1e-12


def matmul_calls(n_layers):
    cfg = LlamaConfig(
        vocab_size=48,
        hidden_size=16,
        intermediate_size=24,
        num_hidden_layers=n_layers,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=32,
    )
    torch.manual_seed(0)
    model = peft.get_peft_model(
        LlamaForCausalLM(cfg), peft.LoraConfig(r=2, target_modules=PROJ, init_lora_weights="gaussian")
    )
    opt = mgpo.MGPO(model, lr=1e-2, auto_perturb=False)
    params = [p for p in model.parameters() if p.requires_grad]
    for p in params:
        p.grad = torch.randn_like(p)
    opt.step()  # momenta exist: the next step computes every norm and builds the terms
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        opt.perturb()
        opt.step()
    names = ("aten::mm", "aten::bmm", "aten::matmul", "aten::dot", "aten::cat", "aten::stack")
    return sum(e.count for e in prof.key_averages() if e.key in names)


def test_step_products_do_not_grow_with_the_number_of_layers():
    """A step's products and concatenations are per shape, not per layer: 2 or 6 decoder layers (14 or 42 LoRA
    layers of the same three shapes) take the same number."""
    assert matmul_calls(2) == matmul_calls(6)


def test_the_term_takes_bf16_factors_with_fp32_momenta():
    """A bf16 factor with an fp32 momentum (an optimizer keeping fp32 state): the term computes in the promoted
    dtype, forward and backward, and matches the float64 product."""
    from mgpo.optim.lowrank import WeightSpaceTerm as _WeightSpaceTerm

    gen = torch.Generator().manual_seed(0)
    a, b = (torch.randn(4, 12, generator=gen).bfloat16(), torch.randn(10, 4, generator=gen).bfloat16())
    m_a, m_b = torch.randn(4, 12, generator=gen), torch.randn(10, 4, generator=gen)
    x = torch.randn(3, 12, generator=gen, dtype=torch.bfloat16, requires_grad=True)
    out = torch.zeros(3, 10, dtype=torch.bfloat16)
    cs = torch.tensor(0.5)
    y = _WeightSpaceTerm.apply(out, x, a, m_a, b, m_b, cs)
    eps = 0.5 * (m_b.double() @ a.double() + b.double() @ m_a.double())
    torch.testing.assert_close(y.double(), x.detach().double() @ eps.T, rtol=2e-2, atol=2e-2)
    y.float().sum().backward()
    torch.testing.assert_close(x.grad.double(), torch.ones(3, 10, dtype=torch.float64) @ eps, rtol=2e-2, atol=5e-2)
