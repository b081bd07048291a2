"""DP-FedAvg: the mean of clipped updates, plus Gaussian noise, as the chief's aggregation step.

McMahan, Ramage, Talwar, Zhang, "Learning Differentially Private Recurrent Language Models",
ICLR 2018 (DP-FedAvg with the fixed-weight estimator); adaptive clipping from Andrew, Thakkar,
McMahan, Ramaswamy, "Differentially Private Learning with Adaptive Clipping", NeurIPS 2021.

A strategy wrapper, so it runs wherever the chief's state machine aggregates: TCP and
in-process workers and MPI rank 0's combined update all end in ``Chief.update`` ->
``strategy.add`` and ``Chief._close`` -> ``strategy.result``. The split of work:

* clipping is the admission policy's norm bound (``chief.admission``, ``max_update_norm`` in
  ``clip`` mode): every update is clipped to C there, before it reaches ``add``, whoever sent
  it, and the policy weighs every update the same (``uniform_weights``: one per worker, the
  sample counts ignored; a combined MPI update weighs the workers it stands for). So ``add``
  sums clipped deltas with weight 1 each, and the round's total weight is n, the workers;
* ``result`` takes their mean, adds N(0, (z C / n)^2) to every floating-point coordinate, and
  hands the noised mean to the inner rule (FedAvg, or a server optimizer: FedAvgM, FedAdam,
  which is post-processing and keeps the guarantee) as the round's one update;
* with ``adaptive``, the bound follows the ``quantile`` of the update norms: b = (sum of
  [norm_i <= C] + N(0, count_noise^2)) / n, C <- C exp(-clip_lr (b - quantile)); the norms
  are the admission's record of the round (norms before clipping).

epsilon for the configured delta after each round comes from ``privacy.accountant``; the
runtime writes it in the round's metrics line (``round_record``).
"""

from __future__ import annotations

import logging
import math
import secrets
from collections.abc import Sequence
from typing import Any

import numpy as np

from fedberry.privacy.accountant import epsilon
from fedberry.privacy.config import DPConfig
from fedberry.strategies import Strategy, StrategyState, describe, make_strategy
from fedberry.strategies.base import check_state
from fedberry.strategies.running_mean import RunningMean

log = logging.getLogger("fedberry.privacy")


def make_rng(seed: int | None) -> np.random.Generator:
    """The noise generator: seeded with ``seed`` (tests), else with 128 bits from ``secrets``
    (the OS's cryptographic source), so that nobody can predict and subtract the noise."""
    return np.random.Generator(np.random.PCG64(seed if seed is not None
                                               else secrets.randbits(128)))


class DPFedAvg:
    """The inner rule fed the noised mean of uniformly weighted, clipped updates.

    Parameters
    ----------
    config : DPConfig
        clip C, noise multiplier z, delta, adaptive clipping, seed.
    inner : str or Strategy
        What the noised mean becomes: ``fedavg`` (the default) is the noised mean itself.
    """

    needs_all_updates = False

    def __init__(self, config: DPConfig, inner: str | Strategy = "fedavg") -> None:
        self.config = config
        self.inner = make_strategy(inner)
        if getattr(self.inner, "needs_all_updates", False):
            raise ValueError(f"dp: the {self.inner.name} strategy needs every update, but "
                             "DP-FedAvg's noise goes on the mean; use fedavg, fedavgm or fedadam")
        self.name = f"dp_{self.inner.name}"
        self.clip = float(config.clip)  # the bound this round (adaptive: changes each round)
        self.rounds = 0  # rounds aggregated with noise, for the accountant (resume: restored)
        self.epsilon = 0.0
        self.last_noise_std = 0.0
        self.last_noise: list[np.ndarray] = []  # the round's noise, kept for tests (see noise())
        self.keep_noise = False
        self._rng = make_rng(config.seed)
        self._mean = RunningMean()
        self._admission: Any = None
        self._cap: float | None = None

    # -- wiring ------------------------------------------------------------------------------
    @property
    def worker_clip(self) -> float | None:
        """The C workers clip to, announced in WELCOME (None: the chief clips)."""
        return self.clip if self.config.where == "worker" else None

    def bind_admission(self, admission: Any) -> None:
        """The chief's ``Admission``: its bound is C (set from here each round, for adaptive
        clipping) and its record of the round's norms feeds the clipped-count estimate."""
        self._admission = admission
        # A tighter bound the operator set (--max-update-norm) stays in force; the noise is
        # still scaled to C, which then overstates the sensitivity: safe.
        self._cap = admission.policy.max_update_norm
        admission.norm_bound = self._bound()

    def _bound(self) -> float:
        return self.clip if self._cap is None else min(self.clip, self._cap)

    # -- the Strategy interface --------------------------------------------------------------
    @property
    def updates(self) -> int:
        return self._mean.updates

    def begin_round(self, global_arrays: Sequence[np.ndarray]) -> None:
        self._mean.begin(global_arrays)
        if self._admission is not None:
            self._admission.norm_bound = self._bound()

    def add(self, update: list[np.ndarray], weight: float) -> list[np.ndarray]:
        # The weight is the admission's: 1 per worker under DP (uniform_weights).
        return self._mean.add(update, weight)

    def result(self) -> list[np.ndarray]:
        n = self._mean.weight  # workers (uniform weights)
        glob = self._mean.global_arrays
        mean = self._mean.mean()
        c, z = self.clip, self.config.model_noise
        std = z * c / n if n > 0 else 0.0
        noise: list[np.ndarray] = []
        if std > 0:
            for i, m in enumerate(mean):
                if not np.issubdtype(m.dtype, np.floating):
                    continue  # step counters are no one's data
                draw = self._rng.normal(0.0, std, m.shape)
                if self.keep_noise:
                    noise.append(draw)
                mean[i] = np.asarray(m + draw.astype(m.dtype))
        self.last_noise, self.last_noise_std = noise, std
        self.rounds += 1
        self.epsilon = epsilon(self.config.noise, self.rounds, self.config.delta,
                               self.config.sampling_rate) if self.config.noise > 0 else math.inf
        if self.config.adaptive:
            self._adapt(n)
        self.inner.begin_round(glob)
        self.inner.add(mean, 1.0)
        return self.inner.result()

    def _adapt(self, n: float) -> None:
        """Andrew et al. 2021, Algorithm 1: the geometric update of C from the noised fraction
        of this round's updates that were within it."""
        norms = list(getattr(self._admission, "norms", []) or [])
        if not norms or n <= 0:
            return
        within = sum(1.0 for x in norms if x <= self.clip)
        sigma_b = self.config.count_noise or 0.0
        b = (within + (self._rng.normal(0.0, sigma_b) if sigma_b > 0 else 0.0)) / n
        self.clip = float(self.clip * math.exp(-self.config.clip_lr * (b - self.config.quantile)))

    def round_record(self) -> dict[str, Any]:
        """What the round's metrics line says about privacy (after ``result``)."""
        return {"epsilon": self.epsilon, "delta": self.config.delta,
                "dp_clip": self.clip, "dp_noise_std": self.last_noise_std}

    def params(self) -> dict[str, Any]:
        return {"inner": describe(self.inner), **{k: v for k, v in self.config.record().items()
                                                  if k not in ("seed", "target_epsilon")}}

    def state_dict(self) -> StrategyState:
        inner = self.inner.state_dict()
        arrays = {f"inner.{k}": v for k, v in inner.arrays.items()}
        arrays["dp.rounds"] = np.array(self.rounds, np.int64)
        arrays["dp.clip"] = np.array(self.clip, np.float64)
        return StrategyState(self.name, self.params(), arrays)

    def load_state_dict(self, state: StrategyState) -> None:
        check_state(self, StrategyState(state.name, state.params, {}))
        inner = {k[len("inner."):]: v for k, v in state.arrays.items() if k.startswith("inner.")}
        self.inner.load_state_dict(StrategyState(self.inner.name, self.inner.params(), inner))
        if "dp.rounds" in state.arrays:
            self.rounds = int(state.arrays["dp.rounds"])
            self.clip = float(state.arrays["dp.clip"])


def wrap(config: DPConfig, strategy: str | Strategy) -> DPFedAvg:
    """``strategy`` under DP: itself if it is a ``DPFedAvg`` already, else wrapped."""
    if isinstance(strategy, DPFedAvg):
        return strategy
    return DPFedAvg(config, strategy)


__all__ = ["DPFedAvg", "make_rng", "wrap"]
