"""The coordinate-wise trimmed mean of the updates.

Yin, Chen, Ramchandran, Bartlett, "Byzantine-Robust Distributed Learning: Towards Optimal
Statistical Rates", ICML 2018 (section 3, "coordinate-wise trimmed mean"): per coordinate, drop
the largest and the smallest values (a fraction beta of the m updates at each end), average the
rest.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from fedberry.strategies.base import Accumulating, Arrays, StrategyState, check_state
from fedberry.strategies.coordinatewise import UpdateStack


class TrimmedMean(Accumulating):
    """Robust to up to ``trim`` workers sending arbitrary values, and closer to the mean's
    statistical efficiency than the median when they are honest.

    Parameters
    ----------
    trim : int or float
        How many updates are dropped at each end, per coordinate (Yin et al.'s ``beta * m``):
        the number of arbitrary (Byzantine) workers tolerated.

        * A count (an int, 0 or more): the operator knows how many bad workers to guard
          against. A round with fewer than ``2 * trim + 1`` updates (a quorum closing at its
          deadline) drops ``(n - 1) // 2`` at each end instead, so that one value per
          coordinate remains (two, averaged, when n is even): with ``min_workers`` of
          ``2 * trim + 1`` or more that never happens.
        * A fraction (a float in (0, 0.5)): Yin et al.'s beta, ``floor(beta * n)`` of the n
          updates at each end, but at least one as soon as there are three updates: a fraction
          of a handful of updates must not round to no trimming at all (0.1 of 5 is 0).

        Default 1; 0 is the plain (unweighted) mean.

    Every worker gets one vote whatever its sample count. Memory O(model x workers), like the
    median; it cannot run over MPI.
    """

    name = "trimmed_mean"
    needs_all_updates = True

    def __init__(self, *, trim: int | float = 1) -> None:
        if isinstance(trim, (float, np.floating)):
            if not 0 < trim < 0.5:
                raise ValueError(f"trimmed_mean: trim as a fraction must be in (0, 0.5), not "
                                 f"{trim!r}; give a whole number to trim a count of updates")
            self.trim: int | float = float(trim)
        elif isinstance(trim, bool) or not isinstance(trim, (int, np.integer)) or trim < 0:
            raise ValueError(f"trimmed_mean: trim must be a whole number of updates, 0 or "
                             f"more, or a fraction in (0, 0.5), not {trim!r}")
        else:
            self.trim = int(trim)
        self._acc = UpdateStack()

    def trimmed_per_side(self, n: int) -> int:
        """How many of ``n`` updates are dropped at each end of every coordinate."""
        if isinstance(self.trim, float):
            k = max(1, int(self.trim * n)) if n >= 3 else 0
        else:
            k = self.trim
        return min(k, (n - 1) // 2)

    def result(self) -> Arrays:
        def trimmed(stacked: np.ndarray) -> np.ndarray:
            n = len(stacked)
            k = self.trimmed_per_side(n)
            kept = np.sort(stacked, axis=0)[k:n - k]
            return kept.mean(axis=0, dtype=np.float64)

        return self._acc.combine(trimmed)

    def params(self) -> dict[str, Any]:
        return {"trim": self.trim}

    def state_dict(self) -> StrategyState:
        return StrategyState(self.name, self.params(), {})

    def load_state_dict(self, state: StrategyState) -> None:
        check_state(self, state)
