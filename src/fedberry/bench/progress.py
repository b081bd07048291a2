"""The progress lines a mode prints while it runs."""

from __future__ import annotations

import time

from fedberry.bench.results import Point


class Progress:
    """One line per evaluated model, at most every few seconds unless it matters."""

    def __init__(self, mode: str, unit: str, quiet: bool, every: float = 5.0) -> None:
        self.mode, self.unit, self.quiet, self.every = mode, unit, quiet, every
        self._last = -1e9

    def point(self, p: Point, target: float) -> None:
        if self.quiet:
            return
        now = time.monotonic()
        if p.acc >= target or p.k <= 2 or now - self._last >= self.every:
            self._last = now
            # Worker reports of a round may trail the chief's record: show its count then.
            n = p.bytes if p.bytes is not None else p.socket_bytes
            mb = f"{n / 1e6:9.1f} MB" if n is not None else "        - MB"
            mark = "  <- target" if p.acc >= target else ""
            print(f"  {self.mode:<7} {self.unit} {p.k:>5}  t={p.t:7.1f} s  acc={p.acc:.4f}  "
                  f"{mb}{mark}", flush=True)

    def say(self, text: str) -> None:
        if not self.quiet:
            print(f"  {self.mode:<7} {text}", flush=True)
