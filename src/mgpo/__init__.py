"""mgpo: momentum-guided perturbation optimizers for LoRA fine-tuning (LoRA-MGPO, arXiv 2502.14538).

Layer 1 (this namespace) is pure PyTorch: the optimizers import nothing from HuggingFace.
"""

__version__ = "0.1.0"
