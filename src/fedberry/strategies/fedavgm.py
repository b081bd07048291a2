"""FedAvgM: FedAvg with server momentum.

Hsu, Qi, Brown, "Measuring the Effects of Non-Identical Data Distribution for Federated Visual
Classification", arXiv:1909.06335, 2019 (section 3): with the pseudo-gradient
``d = global - mean`` of a round, ``v <- momentum * v + d`` and ``global <- global - lr * v``.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from fedberry.strategies.base import (
    Accumulating,
    Arrays,
    StrategyState,
    cast_to,
    check_fits,
    check_state,
    indexed,
    is_float,
    is_number,
)
from fedberry.strategies.running_mean import RunningMean


class FedAvgM(Accumulating):
    """Server momentum on the round's mean: helps under label skew (non-iid shards).

    Parameters
    ----------
    lr : float
        The server learning rate (eta); positive. ``lr=1, momentum=0`` is plain FedAvg.
    momentum : float
        The server momentum (beta), in [0, 1); 0.9 by default. The effective step is about
        ``lr / (1 - momentum)``: tune the two together.

    The velocity (one float64 array per tensor) is the state saved in checkpoints. Integer
    tensors (step counters) take the plain mean, rounded.
    """

    name = "fedavgm"
    needs_all_updates = False

    def __init__(self, *, lr: float = 1.0, momentum: float = 0.9) -> None:
        if not (is_number(lr) and lr > 0):
            raise ValueError(f"fedavgm: lr must be a positive number, not {lr!r}")
        if not (is_number(momentum) and 0 <= momentum < 1):
            raise ValueError(f"fedavgm: momentum must be in [0, 1), not {momentum!r}")
        self.lr = float(lr)
        self.momentum = float(momentum)
        self._acc = RunningMean()
        self._velocity: Arrays = []

    def result(self) -> Arrays:
        mean = self._acc.mean()
        glob = self._acc.global_arrays
        if not self._velocity:
            self._velocity = [np.zeros(g.shape, np.float64) for g in glob]
        check_fits(self.name, "velocity", self._velocity, glob)
        out = []
        for g, m, v in zip(glob, mean, self._velocity):
            if not is_float(g):
                out.append(m)
                continue
            v *= self.momentum
            v += g.astype(np.float64) - m
            out.append(cast_to(g - self.lr * v, g.dtype))
        return out

    def params(self) -> dict[str, Any]:
        return {"lr": self.lr, "momentum": self.momentum}

    def state_dict(self) -> StrategyState:
        return StrategyState(self.name, self.params(),
                             {f"velocity.{i}": v for i, v in enumerate(self._velocity)})

    def load_state_dict(self, state: StrategyState) -> None:
        check_state(self, state, ["velocity.*"])
        self._velocity = indexed(state.arrays, "velocity")
