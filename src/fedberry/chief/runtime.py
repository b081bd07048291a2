"""Runs the chief's state machine for any transport: TCP connections, in-process workers, MPI.

Transports authenticate connections and attach them here as peers; this module turns the chief's
actions into sends, keeps the round deadline timer, counts bytes, writes metrics and checkpoints,
and evaluates the global model off the chief's thread so that heartbeats keep flowing meanwhile.
How it waits (timers, deferred calls, work on another thread) is the transport's scheduler
(``chief.scheduler``): an asyncio loop for TCP and in-process workers, the rank's own thread
between collectives for MPI.

Side effects follow one policy whatever the transport: none of them can stop a round's broadcast
or leave a worker waiting. The round's model goes out first; the checkpoint, the evaluation, the
metrics line and ``on_round`` follow off the chief's thread, in round order. A failing
evaluation, metrics write or ``on_round`` callback is logged with its reason and the run goes on
(later rounds' lines are written as usual). A failing checkpoint write follows
``on_checkpoint_error``: ``"stop"`` (the default; a chief that cannot checkpoint is not
resumable, and must not pretend to be) says why in one sentence, sends it to every worker in a
fatal ERROR (``chief_failed``) and ends the run, and ``wait_finished``/``shutdown`` raise it as a
``FederationError``; ``"warn"`` warns every round the write fails, marks that round's metrics line
``"checkpoint": false`` and goes on.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections.abc import Callable, Sequence
from typing import Any, Protocol

import numpy as np

from fedberry import codecs
from fedberry.chief import checkpoint as ckpt_io
from fedberry.chief.broadcast import Broadcast
from fedberry.chief.buffers import BufferPool
from fedberry.chief.metrics import MetricsLog
from fedberry.chief.model_file import ModelFile
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
from fedberry.errors import FederationError
from fedberry.protocol.frames import ErrorCode, Spec
from fedberry.strategies import StrategyState

log = logging.getLogger("fedberry.chief")

Evaluate = Callable[[list[np.ndarray]], dict[str, float]]

CHECKPOINT_ERROR_POLICIES = ("stop", "warn")


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
        Written atomically after every round, off the chief's thread, once the round's model
        has gone out (``_round_closed`` says why in that order).
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
    on_checkpoint_error : str
        ``"stop"`` or ``"warn"``: what a checkpoint that cannot be written does (module
        docstring). A model file that cannot be written follows the same policy.
    model_file : ModelFile, optional
        Where the model is written for people to load (``OUT/model.safetensors``), every
        ``save_every`` rounds and when the run finishes, off the chief's thread like the
        checkpoint; None: no model file.
    """

    def __init__(self, chief: Chief, *, evaluate: Evaluate | None = None,
                 out_dir: str | None = None, checkpoint_path: str | None = None,
                 run_config: dict[str, Any] | None = None, finish_grace: float = 30.0,
                 append_metrics: bool = False,
                 on_round: Callable[[dict[str, Any]], None] | None = None,
                 downlink: str = "none", scheduler: Scheduler | None = None,
                 on_checkpoint_error: str = "stop",
                 model_file: ModelFile | None = None) -> None:
        if on_checkpoint_error not in CHECKPOINT_ERROR_POLICIES:
            raise ValueError(f"on_checkpoint_error must be 'stop' or 'warn', not "
                             f"{on_checkpoint_error!r}")
        self.chief = chief
        self.out_dir = out_dir
        self.broadcast = Broadcast(downlink)  # the global model, encoded once per round
        self.evaluate = evaluate
        self.metrics = MetricsLog(out_dir, append=append_metrics)
        self.checkpoint_path = checkpoint_path
        self.model_file = model_file
        self.run_config = run_config or {}
        self.on_checkpoint_error = on_checkpoint_error
        # The sentence that stopped the run (a checkpoint that could not be written), or None.
        self.failure: str | None = None
        self._unsaved: set[int] = set()  # rounds whose checkpoint could not be written
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
    def attach(self, peer: Peer, spec: Spec, want_model: bool,
               names: Sequence[str] | None = None) -> None:
        """A worker has joined with a model of ``spec``; ``names``: its tensors' names (checked
        by the protocol), which only name the tensors of the model file."""
        old = self.peers.get(peer.worker_id)
        self.peers[peer.worker_id] = peer  # first: closing the old one must not count as leaving
        if old is not None and old is not peer:
            old.close()  # a reconnect replaces the half-dead connection; no leave for it
        if self._t0 is None:
            self._t0 = time.monotonic()
        self._run(self.chief.join(peer.worker_id, spec, time.monotonic(), want_model))
        if self.model_file is not None and self.peers.get(peer.worker_id) is peer:
            self.model_file.offer_names(names, spec)

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
        if self.failure is not None:
            # The run has stopped: whoever is still (or newly) attached hears why and goes;
            # nothing of what the state machine asks is carried out any more.
            self._refuse_all()
            return
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
                self._write_final_model()
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
        # The model as the workers will decode it: what is checkpointed and evaluated.
        self.broadcast.prepare(self.chief)
        # Broadcast first, checkpoint after, off the chief's thread: a disk that is slow or
        # failing can then neither delay nor stop the round's model (the SendGlobal after this
        # action is carried out at once). Resuming stays right: a checkpoint holds only rounds
        # that closed, and a chief killed after the broadcast but before the write resumes one
        # round back; the workers' updates for the round ahead are then answered as stale, with
        # the resumed chief's model (Chief.update: "is ahead of the chief"), and that round is
        # done again. At most the round in flight is lost, never a model of another run.
        ckpt = None
        if self.checkpoint_path:
            ckpt = ckpt_io.Checkpoint(self.chief.round, list(self.chief.global_arrays or []),
                                      _snapshot(self.chief.strategy.state_dict()),
                                      self.run_config)
        wall = time.monotonic() - (self._t0 or time.monotonic())
        record: dict[str, Any] = {"round": rc.round, "workers": rc.workers,
                                  "num_samples": rc.num_samples, "train_loss": rc.train_loss}
        # The bytes of this round's broadcast are counted when the sends are issued, which
        # happens right after this (SendGlobal follows RoundClosed): finish the record then.
        # Decided now, with the round: a Finished action right after this one must not write
        # the last model a second time.
        model = (self.model_file is not None and self.chief.global_arrays is not None
                 and self.model_file.due(rc.round, self.chief.done))
        if model:
            assert self.model_file is not None
            self.model_file.scheduled = rc.round
        assert self.scheduler is not None
        self.scheduler.call_soon(functools.partial(self._finish_record, record, wall,
                                                   self.chief.global_arrays or [], ckpt, model))

    def _finish_record(self, record: dict[str, Any], wall: float,
                       arrays: list[np.ndarray], ckpt: ckpt_io.Checkpoint | None,
                       model: bool = False) -> None:
        up, down = self.bytes_up - self._bytes_mark[0], self.bytes_down - self._bytes_mark[1]
        self._bytes_mark = (self.bytes_up, self.bytes_down)
        record.update(bytes_up=up, bytes_down=down, wall_s=round(wall, 3))
        assert self.scheduler is not None
        if ckpt is not None and self.failure is None:
            # On the scheduler's one work thread, in round order, before this round's metrics
            # line (which says whether it was written). The model is not copied: every round's
            # global arrays are new ones (the strategies return fresh arrays, MPI's mean too,
            # and broadcast.prepare has already rounded them), and nothing writes into them
            # after this; the strategy's state, which it updates in place, was copied.
            self.scheduler.in_order(
                functools.partial(ckpt_io.save, self.checkpoint_path, ckpt),
                functools.partial(self._checkpointed, ckpt.round))
        if model and self.failure is None:
            self._write_model(record["round"], arrays)
        work = None if self.evaluate is None else functools.partial(self.evaluate, arrays)
        self.scheduler.in_order(work, functools.partial(self._write_record, record))

    def _write_model(self, round_: int, arrays: list[np.ndarray]) -> None:
        """Write the model file of ``round_`` off the chief's thread, in round order (the
        arrays are a round's own: ``_finish_record`` says why they need no copy)."""
        assert self.scheduler is not None and self.model_file is not None
        self.scheduler.in_order(
            functools.partial(self.model_file.write, round_, arrays),
            functools.partial(self._checkpointed, round_, what="model file",
                              path=str(self.model_file.path)))

    def _write_final_model(self) -> None:
        """The run is over: write its model if the last round's is not on its way already
        (a run without ``rounds`` ends when every worker has left, at any round)."""
        mf, chief = self.model_file, self.chief
        if (mf is None or chief.global_arrays is None or self.failure is not None
                or mf.scheduled == chief.round or self.scheduler is None):
            return
        mf.scheduled = chief.round
        self._write_model(chief.round, list(chief.global_arrays))

    def _checkpointed(self, round_: int, result: Any, what: str = "checkpoint",
                      path: str | None = None) -> None:
        """After a checkpoint (or model file) write (on the scheduler's thread for ``then``):
        the policy for one that failed (module docstring)."""
        if not isinstance(result, Exception):
            return
        if what == "checkpoint":
            self._unsaved.add(round_)
        why = str(result) if isinstance(result, OSError) else f"{type(result).__name__}: {result}"
        where = (f"the chief cannot write its {what} {path or self.checkpoint_path} after "
                 f"round {round_}")
        if self.on_checkpoint_error == "warn":
            log.warning("%s (%s); the run goes on without it, as --on-checkpoint-error warn asks%s",
                        where, why, ": a restart would resume from an older round"
                        if what == "checkpoint" else "")
            return
        if self.failure is None:
            self.failure = (f"{where} ({why}), so it stops the run (--on-checkpoint-error "
                            "stop)")
            assert self.scheduler is not None
            self.scheduler.call_soon(self._stop)

    def _stop(self) -> None:
        """End a failed run on the chief's thread: every worker is told why, nobody waits."""
        assert self.failure is not None
        log.error("%s", self.failure)
        for handle in (self._deadline_handle, self._grace_handle):
            if handle is not None:
                handle.cancel()
        self._deadline_handle = self._grace_handle = None
        self._refuse_all()
        self._finishing = True
        self._finish()

    def _refuse_all(self) -> None:
        assert self.failure is not None
        for wid, peer in list(self.peers.items()):
            del self.peers[wid]  # first: its close must not come back as a leave
            peer.send_error(ErrorCode.CHIEF_FAILED, self.failure, True)
            peer.close()

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
        if out["round"] in self._unsaved:
            self._unsaved.discard(out["round"])
            out["checkpoint"] = False
        try:
            out = self.metrics.write(out)
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
        """End the run now (on the chief's thread): ``wait_finished`` returns (once the model
        file of the last round is written)."""
        if self.finished is not None and not self.finished.is_set():
            self._write_final_model()
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
        self._raise_failure()

    def shutdown(self) -> None:
        """With a ``BlockingScheduler``, once the run is over: write the last rounds' lines
        (waiting for their evaluation) and close the peers left."""
        assert isinstance(self.scheduler, BlockingScheduler)
        self.scheduler.drain()
        self._close_peers()
        self._raise_failure()

    def _raise_failure(self) -> None:
        """A run stopped by a failure ends in its sentence, for ``serve``'s handle, ``run_chief``
        and the CLI (which exits nonzero with it)."""
        if self.failure is not None:
            raise FederationError(self.failure, ErrorCode.CHIEF_FAILED.value)

    def _close_peers(self) -> None:
        for peer in list(self.peers.values()):
            peer.send_error(ErrorCode.SHUTDOWN, "the chief has finished", True)
            peer.close()


def _snapshot(state: StrategyState) -> StrategyState:
    """The strategy's state as of now: FedAvgM and FedAdam update theirs in place each round,
    and a checkpoint written off the chief's thread must not see the next round's."""
    return StrategyState(state.name, state.params,
                         {k: np.array(v, copy=True) for k, v in state.arrays.items()})
