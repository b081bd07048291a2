"""The status board: what the status page and ``/api/status`` show, kept from the chief's event
stream (``chief.events``) and read as JSON snapshots from the HTTP threads.

Everything is bounded whatever the run's length or the number of peers: the workers table
(``max_workers``; the oldest departed workers leave it first), the recent events (a ring buffer of
``max_events``) and the round history (the last ``max_history`` rounds; O(rounds) until then).
"""

from __future__ import annotations

import math
import threading
import time
from collections import Counter, deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from fedberry.chief.events import (
    Event,
    Refused,
    RoundDone,
    Traffic,
    UpdateIn,
    WorkerJoined,
    WorkerLeft,
)
from fedberry.protocol.frames import VERSION

MAX_WORKERS = 1000  # rows of the workers table; a page of more is unreadable anyway
MAX_EVENTS = 200  # recent events shown
MAX_HISTORY = 10_000  # rounds of curves kept: ~1.5 MB of JSON at most, sent once per page load
MAX_REASONS = 64  # refusal reasons counted apart (they are fixed words; this guards the rest)
ETA_ROUNDS = 20  # the ETA is the mean duration of this many last rounds times those left

# Per round: the metrics line's keys the curves use.
_CURVE_KEYS = ("round", "wall_s", "workers", "test_accuracy", "test_loss", "train_loss",
               "bytes_up", "bytes_down", "num_samples")


@dataclass
class WorkerRow:
    """One row of the workers table."""

    worker_id: str
    address: str
    state: str = "connected"  # connected, lost (its link broke; it may come back), left
    joined_at: float = 0.0
    last_seen: float = 0.0  # when bytes last came from it (TCP: within a second), or it joined
    rounds: int = 0  # rounds whose model its update went into
    bytes_up: int = 0
    bytes_down: int = 0
    metrics: dict[str, Any] = field(default_factory=dict)  # of its last update
    codec: str = ""
    version: str = ""  # what it says it runs; else its protocol version, or "local"

    def as_json(self) -> dict[str, Any]:
        return dict(self.__dict__)


def _json_number(value: Any) -> Any:
    """``value``, but None for a NaN or an infinity: JSON has neither, and a page's
    ``JSON.parse`` refuses the whole answer for one (metrics.jsonl writes them as null too)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


class StatusBoard:
    """An observer of the chief's events (``server.events.subscribe(board)``) with a
    thread-safe ``snapshot()``.

    Parameters
    ----------
    rounds : int or None
        The run's rounds (None: until the workers leave), for "round k of N" and the ETA.
    start_round : int
        Rounds done before this process started (a resumed run).
    workers : int
        Workers the first round waits for.
    """

    def __init__(self, rounds: int | None = None, start_round: int = 0, workers: int = 1, *,
                 max_workers: int = MAX_WORKERS, max_events: int = MAX_EVENTS,
                 max_history: int = MAX_HISTORY, clock: Callable[[], float] = time.time) -> None:
        self._lock = threading.Lock()
        self.rounds = rounds
        self.workers_needed = workers
        self.started = clock()
        self._clock = clock
        self._max_workers = max_workers
        self.round_done = start_round
        self._update_round = start_round  # the round updates are coming in for
        self._updates_in: set[str] = set()
        self._workers: dict[str, WorkerRow] = {}
        self.untracked = 0  # workers not in the table: it was full of connected ones
        self._events: deque[dict[str, Any]] = deque(maxlen=max_events)
        self._history: deque[dict[str, Any]] = deque(maxlen=max_history)
        self._durations: deque[float] = deque(maxlen=ETA_ROUNDS)
        self._last_wall: float | None = None
        self.refusals: Counter[str] = Counter()
        self.finished = False

    # -- the observer ------------------------------------------------------------------------
    def __call__(self, event: Event) -> None:
        with self._lock:
            self._on(event)

    def _on(self, e: Event) -> None:
        if isinstance(e, WorkerJoined):
            row = self._row(e.worker_id, e.address, e.at)
            if row is not None:
                row.state, row.address, row.joined_at, row.last_seen = (
                    "connected", e.address, e.at, e.at)
                row.version = e.agent or ("local" if e.address in ("local", "mpi")
                                          else f"protocol v{VERSION}")
            self._event(e.at, "joined", e.worker_id, e.address, f"joined at round {e.round}")
        elif isinstance(e, WorkerLeft):
            row = self._workers.get(e.worker_id)
            state = "lost" if e.lost else "left"
            if row is not None:
                row.state, row.last_seen = state, e.at
            self._updates_in.discard(e.worker_id)
            text = e.reason or ("its connection broke or fell silent" if e.lost else "left")
            self._event(e.at, state, e.worker_id, row.address if row else "", text)
        elif isinstance(e, Refused):
            reason = e.reason if (e.reason in self.refusals
                                  or len(self.refusals) < MAX_REASONS) else "other"
            self.refusals[reason] += 1
            self._event(e.at, "refused", e.worker_id, e.address, f"{e.reason}: {e.sentence}")
        elif isinstance(e, UpdateIn):
            row = self._workers.get(e.worker_id)
            if row is not None:
                row.last_seen, row.codec = e.at, e.codec
                row.metrics = {k: _json_number(v) for k, v in e.metrics.items()}
            if e.round > self._update_round:
                self._update_round, self._updates_in = e.round, set()
            if e.round == self._update_round:
                self._updates_in.add(e.worker_id)
        elif isinstance(e, Traffic):
            row = self._workers.get(e.worker_id)
            if row is not None:
                row.bytes_up += e.bytes_up
                row.bytes_down += e.bytes_down
                if e.bytes_up:  # heard from it (heartbeats count); what we sent proves nothing
                    row.last_seen = e.at
        elif isinstance(e, RoundDone):
            self._round(e)

    def _round(self, e: RoundDone) -> None:
        rec = e.record
        self.round_done = max(self.round_done, int(rec["round"]))
        if self.round_done > self._update_round:
            self._update_round, self._updates_in = self.round_done, set()
        entry = {k: _json_number(rec.get(k)) for k in _CURVE_KEYS}
        entry["at"] = e.at
        wall = rec.get("wall_s")
        if isinstance(wall, (int, float)):
            # A round's duration: from the previous round's close (the first: from the first
            # join), as metrics.jsonl's wall_s counts.
            entry["duration_s"] = round(wall - (self._last_wall or 0.0), 3)
            self._durations.append(entry["duration_s"])
            self._last_wall = wall
        self._history.append(entry)
        for wid in e.worker_ids:
            row = self._workers.get(wid)
            if row is not None:
                row.rounds += 1
        if self.rounds is not None and self.round_done >= self.rounds:
            self.finished = True

    def _row(self, worker_id: str, address: str, at: float) -> WorkerRow | None:
        row = self._workers.get(worker_id)
        if row is not None:
            return row
        if len(self._workers) >= self._max_workers:
            gone = [r for r in self._workers.values() if r.state != "connected"]
            if not gone:
                self.untracked += 1
                return None
            del self._workers[min(gone, key=lambda r: r.last_seen).worker_id]
        row = self._workers[worker_id] = WorkerRow(worker_id, address, joined_at=at)
        return row

    def _event(self, at: float, kind: str, worker_id: str, address: str, text: str) -> None:
        self._events.append({"at": at, "kind": kind, "worker_id": worker_id,
                             "address": address, "text": text})

    # -- readers (any thread) ----------------------------------------------------------------
    def connected(self) -> int:
        """Workers connected now."""
        with self._lock:
            return sum(r.state == "connected" for r in self._workers.values()) + self.untracked

    def snapshot(self, since: int | None = None) -> dict[str, Any]:
        """The status as JSON-ready data (docs/operations.md describes each key). ``since``:
        only the rounds after that one in ``history`` (a page that has them asks so)."""
        with self._lock:
            now = self._clock()
            connected = [r.worker_id for r in self._workers.values() if r.state == "connected"]
            eta = None
            if self.rounds is not None and self._durations and not self.finished:
                mean = sum(self._durations) / len(self._durations)
                eta = round(mean * max(0, self.rounds - self.round_done), 1)
            history = [h for h in self._history if since is None or h["round"] > since]
            return {
                "now": now,
                "started": self.started,
                "finished": self.finished,
                "round": self.round_done,
                "rounds": self.rounds,
                "round_open": None if self.finished else self._update_round + 1,
                "eta_s": eta,
                "workers_needed": self.workers_needed,
                "connected": len(connected) + self.untracked,
                "updates_in": sorted(self._updates_in),
                "awaited": sorted(set(connected) - self._updates_in),
                "workers": [r.as_json() for r in self._workers.values()],
                "workers_untracked": self.untracked,
                "events": list(self._events),
                "refusals": dict(self.refusals),
                "history": history,
            }
