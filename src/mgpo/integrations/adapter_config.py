"""The adapter's settings (pure Python, so the CLI's config needs no PEFT import); applied by
:func:`mgpo.integrations.peft_variants.apply_adapter`."""

from __future__ import annotations

from dataclasses import dataclass, field

from mgpo.checks import check, check_choice

METHODS = ("lora", "dora", "rslora", "pissa", "loraplus", "adalora", "lora-ga", "full")


@dataclass
class AdapterConfig:
    """Which parameter-efficient method to apply, and its hyper-parameters."""

    method: str = field(default="lora", metadata={"help": f"Adapter method, one of: {', '.join(METHODS)}."})
    rank: int = field(default=8, metadata={"help": "LoRA rank r (for adalora see adalora_* instead)."})
    alpha: float = field(
        default=16.0, metadata={"help": "LoRA alpha; updates are scaled by alpha / r (alpha / sqrt(r) for rslora)."}
    )
    dropout: float = field(default=0.0, metadata={"help": "Dropout on the LoRA input, in [0, 1)."})
    target_modules: str | list[str] = field(
        default="all-linear",
        metadata={
            "help": "Modules that get adapters: 'all-linear' (every linear layer except the output head), "
            "a list of module-name suffixes, or a regex matched against full module names."
        },
    )
    pissa_niter: int = field(
        default=4, metadata={"help": "PiSSA: subspace iterations of the fast randomized SVD; 0 = exact (slow) SVD."}
    )
    loraplus_lr_ratio: float = field(
        default=16.0, metadata={"help": "LoRA+: learning rate of B = ratio * learning rate of A (>= 1)."}
    )
    adalora_init_rank: int = field(default=12, metadata={"help": "AdaLoRA: starting rank of every adapter."})
    adalora_target_rank: int = field(default=8, metadata={"help": "AdaLoRA: average rank after budget pruning."})
    adalora_tinit_frac: float = field(
        default=0.1, metadata={"help": "AdaLoRA: fraction of total steps of warm-up before pruning starts."}
    )
    adalora_tfinal_frac: float = field(
        default=0.2, metadata={"help": "AdaLoRA: fraction of total steps at the end with the final ranks fixed."}
    )
    adalora_delta_t: int = field(default=10, metadata={"help": "AdaLoRA: steps between two rank re-allocations."})
    adalora_orth_reg_weight: float = field(
        default=0.5, metadata={"help": "AdaLoRA: weight of the orthogonality penalty added to the loss."}
    )
    loraga_batches: int = field(
        default=8,
        metadata={"help": "LoRA-GA: training batches used to estimate the gradient that initialises the adapters."},
    )

    def validate(self) -> None:
        """Raise ValueError naming the first field whose value is out of range."""
        check_choice("method", self.method, METHODS)
        checks = [
            ("rank", self.rank >= 1, "an integer >= 1"),
            ("alpha", self.alpha > 0, "> 0"),
            ("dropout", 0.0 <= self.dropout < 1.0, "in [0, 1)"),
            ("pissa_niter", self.pissa_niter >= 0, ">= 0"),
            ("loraplus_lr_ratio", self.loraplus_lr_ratio >= 1.0, ">= 1"),
            ("adalora_target_rank", self.adalora_target_rank >= 1, "an integer >= 1"),
            (
                "adalora_init_rank",
                self.adalora_init_rank >= self.adalora_target_rank,
                f">= adalora_target_rank ({self.adalora_target_rank})",
            ),
            ("adalora_tinit_frac", 0.0 <= self.adalora_tinit_frac < 1.0, "in [0, 1)"),
            (
                "adalora_tfinal_frac",
                0.0 <= self.adalora_tfinal_frac < 1.0 - self.adalora_tinit_frac,
                f"in [0, 1 - adalora_tinit_frac) = [0, {1.0 - self.adalora_tinit_frac:g})",
            ),
            ("adalora_delta_t", self.adalora_delta_t >= 1, "an integer >= 1"),
            ("adalora_orth_reg_weight", self.adalora_orth_reg_weight >= 0, ">= 0"),
            ("loraga_batches", self.loraga_batches >= 1, "an integer >= 1"),
        ]
        for name, ok, allowed in checks:
            check(ok, name, getattr(self, name), f"it must be {allowed}")
        targets = self.target_modules
        check(
            bool(targets) and (isinstance(targets, str) or all(isinstance(t, str) and t for t in targets)),
            "target_modules",
            targets,
            "give 'all-linear', a regex, or a non-empty list of module names",
        )
