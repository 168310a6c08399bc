"""MGPO: momentum-guided perturbation with adaptive perturbation normalization (paper Section 3.2, eqs. 3-8).

One forward/backward per step. The perturbation of step t+1 is ``eps = c_l * v`` with ``v`` the momentum
after step t and ``c_l`` one scalar per layer; only those scalars are stored (``state[p]["coef"]``), so with
``momentum="optimizer"`` no tensor is allocated beyond the base optimizer's own state.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from mgpo.optim._base import PerturbedOptimizer, check_range, moment_key

APN_MODES = ("off", "inverse", "normalized")
_TINY = 1e-12  # added to every denominator (method-spec)


class MGPO(PerturbedOptimizer):
    """LoRA-MGPO around any ``torch.optim`` optimizer.

    Args:
        params: parameters, param groups, or the model itself (then its LoRA layers are found by name and the
            perturbation is applied by a forward pre-hook on the model).
        base_optimizer: the optimizer class that does the update (AdamW by default); ``**base_kwargs`` go to it.
            A base argument whose name MGPO uses too (SGD's ``momentum``) goes in ``base_kwargs={...}``.
        rho: perturbation radius (>= 0). 0 gives exactly the base optimizer.
        beta: EMA factor of the per-layer gradient norm, in [0, 1) (eq. 8).
        apn: adaptive perturbation normalization: "off" (Momentum-SAM), "inverse" (eq. 4 literally) or
            "normalized" (per-layer 1/gbar re-weighting with the total radius kept at rho).
        momentum: "optimizer" to reuse the base optimizer's first moment, or a float mu in [0, 1) for MGPO's own
            buffer ``v_t = mu v_{t-1} + g_t`` (eq. 5).
        eps: floor of the EMA before it divides (> 0).
        model: the model, when ``params`` are tensors or groups; enables LoRA-aware layers and auto-perturb.
        auto_perturb: apply the pending perturbation automatically at the first training-mode forward of each
            step. Without it, call ``opt.perturb()`` before the forward yourself.
        exact_restore: keep a copy of the clean weights while perturbed and copy it back, instead of
            subtracting the perturbation again (exact to rounding only). Default: on for fp16/bf16 weights.
    """

    def __init__(
        self,
        params: Iterable[torch.Tensor] | Iterable[dict] | nn.Module,
        base_optimizer: type[torch.optim.Optimizer] = torch.optim.AdamW,
        *,
        rho: float = 0.05,
        beta: float = 0.9,
        apn: str = "normalized",
        momentum: str | float = "optimizer",
        eps: float = 1e-8,
        model: nn.Module | None = None,
        auto_perturb: bool = True,
        exact_restore: bool | None = None,
        **base_kwargs,
    ):
        check_range("rho", rho, 0.0, float("inf"))
        check_range("beta", beta, 0.0, 1.0)
        check_range("eps", eps, 0.0, float("inf"), low_open=True)
        if apn not in APN_MODES:
            raise ValueError(f"apn={apn!r} is invalid: choose one of {', '.join(map(repr, APN_MODES))}.")
        if momentum != "optimizer":
            if isinstance(momentum, str):
                raise ValueError(
                    f"momentum={momentum!r} is invalid: use 'optimizer' (reuse the base optimizer's momentum) "
                    "or a float mu in [0, 1)."
                )
            check_range("momentum", momentum, 0.0, 1.0)
        hparams = dict(rho=rho, beta=beta, apn=apn, momentum=momentum, eps=eps)
        super().__init__(params, base_optimizer, hparams, model=model, auto_perturb=auto_perturb, **base_kwargs)
        self._moment = moment_key(self.base_optimizer) if momentum == "optimizer" else "momentum"
        self._exact = exact_restore
        self._clean: list[torch.Tensor] | None = None
        self._pending_cache: dict | None = None
        self.gbar: torch.Tensor | None = None  # per-layer EMA of gradient norms (eq. 8); None before step 1
        self._seen: torch.Tensor | None = None  # which layers have had a first gradient

    @property
    def _moment_owner(self) -> dict:  # a property: load_state_dict replaces the state dicts
        return self.base_optimizer.state if self.hparams["momentum"] == "optimizer" else self.state

    # ------------------------------------------------------------------------------- perturbation, eq. (6)
    def _pending(self) -> dict[float, tuple[list[torch.Tensor], list[torch.Tensor]]]:
        """The pending perturbation as {coef: (params, momenta)}: one entry per layer (one for apn="off").
        Built once per step (perturb and restore both use it); rebuilt after a load or a new param group."""
        if self._pending_cache is None:
            self._pending_cache = self._collect_pending()
        return self._pending_cache

    def _collect_pending(self) -> dict[float, tuple[list[torch.Tensor], list[torch.Tensor]]]:
        groups: dict[float, tuple[list, list]] = {}
        for group in self.param_groups:
            for p in group["params"]:
                coef = self.state[p].get("coef", 0.0) if p in self.state else 0.0
                if coef != 0.0:
                    params, moments = groups.setdefault(coef, ([], []))
                    params.append(p)
                    moments.append(self._moment_owner[p][self._moment])
        return groups

    def _apply(self) -> None:
        pending = self._pending()
        params = [p for ps, _ in pending.values() for p in ps]
        exact = self._exact if self._exact is not None else any(p.dtype in (torch.float16, torch.bfloat16)
                                                                 for p in params)
        self._clean = [p.detach().clone() for p in params] if exact and params else None
        # eq. (6): W~_t = W_t + eps_t with eps_t = coef * v (coef carries -rho, the norms and APN of eq. 4);
        # added in place with alpha=coef, so no perturbation-sized temporary is allocated
        for coef, (ps, moments) in pending.items():
            torch._foreach_add_(ps, moments, alpha=coef)

    def _remove(self) -> None:
        pending = self._pending()
        if self._clean is not None:
            torch._foreach_copy_([p for ps, _ in pending.values() for p in ps], self._clean)
            self._clean = None
            return
        # W_t = W~_t - eps_t: exact to rounding (a few ulp per step in fp32), documented in docs/method.md
        for coef, (ps, moments) in pending.items():
            torch._foreach_add_(ps, moments, alpha=-coef)

    # ------------------------------------------------------------------------------- the step
    def _update(self, params: list[torch.Tensor], grad_norms: torch.Tensor) -> None:
        grads = [p.grad for p in params]
        index = {id(p): i for i, ts in enumerate(self.layers.values()) for p in ts}  # add_param_group may grow it
        layer = torch.tensor([index[id(p)] for p in params], dtype=torch.long)
        device = params[0].device
        layer = layer.to(device)
        n_layers = len(self.layers)

        # eq. (8), with the layer's gradient norm n_l standing in for ||grad_{Delta W_l} L|| (method-spec step 2)
        grad_sq = grad_norms.to(device).square()
        n_l = torch.zeros(n_layers, device=device).index_add_(0, layer, grad_sq).sqrt()
        has_grad = torch.zeros(n_layers, dtype=torch.bool, device=device).index_fill_(0, layer, True)
        if self.gbar is None or len(self.gbar) < n_layers:  # first step, or layers added since
            grow = n_layers - (0 if self.gbar is None else len(self.gbar))
            old_gbar = self.gbar if self.gbar is not None else torch.zeros(0, device=device)
            old_seen = self._seen if self._seen is not None else torch.zeros(0, dtype=torch.bool, device=device)
            self.gbar = torch.cat([old_gbar, torch.zeros(grow, device=device)])
            self._seen = torch.cat([old_seen, torch.zeros(grow, dtype=torch.bool, device=device)])
        beta = self.hparams["beta"]
        ema = torch.where(self._seen, beta * self.gbar + (1 - beta) * n_l, n_l)
        self.gbar = torch.where(has_grad, ema, self.gbar)
        self._seen |= has_grad

        self.base_optimizer.step()  # method-spec step 3: the base update of the clean weights with g_t

        # eq. (5): the momentum v_t
        mu = self.hparams["momentum"]
        if mu == "optimizer":
            try:
                moments = [self.base_optimizer.state[p][self._moment] for p in params]
            except KeyError:
                raise TypeError(
                    f"{type(self.base_optimizer).__name__} kept no '{self._moment}' state, so momentum='optimizer' "
                    "has nothing to reuse. Fix: pass momentum=0.9 so MGPO keeps its own buffer."
                ) from None
        else:
            moments = []
            for p in params:
                if "momentum" not in self.state[p]:
                    self.state[p]["momentum"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                moments.append(self.state[p]["momentum"])
            torch._foreach_mul_(moments, mu)
            torch._foreach_add_(moments, grads)

        # eq. (4): the next perturbation eps_{t+1,p} = coef_p * v_p
        v_sq = torch.stack(torch._foreach_norm(moments)).float().square()
        v_norm = v_sq.sum().sqrt()
        apn = self.hparams["apn"]
        inv_gbar = 1.0 / self.gbar.clamp_min(self.hparams["eps"])
        if apn == "off":  # Momentum-SAM: -rho v / ||v||
            coef = -torch.ones_like(v_sq) / (v_norm + _TINY)
        elif apn == "inverse":  # eq. (4) literally: -rho v / ||v|| / gbar_l
            coef = -inv_gbar[layer] / (v_norm + _TINY)
        else:  # normalized: u = v / gbar_l, -rho u / ||u||
            u_norm = (v_sq * inv_gbar[layer].square()).sum().sqrt()
            coef = -inv_gbar[layer] / (u_norm + _TINY)
        coef = coef * self.hparams["rho"]
        coef = torch.where(torch.isfinite(coef), coef, torch.zeros_like(coef))  # zero/non-finite norm -> no eps
        self._pending_cache = None
        new = dict(zip(map(id, params), coef.tolist()))
        for group in self.param_groups:  # a tensor without a gradient this step is not perturbed next step
            for p in group["params"]:
                if id(p) in new or p in self.state:
                    self.state[p]["coef"] = new.get(id(p), 0.0)

        seen = self.gbar[self._seen]  # non-empty: this step's layers were just marked seen
        stats = torch.stack([(coef.square() * v_sq).sum().sqrt(), v_norm, seen.min(), seen.mean(), seen.max()])
        keys = ("perturbation_norm", "momentum_norm", "gbar_min", "gbar_mean", "gbar_max")
        self.last_stats.update(zip(keys, stats.tolist()))  # one host sync for all five

    # ------------------------------------------------------------------------------- checkpoints
    def _extra_state(self) -> dict:
        return {**super()._extra_state(), "gbar": self.gbar, "seen": self._seen}

    def _load_extra_state(self, extra: dict) -> None:
        super()._load_extra_state(extra)
        self.gbar, self._seen = extra["gbar"], extra["seen"]
        self._pending_cache = None  # the loaded state holds new momentum tensors

    def add_param_group(self, param_group: dict) -> None:
        super().add_param_group(param_group)
        self._pending_cache = None


class MSAM(MGPO):
    """Momentum-SAM (Becker et al. 2024): MGPO with ``apn="off"`` and the base optimizer's momentum."""

    def __init__(self, params, base_optimizer=torch.optim.AdamW, *, rho: float = 0.05, **kwargs):
        for fixed in ("apn", "momentum", "beta"):
            if fixed in kwargs:
                raise ValueError(f"MSAM fixes {fixed}; use mgpo.MGPO to choose {fixed}={kwargs[fixed]!r}.")
        super().__init__(params, base_optimizer, rho=rho, apn="off", momentum="optimizer", **kwargs)
