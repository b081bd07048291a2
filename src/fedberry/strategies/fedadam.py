"""FedAdam: Adam on the server, over the round's pseudo-gradient.

Reddi, Charles, Zaheer, Garrett, Rush, Konečný, Kumar, McMahan, "Adaptive Federated
Optimization", ICLR 2021 (Algorithm 2, the FedAdam variant). With ``d = mean - global``:

    m <- beta1 * m + (1 - beta1) * d
    v <- beta2 * v + (1 - beta2) * d**2
    global <- global + lr * m / (sqrt(v) + tau)

starting from ``m = 0`` and ``v = tau**2`` (Algorithm 2 asks for ``v_{-1} >= tau**2``).
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


class FedAdam(Accumulating):
    """Adam on the server: per-coordinate adaptive steps, robust to badly scaled updates.

    Parameters
    ----------
    lr : float
        The server learning rate (eta); positive. Reddi et al. tune it per task, over
        several orders of magnitude; the default is 0.01.
    beta1 : float
        The first moment's decay, in [0, 1); the paper uses 0.9.
    beta2 : float
        The second moment's decay, in [0, 1); the paper uses 0.99.
    tau : float
        The adaptivity (Adam's epsilon), positive: smaller is more adaptive. The paper tunes
        it per task too; the default is 10**-3.
    bias_correction : bool
        Divide the moments by ``1 - beta**t`` (t = server steps so far, 1 for the first) as
        Adam does (Kingma & Ba 2015, in the form of their section 2: the step is scaled by
        ``sqrt(1 - beta2**t) / (1 - beta1**t)``, tau is not), starting from ``v = 0``, which
        that correction assumes. This is what Flower's FedAdam does. **Off by default**:
        Algorithm 2 of Reddi et al., whose results and convergence analysis this rule is
        quoted for, has no bias correction and starts from ``v = tau**2``; without the
        correction the first steps are smaller (``1 - beta1`` of a full step), not larger.

    The moments (two float64 arrays per tensor) and the step count are the state saved in
    checkpoints. Integer tensors (step counters) take the plain mean, rounded.
    """

    name = "fedadam"
    needs_all_updates = False

    def __init__(self, *, lr: float = 0.01, beta1: float = 0.9, beta2: float = 0.99,
                 tau: float = 1e-3, bias_correction: bool = False) -> None:
        if not (is_number(lr) and lr > 0):
            raise ValueError(f"fedadam: lr must be a positive number, not {lr!r}")
        for key, beta in (("beta1", beta1), ("beta2", beta2)):
            if not (is_number(beta) and 0 <= beta < 1):
                raise ValueError(f"fedadam: {key} must be in [0, 1), not {beta!r}")
        if not (is_number(tau) and tau > 0):
            raise ValueError(f"fedadam: tau must be a positive number, not {tau!r}")
        if not isinstance(bias_correction, bool):
            raise ValueError(f"fedadam: bias_correction must be true or false, not "
                             f"{bias_correction!r}")
        self.lr, self.beta1, self.beta2, self.tau = float(lr), float(beta1), float(beta2), \
            float(tau)
        self.bias_correction = bias_correction
        self._acc = RunningMean()
        self._m: Arrays = []
        self._v: Arrays = []
        self._step = 0

    def result(self) -> Arrays:
        mean = self._acc.mean()
        glob = self._acc.global_arrays
        if not self._m:
            v0 = 0.0 if self.bias_correction else self.tau ** 2
            self._m = [np.zeros(g.shape, np.float64) for g in glob]
            self._v = [np.full(g.shape, v0, np.float64) for g in glob]
        check_fits(self.name, "first moment", self._m, glob)
        check_fits(self.name, "second moment", self._v, glob)
        self._step += 1
        lr = self.lr
        if self.bias_correction:
            t = self._step
            lr *= np.sqrt(1 - self.beta2 ** t) / (1 - self.beta1 ** t)
        out = []
        for g, a, m, v in zip(glob, mean, self._m, self._v):
            if not is_float(g):
                out.append(a)
                continue
            delta = a.astype(np.float64) - g
            m *= self.beta1
            m += (1 - self.beta1) * delta
            v *= self.beta2
            v += (1 - self.beta2) * np.square(delta)
            out.append(cast_to(g + lr * m / (np.sqrt(v) + self.tau), g.dtype))
        return out

    def params(self) -> dict[str, Any]:
        return {"lr": self.lr, "beta1": self.beta1, "beta2": self.beta2, "tau": self.tau,
                "bias_correction": self.bias_correction}

    def state_dict(self) -> StrategyState:
        arrays = {f"m.{i}": m for i, m in enumerate(self._m)}
        arrays.update({f"v.{i}": v for i, v in enumerate(self._v)})
        arrays["step"] = np.array(self._step, np.int64)
        return StrategyState(self.name, self.params(), arrays)

    def load_state_dict(self, state: StrategyState) -> None:
        check_state(self, state, ["m.*", "v.*", "step"])
        m, v = indexed(state.arrays, "m"), indexed(state.arrays, "v")
        if len(m) != len(v):
            raise ValueError(f"this state holds {len(m)} first moments but {len(v)} second ones")
        self._m, self._v = m, v
        if "step" not in state.arrays and m and self.bias_correction:
            # Written before FedAdam had the option, by a run without it: the correction's
            # step count is unknown, and those moments did not start from v = 0.
            raise ValueError("this state has no step count: it comes from a run without "
                             "bias_correction, so resume with bias_correction=false")
        self._step = int(state.arrays["step"]) if "step" in state.arrays else 0
