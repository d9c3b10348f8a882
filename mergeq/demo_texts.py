"""Offline demo texts: docstrings of the standard library's pure-Python modules, split by module.

The source is the `.py` files of the running Python's standard library, read with `ast` (nothing is
imported, so no module runs), over a sorted list of modules from `sys.stdlib_module_names`. The same
Python version gives the same texts, byte for byte, on any machine.

One document = one docstring, headed by its dotted name, with its blank lines removed; documents are
separated by one blank line, so splitting a text on "\\n\\n" gives back its documents. Each module
(one `.py` file) goes wholly to one of train / calib / eval: the modules are ordered by the sha256 of
their names, eval is filled first, then calib, and the rest is train. A docstring that appears twice
is kept once (its first occurrence in module-name order), so the three texts share no document.
"""

from __future__ import annotations

import ast
import hashlib
import os
import sys
from dataclasses import dataclass
from pathlib import Path

# Packages left out: test suites, GUI/IDE code, and the pieces that Linux distributions split off into
# separate packages (so a text never depends on what happens to be installed).
EXCLUDED_PACKAGES = frozenset(
    {
        "distutils",
        "encodings",
        "ensurepip",
        "idlelib",
        "lib2to3",
        "pydoc_data",
        "test",
        "tkinter",
        "turtle",
        "turtledemo",
        "venv",
        "this",
        "antigravity",
    }
)
EXCLUDED_DIRS = frozenset({"test", "tests", "idle_test", "__pycache__"})
MIN_DOC_CHARS = 80  # shorter docstrings ("Return self.") carry little text
EVAL_CHARS = 130_000  # about 35k tokens: the evaluator uses a few thousand
CALIB_CHARS = 300_000  # about 80k tokens: more than 128 samples x 512 tokens


@dataclass(frozen=True)
class DemoTexts:
    train: str
    calib: str
    eval: str
    modules: dict[str, list[str]]  # split name -> its modules, sorted


def stdlib_dir() -> Path:
    return Path(os.__file__).resolve().parent


def stdlib_sources(root: Path | None = None) -> list[tuple[str, Path]]:
    """(dotted module name, file) for every pure-Python standard-library module kept, sorted by name."""
    root = root or stdlib_dir()
    found: list[tuple[str, Path]] = []
    for name in sorted(n for n in sys.stdlib_module_names if not n.startswith("_") and n not in EXCLUDED_PACKAGES):
        single = root / f"{name}.py"
        package = root / name
        if single.is_file():
            found.append((name, single))
        elif (package / "__init__.py").is_file():
            for path in sorted(package.rglob("*.py")):
                relative = path.relative_to(root).with_suffix("")
                if EXCLUDED_DIRS.intersection(relative.parts):
                    continue
                parts = relative.parts[:-1] if relative.name == "__init__" else relative.parts
                found.append((".".join(parts), path))
    return sorted(found)


def module_docstrings(module: str, path: Path) -> list[str]:
    """The documents of one module: each docstring of the module, its classes and functions, in source order."""
    try:
        tree = ast.parse(path.read_bytes(), filename=str(path))
    except (SyntaxError, ValueError):
        return []
    docs: list[str] = []

    def visit(node: ast.AST, qualname: str) -> None:
        doc = ast.get_docstring(node, clean=True) if isinstance(node, _DOC_NODES) else None
        if doc and len(doc) >= MIN_DOC_CHARS:
            body = "\n".join(line.rstrip() for line in doc.splitlines() if line.strip())
            docs.append(f"{qualname}\n{body}")
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                visit(child, f"{qualname}.{child.name}")

    visit(tree, module)
    return docs


_DOC_NODES = (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)


def _order_key(module: str) -> str:
    return hashlib.sha256(module.encode("utf-8")).hexdigest()


def build_texts(root: Path | None = None) -> DemoTexts:
    seen: set[str] = set()
    per_module: dict[str, list[str]] = {}
    for module, path in stdlib_sources(root):
        kept = []
        for doc in module_docstrings(module, path):
            body = doc.split("\n", 1)[1]
            if body in seen:
                continue
            seen.add(body)
            kept.append(doc)
        if kept:
            per_module[module] = kept

    splits: dict[str, list[str]] = {"eval": [], "calib": [], "train": []}
    sizes = {"eval": 0, "calib": 0}
    for module in sorted(per_module, key=_order_key):
        size = sum(len(doc) + 2 for doc in per_module[module])
        if sizes["eval"] < EVAL_CHARS:
            split = "eval"
        elif sizes["calib"] < CALIB_CHARS:
            split = "calib"
        else:
            split = "train"
        sizes[split] = sizes.get(split, 0) + size
        splits[split].append(module)

    def text(split: str) -> str:
        return "\n\n".join(doc for module in sorted(splits[split]) for doc in per_module[module]) + "\n"

    return DemoTexts(
        train=text("train"),
        calib=text("calib"),
        eval=text("eval"),
        modules={split: sorted(modules) for split, modules in splits.items()},
    )


def documents(text: str) -> list[str]:
    """Split a demo text back into its documents."""
    return [doc for doc in text.split("\n\n") if doc.strip()]
