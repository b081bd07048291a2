"""epsilon for (noise multiplier, sampling rate, rounds, delta), from Google's ``dp-accounting``.

The Renyi-DP accountant (Mironov 2017; Mironov, Talwar, Zhang 2019 for the sampled Gaussian)
of the ``dp-accounting`` package (the ``dp`` extra), imported when first asked, so that the
core stays numpy-only. One round of DP-FedAvg is one Gaussian mechanism on the sum of the
round's clipped updates; R rounds compose. fedberry always accounts q = 1 (no amplification by
sampling: the chief's client sampling is not secret Poisson sampling, docs/privacy.md); the
``sampling_rate`` parameter is kept for a future honest Poisson path.
tests/test_privacy_accountant.py checks the figures against Opacus's RDP analysis.
"""

from __future__ import annotations

import functools
import math
from typing import Any

MAX_ROUNDS = 1_000_000  # the search for --target-epsilon's last round stops here


def _dp_accounting() -> Any:
    try:
        import dp_accounting
        from dp_accounting import rdp
    except ImportError:
        raise ImportError("differential privacy's accountant needs the dp-accounting package: "
                          "pip install 'fedberry[dp]'") from None
    return dp_accounting, rdp


@functools.lru_cache(maxsize=4096)
def epsilon(noise: float, rounds: int, delta: float, sampling_rate: float = 1.0) -> float:
    """The epsilon of ``rounds`` rounds of the Gaussian mechanism with multiplier ``noise``,
    each Poisson-sampled with ``sampling_rate``, at ``delta``; inf without noise, 0 for none."""
    if rounds <= 0:
        return 0.0
    if noise <= 0:
        return math.inf
    dpa, rdp = _dp_accounting()
    event: Any = dpa.GaussianDpEvent(noise)
    if sampling_rate < 1.0:
        event = dpa.PoissonSampledDpEvent(sampling_rate, event)
    acc = rdp.RdpAccountant()
    acc.compose(event, int(rounds))
    return float(acc.get_epsilon(delta))


def last_round_within(target: float, noise: float, delta: float, sampling_rate: float = 1.0,
                      limit: int | None = None) -> int:
    """The largest number of rounds whose epsilon is at most ``target`` (at most ``limit``, or
    ``MAX_ROUNDS``); 0 if even one round exceeds it. epsilon grows with the rounds: bisection."""
    hi = limit if limit is not None else MAX_ROUNDS
    if noise <= 0 or epsilon(noise, 1, delta, sampling_rate) > target:
        return 0
    if epsilon(noise, hi, delta, sampling_rate) <= target:
        return hi
    lo = 1  # within budget; hi is not
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if epsilon(noise, mid, delta, sampling_rate) <= target:
            lo = mid
        else:
            hi = mid
    return lo
