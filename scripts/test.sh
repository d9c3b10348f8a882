#!/usr/bin/env bash
# The test command: sets up .venv/ if needed, then runs the whole suite.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
bash scripts/setup.sh
exec .venv/bin/python -m pytest -q -rs "$@"
