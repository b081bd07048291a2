"""Launching MPI jobs from outside MPI: the ``mpiexec`` command line for MPICH's and Open MPI's
launchers, stopping a launch with every rank under it, seeing which rank died first, and a sentence
naming the rank that brought a job down.

Used by the MPI demo, the MPI benchmark and the tests; the ranks themselves use
``fedberry.transports.mpi``.
"""

from fedberry.launch.death_watch import DeathWatch
from fedberry.launch.failure import explain_failure
from fedberry.launch.mpiexec import find_mpiexec, launcher_flags, launcher_kind, mpiexec_argv
from fedberry.launch.process_tree import stop_launch

__all__ = ["DeathWatch", "explain_failure", "find_mpiexec", "launcher_flags", "launcher_kind",
           "mpiexec_argv", "stop_launch"]
