#!/usr/bin/env bash
# Sets up this machine (scripts/setup.sh) and runs the linters, the whole test suite (this Python,
# every extra installed), then the core tests on every declared Python (scripts/test-pythons.sh:
# numpy only, 3.10 to 3.13). Extra arguments go to the main pytest run.
# FEDBERRY_SKIP_PYTHONS=1 leaves out the multi-Python part (a quick local run).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
source scripts/python.sh
"$PY" -m ruff check src tests
# lint-imports: the layering contracts of pyproject.toml ([tool.importlinter]) on this checkout's
# src/, run by this $PY (import-linter has no `python -m` entry point).
PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" "$PY" -c \
  'import sys; from importlinter.cli import lint_imports_command; sys.exit(lint_imports_command())'
"$PY" -m pytest -q --durations=15 "$@"
if [ "${FEDBERRY_SKIP_PYTHONS:-0}" != 1 ]; then
  bash scripts/test-pythons.sh
fi
