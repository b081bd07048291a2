"""The chief's round state machine, driven event by event with a fake clock: no sockets."""

from __future__ import annotations

import numpy as np
import pytest

from fedberry.chief.state import (
    Chief,
    ChiefConfig,
    Finished,
    Recycle,
    RequestInit,
    RoundClosed,
    SendError,
    SendGlobal,
)
from fedberry.protocol.frames import ErrorCode, spec_of
from fedberry.strategies import FedAvg

SHAPES = [(3, 2), (2,)]


def arrays(value: float) -> list[np.ndarray]:
    return [np.full(s, value, np.float32) for s in SHAPES]


SPEC = spec_of(arrays(0))


def make(workers: int = 2, rounds: int | None = 3, min_workers: int = 1,
         round_timeout: float | None = None, initial: bool = True) -> Chief:
    return Chief(ChiefConfig(workers, rounds, min_workers, round_timeout), FedAvg(),
                 initial=arrays(0) if initial else None)


def of(actions: list, kind: type) -> list:
    return [a for a in actions if isinstance(a, kind)]


def sent_to(actions: list) -> list[str]:
    return sorted(w for a in of(actions, SendGlobal) for w in a.worker_ids)


def closed(actions: list) -> RoundClosed | None:
    found = of(actions, RoundClosed)
    return found[0] if found else None


def error(actions: list) -> SendError:
    (err,) = of(actions, SendError)
    return err


def join_all(chief: Chief, *ids: str, now: float = 0.0) -> None:
    for w in ids:
        assert sent_to(chief.join(w, SPEC, now)) == [w]  # each starts from the global model


# -- configuration ---------------------------------------------------------------------------
@pytest.mark.parametrize("kw", [dict(workers=0), dict(min_workers=0),
                                dict(workers=2, min_workers=3), dict(rounds=0)])
def test_config_refuses_nonsense(kw: dict) -> None:
    with pytest.raises(ValueError):
        ChiefConfig(**kw)


# -- closing rounds --------------------------------------------------------------------------
def test_round_closes_when_everyone_is_in_with_the_weighted_mean() -> None:
    chief = make()
    join_all(chief, "a", "b")
    assert chief.update("a", 0, 1, arrays(1), {"loss": 2.0}, 1) == []
    acts = chief.update("b", 0, 3, arrays(5), {"loss": 1.0}, 2)
    rc = closed(acts)
    assert rc is not None and (rc.round, rc.workers, rc.num_samples) == (1, 2, 4)
    assert rc.train_loss == pytest.approx((2.0 * 1 + 1.0 * 3) / 4)
    assert rc.worker_ids == ["a", "b"]
    assert sent_to(acts) == ["a", "b"]
    assert chief.round == 1
    for g in chief.global_arrays:
        np.testing.assert_allclose(g, (1 * 1 + 3 * 5) / 4)


def test_start_barrier_first_worker_alone_does_not_close_round_zero() -> None:
    chief = make(workers=2)
    join_all(chief, "a")
    assert chief.update("a", 0, 1, arrays(1), {}, 1) == []
    assert not chief.started and chief.round == 0
    join_all(chief, "b")
    assert closed(chief.update("b", 0, 1, arrays(1), {}, 2)) is not None


def test_start_barrier_counts_workers_connected_together() -> None:
    # One that came and went (a crash before the start, a probe after a restart) does not
    # stand in for a missing worker.
    chief = make(workers=2)
    join_all(chief, "probe")
    chief.leave("probe", 1)
    join_all(chief, "a")
    assert chief.update("a", 0, 1, arrays(1), {}, 2) == [] and not chief.started
    join_all(chief, "b")
    assert chief.started
    assert closed(chief.update("b", 0, 1, arrays(1), {}, 3)).workers == 2
    chief.leave("b", 4)
    assert chief.started  # latched: the run goes on with fewer


def test_quorum_and_deadline() -> None:
    chief = make(workers=3, min_workers=2, round_timeout=10)
    join_all(chief, "a", "b", "c", now=0)
    assert chief.deadline == 10
    assert chief.update("a", 0, 1, arrays(1), {}, 1) == []
    assert chief.tick(11) == []  # deadline passed, but one update is no quorum
    acts = chief.update("b", 0, 1, arrays(3), {}, 12)  # the quorum, after the deadline: close now
    rc = closed(acts)
    assert rc is not None and rc.workers == 2 and rc.worker_ids == ["a", "b"]
    assert sent_to(acts) == ["a", "b"]  # c is still training: it is not waiting for this
    assert chief.deadline == 12 + 10  # the next round's clock starts at the close


def test_deadline_closes_with_the_quorum_on_a_tick() -> None:
    chief = make(workers=3, min_workers=2, round_timeout=5)
    join_all(chief, "a", "b", "c", now=0)
    chief.update("a", 0, 1, arrays(1), {}, 1)
    chief.update("b", 0, 1, arrays(1), {}, 2)
    assert chief.tick(4.9) == []
    assert closed(chief.tick(5.0)).workers == 2


def test_no_deadline_waits_for_every_connected_worker() -> None:
    chief = make(workers=2)
    join_all(chief, "a", "b")
    chief.update("a", 0, 1, arrays(1), {}, 1)
    assert chief.deadline is None and chief.tick(1e9) == []


def test_a_worker_leaving_lets_the_round_close_with_the_rest() -> None:
    chief = make(workers=3)
    join_all(chief, "a", "b", "c")
    chief.update("a", 0, 1, arrays(1), {}, 1)
    chief.update("b", 0, 1, arrays(3), {}, 1)
    acts = chief.leave("c", 2)  # killed mid-training
    assert closed(acts).workers == 2 and sent_to(acts) == ["a", "b"]
    np.testing.assert_allclose(chief.global_arrays[0], 2)


def test_an_update_that_counted_stays_when_its_worker_leaves() -> None:
    chief = make(workers=2)
    join_all(chief, "a", "b")
    chief.update("a", 0, 1, arrays(1), {}, 1)
    assert closed(chief.leave("a", 2)) is None  # b is still training
    acts = chief.update("b", 0, 1, arrays(3), {}, 3)
    assert closed(acts).workers == 2 and sent_to(acts) == ["b"]


# -- stale and repeated updates --------------------------------------------------------------
def test_stale_update_is_dropped_and_the_worker_gets_the_newest_model() -> None:
    chief = make(workers=3, min_workers=2, round_timeout=5)
    join_all(chief, "a", "b", "c")
    chief.update("a", 0, 1, arrays(1), {}, 1)
    chief.update("b", 0, 1, arrays(1), {}, 1)
    chief.tick(6)
    assert chief.round == 1
    acts = chief.update("c", 0, 1, arrays(100), {}, 7)  # the straggler
    err = error(acts)
    assert (err.code, err.fatal) == (ErrorCode.STALE, False)
    assert "dropped" in err.message and "round 0" in err.message
    assert sent_to(acts) == ["c"]
    assert chief.strategy.updates == 0  # not folded into round 1
    np.testing.assert_allclose(chief.global_arrays[0], 1)


def test_repeated_update_counts_once() -> None:
    chief = make(workers=2)
    join_all(chief, "a", "b")
    chief.update("a", 0, 1, arrays(1), {}, 1)
    assert chief.update("a", 0, 1, arrays(1), {}, 2) == []  # resent after a reconnect
    assert chief.strategy.updates == 1
    rc = closed(chief.update("b", 0, 1, arrays(3), {}, 3))
    assert rc.workers == 2 and rc.num_samples == 2
    np.testing.assert_allclose(chief.global_arrays[0], 2)


def test_repeat_after_the_round_closed_gets_the_model_without_an_error() -> None:
    chief = make(workers=2)
    join_all(chief, "a", "b")
    chief.update("a", 0, 1, arrays(1), {}, 1)
    chief.update("b", 0, 1, arrays(3), {}, 1)
    # a lost the connection before the new model reached it, reconnected and resent
    assert chief.join("a", SPEC, 2, want_model=False) == []
    acts = chief.update("a", 0, 1, arrays(1), {}, 2)
    assert of(acts, SendError) == [] and sent_to(acts) == ["a"]
    assert chief.strategy.updates == 0


def test_reconnect_while_waiting_is_answered_when_the_round_closes() -> None:
    chief = make(workers=2)
    join_all(chief, "a", "b")
    chief.update("a", 0, 1, arrays(1), {}, 1)
    chief.leave("a", 2)  # connection dropped while waiting
    assert chief.join("a", SPEC, 3, want_model=False) == []  # back, still waiting
    assert chief.update("a", 0, 1, arrays(1), {}, 3) == []  # resent: counted once
    acts = chief.update("b", 0, 1, arrays(3), {}, 4)
    assert sent_to(acts) == ["a", "b"] and closed(acts).workers == 2


def test_update_for_a_round_the_chief_has_not_reached() -> None:
    chief = make(workers=1)
    join_all(chief, "a")
    acts = chief.update("a", 7, 1, arrays(1), {}, 1)
    err = error(acts)
    assert err.code == ErrorCode.STALE and not err.fatal and sent_to(acts) == ["a"]
    assert "ahead of the chief" in err.message
    assert chief.strategy.updates == 0


# -- joining ---------------------------------------------------------------------------------
def test_join_mid_training_starts_from_the_current_global_model() -> None:
    chief = make(workers=2, rounds=5)
    join_all(chief, "a", "b")
    for r in range(2):
        chief.update("a", r, 1, arrays(r + 1), {}, r)
        chief.update("b", r, 1, arrays(r + 1), {}, r)
    assert chief.round == 2
    acts = chief.join("late", SPEC, 10)
    assert sent_to(acts) == ["late"]
    np.testing.assert_allclose(chief.global_arrays[0], 2)
    # the newcomer is part of round 2 now: the round waits for it too
    chief.update("a", 2, 1, arrays(0), {}, 11)
    chief.update("b", 2, 1, arrays(0), {}, 11)
    assert chief.round == 2
    assert closed(chief.update("late", 2, 2, arrays(6), {}, 12)).workers == 3
    np.testing.assert_allclose(chief.global_arrays[0], 3)


def test_join_without_wanting_the_model() -> None:
    chief = make(workers=1)
    assert chief.join("a", SPEC, 0, want_model=False) == []


def test_spec_mismatch_on_join_is_fatal_and_says_how() -> None:
    chief = make()
    err = error(chief.join("a", spec_of([np.zeros((2, 3), np.float32)]), 0))
    assert err.code == ErrorCode.SPEC_MISMATCH and err.fatal
    assert "1 tensors" in err.message
    err = error(chief.join("b", spec_of([np.zeros((3, 2), np.float64), np.zeros(2)]), 0))
    assert "tensor 0 is float64[3, 2], the federation's is float32[3, 2]" in err.message
    assert chief.members == set()


def test_chief_without_a_model_asks_for_one_and_answers_everyone() -> None:
    chief = make(workers=2, initial=False)
    assert of(chief.join("a", SPEC, 0), RequestInit) == [RequestInit("a")]
    assert of(chief.join("b", SPEC, 0), RequestInit) == [RequestInit("b")]
    acts = chief.init("a", arrays(7), 1)
    assert sent_to(acts) == ["a", "b"]
    np.testing.assert_allclose(chief.global_arrays[0], 7)
    assert chief.init("b", arrays(9), 1) == []  # a's weights won the race
    err = error(chief.init("b", [np.zeros(3, np.float32)], 1))
    assert err.code == ErrorCode.SPEC_MISMATCH


def test_initial_weights_with_nan_are_refused() -> None:
    chief = make(workers=1, initial=False)
    chief.join("a", SPEC, 0)
    bad = arrays(1)
    bad[1][0] = np.nan
    err = error(chief.init("a", bad, 1))
    assert err.code == ErrorCode.NON_FINITE and err.fatal and chief.global_arrays is None


# -- refusals --------------------------------------------------------------------------------
@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_update_is_refused_with_a_clear_error(bad: float) -> None:
    chief = make(workers=2)
    join_all(chief, "a", "b")
    update = arrays(1)
    update[0][1, 1] = bad
    err = error(chief.update("a", 0, 1, update, {}, 1))
    assert err.code == ErrorCode.NON_FINITE and err.fatal
    assert "tensor 0 contains NaN or Inf" in err.message
    assert chief.strategy.updates == 0


def test_non_finite_update_is_refused_even_when_it_is_late() -> None:
    chief = make(workers=1)
    join_all(chief, "a")
    chief.update("a", 0, 1, arrays(1), {}, 1)
    update = arrays(1)
    update[1][0] = np.nan
    assert error(chief.update("a", 0, 1, update, {}, 2)).code == ErrorCode.NON_FINITE


def test_float16_update_whose_sum_overflows_is_not_mistaken_for_inf() -> None:
    chief = Chief(ChiefConfig(1, 1), FedAvg(), initial=[np.zeros(1000, np.float16)])
    chief.join("a", spec_of([np.zeros(1000, np.float16)]), 0)
    acts = chief.update("a", 0, 1, [np.full(1000, 60000, np.float16)], {}, 1)
    assert of(acts, SendError) == [] and closed(acts) is not None


@pytest.mark.parametrize("n", [0, -1, float("nan"), float("inf")])
def test_bad_sample_count(n: float) -> None:
    chief = make(workers=1)
    join_all(chief, "a")
    err = error(chief.update("a", 0, n, arrays(1), {}, 1))
    assert err.code == ErrorCode.BAD_FRAME and err.fatal


def test_update_before_joining() -> None:
    chief = make()
    assert error(chief.update("x", 0, 1, arrays(1), {}, 0)).code == ErrorCode.PROTOCOL
    assert error(chief.init("x", arrays(1), 0)).code == ErrorCode.PROTOCOL


def test_non_numeric_loss_is_ignored() -> None:
    chief = make(workers=1)
    join_all(chief, "a")
    rc = closed(chief.update("a", 0, 1, arrays(1), {"loss": float("nan")}, 1))
    assert rc.train_loss is None


# -- finishing -------------------------------------------------------------------------------
def test_finishes_after_the_last_round_and_late_syncs_get_the_final_model() -> None:
    chief = make(workers=2, rounds=1, min_workers=1, round_timeout=1)
    join_all(chief, "a", "b")
    chief.update("a", 0, 1, arrays(1), {}, 0.5)
    acts = chief.tick(2)
    assert of(acts, Finished) and chief.done and chief.deadline is None
    acts = chief.update("b", 0, 1, arrays(5), {}, 3)
    assert sent_to(acts) == ["b"] and of(acts, SendError) == []
    np.testing.assert_allclose(chief.global_arrays[0], 1)


def test_without_a_round_limit_it_finishes_when_everyone_has_left() -> None:
    chief = make(workers=2, rounds=None)
    join_all(chief, "a", "b")
    assert of(chief.leave("a", 1), Finished) == []
    assert of(chief.leave("b", 2), Finished) == [Finished("every worker has left")]


def test_resumed_chief_continues_at_its_round() -> None:
    chief = Chief(ChiefConfig(1, 5), FedAvg(), initial=arrays(4), start_round=3)
    join_all(chief, "a")
    assert closed(chief.update("a", 3, 1, arrays(8), {}, 1)).round == 4
    stale = chief.update("a", 2, 1, arrays(8), {}, 1)  # from before the restart
    assert error(stale).code == ErrorCode.STALE
    done = Chief(ChiefConfig(1, 3), FedAvg(), initial=arrays(4), start_round=3)
    assert done.done


def test_a_transport_that_checked_for_nan_is_trusted_both_ways() -> None:
    chief = make(workers=2)
    join_all(chief, "a", "b")
    err = error(chief.update("a", 0, 1, arrays(1), {}, 1, checked=True,
                             bad="tensor 1 contains NaN or Inf"))
    assert err.code == ErrorCode.NON_FINITE and "tensor 1" in err.message
    assert chief.strategy.updates == 0
    unchecked = arrays(1)
    unchecked[0][0, 0] = np.nan
    assert error(chief.update("b", 0, 1, unchecked, {}, 1)).code == ErrorCode.NON_FINITE


def test_the_buffers_of_an_update_the_strategy_is_done_with_are_recycled() -> None:
    chief = make(workers=3)
    join_all(chief, "a", "b", "c")
    assert of(chief.update("a", 0, 1, arrays(1), {}, 1), Recycle) == []  # kept as the sum
    second = arrays(2)
    (rec,) = of(chief.update("b", 0, 1, second, {}, 1), Recycle)
    assert all(x is y for x, y in zip(rec.arrays, second))
