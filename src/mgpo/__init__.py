"""mgpo: momentum-guided perturbation optimizers for LoRA fine-tuning (LoRA-MGPO, arXiv 2502.14538).

Layer 1 (this namespace) is pure PyTorch: the optimizers import nothing from HuggingFace.
"""

from mgpo.optim import GGPO, MGPO, MSAM, PRESETS, PROFILES, SAM, RandomPerturbation, preset, profile

__version__ = "0.1.0"
__all__ = ["MGPO", "MSAM", "SAM", "RandomPerturbation", "GGPO", "PRESETS", "PROFILES", "preset", "profile",
           "__version__"]
