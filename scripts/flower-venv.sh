#!/usr/bin/env bash
# A separate Python for the bench's `flower` mode: Flower 1.42 pins versions (cryptography,
# packaging, rich) that would move fedberry's own environment, so it gets a venv of its own.
#   scripts/flower-venv.sh [VENV_DIR]      (default ~/.cache/fedberry/venv-flower)
# then: fedberry bench --flower-python VENV_DIR/bin/python   (or FEDBERRY_FLOWER_PYTHON=...)
# The venv holds torch (CPU), numpy, flwr==1.42.0 and this checkout without extras.
set -euo pipefail
here="$(cd "$(dirname "$0")/.." && pwd)"
venv="${1:-${HOME}/.cache/fedberry/venv-flower}"
py="${PYTHON:-python3}"
"$py" -m venv "$venv"
"$venv/bin/python" -m pip install -q --upgrade pip
# torch pinned to the main environment's version so both sides build the same model bits.
"$venv/bin/python" -m pip install -q "torch==2.13.0" numpy "flwr==1.42.0"
"$venv/bin/python" -m pip install -q --no-deps -e "$here"
"$venv/bin/python" -c 'import flwr, torch, fedberry; print("flower venv ready:", flwr.__version__, torch.__version__)'
echo "use: fedberry bench --modes fedavg,flower --flower-python $venv/bin/python"
