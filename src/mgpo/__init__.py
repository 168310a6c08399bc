"""mgpo: momentum-guided perturbation optimizers for LoRA fine-tuning (LoRA-MGPO, arXiv 2502.14538).

Layer 1 (this namespace) is pure PyTorch: the optimizers import nothing from Hugging Face. Names are loaded on
first use, so ``import mgpo`` is cheap (the CLI's ``mgpo config --explain`` needs no torch).

    opt = mgpo.MGPO(model, lr=2e-4, rho=0.05)                                      # any torch model
    opt = mgpo.create_optimizer(model, torch.optim.AdamW, {"lr": 2e-4}, method="mgpo", rho=0.05)  # HF grouping
    mgpo.clean_loss(model, probe_batches, optimizer=opt)    # the training loss at the clean weights

The method and its equations: docs/method.md.
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

_WHERE = {
    "MGPO": "mgpo.optim.mgpo",
    "MSAM": "mgpo.optim.mgpo",
    "preset": "mgpo.optim.mgpo",
    "profile": "mgpo.optim.mgpo",
    "SAM": "mgpo.optim.sam",
    "RandomPerturbation": "mgpo.optim.random_perturbation",
    "GGPO": "mgpo.optim.ggpo",
    "PRESETS": "mgpo.optim.configs",
    "PROFILES": "mgpo.optim.configs",
    "PerturbationConfig": "mgpo.optim.configs",
    "MGPOConfig": "mgpo.optim.configs",
    "MSAMConfig": "mgpo.optim.configs",
    "SAMConfig": "mgpo.optim.configs",
    "RandomConfig": "mgpo.optim.configs",
    "GGPOConfig": "mgpo.optim.configs",
    "create_optimizer": "mgpo.factory",
    "build_optimizer": "mgpo.factory",
    "decay_parameter_names": "mgpo.factory",
    "clean_loss": "mgpo.probe",
}
__all__ = [
    "MGPO",
    "MSAM",
    "SAM",
    "RandomPerturbation",
    "GGPO",
    "PRESETS",
    "PROFILES",
    "preset",
    "profile",
    "PerturbationConfig",
    "MGPOConfig",
    "MSAMConfig",
    "SAMConfig",
    "RandomConfig",
    "GGPOConfig",
    "create_optimizer",
    "build_optimizer",
    "decay_parameter_names",
    "clean_loss",
    "__version__",
]


def __getattr__(name: str):
    if name in _WHERE:
        value = getattr(importlib.import_module(_WHERE[name]), name)
        globals()[name] = value  # later look-ups skip this function
        return value
    raise AttributeError(f"module 'mgpo' has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(__all__))
