#!/usr/bin/env bash
# Sets up a fresh Debian / Ubuntu / Raspberry Pi OS machine for fedberry: the Fashion-MNIST files,
# iproute2 (for the slow-link benchmark), and fedberry with all its extras in this Python.
# Usage: bash scripts/setup.sh            (from the repository root; root or sudo)
set -euo pipefail
cd "$(dirname "$0")/.."

SUDO=""
if [ "$(id -u)" != 0 ]; then SUDO="sudo"; fi
PY="${PYTHON:-python3}"

if [ ! -f /usr/share/datasets/fashion-mnist/t10k-labels-idx1-ubyte.gz ] || ! command -v tc >/dev/null; then
  $SUDO apt-get update -qq
  $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq dataset-fashion-mnist iproute2 >/dev/null
fi

# torch is pinned to a CPU build: an unpinned "torch" can pull a multi-GB CUDA build, and on a
# Raspberry Pi recent aarch64 wheels are CUDA builds (2.10 dies with "Illegal instruction" on a
# Pi 4); 2.9.1 is the CPU build that trains there.
case "$(uname -m)" in
  aarch64|arm64) TORCH="torch==2.9.1" ;;
  *) TORCH="torch==2.13.0" ;;
esac
"$PY" -m pip install -q --disable-pip-version-check "$TORCH"
"$PY" -m pip install -q --disable-pip-version-check -e ".[torch,keras,mpi,tls,bench,test]"
# JAX (CPU, ~5 s from PyPI) so that the Keras callback is also tested on a second backend.
"$PY" -m pip install -q --disable-pip-version-check jax
echo "fedberry set up: $("$PY" -c 'import fedberry, torch; print("fedberry", fedberry.__version__, "torch", torch.__version__)')"
