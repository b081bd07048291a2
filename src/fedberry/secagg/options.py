"""The user's secure-aggregation options, and the ``--secagg`` text they are written as.

``serve(secure_aggregation=SecAggOptions(...))`` and ``--secagg threshold=8,neighbors=14`` (issue
14) will both come here, so the option names, defaults and refusals live once. The options are
the federation's; each round's :class:`~fedberry.secagg.messages.RoundConfig` is made from them
and that round's clients, which is where a threshold is checked against the actual group size.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

from .encoding import FixedPoint
from .errors import ConfigError
from .messages import RoundConfig

_ROUNDING = ("nearest", "stochastic")


@dataclass(frozen=True)
class SecAggOptions:
    """The federation's secure-aggregation options.

    ``threshold`` (t) and ``neighbors`` (k) default per round to the rules of
    :mod:`fedberry.secagg.graph` (``None``); ``neighbors="all"`` is the complete graph
    (Bonawitz et al. 2017); ``bits`` is the ring (32, the default: 24-bit quantisation for up
    to ``max_workers`` = 256; 16: 8-bit, half the bytes); ``rounding`` is ``"nearest"`` or
    ``"stochastic"``. ``clip``: the L2 bound each worker clips its weighted change to, which
    is also the range of every coordinate the ring encodes (the chief's ``max_update_norm``
    takes its place when set). ``timeout``: seconds each secure step waits for the workers
    that have not answered.

    Why 32 bits by default: the ring must hold any coordinate of a clipped change, up to the
    clip C, and a change of many parameters has typical coordinates near C / sqrt(d); with 16
    bits the step C / 127 rounds those to nothing (stochastic rounding keeps them only on
    average). 16 bits suit a clip close to the coordinates' own size.
    """

    threshold: int | None = None
    neighbors: int | str | None = None
    bits: int = 32
    max_workers: int = 256
    rounding: str = "nearest"
    clip: float = 10.0
    timeout: float = 120.0

    def __post_init__(self) -> None:
        if self.threshold is not None and (not isinstance(self.threshold, int)
                                           or self.threshold < 2):
            raise ConfigError(f"secagg threshold is an integer of at least 2, not "
                              f"{self.threshold!r}")
        if self.neighbors not in (None, "all") and (not isinstance(self.neighbors, int)
                                                    or self.neighbors < 2 or self.neighbors % 2):
            raise ConfigError(f"secagg neighbors is an even integer of at least 2 (or 'all'), "
                              f"not {self.neighbors!r}")
        if self.rounding not in _ROUNDING:
            raise ConfigError(f"secagg rounding is 'nearest' or 'stochastic', not "
                              f"{self.rounding!r}")
        for what, v in (("clip", self.clip), ("timeout", self.timeout)):
            if not (isinstance(v, (int, float)) and not isinstance(v, bool)
                    and math.isfinite(v) and v > 0):
                raise ConfigError(f"secagg {what} is a positive number, not {v!r}")
        FixedPoint(clip=1.0, bits=self.bits, max_workers=self.max_workers)  # checks both

    @classmethod
    def parse(cls, text: str) -> SecAggOptions:
        """Options from ``"threshold=8,neighbors=14,bits=16,max_workers=256,rounding=nearest,
        clip=10,timeout=120"`` (any subset, any order; an empty string is every default)."""
        values: dict[str, object] = {}
        for item in filter(None, (part.strip() for part in text.split(","))):
            key, sep, raw = item.partition("=")
            key, raw = key.strip(), raw.strip()
            if not sep or not raw:
                raise ConfigError(f"secagg option {item!r} is not key=value")
            if key in values:
                raise ConfigError(f"secagg option {key!r} is given twice")
            if key == "rounding":
                values[key] = raw
            elif key == "neighbors" and raw == "all":
                values[key] = "all"
            elif key in ("clip", "timeout"):
                try:
                    values[key] = float(raw)
                except ValueError:
                    raise ConfigError(f"secagg {key} is a number, not {raw!r}") from None
            elif key in ("threshold", "neighbors", "bits", "max_workers"):
                try:
                    values[key] = int(raw)
                except ValueError:
                    raise ConfigError(f"secagg {key} is an integer, not {raw!r}") from None
            else:
                raise ConfigError(f"unknown secagg option {key!r}: use threshold, neighbors, "
                                  "bits, max_workers, rounding, clip or timeout")
        return cls(**values)  # type: ignore[arg-type]

    def round_config(self, round_number: int, clients: tuple[int, ...], length: int, *,
                     seed: bytes | None = None, context: bytes = b"") -> RoundConfig:
        """The configuration of one round over ``clients`` (a fresh public seed by default;
        ``context``: what else its parties agree on, bound into its digest)."""
        if self.max_workers < len(clients):
            raise ConfigError(f"{len(clients)} clients exceed secagg max_workers "
                              f"{self.max_workers}: their sum could wrap the ring")
        return RoundConfig(round_number=round_number, seed=os.urandom(32) if seed is None
                           else seed, clients=clients, length=length, bits=self.bits,
                           neighbors=len(clients) - 1 if self.neighbors == "all"
                           else self.neighbors, threshold=self.threshold, context=context)

    def encoding(self, clip: float) -> FixedPoint:
        """The fixed-point encoding for updates clipped to L2 norm ``clip``."""
        return FixedPoint(clip=clip, bits=self.bits, max_workers=self.max_workers,
                          stochastic=self.rounding == "stochastic")

