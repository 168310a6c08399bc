"""SAM and ASAM against a hand-written two-pass step (docs/method.md, "SAM")."""

from __future__ import annotations

import pytest
import torch

import mgpo
from tests.optim.test_mgpo import loss_and_grads, problem


def hand_written(steps, *, rho, adaptive, lr=0.05):
    """float64: g1 at W; eps = rho g1/||g1|| (ASAM: rho w^2 g1/||w g1||); g2 at W + eps; SGD step with g2."""
    x, y, params = problem()
    params = [p.clone() for p in params]
    out = []
    for _ in range(steps):
        g1 = loss_and_grads(x, y, params)
        if adaptive:
            norm = torch.sqrt(sum(((p.abs() * g) ** 2).sum() for p, g in zip(params, g1)))
            eps = [rho * p * p * g / norm for p, g in zip(params, g1)]
        else:
            norm = torch.sqrt(sum((g**2).sum() for g in g1))
            eps = [rho * g / norm for g in g1]
        g2 = loss_and_grads(x, y, [p + e for p, e in zip(params, eps)])
        params = [p - lr * g for p, g in zip(params, g2)]
        out.append([p.clone() for p in params])
    return out


@pytest.mark.parametrize("adaptive", [False, True])
def test_sam_matches_a_hand_written_two_pass_step(adaptive):
    x, y, params = problem()
    params = [p.float().clone().requires_grad_() for p in params]
    rho = 0.5 if adaptive else 0.05
    opt = mgpo.SAM(params, torch.optim.SGD, lr=0.05, rho=rho, adaptive=adaptive)

    def loss():
        return ((x.float() @ params[0] + 10 * params[1] - y.float()) ** 2).mean()

    ours = []
    for _ in range(8):
        loss().backward()
        opt.step(lambda: loss().backward())
        opt.zero_grad()
        ours.append([p.detach().double() for p in params])
    reference = hand_written(8, rho=rho, adaptive=adaptive)
    for a, b in zip(ours, reference):
        for p, q in zip(a, b):
            torch.testing.assert_close(p, q, rtol=2e-5, atol=2e-6)
    plain = hand_written(8, rho=0.0, adaptive=adaptive)
    assert max(float((p - q).abs().max()) for p, q in zip(ours[-1], plain[-1])) > 1e-4  # rho mattered


def test_sam_without_closure_names_the_fix():
    w = torch.zeros(3, requires_grad=True)
    opt = mgpo.SAM([w], lr=0.1)
    (w - 1).pow(2).sum().backward()
    with pytest.raises(RuntimeError, match="step\\(closure\\)"):
        opt.step()
