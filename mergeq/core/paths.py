"""Where mergeq keeps things outside the repo (one cache root, overridable by MERGEQ_CACHE), and how much room
there is where an output will go."""

import os
import shutil
from pathlib import Path


def cache_root() -> Path:
    """`$MERGEQ_CACHE`, else `$XDG_CACHE_HOME/mergeq`, else `~/.cache/mergeq`."""
    if env := os.environ.get("MERGEQ_CACHE"):
        return Path(env).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return base / "mergeq"


def nearest_existing(path: Path) -> Path:
    """`path` made absolute, or its closest ancestor that exists: where a file yet to be written will live."""
    probe = Path(path).absolute()
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    return probe


def free_bytes(path: Path) -> int:
    """Free bytes on the filesystem that holds `path`, or would hold it once written."""
    return shutil.disk_usage(nearest_existing(path)).free
