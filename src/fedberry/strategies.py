"""Aggregation rules: small pure objects, no I/O.

A strategy sees a round as ``begin(global)``, one ``add(arrays, num_samples)`` per accepted update,
then ``finish() -> new global``. Updates are folded into a running sum as they arrive, so the
chief's memory is O(model) however many workers there are. The arrays given to ``add`` belong to
the strategy from then on: it may overwrite them, keep them (FedAvg turns the first update's into
its sum, the median keeps all), and it returns those it is done with, whose memory the caller may
reuse for the next update it receives (their contents are then meaningless).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

Arrays = list[np.ndarray]


class FedAvg:
    """Federated Averaging: the sample-weighted mean of the workers' weights.

    McMahan, Moore, Ramage, Hampson, Agüera y Arcas, "Communication-Efficient Learning of Deep
    Networks from Decentralized Data", AISTATS 2017. The sum is kept in float64 so that the result
    does not depend on the order in which updates arrive beyond float64 rounding; integer tensors
    (e.g. BatchNorm's step counters) are rounded back to their dtype.
    """

    name = "fedavg"

    def __init__(self) -> None:
        self._global: Arrays = []
        self._sum: Arrays = []
        self._weight = 0.0
        self._unit = 1.0  # the weight one unit of the running sum stands for
        self.updates = 0

    def begin(self, global_arrays: Sequence[np.ndarray]) -> None:
        self._global = list(global_arrays)
        self._sum = []
        self._weight = 0.0
        self.updates = 0

    def add(self, arrays: Sequence[np.ndarray], num_samples: float) -> list[np.ndarray]:
        """Fold one update into the running sum. May overwrite ``arrays`` (the caller's own
        received buffers); returns those of them it does not keep, free for the caller's reuse."""
        if num_samples <= 0:
            raise ValueError("num_samples must be positive")
        w = float(num_samples)
        spare: list[np.ndarray] = []
        if not self._sum:
            # The sum counts in units of the first update's weight: while updates weigh the
            # same (equal shards, the usual case) none is multiplied, and the one pass that
            # scales the sum to the mean at the end is all the arithmetic besides the adds.
            # float32 sums for float32 models: 5x faster than float64 and within float32
            # tolerance for the handful of terms a round has; float64 for integer tensors.
            # The first update's own buffers become the sums: no allocation, no page faults.
            # A unit below 1 would scale later updates up by more than their own weight does:
            # a worker claiming a tiny sample count first must not make float32 overflow.
            self._unit = max(w, 1.0)
            scale = w / self._unit
            for a in arrays:
                dtype = np.result_type(a.dtype, np.float32)
                if a.dtype == dtype and a.flags.writeable:
                    acc = a
                else:
                    # np.array, not astype: numpy turns a 0-d result into a scalar, and
                    # ``acc +=`` on a scalar would rebind the name instead of adding (step
                    # counters are 0-d).
                    acc = np.array(a, dtype=dtype)
                    spare.append(a)
                if scale != 1.0:
                    acc *= scale
                self._sum.append(acc)
        else:
            scale = w / self._unit
            for acc, a in zip(self._sum, arrays):
                if a.dtype == acc.dtype and a.flags.writeable:
                    if scale != 1.0:
                        np.multiply(a, scale, out=a)
                    acc += a
                    spare.append(a)
                else:
                    acc += a if scale == 1.0 else scale * a
        self._weight += w
        self.updates += 1
        return spare

    def mean(self) -> Arrays:
        if not self.updates:
            raise RuntimeError("no update in this round")
        # A multiplication by the reciprocal: half the time of a division, one rounding more.
        scale = self._unit / self._weight
        out = []
        for acc, g in zip(self._sum, self._global):
            if scale != 1.0:
                acc *= scale
            out.append(_cast(acc, g.dtype))
        self._sum = []  # handed out (when dtypes match, without a copy): never touched again
        return out

    def finish(self) -> Arrays:
        return self.mean()

    def state_dict(self) -> dict[str, np.ndarray]:
        return {}

    def load_state_dict(self, state: dict[str, np.ndarray]) -> None:
        pass


def _cast(x: np.ndarray, dtype: np.dtype) -> np.ndarray:
    # np.asarray throughout: numpy computes a 0-d result as a scalar, and a model is arrays.
    if x.dtype == dtype:
        return np.asarray(x)
    if np.issubdtype(dtype, np.integer) or dtype == np.bool_:
        x = np.rint(x)
    return np.asarray(x.astype(dtype))


class FedAvgM(FedAvg):
    """FedAvg with server momentum on the pseudo-gradient ``global - mean``.

    Hsu, Qi, Brown, "Measuring the Effects of Non-Identical Data Distribution for Federated Visual
    Classification", 2019. ``server_lr=1, momentum=0`` is plain FedAvg. Helps under label skew.
    """

    name = "fedavgm"

    def __init__(self, server_lr: float = 1.0, momentum: float = 0.9) -> None:
        super().__init__()
        self.server_lr = server_lr
        self.momentum = momentum
        self._velocity: Arrays = []

    def finish(self) -> Arrays:
        mean = self.mean()
        if not self._velocity:
            self._velocity = [np.zeros(g.shape, np.float64) for g in self._global]
        out = []
        for g, m, v in zip(self._global, mean, self._velocity):
            if not np.issubdtype(g.dtype, np.floating):
                out.append(m)
                continue
            v *= self.momentum
            v += g.astype(np.float64) - m
            out.append(_cast(g - self.server_lr * v, g.dtype))
        return out

    def state_dict(self) -> dict[str, np.ndarray]:
        return {f"velocity.{i}": v for i, v in enumerate(self._velocity)}

    def load_state_dict(self, state: dict[str, np.ndarray]) -> None:
        self._velocity = [state[f"velocity.{i}"] for i in range(len(state))]


class FedAdam(FedAvg):
    """Adam on the server over the pseudo-gradient ``mean - global``.

    Reddi, Charles, Zaheer, Garrett, Rush, Konečný, Kumar, McMahan, "Adaptive Federated
    Optimization", ICLR 2021 (Algorithm 2, FedAdam; no bias correction, as in the paper).
    """

    name = "fedadam"

    def __init__(self, server_lr: float = 0.01, beta1: float = 0.9, beta2: float = 0.99,
                 tau: float = 1e-3) -> None:
        super().__init__()
        self.server_lr, self.beta1, self.beta2, self.tau = server_lr, beta1, beta2, tau
        self._m: Arrays = []
        self._v: Arrays = []

    def finish(self) -> Arrays:
        mean = self.mean()
        if not self._m:
            self._m = [np.zeros(g.shape, np.float64) for g in self._global]
            self._v = [np.zeros(g.shape, np.float64) for g in self._global]
        out = []
        for g, a, m, v in zip(self._global, mean, self._m, self._v):
            if not np.issubdtype(g.dtype, np.floating):
                out.append(a)
                continue
            delta = a.astype(np.float64) - g
            m *= self.beta1
            m += (1 - self.beta1) * delta
            v *= self.beta2
            v += (1 - self.beta2) * delta * delta
            out.append(_cast(g + self.server_lr * m / (np.sqrt(v) + self.tau), g.dtype))
        return out

    def state_dict(self) -> dict[str, np.ndarray]:
        state = {f"m.{i}": m for i, m in enumerate(self._m)}
        state.update({f"v.{i}": v for i, v in enumerate(self._v)})
        return state

    def load_state_dict(self, state: dict[str, np.ndarray]) -> None:
        n = len(state) // 2
        self._m = [state[f"m.{i}"] for i in range(n)]
        self._v = [state[f"v.{i}"] for i in range(n)]


class Median(FedAvg):
    """Coordinate-wise median of the updates: robust to fewer than half the workers sending
    arbitrary values (poisoned or broken), which a mean is not.

    Yin, Chen, Ramchandran, Bartlett, "Byzantine-Robust Distributed Learning: Towards Optimal
    Statistical Rates", ICML 2018. Every worker gets one vote whatever its sample count (a
    count is the worker's own claim, which an attacker would inflate). Needs every update of a
    round at once: the chief's memory is O(model x workers) with this rule, not O(model).
    """

    name = "median"
    needs_all_updates = True

    def begin(self, global_arrays: Sequence[np.ndarray]) -> None:
        self._global = list(global_arrays)
        self._updates: list[Sequence[np.ndarray]] = []
        self.updates = 0

    def add(self, arrays: Sequence[np.ndarray], num_samples: float) -> list[np.ndarray]:
        if num_samples <= 0:
            raise ValueError("num_samples must be positive")
        self._updates.append(arrays)  # kept until finish(): nothing to give back
        self.updates += 1
        return []

    def finish(self) -> Arrays:
        if not self.updates:
            raise RuntimeError("no update in this round")
        out = [_cast(self._combine(np.stack([u[i] for u in self._updates])), g.dtype)
               for i, g in enumerate(self._global)]
        self._updates = []
        return out

    def _combine(self, stacked: np.ndarray) -> np.ndarray:
        return np.median(stacked, axis=0)


class TrimmedMean(Median):
    """Coordinate-wise trimmed mean: per coordinate, drop the ``trim`` fraction of largest and of
    smallest values, average the rest (Yin et al. 2018, as for ``Median``). With fewer than
    ``1 / trim`` updates nothing is dropped. Memory O(model x workers), like the median."""

    name = "trimmed_mean"

    def __init__(self, trim: float = 0.1) -> None:
        super().__init__()
        if not 0 <= trim < 0.5:
            raise ValueError("trim must be in [0, 0.5)")
        self.trim = trim

    def _combine(self, stacked: np.ndarray) -> np.ndarray:
        k = int(self.trim * len(stacked))
        kept = np.sort(stacked, axis=0)[k:len(stacked) - k]
        return kept.mean(axis=0, dtype=np.float64)


STRATEGIES = {"fedavg": FedAvg, "fedavgm": FedAvgM, "fedadam": FedAdam, "median": Median,
              "trimmed_mean": TrimmedMean}


def make_strategy(name: str) -> FedAvg:
    try:
        return STRATEGIES[name]()
    except KeyError:
        raise ValueError(f"unknown strategy {name!r}; choose from {sorted(STRATEGIES)}") from None
