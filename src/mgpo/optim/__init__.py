"""The optimizers: one module each, all held to the contract in docs/method.md (pure PyTorch)."""

from mgpo.optim.ggpo import GGPO
from mgpo.optim.mgpo import MGPO, MSAM, PRESETS, PROFILES, preset, profile
from mgpo.optim.random_perturbation import RandomPerturbation
from mgpo.optim.sam import SAM

__all__ = ["MGPO", "MSAM", "SAM", "RandomPerturbation", "GGPO", "PRESETS", "PROFILES", "preset", "profile"]
