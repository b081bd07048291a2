#!/usr/bin/env bash
# Sets up this machine (scripts/setup.sh) and runs the demo: a chief and 4 workers on loopback
# training the Fashion-MNIST MLP for 10 rounds. Extra arguments go to `fedberry demo`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
source scripts/python.sh
exec "$PY" -m fedberry demo --workers 4 --rounds 10 "$@"
