"""Following a mode whose workers report at every step or round (dsgd, fedavg, ddp).

The mode's own code turns its events into points; this keeps them in order, prints them, decides
when to stop, and waits a little after that for every worker's report of the last one, which
carries the byte counters the point needs.
"""

from __future__ import annotations

import queue
import time
from collections.abc import Callable

from fedberry.bench.process_group import Event, ProcessGroup
from fedberry.bench.progress import Progress
from fedberry.bench.results import ModeResult, Point

REPORT_GRACE = 15.0  # after the target round closed, wait this long for every worker's report
IFACE_SOURCE = "worker interfaces (eth0, headers included)"

Reports = dict[str, Event]  # worker name -> its report of one step or round


class Baseline:
    """Each worker's interface counters when it said ready: they run on across the modes."""

    def __init__(self, ready: dict[str, Event], names: list[str]) -> None:
        self._both = {w: ready[w]["tx"] + ready[w]["rx"] for w in names}
        self._tx = {w: ready[w]["tx"] for w in names}

    def sent(self, worker: str, report: Event) -> int:
        return report["tx"] - self._tx[worker]

    def crossed(self, worker: str, report: Event) -> int:
        """Both directions of the worker's own link."""
        return report["tx"] + report["rx"] - self._both[worker]


class Tracker:
    """The points of one mode's run, the workers' reports by step or round, and when to stop.

    ``bytes_of(point, reports)`` fills in a point's bytes from the reports of its step or round
    (all of them, or as many as have come); it is called again for the points that still have
    no ``per_worker`` when the run has ended.
    """

    def __init__(self, res: ModeResult, progress: Progress, *, target: float, stop: bool,
                 max_k: int, time_cap_s: float,
                 bytes_of: Callable[[Point, Reports], None]) -> None:
        self.res, self.progress = res, progress
        self.target, self.stop, self.max_k, self.time_cap_s = target, stop, max_k, time_cap_s
        self.bytes_of = bytes_of
        self.reports: dict[int, Reports] = {}
        self.done_k: int | None = None  # the step or round at which we stop
        self._done_at = 0.0

    def report(self, k: int, worker: str, event: Event) -> Reports:
        at = self.reports.setdefault(k, {})
        at[worker] = event
        return at

    def add(self, p: Point) -> None:
        self.bytes_of(p, self.reports.get(p.k, {}))
        self.res.points.append(p)
        self.progress.point(p, self.target)
        if self.done_k is None and ((self.stop and p.acc >= self.target) or p.k >= self.max_k):
            self.done_k, self._done_at = p.k, time.monotonic()
            self.res.stop_reason = ("target reached" if p.acc >= self.target
                                    else f"{self.max_k} {self.res.unit}s")

    def follow(self, procs: ProcessGroup, t_go: float,
               on_event: Callable[[str, Event], bool]) -> None:
        """Hands every event to ``on_event`` until it returns True, the run is done and
        reported, or the time cap has passed with no stop decided."""
        while True:
            now = time.monotonic()
            if self.done_k is not None and (
                    len(self.reports.get(self.done_k, {})) == self.res.workers
                    or now - self._done_at > REPORT_GRACE):
                break
            if self.done_k is None and now - t_go > self.time_cap_s:
                self.res.stop_reason = f"time cap ({self.time_cap_s:.0f} s)"
                break
            try:
                name, e = procs.events.get(timeout=0.5)
            except queue.Empty:
                continue
            if on_event(name, e):
                break
        self.res.run_s = time.monotonic() - t_go

    def fill_bytes(self) -> None:
        """Bytes for the points whose workers' reports came after the point was made."""
        for p in self.res.points:
            if p.per_worker is None:
                self.bytes_of(p, self.reports.get(p.k, {}))

    def result_reports(self) -> tuple[int, Reports] | None:
        """The step or round the result stands at (the target, or the last point) and every
        worker's report of it; None if some are missing. Call after results.finish."""
        res = self.res
        k = res.k_to_target if res.reached else (res.points[-1].k if res.points else None)
        if k is None or len(self.reports.get(k, {})) != res.workers:
            return None
        return k, self.reports[k]

def qdisc_delta(before: dict[str, int] | None,
                after: dict[str, int] | None) -> dict[str, int] | None:
    if before is None or after is None:
        return None
    return {k: after[k] - before[k] for k in after}
