#!/usr/bin/env bash
# The whole demo on a fresh machine: environment, llama.cpp build, demo assets, pipeline, summary.
# Usage: bash scripts/demo.sh [OUT_DIR]   (default: ./mergeq-demo)
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
out=${1:-mergeq-demo}
bash scripts/setup.sh
.venv/bin/mergeq setup-llamacpp
.venv/bin/mergeq demo-assets
.venv/bin/mergeq run --out "$out"
echo "artifacts, reports and summary.{json,md,png} are in $out/"
