"""Frames over asyncio streams, shared by the chief's and the worker's TCP side: addresses and
the chunked writer that sends tensors without copying them.

The TCP transport is ``chief.py`` (the listener) and ``worker.py`` (the worker's one
connection); ``__init__.py`` gathers their public names. The limits are ``protocol.limits``'.
"""

from __future__ import annotations

import asyncio
import collections
import ipaddress
import logging

from fedberry.protocol.frames import EncodedFrame
from fedberry.protocol.limits import MAX_WORKER_ID, PREAUTH_LIMITS
from fedberry.transports.pacing import DEFAULT_PACED_CHUNK, Pacer

__all__ = ["MAX_WORKER_ID", "PREAUTH_LIMITS", "is_loopback", "parse_address"]

log = logging.getLogger("fedberry.tcp")


def parse_address(addr: str, default_port: int = 7777) -> tuple[str, int]:
    """``tcp://host:port``, ``host:port``, ``[::1]:port`` or ``host`` -> (host, port)."""
    rest = addr.split("://", 1)[1] if "://" in addr else addr
    if rest.startswith("["):
        host, _, port = rest[1:].partition("]")
        port = port.lstrip(":")
    elif rest.count(":") == 1:
        host, port = rest.split(":")
    else:
        host, port = rest, ""
    if not host:
        raise ValueError(f"no host in address {addr!r}")
    try:
        return host, int(port) if port else default_port
    except ValueError:
        raise ValueError(f"bad port in address {addr!r}") from None


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class _FrameWriter:
    """Feeds frames to the transport a chunk at a time, waiting while its buffer is non-empty.

    asyncio's transports copy whatever the kernel does not take at once into their own buffer;
    for a 40 MB model that is a full copy per worker. Writing 1 MiB chunks only when the buffer
    is empty (write-buffer limits of zero: pause_writing as soon as anything is buffered) lets
    the tensors go from their numpy memory to the socket with at most a chunk's remainder copied.
    """

    CHUNK = 1 << 20
    transport: asyncio.Transport | None
    # Optional pacer of what this side sends (ListenOptions.pacing.downlink, supplied by the
    # benchmark): each chunk waits as long as it says before it is written, so that a loopback
    # benchmark sees a slow link. Chunks of _paced_chunk bytes then (pacing.py says why).
    _pacer: Pacer | None = None
    _paid = _shaping = False
    _paced_chunk = DEFAULT_PACED_CHUNK
    queued_bytes = 0  # bytes in _out, not yet handed to the transport (the send-queue bound)

    def _init_writer(self) -> None:
        self._out: collections.deque[memoryview] = collections.deque()
        self.queued_bytes = 0
        self._paused = False
        self._close_when_flushed = False
        if self.transport is not None:
            # high=1, not 0, under TLS: asyncio's TLS transport pauses when the buffer is
            # >= high (plain sockets: > high), so 0 paused it after every write, even a
            # flushed one, and nothing resumed it: the second frame never left.
            tls = self.transport.get_extra_info("ssl_object") is not None
            self.transport.set_write_buffer_limits(high=1 if tls else 0, low=0)

    def _queue(self, frame: EncodedFrame) -> None:
        parts = [memoryview(p) for p in frame.parts]
        self._out.extend(parts)
        self.queued_bytes += sum(len(p) for p in parts)
        self._pump()

    def _pump(self) -> None:
        t = self.transport
        chunk = self.CHUNK if self._pacer is None else self._paced_chunk
        while (self._out and not self._paused and not self._shaping and t is not None
               and not t.is_closing()):
            part = self._out[0]
            if len(part) > chunk:
                self._out[0] = part[chunk:]
                part = part[:chunk]
            else:
                self._out.popleft()
            if self._pacer is not None and not self._paid:
                wait = self._pacer.reserve(len(part))
                if wait > 0:  # reserved; this chunk goes first once its wait is over
                    self._out.appendleft(part)
                    self._paid = self._shaping = True
                    asyncio.get_running_loop().call_later(wait, self._tokens_paid)
                    return
            self._paid = False
            self.queued_bytes -= len(part)
            t.write(part)
        if self._close_when_flushed and not self._out and t is not None:
            self._close_when_flushed = False
            self._flushed(t)

    def _flushed(self, transport: asyncio.Transport) -> None:
        """Everything queued before ``_close_after_flush`` has been handed to the transport."""
        transport.close()

    def _tokens_paid(self) -> None:
        self._shaping = False
        self._pump()

    def pause_writing(self) -> None:
        self._paused = True

    def resume_writing(self) -> None:
        self._paused = False
        self._pump()

    def _close_after_flush(self) -> None:
        self._close_when_flushed = True
        self._pump()
