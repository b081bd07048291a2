"""Client sampling: which of the connected workers take part in a round.

With ``sample=K`` (``--sample K``) each round draws K of the connected workers, with
``fraction=F`` (``--fraction F``) round(F x connected) of them (at least one), both without
replacement; with ``fraction=F, poisson=True`` (``--fraction F --poisson``) each connected
worker takes part independently with probability F, which is the sampling a differential-privacy
accountant assumes (a round may then have nobody: it closes with the model unchanged).

The draw is a pure function of the run's seed, the round and the sorted worker ids
(``numpy.random.default_rng([seed, round, attempt])``), so the same seed and the same workers
give the same sets on every run; stable ids (``--worker-id``) make runs comparable. The round
state machine (``chief.state``) draws when a round opens and holds the model back from the
workers left out: they stay connected and idle (heartbeats keep them alive) and get the model of
the next round that samples them.

``rate`` is the round's sampling rate (the fraction of the connected workers asked), which the
round record and the metrics line carry as ``sample_rate``; under Poisson sampling it is F.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import numpy as np


@dataclass(frozen=True)
class SamplingPolicy:
    """Which workers take part in each round (module docstring).

    Parameters
    ----------
    sample : int or None
        Workers drawn per round (all of them when fewer are connected).
    fraction : float or None
        Fraction of the connected workers drawn per round, in (0, 1].
    poisson : bool
        With ``fraction``: each worker independently with probability ``fraction``.
    seed : int
        The run's seed: the same seed and the same workers draw the same sets.
    """

    sample: int | None = None
    fraction: float | None = None
    poisson: bool = False
    seed: int = 0

    def __post_init__(self) -> None:
        if self.sample is not None and self.fraction is not None:
            raise ValueError("give --sample K or --fraction F, not both")
        if self.sample is not None and (type(self.sample) is not int or self.sample < 1):
            raise ValueError(f"--sample must be a whole number of workers >= 1, not "
                             f"{self.sample!r}")
        if self.fraction is not None and not 0 < self.fraction <= 1:
            raise ValueError(f"--fraction must be in (0, 1], not {self.fraction!r}")
        if self.poisson and self.fraction is None:
            raise ValueError("--poisson needs --fraction F (each worker takes part with "
                             "probability F)")

    @property
    def active(self) -> bool:
        """Whether rounds sample at all (else every connected worker takes part)."""
        return self.sample is not None or self.fraction is not None

    @property
    def poisson_rate(self) -> float | None:
        """The per-worker inclusion probability of Poisson sampling (what a privacy accountant
        takes as q), or None for fixed-size draws."""
        return self.fraction if self.poisson else None

    def draw(self, members: Iterable[str], round_: int,
             attempt: int = 0) -> tuple[frozenset[str], float]:
        """The workers of ``round_`` among ``members``, and the round's sampling rate.

        ``attempt`` > 0 redraws a round whose sampled workers have all left before reporting.
        """
        ids = sorted(members)
        n = len(ids)
        if n == 0:
            return frozenset(), 0.0
        # SeedSequence entropy must be non-negative: fold a negative seed into the range.
        rng = np.random.default_rng([self.seed % 2**63, round_, attempt])
        if self.poisson:
            assert self.fraction is not None
            mask = rng.random(n) < self.fraction
            return frozenset(i for i, m in zip(ids, mask) if m), float(self.fraction)
        if self.sample is not None:
            k = min(self.sample, n)
        else:
            assert self.fraction is not None
            k = min(n, max(1, round(self.fraction * n)))
        chosen = rng.choice(n, size=k, replace=False)
        return frozenset(ids[i] for i in chosen), k / n

    def record(self) -> dict[str, Any]:
        """For run.json and the checkpoint's run config."""
        return {"sample": self.sample, "fraction": self.fraction, "poisson": self.poisson,
                "seed": self.seed}
