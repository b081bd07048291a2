"""``/metrics``: the chief's Prometheus metrics through ``prometheus_client`` (the status extra),
in a registry of their own (not the process-global one, which a program embedding the chief
may use for its own metrics).

Rounds and bytes are counted from each round's metrics line as it is written, so that the
counters agree with ``metrics.jsonl`` at every scrape (a round's bytes include its broadcast).
"""

from __future__ import annotations

import os
import resource
import sys

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    ProcessCollector,
    generate_latest,
)
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from fedberry.chief.events import Event, Refused, RoundDone
from fedberry.status.board import StatusBoard

# Round durations from a few seconds (small models on loopback) to an hour (a Pi on Wi-Fi
# training a large shard).
ROUND_BUCKETS = (0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800, 3600)

CONTENT_TYPE = CONTENT_TYPE_LATEST


def resident_bytes() -> float:
    """The chief process's resident set now (Linux: /proc/self/statm), else its peak
    (``resource``: macOS reports bytes, other systems KiB)."""
    try:
        with open("/proc/self/statm") as f:
            return float(int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE"))
    except (OSError, ValueError, IndexError):
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return float(peak if sys.platform == "darwin" else peak * 1024)


class ChiefMetrics:
    """The chief's metrics, fed by the event stream (an observer, like the board)."""

    def __init__(self, board: StatusBoard) -> None:
        self.registry = r = CollectorRegistry()
        self.rounds = Counter("fedberry_rounds", "Rounds closed (lines of metrics.jsonl)",
                              registry=r)
        self.round_seconds = Histogram("fedberry_round_duration_seconds",
                                       "Seconds from one round's close to the next's",
                                       buckets=ROUND_BUCKETS, registry=r)
        self.bytes_up = Counter("fedberry_bytes_up", "Bytes received from workers, counted per "
                                "closed round as in metrics.jsonl", registry=r)
        self.bytes_down = Counter("fedberry_bytes_down", "Bytes sent to workers, counted per "
                                  "closed round as in metrics.jsonl", registry=r)
        self.refusals = Counter("fedberry_refusals", "Connections and updates refused",
                                ["reason"], registry=r)
        self.accuracy = Gauge("fedberry_test_accuracy", "The last round's test accuracy",
                              registry=r)
        self.loss = Gauge("fedberry_test_loss", "The last round's test loss", registry=r)
        self.round = Gauge("fedberry_round", "Rounds done", registry=r)
        Gauge("fedberry_connected_workers", "Workers connected now",
              registry=r).set_function(lambda: float(board.connected()))
        Gauge("fedberry_chief_memory_bytes", "The chief process's resident memory",
              registry=r).set_function(resident_bytes)
        ProcessCollector(registry=r)  # process_* (CPU, memory, file descriptors) on Linux
        self._last_wall: float | None = None
        self._reasons: set[str] = set()

    def __call__(self, event: Event) -> None:
        if isinstance(event, RoundDone):
            rec = event.record
            self.rounds.inc()
            self.round.set(rec["round"])
            self.bytes_up.inc(rec.get("bytes_up") or 0)
            self.bytes_down.inc(rec.get("bytes_down") or 0)
            wall = rec.get("wall_s")
            if isinstance(wall, (int, float)):
                self.round_seconds.observe(max(0.0, wall - (self._last_wall or 0.0)))
                self._last_wall = wall
            for key, gauge in (("test_accuracy", self.accuracy), ("test_loss", self.loss)):
                if isinstance(rec.get(key), (int, float)):
                    gauge.set(rec[key])
        elif isinstance(event, Refused):
            # Reasons are fixed words (error codes, "tls"); the cap guards the label's
            # cardinality all the same.
            reason = event.reason
            if reason not in self._reasons and len(self._reasons) >= 64:
                reason = "other"
            self._reasons.add(reason)
            self.refusals.labels(reason).inc()

    def exposition(self) -> bytes:
        """The text format, for ``/metrics``."""
        return generate_latest(self.registry)
