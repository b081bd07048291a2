#!/usr/bin/env bash
# Sets up a fresh Debian / Ubuntu / Raspberry Pi OS machine for fedberry: the Fashion-MNIST files,
# iproute2 (for the slow-link benchmark), and fedberry with all its extras in this Python (or,
# where the system Python is externally managed, in the checkout's .venv: scripts/python.sh).
# Usage: bash scripts/setup.sh            (from the repository root; root or sudo)
set -euo pipefail
cd "$(dirname "$0")/.."

SUDO=""
if [ "$(id -u)" != 0 ]; then SUDO="sudo"; fi
FEDBERRY_VENV=0
source scripts/python.sh

APT="dataset-fashion-mnist iproute2 chromium"  # chromium: the status page's browser test
if [ "$FEDBERRY_VENV" = 1 ] && ! python3 -c 'import ensurepip' 2>/dev/null; then
  APT="$APT python3-venv"  # Debian's python3 makes venvs only with this package
fi
if [ ! -f /usr/share/datasets/fashion-mnist/t10k-labels-idx1-ubyte.gz ] || ! command -v tc >/dev/null \
    || ! command -v chromium >/dev/null || [[ "$APT" == *python3-venv* ]]; then
  $SUDO apt-get update -qq
  # shellcheck disable=SC2086
  $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $APT >/dev/null
fi
# The aarch64 test (tests/test_aarch64.py) runs a worker as on a Raspberry Pi 4 under qemu-user
# in a debootstrapped arm64 root: best effort, the test skips with a reason where they are missing.
if ! command -v qemu-aarch64-static >/dev/null || ! command -v debootstrap >/dev/null; then
  { $SUDO apt-get update -qq \
      && $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq qemu-user-static debootstrap \
      >/dev/null; } || echo "qemu-user-static / debootstrap not installed: tests/test_aarch64.py will skip"
fi
if [ "$FEDBERRY_VENV" = 1 ] && [ ! -x "$PY" ]; then
  echo "python3 is externally managed (PEP 668): installing into $PWD/.venv"
  python3 -m venv .venv
  "$PY" -m pip install -q --disable-pip-version-check --upgrade pip
fi

# torch is pinned to a CPU build: an unpinned "torch" can pull a multi-GB CUDA build, and on a
# Raspberry Pi recent aarch64 wheels are CUDA builds (2.10 dies with "Illegal instruction" on a
# Pi 4); 2.9.1 is the CPU build that trains there.
case "$(uname -m)" in
  aarch64|arm64) TORCH="torch==2.9.1" ;;
  *) TORCH="torch==2.13.0" ;;
esac
"$PY" -m pip install -q --disable-pip-version-check "$TORCH"
"$PY" -m pip install -q --disable-pip-version-check -e ".[torch,keras,lightning,mpi,tls,secagg,bench,status,config,dp,test,browser-test]"
# JAX (CPU, ~5 s from PyPI) so that the Keras callback is also tested on a second backend.
"$PY" -m pip install -q --disable-pip-version-check jax
echo "fedberry set up: $("$PY" -c 'import fedberry, torch; print("fedberry", fedberry.__version__, "torch", torch.__version__)')"
