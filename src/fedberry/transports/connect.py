"""``connect(chief, worker_id=..., **options) -> session``: the address picks the transport.

``tcp://host:port`` (or a bare ``host:port``) dials the TCP chief, ``mpi://`` joins the MPI job
this process is a rank of, and an in-process chief (what ``fedberry.serve()`` returns) hands out
a local session through its ``local_session`` method. ``fedberry.Worker`` calls this and so
depends on neither ``serve`` nor any concrete transport; another scheme plugs in with
``register``.

A session has ``join(arrays, names=None)`` (``names``: the tensors' names, optional),
``sync(round, arrays, num_samples, metrics)`` and ``close()``,
each returning ``(round, global arrays, done)`` (``close``: nothing) or a coroutine of it that the
caller runs on its event-loop thread (``transports.loop``), and counts ``bytes_sent`` and
``bytes_received``.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import Any, Protocol, runtime_checkable

import numpy as np

from fedberry.certs import client_context
from fedberry.errors import FederationError
from fedberry.protocol.auth import resolve_token
from fedberry.transports.tcp import TcpSession, is_loopback, parse_address

log = logging.getLogger("fedberry.worker")

Result = tuple[int, list[np.ndarray], bool]


class Session(Protocol):
    """One worker's link to its chief (see the module docstring for the return values)."""

    bytes_sent: int
    bytes_received: int

    def join(self, arrays: Sequence[np.ndarray], names: Sequence[str] | None = None) -> Any: ...

    def sync(self, round_: int, arrays: Sequence[np.ndarray], num_samples: float,
             metrics: dict[str, Any]) -> Any: ...

    def close(self) -> Any: ...


@runtime_checkable
class InProcessChief(Protocol):
    """A chief running in this process (``fedberry.serve()``'s ``ChiefHandle``)."""

    def local_session(self, worker_id: str) -> Session: ...


# dial(address, worker_id=..., **options) -> Session; options are Worker's keyword arguments,
# each dialer takes those it understands.
Dialer = Callable[..., Session]
_DIALERS: dict[str, Dialer] = {}


def register(scheme: str, dial: Dialer) -> None:
    """Make ``scheme://...`` addresses dial with ``dial`` (replacing any dialer it had)."""
    if not scheme.isidentifier():
        raise ValueError(f"a scheme is a word like 'tcp', got {scheme!r}")
    _DIALERS[scheme] = dial


def schemes() -> list[str]:
    """The address schemes ``connect`` knows, sorted."""
    return sorted(_DIALERS)


def connect(chief: str | InProcessChief, *, worker_id: str, **options: Any) -> Session:
    """A session with ``chief``: an address (``tcp://host:port``, ``host:port``, ``mpi://``)
    or an in-process chief. ``options`` are ``fedberry.Worker``'s transport keyword arguments
    (token, TLS files, timeouts, codec); a transport ignores those it has no use for."""
    if isinstance(chief, InProcessChief):
        return chief.local_session(worker_id)
    if not isinstance(chief, str):
        raise TypeError("chief must be an address like 'tcp://host:port' or 'mpi://', or the "
                        f"handle fedberry.serve() returns, not {type(chief).__name__}")
    scheme = chief.split("://", 1)[0] if "://" in chief else "tcp"
    dial = _DIALERS.get(scheme)
    if dial is None:
        raise FederationError(f"unknown chief address {chief!r}: use "
                              f"{' or '.join(s + '://' for s in schemes())}")
    return dial(chief, worker_id=worker_id, **options)


def _dial_tcp(address: str, *, worker_id: str, token: str | None = None,
              token_file: str | None = None, ca: str | None = None, cert: str | None = None,
              key: str | None = None, server_hostname: str | None = None,
              connect_timeout: float = 60.0, reconnect_timeout: float = 300.0,
              heartbeat: float = 5.0, idle_timeout: float = 60.0,
              handshake_timeout: float = 30.0, codec: str = "none",
              **_other: Any) -> Session:
    host, port = parse_address(address)
    ctx = None
    if ca:
        ctx = client_context(ca, cert, key)
    elif not is_loopback(host):
        log.warning("connecting to %s without TLS (no --ca): the traffic can be read", host)
    return TcpSession(host, port, token=resolve_token(token, token_file), worker_id=worker_id,
                      ssl_context=ctx, server_hostname=server_hostname or host,
                      connect_timeout=connect_timeout, reconnect_timeout=reconnect_timeout,
                      heartbeat=heartbeat, idle_timeout=idle_timeout,
                      handshake_timeout=handshake_timeout, codec=codec)


def _dial_mpi(address: str, *, worker_id: str, **_options: Any) -> Session:
    # Imported on use: only mpiexec jobs need the MPI transport, and it loads the optional
    # `mpi` extra (mpi4py) when a session starts. Ranks have no ids or tokens; the query string
    # (mpi://?timeout=S) carries the options that exist.
    from fedberry.transports.mpi import MpiSession

    return MpiSession(address)


register("tcp", _dial_tcp)
register("mpi", _dial_mpi)
