"""How the chief runtime waits: timers, deferred calls and work off its thread.

The runtime (``chief.runtime.ChiefServer``) needs three things from the transport that runs it:
call something soon (after the current batch of actions), call something later (the round
deadline, the finish grace) and run work off its own thread in order (the checkpoint's write,
evaluation, then the metrics line and the user's ``on_round``): disk writes and evaluation never
run on the thread that carries the sockets or the collectives. ``AsyncioScheduler`` gives them on
an asyncio loop (TCP and in-process workers); ``BlockingScheduler`` on a thread that blocks in MPI
collectives, which calls ``run_ready()`` between them.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import heapq
import itertools
import logging
import time
from collections import deque
from collections.abc import Callable
from typing import Any, Protocol

Work = Callable[[], Any]
Then = Callable[[Any], None]

log = logging.getLogger("fedberry.chief")


class Timer(Protocol):
    """A pending ``call_later``."""

    def cancel(self) -> None: ...


class Scheduler(Protocol):
    """What the chief runtime needs to wait without knowing how its transport waits."""

    def call_soon(self, fn: Callable[[], None]) -> None:
        """Call ``fn`` on the chief's thread once the current batch of actions is carried out."""

    def call_later(self, delay: float, fn: Callable[[], None]) -> Timer:
        """Call ``fn`` on the chief's thread ``delay`` seconds from now, unless cancelled."""

    def in_order(self, work: Work | None, then: Then) -> None:
        """Run ``work()`` off the chief's thread, then ``then(result)`` (the exception instead of
        the result if it raised; None when there is no work); the ``then`` calls follow the order
        of the ``in_order`` calls and never overlap."""


class AsyncioScheduler:
    """The scheduler on an asyncio loop: ``then`` runs on the loop, work on one thread.

    Parameters
    ----------
    loop : asyncio.AbstractEventLoop
        The loop the chief runs on.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self._executor = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="fb-eval")
        self._chain: list[asyncio.Future[Any]] = []

    def call_soon(self, fn: Callable[[], None]) -> None:
        self.loop.call_soon(fn)

    def call_later(self, delay: float, fn: Callable[[], None]) -> Timer:
        return self.loop.call_later(delay, fn)

    def in_order(self, work: Work | None, then: Then) -> None:
        if work is None:
            fut: asyncio.Future[Any] = self.loop.create_future()
            fut.set_result(None)
        else:
            fut = self.loop.run_in_executor(self._executor, work)
        prev = self._chain[-1] if self._chain else None
        # Only the steps still running are kept (and the last, which the next one waits for):
        # a long run must not hold every round's finished future.
        self._chain = [f for f in self._chain if not f.done()]
        self._chain.append(asyncio.ensure_future(self._after(prev, fut, then)))

    @staticmethod
    async def _after(prev: asyncio.Future[Any] | None, fut: asyncio.Future[Any],
                     then: Then) -> None:
        if prev is not None:
            # A failed predecessor must not stop this round's line (it used to: one raising
            # on_round silenced every later metrics line).
            with contextlib.suppress(Exception):
                await asyncio.shield(prev)
        try:
            result = await fut
        except Exception as exc:
            result = exc
        _then(then, result)

    async def drain(self) -> None:
        """Wait for every ``in_order`` so far, then let the work thread go."""
        if self._chain:
            await asyncio.gather(*self._chain, return_exceptions=True)
        await asyncio.sleep(0)  # what the last ``then`` calls soon (the runtime's stop) runs
        self._executor.shutdown(wait=False)


class _BlockingTimer:
    def __init__(self, when: float, fn: Callable[[], None]) -> None:
        self.when, self.fn, self.cancelled = when, fn, False

    def cancel(self) -> None:
        self.cancelled = True


class BlockingScheduler:
    """The scheduler for a chief whose thread blocks elsewhere (MPI's collectives).

    Deferred calls and due timers run when that thread calls ``run_ready()``; work and its
    ``then`` run on one thread of their own, in order, so that evaluation and the metrics line
    overlap the next round's collective.

    Parameters
    ----------
    clock : callable, optional
        Seconds, monotonic (``time.monotonic`` by default).
    """

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self.clock = clock
        self._soon: deque[Callable[[], None]] = deque()
        self._timers: list[tuple[float, int, _BlockingTimer]] = []
        self._seq = itertools.count()
        self._executor = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="fb-eval")
        self._pending: list[concurrent.futures.Future[None]] = []

    def call_soon(self, fn: Callable[[], None]) -> None:
        # Also from the work thread (a ``then``): deque.append is atomic, and run_ready, on
        # the chief's thread, is what calls ``fn``.
        self._soon.append(fn)

    def call_later(self, delay: float, fn: Callable[[], None]) -> Timer:
        timer = _BlockingTimer(self.clock() + delay, fn)
        heapq.heappush(self._timers, (timer.when, next(self._seq), timer))
        return timer

    def in_order(self, work: Work | None, then: Then) -> None:
        def run() -> None:
            try:
                result = None if work is None else work()
            except Exception as exc:
                result = exc
            _then(then, result)

        self._pending = [f for f in self._pending if not f.done()]
        self._pending.append(self._executor.submit(run))

    def run_ready(self) -> None:
        """Carry out the deferred calls, and the timers that are due."""
        while self._soon:
            self._soon.popleft()()
        now = self.clock()
        while self._timers and self._timers[0][0] <= now:
            _, _, timer = heapq.heappop(self._timers)
            if not timer.cancelled:
                timer.fn()
            while self._soon:
                self._soon.popleft()()

    def drain(self) -> None:
        """Wait for every ``in_order`` so far, then let the work thread go."""
        self.run_ready()
        for fut in self._pending:
            fut.result()
        self._pending.clear()
        self._executor.shutdown(wait=True)
        self.run_ready()  # what the last ``then`` calls soon (the runtime's stop, say)


def _then(then: Then, result: Any) -> None:
    """``then`` is the runtime's own code, which catches what it expects; anything else is logged
    here rather than lost in a future nobody reads (or raised at the end of an MPI run)."""
    try:
        then(result)
    except Exception:
        log.exception("a round's metrics step failed; the run goes on")
