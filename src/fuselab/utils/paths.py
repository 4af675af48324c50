"""Where fuselab keeps downloaded and converted files."""

from __future__ import annotations

import os
from pathlib import Path


def cache_dir() -> Path:
    """``$FUSELAB_CACHE``, else ``$XDG_CACHE_HOME/fuselab``, else ``~/.cache/fuselab``."""
    if env := os.environ.get("FUSELAB_CACHE"):
        return Path(env).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base).expanduser() / "fuselab"
