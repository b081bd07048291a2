#!/usr/bin/env bash
# Sets up this machine (scripts/setup.sh) and runs the whole test suite and the linter.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
PY="${PYTHON:-python3}"
"$PY" -m ruff check src tests
exec "$PY" -m pytest -q --durations=15 "$@"
