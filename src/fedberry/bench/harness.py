"""Runs each mode as real processes over the emulated link and turns their events into figures.

One file a mode (mode_single.py, mode_fed.py for dsgd and fedavg, mode_ddp.py); what the figures
mean, and where the bytes are counted, is in results.py.
"""

from __future__ import annotations

import os

from fedberry.bench.context import BenchContext
from fedberry.bench.mode_ddp import run_ddp
from fedberry.bench.mode_fed import run_fed
from fedberry.bench.mode_flower import run_flower
from fedberry.bench.mode_single import run_single
from fedberry.bench.results import ModeResult, Point

# report.py, run.py and the tests take the results' types from here, beside Bench.
__all__ = ["Bench", "ModeResult", "Point"]


class Bench(BenchContext):
    """The modes of one benchmark on one link; ``run`` runs one of them to its result."""

    flower: tuple[str, str] = ("", "")  # (python, flwr version), set by run.py if found

    def run(self, mode: str, *, tag: str | None = None, max_k: int | None = None,
            stop_at_target: bool | None = None) -> ModeResult:
        mc = self.cfg.per_mode[mode]
        stop = self.cfg.stop_at_target if stop_at_target is None else stop_at_target
        load0 = os.getloadavg()[0]
        if mode == "single":
            res = run_single(self, mc, stop)
        elif mode == "flower":
            python, version = self.flower
            res = run_flower(self, mc, stop, tag or mode, python, version, max_k)
        elif mode == "ddp":
            res = run_ddp(self, mc, stop, tag or mode, max_k)
        else:
            res = run_fed(self, mode, mc, stop, tag or mode, max_k)
        res.loadavg = (load0, os.getloadavg()[0])
        return res
