"""A Poisson draw of nobody (``--fraction F --poisson``): the round closes at once with the
model unchanged, and the next round is drawn after as long as the last round with workers took
(at most ``--round-timeout``), not after the whole round timeout. The round machine is driven
directly for the waits; one run of three worker threads over loopback TCP shows that a run with
a 60 s round timeout and an empty round does not sit idle for it."""

from __future__ import annotations

import threading

import numpy as np

import fedberry
from fedberry.chief.sampling import SamplingPolicy
from fedberry.chief.state import (
    EMPTY_DRAW_WAIT,
    MIN_EMPTY_DRAW_WAIT,
    Chief,
    ChiefConfig,
    RoundClosed,
)
from fedberry.protocol.frames import spec_of

MODEL = [np.zeros(2, np.float32)]
IDS = ["w0", "w1", "w2"]
# Seed 9 at rate 0.3 draws w1 for round 1, nobody for round 2, w1 for round 3, w0 and w1 for 4.
POLICY = SamplingPolicy(fraction=0.3, poisson=True, seed=9)


def test_the_premise_of_the_draws():
    assert [sorted(POLICY.draw(IDS, r)[0]) for r in range(4)] == [
        ["w1"], [], ["w1"], ["w0", "w1"]]


def _chief(**config: object) -> Chief:
    chief = Chief(ChiefConfig(workers=3, rounds=10, sampling=POLICY, **config),
                  initial=[a.copy() for a in MODEL])
    for w in IDS:
        chief.join(w, spec_of(MODEL), 0.0)
    assert chief.sampled == {"w1"}  # round 1, drawn at 0.0 once all three had joined
    return chief


def _close_round_one(chief: Chief, at: float) -> None:
    out = chief.update("w1", 0, 1.0, [np.ones(2, np.float32)], {}, at)
    # Round 1 closed, and round 2's draw (of nobody) closed round 2 at once, model as it was.
    assert [a.round for a in out if isinstance(a, RoundClosed)] == [1, 2]
    assert chief.round == 2 and chief.sampled is None
    np.testing.assert_array_equal(chief.global_arrays[0], np.ones(2, np.float32))


def test_the_next_draw_waits_as_long_as_the_last_round_with_workers_took():
    chief = _chief(round_timeout=600.0)
    _close_round_one(chief, at=3.0)  # round 1 took 3 s
    assert chief.wake_at == 6.0  # not 603.0: the round timeout is a worst case
    assert chief.tick(5.9) == [] and chief.sampled is None
    chief.tick(6.0)
    assert chief.sampled == {"w1"} and chief.round == 2


def test_the_wait_is_at_most_the_round_timeout_and_at_least_the_floor():
    slow = _chief(round_timeout=2.0)
    _close_round_one(slow, at=50.0)  # past its deadline (a quorum that came late)
    assert slow.wake_at == 52.0
    fast = _chief()  # no timeout, a round of a millisecond: the floor keeps a tight loop off
    _close_round_one(fast, at=0.001)
    assert fast.wake_at == 0.001 + MIN_EMPTY_DRAW_WAIT
    assert MIN_EMPTY_DRAW_WAIT < EMPTY_DRAW_WAIT


def test_a_run_with_an_empty_round_does_not_wait_out_the_round_timeout():
    # Four rounds, the second of which draws nobody, under a 60 s round timeout: drawing
    # the third round a round timeout after the second (as the chief did) takes the run past
    # the 20 s it is given here.
    handle = fedberry.serve("127.0.0.1:0", workers=3, rounds=4, token="t", fraction=0.3,
                            poisson=True, sample_seed=9, round_timeout=60.0,
                            initial=[a.copy() for a in MODEL])
    errors: list[BaseException] = []

    def work(i: int) -> None:
        try:
            w = fedberry.Worker(handle.url, token="t", worker_id=IDS[i])
            g = w.join([a.copy() for a in MODEL])
            while not w.done:
                g = w.sync([g[0] + 1], 1.0)
            w.close()
        except BaseException as exc:  # reported in the test's thread
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(i,), daemon=True) for i in range(3)]
    try:
        for t in threads:
            t.start()
        assert handle.wait(20), "the chief sat out the round timeout after an empty draw"
        for t in threads:
            t.join(10)
        assert not errors, errors
        lines = list(handle.metrics)
    finally:
        handle.stop()
    assert [(m["round"], m["sampled"], m["workers"]) for m in lines] == [
        (1, 1, 1), (2, 0, 0), (3, 1, 1), (4, 2, 2)]
