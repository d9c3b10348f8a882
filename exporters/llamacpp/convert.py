"""The pinned convert_hf_to_gguf.py: the command that runs it under the pinned gguf-py, and the Hugging Face
architectures it converts as text models (read from its source, never by running it)."""

from __future__ import annotations

import ast
import contextlib
import json
import sys
from pathlib import Path

from exporters.llamacpp.layout import pinned_python_env
from exporters.llamacpp.pin import Pin
from exporters.llamacpp.run import ToolCommand
from exporters.llamacpp.source import ensure_source
from mergeq.core.atomic import write_json
from mergeq.core.errors import MergeqError

ARCHITECTURES_NAME = "text_architectures.json"


def converter_command(model_dir: Path, outfile: Path, outtype: str = "f16", *extra: str) -> ToolCommand:
    """The pinned convert_hf_to_gguf.py on `model_dir`, writing `outfile`, with the pinned gguf-py."""
    where = ensure_source()
    return ToolCommand(
        "convert_hf_to_gguf.py",
        (sys.executable, str(where.converter), str(model_dir), "--outfile", str(outfile), "--outtype", outtype, *extra),
        env=pinned_python_env(where),
    )


def supported_architectures(pin: Pin | None = None) -> list[str]:
    """The Hugging Face architectures the pinned converter can convert as text models, read statically.

    An architecture is supported when conversion/__init__.py routes it (TEXT_MODEL_MAP) and a class in
    conversion/*.py registers it with `@ModelBase.register(...)` without being a multimodal projector class
    (MmprojModel or model_arch MMPROJ, directly or by inheritance). Only the source is parsed: no converter
    code runs. tests/test_llamacpp.py checks the result against the converter's live registry. The list is
    cached next to the tree (`text_architectures.json`).
    """
    where = ensure_source(pin)
    cached = where.root / ARCHITECTURES_NAME
    with contextlib.suppress(OSError, ValueError):
        return json.loads(cached.read_text())
    found = _scan_architectures(where.src / "conversion")
    write_json(cached, found)
    return found


def _scan_architectures(conversion: Path) -> list[str]:
    routed = set(_literal_assignment(conversion / "__init__.py", "TEXT_MODEL_MAP"))
    classes: dict[str, tuple[list[str], list[str], bool]] = {}  # name -> (bases, registered names, MMPROJ arch)
    for path in sorted(conversion.glob("*.py")):
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        for node in tree.body:
            if isinstance(node, ast.ClassDef):
                classes[node.name] = (_base_names(node), _registered_names(node), _declares_mmproj(node))

    def is_mmproj(name: str, seen: frozenset = frozenset()) -> bool:
        if name == "MmprojModel":
            return True
        if name not in classes or name in seen:
            return False
        bases, _, mmproj = classes[name]
        return mmproj or any(is_mmproj(base, seen | {name}) for base in bases)

    registered = {arch for name, (_, names, _) in classes.items() if not is_mmproj(name) for arch in names}
    return sorted(routed & registered)


def _literal_assignment(path: Path, variable: str):
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    for node in tree.body:
        target = (
            node.target
            if isinstance(node, ast.AnnAssign)
            else (node.targets[0] if isinstance(node, ast.Assign) and len(node.targets) == 1 else None)
        )
        if isinstance(target, ast.Name) and target.id == variable and node.value is not None:
            return ast.literal_eval(node.value)
    raise MergeqError(f"{path}: no {variable} found; the pinned converter's layout changed")


def _base_names(node: ast.ClassDef) -> list[str]:
    return [b.id if isinstance(b, ast.Name) else b.attr for b in node.bases if isinstance(b, (ast.Name, ast.Attribute))]


def _registered_names(node: ast.ClassDef) -> list[str]:
    names = []
    for decorator in node.decorator_list:
        if (
            isinstance(decorator, ast.Call)
            and isinstance(decorator.func, ast.Attribute)
            and decorator.func.attr == "register"
        ):
            names += [a.value for a in decorator.args if isinstance(a, ast.Constant) and isinstance(a.value, str)]
    return names


def _declares_mmproj(node: ast.ClassDef) -> bool:
    for stmt in node.body:
        targets = (
            stmt.targets if isinstance(stmt, ast.Assign) else [stmt.target] if isinstance(stmt, ast.AnnAssign) else []
        )
        value = getattr(stmt, "value", None)
        if any(isinstance(t, ast.Name) and t.id == "model_arch" for t in targets) and isinstance(value, ast.Attribute):
            if value.attr == "MMPROJ":
                return True
    return False
