"""Fixed-point encoding of a clipped update in the ring Z_(2^k), and decoding of the sum.

Secure aggregation sums integers mod 2^k (Bonawitz et al. 2017 §2; Bell et al. 2020 §5 on
quantisation), so a float update is first scaled to integers. With clip bound C every coordinate
lies in [-C, C] (an update clipped to L2 norm C has no coordinate above C). A coordinate becomes
q = round(x * L / C), an integer in [-L, L], stored mod 2^k (two's complement). The sum of n <= N
encodings lies in [-N L, N L], so choosing

    L = floor((2^(k-1) - 1) / N)

makes it impossible for the sum to wrap: decoding reads it as a signed k-bit integer and
multiplies by the step C / L.

* k = 16, N = 256: L = 127, i.e. 8-bit quantisation (255 levels in [-C, C]), 2 bytes a parameter.
* k = 32, N = 256: L = 8388607, i.e. 24-bit quantisation, 4 bytes a parameter.

Rounding (the exact error bounds, in units of the step s = C / L, up to float64 rounding):

* deterministic (the default): round to nearest, |error| <= s/2 per coordinate; the decoded sum
  of n updates is within n*s/2 of the float sum, and the mean of the decoded sum within s/2 of
  the float mean;
* stochastic: q = floor(x L / C + u), u ~ U[0, 1): unbiased (E[q] = x L / C), |error| < s per
  coordinate, so the decoded sum is within n*s and the mean within s.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from .errors import ConfigError, MessageError

_RING = {16: (np.uint16, np.int16), 32: (np.uint32, np.int32)}


def clip_l2(update: np.ndarray, bound: float) -> np.ndarray:
    """``update`` scaled down (float64) so its L2 norm is at most ``bound``; unchanged if within."""
    x = np.asarray(update, dtype=np.float64).ravel()
    norm = float(np.linalg.norm(x))
    return x * (bound / norm) if norm > bound else x.copy()


@dataclass(frozen=True)
class FixedPoint:
    """The encoding of one federation: clip bound, ring bits, most workers a sum may hold."""

    clip: float
    bits: int = 16
    max_workers: int = 256
    stochastic: bool = False

    def __post_init__(self) -> None:
        if self.bits not in _RING:
            raise ConfigError(f"the ring is Z_(2^16) or Z_(2^32), not Z_(2^{self.bits})")
        if not (isinstance(self.clip, (int, float)) and math.isfinite(self.clip)
                and self.clip > 0):
            raise ConfigError(f"the clip bound is a positive finite number, not {self.clip!r}")
        if not 1 <= self.max_workers <= (1 << (self.bits - 1)) - 1:
            raise ConfigError(f"{self.max_workers} workers cannot share a {self.bits}-bit ring "
                              "without its sum wrapping")

    @property
    def levels(self) -> int:
        """L: the largest |q|; the sum of ``max_workers`` encodings stays below 2^(k-1)."""
        return ((1 << (self.bits - 1)) - 1) // self.max_workers

    @property
    def step(self) -> float:
        """s = C / L: one integer step in the update's units."""
        return self.clip / self.levels

    @property
    def dtype(self) -> np.dtype:
        """The ring's unsigned dtype (uint16 or uint32)."""
        return np.dtype(_RING[self.bits][0])

    def sum_error_bound(self, count: int) -> float:
        """The most the decoded sum of ``count`` updates can differ from the float sum, per
        coordinate (s/2 per update when rounding to nearest, s when stochastic)."""
        return count * self.step * (1.0 if self.stochastic else 0.5)

    def encode(self, update: np.ndarray, rng: np.random.Generator | None = None) -> np.ndarray:
        """The ring encoding of a flat float update whose coordinates lie in [-C, C].

        Refuses non-finite values and coordinates beyond the clip bound (clip first, e.g. with
        :func:`clip_l2`): either would break the no-wrap guarantee. Stochastic rounding needs
        ``rng`` (rounding noise need not be cryptographic).
        """
        x = np.asarray(update)
        if x.ndim != 1 or x.dtype.kind != "f":
            raise MessageError(f"an update to encode is a flat float vector, not {x.dtype} of "
                               f"shape {x.shape}")
        if not np.all(np.isfinite(x)):
            raise MessageError("an update to encode has a non-finite value")
        peak = float(np.max(np.abs(x))) if x.size else 0.0
        if peak > self.clip:
            raise MessageError(f"a coordinate of {peak:.6g} exceeds the clip bound "
                               f"{self.clip:.6g}: clip the update first")
        scaled = x.astype(np.float64) * (self.levels / self.clip)
        if self.stochastic:
            if rng is None:
                raise MessageError("stochastic rounding needs a numpy random Generator")
            q = np.floor(scaled + rng.random(scaled.size))
        else:
            q = np.rint(scaled)
        # Float rounding of x * L / C can land a hair outside [-L, L]: pull it back.
        q = np.clip(q, -self.levels, self.levels).astype(_RING[self.bits][1])
        return q.view(self.dtype)

    def decode_sum(self, ring_sum: np.ndarray, count: int) -> np.ndarray:
        """The float64 sum of ``count`` updates from the ring sum of their encodings."""
        if ring_sum.dtype != self.dtype or ring_sum.ndim != 1:
            raise MessageError(f"a ring sum is a flat {self.dtype} vector, not {ring_sum.dtype} "
                               f"of shape {ring_sum.shape}")
        if not 0 <= count <= self.max_workers:
            raise MessageError(f"a sum of {count} updates may have wrapped: the encoding allows "
                               f"at most {self.max_workers}")
        return ring_sum.view(_RING[self.bits][1]).astype(np.float64) * self.step
