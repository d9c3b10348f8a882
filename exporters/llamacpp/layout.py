"""Where a pinned llama.cpp lives in the cache: `cache_root()/llama.cpp/<version>/`, its setup lock, its build
stamp, and the environment in which a Python subprocess imports its gguf-py."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

from exporters.llamacpp.pin import Pin, load_pin
from mergeq.core.locks import exclusive
from mergeq.core.paths import cache_root

STAMP_NAME = "build.json"


@dataclass(frozen=True)
class Layout:
    root: Path

    @property
    def download(self) -> Path:
        return self.root / "download"

    @property
    def src(self) -> Path:
        return self.root / "src"

    @property
    def build(self) -> Path:
        return self.root / "build"

    @property
    def bin(self) -> Path:
        return self.root / "bin"

    @property
    def stamp(self) -> Path:
        return self.root / STAMP_NAME

    @property
    def lock(self) -> Path:
        return self.root.with_name(self.root.name + ".lock")

    @property
    def converter(self) -> Path:
        return self.src / "convert_hf_to_gguf.py"

    @property
    def gguf_py(self) -> Path:
        return self.src / "gguf-py"


def layout(pin: Pin | None = None) -> Layout:
    pin = pin or load_pin()
    return Layout(cache_root() / "llama.cpp" / pin.version)


def setup_lock(where: Layout):
    """Exclusive across processes: one setup at a time; the others wait, then find it done."""
    return exclusive(where.lock, f"another mergeq process is setting up llama.cpp in {where.root}; waiting for it")


def has_source(pin: Pin | None = None) -> bool:
    where = layout(pin)
    return where.converter.is_file() and (where.gguf_py / "gguf" / "__init__.py").is_file()


def read_stamp(where: Layout) -> dict | None:
    try:
        return json.loads(where.stamp.read_text())
    except (OSError, ValueError):
        return None


def built_variant(where: Layout) -> str | None:
    return ((read_stamp(where) or {}).get("variant") or {}).get("name")


def pinned_python_env(where: Layout | None = None, *extra_paths: Path) -> dict[str, str | None]:
    """Environment changes for a Python subprocess that must import the pinned gguf-py, never the installed
    `gguf`: the pinned gguf-py first on PYTHONPATH, and NO_LOCAL_GGUF unset (the converter then also puts
    its own gguf-py first on sys.path)."""
    where = where or layout()
    paths = [str(where.gguf_py), *(str(p) for p in extra_paths)]
    if os.environ.get("PYTHONPATH"):
        paths.append(os.environ["PYTHONPATH"])
    return {"PYTHONPATH": os.pathsep.join(paths), "NO_LOCAL_GGUF": None}
