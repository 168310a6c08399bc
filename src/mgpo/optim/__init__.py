"""The optimizers: one module each, all held to the contract in docs/method.md (pure PyTorch).

Imported lazily: ``mgpo.optim.configs`` (the settings, pure Python) loads without torch.
"""

from __future__ import annotations

import importlib
from typing import Any

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
}
__all__ = ["MGPO", "MSAM", "SAM", "RandomPerturbation", "GGPO", "PRESETS", "PROFILES", "preset", "profile"]


def __getattr__(name: str) -> Any:
    if name in _WHERE:
        return getattr(importlib.import_module(_WHERE[name]), name)
    raise AttributeError(f"module 'mgpo.optim' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
