"""The worker API: ``Worker(chief=...).sync(arrays, num_samples) -> arrays``.

The chief address picks the transport: ``tcp://host:port`` (asyncio sockets, TLS optional),
``mpi://`` (under mpiexec), or an in-process ``ChiefHandle`` (the chief trains too). A TCP worker
keeps one connection for the whole run on a background event-loop thread, so heartbeats and
reconnects go on while the user's code trains.
"""

from __future__ import annotations

import asyncio
import logging
import math
import os
import socket
import threading
import uuid
from collections.abc import Sequence
from typing import Any

import numpy as np

from fedberry.chief.state import non_finite
from fedberry.errors import FederationError
from fedberry.protocol.auth import resolve_token

log = logging.getLogger("fedberry.worker")


class LoopThread:
    """An asyncio event loop on a daemon thread; ``run(coro)`` blocks the caller until done."""

    def __init__(self, name: str = "fedberry-io") -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name=name, daemon=True)
        self._thread.start()

    def run(self, coro: Any, timeout: float | None = None) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def stop(self) -> None:
        if self.loop.is_running():
            self.loop.call_soon_threadsafe(self.loop.stop)
            self._thread.join(5)
        if not self.loop.is_running():
            self.loop.close()


def default_worker_id(cert: str | None = None) -> str:
    """The name in ``cert`` when there is one (a chief that requires client certificates admits
    no other id), else a fresh host-pid-random name."""
    if cert:
        from fedberry.certs import client_cert_name

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

    ``worker_id`` names this worker to the chief. By default it is the name in ``cert`` (a chief
    that requires client certificates admits no other), else a fresh host-pid-random name.
    """

    def __init__(self, chief: Any = "tcp://127.0.0.1:7777", *, token: str | None = None,
                 token_file: str | None = None, worker_id: str | None = None,
                 ca: str | None = None, cert: str | None = None, key: str | None = None,
                 server_hostname: str | None = None, connect_timeout: float = 60.0,
                 reconnect_timeout: float = 300.0, heartbeat: float = 5.0,
                 idle_timeout: float = 60.0, codec: str = "none") -> None:
        self.worker_id = worker_id or default_worker_id(cert)
        self.round = 0
        self.done = False
        self.joined = False
        self._io: LoopThread | None = None
        self._session = _make_session(chief, self, token=token, token_file=token_file, ca=ca,
                                      cert=cert, key=key, server_hostname=server_hostname,
                                      connect_timeout=connect_timeout,
                                      reconnect_timeout=reconnect_timeout, heartbeat=heartbeat,
                                      idle_timeout=idle_timeout, codec=codec)

    # -- the API -----------------------------------------------------------------------------
    def join(self, arrays: Sequence[np.ndarray]) -> list[np.ndarray]:
        arrays = _check_arrays(arrays)
        self.round, out, self.done = self._call(self._session.join(arrays))
        self.joined = True
        return out

    def sync(self, arrays: Sequence[np.ndarray], num_samples: float,
             metrics: dict[str, float] | None = None) -> list[np.ndarray]:
        arrays = _check_arrays(arrays)
        if not self.joined:
            self.join(arrays)
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


def _check_arrays(arrays: Sequence[np.ndarray]) -> list[np.ndarray]:
    out = [np.asarray(a) for a in arrays]
    if not out:
        raise ValueError("a model needs at least one array")
    return out


def _make_session(chief: Any, worker: Worker, **kw: Any) -> Any:
    from fedberry.codecs import UPLINK_CODECS, check_name
    from fedberry.serve import ChiefHandle

    check_name(kw["codec"], UPLINK_CODECS, "update")
    if isinstance(chief, ChiefHandle):
        from fedberry.transports.local import LocalSession

        return LocalSession(chief, worker.worker_id)
    if not isinstance(chief, str):
        raise TypeError("chief must be an address like 'tcp://host:port' or 'mpi://', "
                        "or a ChiefHandle from fedberry.serve()")
    if chief.startswith("mpi://"):
        from fedberry.transports.mpi import MpiSession

        return MpiSession(chief)  # the query string may carry options
    if chief.startswith("tcp://") or "://" not in chief:
        from fedberry.transports.tcp import TcpSession, is_loopback, parse_address

        host, port = parse_address(chief)
        ctx = None
        if kw["ca"]:
            from fedberry.certs import client_context

            ctx = client_context(kw["ca"], kw["cert"], kw["key"])
        elif not is_loopback(host):
            log.warning("connecting to %s without TLS (no --ca): the traffic can be read", host)
        return TcpSession(host, port, token=resolve_token(kw["token"], kw["token_file"]),
                          worker_id=worker.worker_id, ssl_context=ctx,
                          server_hostname=kw["server_hostname"] or host,
                          connect_timeout=kw["connect_timeout"],
                          reconnect_timeout=kw["reconnect_timeout"], heartbeat=kw["heartbeat"],
                          idle_timeout=kw["idle_timeout"], codec=kw["codec"])
    raise FederationError(f"unknown chief address {chief!r}: use tcp://host:port or mpi://")
