"""Runs the chief's state machine for any transport: TCP connections, in-process workers, MPI.

Transports authenticate connections and attach them here as peers; this module turns the chief's
actions into sends, keeps the round deadline timer, counts bytes, writes metrics and checkpoints,
and evaluates the global model off the chief's thread so that heartbeats keep flowing meanwhile.
How it waits (timers, deferred calls, work on another thread) is the transport's scheduler
(``chief.scheduler``): an asyncio loop for TCP and in-process workers, the rank's own thread
between collectives for MPI.

Side effects follow one policy whatever the transport: a failing evaluation, metrics write or
``on_round`` callback is logged with its reason and the run goes on (the round's model has
already gone out, and later rounds' lines are written as usual). A failing checkpoint write
raises: a chief that cannot checkpoint is not resumable, and must not pretend to be.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections.abc import Callable
from typing import Any, Protocol

import numpy as np

from fedberry import codecs
from fedberry.chief import checkpoint as ckpt_io
from fedberry.chief.broadcast import Broadcast
from fedberry.chief.buffers import BufferPool
from fedberry.chief.metrics import MetricsLog
from fedberry.chief.run_info import write_run_info
from fedberry.chief.scheduler import AsyncioScheduler, BlockingScheduler, Scheduler, Timer
from fedberry.chief.state import (
    Chief,
    Finished,
    Recycle,
    RequestInit,
    RoundClosed,
    SendError,
    SendGlobal,
)
from fedberry.protocol.frames import ErrorCode, Spec

log = logging.getLogger("fedberry.chief")

Evaluate = Callable[[list[np.ndarray]], dict[str, float]]


class Peer(Protocol):
    """One joined worker, as a transport sees it."""

    worker_id: str

    def send_global(self, server: ChiefServer) -> None: ...
    def send_error(self, code: ErrorCode, message: str, fatal: bool) -> None: ...
    def request_init(self) -> None: ...
    def close(self) -> None: ...


class ChiefServer:
    """The chief runtime: carries out the state machine's actions for the transport's peers.

    Parameters
    ----------
    chief : Chief
        The round state machine.
    evaluate : callable, optional
        ``evaluate(global_arrays) -> {"accuracy": .., "loss": ..}`` after every round, off the
        chief's thread.
    out_dir : str, optional
        ``metrics.jsonl`` goes here (and what else a transport writes about the run).
    checkpoint_path : str, optional
        Written atomically after every round, before the new model goes out.
    run_config : dict, optional
        Saved in every checkpoint (``--resume`` compares its strategy).
    finish_grace : float
        Seconds a finished chief waits for workers cut off lately to take the final model.
    append_metrics : bool
        Append to ``metrics.jsonl`` (a resumed run) instead of starting it afresh.
    on_round : callable, optional
        Called with each round's metrics line, in round order; what it raises is logged.
    downlink : str
        How the global model travels: ``none``, ``fp16`` or ``q8`` (``chief.broadcast``).
    scheduler : Scheduler, optional
        How the runtime waits; None: an ``AsyncioScheduler`` on the loop of ``bind_loop()``.
    """

    def __init__(self, chief: Chief, *, evaluate: Evaluate | None = None,
                 out_dir: str | None = None, checkpoint_path: str | None = None,
                 run_config: dict[str, Any] | None = None, finish_grace: float = 30.0,
                 append_metrics: bool = False,
                 on_round: Callable[[dict[str, Any]], None] | None = None,
                 downlink: str = "none", scheduler: Scheduler | None = None) -> None:
        self.chief = chief
        self.out_dir = out_dir
        self.broadcast = Broadcast(downlink)  # the global model, encoded once per round
        self.evaluate = evaluate
        self.metrics = MetricsLog(out_dir, append=append_metrics)
        self.checkpoint_path = checkpoint_path
        self.run_config = run_config or {}
        if out_dir:  # the strategy and its hyperparameters, beside metrics.jsonl
            write_run_info(out_dir, chief.strategy, self.run_config, chief.round)
        self.finish_grace = finish_grace
        self.on_round = on_round
        self.peers: dict[str, Peer] = {}
        # Updates are read into buffers of updates before (transports' FrameDecoder.allocate).
        self.buffers = BufferPool()
        self.bytes_up = 0
        self.bytes_down = 0
        self._bytes_mark = (0, 0)
        self._deadline_handle: Timer | None = None
        self._grace_handle: Timer | None = None
        self._finishing = False
        # Workers whose connection broke before the last round (worker id -> when): for
        # finish_grace after that, a finished chief waits for them to reconnect and take the
        # final model, instead of leaving them to retry against a closed port.
        self._lost: dict[str, float] = {}
        self._t0: float | None = None
        self.scheduler = scheduler
        self.loop: asyncio.AbstractEventLoop | None = None
        self.finished: asyncio.Event | None = None

    @property
    def started_at(self) -> float | None:
        """time.monotonic() when the first worker joined: metrics' wall_s counts from here."""
        return self._t0

    def bind_loop(self) -> None:
        """Run on the calling coroutine's asyncio loop (TCP, in-process workers)."""
        self.loop = asyncio.get_running_loop()
        self.finished = asyncio.Event()
        if self.scheduler is None:
            self.scheduler = AsyncioScheduler(self.loop)

    # -- events from transports --------------------------------------------------------------
    def attach(self, peer: Peer, spec: Spec, want_model: bool) -> None:
        old = self.peers.get(peer.worker_id)
        self.peers[peer.worker_id] = peer  # first: closing the old one must not count as leaving
        if old is not None and old is not peer:
            old.close()  # a reconnect replaces the half-dead connection; no leave for it
        if self._t0 is None:
            self._t0 = time.monotonic()
        self._run(self.chief.join(peer.worker_id, spec, time.monotonic(), want_model))

    def on_init(self, peer: Peer, arrays: list[np.ndarray]) -> None:
        self._run(self.chief.init(peer.worker_id, arrays, time.monotonic()))

    def on_update(self, peer: Peer, round_: int, num_samples: float, arrays: list[np.ndarray],
                  metrics: dict[str, Any], codec: str = "none", checked: bool = False,
                  bad: str | None = None) -> None:
        """``checked``/``bad``: the transport's own NaN/Inf check of ``arrays`` (Chief.update);
        it counts only for updates sent as they are, not for what a codec decodes."""
        if codec != "none":
            checked, bad = False, None
            chief = self.chief
            if round_ == chief.round and chief.spec is not None:
                arrays = codecs.get(codec).decode(arrays, chief.spec, chief.global_arrays)
            elif codecs.get(codec).needs_reference and chief.spec is not None:
                # Encoded against a model that is gone: it can only be a late or early update,
                # which the chief drops (and says so). Bad numbers are refused all the same.
                codecs.get(codec).check(arrays, chief.spec)
                arrays = []
            else:
                arrays = codecs.get(codec).decode(arrays, chief.spec or (), None)
        self._run(self.chief.update(peer.worker_id, round_, num_samples, arrays, metrics,
                                    time.monotonic(), checked=checked, bad=bad))

    def on_collective_update(self, peer: Peer, round_: int, weight: float,
                             mean: list[np.ndarray], metrics: dict[str, Any],
                             updates: int) -> None:
        """An update that stands for ``updates`` workers' together: their sample-weighted
        ``mean`` and total ``weight`` (MPI's Allreduce). It goes to the strategy as one update of
        the total weight, which is exact for rules that act on the mean (FedAvg, FedAvgM,
        FedAdam); the round's metrics count ``updates`` workers."""
        actions = self.chief.update(peer.worker_id, round_, weight, mean, metrics,
                                    time.monotonic(), stands_for=updates)
        for action in actions:
            if isinstance(action, RoundClosed):
                action.workers = updates
            elif isinstance(action, SendError):
                action.fatal = True  # no rank can be left out of a collective: the job stops
        self._run(actions)

    def detach(self, peer: Peer, lost: bool = False) -> None:
        if self.peers.get(peer.worker_id) is not peer:
            return  # an old connection of a worker that has reconnected
        del self.peers[peer.worker_id]
        if lost and not self.chief.done:
            self._lost[peer.worker_id] = time.monotonic()
        self._run(self.chief.leave(peer.worker_id, time.monotonic()))

    # -- actions -----------------------------------------------------------------------------
    def _run(self, actions: list[Any]) -> None:
        for action in actions:
            if isinstance(action, SendGlobal):
                for wid in action.worker_ids:
                    if wid in self.peers:
                        self.peers[wid].send_global(self)
                        if self.chief.done:
                            self._lost.pop(wid, None)
            elif isinstance(action, SendError):
                peer = self.peers.get(action.worker_id)
                if peer is not None:
                    log.warning("worker %s: %s", action.worker_id, action.message)
                    peer.send_error(action.code, action.message, action.fatal)
                    if action.fatal:
                        self.peers.pop(action.worker_id, None)
                        peer.close()
                        self._run(self.chief.leave(action.worker_id, time.monotonic()))
            elif isinstance(action, RequestInit):
                if action.worker_id in self.peers:
                    self.peers[action.worker_id].request_init()
            elif isinstance(action, RoundClosed):
                self._round_closed(action)
            elif isinstance(action, Recycle):
                spec = self.chief.spec or ()
                # Two models' worth at least (the transport may keep more: what it lets in at
                # once), O(model) memory whatever the number of workers.
                self.buffers.max_bytes = max(self.buffers.max_bytes,
                                             2 * sum(t.nbytes for t in spec))
                self.buffers.give(action.arrays)
            elif isinstance(action, Finished):
                log.info("finishing: %s", action.reason)
                self._finishing = True
                if (self.peers or self._awaited()) and self.scheduler is not None:
                    self._grace_handle = self.scheduler.call_later(self.finish_grace,
                                                                   self._finish)
        self._arm_deadline()
        if self._finishing and not self.chief.members and not self._awaited():
            self._finish()

    def _awaited(self) -> list[str]:
        """Workers cut off lately that have not had the final model: they are reconnecting."""
        now = time.monotonic()
        return [w for w, t in self._lost.items()
                if now - t < self.finish_grace and w not in self.chief.members]

    def _round_closed(self, rc: RoundClosed) -> None:
        # Checkpoint before anyone sees the new model: a chief killed after this round resumes
        # with exactly the model the workers were sent.
        self.broadcast.prepare(self.chief)
        if self.checkpoint_path:
            ckpt_io.save(self.checkpoint_path, ckpt_io.Checkpoint(
                self.chief.round, self.chief.global_arrays or [],
                self.chief.strategy.state_dict(), self.run_config))
        wall = time.monotonic() - (self._t0 or time.monotonic())
        record: dict[str, Any] = {"round": rc.round, "workers": rc.workers,
                                  "num_samples": rc.num_samples, "train_loss": rc.train_loss}
        # The bytes of this round's broadcast are counted when the sends are issued, which
        # happens right after this (SendGlobal follows RoundClosed): finish the record then.
        assert self.scheduler is not None
        self.scheduler.call_soon(functools.partial(self._finish_record, record, wall,
                                                   self.chief.global_arrays or []))

    def _finish_record(self, record: dict[str, Any], wall: float,
                       arrays: list[np.ndarray]) -> None:
        up, down = self.bytes_up - self._bytes_mark[0], self.bytes_down - self._bytes_mark[1]
        self._bytes_mark = (self.bytes_up, self.bytes_down)
        record.update(bytes_up=up, bytes_down=down, wall_s=round(wall, 3))
        assert self.scheduler is not None
        work = None if self.evaluate is None else functools.partial(self.evaluate, arrays)
        self.scheduler.in_order(work, functools.partial(self._write_record, record))

    def _write_record(self, record: dict[str, Any], scores: Any) -> None:
        """The round's metrics line and the user's callback, in round order (the policy in the
        module docstring: what fails here is logged, the run goes on)."""
        if isinstance(scores, Exception):
            log.error("evaluation failed: %s", scores)
        if not isinstance(scores, dict):
            scores = {}
        out = {"round": record["round"], "workers": record["workers"],
               "test_accuracy": scores.get("accuracy"), "test_loss": scores.get("loss"),
               **{k: v for k, v in record.items() if k not in ("round", "workers")}}
        try:
            self.metrics.write(out)
        except (OSError, TypeError, ValueError) as exc:
            log.error("round %d: cannot write the metrics line: %s", out["round"], exc)
        if self.on_round:
            try:
                self.on_round(out)
            except Exception:
                log.exception("round %d: the on_round callback failed; the run goes on",
                              out["round"])

    def _arm_deadline(self) -> None:
        if self._deadline_handle is not None:
            self._deadline_handle.cancel()
            self._deadline_handle = None
        deadline = self.chief.deadline
        now = time.monotonic()
        # Once the deadline has passed without a quorum, no timer: the update that completes
        # the quorum closes the round itself (re-arming at a past deadline would spin).
        if deadline is not None and deadline > now and self.scheduler is not None:
            self._deadline_handle = self.scheduler.call_later(
                deadline - now + 0.01, lambda: self._run(self.chief.tick(time.monotonic())))

    def finish(self) -> None:
        """End the run now (on the chief's thread): ``wait_finished`` returns."""
        self._finish()

    def _finish(self) -> None:
        if self.finished is not None and not self.finished.is_set():
            self.finished.set()

    async def wait_finished(self) -> None:
        """On the asyncio loop: wait until the run is over, let the last rounds' lines be
        written, and tell the workers still connected that the chief has finished."""
        assert self.finished is not None and isinstance(self.scheduler, AsyncioScheduler)
        await self.finished.wait()
        await self.scheduler.drain()
        self._close_peers()

    def shutdown(self) -> None:
        """With a ``BlockingScheduler``, once the run is over: write the last rounds' lines
        (waiting for their evaluation) and close the peers left."""
        assert isinstance(self.scheduler, BlockingScheduler)
        self.scheduler.drain()
        self._close_peers()

    def _close_peers(self) -> None:
        for peer in list(self.peers.values()):
            peer.send_error(ErrorCode.SHUTDOWN, "the chief has finished", True)
            peer.close()
