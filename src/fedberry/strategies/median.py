"""The coordinate-wise median of the updates.

Yin, Chen, Ramchandran, Bartlett, "Byzantine-Robust Distributed Learning: Towards Optimal
Statistical Rates", ICML 2018 (section 3, "coordinate-wise median"): each coordinate of the new
model is the median of that coordinate over the round's updates.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from fedberry.strategies.base import Arrays, StrategyState, check_state
from fedberry.strategies.coordinatewise import UpdateStack


class Median:
    """Robust to fewer than half the workers sending arbitrary values (poisoned or broken),
    which a mean is not.

    No hyperparameters. Every worker gets one vote whatever its sample count. Needs every update
    of a round at once: the chief's memory is O(model x workers) with this rule, not O(model),
    and it cannot run over MPI (whose collective leaves only the sum).
    """

    name = "median"
    needs_all_updates = True

    def __init__(self) -> None:
        self._stack = UpdateStack()

    @property
    def updates(self) -> int:
        return self._stack.updates

    def begin_round(self, global_arrays: Sequence[np.ndarray]) -> None:
        self._stack.begin(global_arrays)

    def add(self, update: list[np.ndarray], weight: float) -> list[np.ndarray]:
        return self._stack.add(update, weight)

    def result(self) -> Arrays:
        return self._stack.combine(lambda stacked: np.median(stacked, axis=0))

    def params(self) -> dict[str, Any]:
        return {}

    def state_dict(self) -> StrategyState:
        return StrategyState(self.name, {}, {})

    def load_state_dict(self, state: StrategyState) -> None:
        check_state(self, state)
