"""Receive buffers used again: the chief reads each update into memory it has used before.

A fresh numpy buffer costs a page fault per 4 KiB at first touch (the kernel maps and zeroes each
page): ~0.8 ms a round at the chief for two 4 MB updates on the benchmark VM, a tenth of the
round. The strategy hands back the buffers of an update once it has folded them into its sum
(``FedAvg.add``), and the next update is read into them.

The pool is bounded in bytes (``max_bytes``, two models by default): the chief's memory stays
O(model) however many workers there are. What does not fit is left to the garbage collector.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np

from .protocol import Spec


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
