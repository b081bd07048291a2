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
import uuid
from collections.abc import Sequence
from typing import Any

import numpy as np

from fedberry.certs import client_cert_name
from fedberry.chief.state import non_finite
from fedberry.codecs import UPLINK_CODECS, check_name
from fedberry.protocol.messages import check_tensor_names
from fedberry.protocol.spec import ProtocolError
from fedberry.transports.connect import InProcessChief, connect
from fedberry.transports.loop import LoopThread

log = logging.getLogger("fedberry.worker")


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
    """

    def __init__(self, chief: str | InProcessChief = "tcp://127.0.0.1:7777", *,
                 token: str | None = None, token_file: str | None = None,
                 worker_id: str | None = None,
                 ca: str | None = None, cert: str | None = None, key: str | None = None,
                 server_hostname: str | None = None, connect_timeout: float = 60.0,
                 reconnect_timeout: float = 300.0, heartbeat: float = 5.0,
                 idle_timeout: float = 60.0, handshake_timeout: float = 30.0,
                 codec: str = "none") -> None:
        self.worker_id = worker_id or default_worker_id(cert)
        self.round = 0
        self.done = False
        self.joined = False
        self._io: LoopThread | None = None
        check_name(codec, UPLINK_CODECS, "update")
        self._session = connect(chief, worker_id=self.worker_id, token=token,
                                token_file=token_file, ca=ca, cert=cert, key=key,
                                server_hostname=server_hostname, connect_timeout=connect_timeout,
                                reconnect_timeout=reconnect_timeout, heartbeat=heartbeat,
                                idle_timeout=idle_timeout, handshake_timeout=handshake_timeout,
                                codec=codec)

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
        self.round, out, self.done = self._call(
            self._session.sync(self.round, arrays, float(num_samples), metrics))
        return out

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


def _check_arrays(arrays: Sequence[np.ndarray]) -> list[np.ndarray]:
    out = [np.asarray(a) for a in arrays]
    if not out:
        raise ValueError("a model needs at least one array")
    return out
