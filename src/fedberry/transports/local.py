"""In-process transport: a worker in the chief's own process (the chief trains too).

No bytes are encoded: the worker hands its arrays to the chief's loop and gets a copy of the
global model back, through the same ``ChiefServer`` that serves TCP workers.

The worker's wait for an answer is woken by the chief's failure (its fatal error), and checks
every ``POLL_S`` that the chief is still there: a chief whose loop has stopped, or that has
stopped the run, ends the wait with a sentence instead of leaving the worker blocked.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
from collections.abc import Sequence
from typing import Any

import numpy as np

from fedberry.errors import ChiefUnreachable, FederationError, from_code
from fedberry.protocol.frames import ErrorCode, spec_of

Result = tuple[int, list[np.ndarray], bool]

POLL_S = 1.0  # how often a waiting worker looks whether the chief is still there

log = logging.getLogger("fedberry.chief")


class _LocalPeer:
    def __init__(self, worker_id: str) -> None:
        self.worker_id = worker_id
        self.future: concurrent.futures.Future[Result] = concurrent.futures.Future()
        self.init_arrays: list[np.ndarray] = []
        self.warnings: list[str] = []
        self.round_config: dict[str, Any] = {}  # what came with the last model
        self.eval_requested: int | None = None  # the last model asked for an evaluation

    def send_global(self, server: Any) -> None:
        chief = server.chief
        server.broadcast.prepare(chief)  # the model as the TCP workers get it, bit for bit
        if not self.future.done():
            self.round_config = server.current_config()
            asks = server.extras(chief.round, chief.done).get("evaluate", False)
            self.eval_requested = chief.round if asks else None
            self.future.set_result((chief.round, [a.copy() for a in chief.global_arrays],
                                    chief.done))

    def send_error(self, code: ErrorCode, message: str, fatal: bool) -> None:
        if fatal and not self.future.done():
            self.future.set_exception(from_code(code.value, f"the chief refused: {message}"))
        elif not fatal:
            self.warnings.append(message)

    def request_init(self) -> None:
        pass  # handled right after attach, on the chief's loop

    def close(self) -> None:
        pass


class LocalSession:
    """A worker in the chief's process: ``server`` is the ``ChiefServer`` running on ``loop``
    (another thread's); each call hands the work to that loop and blocks until it answers."""

    bytes_sent = 0
    bytes_received = 0

    def __init__(self, server: Any, loop: asyncio.AbstractEventLoop, worker_id: str) -> None:
        self.server = server
        self.loop = loop
        self.peer = _LocalPeer(worker_id)

    @property
    def dp_clip(self) -> float | None:
        """Differential privacy's clipping bound for this worker (the chief's WELCOME says it
        over TCP)."""
        return getattr(self.server.chief.strategy, "worker_clip", None)

    evaluates = False  # answers evaluation requests (Worker(evaluate=...)); set before join

    @property
    def round_config(self) -> dict[str, Any]:
        """The round configuration that came with the last model (``Worker.round_config``)."""
        return self.peer.round_config

    @property
    def eval_requested(self) -> int | None:
        return self.peer.eval_requested

    def send_eval(self, result: Any) -> None:
        """Answer the last model's evaluation request (an ``EvalResult``, checked)."""
        if self.loop.is_running() and result.round == self.peer.eval_requested:
            self.peer.eval_requested = None
            self.loop.call_soon_threadsafe(self.server.on_eval, self.peer, result.round,
                                           result.num_examples, result.metrics)

    def _submit(self, fn: Any, *args: Any) -> Result:
        self.peer.future = future = concurrent.futures.Future()

        def call() -> None:
            failure = getattr(self.server, "failure", None)
            if failure is not None:  # the run has stopped: say so at once
                future.set_exception(from_code(ErrorCode.CHIEF_FAILED.value,
                                               f"the chief refused: {failure}"))
                return
            try:
                fn(*args)
            except Exception as exc:  # a bug on the chief's side must not leave us waiting
                log.exception("worker %s: the chief failed on its call", self.peer.worker_id)
                if not future.done():
                    future.set_exception(FederationError(f"internal error: {exc}",
                                                         ErrorCode.INTERNAL.value))

        try:
            self.loop.call_soon_threadsafe(call)
        except RuntimeError:  # the loop is closed
            raise ChiefUnreachable("the in-process chief has stopped") from None
        while True:
            try:
                return future.result(POLL_S)
            except concurrent.futures.TimeoutError:
                pass
            failure = getattr(self.server, "failure", None)
            if failure is not None and not future.done():
                raise from_code(ErrorCode.CHIEF_FAILED.value, f"the chief refused: {failure}")
            if not self.loop.is_running() and not future.done():
                raise ChiefUnreachable("the in-process chief stopped before it answered")

    def join(self, arrays: Sequence[np.ndarray], names: Sequence[str] | None = None) -> Result:
        own = [np.array(a) for a in arrays]

        def attach() -> None:
            needs_init = self.server.chief.global_arrays is None
            self.server.attach(self.peer, spec_of(own), True, self.evaluates, names=names)
            if needs_init and not self.peer.future.done():
                self.server.on_init(self.peer, own)

        return self._submit(attach)

    def sync(self, round_: int, arrays: Sequence[np.ndarray], num_samples: float,
             metrics: dict[str, Any]) -> Result:
        own = [np.array(a) for a in arrays]  # the chief may fold them in after we return
        return self._submit(self.server.on_update, self.peer, round_, num_samples, own, metrics)

    def close(self) -> None:
        if self.loop.is_running():
            self.loop.call_soon_threadsafe(self.server.detach, self.peer)
