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
  sums clipped updates with weight 1 each, and the round's total weight is n, the updates;
* ``result`` adds N(0, (z C)^2) to every floating-point coordinate of the SUM of the clipped
  deltas and divides by n_fixed, the fixed public expected count (add/remove adjacency, McMahan
  et al.'s fixed-denominator estimator; integer tensors keep the global's values), and hands
  the noised model to the inner rule (FedAvg, or a server optimizer: FedAvgM, FedAdam,
  which is post-processing and keeps the guarantee) as the round's one update;
* with ``adaptive``, the bound follows the ``quantile`` of the update norms: b = (sum of
  ([norm_i <= C] - 1/2) + N(0, count_noise^2)) / n_fixed + 1/2,
  C <- C exp(-clip_lr (b - quantile)); the norms
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
    expected : int or None
        n_fixed, the configured number of updates a round (``dp_chief`` sets it).
    """

    needs_all_updates = False

    def __init__(self, config: DPConfig, inner: str | Strategy = "fedavg", *,
                 expected: int | None = None) -> None:
        self.config = config
        self.expected = expected  # n_fixed: the fixed, public denominator (see result)
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
        self._said_integers = False
        # Distributed noise (with secure aggregation): the workers add the noise, each a share,
        # before masking; the chief adds none, and only ever sees the noised sum.
        self.distributed = False

    # -- wiring ------------------------------------------------------------------------------
    @property
    def worker_clip(self) -> float | None:
        """The C workers clip to, announced in WELCOME (None: the chief clips)."""
        return self.clip if self.config.where == "worker" else None

    @property
    def distributed_noise_std(self) -> float | None:
        """Distributed noise: the std of the noise the sum must carry, z C (the workers add
        it in shares: ``chief.state``); None when the chief adds it itself."""
        return self.config.model_noise * self.clip if self.distributed else None

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
        """The fixed-denominator estimator of McMahan et al. 2018: global + (sum of the round's
        clipped deltas + N(0, (z C)^2)) / n_fixed, n_fixed the public expected count
        (``expected``). Under add/remove adjacency one worker changes the sum by at most C, so
        the noise hides it; a round with fewer updates is scaled down by n / n_fixed, the price
        of a denominator that does not depend on who took part."""
        n = self._mean.weight  # the updates (uniform weights: 1 each)
        m = self.fixed_count
        glob = self._mean.global_arrays
        mean = self._mean.mean() if n > 0 else [np.array(g) for g in glob]
        c, z = self.clip, self.config.model_noise
        sum_std = z * c  # on the sum: the sensitivity C times the multiplier
        std = sum_std / m  # on the mean
        noise: list[np.ndarray] = []
        out: list[np.ndarray] = []
        kept = False
        for avg, g in zip(mean, glob):
            if not np.issubdtype(np.asarray(g).dtype, np.floating):
                # Integer tensors (step counters) carry no noise, so they are not released:
                # the global's stay as they were (said once, at the first round).
                out.append(np.array(g))
                kept = True
                continue
            total = (avg.astype(np.float64) - g) * n  # the sum of the clipped deltas
            if sum_std > 0 and not self.distributed:  # distributed: the sum holds it already
                draw = self._rng.normal(0.0, sum_std, g.shape)
                if self.keep_noise:
                    noise.append(draw / m)  # as it lands on the mean
                total += draw
            out.append(np.asarray(g + total / m).astype(np.asarray(g).dtype))
        if kept and not self._said_integers:
            self._said_integers = True
            log.warning("dp: the model's integer tensors stay as the initial model has them: "
                        "updates to them are ignored (they would be released without noise)")
        self.last_noise, self.last_noise_std = noise, std
        self.rounds += 1
        self.epsilon = (epsilon(self.config.noise, self.rounds, self.config.delta)
                        if self.config.noise > 0 else math.inf)  # q = 1: no amplification
        if self.config.adaptive:
            self._adapt(m)
        self.inner.begin_round(glob)
        self.inner.add(out, 1.0)
        return self.inner.result()

    @property
    def fixed_count(self) -> float:
        """n_fixed, the public denominator: the configured workers a round (set by
        ``privacy.chief.dp_chief``, or the MPI chief from its training ranks)."""
        if self.expected is None or self.expected < 1:
            raise ValueError("dp: DPFedAvg needs the expected number of updates a round "
                             "(expected=), the fixed denominator of its noised mean")
        return float(self.expected)

    def _adapt(self, m: float) -> None:
        """Andrew et al. 2021, Algorithm 1: the geometric update of C from the noised fraction
        of this round's updates within it. Each bit is centred, b_i - 1/2, so that adding or
        removing one worker moves the sum by at most 1/2 (the sensitivity the budget split
        ``DPConfig.model_noise`` assumes); the noised sum is divided by the same fixed m
        (as TF Privacy's ``QuantileEstimatorQuery`` does: sum_stddev sigma_b, clip 0.5)."""
        norms = list(getattr(self._admission, "norms", []) or [])
        centred = sum((1.0 if x <= self.clip else 0.0) - 0.5 for x in norms)
        sigma_b = self.config.count_noise or 0.0
        b = (centred + (self._rng.normal(0.0, sigma_b) if sigma_b > 0 else 0.0)) / m + 0.5
        b = min(1.0, max(0.0, b))  # a fraction (post-processing), as TF Privacy's estimator
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
