"""Where mgpo keeps what it fetches or converts once (corpora, the dequantized SmolLM2)."""

from __future__ import annotations

import os
from pathlib import Path


def default_cache_dir() -> Path:
    """The cache root: ``$MGPO_CACHE`` if set, else ``~/.cache/mgpo``."""
    return Path(os.environ.get("MGPO_CACHE") or Path.home() / ".cache" / "mgpo").expanduser()
