"""Where generated datasets and reusable stages are kept: one directory, chosen by the environment.

A leaf module, so that every generator can find the cache without importing the registry that
imports the generators."""

from __future__ import annotations

import os
from pathlib import Path


def cache_dir() -> Path:
    """``$LOREX_CACHE_DIR``, else ``$XDG_CACHE_HOME/lorex``, else ``~/.cache/lorex``."""
    if os.environ.get("LOREX_CACHE_DIR"):
        return Path(os.environ["LOREX_CACHE_DIR"])
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "lorex"
