"""The chief runtime's schedulers: the blocking one MPI's rank 0 uses, and the asyncio one."""

from __future__ import annotations

import asyncio
import threading

from fedberry.chief.scheduler import AsyncioScheduler, BlockingScheduler


def test_blocking_scheduler_runs_soon_calls_and_due_timers_only_when_asked() -> None:
    now = [100.0]
    s = BlockingScheduler(clock=lambda: now[0])
    calls: list[str] = []
    s.call_soon(lambda: calls.append("soon"))
    s.call_later(2.0, lambda: calls.append("t2"))
    s.call_later(1.0, lambda: calls.append("t1"))
    s.call_later(1.5, lambda: calls.append("cancelled")).cancel()
    assert calls == []  # nothing runs behind the chief's back
    s.run_ready()
    assert calls == ["soon"]
    now[0] = 101.6
    s.run_ready()
    assert calls == ["soon", "t1"]
    now[0] = 103.0
    s.run_ready()
    assert calls == ["soon", "t1", "t2"]
    s.drain()


def test_blocking_scheduler_keeps_the_order_of_work_and_passes_exceptions_on() -> None:
    s = BlockingScheduler()
    got: list[object] = []
    release = threading.Event()

    def slow() -> int:
        release.wait(5)
        return 1

    def fails() -> int:
        raise ValueError("bad")

    s.in_order(slow, got.append)
    s.in_order(fails, got.append)
    s.in_order(None, got.append)
    release.set()
    s.drain()
    assert got[0] == 1 and isinstance(got[1], ValueError) and got[2] is None


def test_asyncio_scheduler_goes_on_after_a_failing_then() -> None:
    async def main() -> list[object]:
        s = AsyncioScheduler(asyncio.get_running_loop())
        got: list[object] = []

        def then_fails(result: object) -> None:
            got.append(result)
            raise RuntimeError("a callback bug")

        s.in_order(lambda: 1, then_fails)
        s.in_order(lambda: 2, got.append)
        await s.drain()
        return got

    assert asyncio.run(main()) == [1, 2]
