"""The coordinate-wise trimmed mean of the updates.

Yin, Chen, Ramchandran, Bartlett, "Byzantine-Robust Distributed Learning: Towards Optimal
Statistical Rates", ICML 2018 (section 3, "coordinate-wise trimmed mean"): per coordinate, drop
the largest and the smallest values (a fraction beta of the m updates at each end), average the
rest.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from fedberry.strategies.base import Arrays, StrategyState, check_state
from fedberry.strategies.coordinatewise import UpdateStack


class TrimmedMean:
    """Robust to up to ``trim`` workers sending arbitrary values, and closer to the mean's
    statistical efficiency than the median when they are honest.

    Parameters
    ----------
    trim : int
        How many updates are dropped at each end, per coordinate (Yin et al.'s ``beta * m``):
        the number of arbitrary (Byzantine) workers tolerated. A count, not a fraction: the
        operator knows how many bad workers to guard against, and a fraction of a handful of
        updates rounds to a surprise (0.1 of 5 updates drops none). A round with fewer than
        ``2 * trim + 1`` updates (a quorum closing at its deadline) drops ``(n - 1) // 2`` at
        each end instead, so that one value per coordinate remains (two, averaged, when n is
        even): with ``min_workers`` of
        ``2 * trim + 1`` or more that never happens. Default 1; 0 is the plain (unweighted)
        mean.

    Every worker gets one vote whatever its sample count. Memory O(model x workers), like the
    median; it cannot run over MPI.
    """

    name = "trimmed_mean"
    needs_all_updates = True

    def __init__(self, *, trim: int = 1) -> None:
        if isinstance(trim, bool) or not isinstance(trim, (int, np.integer)) or trim < 0:
            raise ValueError(f"trimmed_mean: trim must be a whole number of updates, 0 or "
                             f"more, not {trim!r}")
        self.trim = int(trim)
        self._stack = UpdateStack()

    @property
    def updates(self) -> int:
        return self._stack.updates

    def begin_round(self, global_arrays: Sequence[np.ndarray]) -> None:
        self._stack.begin(global_arrays)

    def add(self, update: list[np.ndarray], weight: float) -> list[np.ndarray]:
        return self._stack.add(update, weight)

    def result(self) -> Arrays:
        def trimmed(stacked: np.ndarray) -> np.ndarray:
            n = len(stacked)
            k = min(self.trim, (n - 1) // 2)
            kept = np.sort(stacked, axis=0)[k:n - k]
            return kept.mean(axis=0, dtype=np.float64)

        return self._stack.combine(trimmed)

    def params(self) -> dict[str, Any]:
        return {"trim": self.trim}

    def state_dict(self) -> StrategyState:
        return StrategyState(self.name, self.params(), {})

    def load_state_dict(self, state: StrategyState) -> None:
        check_state(self, state)
