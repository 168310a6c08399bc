"""MGPO: momentum-guided perturbation with adaptive perturbation normalization (paper Section 3.2, eqs. 3-8).

One forward/backward per step. ``space="weight"`` (the default, the paper's algorithm): for every vanilla LoRA
layer ``l`` (one module and adapter, ``W0 + s B A``) the forward of step t+1 runs at ``W0 + s B A + eps_l`` with

    D_l   = s (m_B A + B m_A)                                  (momentum direction in weight space, eq. 6)
    eps_l = -rho k_l D_l / ||D_l||,  k_l = min(1/gbar_l, max_scale)           (eq. 4, norm="layer")

``eps_l x = c_l s (m_B (A x) + B (m_A x))`` is added to the layer's output by a forward hook: a rank-2r term, so
nothing of size out x in is formed, no weight is written and nothing is copied. Its Frobenius norm comes from r x r
Gram blocks of ``m_B, B`` and ``A, m_A``, layers of equal shapes batched. A DoRA layer gets the same ``eps_l`` in its
base weight, as the authors' code does, through its row norms (``_dora_term``). AdaLoRA factors, DoRA with LoRA
dropout and full fine-tuning's tensors are layers of their own with ``D = m``, moved in place and restored exactly
from a copy. Other trainable tensors next to LoRA layers (a head, ``modules_to_save``) are not perturbed, as in the
authors' code, unless ``perturb_non_lora=True``.

``space="factors"`` moves the trainable tensors themselves along their momentum: Momentum-SAM's algorithm
(:class:`MSAM`). docs/method.md has every equation next to the line implementing it.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable

import torch
import torch.nn.functional as F
from torch import nn

from mgpo.optim._base import HookState, Installed, PerturbedOptimizer, check_range, moment_key
from mgpo.optim.configs import (APN_MODES, GBAR_UPDATES, NORMS, PRESETS, PROFILES,  # noqa: F401  (with the configs)
                                SPACES)
from mgpo.optim.distributed import local
from mgpo.optim.layers import (dora_weight_space_refusal, is_dora, is_quantized, lora_pairs, lowrank_row_sq_norms,
                               lowrank_sq_norms)

_TINY = 1e-12  # added to every denominator (docs/method.md)


def profile(name: str, beta2: float = 0.999) -> dict:
    """MGPO keywords for a paper profile, AdamW's ``betas=(mu, beta2)`` included: ``MGPO(model, **profile("nlg"))``."""
    if name not in PROFILES:
        raise ValueError(f"profile={name!r} is unknown: choose one of {', '.join(map(repr, PROFILES))}.")
    p = PROFILES[name]
    return {"rho": p["rho"], "beta": p["beta"], "betas": (p["mu"], beta2)}


def preset(name: str) -> dict | None:
    """MGPO keywords of an ablation arm (``None``: train with the plain base optimizer)."""
    if name not in PRESETS:
        raise ValueError(f"preset={name!r} is unknown: choose one of {', '.join(map(repr, PRESETS))}.")
    return None if PRESETS[name] is None else dict(PRESETS[name])


class _WeightSpaceTerm(torch.autograd.Function):
    """``out + eps_l x`` as one autograd node: ``eps_l x = c_l s [m_B, B] ([A; m_A] x)`` (eq. 6), with ``cs = c_l s``.

    Its inputs are the factors and momenta themselves (whole, gathered once per step under FSDP), constants of the
    window: no gradient reaches them, so the factors' own gradients stay those of the loss at the perturbed weight.
    ``U = [m_B, B]`` (out x 2r) and ``V = [A; m_A]`` (2r x in) are concatenated where a pass needs them and dropped
    after it: each pass is two products with an inner size of 2r, each reading ``x`` (or the output gradient) once,
    and nothing is held between passes or saved beyond references to tensors that exist anyway. ``out=None``
    returns ``eps_l x`` alone (DoRA). Computed in the factors' dtype, outside autocast.
    """

    @staticmethod
    def forward(ctx, out, x, a, m_a, b, m_b, cs):
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
    def backward(ctx, grad):
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


def _row_norms(w0: torch.Tensor, p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """Row norms of ``W0 + P Q`` (float32 at least) without forming it:
    ``||W0_i||^2 + 2 <W0_i, (P Q)_i> + ||(P Q)_i||^2``, the cross term from ``W0 Q^T`` (out x k)."""
    dtype = torch.float64 if torch.float64 in (w0.dtype, p.dtype) else torch.float32
    w0, p, q = w0.to(dtype), p.to(dtype), q.to(dtype)
    sq = w0.square().sum(1) + 2 * ((w0 @ q.T) * p).sum(1) + lowrank_row_sq_norms(p, q)
    return sq.clamp_min(0).sqrt()


def _dora_term(out, x, factors, bias, ratio, inv_norm, magnitude):
    """A DoRA layer's output at base weight ``W0 + eps`` (the authors' rule), from PEFT's output at ``W0``:
    ``b + (m / n~) (W' x + eps x) = b + (n / n~) (y - b) + (m / n~) (eps x)``, with ``y - b = (m / n) W' x`` and
    the row norms ``n``, ``n~`` constants (DoRA detaches them), so the gradients of m, A and B are DoRA's at the
    perturbed base weight. Valid for one active adapter without LoRA dropout (checked at construction)."""
    term = _WeightSpaceTerm.apply(None, x, *factors)  # eps x = c s (m_B (A x) + B (m_A x)), eq. (6)
    with torch.autocast(x.device.type, enabled=False):
        clean = out if bias is None else out - bias
        scaled = ratio.to(out.dtype) * clean + ((magnitude * inv_norm.to(magnitude.dtype)) * term).view(
            out.shape).to(out.dtype)
    return scaled if bias is None else scaled + bias


def _term_hook(shared: HookState, key: int):
    """The forward hook adding a LoRA module's pending weight-space term. Unlike the model's pre-hook it may be traced
    by torch.compile (one graph for the whole model): it only reads ``shared``, on whose attributes dynamo guards, and
    the term's U, V are graph inputs, new every step. It holds ``shared``, never the optimizer."""

    def hook(module, args, kwargs, output):
        if module.training:
            shared.saw_layer = True  # the hook guard (PerturbedOptimizer._check_hooks_ran): this hook does run
        terms = shared.terms.get(key) if shared.applied and shared.terms else None
        if not terms or getattr(module, "disable_adapters", False):
            return None
        x = args[0] if args else kwargs["x"]
        active = module.active_adapters
        for adapter, factors, dora in terms:
            if adapter not in active:
                continue
            if dora is None:  # eq. (6): eps_l x = c_l s (m_B (A x) + B (m_A x)), before LoRA dropout
                output = _WeightSpaceTerm.apply(output, x, *factors)
            else:
                if len(active) > 1:
                    raise RuntimeError(
                        f"MGPO: DoRA adapter {adapter!r} is active together with {active} on one layer; the "
                        "weight-space DoRA rule needs it alone. Activate one adapter, or use space='factors'.")
                output = _dora_term(output, x, factors, module.get_base_layer().bias, *dora)
        return output

    return hook


class MGPO(PerturbedOptimizer):
    """LoRA-MGPO around any ``torch.optim`` optimizer. Defaults are the paper's.

    Args:
        params: the model (recommended: its LoRA layers are found and the perturbation is applied in its
            forward), or parameters / param groups together with ``model=``.
        base_optimizer: the optimizer class doing the update (AdamW); ``**base_kwargs`` go to it. A base argument
            whose name MGPO uses too (SGD's ``momentum``) goes in ``base_kwargs={...}``.
        rho: perturbation radius (>= 0). 0 gives exactly the base optimizer.
        beta: EMA factor of the per-layer weight-space gradient norm, in [0, 1) (eq. 8).
        apn: adaptive perturbation normalization: "inverse" (eq. 4: radius scaled by min(1/gbar_l, max_scale)),
            "off" (no APN: Momentum-SAM's radius) or "normalized" (1/gbar_l re-weighting, total radius rho).
            Not the paper's, candidate rules for a radius that transfers across model scale: "weight" (k_l =
            ||W_l||, the layer's clean weight norm: rho is relative to it) and "update" (k_l = the size of the
            layer's last update ||W_l(t) - W_l(t-1)||: a look-ahead of rho steps). docs/method.md, section 13.
        norm: "layer" (each layer its own radius rho k_l, the authors' code) or "global" (total radius rho).
        max_scale: cap of the APN factor 1/gbar_l (> 0; None: no cap).
        momentum: "optimizer" to use the base optimizer's first moment (AdamW's exp_avg: set ``betas=(mu, ...)``),
            or a float mu in [0, 1) for MGPO's own buffer ``v = mu v + g`` (eq. 5).
        space: "weight" (the paper: eps in each LoRA layer's weight space) or "factors" (move every trained tensor
            along its momentum: Momentum-SAM's algorithm).
        perturb_non_lora: with ``space="weight"``, also perturb the trainable tensors of a LoRA model that are not
            LoRA factors (a classification head, ``lm_head``, ``modules_to_save``), each in place with ``D = m``.
            Default False: the authors' code perturbs LoRA layers only. Without LoRA layers (full fine-tuning)
            every trained tensor is perturbed.
        gbar_update: "step" (default): gbar is updated once per optimizer step, from the accumulated gradient as
            it was before any clipping (call ``opt.record_gradients()`` before ``clip_grad_norm_``; the trainer
            integrations do). "micro_batch": the authors' schedule, gbar updated after every micro-batch from
            the gradient accumulated so far (call ``opt.record_gradients()`` after each ``backward()``), and the
            pending perturbation re-scaled with it. Without gradient accumulation the two are the same.
        model: the model, when ``params`` are tensors or groups.
        auto_perturb: apply the pending perturbation at the first training-mode forward of each step (needs the
            model). Without it call ``opt.perturb()`` before the forward yourself.
        exact_restore: tensors moved in place are restored from a copy (bit-exact). Default: on, except for full
            fine-tuning in fp32/fp64, where a copy would double the model's memory and the perturbation is
            subtracted again instead (exact to a few ulp; docs/method.md).
        diagnostics: also compute each layer's radius relative to its weight norm and to its last update, and the
            APN factor, every step, summarised over the perturbed layers in ``last_stats`` (``radius_to_weight_mean``
            / ``_max``, ``radius_to_update_mean`` / ``_max``, ``apn_factor_mean`` / ``_min``). Costs a copy of the
            trained tensors and one out x in x r product per LoRA layer per step. Left out under FSDP (warned).
    """

    def __init__(
        self,
        params: Iterable[torch.Tensor] | Iterable[dict] | nn.Module,
        base_optimizer: type[torch.optim.Optimizer] = torch.optim.AdamW,
        *,
        rho: float = 0.05,
        beta: float = 0.9,
        apn: str = "inverse",
        norm: str = "layer",
        max_scale: float | None = 10.0,
        momentum: str | float = "optimizer",
        space: str = "weight",
        model: nn.Module | None = None,
        auto_perturb: bool = True,
        perturb_non_lora: bool = False,
        gbar_update: str = "step",
        exact_restore: bool | None = None,
        diagnostics: bool = False,
        **base_kwargs,
    ):
        check_range("rho", rho, 0.0, float("inf"))
        check_range("beta", beta, 0.0, 1.0)
        if max_scale is not None:
            check_range("max_scale", max_scale, 0.0, float("inf"), low_open=True)
        for name, value, allowed in (("apn", apn, APN_MODES), ("norm", norm, NORMS), ("space", space, SPACES),
                                     ("gbar_update", gbar_update, GBAR_UPDATES)):
            if value not in allowed:
                raise ValueError(f"{name}={value!r} is invalid: choose one of {', '.join(map(repr, allowed))}.")
        if momentum != "optimizer":
            if isinstance(momentum, str):
                raise ValueError(
                    f"momentum={momentum!r} is invalid: use 'optimizer' (reuse the base optimizer's momentum) "
                    "or a float mu in [0, 1)."
                )
            check_range("momentum", momentum, 0.0, 1.0)
        for name, value in (("perturb_non_lora", perturb_non_lora), ("diagnostics", diagnostics)):
            if not isinstance(value, bool):
                raise ValueError(f"{name}={value!r} is invalid: use True or False.")
        if exact_restore is not None and not isinstance(exact_restore, bool):
            raise ValueError(f"exact_restore={exact_restore!r} is invalid: use True, False or None (automatic).")
        hparams = dict(rho=rho, beta=beta, apn=apn, norm=norm, max_scale=max_scale, momentum=momentum, space=space,
                       perturb_non_lora=perturb_non_lora, gbar_update=gbar_update, diagnostics=diagnostics)
        super().__init__(params, base_optimizer, hparams, model=model, auto_perturb=auto_perturb, **base_kwargs)
        self._moment = moment_key(self.base_optimizer) if momentum == "optimizer" else "momentum"
        self._exact_arg = exact_restore
        self.gbar: torch.Tensor | None = None  # per-layer EMA of weight-space gradient norms (eq. 8)
        self._seen: torch.Tensor | None = None  # which layers have had a first gradient
        self._coef: torch.Tensor | None = None  # c_l of the pending perturbation (eps_l = c_l D_l)
        self._clean: list[torch.Tensor] | None = None
        self._gathered: list[tuple] | None = None  # FSDP: whole (A, g_A) of every pair with a gradient (eq. 8)
        self._recorded: tuple[torch.Tensor, torch.Tensor] | None = None  # (n_l, has_grad) from record_gradients()
        self._direction: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None  # (d_l, ||D||^2, has_m)
        self._pending_norm: torch.Tensor | None = None  # ||eps|| of the pending perturbation
        self._recorded_micro = False  # record_gradients() updated gbar in this step (gbar_update="micro_batch")
        self._sizes: dict[str, torch.Tensor] = {}  # per-layer ||W_l||, ||last update of W_l|| (apn weight/update)
        self._setup_layers()

    # ------------------------------------------------------------------------------- which tensor is where
    def _setup_layers(self) -> None:
        trainable = {id(p) for g in self.param_groups for p in g["params"]}
        index = {key: i for i, key in enumerate(self.layers)}
        weight_space = self.model is not None and self.hparams["space"] == "weight"
        pairs = lora_pairs(self.model, trainable) if weight_space else []
        doras = lora_pairs(self.model, trainable, dora=True) if weight_space else []
        refused = {key: why for key, m, a in doras if (why := dora_weight_space_refusal(m, a))}
        if refused:  # these DoRA layers keep the factor-space rule (A, B, magnitude moved in place): say so
            key, why = next(iter(refused.items()))
            warnings.warn(
                f"MGPO: {len(refused)} DoRA layer(s) ({key}: {why}) cannot get the authors' weight-space rule exactly "
                "and are perturbed in factor space instead (A, B and the magnitude moved along their momentum); "
                "docs/method.md, section 5.", RuntimeWarning, stacklevel=3)
        if weight_space:  # LoRA on a layer that is no nn.Linear (GPT-2's Conv1D, Conv2d): the factor-space rule
            other = [f"{name} ({type(m.get_base_layer()).__name__})" for name, m in self.model.named_modules()
                     if hasattr(m, "lora_A") and hasattr(m, "get_base_layer")
                     and not isinstance(m.get_base_layer(), (nn.Linear, nn.Embedding))
                     and any(id(p) in trainable for p in m.parameters())]
            if other:
                warnings.warn(
                    f"MGPO: {len(other)} LoRA layer(s) wrap a base layer that is not an nn.Linear (e.g. {other[0]}) "
                    "and cannot get the weight-space rule; they are perturbed in factor space instead (A and B moved "
                    "along their momentum); docs/method.md, section 5.", RuntimeWarning, stacklevel=3)
        if self.hparams["apn"] in ("weight", "update") and self.exchange.sharded:
            raise ValueError(f"MGPO: apn={self.hparams['apn']!r} needs each layer's whole weight and last update, "
                             "which are not computed under FSDP; use apn='inverse' (or 'off', 'normalized').")
        if self.hparams["diagnostics"] and self.exchange.sharded:  # on by default in the CLI: off here, said once
            self.hparams["diagnostics"] = False
            warnings.warn("MGPO: diagnostics (radius_to_weight_*, radius_to_update_*, apn_factor_*) are not computed "
                          "under FSDP and are left out of the statistics.", RuntimeWarning, stacklevel=3)
        if doras and self.exchange.sharded:
            raise ValueError("MGPO: DoRA layers under FSDP are not supported in weight space (their row norms need "
                             "the whole base weight); pass space='factors'.")
        pairs = [pr for pr in pairs if pr[0] in index] + [pr for pr in doras if pr[0] in index and pr[0] not in refused]
        # (layer index, module, adapter, A, B, scaling s) of every layer perturbed in weight space
        self._pairs = [(index[key], m, a, m.lora_A[a].weight, m.lora_B[a].weight, float(m.scaling[a]))
                       for key, m, a in pairs]
        # DoRA pairs (the authors' rule: eps added to the base weight, the magnitude not perturbed): pair index ->
        # the magnitude vector
        self._dora = {i: m.lora_magnitude_vector[a].weight for i, (_, m, a, *_) in enumerate(self._pairs)
                      if is_dora(m, a)}
        in_pairs = {id(t) for pr in self._pairs for t in pr[3:5]} | {id(t) for t in self._dora.values()}
        lora = bool(self._pairs) or any("[" in key for key in self.layers)  # "module[adapter]": a LoRA layer
        # Which other tensors are moved in place: (layer index, tensor). Next to LoRA layers in weight space, only
        # LoRA tensors (DoRA, AdaLoRA factors), unless perturb_non_lora: the authors perturb nothing else.
        keep_all = self.hparams["space"] == "factors" or self.hparams["perturb_non_lora"] or not lora
        self._inplace = [(index[key], p) for key, ps in self.layers.items() for p in ps
                         if id(p) not in in_pairs and (keep_all or "[" in key)]
        self._unperturbed = [key for key in self.layers if not (keep_all or "[" in key)]
        self._layer_of = {id(p): i for i, p in self._inplace}
        self._perturbable = {id(t) for pr in self._pairs for t in pr[3:5]} | set(self._layer_of)
        full_ft = self.model is not None and not lora
        self._exact = self._exact_arg if self._exact_arg is not None else not (
            full_ft and all(p.dtype in (torch.float32, torch.float64) for _, p in self._inplace))
        self._terms = None
        self._index_cache: dict = {}
        self._w0_sq: dict[int, torch.Tensor] = {}  # ||W0||^2 of each pair's frozen base weight, computed once
        quantized = [key for key, m, _ in pairs if is_quantized(m)]
        if self.hparams["apn"] == "weight" and quantized:
            raise ValueError(f"MGPO(apn='weight') needs each layer's base weight W0, and {quantized[0]} (and "
                             f"{len(quantized) - 1} more) is quantized; use apn='inverse' or 'update'.")
        if self.hparams["diagnostics"] and quantized:
            warnings.warn(f"MGPO(diagnostics=True): {len(quantized)} layer(s) have a quantized base weight (e.g. "
                          f"{quantized[0]}); their radius relative to the weight norm is left out of "
                          "radius_to_weight_*.", RuntimeWarning, stacklevel=3)
        self._device = next((p.device for g in self.param_groups for p in g["params"]), torch.device("cpu"))
        self._install_method_hooks()

    @property
    def _terms(self) -> dict[int, list] | None:
        """The pending weight-space terms: module id -> [(adapter, (A, m_A, B, m_B, c_l s), DoRA scales or None)]."""
        return self._shared.terms

    @_terms.setter
    def _terms(self, value: dict[int, list] | None) -> None:
        self._shared.terms = value

    def _install_method_hooks(self) -> None:
        """The weight-space term's forward hooks, and merge guards on layers whose factors are moved in place
        (factor space, the DoRA/AdaLoRA fallback); those of a previous set-up are removed first."""
        for handle in getattr(self, "_term_hooks", []):
            handle.remove()
            if handle in self._hooks:
                self._hooks.remove(handle)
        self._term_hooks = []
        for module in {id(m): m for _, m, *_ in self._pairs}.values():
            hook = _term_hook(self._shared, id(module))
            self._term_hooks.append(module.register_forward_hook(Installed(hook), with_kwargs=True))
        self._term_hooks += self._guard_merges({id(p) for _, p in self._inplace})
        self._hooks += self._term_hooks

    def _moments(self, tensors: list[torch.Tensor]) -> list[torch.Tensor | None]:
        owner = self.base_optimizer.state if self.hparams["momentum"] == "optimizer" else self.state
        # A tensor frozen since (requires_grad False) gets no update, so its old momentum is no direction: the layer
        # is left clean rather than moved by a constant offset every step.
        moments = [owner[p].get(self._moment) if p in owner and p.requires_grad else None for p in tensors]
        if self.hparams["momentum"] == "optimizer":
            stateful = next((p for p, m in zip(tensors, moments) if m is None and p.requires_grad and owner.get(p)),
                            None)
            if stateful is not None:  # the base optimizer keeps state, but not its momentum under this name
                raise TypeError(
                    f"momentum='optimizer' reuses the base optimizer's first moment (state entry {self._moment!r}), "
                    f"but {type(self.base_optimizer).__name__} keeps its state as {sorted(owner[stateful])} (e.g. "
                    "bitsandbytes' 8-bit optimizers: a quantized 'state1'), so nothing would be perturbed and this "
                    "would train as the plain base optimizer. Fix: pass momentum=0.9 so MGPO keeps its own momentum "
                    "buffer (paper eq. 5), or use torch's AdamW, Adam or SGD with momentum>0.")
        return moments

    def _would_perturb(self) -> bool:
        return self.hparams["rho"] > 0

    def _has_layer_hooks(self) -> bool:
        return bool(self._pairs)

    # ------------------------------------------------------------------------------- perturbation, eq. (6)
    def _direction_factors(self, parts: torch.Tensor | None = None):
        """``(A, m_A, B, m_B)`` of every pair whose momentum exists (``D_l = s (m_B A + B m_A)``), which pairs, and
        ``parts`` summed over the ranks. Without FSDP these are the tensors themselves (no copy). Under FSDP they
        are gathered whole first, in one collective (LoRA-sized) that also carries ``parts``, so every rank holds
        the same factors and computes the same ||D_l|| without a reduction."""
        flat, with_m = [], []
        for i, (_, _, _, a, b, _) in enumerate(self._pairs):
            m_a, m_b = self._moments([a, b])
            if m_a is not None and m_b is not None:
                flat += [a, m_a, b, m_b]
                with_m.append(i)
        flat, parts = self.exchange.full_and_sum(flat, parts)
        factors = [(a.detach(), m_a, b.detach(), m_b)  # detached: the term's node does not reach A, B
                   for a, m_a, b, m_b in zip(flat[0::4], flat[1::4], flat[2::4], flat[3::4])]
        return factors, with_m, parts

    def _build_terms(self, factors=None, with_m=None) -> None:
        """The pending weight-space terms per module: the layer's ``(A, m_A, B, m_B)`` (references, no copy; the
        whole gathered tensors under FSDP) and ``c_l s`` (a device scalar), and DoRA's scales."""
        self._terms = {}
        if self._coef is None or not self._pairs:
            return
        if factors is None:  # after a load: from the current factors and momenta
            factors, with_m, _ = self._direction_factors()
        if not factors:
            return
        index = self._cached_index(tuple(self._pairs[i][0] for i in with_m))
        scale = self._cached(tuple(self._pairs[i][5] for i in with_m), self._coef.dtype)
        cs = (self._coef[index] * scale).unbind()  # c_l s, eq. (6)
        for f, i, c in zip(factors, with_m, cs):
            _, module, adapter, *_ = self._pairs[i]
            dora = self._dora_scales(i, module, f, c) if i in self._dora else None
            self._terms.setdefault(id(module), []).append((adapter, (*f, c), dora))

    def _dora_scales(self, i, module, factors, c):
        """The authors' rule on a DoRA layer: the forward runs at base weight ``W0 + eps``, so DoRA's row norms become
        ``n~ = ||W0 + s B A + eps||_row``. Returns ``(n / n~, 1 / n~, magnitude)`` for :func:`_dora_term`, with
        ``n~`` from ``W0 + [sB + c s m_B, c s B] [A; m_A]`` (rank 2r, no out x in matrix)."""
        a, m_a, b, m_b = factors
        s = self._pairs[i][5]
        w0 = module.get_base_layer().weight
        cs = c.to(b.dtype)
        n = _row_norms(w0, s * b, a)
        n_t = _row_norms(w0, torch.cat([s * b + m_b * cs, b * cs], 1), torch.cat([a, m_a]))
        ratio = torch.where(c == 0, torch.ones_like(n), n / n_t)  # unperturbed: exactly DoRA's own output
        return ratio, 1.0 / n_t, self._dora[i]

    def _inplace_pending(self):
        """Tensors moved in place, their momenta and coefficients; this rank's shards under FSDP (the same
        ``c_l`` on every rank moves every shard consistently)."""
        ps = [p for _, p in self._inplace]
        moments = self._moments(ps)
        keep = [j for j, m in enumerate(moments) if m is not None]
        layer = self._cached_index(tuple(self._inplace[j][0] for j in keep))
        coefs = self._coef[layer].unbind() if keep else []
        return [local(ps[j]) for j in keep], [local(moments[j]) for j in keep], list(coefs)

    def _cached_index(self, layers: tuple) -> torch.Tensor:
        return self._cached(layers, torch.long)

    def _cached(self, values: tuple, dtype: torch.dtype) -> torch.Tensor:
        """``values`` as a device tensor, made once: no host-to-device copy (a wait on a GPU) in later steps."""
        key = (values, dtype)
        if key not in self._index_cache:
            if len(self._index_cache) >= 256:  # layers whose gradients come and go (MoE): keep it bounded
                self._index_cache.clear()
            self._index_cache[key] = torch.tensor(values, dtype=dtype, device=self._device)
        return self._index_cache[key]

    def _apply(self) -> None:
        if self._coef is None:  # first step: no momentum yet, no perturbation
            return
        if self._terms is None:  # after a load: rebuilt from the current factors and momenta
            self._build_terms()
        ps, moments, coefs = self._inplace_pending()
        if not ps:
            return
        self._clean = torch._foreach_mul(ps, 1.0) if self._exact else None  # exact copy of the clean values
        torch._foreach_addcmul_(ps, moments, [c.to(p.dtype) for c, p in zip(coefs, ps)])  # eq. (6): W~ = W + c_l m

    def _remove(self) -> None:
        if self._coef is None:
            return
        ps, moments, coefs = self._inplace_pending()
        if not ps:
            return
        if self._clean is not None:
            torch._foreach_copy_(ps, self._clean)  # eq. (7): back to the clean W, exactly
            self._clean = None
        else:  # full fine-tuning in fp32 (docs/method.md): W = W~ - c_l m, exact to a few ulp
            torch._foreach_addcmul_(ps, moments, [-c.to(p.dtype) for c, p in zip(coefs, ps)])

    # ------------------------------------------------------------------------------- the step
    def _layer_sq_sums(self, layers: list[int], norms: torch.Tensor, n_layers: int) -> torch.Tensor:
        """Per-layer sums of squared tensor norms (``norms[j]`` belongs to layer ``layers[j]``)."""
        out = torch.zeros(n_layers, device=norms.device, dtype=norms.dtype)
        if layers:
            out.index_add_(0, self._cached_index(tuple(layers)), norms.square())
        return out

    def _grad_owners(self) -> list[int]:
        return [i for i, (_, _, _, a, b, _) in enumerate(self._pairs) if a.grad is not None or b.grad is not None]

    def _grad_v(self, owners: list[int]) -> list:
        """``[A; g_A]`` (whole) of every pair with a gradient; a missing gradient is zero."""
        flat = []
        for i in owners:
            _, _, _, a, b, _ = self._pairs[i]
            flat += [a, a.grad if a.grad is not None else torch.zeros_like(a)]
        return flat

    def _sum_over_ranks(self, parts: torch.Tensor) -> torch.Tensor:
        """Under FSDP the gradient norms' partial sums ride on the gather of ``[A; g_A]`` that eq. (8) needs (one
        collective before the base step; an all-reduce only when there is nothing to gather)."""
        flat, parts = self.exchange.full_and_sum(self._grad_v(self._grad_owners()), parts)
        self._gathered = list(zip(flat[0::2], flat[1::2]))
        return parts

    def _eq8_parts(self, owners: list[int], dtype: torch.dtype) -> torch.Tensor | None:
        """eq. (8) for every pair with a gradient, in ``owners`` order: ``||s (g_B A + B g_A)||^2``, from Gram blocks,
        layers of equal shapes batched (``layers.lowrank_sq_norms``). Under FSDP: this rank's rows of ``g_B`` and
        ``B`` against the whole ``A`` and ``g_A`` (gathered), partial sums that add up over the ranks."""
        if not owners:
            return None
        if self.exchange.sharded:
            whole = self._gathered
        else:
            flat = self._grad_v(owners)
            whole = list(zip(flat[0::2], flat[1::2]))
        items = []
        for (a, g_a), i in zip(whole, owners):
            b = self._pairs[i][4]
            g_b = local(b.grad) if b.grad is not None else torch.zeros_like(local(b))
            items.append(((g_b, a), (local(b), g_a)))
        self._gathered = None
        scale = self._cached(tuple(self._pairs[i][5] ** 2 for i in owners), dtype)
        return lowrank_sq_norms(items).to(dtype) * scale

    def _size_buffers(self, n_layers: int, device, dtype) -> None:
        if self.gbar is None or len(self.gbar) < n_layers:  # first step, or layers added since
            grow = n_layers - (0 if self.gbar is None else len(self.gbar))
            old = (self.gbar, self._seen) if self.gbar is not None else (
                torch.zeros(0, device=device, dtype=dtype), torch.zeros(0, dtype=torch.bool, device=device))
            self.gbar = torch.cat([old[0], torch.zeros(grow, device=device, dtype=dtype)])
            self._seen = torch.cat([old[1], torch.zeros(grow, dtype=torch.bool, device=device)])
            self._coef = None if self._coef is None else torch.cat([self._coef, torch.zeros(grow, device=device,
                                                                                               dtype=dtype)])

    def _eq8_inputs(self, params, grad_norms, n_layers, dtype):
        """Per-layer ``sum ||g||^2`` of the tensors moved in place, which layers have a gradient, the pairs with a
        gradient and their eq. (8) parts (not yet added: under FSDP they are per-rank partial sums)."""
        sel = [j for j, p in enumerate(params) if id(p) in self._layer_of]
        layers = [self._layer_of[id(params[j])] for j in sel]
        grad_sq = self._layer_sq_sums(layers, grad_norms[self._cached_index(tuple(sel))] if sel
                                      else grad_norms[:0], n_layers)
        has_grad = [False] * n_layers
        for i in layers:
            has_grad[i] = True
        owners = self._grad_owners()
        for i in owners:
            has_grad[self._pairs[i][0]] = True
        return grad_sq, has_grad, owners, self._eq8_parts(owners, dtype)

    def _ema(self, n: torch.Tensor, has_grad: torch.Tensor) -> None:
        """eq. (8): ``gbar_l = n_l`` at a layer's first gradient, then ``beta gbar_l + (1 - beta) n_l``."""
        beta = self.hparams["beta"]
        ema = torch.where(self._seen, beta * self.gbar + (1 - beta) * n, n)
        self.gbar = torch.where(has_grad, ema, self.gbar)
        self._seen = self._seen | has_grad

    @torch.no_grad()
    def record_gradients(self, scale: float | torch.Tensor = 1.0) -> None:
        """Take eq. (8)'s gradient norms ``n_l`` from the gradients as they are now.

        ``gbar_update="step"``: call it after the last ``backward()`` of a step and *before* gradient clipping;
        ``step()`` then updates gbar from these norms rather than from the clipped gradients, as the authors' code
        does (their EMA is updated in ``training_step``, before the HF Trainer clips). Without a call, ``step()``
        uses the gradients it is given. ``gbar_update="micro_batch"``: call it after every ``backward()``; gbar is
        updated at once from the gradient accumulated so far and the pending perturbation is re-scaled with it
        (the authors' per-micro-batch schedule). ``scale`` multiplies the norms (``1 / loss_scale`` for gradients
        still scaled by a GradScaler). The trainer integrations call it for you. Stays on the device.
        """
        params = self._params_with_grad()
        if not params:
            return
        self._check_layout(params)
        dist = torch.distributed
        if self.hparams["gbar_update"] == "micro_batch" and dist.is_available() and dist.is_initialized() \
                and dist.get_world_size() > 1:
            raise RuntimeError(
                "MGPO(gbar_update='micro_batch') is not supported on several processes: between synchronisations "
                "each rank holds only its own partial gradient, so the ranks' gbar (and perturbations) would "
                "differ. Use gbar_update='step' (the default).")
        norms = self._tensor_grad_norms(params)
        dtype = norms.dtype
        n_layers = len(self.layers)
        self._size_buffers(n_layers, norms.device, dtype)
        grad_sq, has_grad, owners, eq8 = self._eq8_inputs(params, norms, n_layers, dtype)
        if eq8 is not None:
            if self.exchange.sharded:
                eq8 = self.exchange.all_reduce(eq8)
            grad_sq.index_add_(0, self._cached_index(tuple(self._pairs[i][0] for i in owners)), eq8)
        n = grad_sq.sqrt() * scale
        has = self._cached(tuple(has_grad), torch.bool) & torch.isfinite(n)
        if self.hparams["gbar_update"] == "step":
            self._recorded = (n, has)
            return
        self._ema(n, has)  # the authors' schedule: after every micro-batch, then re-scale the pending perturbation
        self._recorded_micro = True
        if self._direction is not None and self._coef is not None:
            self.restore()  # re-applied with the new c_l at the next training forward
            self._set_coef()
            self._terms = None

    def _update(self, params: list[torch.Tensor], grad_norms: torch.Tensor, ok: torch.Tensor) -> None:
        hp = self.hparams
        device, dtype = grad_norms.device, grad_norms.dtype
        self._terms = None  # last step's U, V: not needed any more (the window is closed)
        # ||eps|| of the perturbation this step's forwards ran at (set up by the previous step), for its statistics:
        # the row of this step's loss. 0 when they ran at the clean weights (step 1, unperturbed()).
        ran_at = self._pending_norm if self._window_was_open and self._pending_norm is not None else None
        if self._perturbable and not any(id(p) in self._perturbable for p in params):
            self._warn_no_gradient("no layer it perturbs")
        n_layers = len(self.layers)
        self._size_buffers(n_layers, device, dtype)

        # eq. (8): n_l = ||grad of Delta W_l||; for a pair s ||g_B A + B g_A||, from Gram matrices (before the base
        # step changes A and B; under FSDP per-rank parts, summed in the gather after the base step). Taken from the
        # gradients as record_gradients() saw them (before clipping) when it was called in this step.
        recorded, self._recorded = self._recorded, None
        micro = hp["gbar_update"] == "micro_batch" and self._recorded_micro
        if hp["gbar_update"] == "micro_batch" and not micro and not getattr(self, "_warned_micro", False):
            self._warned_micro = True  # a host flag: no device read
            warnings.warn("MGPO(gbar_update='micro_batch'): opt.record_gradients() was not called after the "
                          "backward passes of this step, so gbar was updated once, from the step's gradient (the "
                          "'step' schedule). Call it after every backward() (the trainer integrations do). Warned "
                          "once.", RuntimeWarning, stacklevel=3)
        self._recorded_micro = False
        if recorded is not None or micro:
            self._gathered = None
            grad_sq, has_grad, owners, eq8 = None, None, [], None
        else:
            grad_sq, has_grad, owners, eq8 = self._eq8_inputs(params, grad_norms, n_layers, dtype)

        own = hp["momentum"] != "optimizer"
        if own:  # a skipped step must leave the own buffer as it was: blend with a finite gradient
            for p in params:
                local(p.grad).nan_to_num_(0.0, 0.0, 0.0)
        before = self._snapshot()  # the clean tensors before the update (apn="update", diagnostics)
        self._base_step(params, ok)  # docs/method.md: the base update of the clean weights with g_t

        if own:  # eq. (5): v_t = mu v_{t-1} + g_t (unchanged on a skipped step)
            moments = []
            for p in params:
                if "momentum" not in self.state[p]:
                    self.state[p]["momentum"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                moments.append(local(self.state[p]["momentum"]))
            mu = torch.full((), hp["momentum"], dtype=dtype, device=device)
            torch._foreach_mul_(moments, torch.where(ok, mu, 1.0))
            torch._foreach_add_(moments, torch._foreach_mul([local(p.grad) for p in params], ok.to(dtype)))

        # eq. (4)/(6): the direction D_l and its norm d_l for every layer. ||m||^2 of the tensors moved in place
        # (this rank's shards under FSDP) are summed over the ranks in the same collective as the LoRA gather.
        inplace = [(i, p) for i, p in self._inplace]
        moments = self._moments([p for _, p in inplace])
        m_norm = [(i, m) for (i, _), m in zip(inplace, moments) if m is not None]
        sharded = self.exchange.sharded
        m_part = None  # per-tensor momentum norms; squared (partial sums over the ranks) under FSDP
        if m_norm:
            m_part = torch.stack(torch._foreach_norm([local(m) for _, m in m_norm], dtype=dtype))
            m_part = m_part.square() if sharded else m_part
        if sharded:  # one collective after the base step: the LoRA gather, carrying eq. (8)'s and these parts
            both = [t for t in (m_part, eq8) if t is not None]
            factors, with_m, both = self._direction_factors(torch.cat(both) if both else None)
            if m_part is not None:
                m_part, both = both[:len(m_part)], both[len(m_part):]
            eq8 = both if eq8 is not None else None
        else:
            factors, with_m, _ = self._direction_factors()
        if eq8 is not None:
            grad_sq.index_add_(0, self._cached_index(tuple(self._pairs[i][0] for i in owners)), eq8)
        if recorded is not None:  # eq. (8) from the gradients before clipping
            self._ema(recorded[0], recorded[1] & ok)
        elif not micro:  # (micro_batch: already updated after each micro-batch)
            self._ema(grad_sq.sqrt(), self._cached(tuple(has_grad), torch.bool) & ok)  # a skipped step: no EMA

        d_sq = torch.zeros(n_layers, device=device, dtype=dtype)
        if factors:  # ||D_l||^2 = s^2 ||m_B A + B m_A||^2, from Gram blocks, layers of equal shapes batched
            scale = self._cached(tuple(self._pairs[i][5] ** 2 for i in with_m), dtype)
            d_sq.index_add_(0, self._cached_index(tuple(self._pairs[i][0] for i in with_m)),
                            lowrank_sq_norms([((m_b, a), (b, m_a)) for a, m_a, b, m_b in factors]).to(dtype) * scale)
        has_m = [False] * n_layers
        for i in with_m:
            has_m[self._pairs[i][0]] = True
        if m_norm:
            norms = m_part.sqrt() if sharded else m_part
            d_sq += self._layer_sq_sums([i for i, _ in m_norm], norms, n_layers)
            for i, _ in m_norm:
                has_m[i] = True
        self._direction = (d_sq.sqrt(), d_sq, self._cached(tuple(has_m), torch.bool))
        self._sizes = self._layer_sizes(before, n_layers, device, dtype)
        self._set_coef()
        self._stats["perturbation_norm"] = ran_at if ran_at is not None else torch.zeros((), device=device,
                                                                                          dtype=dtype)
        self._build_terms(factors, with_m)

    def _snapshot(self) -> tuple[list, list] | None:
        """Copies of every pair's (A, -B) and of the tensors moved in place, when the last update's size is needed."""
        if not (self.hparams["apn"] == "update" or self.hparams["diagnostics"]):
            return None
        return ([(a.detach().clone(), b.detach().neg()) for _, _, _, a, b, _ in self._pairs],
                [p.detach().clone() for _, p in self._inplace])

    @torch.no_grad()
    def _layer_sizes(self, before, n_layers: int, device, dtype) -> dict[str, torch.Tensor]:
        """Per layer, at the clean weights after the update: ``weight`` = ||W_l||_F (``W0 + s B A`` for a pair, the
        tensors themselves for a layer moved in place) and ``update`` = ||W_l - W_l(before the update)||_F. For a
        pair both come from Gram matrices and one ``W0 A^T`` product (nothing out x in is formed):
        ``||W0 + s B A||^2 = ||W0||^2 + 2 s <W0 A^T, B> + s^2 ||B A||^2``,
        ``||s (B A - B' A')|| = s ||B A + (-B') A'||``, the Gram parts of layers of equal shapes batched. NaN where a
        quantity is not available (a quantized base weight)."""
        hp = self.hparams
        want_weight = hp["apn"] == "weight" or hp["diagnostics"]
        want_update = before is not None
        if not (want_weight or want_update):
            return {}
        weight = torch.zeros(n_layers, device=device, dtype=dtype)
        update = torch.zeros(n_layers, device=device, dtype=dtype)
        if self._pairs:
            index = self._cached_index(tuple(i for i, *_ in self._pairs))
            s_sq = self._cached(tuple(s * s for *_, s in self._pairs), dtype)
            factors = [(a, b) for *_, a, b, _ in self._pairs]
        if self._pairs and want_weight:
            near = []  # ||W0||^2 + 2 s <W0 A^T, B>: one thin out x in x r product per layer
            for j, (_, module, _, a, b, s) in enumerate(self._pairs):
                if is_quantized(module):
                    near.append(torch.full((), float("nan"), device=device, dtype=dtype))
                    continue
                w0 = module.get_base_layer().weight
                w0 = w0.T if getattr(module, "fan_in_fan_out", False) else w0
                if j not in self._w0_sq:
                    self._w0_sq[j] = w0.detach().to(dtype).square().sum()
                cross = ((w0.detach().to(dtype) @ a.detach().to(dtype).T) * b.detach().to(dtype)).sum()
                near.append(self._w0_sq[j] + 2 * s * cross)
            ba = lowrank_sq_norms([((b, a),) for a, b in factors]).to(dtype)  # ||B A||^2
            weight.index_add_(0, index, torch.stack(near) + s_sq * ba)
        if self._pairs and want_update:
            moved = lowrank_sq_norms([((b, a), (nb0, a0)) for (a, b), (a0, nb0) in zip(factors, before[0])])
            update.index_add_(0, index, s_sq * moved.to(dtype))
        if self._inplace:
            index = self._cached_index(tuple(i for i, _ in self._inplace))
            ps = [p.detach() for _, p in self._inplace]
            if want_weight:
                weight.index_add_(0, index, torch.stack(torch._foreach_norm(ps, dtype=dtype)).square())
            if want_update:
                diffs = torch._foreach_sub(ps, before[1])
                update.index_add_(0, index, torch.stack(torch._foreach_norm(diffs, dtype=dtype)).square())
        out = {}
        if want_weight:
            out["weight"] = weight.clamp_min(0).sqrt()
        if want_update:
            out["update"] = update.sqrt()
        return out

    def _set_coef(self) -> None:
        """eq. (4)/(6): ``c_l`` (``eps_l = c_l D_l``) from the step's direction norms and the current gbar."""
        hp = self.hparams
        d, d_sq, has_m = self._direction
        rho, apn = hp["rho"], hp["apn"]
        inv = 1.0 / (self.gbar + _TINY)
        capped = torch.zeros_like(d, dtype=torch.bool)
        if apn == "inverse":  # eq. (4): k_l = min(1/gbar_l, max_scale); 1 before the layer's first EMA value
            k = inv if hp["max_scale"] is None else inv.clamp(max=hp["max_scale"])
            k = torch.where(self._seen, k, torch.ones_like(k))
            if hp["max_scale"] is not None:
                capped = self._seen & (inv >= hp["max_scale"])
        elif apn in ("weight", "update"):  # candidate rules (docs/method.md, section 13): rho relative to a size
            k = self._sizes[apn]
        else:
            k = torch.ones_like(d)
        if apn == "normalized":  # u_l = D_l / gbar_l, total radius rho
            ku = torch.where(self._seen, inv, torch.ones_like(inv))
            coef = -rho * ku / (((ku * d) ** 2).sum().sqrt() + _TINY)
        elif hp["space"] == "factors" and (apn == "off" or hp["norm"] == "global"):  # -rho k_l v / ||v||_all
            coef = -rho * k / (d_sq.sum().sqrt() + _TINY)
        elif hp["norm"] == "global":  # -rho k_l D_l / sqrt(sum ||k_l D_l||^2)
            coef = -rho * k / (((k * d) ** 2).sum().sqrt() + _TINY)
        else:  # -rho k_l D_l / ||D_l||: each layer its own radius
            coef = -rho * k / (d + _TINY)
        perturbed = has_m & (d > _TINY) & torch.isfinite(coef)
        self._coef = torch.where(perturbed, coef, torch.zeros_like(coef))
        self._pending_norm = (self._coef * d).square().sum().sqrt()  # ||eps|| of the next step's forwards

        seen = self._seen
        count = seen.sum().clamp_min(1)
        self._stats = {
            "momentum_norm": d_sq.sum().sqrt(),
            "gbar_min": torch.where(seen, self.gbar, torch.full_like(self.gbar, float("inf"))).min(),
            "gbar_mean": (self.gbar * seen).sum() / count,
            "gbar_max": (self.gbar * seen).max(),
            "apn_capped": capped.sum() / count,  # share of layers whose APN factor is at max_scale
        }
        if hp["diagnostics"]:
            self._stats.update(self._diagnostics(self._coef.abs() * d, k, perturbed))

    def _diagnostics(self, radius: torch.Tensor, k: torch.Tensor, perturbed: torch.Tensor) -> dict:
        """Means and extremes over the perturbed layers of ||eps_l|| / ||W_l||, ||eps_l|| / ||last update of W_l||
        and the APN factor k_l (NaN when no layer is perturbed yet). On the device."""
        nan = torch.full((), float("nan"), device=radius.device, dtype=radius.dtype)

        def summary(values, name, extreme):
            ok = perturbed & torch.isfinite(values)
            n = ok.sum()
            mean = torch.where(n > 0, torch.where(ok, values, 0).sum() / n.clamp_min(1), nan)
            fill = float("-inf") if extreme == "max" else float("inf")
            far = torch.where(ok, values, fill)
            ext = torch.where(n > 0, far.max() if extreme == "max" else far.min(), nan)
            return {f"{name}_mean": mean, f"{name}_{extreme}": ext}

        out = summary(radius / self._sizes["weight"], "radius_to_weight", "max")
        out.update(summary(radius / self._sizes["update"], "radius_to_update", "max"))
        out.update(summary(k, "apn_factor", "min"))
        return out

    # ------------------------------------------------------------------------------- checkpoints
    def _extra_state(self) -> dict:
        return {**super()._extra_state(), "gbar": self.gbar, "seen": self._seen, "coef": self._coef,
                "direction": self._direction, "sizes": self._sizes}

    def _load_extra_state(self, extra: dict) -> None:
        super()._load_extra_state(extra)
        self.gbar, self._seen, self._coef = extra["gbar"], extra["seen"], extra.get("coef")
        self._direction = extra.get("direction")
        ready = self._coef is not None and self._direction is not None and self._coef.shape == self._direction[0].shape
        self._pending_norm = (self._coef * self._direction[0]).square().sum().sqrt() if ready else None
        self._sizes = extra.get("sizes") or {}
        self._terms = None  # rebuilt at the next perturb() from the loaded factors and momenta
        self._index_cache = {}
        hp = self.hparams
        diag = hp["diagnostics"]
        needed = {k for k in ("weight", "update") if hp["apn"] == k or diag}
        if self.gbar is not None and not needed <= set(self._sizes):
            # saved without the layer sizes (diagnostics off then, or an older mgpo): ||W_l|| is recomputed from the
            # weights loaded now (the model's state is loaded before the optimizer's, as the Trainer does), the last
            # update's size is gone (NaN until the next step). The pending perturbation keeps its saved c_l.
            n_layers = len(self.layers)
            self._sizes = self._layer_sizes(None, n_layers, self.gbar.device, self.gbar.dtype)
            self._sizes["update"] = torch.full((n_layers,), float("nan"), device=self.gbar.device,
                                               dtype=self.gbar.dtype)
            if hp["apn"] == "update" and hp["gbar_update"] == "micro_batch":
                warnings.warn("MGPO(apn='update', gbar_update='micro_batch'): this checkpoint does not hold the size "
                              "of each layer's last update, which re-scaling the pending perturbation after a "
                              "micro-batch needs; the first step after the resume trains at the clean weights.",
                              RuntimeWarning, stacklevel=3)

    def add_param_group(self, param_group: dict) -> None:
        super().add_param_group(param_group)
        if hasattr(self, "_moment"):
            self._setup_layers()


class MSAM(MGPO):
    """Momentum-SAM (Becker et al. 2024): MGPO in factor space, no APN, one global norm, the optimizer's momentum."""

    FIXED = ("apn", "momentum", "beta", "space", "norm", "max_scale")  # MGPO's settings MSAM sets itself

    @classmethod
    def settings(cls) -> list[str]:
        return [name for name in MGPO.settings() if name not in cls.FIXED]

    def __init__(self, params, base_optimizer=torch.optim.AdamW, *, rho: float = 0.05, **kwargs):
        for fixed in self.FIXED:
            if fixed in kwargs:
                raise ValueError(f"MSAM fixes {fixed}; use mgpo.MGPO to choose {fixed}={kwargs[fixed]!r}.")
        super().__init__(params, base_optimizer, rho=rho, apn="off", momentum="optimizer", space="factors",
                         norm="global", **kwargs)
