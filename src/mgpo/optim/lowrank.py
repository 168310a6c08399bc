"""The low-rank maths: norms of sums of low-rank products from small Gram matrices, and MGPO's weight-space term.

Nothing of size out x in is ever formed here (docs/method.md, "How"): a LoRA layer's update ``s B A`` and MGPO's
direction ``D_l = s (m_B A + B m_A)`` are products ``U V`` with an inner size of r or 2r, so their Frobenius and row
norms come from r x r Gram blocks (``||U V||_F^2 = sum((U^T U) * (V V^T))``) and the perturbation ``eps_l x`` is
applied to a layer's input as ``c_l s U (V x)``.
"""

from __future__ import annotations

import weakref
from collections.abc import Sequence
from typing import Any, TypeAlias

import torch
from torch import Tensor

from mgpo.optim.torch_private import version

# At most this many values are stacked at once by lowrank_sq_norms (16 MiB in float32): it bounds the step's
# transient memory, whatever the number of layers of one shape.
STACK_ELEMENTS = 1 << 22

# The shapes and dtypes of an item's ``(X_i, Y_i)``: items with equal ones are stacked together
_Shapes: TypeAlias = tuple[tuple[torch.Size, torch.dtype, torch.Size, torch.dtype], ...]


def lowrank_sq_norms(items: Sequence[tuple[tuple[torch.Tensor, torch.Tensor], ...]]) -> torch.Tensor:
    """``||X_1 Y_1 + ... + X_k Y_k||_F^2`` of every item ``((X_1, Y_1), ..., (X_k, Y_k))`` (X: out x r, Y: r x in),
    in item order, float32 at least (float64 when a tensor is), from r x r Gram blocks:
    ``sum_i <X_i^T X_i, Y_i Y_i^T> + 2 sum_{i<j} <X_i^T X_j, Y_i Y_j^T>``; nothing out x in is formed.

    Items whose tensors have equal shapes and dtypes are stacked and done together with batched products
    (``torch.bmm``): a fixed number of operations per shape instead of per layer, and for k = 2 a quarter fewer
    multiply-adds than one 2r x 2r Gram matrix per side (``X_2^T X_1`` is the transpose of ``X_1^T X_2``). One
    side is stacked at a time, at most ``max(STACK_ELEMENTS, one item's side)`` values (a chunk holds one item at
    least), in the tensors' own dtype before the conversion to float32."""
    groups: dict[tuple[_Shapes, torch.device], list[int]] = {}
    for n, item in enumerate(items):
        shapes = tuple((x.shape, x.dtype, y.shape, y.dtype) for x, y in item)
        groups.setdefault((shapes, item[0][0].device), []).append(n)
    wide = any(t.dtype == torch.float64 for item in items for pr in item for t in pr)
    values: dict[int, torch.Tensor] = {}  # by item
    for (shapes, _), members in groups.items():
        dtype = torch.float64 if any(torch.float64 in (xd, yd) for _, xd, _, yd in shapes) else torch.float32
        side = max(sum(x.numel() for x, *_ in shapes), sum(y.numel() for _, _, y, _ in shapes), 1)
        k, chunk = len(shapes), max(1, STACK_ELEMENTS // side)
        pairs = [(i, j) for i in range(k) for j in range(i, k)]
        for start in range(0, len(members), chunk):
            which = members[start : start + chunk]
            xs = [_stacked([items[n][i][0] for n in which], dtype) for i in range(k)]  # (L, out, r)
            grams = [torch.bmm(xs[i].mT, xs[j]) for i, j in pairs]  # X_i^T X_j, r x r
            del xs
            ys = [_stacked([items[n][i][1] for n in which], dtype) for i in range(k)]  # (L, r, in)
            acc: Tensor | None = None  # sum over the blocks of (X_i^T X_j) * (Y_i Y_j^T), elementwise, per item
            for (i, j), g in zip(pairs, grams):
                h = torch.bmm(ys[i], ys[j].mT)  # Y_i Y_j^T, r x r
                acc = g.mul_(h) if acc is None else acc.addcmul_(g, h, value=1 if i == j else 2)
            del ys, grams
            assert acc is not None  # k >= 1: one block at least
            total = acc.sum((1, 2))
            for n, v in zip(which, (total.double() if wide and dtype != torch.float64 else total).unbind()):
                values[n] = v
    return torch.stack([values[n] for n in range(len(items))]) if items else torch.zeros(0)


def _stacked(tensors: list[torch.Tensor], dtype: torch.dtype) -> torch.Tensor:
    out = torch.stack(tensors)
    return out if out.dtype == dtype else out.to(dtype)


def lowrank_row_sq_norms(u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Squared row norms of ``U V`` (out x in) without forming it: ``rowsum((U (V V^T)) * U)``."""
    u, v = u.float() if u.dtype != torch.float64 else u, v.float() if v.dtype != torch.float64 else v
    return ((u @ (v @ v.mT)) * u).sum(1)


class WeightSpaceTerm(torch.autograd.Function):
    """``out + eps_l x`` as one autograd node: ``eps_l x = c_l s [m_B, B] ([A; m_A] x)`` (eq. 6), with ``cs = c_l s``.

    Its inputs are the factors and momenta themselves (whole, gathered once per step under FSDP), constants of the
    window: no gradient reaches them, so the factors' own gradients stay those of the loss at the perturbed weight.
    ``U = [m_B, B]`` (out x 2r) and ``V = [A; m_A]`` (2r x in) are concatenated where a pass needs them and dropped
    after it: each pass is two products with an inner size of 2r, each reading ``x`` (or the output gradient) once,
    and nothing is held between passes or saved beyond references to tensors that exist anyway. ``out=None``
    returns ``eps_l x`` alone (DoRA). Computed in the factors' dtype, outside autocast.
    """

    @staticmethod
    def forward(
        ctx: Any, out: Tensor | None, x: Tensor, a: Tensor, m_a: Tensor, b: Tensor, m_b: Tensor, cs: Tensor
    ) -> Tensor:
        ctx.save_for_backward(a, m_a, b, m_b, cs)  # references: an in-place change before backward raises
        ctx.x_shape, ctx.x_dtype = x.shape, x.dtype
        with torch.autocast(x.device.type, enabled=False):
            v = torch.cat([a, m_a])  # 2r x in, in the promoted dtype of factor and momentum (bf16 A, fp32 m_A)
            h = x.reshape(-1, x.shape[-1]).to(v.dtype) @ v.T  # (tokens, 2r): [A x; m_A x]
            h = h.mul_(cs.to(h.dtype))
            u = torch.cat([m_b, b], 1)  # out x 2r
            if out is None:
                return (h @ u.T).view(*x.shape[:-1], u.shape[0])
            flat = out.reshape(-1, out.shape[-1])
            if flat.dtype == u.dtype:
                return torch.addmm(flat, h, u.T).view(out.shape)  # one fused kernel
            return (flat + (h @ u.T).to(flat.dtype)).view(out.shape)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:
        a, m_a, b, m_b, cs = ctx.saved_tensors
        grad_x = None
        if ctx.needs_input_grad[1]:  # eps_l^T grad = c_l s [A; m_A]^T ([m_B, B]^T grad)
            with torch.autocast(grad.device.type, enabled=False):
                u = torch.cat([m_b, b], 1)
                g = grad.reshape(-1, grad.shape[-1]).to(u.dtype) @ u  # (tokens, 2r)
                v = torch.cat([a, m_a])
                grad_x = g.mul_(cs.to(g.dtype)).to(v.dtype) @ v
            grad_x = grad_x.view(ctx.x_shape).to(ctx.x_dtype)
        return (grad if ctx.needs_input_grad[0] else None), grad_x, None, None, None, None, None


# id(W0) -> (a weak reference to it, what it was when computed, ||W0_i||^2); by id, as a tensor's == is elementwise
_ROW_SQ: dict[int, tuple[weakref.ref[torch.Tensor], tuple[Any, ...], torch.Tensor]] = {}


def frozen_row_sq_norms(w0: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``||W0_i||^2`` of a base weight, kept while the weight is frozen and unchanged (same storage, no in-place write:
    its version counter, as ``_base`` reads for gradients), so a step forms no out x in temporary."""
    key = (w0.data_ptr(), version(w0), w0.device, dtype)
    hit = _ROW_SQ.get(id(w0))
    if not w0.requires_grad and hit is not None and hit[0]() is w0 and hit[1] == key:
        return hit[2]
    sq = w0.to(dtype).square().sum(1)
    if not w0.requires_grad:
        for k in [k for k, (ref, _, _) in _ROW_SQ.items() if ref() is None]:  # weights since freed
            del _ROW_SQ[k]
        _ROW_SQ[id(w0)] = (weakref.ref(w0), key, sq)
    return sq


def row_norms(w0: torch.Tensor, p: torch.Tensor, q: torch.Tensor, w0_sq: torch.Tensor | None = None) -> torch.Tensor:
    """Row norms of ``W0 + P Q`` (float32 at least) without forming it:
    ``||W0_i||^2 + 2 <W0_i, (P Q)_i> + ||(P Q)_i||^2``, the cross term from ``W0 Q^T`` (out x k). ``w0_sq``:
    ``||W0_i||^2`` computed before (:func:`frozen_row_sq_norms`); without it, it costs an out x in temporary. A
    low-precision ``W0`` is cast for the cross term, which is another."""
    dtype = torch.float64 if torch.float64 in (w0.dtype, p.dtype) else torch.float32
    w0, p, q = w0.to(dtype), p.to(dtype), q.to(dtype)
    w0_sq = w0.square().sum(1) if w0_sq is None else w0_sq.to(dtype)
    sq = w0_sq + 2 * ((w0 @ q.T) * p).sum(1) + lowrank_row_sq_norms(p, q)
    return sq.clamp_min(0).sqrt()


def dora_term(
    out: Tensor,
    x: Tensor,
    factors: tuple[Tensor, ...],
    bias: Tensor | None,
    ratio: Tensor,
    inv_norm: Tensor,
    magnitude: Tensor,
) -> Tensor:
    """A DoRA layer's output at base weight ``W0 + eps`` (the authors' rule), from PEFT's output at ``W0``:
    ``b + (m / n~) (W' x + eps x) = b + (n / n~) (y - b) + (m / n~) (eps x)``, with ``y - b = (m / n) W' x`` and
    the row norms ``n``, ``n~`` constants (DoRA detaches them), so the gradients of m, A and B are DoRA's at the
    perturbed base weight. Valid for one active adapter without LoRA dropout (checked at construction)."""
    term = apply_function(WeightSpaceTerm, None, x, *factors)  # eps x = c s (m_B (A x) + B (m_A x)), eq. (6)
    with torch.autocast(x.device.type, enabled=False):
        clean = out if bias is None else out - bias
        scaled = ratio.to(out.dtype) * clean + ((magnitude * inv_norm.to(magnitude.dtype)) * term).view(out.shape).to(
            out.dtype
        )
    return scaled if bias is None else scaled + bias


def apply_function(function: type[torch.autograd.Function], *args: Tensor | None) -> Tensor:
    """``function.apply(*args)``: the output of a custom autograd function of ours (one tensor)."""
    out: Tensor = function.apply(*args)  # type: ignore[no-untyped-call]  # torch leaves Function.apply unannotated
    return out
