"""Where mergeq keeps things outside the repo: one cache root, overridable by MERGEQ_CACHE."""

import os
from pathlib import Path


def cache_root() -> Path:
    """`$MERGEQ_CACHE`, else `$XDG_CACHE_HOME/mergeq`, else `~/.cache/mergeq`."""
    if env := os.environ.get("MERGEQ_CACHE"):
        return Path(env).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return base / "mergeq"
