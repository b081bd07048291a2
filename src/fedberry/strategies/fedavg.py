"""FedAvg: the sample-weighted mean of the workers' weights.

McMahan, Moore, Ramage, Hampson, Agüera y Arcas, "Communication-Efficient Learning of Deep
Networks from Decentralized Data", AISTATS 2017 (Algorithm 1: w <- sum_k n_k / n * w_k).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from fedberry.strategies.base import Arrays, StrategyState, check_state
from fedberry.strategies.running_mean import RunningMean


class FedAvg:
    """Federated Averaging: each update counts in proportion to its weight (sample count).

    No hyperparameters and no state between rounds. The sum is kept in float32 for float32
    models (see ``running_mean`` for why, and what that costs in rounding); integer tensors
    are summed in float64 and rounded back to their dtype.
    """

    name = "fedavg"
    needs_all_updates = False

    def __init__(self) -> None:
        self._mean = RunningMean()

    @property
    def updates(self) -> int:
        return self._mean.updates

    def begin_round(self, global_arrays: Sequence[np.ndarray]) -> None:
        self._mean.begin(global_arrays)

    def add(self, update: list[np.ndarray], weight: float) -> list[np.ndarray]:
        return self._mean.add(update, weight)

    def result(self) -> Arrays:
        return self._mean.mean()

    def params(self) -> dict[str, Any]:
        return {}

    def state_dict(self) -> StrategyState:
        return StrategyState(self.name, {}, {})

    def load_state_dict(self, state: StrategyState) -> None:
        check_state(self, state)
