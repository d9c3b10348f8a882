"""The exporter registry: target name -> the module that defines it, imported only when asked for.

An exporter module decorates its class with `@register("name")`. Adding a target means one line in
EXPORTER_MODULES and one module; nothing else needs to know about it.
"""

from __future__ import annotations

import importlib
from typing import Protocol

from mergeq.core.errors import MergeqError

EXPORTER_MODULES: dict[str, str] = {
    "gguf": "exporters.gguf",
    "awq": "exporters.awq",
    "gptq": "exporters.gptq",
}

_registered: dict[str, type] = {}


class Exporter(Protocol):
    """What every exporter offers. Options are each exporter's own typed dataclass."""

    name: str

    def preflight(self, model_dir, options) -> list[str]:
        """Check everything that can be checked before any heavy work; raise MergeqError or return warnings."""

    def export(self, model_dir, out_dir, options):
        """Write the artifact(s) atomically under out_dir and return their reports."""


def register(name: str):
    def decorate(cls):
        cls.name = name
        _registered[name] = cls
        return cls

    return decorate


def get_exporter(name: str) -> type:
    if name not in EXPORTER_MODULES:
        raise MergeqError(f"unknown export target {name!r}", hint=f"choose one of: {', '.join(EXPORTER_MODULES)}")
    importlib.import_module(EXPORTER_MODULES[name])
    return _registered[name]
