"""FedAvg: the sample-weighted mean of the workers' weights.

McMahan, Moore, Ramage, Hampson, Agüera y Arcas, "Communication-Efficient Learning of Deep
Networks from Decentralized Data", AISTATS 2017 (Algorithm 1: w <- sum_k n_k / n * w_k).
"""

from __future__ import annotations

from typing import Any

from fedberry.strategies.base import Accumulating, Arrays, StrategyState, check_state
from fedberry.strategies.running_mean import RunningMean


class FedAvg(Accumulating):
    """Federated Averaging: each update counts in proportion to its weight (sample count).

    No hyperparameters and no state between rounds. The sum is kept in float32 for float32
    models (see ``running_mean`` for why, and what that costs in rounding); integer tensors
    are summed in float64 and rounded back to their dtype.
    """

    name = "fedavg"
    needs_all_updates = False

    def __init__(self) -> None:
        self._acc = RunningMean()

    def result(self) -> Arrays:
        return self._acc.mean()

    def params(self) -> dict[str, Any]:
        return {}

    def state_dict(self) -> StrategyState:
        return StrategyState(self.name, {}, {})

    def load_state_dict(self, state: StrategyState) -> None:
        check_state(self, state)
