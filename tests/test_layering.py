"""The layering, checked from the source: mergeq/core imports nothing of ours outside itself; merge/ and
exporters/ import the core and never the app (mergeq.* outside mergeq.core); merge/ and exporters/ do not import
each other, except for the edges listed in CROSS_EDGES (each one a debt to pay, not a rule)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
OURS = ("mergeq", "merge", "exporters")

# (importing module, imported module) pairs between merge/ and exporters/ allowed as debt. Empty: the two share
# only the core. The list may only shrink: an edge that is gone must be removed (test_cross_edges_listed_are_real).
CROSS_EDGES: set[tuple[str, str]] = set()


def module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imports_of(path: Path) -> set[str]:
    """Every module of ours that `path` imports, at top level or inside a function."""
    tree = ast.parse(path.read_text(), filename=str(path))
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            # `from mergeq import x` imports mergeq.x when x is a module: count both
            names = [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
        else:
            continue
        found.update(n for n in names if n.split(".")[0] in OURS)
    return found


def product_modules() -> dict[str, set[str]]:
    modules = {}
    for top in OURS:
        for path in sorted((REPO / top).rglob("*.py")):
            modules[module_name(path)] = imports_of(path)
    return modules


def existing(name: str, modules: dict[str, set[str]]) -> bool:
    return name in modules


def layer(name: str) -> str:
    if name == "mergeq.core" or name.startswith("mergeq.core."):
        return "core"
    return {"mergeq": "app", "merge": "merge", "exporters": "exporters"}[name.split(".")[0]]


def violations() -> list[str]:
    modules = product_modules()
    bad = []
    for mod, deps in modules.items():
        for dep in sorted(deps):
            if not existing(dep, modules) and dep not in ("mergeq", "merge", "exporters"):
                continue  # `from mergeq.core.x import name`: the name, not a module
            src, dst = layer(mod), layer(dep)
            if dep == "mergeq" and src != "app":
                bad.append(f"{mod} imports the app package root (mergeq); import from mergeq.core")
            elif src == "core" and dst != "core":
                bad.append(f"{mod} (core) imports {dep} ({dst})")
            elif src in ("merge", "exporters") and dst == "app":
                bad.append(f"{mod} ({src}) imports {dep} (app)")
            elif {src, dst} == {"merge", "exporters"} and (mod, dep) not in CROSS_EDGES:
                bad.append(f"{mod} ({src}) imports {dep} ({dst}): merge/ and exporters/ share only the core")
    return bad


def test_layering_has_no_violations():
    assert violations() == []


def test_cross_edges_listed_are_real():
    modules = product_modules()
    stale = [edge for edge in CROSS_EDGES if edge[1] not in modules.get(edge[0], set())]
    assert stale == [], f"remove these edges from CROSS_EDGES, they are gone: {stale}"


@pytest.mark.parametrize(
    "bad_import, expected",
    [
        ("from mergeq.pipeline import run_pipeline", "imports mergeq.pipeline (app)"),
        ("import mergeq", "imports the app package root"),
    ],
)
def test_the_check_catches_an_app_import(tmp_path, monkeypatch, bad_import, expected):
    fake = REPO / "merge" / "_layering_probe.py"
    fake.write_text(bad_import + "\n")
    try:
        assert any(expected in v for v in violations())
    finally:
        fake.unlink()
