"""Pacing: how a caller slows the TCP chief's bytes to the speed of a link it emulates.

The benchmark without root (``bench/shaper.py``) emulates one slow shared access point on
loopback: every byte the chief sends or receives waits its turn in one token bucket per
direction. The transport knows nothing of buckets; it asks a ``Pacer`` how long a chunk must
wait and runs that timer itself (transports run the timers), so a pacer is pure bookkeeping.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, runtime_checkable

# Paced chunks are small so that connections sharing a pacer interleave as flows on one link
# do; unpaced writes use 1 MiB chunks (``stream._FrameWriter.CHUNK``).
DEFAULT_PACED_CHUNK = 16 * 1024


@runtime_checkable
class Pacer(Protocol):
    """One direction of an emulated link."""

    def reserve(self, nbytes: int) -> float:
        """Account for ``nbytes`` now; return the seconds (>= 0) the caller waits before the
        bytes go out (sending) or count as arrived (receiving). Called on the event loop's
        thread; it must not block."""
        ...


@dataclass(frozen=True)
class Pacing:
    """What a TCP listener paces (``ListenOptions.pacing``); None for a direction: full speed.

    ``uplink`` is workers -> chief (reserved after each read, reading paused meanwhile, so the
    receive window slows the sender too); ``downlink`` chief -> workers (reserved before each
    write). ``chunk``: the most bytes paced at once.
    """

    uplink: Pacer | None = None
    downlink: Pacer | None = None
    chunk: int = DEFAULT_PACED_CHUNK

    def __post_init__(self) -> None:
        if self.chunk <= 0:
            raise ValueError(f"Pacing.chunk must be a positive number of bytes, got {self.chunk}")
