"""Rank 0's chief under MPI: the chief runtime TCP uses, with the collective as its transport.

The training ranks are ONE peer of the runtime (``chief.runtime.ChiefServer``, built by
``chief.build.build_chief_server``). Each round its update is the Allreduce's weighted mean with
the total weight: one update that stands for all of them, exact for the rules that act on the
mean (FedAvg, FedAvgM, FedAdam). Metrics, evaluation, checkpoints, ``--resume`` with its check that
the checkpoint fits, and the ``on_round`` policy are therefore the TCP chief's. The runtime waits
through a ``BlockingScheduler``: rank 0's thread is in the collectives, and runs what is due
between them; evaluation and the metrics line overlap the next round.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import numpy as np

from fedberry.chief.admission import AdmissionPolicy
from fedberry.chief.build import OutputOptions, RoundPolicy, build_chief_server
from fedberry.chief.model_file import DEFAULT_SAVE_EVERY
from fedberry.chief.runtime import ChiefServer, Evaluate
from fedberry.chief.scheduler import BlockingScheduler
from fedberry.errors import FederationError
from fedberry.privacy import DPConfig, DPFedAvg, as_config
from fedberry.privacy.chief import dp_chief
from fedberry.protocol.frames import ErrorCode, spec_of
from fedberry.strategies import FedAvg, Strategy, make_strategy
from fedberry.transports.mpi_buffers import T_LOSS_SUM, T_LOSS_WEIGHT, T_UPDATES, T_WEIGHT
from fedberry.transports.mpi_guard import guard

log = logging.getLogger("fedberry.mpi")

RANKS_FILE = "mpi_ranks.json"


@dataclass
class MpiChiefOptions:
    """What rank 0 needs to act as the chief. Other ranks ignore it."""

    rounds: int | None = None  # None: until every training rank has called close()
    strategy: str | Strategy = "fedavg"
    evaluate: Evaluate | None = None  # run on a thread after each round, like the TCP chief's
    out_dir: str | None = None  # metrics.jsonl and mpi_ranks.json go here
    checkpoint: str | None = None
    resume: bool = False
    initial: Sequence[np.ndarray] | None = None  # None: adopt the lowest rank's model
    run_config: dict[str, Any] = field(default_factory=dict)
    on_round: Callable[[dict[str, Any]], None] | None = None
    workers: int | None = None  # expected training ranks; a mismatch is logged
    # A checkpoint that cannot be written: "stop" aborts the job with the sentence, "warn" goes
    # on (OutputOptions.on_checkpoint_error, the TCP chief's policy).
    on_checkpoint_error: str = "stop"
    # Which updates are admitted (sample bound, update norm): the TCP chief's policy.
    admission: AdmissionPolicy | None = None
    # Differential privacy (docs/privacy.md): every training rank clips to C and weighs 1.
    dp: DPConfig | str | None = None
    # Rounds between the model files written to out/model.safetensors (0: only at the end).
    save_every: int = DEFAULT_SAVE_EVERY
    # Called once with the runtime, before the ranks attach: what watches its events (the
    # status server, which lives above the transports) subscribes here.
    on_server: Callable[[ChiefServer], None] | None = None

    @classmethod
    def from_address(cls, address: str) -> MpiChiefOptions:
        """``mpi://?rounds=50&out=runs/x&strategy=fedavgm&checkpoint=ck.npz`` (all optional;
        also ``on_checkpoint_error=warn``, ``dp=clip=1.0,noise=1.1,delta=1e-5`` and
        ``save_every=N``)."""
        q = query(address)
        rounds = q.get("rounds")
        return cls(rounds=int(rounds) if rounds else None, strategy=q.get("strategy", "fedavg"),
                   out_dir=q.get("out"), checkpoint=q.get("checkpoint"),
                   resume=q.get("resume", "") in ("1", "true", "yes"),
                   on_checkpoint_error=q.get("on_checkpoint_error", "stop"),
                   dp=q.get("dp") or None,
                   save_every=int(q["save_every"]) if q.get("save_every") else
                   DEFAULT_SAVE_EVERY)


_configured: MpiChiefOptions | None = None


def configure_chief(**options: Any) -> None:
    """Set rank 0's chief options (evaluation, rounds, ...) before ``Worker(chief="mpi://")``.

    For a script where rank 0 trains too; the address's query string covers the simple cases.
    """
    global _configured
    _configured = MpiChiefOptions(**options)


# What an mpi:// address may carry: the chief's options (MpiChiefOptions.from_address) and the
# session's collective timeout (MpiSession). A typo (``?round=3``) must not pass silently: it
# once ran 1,691 rounds instead of 3.
ADDRESS_KEYS = ("checkpoint", "dp", "on_checkpoint_error", "out", "resume", "rounds",
                "save_every", "strategy", "timeout")


# Secure aggregation is for a chief that must not see single updates; MPI ranks are one job on
# a cluster its operator runs, and their Allreduce has no dropouts to survive.
MPI_SECAGG_REFUSED = ("secure aggregation is not offered under MPI: the ranks of one mpiexec "
                      "job are a trusted cluster (rank 0 sums their updates in an Allreduce, "
                      "which has no dropouts to survive); use a tcp:// chief for it")


def query(address: str) -> dict[str, str]:
    """The options in an ``mpi://?key=value&...`` address; an unknown key is a ValueError that
    lists the known ones."""
    parts = urlsplit(address)
    if parts.scheme != "mpi":
        raise ValueError(f"not an MPI address: {address!r}")
    q = {k: v[-1] for k, v in parse_qs(parts.query, keep_blank_values=True).items()}
    if "secagg" in q:
        raise ValueError(MPI_SECAGG_REFUSED)
    unknown = sorted(set(q) - set(ADDRESS_KEYS))
    if unknown:
        raise ValueError(f"unknown option{'s' if len(unknown) > 1 else ''} "
                         f"{', '.join(unknown)} in {address!r}: an mpi:// address takes "
                         f"{', '.join(ADDRESS_KEYS)}")
    return q


def configured() -> MpiChiefOptions | None:
    """What ``configure_chief`` set, if it was called."""
    return _configured


class _CollectivePeer:
    """The training ranks as one peer of the chief runtime. What it sends them travels in the
    collectives (``MpiSession._round``): the model in the Allreduce's sum (FedAvg) or in rank 0's
    Bcast; a refusal stops the job, since no rank can be left out of a collective."""

    worker_id = "mpi"

    def __init__(self) -> None:
        self.refused: str | None = None

    def send_global(self, server: ChiefServer) -> None:
        pass

    def send_error(self, code: ErrorCode, message: str, fatal: bool) -> None:
        if fatal:
            self.refused = message
        else:
            log.warning("the chief: %s", message)

    def request_init(self) -> None:
        pass  # answered at once by MpiSession.join, which has the model to start from

    def close(self) -> None:
        pass


class RankZeroChief:
    """Rank 0's chief: the runtime TCP uses, fed one update per round (the collective's)."""

    def __init__(self, opts: MpiChiefOptions, session: Any) -> None:
        self.session = session
        strategy = make_strategy(opts.strategy)
        dp = as_config(opts.dp)
        rounds, admission = opts.rounds, opts.admission
        if dp is not None:
            if dp.where == "chief" or dp.adaptive:
                raise ValueError("dp: under MPI the chief sees only the ranks' combined mean, "
                                 "so it cannot clip each rank's update: use where=worker "
                                 "(every rank clips), without adaptive clipping")
            strategy, admission, rounds = dp_chief(dp, strategy, admission, rounds)
        # The bound every training rank clips to (MpiSession.join broadcasts it), or None.
        self.dp_clip = strategy.clip if isinstance(strategy, DPFedAvg) else None
        if getattr(strategy, "needs_all_updates", False):
            raise ValueError(f"the {strategy.name} strategy needs every update, but MPI rounds "
                             "sum them in one collective; use it over TCP")
        # Plain FedAvg has no state: every rank can finish the average itself.
        self.local_mean = type(strategy) is FedAvg
        self.scheduler = BlockingScheduler()
        # One peer (the collective) and lockstep rounds: it is the whole federation.
        self.server = build_chief_server(
            RoundPolicy(workers=1, rounds=rounds),
            OutputOptions(opts.out_dir, opts.checkpoint, opts.resume, dict(opts.run_config),
                          on_checkpoint_error=opts.on_checkpoint_error,
                          save_every=opts.save_every),
            strategy=strategy, initial=opts.initial, evaluate=opts.evaluate,
            on_round=opts.on_round, scheduler=self.scheduler, admission=admission)
        self.chief = self.server.chief
        self.expected = opts.workers
        self.peer = _CollectivePeer()
        if opts.on_server is not None:
            opts.on_server(self.server)

    @property
    def initial(self) -> list[np.ndarray] | None:
        """The model every rank starts from, when the chief has one (its own, a checkpoint's)."""
        return self.chief.global_arrays

    def start(self, infos: list[dict[str, Any]], root: int, trainers: int,
              model: list[np.ndarray]) -> None:
        if self.expected is not None and self.expected != trainers:
            log.warning("expected %d workers, but mpiexec started %d training ranks: the run "
                        "goes on with %d", self.expected, trainers, trainers)
        table = [{"rank": r, "pid": i["pid"], "host": i["host"], "trains": i["trains"]}
                 for r, i in enumerate(infos)]
        log.info("MPI federation of %d ranks (%d training), model from rank %d: %s",
                 len(infos), trainers, root,
                 ", ".join(f"rank {t['rank']} = pid {t['pid']} on {t['host']}" for t in table))
        if self.server.out_dir:
            # Read by launchers to name the rank behind a PID that mpiexec says died.
            path = Path(self.server.out_dir) / RANKS_FILE
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(path.name + ".tmp")
            tmp.write_text(json.dumps(table))
            os.replace(tmp, path)  # a launcher polling for it never reads half a file
        if isinstance(self.server.chief.strategy, DPFedAvg):
            # n_fixed: the training ranks, public from join on (a rank that leaves adds 0).
            self.server.chief.strategy.expected = trainers
        self._count_bytes(0)
        needs_init = self.chief.global_arrays is None
        names = next((i["names"] for i in infos if i.get("names")), None)
        self.server.attach(self.peer, spec_of(model), True, names=names)
        if needs_init:
            self.server.on_init(self.peer, [a.copy() for a in model])
        self._after()

    def is_last_round(self) -> bool:
        rounds = self.chief.config.rounds
        return rounds is not None and self.chief.round + 1 >= rounds

    def close_round(self, total: np.ndarray, done: bool,
                    mean: list[np.ndarray] | None) -> np.ndarray | None:
        """After the Allreduce: ``total`` is the weighted sum with its trailer, ``mean`` (FedAvg)
        the new model every rank has computed, given to the runtime as it is. Otherwise the
        runtime's strategy makes the model, and the returned buffer is what rank 0 broadcasts."""
        layout = self.session.layout
        assert layout is not None
        trailer = total[layout.elements:]
        updates = int(round(float(trailer[T_UPDATES])))
        if updates > 0:
            weight = float(trailer[T_WEIGHT])
            if mean is None:
                mean = layout.means(total, weight)
            loss_w = float(trailer[T_LOSS_WEIGHT])
            metrics = {"loss": float(trailer[T_LOSS_SUM]) / loss_w} if loss_w else {}
            # The Bcast below goes out right after: its bytes count for this round.
            self._count_bytes(0 if self.local_mean else layout.bcast_bytes)
            self.server.on_collective_update(self.peer, self.chief.round, weight, mean, metrics,
                                             updates)
        if done:
            if self.chief.config.rounds is None or self.chief.round < self.chief.config.rounds:
                log.info("every training rank has left: the run is done")
            self.server.detach(self.peer)
        self._after()
        if self.local_mean:
            return None
        return layout.pack_model(self.chief.global_arrays or [], self.chief.round, done)

    def _count_bytes(self, bcast_bytes: int) -> None:
        """The runtime's byte counters from the session's (a star model, as TCP's sockets)."""
        s = self.session
        self.server.bytes_up = s.bytes_received
        self.server.bytes_down = s.bytes_sent + (s.size - 1) * bcast_bytes

    def _after(self) -> None:
        self.scheduler.run_ready()
        # The checkpoint is written on the scheduler's thread: a failure of round r's write is
        # seen here after a later collective, or at the end in drain(). No rank can be left out
        # of a collective, so "stop" aborts the whole job, with the runtime's sentence.
        if self.server.failure is not None:
            guard.abort(self.server.failure)
        if self.peer.refused is not None:
            guard.abort(f"refused the round: {self.peer.refused}")

    def drain(self) -> None:
        try:
            self.server.shutdown()
        except FederationError as exc:  # the run stopped (a checkpoint that was not written)
            guard.abort(str(exc))


