"""What happens in a run, as a small typed event stream: the one interface the chief runtime and
its transports feed, and that observers (the status page, ``fedberry.status``) consume.

Each fact is emitted once, where it becomes known: a worker joined or left (``runtime.attach`` /
``detach``), a connection was refused (``transports/tcp/chief.py``, at the point of refusal), an
update came in, a round closed (with its metrics line, once written), bytes moved for one worker.
Events are emitted on the chief's own thread (its asyncio loop; MPI rank 0's thread); an
observer must be quick and must not block, and what it raises is logged and dropped, never
passed on into the round (the side-effect policy of ``chief.runtime``).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

log = logging.getLogger("fedberry.chief")


def _now() -> float:
    return time.time()


@dataclass(frozen=True)
class WorkerJoined:
    """A worker joined (or rejoined) the run."""

    worker_id: str
    address: str  # "IP" over TCP, "local" in-process, "mpi" under MPI
    round: int  # the chief's round when it joined
    agent: str = ""  # the software it says it runs (HELLO's agent), if it says
    at: float = field(default_factory=_now)


@dataclass(frozen=True)
class WorkerLeft:
    """A joined worker is gone: ``lost`` when its connection broke or fell silent (it may come
    back), else it said goodbye or was sent away (``reason``)."""

    worker_id: str
    lost: bool
    reason: str = ""
    at: float = field(default_factory=_now)


@dataclass(frozen=True)
class Refused:
    """A connection or an update was refused. ``reason`` is a short fixed word (an error code
    such as ``auth_failed``, ``busy``, ``timeout``, or ``tls``) fit for a metric label;
    ``sentence`` says why, as the peer was told."""

    reason: str
    sentence: str
    worker_id: str = ""
    address: str = ""
    at: float = field(default_factory=_now)


@dataclass(frozen=True)
class UpdateIn:
    """An update arrived for ``round`` (before the state machine decides whether it counts)."""

    worker_id: str
    round: int
    num_samples: float
    metrics: dict[str, Any]
    codec: str
    at: float = field(default_factory=_now)


@dataclass(frozen=True)
class Traffic:
    """Bytes moved for one worker since its last Traffic event (TCP only): at each update
    and model, and within half a second of any other bytes (heartbeats: the worker is alive)."""

    worker_id: str
    bytes_up: int
    bytes_down: int
    at: float = field(default_factory=_now)


@dataclass(frozen=True)
class RoundDone:
    """A round closed and its metrics line is written: ``record`` is that line
    (``metrics.jsonl``), ``worker_ids`` the workers whose updates it aggregated."""

    record: dict[str, Any]
    worker_ids: tuple[str, ...] = ()
    at: float = field(default_factory=_now)


Event = WorkerJoined | WorkerLeft | Refused | UpdateIn | Traffic | RoundDone
Observer = Callable[[Event], None]


class EventStream:
    """Fans events out to the observers subscribed; with none, ``emit`` costs one check."""

    def __init__(self) -> None:
        # A tuple, replaced whole: another thread may (un)subscribe while events are emitted.
        self._observers: tuple[Observer, ...] = ()

    def subscribe(self, observer: Observer) -> None:
        """Call ``observer(event)`` for every event from now on, on the chief's thread."""
        self._observers = (*self._observers, observer)

    def unsubscribe(self, observer: Observer) -> None:
        self._observers = tuple(o for o in self._observers if o is not observer)

    def emit(self, event: Event) -> None:
        for observer in self._observers:
            try:
                observer(event)
            except Exception:  # an observer's bug must not cost a round
                log.exception("an event observer failed on %s; the run goes on",
                              type(event).__name__)
