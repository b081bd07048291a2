"""The coordinate-wise median of the updates.

Yin, Chen, Ramchandran, Bartlett, "Byzantine-Robust Distributed Learning: Towards Optimal
Statistical Rates", ICML 2018 (section 3, "coordinate-wise median"): each coordinate of the new
model is the median of that coordinate over the round's updates.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from fedberry.strategies.base import Accumulating, Arrays, StrategyState, check_state
from fedberry.strategies.coordinatewise import UpdateStack


class Median(Accumulating):
    """Robust to fewer than half the workers sending arbitrary values (poisoned or broken),
    which a mean is not.

    No hyperparameters. Every worker gets one vote whatever its sample count. Needs every update
    of a round at once: the chief's memory is O(model x workers) with this rule, not O(model),
    and it cannot run over MPI (whose collective leaves only the sum).
    """

    name = "median"
    needs_all_updates = True

    def __init__(self) -> None:
        self._acc = UpdateStack()

    def result(self) -> Arrays:
        return self._acc.combine(lambda stacked: np.median(stacked, axis=0))

    def params(self) -> dict[str, Any]:
        return {}

    def state_dict(self) -> StrategyState:
        return StrategyState(self.name, {}, {})

    def load_state_dict(self, state: StrategyState) -> None:
        check_state(self, state)
