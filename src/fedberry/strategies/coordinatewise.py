"""The updates of a round, kept whole for rules that combine them coordinate by coordinate.

Shared by composition between the median and the trimmed mean: memory O(model x workers).
Every update gets one vote whatever its weight: a sample count is the worker's own claim, which
an attacker would inflate, and these rules exist to resist attackers.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np

from fedberry.strategies.base import Arrays, cast_to, check_weight


class UpdateStack:
    """``begin(global)``, ``add(update, weight)`` any number of times, then ``combine(fn)``."""

    def __init__(self) -> None:
        self.global_arrays: Arrays = []
        self._updates: list[Sequence[np.ndarray]] = []

    @property
    def updates(self) -> int:
        return len(self._updates)

    def begin(self, global_arrays: Sequence[np.ndarray]) -> None:
        self.global_arrays = list(global_arrays)
        self._updates = []

    def add(self, update: Sequence[np.ndarray], weight: float) -> list[np.ndarray]:
        check_weight(weight)  # refused like everywhere, though it does not count here
        self._updates.append(update)  # kept until combine(): nothing to give back
        return []

    def combine(self, fn: Callable[[np.ndarray], np.ndarray]) -> Arrays:
        """``fn(stacked)`` per tensor, ``stacked`` of shape (updates, *tensor shape); the result
        in the global model's dtypes (integers rounded)."""
        if not self._updates:
            raise RuntimeError("no update was added in this round")
        out = [cast_to(np.asarray(fn(np.stack([u[i] for u in self._updates]))), g.dtype)
               for i, g in enumerate(self.global_arrays)]
        self._updates = []
        return out
