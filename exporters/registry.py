"""The exporter registry: target name -> a configured exporter (its options dataclass and a factory), from the
module that defines it, imported only when asked for.

A module registers each target once: `@register("gguf", GGUFOptions)` on a class, or
`register("awq", AwqOptions, make=partial(Int4Exporter, "awq"))` for one class configured per target (as mergekit
registers configured merge methods). Adding a target means one line in EXPORTER_MODULES and one registration.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from mergeq.core.errors import MergeqError

EXPORTER_MODULES: dict[str, str] = {
    "gguf": "exporters.gguf",
    "awq": "exporters.int4.export",
    "gptq": "exporters.int4.export",
}


class Exporter(Protocol):
    """What every exporter offers. Options are each target's own typed dataclass."""

    def preflight(self, model_dir, options) -> list[str]:
        """Check everything that can be checked before any heavy work; raise MergeqError or return warnings."""

    def export(self, model_dir, out_dir, options):
        """Write the artifact(s) atomically under out_dir and return their reports."""


@dataclass(frozen=True)
class Target:
    """One export target: its options dataclass (the only schema of its flags and TOML keys, mergeq.core.options)
    and how to make an exporter for one export (exporters may keep state during it)."""

    name: str
    options: type
    make: Callable[[], Exporter]

    def __call__(self) -> Exporter:
        return self.make()


_registered: dict[str, Target] = {}


def register(name: str, options: type, *, make: Callable[[], Exporter] | None = None):
    """Register target `name`; with `make`, now, else as a class decorator (the class is the factory)."""
    if make is not None:
        _registered[name] = Target(name, options, make)
        return make

    def decorate(cls):
        _registered[name] = Target(name, options, cls)
        return cls

    return decorate


def get_exporter(name: str) -> Target:
    if name not in EXPORTER_MODULES:
        raise MergeqError(f"unknown export target {name!r}", hint=f"choose one of: {', '.join(EXPORTER_MODULES)}")
    importlib.import_module(EXPORTER_MODULES[name])
    return _registered[name]
