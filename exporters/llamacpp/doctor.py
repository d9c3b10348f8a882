"""The rows `mergeq doctor` shows for the pinned llama.cpp. Never builds."""

from __future__ import annotations

from exporters.llamacpp.build import find_build_tools, is_built
from exporters.llamacpp.layout import has_source, layout, read_stamp
from exporters.llamacpp.pin import load_pin
from exporters.llamacpp.run import REBUILD_HINT
from exporters.llamacpp.smoke import smoke_test
from mergeq.core.errors import MergeqError


def doctor_rows(*, smoke: bool = True) -> list[tuple[str, str]]:
    """Rows for `mergeq doctor`: pin, source, build variant and why, each tool, and (when built and `smoke`)
    a fresh run of the smoke test, so a build that stopped working on this machine shows here. Never builds."""
    try:
        pin = load_pin()
    except MergeqError as err:
        return [("llama.cpp", f"[red]{err}")]
    where = layout(pin)
    rows = [("llama.cpp pin", f"{pin.requirement} (llama.cpp {pin.commit}, gguf-py {pin.gguf_py_version})")]
    rows.append(
        ("llama.cpp source", str(where.src) if has_source(pin) else "[yellow]not fetched: run mergeq setup-llamacpp")
    )
    if is_built(pin):
        stamp = read_stamp(where) or {}
        variant = stamp.get("variant", {})
        rows.append(
            ("llama.cpp build", f"built in {where.bin} ({stamp.get('seconds', '?')} s, {stamp.get('compiler', '?')})")
        )
        rows.append(("llama.cpp variant", f"{variant.get('name')}: {variant.get('reason')}"))
        for name in pin.targets:
            rows.append((f"llama.cpp tool: {name}", str(where.bin / name)))
        if smoke:
            result = smoke_test(where, pin)
            rows.append(
                (
                    "llama.cpp smoke test",
                    result.summary() if result.passed else f"[red]FAILED: {result.summary()}; {REBUILD_HINT}",
                )
            )
    else:
        rows.append(
            ("llama.cpp build", "[yellow]not built: run mergeq setup-llamacpp (or it builds on first GGUF export)")
        )
        try:
            find_build_tools()
            rows.append(("llama.cpp build tools", "cmake, C/C++ compilers and make/ninja found"))
        except MergeqError as err:
            rows.append(("llama.cpp build tools", f"[red]{err}"))
    return rows
