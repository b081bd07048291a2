"""The relative sample bound (``AdmissionPolicy.max_sample_ratio``, chief/admission.py): from
the second round on, a claim above R x the lower median of earlier rounds' claims is weighed as
that cap. Over real TCP (``fedberry.serve`` and ``fedberry.Worker`` threads on loopback): a
liar's weight is clamped and the model is exactly the weighted mean with the capped weight;
honest unequal partitions are weighed as claimed. The round machine is driven directly for
what does not apply (MPI's combined update, a lone worker, uniform weights, the first round).

Where a test compares models with ``==``, every weight and every round's total weight is a
power of two and every value a small integer: the chief's float32 running mean is then exact,
whatever order the updates arrive in."""

from __future__ import annotations

import logging
import threading

import numpy as np
import pytest

import fedberry
from fedberry.chief.admission import CLAIMS_KEPT, Admission, AdmissionPolicy
from fedberry.chief.build import OutputOptions, RoundPolicy, build_chief_server
from fedberry.chief.scheduler import BlockingScheduler
from fedberry.chief.state import Chief, ChiefConfig
from fedberry.cli import build_parser
from fedberry.protocol.frames import spec_of
from fedberry.transports.mpi_chief import _CollectivePeer

TOKEN = "sample-ratio-test"
DIM = 4
ROUNDS = 3


def _values(i: int) -> np.ndarray:
    """Worker ``i``'s weights every round: small distinct integers."""
    return np.array([i + 1, -2 * i, 3, i * i], np.float32)


def _run(claims: list[float], in_process: bool = False,
         **options: object) -> tuple[list[list[np.ndarray]], list[dict]]:
    """A run of ``ROUNDS`` rounds, worker ``i`` sending ``_values(i)`` with ``claims[i]``
    samples each round; what each worker got back, round by round, and the metrics lines.
    Workers are TCP connections over loopback, or ``in_process`` ones (``Worker(handle)``)."""
    handle = fedberry.serve(None if in_process else "127.0.0.1:0", workers=len(claims),
                            rounds=ROUNDS, token=TOKEN, initial=[np.zeros(DIM, np.float32)],
                            **options)
    got: dict[int, list[np.ndarray]] = {}
    errors: list[BaseException] = []

    def work(i: int) -> None:
        try:
            w = (fedberry.Worker(handle, worker_id=f"w{i}") if in_process else
                 fedberry.Worker(handle.url, token=TOKEN, worker_id=f"w{i}"))
            w.join([np.zeros(DIM, np.float32)])
            got[i] = [w.sync([_values(i)], claims[i])[0] for _ in range(ROUNDS)]
            w.close()
        except BaseException as exc:  # reported in the test's thread
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(i,), daemon=True) for i in range(len(claims))]
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert not any(t.is_alive() for t in threads), "a worker hung"
        assert not errors, errors
        assert handle.wait(30)
        metrics = list(handle.metrics)
    finally:
        handle.stop()
    return [got[i] for i in range(len(claims))], metrics


def _mean(weights: list[float]) -> np.ndarray:
    """The weighted mean of the workers' values, in float64."""
    return sum(w * _values(i).astype(np.float64) for i, w in enumerate(weights)) / sum(weights)


def _exact(weights: list[float]) -> np.ndarray:
    """``_mean`` where every weight and the total are powers of two: then the chief's float32
    running mean has no rounding at all, in any order of arrival, and equals this."""
    for w in [*weights, sum(weights)]:
        assert w == 2.0 ** round(np.log2(w))  # the premise of exactness
    return _mean(weights).astype(np.float32)


HONEST = [1024, 1024, 2048]
LIAR = 2 ** 26  # 6.7e7: within max_samples (1e9), and 16,000x each honest claim


@pytest.mark.parametrize("in_process", [False, True], ids=["tcp", "in-process"])
def test_a_liars_weight_is_clamped_to_r_times_the_median_claim(caplog, in_process):
    # Round 1 has no history: the absolute bound alone, and the liar holds 99.99 % of it.
    # From round 2 on its weight is R x the lower median of {1024, 1024, 2048, 2**26}: with
    # R = 4 (near-equal shards), 4096, half of the round instead of all of it.
    claims = [*HONEST, LIAR]
    with caplog.at_level(logging.WARNING, logger="fedberry.chief"):
        got, metrics = _run(claims, in_process, max_sample_ratio=4)
    capped = _exact([*HONEST, 4096])
    for g in got:
        np.testing.assert_allclose(g[0], _mean(claims), rtol=1e-6)
        for r in range(1, ROUNDS):
            np.testing.assert_array_equal(g[r], capped)
    assert [m["num_samples"] for m in metrics] == [4096 + LIAR, 8192, 8192]
    lines = [r.getMessage() for r in caplog.records if "max_sample_ratio" in r.getMessage()]
    assert lines == [f"worker w3 claims {LIAR:g} samples, more than 4 x the median claim of "
                     "earlier rounds: its update is weighed as 4096 samples "
                     "(max_sample_ratio)"] * (ROUNDS - 1)  # one a round, none in round 1


def test_without_the_relative_bound_the_liar_owns_every_round():
    got, _ = _run([*HONEST, LIAR], max_sample_ratio=None)
    for r in range(ROUNDS):
        np.testing.assert_allclose(got[0][r], _mean([*HONEST, LIAR]), rtol=1e-6)
        np.testing.assert_allclose(got[0][r], _values(3), rtol=1e-3)  # its own update


def test_honest_unequal_partitions_are_weighed_as_claimed(caplog):
    # 64x apart under the default R (100): the lower median is 4096, the cap 409,600.
    claims = [1024, 1024, 2048, 4096, 8192, 16384, 32768, 65536]
    with caplog.at_level(logging.WARNING, logger="fedberry.chief"):
        got, metrics = _run(claims)
    expected = _exact(claims)
    for g in got:
        for r in range(ROUNDS):
            np.testing.assert_array_equal(g[r], expected)
    assert [m["num_samples"] for m in metrics] == [2 ** 17] * ROUNDS
    assert "max_sample_ratio" not in caplog.text


def test_under_secure_aggregation_the_capped_counts_are_the_rounds_weights():
    # The cap applies to the count each worker reports at its sync point; the secure round
    # weighs by min(n / scale, 1) with scale the largest (capped) count: the liar, weighing
    # itself by its own claim, gets min(2**26 / 4096, 1) = 1, which is what the chief counts.
    pytest.importorskip("cryptography", reason="secure aggregation needs the secagg extra")
    from fedberry.secagg import SecAggOptions

    claims = [*HONEST, LIAR]
    # clip 100: no change is clipped; the 32-bit ring quantizes to 100 / 8,388,607 = 1.2e-5.
    got, metrics = _run(claims, max_sample_ratio=4,
                        secure_aggregation=SecAggOptions(clip=100.0))
    assert [m["num_samples"] for m in metrics] == [4096 + LIAR, 8192, 8192]
    capped, owned = _mean([*HONEST, 4096]), _mean(claims)
    assert np.abs(capped - owned).max() > 3  # the two outcomes are far apart
    for g in got:
        np.testing.assert_allclose(g[0], owned, rtol=0, atol=1e-4)
        for r in range(1, ROUNDS):
            np.testing.assert_allclose(g[r], capped, rtol=0, atol=1e-4)


# -- where it does not apply: the round machine driven directly -------------------------------
MODEL = [np.zeros(DIM, np.float32)]


def _chief(ids: str, **policy: object) -> Chief:
    chief = Chief(ChiefConfig(len(ids), None), initial=[a.copy() for a in MODEL],
                  admission=AdmissionPolicy(**policy))
    for w in ids:
        chief.join(w, spec_of(MODEL), 0.0)
    return chief


def _round(chief: Chief, claims: dict[str, float]) -> float:
    """One round of these claims; the num_samples the round counted."""
    closed = []
    for w, n in claims.items():
        closed += [a for a in chief.update(w, chief.round, n, [np.ones(DIM, np.float32)], {},
                                           0.0) if type(a).__name__ == "RoundClosed"]
    (rc,) = closed
    return rc.num_samples


def test_the_default_cap_is_100_times_the_lower_median_of_earlier_claims():
    chief = _chief("abc")
    assert _round(chief, {"a": 1.0, "b": 1.0, "c": 100.0}) == 102.0  # round 1: no history
    assert chief.admission.sample_cap == 100.0
    assert _round(chief, {"a": 1.0, "b": 1.0, "c": 100.0}) == 102.0  # at the cap: as claimed
    assert _round(chief, {"a": 1.0, "b": 1.0, "c": 101.0}) == 102.0  # above it: the cap
    # The cap was fixed when the round opened: 101 is c's latest claim only from now on.
    assert chief.admission.sample_cap == 100.0 and chief.admission._claims["c"] == 101.0


def test_two_workers_the_smaller_claim_is_the_reference():
    chief = _chief("ab")
    assert _round(chief, {"a": 10.0, "b": 1e8}) == 10.0 + 1e8  # round 1: no history
    assert chief.admission.sample_cap == 1000.0  # 100 x median_low(10, 1e8)
    assert _round(chief, {"a": 10.0, "b": 1e8}) == 1010.0


def test_a_lone_worker_and_uniform_weights_are_never_capped():
    lone = _chief("a")
    for n in (1.0, 1e6, 1e8):  # a claim 1e6 times its last: alone, no one to compare with
        assert _round(lone, {"a": n}) == n
    assert lone.admission.sample_cap is None
    dp = _chief("abc", uniform_weights=True)  # DP: every update weighs 1 whatever its claim
    for _ in range(2):
        assert _round(dp, {"a": 1.0, "b": 1.0, "c": 1e8}) == 2.0 + 1e8
    assert dp.admission.sample_cap is None


def test_the_mpi_combined_update_is_the_total_and_is_never_capped():
    # Rank 0's chief hears one update a round, of the total weight of every rank: it grows
    # 1000x (ranks are the operator's own processes; rank 0 never sees one rank's count).
    server = build_chief_server(RoundPolicy(workers=1, rounds=3), OutputOptions(),
                                initial=[a.copy() for a in MODEL], scheduler=BlockingScheduler())
    peer = _CollectivePeer()
    server.attach(peer, spec_of(MODEL), True)
    for r, (weight, ranks) in enumerate([(40.0, 4), (4e4, 4), (4e7, 1)]):
        server.on_collective_update(peer, r, weight, [np.full(DIM, r, np.float32)], {},
                                    updates=ranks)
        assert peer.refused is None and server.chief.round == r + 1
    assert server.chief.admission.sample_cap is None
    admission = Admission()
    admission._claims = {"a": 1.0, "b": 1.0}  # a history, so that a cap is in force
    admission.begin_round(MODEL)
    assert admission.cap_samples("x", 1e6, stands_for=4) == 1e6  # a combined update: as is
    assert admission.cap_samples("x", 1e6) == 100.0


def test_the_claims_remembered_are_bounded():
    admission = Admission()
    for i in range(CLAIMS_KEPT + 5):
        admission.remember(f"w{i}", float(i))
    assert len(admission._claims) == CLAIMS_KEPT
    assert "w4" not in admission._claims and "w5" in admission._claims  # the oldest go
    admission.remember("w5", 7.0)  # heard again: the newest now, with its latest claim
    assert list(admission._claims.items())[-1] == ("w5", 7.0)


def test_the_option_is_checked_recorded_and_on_the_command_line():
    for bad in (0.5, 0, float("nan"), "10"):
        with pytest.raises(ValueError, match="max_sample_ratio must be a number >= 1"):
            AdmissionPolicy(max_sample_ratio=bad)  # type: ignore[arg-type]
    assert AdmissionPolicy().record()["max_sample_ratio"] == 100.0
    parse = build_parser().parse_args
    assert parse(["chief", "--workers", "2"]).max_sample_ratio == 100.0
    assert parse(["chief", "--workers", "2", "--max-sample-ratio", "8"]).max_sample_ratio == 8.0
    assert parse(["chief", "--workers", "2", "--max-sample-ratio", "none"]).max_sample_ratio is None
    with pytest.raises(SystemExit):
        parse(["chief", "--workers", "2", "--max-sample-ratio", "0.5"])
    handle = fedberry.serve(None, max_sample_ratio=8.0, initial=MODEL)
    try:
        assert handle.chief.admission.policy.max_sample_ratio == 8.0
    finally:
        handle.stop()
