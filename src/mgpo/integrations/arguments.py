"""``TrainingArguments`` with the perturbation method's settings, TRL's ``SFTConfig`` pattern.

    args = PerturbationTrainingArguments("out", learning_rate=2e-4, perturbation_method="mgpo", perturbation_rho=0.05)
    PerturbationTrainer(model=model, args=args, train_dataset=ds).train()

    # or from the command line, as with any TrainingArguments:
    (args,) = HfArgumentParser(PerturbationTrainingArguments).parse_args_into_dataclasses()

Every field of :class:`~mgpo.optim.configs.PerturbationConfig` is a field here with the prefix ``perturbation_``
(``perturbation_method``, ``perturbation_rho``, ``perturbation_profile``, ...), plus ``loraplus_lr_ratio`` (PEFT's
LoRA+ groups), so the settings are saved with the run in ``training_args.bin`` and in ``to_dict()``.
``args.perturbation_config()`` gives the :class:`PerturbationConfig` back.
``mgpo.integrations.sft.PerturbationSFTConfig`` is the same for TRL.
"""

from __future__ import annotations

import dataclasses
import math
from typing import TYPE_CHECKING

from transformers import TrainingArguments

from mgpo.checks import check_range
from mgpo.optim.configs import PerturbationConfig

PREFIX = "perturbation_"


def _fields_of(config_cls) -> list[tuple]:
    return [
        (PREFIX + f.name, f.type, dataclasses.field(default=f.default, metadata=dict(f.metadata)))
        for f in dataclasses.fields(config_cls)
    ]


LORAPLUS = (
    "loraplus_lr_ratio",
    "float | None",
    dataclasses.field(
        default=None,
        metadata={
            "help": "LoRA+: the B matrices learn this many times faster than A, with PEFT's own grouping "
            "(peft.optimizers.create_loraplus_optimizer); unset: Hugging Face's decay groups."
        },
    ),
)


class _PerturbationFieldsBase:
    def perturbation_config(self) -> PerturbationConfig:
        """The method's settings as a :class:`PerturbationConfig` (validated)."""
        cfg = PerturbationConfig(
            **{f.name: getattr(self, PREFIX + f.name) for f in dataclasses.fields(PerturbationConfig)}
        )
        cfg.validate()
        return cfg


# A dataclass of the perturbation_* fields only, to mix into any TrainingArguments subclass.
if TYPE_CHECKING:  # its fields are made at run time: the type checker sees the methods
    PerturbationArguments = _PerturbationFieldsBase
else:
    PerturbationArguments = dataclasses.make_dataclass(
        "PerturbationArguments",
        [*_fields_of(PerturbationConfig), LORAPLUS],
        bases=(_PerturbationFieldsBase,),
        namespace={
            "__module__": __name__,
            "__doc__": "The perturbation_* fields (see the module docstring); mixed into the arguments.",
        },
    )


@dataclasses.dataclass
class PerturbationTrainingArguments(PerturbationArguments, TrainingArguments):
    """``transformers.TrainingArguments`` plus the ``perturbation_*`` fields (the method and its settings)."""

    def __post_init__(self):
        super().__post_init__()
        check_arguments(self)


def check_arguments(args) -> None:
    """Validate the perturbation_* fields; the error names the argument (``perturbation_rho=...``)."""
    try:
        args.perturbation_config()
    except ValueError as err:
        raise ValueError(str(err).replace("perturbation.", PREFIX)) from None
    if args.loraplus_lr_ratio is not None:
        check_range("loraplus_lr_ratio", args.loraplus_lr_ratio, 1.0, math.inf)


def arguments_from_config(args_cls, cfg: PerturbationConfig, **kwargs):
    """``args_cls(**kwargs)`` with the ``perturbation_*`` fields set from ``cfg``."""
    fields = {PREFIX + f.name: getattr(cfg, f.name) for f in dataclasses.fields(PerturbationConfig)}
    return args_cls(**fields, **kwargs)
