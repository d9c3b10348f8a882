#!/usr/bin/env bash
# The test command: sets up .venv/ if needed, then runs the whole suite (extra arguments go to pytest).
# Prints the ten slowest tests (pytest --durations=10) and, after pytest's closing summary line, the total time.
# Exit status: pytest's; "no tests collected" (pytest's 5) is a failure with its own message.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
started=$(date +%s)
bash scripts/setup.sh
tests_started=$(date +%s)
code=0
.venv/bin/python -m pytest -q -rs --durations=10 "$@" || code=$?
finished=$(date +%s)
echo "scripts/test.sh: $((finished - started)) s in all (setup $((tests_started - started)) s, tests $((finished - tests_started)) s), pytest exit $code"
if [ "$code" -eq 5 ]; then
    echo "scripts/test.sh: FAILED: pytest collected no tests (exit 5); check the test paths and the -k/-m selection${*:+ ($*)}" >&2
fi
exit "$code"
