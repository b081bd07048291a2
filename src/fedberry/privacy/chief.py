"""What ``--dp`` changes on the chief, in one function every chief front end calls.

``serve()`` (TCP and in-process workers) and the MPI chief (``transports.mpi_chief``) both call
``dp_chief`` before ``chief.build.build_chief_server``: the strategy becomes ``DPFedAvg`` around
the chosen rule, the admission policy clips every update to C with uniform weights (the one
norm bound of ``chief.admission``), and ``target_epsilon`` caps the rounds at the last one
within budget.
"""

from __future__ import annotations

import dataclasses
import logging

from fedberry.chief.admission import AdmissionPolicy
from fedberry.privacy.accountant import epsilon, last_round_within
from fedberry.privacy.config import DPConfig
from fedberry.privacy.dp_fedavg import DPFedAvg, wrap
from fedberry.strategies import Strategy

log = logging.getLogger("fedberry.privacy")


def dp_chief(dp: DPConfig, strategy: str | Strategy, admission: AdmissionPolicy | None,
             rounds: int | None) -> tuple[DPFedAvg, AdmissionPolicy, int | None]:
    """The strategy, admission policy and round limit of a run under ``dp``.

    An admission norm bound the operator set below C stays (the tighter bound wins, and the
    noise is still scaled to C, which then overstates the sensitivity: safe). ``refuse`` mode
    is replaced by ``clip``: DP needs every update bounded, not some updates dropped.

    Raises ValueError when even one round would exceed ``target_epsilon``.
    """
    adm = admission or AdmissionPolicy()
    bound = dp.clip if adm.max_update_norm is None else min(dp.clip, adm.max_update_norm)
    adm = dataclasses.replace(adm, max_update_norm=bound, update_norm_mode="clip",
                              uniform_weights=True)  # DPFedAvg.bind_admission keeps the min
    strat = wrap(dp, strategy)
    if dp.noise > 0:
        # Loads the accountant now (a second or two), not on the chief's loop after round 1.
        epsilon(dp.noise, 1, dp.delta, dp.sampling_rate)
    if dp.target_epsilon is not None:
        last = last_round_within(dp.target_epsilon, dp.noise, dp.delta, dp.sampling_rate,
                                 limit=rounds)
        if last == 0:
            raise ValueError(f"--target-epsilon {dp.target_epsilon:g}: even one round with "
                             f"noise {dp.noise:g} spends more (epsilon "
                             f"{epsilon(dp.noise, 1, dp.delta, dp.sampling_rate):.3g} at delta "
                             f"{dp.delta:g}); raise the noise or the budget")
        if rounds is None or last < rounds:
            log.warning("--target-epsilon %g: the run stops after round %d, the last within "
                        "budget (epsilon %.4g at delta %g; round %d would reach %.4g)",
                        dp.target_epsilon, last,
                        epsilon(dp.noise, last, dp.delta, dp.sampling_rate), dp.delta, last + 1,
                        epsilon(dp.noise, last + 1, dp.delta, dp.sampling_rate))
            rounds = last
    return strat, adm, rounds
