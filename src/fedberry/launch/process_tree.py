"""Stopping an ``mpiexec`` launch and every rank under it, with either MPI.

Killing mpiexec's process group is not enough: Open MPI puts every rank in a process group of its
own, so its ranks would go on after mpiexec is gone. The launch's processes are found from
``/proc`` by parent and session instead.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
from pathlib import Path


def _process_table() -> list[tuple[int, int, int]]:
    """(pid, parent pid, session id) of every process, from /proc (empty where there is none)."""
    try:
        names = os.listdir("/proc")
    except OSError:
        return []
    table = []
    for name in names:
        if not name.isdigit():
            continue
        try:
            stat = Path(f"/proc/{name}/stat").read_text()
        except OSError:  # gone meanwhile
            continue
        # After the parenthesised command (which may hold spaces): state, ppid, pgrp, session.
        fields = stat[stat.rindex(")") + 2:].split()
        table.append((int(name), int(fields[1]), int(fields[3])))
    return table


def _launch_tree(root: int) -> set[int]:
    """``root``, its descendants, and every process in a session one of them leads: mpiexec's
    ranks are its descendants (or orphans in its session once a launcher in between is gone)."""
    table = _process_table()
    tree = {root}
    grew = True
    while grew:
        grew = False
        for pid, ppid, sid in table:
            if pid not in tree and (ppid in tree or sid in tree):
                tree.add(pid)
                grew = True
    return tree


def stop_launch(proc: subprocess.Popen, grace: float = 10.0) -> None:
    """Stop a process started with ``start_new_session=True`` that is mpiexec or runs one, and
    every rank under it, with either MPI. SIGTERM first (both mpiexecs pass it on to their ranks
    and clean up), SIGKILL to whatever is left. Killing the process group is not enough: Open MPI
    gives every rank a process group of its own, so its ranks would go on (training until they
    next call MPI) after mpiexec is gone."""
    if proc.poll() is not None:
        return
    tree = _launch_tree(proc.pid)  # now, while parent links still lead to every rank
    with contextlib.suppress(OSError):
        os.kill(proc.pid, signal.SIGTERM)
    try:
        proc.wait(grace)
    except subprocess.TimeoutExpired:
        pass
    tree |= _launch_tree(proc.pid)  # orphans keep the session id of a session leader
    for pid in tree:
        with contextlib.suppress(OSError):
            os.kill(pid, signal.SIGKILL)
    if len(tree) == 1:  # no /proc to find the ranks by: the process group is what is left
        with contextlib.suppress(OSError):
            os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
