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
import collections
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
from fedberry.chief.evaluation import FederatedEvaluation
from fedberry.chief.events import (
    EventStream,
    Refused,
    RoundDone,
    UpdateIn,
    WorkerJoined,
    WorkerLeft,
)
from fedberry.chief.metrics import MetricsLog
from fedberry.chief.model_file import ModelFile
from fedberry.chief.round_config import RoundConfig
from fedberry.chief.run_info import write_run_info
from fedberry.chief.scheduler import AsyncioScheduler, BlockingScheduler, Scheduler, Timer
from fedberry.chief.secure_round import SendSecure, Unmask
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
from fedberry.protocol.encodings import SECURE_UPDATE_CODEC
from fedberry.protocol.frames import ErrorCode, ProtocolError, Spec
from fedberry.protocol.messages import SecAgg, round_extras
from fedberry.strategies import StrategyState

log = logging.getLogger("fedberry.chief")

Evaluate = Callable[[list[np.ndarray]], dict[str, float]]

CHECKPOINT_ERROR_POLICIES = ("stop", "warn")

# While a round waits, the chief says who it waits for at most this often (seconds); while
# nothing changes, half as often each time, down to once per PROGRESS_EVERY_MAX.
PROGRESS_EVERY = 10.0
PROGRESS_EVERY_MAX = 300.0
_MAX_NAMED = 8  # worker ids named in one progress line; the rest are counted


class Peer(Protocol):
    """One joined worker, as a transport sees it."""

    worker_id: str

    def send_global(self, server: ChiefServer) -> None: ...
    def send_error(self, code: ErrorCode, message: str, fatal: bool) -> None: ...
    def request_init(self) -> None: ...
    def close(self) -> None: ...
    # Secure aggregation's steps (only transports that carry them: TCP).
    def send_secagg(self, message: SecAgg) -> None: ...


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
    round_config : callable, optional
        ``round_config(round) -> dict`` of scalars sent with the model of ``round`` (rounds
        completed, 0 first) to every worker, encoded once per round (``chief.round_config``).
        One that raises or returns what the protocol refuses is logged, and that round's
        model goes out without a config (the side-effect policy).
    worker_evaluation : FederatedEvaluation, optional
        Ask the workers that offer one to evaluate the global model every so many rounds; the
        round's metrics line waits (within its timeout) and carries ``federated_eval``
        (``chief.evaluation``).
    progress_every : float
        While a round waits (some updates in, not all) or workers are still to join, log who
        it waits for at most once per this many seconds (over asyncio transports).

    What happens is logged here, once for every transport (logger ``fedberry.chief``): each
    worker joining, coming back, leaving or lost (with why, when its transport says), and the
    progress line while a round waits.
    """

    def __init__(self, chief: Chief, *, evaluate: Evaluate | None = None,
                 out_dir: str | None = None, checkpoint_path: str | None = None,
                 run_config: dict[str, Any] | None = None, finish_grace: float = 30.0,
                 append_metrics: bool = False,
                 on_round: Callable[[dict[str, Any]], None] | None = None,
                 downlink: str = "none", scheduler: Scheduler | None = None,
                 on_checkpoint_error: str = "stop",
                 model_file: ModelFile | None = None,
                 round_config: RoundConfig | None = None,
                 worker_evaluation: FederatedEvaluation | None = None,
                 progress_every: float = PROGRESS_EVERY) -> None:
        if on_checkpoint_error not in CHECKPOINT_ERROR_POLICIES:
            raise ValueError(f"on_checkpoint_error must be 'stop' or 'warn', not "
                             f"{on_checkpoint_error!r}")
        self.chief = chief
        self.out_dir = out_dir
        self.broadcast = Broadcast(downlink)  # the global model, encoded once per round
        self.round_config = round_config
        self._extras: tuple[tuple[int, bool], dict[str, Any]] | None = None
        self.broadcast.extras = self.extras
        self.worker_evaluation = worker_evaluation
        self._evaluators: set[str] = set()  # joined workers that answer evaluation requests
        # Metrics lines waiting for their round's worker evaluations, in round order.
        self._held: collections.deque[dict[str, Any]] = collections.deque()
        self._held_timer: Timer | None = None
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
        self.events = EventStream()  # what happens, for observers (the status page)
        self._round_ids: dict[int, tuple[str, ...]] = {}  # round -> its workers, until its line
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
        self.progress_every = progress_every
        self._progress_at = time.monotonic()  # the last progress line, or the round's start
        self._progress_timer: Timer | None = None
        self._progress_backoff = 1  # doubles while the line would say the same
        self._progress_key: tuple[Any, ...] | None = None  # what the last line said
        # Workers that left or were lost (id -> when), to say "back" when one reconnects;
        # bounded: only authenticated workers get here, but ids are theirs to choose.
        self._gone_at: dict[str, float] = {}
        self._codec_of: dict[str, str] = {}  # the codec each worker's updates came in, lately

    def extras(self, round_: int, done: bool) -> dict[str, Any]:
        """The GLOBAL metadata of ``round_`` beyond the model: its config (computed once per
        round, checked by the protocol's rule) and whether it asks for evaluations."""
        if self._extras is not None and self._extras[0] == (round_, done):
            return self._extras[1]
        config: Any = {}
        if self.round_config is not None:
            try:
                config = dict(self.round_config(round_))
                round_extras(config, False)  # the protocol's check, before any worker sees it
            except Exception as exc:  # the user's callable: logged, the round goes on
                why = exc.message if isinstance(exc, ProtocolError) else f"{exc!r}"
                log.error("round %d: the round config failed (%s); this round's model goes out "
                          "without one", round_, why)
                config = {}
        asks = (self.worker_evaluation is not None
                and self.worker_evaluation.asks(round_, done))
        extras = round_extras(config, asks)
        self._extras = ((round_, done), extras)
        return extras

    def current_config(self) -> dict[str, Any]:
        """The config going out with the current round's model (what a local worker gets)."""
        return dict(self.extras(self.chief.round, self.chief.done).get("config", {}))

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
        self._progress_timer = self.scheduler.call_later(1.0, self._progress)

    # -- events from transports --------------------------------------------------------------
    def attach(self, peer: Peer, spec: Spec, want_model: bool, evaluates: bool = False,
               names: Sequence[str] | None = None) -> None:
        """``evaluates``: the worker answers evaluation requests (its AUTH said so); ``names``:
        its tensors' names (checked by the protocol), which only name the tensors of the model
        file."""
        wid = peer.worker_id
        if evaluates:
            self._evaluators.add(wid)
        else:
            self._evaluators.discard(wid)
        old = self.peers.get(wid)
        self.peers[wid] = peer  # first: closing the old one must not count as leaving
        if old is not None and old is not peer:
            old.close()  # a reconnect replaces the half-dead connection; no leave for it
        if self._t0 is None:
            self._t0 = time.monotonic()
        started = self.chief.started
        self.events.emit(_joined(peer, self.chief.round))
        self._run(self.chief.join(wid, spec, time.monotonic(), want_model))
        if wid in self.chief.members:  # not refused (a model of another shape)
            self._log_join(peer, old, started)
        if self.model_file is not None and self.peers.get(wid) is peer:
            self.model_file.offer_names(names, spec)

    def _log_join(self, peer: Peer, old: Peer | None, started: bool) -> None:
        wid, chief = peer.worker_id, self.chief
        where = f" from {peer.address}" if getattr(peer, "address", None) else ""
        gone = self._gone_at.pop(wid, None)
        if old is not None and old is not peer:
            log.info("worker %s is back%s: its old connection, which had stopped answering, "
                     "is replaced", wid, where)
        elif gone is not None:
            log.info("worker %s is back%s (reconnected %.1f s after it went)", wid, where,
                     time.monotonic() - gone)
        else:
            log.info("worker %s joined%s (%d of %d workers%s)", wid, where, len(chief.members),
                     max(chief.config.workers, len(chief.members)),
                     f"; it joins round {chief.round + 1}" if started else "")
        if chief.started and not started:
            n = len(chief.members)
            log.info("round %d starts: %d worker%s in", chief.round + 1, n,
                     " is" if n == 1 else "s are")
            self._progress_at = time.monotonic()

    def on_init(self, peer: Peer, arrays: list[np.ndarray]) -> None:
        self._run(self.chief.init(peer.worker_id, arrays, time.monotonic()))

    def on_update(self, peer: Peer, round_: int, num_samples: float, arrays: list[np.ndarray],
                  metrics: dict[str, Any], codec: str = "none", checked: bool = False,
                  bad: str | None = None) -> None:
        """``checked``/``bad``: the transport's own NaN/Inf check of ``arrays`` (Chief.update);
        it counts only for updates sent as they are, not for what a codec decodes."""
        if self._codec_of.get(peer.worker_id) != codec:
            if codec != SECURE_UPDATE_CODEC and (peer.worker_id in self._codec_of
                                                 or codec != "none"):
                log.info("worker %s sends its updates as %s", peer.worker_id, codec)
            self._codec_of[peer.worker_id] = codec
        if codec == SECURE_UPDATE_CODEC:  # a secure round's report: no tensors to decode
            arrays, checked, bad = [], True, None
        elif codec != "none":
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
        self.events.emit(UpdateIn(peer.worker_id, round_, num_samples, dict(metrics), codec))
        self._run(self.chief.update(peer.worker_id, round_, num_samples, arrays, metrics,
                                    time.monotonic(), checked=checked, bad=bad))

    def on_secagg(self, peer: Peer, message: SecAgg) -> None:
        """A worker's step of the open secure round (its fields checked by the protocol)."""
        if self.peers.get(peer.worker_id) is peer:
            self._run(self.chief.secure_step(peer.worker_id, message, time.monotonic()))

    def on_masked(self, peer: Peer, round_: int, vector: np.ndarray) -> None:
        """A worker's masked update: added into the secure round's ring sum at once, after
        which its buffer takes the next one (O(model) memory however many workers send)."""
        if self.peers.get(peer.worker_id) is peer:
            self._run(self.chief.masked(peer.worker_id, round_, vector, time.monotonic()))
        self.buffers.max_bytes = max(self.buffers.max_bytes, 2 * vector.nbytes)
        self.buffers.give([vector])

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

    def on_eval(self, peer: Peer, round_: int, num_examples: float,
                metrics: dict[str, float]) -> None:
        """A worker's evaluation of the model of ``round_`` (its fields checked by the
        protocol's ``EvalResult``)."""
        if self.worker_evaluation is None or self.peers.get(peer.worker_id) is not peer:
            return
        too_many = self.chief.admission.too_many_samples(num_examples)  # the updates' bound
        if too_many:
            log.warning("worker %s: its evaluation of round %d is refused and not counted: %s",
                        peer.worker_id, round_, too_many)
            self.worker_evaluation.refused(peer.worker_id, round_)
            self._flush_held()  # the line waits for this worker no more
            return
        if self.worker_evaluation.report(peer.worker_id, round_, num_examples, metrics,
                                         time.monotonic()):
            self._flush_held()

    def detach(self, peer: Peer, lost: bool = False, why: str | None = None,
               returning: bool = True) -> None:
        """``peer`` is gone: it left (said BYE) or, ``lost``, its connection broke or was
        closed, ``why`` (the transport's sentence, when it has one). ``returning=False``: the
        chief refused it with an error after which a worker does not dial again
        (``RETRIED_CODES``), so a finished run does not wait for it to take the final model."""
        wid = peer.worker_id
        if self.peers.get(wid) is not peer:
            return  # an old connection of a worker that has reconnected
        del self.peers[wid]
        self.events.emit(WorkerLeft(wid, lost, why or ""))
        self._evaluators.discard(wid)
        if self.worker_evaluation is not None:
            self.worker_evaluation.left(wid)
            self._flush_held()
        if lost and returning and not self.chief.done:
            self._lost[wid] = time.monotonic()
        was_member = wid in self.chief.members
        ending = self.finished is not None and self.finished.is_set()  # closed by the chief
        self._run(self.chief.leave(wid, time.monotonic()))
        self._codec_of.pop(wid, None)
        if not was_member:
            return
        self._gone_at[wid] = time.monotonic()
        while len(self._gone_at) > 10_000:
            self._gone_at.pop(next(iter(self._gone_at)))
        left = len(self.chief.members)
        if ending:
            log.debug("worker %s: closed as the chief finishes", wid)
        elif lost and not self.chief.done:
            log.warning("worker %s lost: %s; %d worker%s still in (it may reconnect with the "
                        "same id)", wid, why or "its connection closed", left,
                        "" if left == 1 else "s")
        else:
            log.info("worker %s left%s; %d worker%s still in", wid,
                     f" ({why})" if why and lost else "", left, "" if left == 1 else "s")

    def _progress(self) -> None:
        """Every second while the run goes on: at most once per ``progress_every``, while a
        round waits for some of its workers (or for workers to join), say who it waits for."""
        chief = self.chief
        if self._finishing or chief.done or self.failure is not None or self.scheduler is None:
            self._progress_timer = None
            return
        self._progress_timer = self.scheduler.call_later(1.0, self._progress)
        now = time.monotonic()
        wait = min(self.progress_every * self._progress_backoff, PROGRESS_EVERY_MAX)
        if now - self._progress_at < wait:
            return
        done, waiting = chief.pending()
        if not chief.started:
            members = sorted(chief.members)
            line = (f"waiting for workers to join: {len(members)} of {chief.config.workers} "
                    f"in{' (' + _names(members) + ')' if members else ''}")
        elif done and waiting:
            deadline = chief.deadline
            when = (f"deadline in {deadline - now:.0f} s" if deadline is not None and
                    deadline > now else
                    f"its deadline has passed: it closes at {chief.config.min_workers} "
                    "updates" if deadline is not None else
                    "no deadline: it waits for every worker; --round-timeout sets one")
            line = (f"round {chief.round + 1}: {done} of {done + len(waiting)} updates in, "
                    f"waiting for {_names(waiting)} ({when})")
        else:
            return
        key = (chief.round, chief.started, done, tuple(waiting), tuple(sorted(chief.members)))
        same = key == self._progress_key
        self._progress_backoff = min(self._progress_backoff * 2, 1 << 10) if same else 1
        self._progress_key = key
        self._progress_at = now
        log.info("%s", line)

    # -- actions -----------------------------------------------------------------------------
    def _run(self, actions: list[Any]) -> None:
        if self.failure is not None:
            # The run has stopped: whoever is still (or newly) attached hears why and goes;
            # nothing of what the state machine asks is carried out any more.
            self._refuse_all()
            return
        for action in actions:
            if isinstance(action, SendGlobal):
                asks = self.extras(self.chief.round, self.chief.done).get("evaluate", False)
                for wid in action.worker_ids:
                    if wid in self.peers:
                        self.peers[wid].send_global(self)
                        if self.chief.done:
                            self._lost.pop(wid, None)
                if asks and self.worker_evaluation is not None:
                    self.worker_evaluation.sent(
                        self.chief.round, [w for w in action.worker_ids
                                           if w in self.peers and w in self._evaluators],
                        time.monotonic())
            elif isinstance(action, SendError):
                peer = self.peers.get(action.worker_id)
                if peer is not None:
                    log.warning("worker %s: %s", action.worker_id, action.message)
                    peer.send_error(action.code, action.message, action.fatal)
                    self.events.emit(Refused(action.code.value, action.message, action.worker_id))
                    if action.fatal:
                        self.peers.pop(action.worker_id, None)
                        self.events.emit(WorkerLeft(action.worker_id, False, action.message))
                        peer.close()
                        self._run(self.chief.leave(action.worker_id, time.monotonic()))
            elif isinstance(action, RequestInit):
                if action.worker_id in self.peers:
                    self.peers[action.worker_id].request_init()
            elif isinstance(action, SendSecure):
                if action.worker_id in self.peers:
                    self.peers[action.worker_id].send_secagg(action.message)
            elif isinstance(action, Unmask):
                # Regenerating the masks takes seconds for a large model: on the scheduler's
                # work thread, like a checkpoint write, so that the loop serves every other
                # connection meanwhile; the outcome comes back on the chief's thread.
                assert self.scheduler is not None
                self.scheduler.in_order(action.work, functools.partial(self._unmasked, action))
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

    def _unmasked(self, action: Unmask, outcome: Any) -> None:
        """A secure round's unmasking is done: its outcome goes to the state machine on the
        chief's thread (``call_soon``: a ``then`` of the blocking scheduler runs on its work
        thread)."""
        def deliver() -> None:
            if self.finished is not None and self.finished.is_set():
                return  # the run was stopped meanwhile: no round closes any more
            self._run(self.chief.secure_unmasked(action.of, outcome, time.monotonic()))

        assert self.scheduler is not None
        self.scheduler.call_soon(deliver)

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
        # Rounds that a Poisson draw of nobody closed at once come in one batch with the round
        # the chief is at now: its checkpoint covers them (same model, the latest round).
        if self.checkpoint_path and rc.round == self.chief.round:
            ckpt = ckpt_io.Checkpoint(self.chief.round, list(self.chief.global_arrays or []),
                                      _snapshot(self.chief.strategy.state_dict()),
                                      self.run_config)
        self._progress_at = time.monotonic()  # the next round's wait is timed from here
        wall = time.monotonic() - (self._t0 or time.monotonic())
        self._round_ids[rc.round] = tuple(rc.worker_ids)
        record: dict[str, Any] = {"round": rc.round, "workers": rc.workers,
                                  "num_samples": rc.num_samples, "train_loss": rc.train_loss}
        # What the strategy says of the round (differential privacy: epsilon so far).
        extra = getattr(self.chief.strategy, "round_record", None)
        if extra is not None:
            record.update(extra())
        if rc.sampled is not None:  # client sampling (chief.sampling): the round's draw
            record.update(sampled=rc.sampled, sample_rate=rc.sample_rate)
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
        if self.worker_evaluation is not None:
            # The line waits for the workers' evaluations of this round's model (bounded by
            # their timeout); the lines after it wait behind it, so the file stays in order.
            self._held.append(out)
            self._flush_held()
            return
        self._emit(out)

    def _flush_held(self, force: bool = False) -> None:
        """Write the held lines whose evaluations are in (or timed out), in round order."""
        ev = self.worker_evaluation
        if ev is None:
            return
        now = time.monotonic()
        while self._held and (force or not ev.pending(self._held[0]["round"], now)):
            out = self._held.popleft()
            summary = ev.take(out["round"])
            if summary is not None:
                out["federated_eval"] = summary
            self._emit(out)
        if self._held_timer is not None:
            self._held_timer.cancel()
            self._held_timer = None
        # The first held line's deadline: the lines after it wait behind it anyway.
        deadline = ev.deadline(self._held[0]["round"]) if self._held else None
        if deadline is not None and self.scheduler is not None:
            self._held_timer = self.scheduler.call_later(max(0.0, deadline - now) + 0.01,
                                                         self._flush_held)

    def _emit(self, out: dict[str, Any]) -> None:
        """One round's metrics line, then ``on_round`` (what fails is logged)."""
        try:
            out = self.metrics.write(out)
        except (OSError, TypeError, ValueError) as exc:
            log.error("round %d: cannot write the metrics line: %s", out["round"], exc)
        self.events.emit(RoundDone(out, self._round_ids.pop(out["round"], ())))
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
        deadline = self.chief.wake_at  # the round's deadline, or its next draw (sampling)
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
        if self._progress_timer is not None:
            self._progress_timer.cancel()
            self._progress_timer = None
        if self.finished is not None and not self.finished.is_set():
            self.finished.set()

    async def wait_finished(self) -> None:
        """On the asyncio loop: wait until the run is over, let the last rounds' lines be
        written, and tell the workers still connected that the chief has finished."""
        assert self.finished is not None and isinstance(self.scheduler, AsyncioScheduler)
        await self.finished.wait()
        await self.scheduler.drain()
        self._flush_held(force=True)  # the run is over: no answer is coming any more
        self._close_peers()
        self._raise_failure()

    def shutdown(self) -> None:
        """With a ``BlockingScheduler``, once the run is over: write the last rounds' lines
        (waiting for their evaluation) and close the peers left."""
        assert isinstance(self.scheduler, BlockingScheduler)
        self.scheduler.drain()
        self._flush_held(force=True)
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


def _names(ids: list[str]) -> str:
    """Worker ids for a log line: the first few, then how many more."""
    shown = ", ".join(ids[:_MAX_NAMED])
    return shown if len(ids) <= _MAX_NAMED else f"{shown} and {len(ids) - _MAX_NAMED} more"
def _joined(peer: Peer, round_: int) -> WorkerJoined:
    """The event for observers: where a peer is (a TCP connection's IP address, else "local")
    and what it says it runs, which only a TCP connection knows (HELLO's agent)."""
    return WorkerJoined(peer.worker_id, str(getattr(peer, "peer_ip", "local")), round_,
                        str(getattr(peer, "agent", "")))


def _snapshot(state: StrategyState) -> StrategyState:
    """The strategy's state as of now: FedAvgM and FedAdam update theirs in place each round,
    and a checkpoint written off the chief's thread must not see the next round's."""
    return StrategyState(state.name, state.params,
                         {k: np.array(v, copy=True) for k, v in state.arrays.items()})
