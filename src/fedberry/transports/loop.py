"""An asyncio event loop on a daemon thread, shared by the chief and the TCP worker.

The user's code trains on its own thread and calls blocking methods (``Worker.sync``,
``serve()``); the sockets, heartbeats and timers run on this loop meanwhile.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Coroutine
from typing import Any, TypeVar

T = TypeVar("T")

# How long stop() waits for the loop's thread to end: the loop only has to finish the callback
# it is running, so a thread still alive after this is stuck in user code and is left behind.
STOP_JOIN_S = 5.0


class LoopThread:
    """An asyncio event loop on a daemon thread; ``run(coro)`` blocks the caller until done."""

    def __init__(self, name: str = "fedberry-io") -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name=name, daemon=True)
        self._thread.start()

    def run(self, coro: Coroutine[Any, Any, T], timeout: float | None = None) -> T:
        """Run ``coro`` on the loop and return its result; ``timeout`` seconds (None: the
        coroutine's own deadlines) before ``concurrent.futures.TimeoutError``."""
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def stop(self) -> None:
        """Stop the loop and close it once its thread has ended."""
        if self.loop.is_running():
            self.loop.call_soon_threadsafe(self.loop.stop)
            self._thread.join(STOP_JOIN_S)
        if not self.loop.is_running():
            self.loop.close()
