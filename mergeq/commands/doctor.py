"""`mergeq doctor`: the state of every external piece mergeq relies on."""

from __future__ import annotations

import shutil

from rich.table import Table

from mergeq.core.paths import cache_root
from mergeq.core.progress import stderr_console
from mergeq.core.versions import package_versions

PACKAGES = ("torch", "transformers", "peft", "safetensors", "bitsandbytes", "gguf", "rich", "matplotlib")
TOOLS = ("cmake", "c++", "make")


def run(args) -> int:
    table = Table(title="mergeq doctor")
    table.add_column("piece")
    table.add_column("state")
    for name, version in package_versions(PACKAGES).items():
        table.add_row(f"python: {name}", version or "[red]missing")
    for tool in TOOLS:
        table.add_row(f"tool: {tool}", shutil.which(tool) or "[red]missing")
    table.add_row("cache", str(cache_root()))
    for extra in _extra_rows():
        table.add_row(*extra)
    stderr_console().print(table)
    return 0


def _extra_rows() -> list[tuple[str, str]]:
    """Rows contributed by other components (llama.cpp build state), if they are present."""
    rows: list[tuple[str, str]] = []
    try:
        from exporters.llamacpp.doctor import doctor_rows
    except ImportError:
        return rows
    rows.extend(doctor_rows())
    return rows


def register(sub) -> None:
    parser = sub.add_parser("doctor", help="report versions and the llama.cpp build state")
    parser.set_defaults(run=run)
