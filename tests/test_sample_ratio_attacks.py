"""Ways a worker holding the token could defeat the relative sample bound (chief/admission.py
``max_sample_ratio``), driven on the round machine itself: the cap must stay R x the lower
median of the workers of the federation, and must never weigh an honest update into nothing."""

from __future__ import annotations

import numpy as np

from fedberry.chief.admission import AdmissionPolicy
from fedberry.chief.state import Chief, ChiefConfig
from fedberry.protocol.frames import spec_of

DIM = 4
MODEL = [np.zeros(DIM, np.float32)]


def _chief(ids: str) -> Chief:
    chief = Chief(ChiefConfig(len(ids), None), initial=[a.copy() for a in MODEL],
                  admission=AdmissionPolicy())
    for w in ids:
        chief.join(w, spec_of(MODEL), 0.0)
    return chief


def _round(chief: Chief, claims: dict[str, float], value: float = 1.0) -> None:
    """One round: every worker of ``claims`` sends ``value`` everywhere with its claim."""
    start = chief.round
    for w, n in claims.items():
        chief.update(w, chief.round, n, [np.full(DIM, value, np.float32)], {}, 0.0)
    assert chief.round == start + 1


def test_ids_that_have_left_do_not_vote_on_the_cap():
    # One token holder, one connection at a time: each round it comes back under a new id,
    # claims exactly the cap (no log line) and leaves. The ids it has dropped must not count
    # in the median, else after W + 1 of them they are its majority and the cap climbs R-fold
    # each time: 1e6, 1e8, then past max_samples, where a claim of 1e9 weighs 99.997 %.
    honest = {"a": 1e4, "b": 1e4, "c": 1e4}
    chief = _chief("abc")
    for k in range(16):
        sybil = f"s{k}"
        chief.join(sybil, spec_of(MODEL), 0.0)
        cap = chief.admission.sample_cap
        _round(chief, {**honest, sybil: cap if cap is not None else 1e6})
        chief.leave(sybil, 0.0)
    # Only a, b and c are in the federation: the cap is R x their median.
    assert chief.admission.sample_cap == 100 * 1e4


def test_a_tiny_claim_cannot_weigh_the_honest_updates_into_nothing():
    # Two workers: the lower median is the smaller claim. A claim of 1e-300 (a positive
    # number, which the protocol takes) must not cap the honest worker to 1e-298 samples:
    # every round would then sum weights that vanish in float32, make a non-finite model
    # and commit nothing, for the rest of the run.
    chief = _chief("ab")
    _round(chief, {"a": 1e-300, "b": 1e4}, 1.0)
    for value in (3.0, 5.0):
        _round(chief, {"a": 1e-300, "b": 1e4}, value)
        np.testing.assert_allclose(chief.global_arrays[0], value)
