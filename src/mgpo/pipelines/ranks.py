"""Where this training process runs: its rank and the number of processes under ``torchrun`` / ``accelerate
launch``, and whether a GPU is there. The train pipeline's modules call these through the module
(``ranks.world_size()``), so a test stands in for a second process or a GPU in this one place."""

from __future__ import annotations

import os


def process_rank() -> int:
    """This process's rank under torchrun / accelerate launch (0 in a single process)."""
    return int(os.environ.get("RANK", "0"))


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()
