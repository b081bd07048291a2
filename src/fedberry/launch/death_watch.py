"""Which rank of an MPI job exits first, seen from outside MPI (Linux pidfds)."""

from __future__ import annotations

import os
import select
import socket
import threading
from typing import Any


class DeathWatch:
    """Sees which rank exits first, from outside MPI: a thread waits on a pidfd per rank (Linux;
    elsewhere it sees nothing and the launcher's report is used). The ranks are not the
    launcher's children (mpiexec or hydra's proxy starts them), and pidfds are how one waits for
    a non-child."""

    def __init__(self) -> None:
        self.first: dict[str, Any] | None = None
        self.started = False
        self._stop = False
        self._thread: Any = None

    def start(self, ranks: list[dict[str, Any]]) -> None:
        self.started = True
        if not hasattr(os, "pidfd_open"):
            return
        fds: dict[int, dict[str, Any]] = {}
        here = socket.gethostname()
        for r in ranks:
            if r.get("host", here) != here:
                continue  # its pid means nothing here
            try:
                fds[os.pidfd_open(int(r["pid"]))] = r
            except ProcessLookupError:
                # A rank died before the watch began: whichever exits next is not the first,
                # so say nothing rather than name the wrong one (the launcher's report stands).
                for fd in fds:
                    os.close(fd)
                return
            except OSError:
                continue

        def watch() -> None:
            try:
                while not self._stop and fds:
                    ready, _, _ = select.select(list(fds), [], [], 0.5)
                    if ready:
                        # One ready: that rank died first. Several at once: cannot tell.
                        self.first = fds[ready[0]] if len(ready) == 1 else None
                        return
            finally:
                for fd in fds:
                    os.close(fd)

        self._thread = threading.Thread(target=watch, name="fb-deathwatch", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop = True
        if self._thread is not None:
            self._thread.join(2)
