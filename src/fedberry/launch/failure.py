"""A sentence naming the rank that brought an MPI job down, read from the launcher's output.

Hydra (MPICH) reports a dead process by PID, Open MPI by rank; fedberry's own ranks report why
they abort (``transports.mpi``'s guard: "fedberry mpi: rank R (...) WHY; aborting ..."). Rank 0's
``mpi_ranks.json`` (rank -> pid, host) turns a PID into a rank.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from fedberry.transports.mpi_guard import MPI_MISMATCH


def _words(pattern: str) -> str:
    """Open MPI wraps its reports at any space: match any whitespace between words."""
    return pattern.replace(" ", r"\s+")


_HYDRA_DEATH = re.compile(r"PID (\d+) RUNNING AT (\S+)\s*\n.*?EXIT CODE: (-?\d+)", re.S)
_HYDRA_STRING = re.compile(r"EXIT STRING: (.+)")
_HYDRA_ABORT = re.compile(r"application called MPI_Abort\([^)]*\) - process (\d+)")
# Open MPI 4 (mpirun) and 5 (prterun) name the rank; the PID is 0 when it was not known.
_OMPI_SIGNAL = re.compile(_words(r"process rank (\d+) with PID (\d+) on node (\S+) exited on "
                                 r"signal (\d+)") + r"(?:\s+\(([^)]*)\))?")
_OMPI_EXIT = re.compile(_words(r"exited with non-zero status") + r".*?Process name:\s*\[\S*,"
                        r"(\d+)\]\s+Exit code:\s*(-?\d+)", re.S)
_OMPI_ABORT = re.compile(_words(r"MPI_ABORT was invoked on rank (\d+)"))
_OUR_ABORT = re.compile(r"fedberry mpi: (rank \d+ \([^)]*\)) (.+?); aborting")
_OUR_MISMATCH = re.compile(r"fedberry mpi: (.*?" + re.escape(MPI_MISMATCH) + r".*)")


@dataclass
class _Report:
    """Which process the launcher says brought the job down, and how."""

    cause: str
    rank: int | None = None
    pid: int | None = None
    host: str | None = None


def _launcher_report(output: str) -> _Report | None:
    # A rank that called MPI_Abort is the cause; the ranks killed after it are reported too.
    m = _OMPI_ABORT.search(output) or _HYDRA_ABORT.search(output)
    if m:
        return _Report("it called MPI_Abort", rank=int(m.group(1)))
    m = _HYDRA_DEATH.search(output)
    if m:
        how = _HYDRA_STRING.search(output)
        return _Report(how.group(1).strip() if how else f"exit code {m.group(3)}",
                       pid=int(m.group(1)), host=m.group(2))
    m = _OMPI_SIGNAL.search(output)
    if m:
        signum, name = m.group(4), m.group(5)
        return _Report(f"{name} (signal {signum})" if name else f"signal {signum}",
                       rank=int(m.group(1)), pid=int(m.group(2)) or None, host=m.group(3))
    m = _OMPI_EXIT.search(output)
    if m:
        return _Report(f"exit code {m.group(2)}", rank=int(m.group(1)))
    return None


def _who(r: dict[str, Any]) -> str:
    role = "the chief" if r["rank"] == 0 else "a worker"
    return f"rank {r['rank']} ({role}, pid {r['pid']} on {r['host']})"


def explain_failure(output: str, ranks: list[dict[str, Any]] | None,
                    first_dead: dict[str, Any] | None = None) -> str:
    """A sentence naming the rank that brought an MPI job down.

    ``output``: the launcher's and the ranks' output; ``ranks``: rank 0's ``mpi_ranks.json``
    (rank -> pid), when it was written; ``first_dead``: the entry of the rank seen to exit first
    (``DeathWatch``). Hydra SIGKILLs the other ranks as soon as one dies and then reports one of
    them, not always the first, so what the launcher saw itself comes before hydra's report.
    Hydra names a PID, Open MPI a rank: either is looked up in ``ranks``.
    """
    ours = _OUR_ABORT.search(output)
    if ours:
        return f"{ours.group(1)} {ours.group(2)}"
    mismatch = _OUR_MISMATCH.search(output)
    if mismatch:
        return mismatch.group(1).strip()
    report = _launcher_report(output)
    if first_dead is not None:
        same = report is not None and (
            report.pid == int(first_dead["pid"]) or report.rank == first_dead["rank"])
        cause = f" ({report.cause})" if same and report is not None else ""
        return f"{_who(first_dead)} died{cause}; mpiexec stopped the other ranks"
    if report is None:
        return ""
    by_pid = {int(r["pid"]): r for r in ranks or []}
    by_rank = {int(r["rank"]): r for r in ranks or []}
    r = (by_pid.get(report.pid) if report.pid is not None else None) or (
        by_rank.get(report.rank) if report.rank is not None else None)
    if r is not None:
        who = _who(r)
    elif report.rank is None:
        who = (f"the process with pid {report.pid} on {report.host} (it died before the ranks "
               "were recorded)")
    else:
        where = (f" (pid {report.pid} on {report.host})" if report.pid else
                 f" (on {report.host})" if report.host else "")
        who = f"rank {report.rank}{where}"
    return f"{who} died ({report.cause}); mpiexec stopped the other ranks"
