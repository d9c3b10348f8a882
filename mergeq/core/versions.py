"""Installed package versions, read from the packages' metadata: what merge manifests, stage keys and reports
record, and what `mergeq doctor` shows."""

from __future__ import annotations

import importlib.metadata as md
import platform

from mergeq.core import VERSION

# the packages whose versions change what a stage writes: every merge manifest records them, every stage key covers them
RECORDED = ("torch", "transformers", "peft", "safetensors", "bitsandbytes", "numpy")


def package_version(name: str, missing: str | None = None) -> str | None:
    """The installed version of distribution `name`; `missing` when it is not installed."""
    try:
        return md.version(name)
    except md.PackageNotFoundError:
        return missing


def package_versions(names, missing: str | None = None) -> dict[str, str | None]:
    """{name: version} in the order of `names`; `missing` for those not installed."""
    return {name: package_version(name, missing) for name in names}


def recorded_versions() -> dict[str, str]:
    """mergeq's and Python's versions, then RECORDED's ("missing" where not installed)."""
    return {"mergeq": VERSION, "python": platform.python_version(), **package_versions(RECORDED, missing="missing")}
