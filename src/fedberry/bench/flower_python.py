"""Which Python runs the ``flower`` mode's processes.

Flower 1.42 pins versions that would move fedberry's own environment (cryptography, packaging,
rich), so it usually lives in a venv of its own (scripts/flower-venv.sh). The first of these that
imports ``flwr`` and ``torch`` is used: ``--flower-python``, ``$FEDBERRY_FLOWER_PYTHON``,
``~/.cache/fedberry/venv-flower/bin/python``, then this Python (the ``bench-flower`` extra).
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

ENV = "FEDBERRY_FLOWER_PYTHON"
DEFAULT_VENV = Path.home() / ".cache" / "fedberry" / "venv-flower"
CHECK_TIMEOUT_S = 120.0  # importing torch and flwr on a busy machine
_PROBE = "import flwr, torch; print(flwr.__version__)"


def _probe(python: str) -> tuple[str | None, str]:
    try:
        out = subprocess.run([python, "-c", _PROBE], capture_output=True, text=True,
                             timeout=CHECK_TIMEOUT_S)
    except (OSError, subprocess.TimeoutExpired) as e:
        return None, f"{python}: {e}"
    if out.returncode != 0:
        last = (out.stderr.strip().splitlines() or ["failed"])[-1]
        return None, f"{python} cannot import flwr and torch ({last})"
    return out.stdout.strip(), ""


def find(explicit: str | None = None) -> tuple[str | None, str]:
    """(python, flwr version) or (None, why there is none)."""
    asked = explicit or os.environ.get(ENV)
    if asked:
        version, why = _probe(asked)
        return (asked, version) if version else (None, why)
    venv_python = DEFAULT_VENV / "bin" / "python"
    if venv_python.exists():
        version, why = _probe(str(venv_python))
        if version:
            return str(venv_python), version
    if importlib.util.find_spec("flwr") is not None:
        version, why = _probe(sys.executable)
        if version:
            return sys.executable, version
    return None, (f"no Python with Flower: install the extra bench-flower, run "
                  f"scripts/flower-venv.sh, or give --flower-python / ${ENV}")
