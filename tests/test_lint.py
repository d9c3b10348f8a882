"""ruff, as configured in pyproject.toml ([tool.ruff]), finds nothing in the Python of the repo, and `ruff format`
would change nothing. Its findings are the failure message. ruff is a dev dependency (pip install -e '.[dev]',
scripts/setup.sh)."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
CHECKED = ("merge", "exporters", "mergeq", "tests", "scripts")


def test_ruff_check_is_clean():
    assert importlib.util.find_spec("ruff") is not None, (
        "ruff is not installed in this environment: pip install -e '.[dev]' (scripts/setup.sh does)"
    )
    result = subprocess.run(
        [sys.executable, "-m", "ruff", "check", "--no-cache", "--output-format", "concise", *CHECKED],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, f"ruff check found problems:\n{result.stdout}{result.stderr}"


def test_ruff_format_leaves_the_tree_as_it_is():
    result = subprocess.run(
        [sys.executable, "-m", "ruff", "format", "--check", "--no-cache", *CHECKED],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, f"ruff format would change these files (run `ruff format`):\n{result.stdout}"
