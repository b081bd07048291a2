"""Receive buffers used again: the chief reads each update into memory it has used before.

A fresh numpy buffer costs a page fault per 4 KiB at first touch (the kernel maps and zeroes each
page): ~0.8 ms a round at the chief for two 4 MB updates on the benchmark VM, a tenth of the
round. The strategy hands back the buffers of an update once it has folded them into its sum
(``FedAvg.add``), and the next update is read into them.

The pool is bounded in bytes (``max_bytes``, two models by default): the chief's memory stays
O(model) however many workers there are. What does not fit is left to the garbage collector.

``ReceiveBudget`` bounds the other half: how many bytes of updates are being received at once.
Without it, N workers sending together make the chief hold N updates in flight.
"""

from __future__ import annotations

import re
from collections import deque
from collections.abc import Callable, Iterable

import numpy as np

from fedberry.protocol.frames import Spec


class BufferPool:
    def __init__(self, max_bytes: int = 0) -> None:
        self.max_bytes = max_bytes
        self.nbytes = 0
        self._free: dict[tuple[str, tuple[int, ...]], list[np.ndarray]] = {}

    def take(self, specs: Spec) -> list[np.ndarray]:
        """Writable C-contiguous arrays of exactly these specs, used ones where there are."""
        out = []
        for s in specs:
            free = self._free.get((s.dtype, s.shape))
            if free:
                a = free.pop()
                self.nbytes -= a.nbytes
            else:
                a = np.empty(s.shape, dtype=np.dtype(s.dtype))
            out.append(a)
        return out

    def give(self, arrays: Iterable[np.ndarray]) -> None:
        """Arrays nothing else refers to any more, their contents meaningless: kept for
        ``take`` while they fit in ``max_bytes``."""
        for a in arrays:
            # Only what np.empty would have made: a read-only or strided array cannot be
            # received into, and a view would pin (and alias) the memory of another array.
            if (not a.nbytes or not a.flags.writeable or not a.flags.c_contiguous
                    or a.base is not None or self.nbytes + a.nbytes > self.max_bytes):
                continue
            self._free.setdefault((a.dtype.str, a.shape), []).append(a)
            self.nbytes += a.nbytes

    def clear(self) -> None:
        self._free.clear()
        self.nbytes = 0


_UNITS = {"": 1, "b": 1, "k": 1000, "kb": 1000, "kib": 1 << 10, "m": 1000**2, "mb": 1000**2,
          "mib": 1 << 20, "g": 1000**3, "gb": 1000**3, "gib": 1 << 30}


def parse_size(size: int | str) -> int:
    """A size in bytes: an int is bytes, a string has a unit, ``"64MiB"``, ``"1GiB"``,
    ``"512KiB"``, ``"1.5GB"`` (KiB/MiB/GiB: powers of 1024; KB/MB/GB: of 1000; none: bytes).
    The one rule for ``receive_memory`` in ``serve()`` and ``--receive-memory`` on the CLI."""
    if isinstance(size, bool) or not isinstance(size, int | str):
        raise TypeError(f"a size is an int (bytes) or a string like '64MiB', not {size!r}")
    if isinstance(size, int):
        value = size
    else:
        found = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:[eE][0-9]+)?)\s*([A-Za-z]*)\s*", size)
        unit = found.group(2).lower() if found else None
        if found is None or unit not in _UNITS:
            raise ValueError(f"{size!r} is not a size: give a number and a unit, e.g. 64MiB, "
                             "1GiB, 512KiB (or a number of bytes)")
        value = int(float(found.group(1)) * _UNITS[unit])
    if value <= 0:
        raise ValueError(f"a size must be more than 0 bytes, not {size!r}")
    return value


class ReceiveBudget:
    """Bytes of tensor frames being received at once, across every connection.

    A connection asks before a frame's tensors are allocated (``acquire``). Past ``max_bytes``
    it is queued, first come first served, and its transport stops reading: TCP's receive
    window then holds the worker back, and the bytes wait in its socket, not in the chief.
    ``release`` when the frame is in (or abandoned) lets the next ones in, calling their
    ``resume``. One frame is always let in when nothing else is in flight, so a budget smaller
    than one update never blocks it. Only frames in flight count: a strategy that keeps
    updates (``Median``) holds its own memory, and waiting on it could deadlock a round.
    """

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self.in_flight = 0
        self.peak = 0  # the most bytes in flight at once, for tests and stats
        self.waited = 0  # frames that had to wait their turn
        self._queue: deque[tuple[int, Callable[[], None]]] = deque()

    def acquire(self, nbytes: int, resume: Callable[[], None]) -> bool:
        """True: go ahead, ``nbytes`` are counted. False: queued; ``resume()`` is called once
        they have been counted for you (or never, after ``cancel(resume)``)."""
        if not self._queue and self._fits(nbytes):
            self._count(nbytes)
            return True
        self._queue.append((nbytes, resume))
        self.waited += 1
        return False

    def release(self, nbytes: int) -> None:
        self.in_flight -= nbytes
        self._admit()

    def cancel(self, resume: Callable[[], None]) -> None:
        """Forget a queued request (its connection went away)."""
        # == and not `is`: a bound method is a new object at each attribute access.
        self._queue = deque(q for q in self._queue if q[1] != resume)
        self._admit()

    @property
    def queued(self) -> int:
        return len(self._queue)

    def _fits(self, nbytes: int) -> bool:
        return self.in_flight == 0 or self.in_flight + nbytes <= self.max_bytes

    def _count(self, nbytes: int) -> None:
        self.in_flight += nbytes
        self.peak = max(self.peak, self.in_flight)

    def _admit(self) -> None:
        while self._queue and self._fits(self._queue[0][0]):
            nbytes, resume = self._queue.popleft()
            self._count(nbytes)
            resume()
