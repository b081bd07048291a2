"""The worker API: ``Worker(chief=...).sync(arrays, num_samples) -> arrays``.

The chief address picks the transport (``transports.connect``): ``tcp://host:port`` (asyncio
sockets, TLS optional), ``mpi://`` (under mpiexec), or an in-process ``ChiefHandle`` (the chief
trains too). A TCP worker keeps one connection for the whole run on a background event-loop
thread, so heartbeats and reconnects go on while the user's code trains.
"""

from __future__ import annotations

import asyncio
import logging
import math
import os
import socket
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

from fedberry.certs import client_cert_name
from fedberry.chief.state import non_finite
from fedberry.codecs import UPLINK_CODECS, check_name
from fedberry.privacy import DPConfig, LocalPrivacy, as_config
from fedberry.protocol.limits import MAX_METRIC_NAME, MAX_METRICS
from fedberry.protocol.messages import EvalResult, check_tensor_names
from fedberry.protocol.spec import ProtocolError
from fedberry.transports.connect import InProcessChief, connect
from fedberry.transports.loop import LoopThread

log = logging.getLogger("fedberry.worker")

# ``evaluate(global_arrays) -> (num_examples, {"accuracy": .., "loss": ..})`` on held-out data.
Evaluate = Callable[[list[np.ndarray]], "tuple[float, Mapping[str, float]]"]


def default_worker_id(cert: str | None = None) -> str:
    """The name in ``cert`` when there is one (a chief that requires client certificates admits
    no other id), else a fresh host-pid-random name."""
    if cert:
        name = client_cert_name(cert)
        if name:
            return name
        log.warning("cannot read a name from %s; the chief will refuse a random worker id if it "
                    "requires client certificates: pass worker_id (--worker-id)", cert)
    return f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"


class Worker:
    """One participant of a federation.

    ``join(arrays)`` offers the local initial model and returns the federation's (the chief's
    model, or the first worker's when the chief started without one): train from what it returns.
    ``sync(arrays, num_samples)`` sends this worker's weights after local training and returns the
    new global model; ``done`` turns True once the chief has run all its rounds.

    ``codec`` is how updates travel over TCP (``codecs.py``): ``none``, ``fp16`` (half the bytes)
    or ``q8`` (the change since the global model in 8 bits, a quarter, with error feedback).
    In-process workers send no bytes and MPI sums float32 in place: there it changes nothing.

    ``handshake_timeout`` bounds each attempt's wait for the chief's CHALLENGE and WELCOME (a
    listener that accepts and falls silent is retried, then ``join`` raises ChiefUnreachable
    once ``connect_timeout`` is spent); ``idle_timeout`` bounds any silence after WELCOME.

    ``worker_id`` names this worker to the chief. By default it is the name in ``cert`` (a chief
    that requires client certificates admits no other), else a fresh host-pid-random name.

    Differential privacy (docs/privacy.md): a chief run with ``--dp`` (``where=worker``)
    announces its clipping bound C at join, and this worker then clips each update's change
    from the global model to C before it is encoded. ``local_dp`` (a ``DPConfig`` or ``--dp``
    text: clip, noise, delta) adds this worker's own Gaussian noise to its clipped update, for
    a chief it does not trust; ``epsilon`` is then this worker's own budget spent so far.
    Under local DP the worker sends weight 1, no metrics and no evaluation answers (they are
    not noised).

    ``round_config`` is the configuration the chief sent with the model that ``join`` or
    ``sync`` returned last (``serve(round_config=...)``, ``--round-config``): a dict of scalars,
    e.g. ``{"lr": 0.05}``, empty when the chief sends none (and under MPI). Read it after each
    call and train the round with it.

    ``evaluate(global_arrays) -> (num_examples, metrics)`` offers an evaluation on this
    worker's own held-out data: when the chief asks (``--evaluate-every``), ``join``/``sync``
    call it on the model they return, before returning, and send what it says (at most 32
    finite numbers; others are dropped with a warning). The chief averages every key weighted
    by ``num_examples`` (docs/fleet.md). What it raises is logged and nothing is sent: the
    chief waits for the answer no longer than its timeout.

    Secure aggregation needs nothing here: a chief that aggregates securely says so when the
    worker joins, and ``sync`` then sends the update masked (docs/secure-aggregation.md).
    ``require_secure_aggregation=True`` refuses to join a chief that does not (TCP only).
    """

    def __init__(self, chief: str | InProcessChief = "tcp://127.0.0.1:7777", *,
                 token: str | None = None, token_file: str | None = None,
                 worker_id: str | None = None,
                 ca: str | None = None, cert: str | None = None, key: str | None = None,
                 server_hostname: str | None = None, connect_timeout: float = 60.0,
                 reconnect_timeout: float = 300.0, heartbeat: float = 5.0,
                 idle_timeout: float = 60.0, handshake_timeout: float = 30.0,
                 codec: str = "none", local_dp: DPConfig | str | None = None,
                 evaluate: Evaluate | None = None,
                 require_secure_aggregation: bool = False) -> None:
        self.worker_id = worker_id or default_worker_id(cert)
        self._chief_name = chief if isinstance(chief, str) else "the chief in this process"
        self.round = 0
        self.done = False
        self.joined = False
        self.round_config: dict[str, Any] = {}
        self._io: LoopThread | None = None
        self._privacy = LocalPrivacy(as_config(local_dp))
        self._said_quiet = False
        self._global: list[np.ndarray] | None = None  # the model updates are clipped against
        check_name(codec, UPLINK_CODECS, "update")
        if require_secure_aggregation and not (isinstance(chief, str)
                                               and not chief.startswith("mpi:")):
            raise ValueError("require_secure_aggregation: secure aggregation runs over TCP "
                             "only; this chief (MPI, or in this process) cannot offer it")
        self._session = connect(chief, worker_id=self.worker_id, token=token,
                                token_file=token_file, ca=ca, cert=cert, key=key,
                                server_hostname=server_hostname, connect_timeout=connect_timeout,
                                reconnect_timeout=reconnect_timeout, heartbeat=heartbeat,
                                idle_timeout=idle_timeout, handshake_timeout=handshake_timeout,
                                codec=codec)
        if require_secure_aggregation:
            self._session.require_secure = True
        self.evaluate = evaluate
        if evaluate is not None and self._privacy.local is not None:
            self._quiet_once()  # not offered in AUTH either: the chief does not wait for it
        elif evaluate is not None:
            if not hasattr(self._session, "send_eval"):
                log.warning("worker %s: this transport does not carry evaluations (MPI); "
                            "evaluate is never called", self.worker_id)
            self._session.evaluates = True  # its AUTH says so: the chief then asks

    # -- the API -----------------------------------------------------------------------------
    def join(self, arrays: Sequence[np.ndarray],
             names: Sequence[str] | None = None) -> list[np.ndarray]:
        """Offer ``arrays`` (the local initial model) and return the federation's model.

        ``names``: optionally the tensors' names (torch ``state_dict`` keys, Keras weight
        paths), which name the tensors of the chief's model file (``OUT/model.safetensors``);
        names that cannot be used (not one distinct printable name per array) are left out,
        with a warning.
        """
        arrays = _check_arrays(arrays)
        names = _usable_names(names, len(arrays))
        call = (self._session.join(arrays, names=names) if names is not None
                else self._session.join(arrays))  # a session of another transport may not
        self.round, out, self.done = self._call(call)
        self.joined = True
        self._privacy.chief_clip = getattr(self._session, "dp_clip", None)
        self._keep_global(out)
        self._took(out)
        log.info("worker %s joined %s at round %d (model: %d tensors, %s)", self.worker_id,
                 self._chief_name, self.round + 1, len(out), _size(sum(a.nbytes for a in out)))
        if self.done:
            log.info("worker %s: the federation has already finished; this is its final model",
                     self.worker_id)
        return out

    def sync(self, arrays: Sequence[np.ndarray], num_samples: float,
             metrics: dict[str, float] | None = None, *,
             names: Sequence[str] | None = None) -> list[np.ndarray]:
        """Send this worker's weights after local training; return the new global model.

        Joins first if ``join`` was not called (with ``names``, as ``join`` takes them).
        """
        arrays = _check_arrays(arrays)
        if not self.joined:
            self.join(arrays, names)
        if self.done:
            log.info("the federation has finished; sync() returns the final model unchanged")
            return list(arrays)
        if not (isinstance(num_samples, (int, float)) and num_samples > 0
                and math.isfinite(num_samples)):
            raise ValueError(f"num_samples must be a positive number, got {num_samples!r}")
        bad = non_finite(arrays)
        if bad:
            raise ValueError(f"refusing to send an update with non-finite weights: {bad}")
        metrics = {k: float(v) for k, v in (metrics or {}).items() if math.isfinite(float(v))}
        if self._privacy.active:  # before the transport (and its codec) sees the update
            arrays = self._privacy.apply(arrays, self._global)
        if self._privacy.local is not None:
            # Local DP noises the update only: the sample count and the metrics (train loss)
            # are this worker's data in the clear, so they are not sent at all.
            self._quiet_once()
            num_samples, metrics = 1.0, {}
        sent, received, t0 = self.bytes_sent, self.bytes_received, time.monotonic()
        round_ = self.round + 1
        self.round, out, self.done = self._call(
            self._session.sync(self.round, arrays, float(num_samples), metrics))
        self._keep_global(out)
        self._took(out)
        log.info("worker %s: round %d done in %.1f s (sent %s, received %s)%s", self.worker_id,
                 round_, time.monotonic() - t0, _size(self.bytes_sent - sent),
                 _size(self.bytes_received - received),
                 f"; the federation has finished after round {self.round}" if self.done else "")
        return out

    @property
    def epsilon(self) -> float:
        """This worker's own epsilon under ``local_dp`` so far (inf without local noise)."""
        return self._privacy.epsilon

    @property
    def clip(self) -> float | None:
        """The bound this worker clips its updates to (the chief's C, or local DP's), if any."""
        return self._privacy.clip

    def _quiet_once(self) -> None:
        if not self._said_quiet:
            self._said_quiet = True
            log.info("worker %s: under local DP it sends weight 1, no metrics and no evaluation "
                     "answers: those are not noised and would tell the chief about its data",
                     self.worker_id)

    def _keep_global(self, arrays: Sequence[np.ndarray]) -> None:
        # A copy: the caller may train in the very arrays it got back.
        if self._privacy.active:
            self._global = [np.array(a) for a in arrays]

    def close(self) -> None:
        try:
            self._call(self._session.close())
        except Exception as exc:  # leaving must not raise over a dead chief
            log.debug("close: %s", exc)
        if self._io is not None:
            self._io.stop()
            self._io = None

    def __enter__(self) -> Worker:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def bytes_sent(self) -> int:
        return getattr(self._session, "bytes_sent", 0)

    @property
    def bytes_received(self) -> int:
        return getattr(self._session, "bytes_received", 0)

    @property
    def session(self) -> Any:
        return self._session

    # -- plumbing ----------------------------------------------------------------------------
    def _took(self, arrays: list[np.ndarray]) -> None:
        """After a model came in: what came with it, and the evaluation it asks for."""
        self.round_config = dict(getattr(self._session, "round_config", None) or {})
        asked = getattr(self._session, "eval_requested", None)
        if self.evaluate is None or asked != self.round or not hasattr(self._session,
                                                                       "send_eval"):
            return
        if self._privacy.local is not None:  # its held-out results are not noised: not sent
            self._quiet_once()
            return
        try:
            n, metrics = self.evaluate([np.array(a) for a in arrays])  # its own copies
            result = EvalResult(self.round, n, _clean_eval_metrics(metrics))
        except ProtocolError as exc:
            log.error("worker %s: evaluation of round %d not sent: %s", self.worker_id,
                      self.round, exc.message)
            return
        except Exception:
            log.exception("worker %s: evaluate failed on the model of round %d; nothing is "
                          "sent", self.worker_id, self.round)
            return
        self._call(self._session.send_eval(result))

    def _call(self, coro_or_value: Any) -> Any:
        if asyncio.iscoroutine(coro_or_value):
            if self._io is None:
                self._io = LoopThread(f"fedberry-{self.worker_id}")
            return self._io.run(coro_or_value)
        return coro_or_value


def _usable_names(names: Sequence[str] | None, count: int) -> tuple[str, ...] | None:
    """``names`` if the protocol accepts them for ``count`` tensors; else None, said once (they
    only name the chief's model file: not worth refusing the join for)."""
    if names is None:
        return None
    try:
        return check_tensor_names(list(names), count)
    except ProtocolError as exc:
        log.warning("the tensor names are not sent (the chief's model file names its tensors "
                    "global.0, global.1, ...): %s", exc.message)
        return None


def _size(nbytes: int) -> str:
    for unit, scale in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if nbytes >= scale:
            return f"{nbytes / scale:.1f} {unit}"
    return f"{nbytes} B"


def _clean_eval_metrics(metrics: Mapping[str, Any]) -> dict[str, float]:
    """What ``evaluate`` returned, as the protocol takes it: finite numbers (numpy scalars and
    one-element tensors too) under short names, at most MAX_METRICS; the rest dropped, said."""
    out: dict[str, float] = {}
    dropped: list[str] = []
    for k, v in dict(metrics).items():
        try:
            f = float(v)
        except (TypeError, ValueError, OverflowError):
            f = math.nan
        if (isinstance(k, str) and 0 < len(k) <= MAX_METRIC_NAME and math.isfinite(f)
                and len(out) < MAX_METRICS and not isinstance(v, (str, bytes))):
            out[k] = f
        else:
            dropped.append(str(k))
    if dropped:
        log.warning("evaluation metrics dropped (not finite numbers under names of at most "
                    "%d characters, or past %d of them): %s", MAX_METRIC_NAME, MAX_METRICS,
                    ", ".join(dropped[:10]))
    return out


def _check_arrays(arrays: Sequence[np.ndarray]) -> list[np.ndarray]:
    out = [np.asarray(a) for a in arrays]
    if not out:
        raise ValueError("a model needs at least one array")
    return out
