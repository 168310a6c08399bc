"""TRL: supervised fine-tuning with a perturbation method, configured like any ``SFTConfig``.

    from mgpo.integrations.sft import PerturbationSFTConfig, PerturbationSFTTrainer

    args = PerturbationSFTConfig("out", learning_rate=2e-4, perturbation_method="mgpo", perturbation_profile="nlg")
    trainer = PerturbationSFTTrainer(model=model_id_or_model, args=args, train_dataset=ds,
                                     peft_config=LoraConfig(r=8, lora_alpha=16, target_modules="all-linear"))
    trainer.train()

The optimizer is built at ``train()`` from the model the trainer holds, i.e. after TRL has wrapped it with
``peft_config``, so it covers exactly the adapter's parameters.
"""

from __future__ import annotations

import dataclasses

try:
    from trl import SFTConfig, SFTTrainer
except ModuleNotFoundError as err:  # name the extra that brings TRL rather than a bare import error
    if err.name != "trl":
        raise
    raise ModuleNotFoundError(
        'mgpo.integrations.sft needs TRL, which is not installed. Install it with: pip install -e ".[hf,trl]" '
        '(from a clone of mgpo) or pip install "trl>=1.16,<2".',
        name="trl",
    ) from None

from mgpo.integrations.arguments import PerturbationArguments, check_arguments
from mgpo.integrations.trainer import perturbed

__all__ = ["PerturbationSFTConfig", "PerturbationSFTTrainer"]


@dataclasses.dataclass
class PerturbationSFTConfig(PerturbationArguments, SFTConfig):
    """``trl.SFTConfig`` plus the ``perturbation_*`` fields (see :mod:`mgpo.integrations.arguments`)."""

    def __post_init__(self):
        super().__post_init__()
        check_arguments(self)


PerturbationSFTTrainer = perturbed(SFTTrainer)
