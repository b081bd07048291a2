# Sourced by setup.sh, test.sh and demo.sh: sets PY, the Python that fedberry is installed into.
# $PYTHON if given. Else python3, unless it is externally managed (PEP 668: Debian 12, Ubuntu
# 24.04, Raspberry Pi OS bookworm refuse `pip install` into the system Python): then the
# project's own virtual environment .venv (setup.sh creates it), so that one command still sets
# up and runs everything with nothing but the system Python.
if [ -n "${PYTHON:-}" ]; then
  PY="$PYTHON"
elif python3 -c 'import os, sys, sysconfig
sys.exit(0 if os.path.exists(os.path.join(sysconfig.get_path("stdlib"), "EXTERNALLY-MANAGED")) else 1)' 2>/dev/null \
    && [ -z "${VIRTUAL_ENV:-}" ]; then
  PY="$PWD/.venv/bin/python"
  FEDBERRY_VENV=1
else
  PY="python3"
fi
