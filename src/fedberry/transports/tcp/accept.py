"""The chief's listening socket and the accept loop that bounds what it holds open.

asyncio's own server accepts up to ``backlog`` sockets each time the listener is readable and
keeps each until a task has built its transport and the protocol has closed it: a burst of
idle connections (one address opening a thousand) then holds a thousand descriptors for a few
loop turns, and the chief runs out (``EMFILE``) although it refuses nearly all of them. Here
the chief accepts itself and stops reading the listener while ``limit`` accepted sockets are
still open; the rest wait in the kernel's backlog, where they cost the chief nothing, and are
accepted as the refused ones close. Every socket the chief holds is counted, so the number of
descriptors it can reach is known before it starts.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import resource
import socket
from collections.abc import Callable

log = logging.getLogger("fedberry.tcp")

# How many sockets to accept each time the listener is readable: bounded work per loop turn,
# so a flood cannot starve the connections already in.
ACCEPT_BATCH = 32
# How long to stop accepting after the system refused a descriptor (EMFILE and kin).
ACCEPT_RETRY_DELAY = 1.0
LISTEN_BACKLOG = 512
# Descriptors a chief needs besides its connections: the listener, logs, the model files, the
# status server, the event loop's own.
BASE_DESCRIPTORS = 64
_OUT_OF_DESCRIPTORS = {errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM}

# What a failed bind means, said for the operator (errno -> the reason after the address).
_BIND_REASONS = {
    errno.EADDRINUSE: "address already in use (another chief?)",
    errno.EADDRNOTAVAIL: "no interface of this machine has that address",
    errno.EACCES: "permission denied (ports below 1024 need privileges)",
}


def listen_socket(host: str, port: int) -> socket.socket:
    """A TCP socket bound to ``host:port`` (``SO_REUSEADDR``), listening.

    A host name that resolves to several addresses is bound at the first IPv4 one (else the
    first), the address workers dialing ``127.0.0.1`` for ``localhost`` reach.

    Raises
    ------
    OSError
        The address cannot be bound; its text is one sentence, e.g. ``cannot listen on
        127.0.0.1:7777: address already in use (another chief?)``, and ``errno`` is kept.
    """
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
        family, *_, addr = next((i for i in infos if i[0] == socket.AF_INET), infos[0])
        return socket.create_server(addr, family=family, backlog=LISTEN_BACKLOG)
    except OSError as exc:
        reason = _BIND_REASONS.get(exc.errno or 0, (exc.strerror or str(exc)).lower())
        raise OSError(exc.errno, f"cannot listen on {host}:{port}: {reason}") from None


def ensure_descriptors(needed: int) -> None:
    """Raise this process's soft descriptor limit to ``needed`` when the hard limit allows,
    else warn in one sentence: a chief that runs out of descriptors stops accepting workers."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY or soft >= needed:
        return
    target = needed if hard == resource.RLIM_INFINITY else min(needed, hard)
    if target > soft:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (ValueError, OSError):
            pass
    if soft < needed:
        log.warning("this chief may hold %d file descriptors but the limit is %d: lower "
                    "max_connections or raise the limit ('ulimit -n %d')", needed, soft, needed)


class Acceptor:
    """Accepts on ``sock`` and hands each socket to ``attach``, holding at most ``limit``
    accepted sockets open at once. Whoever owns an accepted socket calls :meth:`release`
    exactly once when it is closed (or will be at once)."""

    def __init__(self, sock: socket.socket, attach: Callable[[socket.socket], None],
                 limit: int) -> None:
        self.sock = sock
        self._attach = attach
        self.limit = limit
        self.open = 0  # accepted sockets not yet released
        self._reading = False
        self._closed = False
        self._retry: asyncio.TimerHandle | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self.sock.setblocking(False)
        self.sock.listen(LISTEN_BACKLOG)
        self._resume()

    def _resume(self) -> None:
        self._retry = None
        if self._closed or self._reading or self.open >= self.limit or self._loop is None:
            return
        self._loop.add_reader(self.sock.fileno(), self._readable)
        self._reading = True

    def _pause(self) -> None:
        if self._reading and self._loop is not None:
            self._loop.remove_reader(self.sock.fileno())
        self._reading = False

    def _readable(self) -> None:
        for _ in range(ACCEPT_BATCH):
            if self.open >= self.limit:
                self._pause()  # resumed by release(): the kernel's backlog holds the rest
                return
            try:
                conn, _addr = self.sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except ConnectionAbortedError:
                continue  # the peer gave up while queued
            except OSError as exc:
                if exc.errno not in _OUT_OF_DESCRIPTORS:
                    raise
                log.warning("cannot accept a connection: %s; accepting again in %.0f s",
                            exc.strerror or exc, ACCEPT_RETRY_DELAY)
                self._pause()
                if self._loop is not None and self._retry is None:
                    self._retry = self._loop.call_later(ACCEPT_RETRY_DELAY, self._resume)
                return
            conn.setblocking(False)
            self.open += 1
            try:
                self._attach(conn)
            except Exception:
                conn.close()
                self.release()
                raise

    def release(self) -> None:
        """One accepted socket is closed: accept again if the limit had stopped it."""
        self.open -= 1
        if not self._reading and self._retry is None:
            self._resume()

    def close(self) -> None:
        self._closed = True
        self._pause()
        if self._retry is not None:
            self._retry.cancel()
        self.sock.close()
