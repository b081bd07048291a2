"""The chief's pool of receive buffers: bounded, exact shapes, nothing that aliases other memory."""

from __future__ import annotations

import numpy as np

from fedberry.chief.buffers import BufferPool, ReceiveBudget
from fedberry.protocol.frames import spec_of


def test_take_reuses_given_arrays_of_the_same_dtype_and_shape() -> None:
    pool = BufferPool(max_bytes=1 << 20)
    a, b = np.zeros((3, 4), np.float32), np.zeros(5, np.int64)
    pool.give([a, b])
    got = pool.take(spec_of([np.zeros((3, 4), np.float32), np.zeros((4, 3), np.float32),
                             np.zeros(5, np.int64)]))
    assert got[0] is a and got[2] is b
    assert got[1].shape == (4, 3) and got[1].dtype == np.float32 and got[1].flags.writeable
    assert pool.nbytes == 0 and pool.take(spec_of([a]))[0] is not a


def test_the_pool_keeps_no_more_than_max_bytes() -> None:
    pool = BufferPool(max_bytes=2 * 400)
    arrays = [np.zeros(100, np.float32) for _ in range(5)]
    pool.give(arrays)
    assert pool.nbytes == 800
    got = pool.take(spec_of(arrays))
    assert sum(any(g is a for a in arrays) for g in got) == 2


def test_views_read_only_and_strided_arrays_are_not_kept() -> None:
    pool = BufferPool(max_bytes=1 << 20)
    base = np.zeros(20, np.float32)
    frozen = np.zeros(10, np.float32)
    frozen.flags.writeable = False
    pool.give([base[:10], frozen, np.zeros((4, 4), np.float32).T, np.zeros(0, np.float32)])
    assert pool.nbytes == 0


def test_receive_budget_lets_frames_in_while_they_fit_and_queues_the_rest_in_order() -> None:
    budget = ReceiveBudget(max_bytes=100)
    resumed: list[str] = []
    assert budget.acquire(60, lambda: resumed.append("a"))
    assert budget.acquire(40, lambda: resumed.append("b"))
    assert not budget.acquire(10, lambda: resumed.append("c"))  # full
    assert not budget.acquire(1, lambda: resumed.append("d"))  # behind c, though it would fit
    assert (budget.in_flight, budget.queued, resumed) == (100, 2, [])
    budget.release(40)
    assert resumed == ["c", "d"] and budget.in_flight == 71 and budget.peak == 100
    budget.release(60)
    budget.release(10)
    budget.release(1)
    assert budget.in_flight == 0 and budget.waited == 2


def test_receive_budget_always_lets_one_frame_in_and_forgets_cancelled_waits() -> None:
    budget = ReceiveBudget(max_bytes=10)
    resumed: list[str] = []
    assert budget.acquire(1000, lambda: resumed.append("big"))  # alone: never blocked
    waiter = Waiter(resumed)
    assert not budget.acquire(5, waiter.resume)
    assert not budget.acquire(1000, lambda: resumed.append("big2"))
    budget.cancel(waiter.resume)  # its connection went away (a new bound method, equal)
    budget.release(1000)
    assert resumed == ["big2"] and budget.in_flight == 1000 and budget.queued == 0


class Waiter:
    def __init__(self, log: list[str]) -> None:
        self.log = log

    def resume(self) -> None:
        self.log.append("waiter")
