"""MGPO: momentum-guided perturbation with adaptive perturbation normalization (paper Section 3.2, eqs. 3-8).

One forward/backward per step. ``space="weight"`` (the default, the paper's algorithm): for every vanilla LoRA
layer ``l`` (one module and adapter, ``W0 + s B A``) the forward of step t+1 runs at ``W0 + s B A + eps_l`` with

    D_l   = s (m_B A + B m_A)                                  (momentum direction in weight space, eq. 6)
    eps_l = -rho k_l D_l / ||D_l||,  k_l = min(1/gbar_l, max_scale)           (eq. 4, norm="layer")

``eps_l x = c_l s (m_B (A x) + B (m_A x))`` is added to the layer's output by a forward hook: a rank-2r term, so
nothing of size out x in is formed, no weight is written and nothing is copied. Its Frobenius norm comes from r x r
Gram blocks of ``m_B, B`` and ``A, m_A``, layers of equal shapes batched. A DoRA layer gets the same ``eps_l`` in its
base weight, as the authors' code does, through its row norms (``lowrank.dora_term``). AdaLoRA factors, DoRA with LoRA
dropout and full fine-tuning's tensors are layers of their own with ``D = m``, moved in place and restored exactly
from a copy. Other trainable tensors next to LoRA layers (a head, ``modules_to_save``) are not perturbed, as in the
authors' code, unless ``perturb_non_lora=True``.

``space="factors"`` moves the trainable tensors themselves along their momentum: Momentum-SAM's algorithm
(:class:`MSAM`). docs/method.md has every equation next to the function implementing it.

Where things are: the equations in :mod:`~mgpo.optim.functional`, the APN rules in :mod:`~mgpo.optim.apn`, which
layer is perturbed how in :mod:`~mgpo.optim.plan`, the weight-space term in :mod:`~mgpo.optim.weight_space` and
:mod:`~mgpo.optim.lowrank`, the statistics in :mod:`~mgpo.optim.diagnostics`. This class orchestrates a step.
"""

from __future__ import annotations

import dataclasses
import warnings
from typing import Any

import torch
from torch import Tensor, nn

from mgpo.optim import apn as rules
from mgpo.optim import functional as F
from mgpo.optim._base import Installed, Params, PerturbedOptimizer, check_range, moment_key
from mgpo.optim.configs import GBAR_UPDATES, NORMS, SPACES, MGPOConfig
from mgpo.optim.configs import PRESETS as PRESETS  # re-exported: older imports
from mgpo.optim.configs import PROFILES as PROFILES  # re-exported: older imports
from mgpo.optim.configs import preset as preset  # re-exported: older imports
from mgpo.optim.configs import profile as profile  # re-exported: older imports
from mgpo.optim.diagnostics import Snapshot, apn_statistics, layer_sizes, radius_diagnostics, snapshot
from mgpo.optim.distributed import local, local_grad
from mgpo.optim.lowrank import WeightSpaceTerm
from mgpo.optim.lowrank import dora_term as dora_term  # re-exported: older imports
from mgpo.optim.lowrank import row_norms as row_norms  # re-exported: older imports
from mgpo.optim.norms import GradNorms, add_pair_norms, direction, grad_owners, grad_v, gradient_norms, pair_grad_sq
from mgpo.optim.plan import DeviceConstants, LayerPlan, build_plan
from mgpo.optim.weight_space import Factors, Terms, build_terms, term_hook

_TINY = F.TINY  # older imports
APN_MODES = rules.NAMES  # older imports
_WeightSpaceTerm = WeightSpaceTerm  # older imports (tests, benchmarks)


def _check_settings(
    rho: float,
    beta: float,
    apn: str,
    norm: str,
    max_scale: float | None,
    momentum: str | float,
    space: str,
    gbar_update: str,
    perturb_non_lora: bool,
    diagnostics: bool,
    exact_restore: bool | None,
) -> None:
    """ValueError naming the first setting out of its range, and the range."""
    check_range("rho", rho, 0.0, float("inf"))
    check_range("beta", beta, 0.0, 1.0)
    if max_scale is not None:
        check_range("max_scale", max_scale, 0.0, float("inf"), low_open=True)
    for name, value, allowed in (
        ("apn", apn, rules.NAMES),
        ("norm", norm, NORMS),
        ("space", space, SPACES),
        ("gbar_update", gbar_update, GBAR_UPDATES),
    ):
        if value not in allowed:
            raise ValueError(f"{name}={value!r} is invalid: choose one of {', '.join(map(repr, allowed))}.")
    if momentum != "optimizer":
        if isinstance(momentum, str):
            raise ValueError(
                f"momentum={momentum!r} is invalid: use 'optimizer' (reuse the base optimizer's momentum) "
                "or a float mu in [0, 1)."
            )
        check_range("momentum", momentum, 0.0, 1.0)
    for name, flag in (("perturb_non_lora", perturb_non_lora), ("diagnostics", diagnostics)):
        if not isinstance(flag, bool):
            raise ValueError(f"{name}={flag!r} is invalid: use True or False.")
    if exact_restore is not None and not isinstance(exact_restore, bool):
        raise ValueError(f"exact_restore={exact_restore!r} is invalid: use True, False or None (automatic).")


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
        params: Params,
        base_optimizer: type[torch.optim.Optimizer] = torch.optim.AdamW,
        *,
        rho: float = 0.05,
        beta: float = 0.9,
        apn: str = rules.DEFAULT,
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
        **base_kwargs: Any,
    ):
        _check_settings(
            rho, beta, apn, norm, max_scale, momentum, space, gbar_update, perturb_non_lora, diagnostics, exact_restore
        )
        hparams = dict(
            rho=rho,
            beta=beta,
            apn=apn,
            norm=norm,
            max_scale=max_scale,
            momentum=momentum,
            space=space,
            perturb_non_lora=perturb_non_lora,
            gbar_update=gbar_update,
            diagnostics=diagnostics,
            exact_restore=exact_restore,  # changes the trajectory (a subtractive restore's rounding): compared on load
        )
        super().__init__(params, base_optimizer, hparams, model=model, auto_perturb=auto_perturb, **base_kwargs)
        self.config = MGPOConfig(
            rho=rho,
            beta=beta,
            apn=apn,
            space=space,
            norm=norm,
            max_scale=max_scale,
            momentum=momentum,
            perturb_non_lora=perturb_non_lora,
            gbar_update=gbar_update,
            exact_restore=exact_restore,
            diagnostics=diagnostics,
        )
        self.rule = rules.rule(apn)
        # how the radius is shared (functional.radius_coefficient): in factor space without APN (Momentum-SAM) or with
        # norm="global", over all tensors' momenta; else as ``norm`` says
        factor_global = space == "factors" and (not self.rule.adaptive or norm == "global")
        self._radius = F.MOMENTUM if factor_global else F.GLOBAL if norm == "global" else F.LAYER
        self._moment = moment_key(self.base_optimizer) if momentum == "optimizer" else "momentum"
        self.gbar: Tensor | None = None  # per-layer EMA of weight-space gradient norms (eq. 8)
        self._seen: Tensor | None = None  # which layers have had a first gradient
        self._coef: Tensor | None = None  # c_l of the pending perturbation (eps_l = c_l D_l)
        self._clean: tuple[Tensor, ...] | None = None  # exact copies of the tensors moved in place
        self._gathered: list[tuple[Tensor, Tensor]] | None = None  # FSDP: whole (A, g_A) of every pair with a gradient
        self._recorded: tuple[Tensor, Tensor] | None = None  # (n_l, has_grad) from record_gradients()
        self._direction: F.Direction | None = None  # ||D_l||, ||D_l||^2, has_m
        self._pending_norm: Tensor | None = None  # ||eps|| of the pending perturbation
        self._recorded_micro = False  # record_gradients() updated gbar in this step (gbar_update="micro_batch")
        self._ema_at_step_start: tuple[Tensor, Tensor] | None = None  # gbar, seen before this step's micro EMAs
        self._warned_micro = False
        self._sizes: dict[str, Tensor] = {}  # per-layer ||W_l||, ||last update of W_l|| (rule.sizes, diagnostics)
        self._setup_layers()

    # ------------------------------------------------------------------------------- read-only views
    @property
    def plan(self) -> LayerPlan:
        """Which layer is perturbed how: ``plan.pairs`` (weight space), ``plan.inplace``, ``plan.unperturbed``."""
        return self._plan

    @property
    def coef(self) -> Tensor | None:
        """``c_l`` of the pending perturbation per layer (``eps_l = c_l D_l``); None before the first step."""
        return self._coef

    @property
    def direction(self) -> F.Direction | None:
        """The last step's direction norms per layer (``norm`` = ||D_l||, ``sq``, ``has_m``); None before it."""
        return self._direction

    @property
    def terms(self) -> Terms | None:
        """The pending weight-space terms by module id (:data:`mgpo.optim.weight_space.Terms`)."""
        return self._terms

    # ------------------------------------------------------------------------------- which tensor is where
    def _setup_layers(self) -> None:
        cfg, sharded = self.config, self.exchange.sharded
        if sharded and not self.rule.fsdp:
            ok = [name for name, r in rules.RULES.items() if r.fsdp]
            raise ValueError(
                f"MGPO: apn={cfg.apn!r} needs each layer's whole weight and last update, which are not "
                f"computed under FSDP; use apn={ok[0]!r} (or {', '.join(map(repr, ok[1:]))})."
            )
        if cfg.diagnostics and sharded:  # on by default in the CLI: off here, said once
            self.hparams["diagnostics"] = False
            self.config = dataclasses.replace(cfg, diagnostics=False)
            warnings.warn(
                "MGPO: diagnostics (radius_to_weight_*, radius_to_update_*, apn_factor_*) are not computed "
                "under FSDP and are left out of the statistics.",
                RuntimeWarning,
                stacklevel=3,
            )
        self._plan = build_plan(
            self.model,
            self.layers,
            weight_space=self.model is not None and cfg.space == "weight",
            perturb_non_lora=cfg.perturb_non_lora,
            exact=cfg.exact_restore,
            sharded=sharded,
        )
        quantized = self._plan.quantized
        if self.rule.needs_base_weight and quantized:
            raise ValueError(
                f"MGPO(apn={cfg.apn!r}) needs each layer's base weight W0, and {quantized[0]} (and "
                f"{len(quantized) - 1} more) is quantized; use apn='inverse' or 'update'."
            )
        if self.config.diagnostics and quantized:
            warnings.warn(
                f"MGPO(diagnostics=True): {len(quantized)} layer(s) have a quantized base weight (e.g. "
                f"{quantized[0]}); their radius relative to the weight norm is left out of "
                "radius_to_weight_*.",
                RuntimeWarning,
                stacklevel=3,
            )
        self._terms = None
        self._w0_sq: dict[int, Tensor] = {}  # ||W0||^2 of each pair's frozen base weight, computed once
        device = next((p.device for g in self.param_groups for p in g["params"]), torch.device("cpu"))
        self._constants = DeviceConstants(device)
        self._install_method_hooks()

    @property
    def _terms(self) -> Terms | None:
        """The pending weight-space terms, kept in the hooks' state (the layers' hooks read them)."""
        return self._shared.terms

    @_terms.setter
    def _terms(self, value: Terms | None) -> None:
        self._shared.terms = value

    def _install_method_hooks(self) -> None:
        """The weight-space term's forward hooks, and merge guards on layers whose factors are moved in place
        (factor space, the DoRA/AdaLoRA fallback); those of a previous set-up are removed first."""
        for handle in getattr(self, "_term_hooks", []):
            handle.remove()
            if handle in self._hooks:
                self._hooks.remove(handle)
        self._term_hooks: list[Any] = []
        for module in {id(pr.module): pr.module for pr in self._plan.pairs}.values():
            hook = term_hook(self._shared, id(module))
            self._term_hooks.append(module.register_forward_hook(Installed(hook), with_kwargs=True))
        self._term_hooks += self._guard_merges({id(t) for _, t in self._plan.inplace})
        self._hooks += self._term_hooks

    def _moments(self, tensors: list[Tensor]) -> list[Tensor | None]:
        owner = self.base_optimizer.state if self.config.momentum == "optimizer" else self.state
        # A tensor frozen since (requires_grad False) gets no update, so its old momentum is no direction: the layer
        # is left clean rather than moved by a constant offset every step.
        moments = [owner[p].get(self._moment) if p in owner and p.requires_grad else None for p in tensors]
        if self.config.momentum == "optimizer":
            stateful = next(
                (p for p, m in zip(tensors, moments) if m is None and p.requires_grad and owner.get(p)), None
            )
            if stateful is not None:  # the base optimizer keeps state, but not its momentum under this name
                raise TypeError(
                    f"momentum='optimizer' reuses the base optimizer's first moment (state entry {self._moment!r}), "
                    f"but {type(self.base_optimizer).__name__} keeps its state as {sorted(owner[stateful])} (e.g. "
                    "bitsandbytes' 8-bit optimizers: a quantized 'state1'), so nothing would be perturbed and this "
                    "would train as the plain base optimizer. Fix: pass momentum=0.9 so MGPO keeps its own momentum "
                    "buffer (paper eq. 5), or use torch's AdamW, Adam or SGD with momentum>0."
                )
        return moments

    def _would_perturb(self) -> bool:
        return self.config.rho > 0

    def _has_layer_hooks(self) -> bool:
        return bool(self._plan.pairs)

    # ------------------------------------------------------------------------------- perturbation, eq. (6)
    def _direction_factors(self, parts: Tensor | None = None) -> tuple[list[Factors], list[int], Tensor | None]:
        """``(A, m_A, B, m_B)`` of every pair whose momentum exists (``D_l = s (m_B A + B m_A)``), which pairs, and
        ``parts`` summed over the ranks. Without FSDP these are the tensors themselves (no copy). Under FSDP they
        are gathered whole first, in one collective (LoRA-sized) that also carries ``parts``, so every rank holds
        the same factors and computes the same ||D_l|| without a reduction."""
        flat: list[Tensor] = []
        with_m = []
        for i, pair in enumerate(self._plan.pairs):
            m_a, m_b = self._moments([pair.a, pair.b])
            if m_a is not None and m_b is not None:
                flat += [pair.a, m_a, pair.b, m_b]
                with_m.append(i)
        flat, parts = self.exchange.full_and_sum(flat, parts)
        factors = [
            Factors(a.detach(), m_a, b.detach(), m_b)  # detached: the term's node does not reach A, B
            for a, m_a, b, m_b in zip(flat[0::4], flat[1::4], flat[2::4], flat[3::4])
        ]
        return factors, with_m, parts

    def _build_terms(self, factors: list[Factors] | None = None, with_m: list[int] | None = None) -> None:
        """The pending weight-space terms (:func:`weight_space.build_terms`); after a load, from the current factors
        and momenta."""
        self._terms = {}
        if self._coef is None or not self._plan.pairs:
            return
        if factors is None or with_m is None:
            factors, with_m, _ = self._direction_factors()
        self._terms = build_terms(self._plan.pairs, factors, with_m, self._coef, self._constants)

    def _inplace_pending(self) -> tuple[list[Tensor], list[Tensor], list[Tensor]]:
        """Tensors moved in place, their momenta and coefficients; this rank's shards under FSDP (the same
        ``c_l`` on every rank moves every shard consistently)."""
        assert self._coef is not None
        ts = [t for _, t in self._plan.inplace]
        moments = self._moments(ts)
        keep = [(j, m) for j, m in enumerate(moments) if m is not None]
        layer = self._constants.index(tuple(self._plan.inplace[j].layer for j, _ in keep))
        coefs = list(self._coef[layer].unbind()) if keep else []
        return [local(ts[j]) for j, _ in keep], [local(m) for _, m in keep], coefs

    def _apply(self) -> None:
        if self._coef is None:  # first step: no momentum yet, no perturbation
            return
        if self._terms is None:  # after a load: rebuilt from the current factors and momenta
            self._build_terms()
        ps, moments, coefs = self._inplace_pending()
        if not ps:
            return
        self._clean = torch._foreach_mul(ps, 1.0) if self._plan.exact else None  # exact copy of the clean values
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

    # ------------------------------------------------------------------------------- eq. (8)'s inputs
    def _sum_over_ranks(self, parts: Tensor) -> Tensor:
        """Under FSDP the gradient norms' partial sums ride on the gather of ``[A; g_A]`` that eq. (8) needs (one
        collective before the base step; an all-reduce only when there is nothing to gather)."""
        flat, summed = self.exchange.full_and_sum(grad_v(self._plan.pairs, grad_owners(self._plan.pairs)), parts)
        self._gathered = list(zip(flat[0::2], flat[1::2]))
        assert summed is not None
        return summed

    def _gradient_norms(self, params: list[Tensor], grad_norms: Tensor, dtype: torch.dtype) -> GradNorms:
        """eq. (8)'s inputs, before the base step changes A and B (:func:`norms.gradient_norms`). Under FSDP the
        pairs' parts use the whole ``(A, g_A)`` gathered with the gradient norms, and are per-rank partial sums."""
        owners, whole = grad_owners(self._plan.pairs), self._gathered
        self._gathered = None
        assert whole is not None or not self.exchange.sharded  # gathered by _sum_over_ranks
        parts = pair_grad_sq(self._plan.pairs, owners, whole, self._constants, dtype) if owners else None
        return gradient_norms(self._plan, params, grad_norms, len(self.layers), self._constants, owners, parts)

    def _size_buffers(self, n_layers: int, device: torch.device, dtype: torch.dtype) -> None:
        """gbar, seen and c_l sized to the layers: at the first step, or for layers added since."""
        if self.gbar is None or self._seen is None:
            self.gbar = torch.zeros(0, device=device, dtype=dtype)
            self._seen = torch.zeros(0, dtype=torch.bool, device=device)
        grow = n_layers - len(self.gbar)
        if grow > 0:
            self.gbar = torch.cat([self.gbar, torch.zeros(grow, device=device, dtype=dtype)])
            self._seen = torch.cat([self._seen, torch.zeros(grow, dtype=torch.bool, device=device)])
            if self._coef is not None:
                self._coef = torch.cat([self._coef, torch.zeros(grow, device=device, dtype=dtype)])

    @torch.no_grad()
    def record_gradients(self, scale: float | Tensor = 1.0) -> None:
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
        if (
            self.config.gbar_update == "micro_batch"
            and dist.is_available()
            and dist.is_initialized()
            and dist.get_world_size() > 1
        ):
            raise RuntimeError(
                "MGPO(gbar_update='micro_batch') is not supported on several processes: between synchronisations "
                "each rank holds only its own partial gradient, so the ranks' gbar (and perturbations) would "
                "differ. Use gbar_update='step' (the default)."
            )
        norms = self._tensor_grad_norms(params)
        dtype = norms.dtype
        self._size_buffers(len(self.layers), norms.device, dtype)
        grads = self._gradient_norms(params, norms, dtype)
        parts = grads.parts
        if parts is not None and self.exchange.sharded:
            parts = self.exchange.all_reduce(parts)
        n = add_pair_norms(self._plan, grads, parts, self._constants).sqrt() * scale
        has = self._constants(grads.has_grad, torch.bool) & torch.isfinite(n)
        if self.config.gbar_update == "step":
            self._recorded = (n, has)
            return
        if not self._recorded_micro:  # kept for a skipped step, which must leave gbar as it was (spec)
            assert self.gbar is not None and self._seen is not None
            self._ema_at_step_start = (self.gbar.clone(), self._seen.clone())
        self._ema(n, has)  # the authors' schedule: after every micro-batch, then re-scale the pending perturbation
        self._recorded_micro = True
        if self._direction is not None and self._coef is not None:
            self.restore()  # re-applied with the new c_l at the next training forward
            self._set_coef()
            self._terms = None

    # ------------------------------------------------------------------------------- the step
    def _update(self, params: list[Tensor], grad_norms: Tensor, ok: Tensor) -> None:
        """One step on the clean weights, in the order of docs/method.md: eq. (8)'s gradient norms, the base step,
        eq. (5), the direction D_l (eq. 6), eq. (8)'s EMA, and the next perturbation (eqs. 4, 6)."""
        dtype = grad_norms.dtype
        self._terms = None  # last step's U, V: not needed any more (the window is closed)
        # ||eps|| this step's forwards ran at (0 at the clean weights: step 1, unperturbed()), for its statistics
        ran_at = self._pending_norm if self._window_was_open and self._pending_norm is not None else None
        if self._plan.perturbable and not any(id(p) in self._plan.perturbable for p in params):
            self._warn_no_gradient("no layer it perturbs")
        self._size_buffers(len(self.layers), grad_norms.device, dtype)
        recorded, micro = self._take_recorded()
        start, self._ema_at_step_start = self._ema_at_step_start, None
        if micro and start is not None:  # a skipped step undoes its micro-batches' EMA updates
            assert self.gbar is not None and self._seen is not None
            if start[0].shape == self.gbar.shape:
                self.gbar, self._seen = torch.where(ok, self.gbar, start[0]), torch.where(ok, self._seen, start[1])
        norms = None if recorded is not None or micro else self._gradient_norms(params, grad_norms, dtype)
        if norms is None:
            self._gathered = None
        wants_update = "update" in self.rule.sizes or self.config.diagnostics
        before = snapshot(self._plan) if wants_update else None  # the clean tensors before the update
        self._base_and_momentum_step(params, ok, dtype)
        self._direction, factors, with_m, parts = self._direction_norms(None if norms is None else norms.parts, dtype)
        if recorded is not None:  # eq. (8) from the gradients before clipping (record_gradients())
            self._ema(recorded[0], recorded[1] & ok)
        elif norms is not None:  # a skipped step: no EMA (micro_batch: updated after each micro-batch already)
            self._ema(
                add_pair_norms(self._plan, norms, parts, self._constants).sqrt(),
                self._constants(norms.has_grad, torch.bool) & ok,
            )
        self._sizes = self._layer_sizes(before, dtype)
        self._set_coef()  # eqs. (4), (6)
        zero = torch.zeros((), device=grad_norms.device, dtype=dtype)
        self._stats["perturbation_norm"] = ran_at if ran_at is not None else zero
        self._build_terms(factors, with_m)

    def _take_recorded(self) -> tuple[tuple[Tensor, Tensor] | None, bool]:
        """The norms record_gradients() took in this step, and whether it updated gbar itself (micro_batch)."""
        recorded, self._recorded = self._recorded, None
        schedule_micro = self.config.gbar_update == "micro_batch"
        micro = schedule_micro and self._recorded_micro
        if schedule_micro and not micro and not self._warned_micro:
            self._warned_micro = True  # a host flag: no device read
            warnings.warn(
                "MGPO(gbar_update='micro_batch'): opt.record_gradients() was not called after the "
                "backward passes of this step, so gbar was updated once, from the step's gradient (the "
                "'step' schedule). Call it after every backward() (the trainer integrations do). Warned "
                "once.",
                RuntimeWarning,
                stacklevel=4,
            )
        self._recorded_micro = False
        return recorded, micro

    def _base_and_momentum_step(self, params: list[Tensor], ok: Tensor, dtype: torch.dtype) -> None:
        """The base update of the clean weights with g_t, then eq. (5) for MGPO's own momentum."""
        own = self.config.momentum != "optimizer"
        if own:  # a skipped step must leave the own buffer as it was: blend with a finite gradient
            for p in params:
                local_grad(p).nan_to_num_(0.0, 0.0, 0.0)
        self._base_step(params, ok)
        if own:  # eq. (5): v_t = mu v_{t-1} + g_t (unchanged on a skipped step)
            moments = []
            for p in params:
                if "momentum" not in self.state[p]:
                    self.state[p]["momentum"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                moments.append(local(self.state[p]["momentum"]))
            F.momentum_(moments, [local_grad(p) for p in params], float(self.config.momentum), ok, dtype)

    def _direction_norms(
        self, eq8: Tensor | None, dtype: torch.dtype
    ) -> tuple[F.Direction, list[Factors], list[int], Tensor | None]:
        """eq. (6)'s direction: ``||D_l||`` for every layer (``s ||m_B A + B m_A||`` from Gram blocks for a pair,
        ``||m||`` for tensors moved in place), the pairs' factors and which pairs have momentum. Under FSDP the
        squared momentum norms and eq. (8)'s parts ``eq8`` ride on the gather of the factors (returned summed)."""
        n_layers, sharded = len(self.layers), self.exchange.sharded
        inplace = self._plan.inplace
        m_norm = [(i, m) for (i, _), m in zip(inplace, self._moments([t for _, t in inplace])) if m is not None]
        m_part = None  # per-tensor momentum norms; squared (partial sums over the ranks) under FSDP
        if m_norm:
            m_part = F.tensor_norms([local(m) for _, m in m_norm], dtype)
            m_part = m_part.square() if sharded else m_part
        if sharded:  # one collective after the base step: the LoRA gather, carrying eq. (8)'s and these parts
            both = [t for t in (m_part, eq8) if t is not None]
            factors, with_m, summed = self._direction_factors(torch.cat(both) if both else None)
            if m_part is not None and summed is not None:
                m_part, summed = summed[: len(m_part)], summed[len(m_part) :]
            eq8 = summed if eq8 is not None else None
        else:
            factors, with_m, _ = self._direction_factors()
        m_layers = [i for i, _ in m_norm]
        m_norms = m_part.sqrt() if sharded and m_part is not None else m_part
        d = direction(self._plan, factors, with_m, m_layers, m_norms, n_layers, self._constants, dtype)
        return d, factors, with_m, eq8

    def _ema(self, n: Tensor, has_grad: Tensor) -> None:
        """eq. (8): ``gbar_l = n_l`` at a layer's first gradient, then ``beta gbar_l + (1 - beta) n_l``."""
        assert self.gbar is not None and self._seen is not None
        self.gbar, self._seen = F.gbar_ema(self.gbar, self._seen, n, has_grad, self.config.beta)

    def _layer_sizes(self, before: Snapshot | None, dtype: torch.dtype) -> dict[str, Tensor]:
        """The per-layer sizes the APN rule and the diagnostics need (:func:`diagnostics.layer_sizes`)."""
        want_weight = "weight" in self.rule.sizes or self.config.diagnostics
        return layer_sizes(self._plan, before, want_weight, len(self.layers), dtype, self._constants, self._w0_sq)

    def _set_coef(self) -> None:
        """eqs. (4), (6): ``c_l`` (``eps_l = c_l D_l``) from the step's direction norms and the current gbar, and
        the step's statistics."""
        cfg, rule, direction = self.config, self.rule, self._direction
        assert direction is not None and self.gbar is not None and self._seen is not None
        k, capped = rule.factor(rules.FactorInputs(self.gbar, self._seen, self._sizes, cfg.max_scale))
        if rule.reweights:  # u_l = D_l / gbar_l, total radius rho
            pending = F.mgpo_perturbation(F.inverse_gbar(self.gbar, self._seen), direction, cfg.rho, F.GLOBAL)
        else:
            pending = F.mgpo_perturbation(k, direction, cfg.rho, self._radius)
        self._coef, self._pending_norm = pending.coef, pending.norm  # ||eps|| of the next step's forwards
        capped = torch.zeros_like(self._seen) if capped is None else capped
        self._stats = apn_statistics(self.gbar, self._seen, direction.sq, capped)
        if cfg.diagnostics:
            self._stats.update(
                radius_diagnostics(pending.coef.abs() * direction.norm, k, pending.perturbed, self._sizes)
            )

    # ------------------------------------------------------------------------------- checkpoints
    def _extra_state(self) -> dict[str, Any]:
        direction = None if self._direction is None else tuple(self._direction)  # a plain tuple, as always saved
        return {
            **super()._extra_state(),
            "gbar": self.gbar,
            "seen": self._seen,
            "coef": self._coef,
            "direction": direction,
            "sizes": self._sizes,
        }

    def _load_extra_state(self, extra: dict[str, Any]) -> None:
        super()._load_extra_state(extra)
        self.gbar, self._seen, self._coef = extra["gbar"], extra["seen"], extra.get("coef")
        direction = extra.get("direction")
        self._direction = None if direction is None else F.Direction(*direction)
        self._pending_norm = None
        if self._coef is not None and self._direction is not None and self._coef.shape == self._direction.norm.shape:
            self._pending_norm = F.pending_norm(self._coef, self._direction.norm)
        self._sizes = extra.get("sizes") or {}
        self._terms = None  # rebuilt at the next perturb() from the loaded factors and momenta
        self._constants.clear()
        needed = set(self.rule.sizes) | ({"weight", "update"} if self.config.diagnostics else set())
        if self.gbar is not None and not needed <= set(self._sizes):
            self._sizes_after_load(self.gbar)

    def _sizes_after_load(self, gbar: Tensor) -> None:
        """A state saved without the layer sizes (diagnostics off then, or an older mgpo): ||W_l|| is recomputed from
        the weights loaded now (the model's state is loaded before the optimizer's, as the Trainer does), the last
        update's size is gone (NaN until the next step). The pending perturbation keeps its saved c_l."""
        n_layers = len(self.layers)
        self._sizes = self._layer_sizes(None, gbar.dtype)
        self._sizes["update"] = torch.full((n_layers,), float("nan"), device=gbar.device, dtype=gbar.dtype)
        if "update" in self.rule.sizes and self.config.gbar_update == "micro_batch":
            warnings.warn(
                f"MGPO(apn={self.config.apn!r}, gbar_update='micro_batch'): this checkpoint does not hold "
                "the size of each layer's last update, which re-scaling the pending perturbation after a "
                "micro-batch needs; the first step after the resume trains at the clean weights.",
                RuntimeWarning,
                stacklevel=4,
            )

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        super().add_param_group(param_group)
        if hasattr(self, "_moment"):
            self._setup_layers()


class MSAM(MGPO):
    """Momentum-SAM (Becker et al. 2024): MGPO in factor space, no APN, one global norm, the optimizer's momentum."""

    FIXED = ("apn", "momentum", "beta", "space", "norm", "max_scale")  # MGPO's settings MSAM sets itself

    @classmethod
    def settings(cls) -> list[str]:
        return [name for name in MGPO.settings() if name not in cls.FIXED]

    def __init__(
        self,
        params: Params,
        base_optimizer: type[torch.optim.Optimizer] = torch.optim.AdamW,
        *,
        rho: float = 0.05,
        **kwargs: Any,
    ):
        for fixed in self.FIXED:
            if fixed in kwargs:
                raise ValueError(f"MSAM fixes {fixed}; use mgpo.MGPO to choose {fixed}={kwargs[fixed]!r}.")
        super().__init__(
            params, base_optimizer, rho=rho, apn="off", momentum="optimizer", space="factors", norm="global", **kwargs
        )
