"""TCP transport on asyncio: the chief's listener and the worker's connection.

Both sides use ``asyncio.BufferedProtocol`` so that the event loop reads tensor bytes straight
into the numpy arrays the decoder allocated: no intermediate bytes objects for the payload. TLS
(``ssl=``) wraps the same protocol. This module moves frames and runs the handshake; what a frame
means for the round is the chief's business (``server.ChiefServer``).
"""

from __future__ import annotations

import asyncio
import collections
import ipaddress
import logging
import random
import ssl
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from .. import auth
from ..errors import AuthenticationError, ChiefUnreachable, FederationError, from_code
from ..protocol import (
    EncodedFrame,
    ErrorCode,
    Frame,
    FrameDecoder,
    Limits,
    MsgType,
    ProtocolError,
    Spec,
    encode,
    error_frame,
    spec_from_json,
    spec_of,
    spec_to_json,
)
from ..server import ChiefServer

log = logging.getLogger("fedberry.tcp")

# Before authentication a peer may send only small frames with no tensors: an anonymous
# connection cannot make the chief allocate more than the metadata limit.
PREAUTH_LIMITS = Limits(max_meta_bytes=1 << 20, max_tensors=10_000, max_payload=0)
MAX_WORKER_ID = 128


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

    def _init_writer(self) -> None:
        self._out: collections.deque[memoryview] = collections.deque()
        self._paused = False
        self._close_when_flushed = False
        if self.transport is not None:
            self.transport.set_write_buffer_limits(high=0, low=0)

    def _queue(self, frame: EncodedFrame) -> None:
        self._out.extend(memoryview(p) for p in frame.parts)
        self._pump()

    def _pump(self) -> None:
        t = self.transport
        while self._out and not self._paused and t is not None and not t.is_closing():
            part = self._out[0]
            if len(part) > self.CHUNK:
                self._out[0] = part[self.CHUNK:]
                part = part[:self.CHUNK]
            else:
                self._out.popleft()
            t.write(part)
        if self._close_when_flushed and not self._out and t is not None:
            t.close()

    def pause_writing(self) -> None:
        self._paused = True

    def resume_writing(self) -> None:
        self._paused = False
        self._pump()

    def _close_after_flush(self) -> None:
        self._close_when_flushed = True
        self._pump()


# ============================================================================================
# Chief side
# ============================================================================================
@dataclass
class ListenOptions:
    token: str = ""
    ssl_context: ssl.SSLContext | None = None
    insecure: bool = False  # allow plain TCP / no token beyond loopback
    max_connections: int = 256
    handshake_timeout: float = 15.0
    idle_timeout: float = 60.0  # workers ping every few seconds; silence this long = dead
    auth_failures_before_block: int = 3
    max_block: float = 300.0


class _ChiefConnection(_FrameWriter, asyncio.BufferedProtocol):
    def __init__(self, listener: TcpChief) -> None:
        self.listener = listener
        self.server = listener.server
        self.decoder = FrameDecoder(PREAUTH_LIMITS)
        self.transport: asyncio.Transport | None = None
        self.state = "hello"
        self.worker_id = ""
        self.peer_ip = "?"
        self.opened = self.last_seen = time.monotonic()
        self._worker_nonce = ""
        self._chief_nonce = ""
        self.closed = False

    # -- asyncio protocol --------------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self._init_writer()
        peer = transport.get_extra_info("peername")
        self.peer_ip = peer[0] if peer else "?"
        if not self.listener.admit(self):
            return

    def get_buffer(self, sizehint: int) -> memoryview:
        try:
            return self.decoder.get_buffer()
        except ProtocolError:
            return memoryview(bytearray(1 << 16))  # draining a broken stream until it closes

    def buffer_updated(self, nbytes: int) -> None:
        if self.closed:
            return
        self.last_seen = time.monotonic()
        self.server.bytes_up += nbytes
        try:
            frames = self.decoder.buffer_updated(nbytes)
        except ProtocolError as exc:
            self.fail(exc.code, exc.message)
            return
        for frame in frames:
            if self.closed:
                return
            try:
                self.handle(frame)
            except ProtocolError as exc:
                self.fail(exc.code, exc.message)
            except Exception as exc:  # a bug here must cost one connection, not the chief
                log.exception("error handling a frame from %s", self.describe())
                self.fail(ErrorCode.INTERNAL, f"internal error: {exc}")

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.listener.connections.discard(self)
        if self.state == "joined":
            self.server.detach(self)

    # -- frames ------------------------------------------------------------------------------
    def handle(self, frame: Frame) -> None:
        t = frame.type
        if t == MsgType.PING:
            self.send(encode(MsgType.PONG, {}))
        elif t == MsgType.PONG:
            pass
        elif self.state == "hello" and t == MsgType.HELLO:
            self._hello(frame.meta)
        elif self.state == "auth" and t == MsgType.AUTH:
            self._auth(frame.meta)
        elif self.state == "joined" and t == MsgType.UPDATE:
            m = frame.meta
            round_, n = m.get("round"), m.get("num_samples")
            metrics = m.get("metrics") if isinstance(m.get("metrics"), dict) else {}
            if type(round_) is not int or not isinstance(n, (int, float)) or isinstance(n, bool):
                raise ProtocolError(ErrorCode.BAD_FRAME, "UPDATE needs integer round, num_samples")
            self.server.on_update(self, round_, float(n), frame.tensors, metrics)
        elif self.state == "joined" and t == MsgType.INIT:
            self.server.on_init(self, frame.tensors)
            self._expect_model()
        elif self.state == "joined" and t == MsgType.BYE:
            self.close()
        else:
            raise ProtocolError(ErrorCode.PROTOCOL, f"{t.name} is not allowed now ({self.state})")

    def _hello(self, meta: dict[str, Any]) -> None:
        wid, nonce = meta.get("worker_id"), meta.get("nonce")
        if not isinstance(wid, str) or not 0 < len(wid) <= MAX_WORKER_ID or not wid.isprintable():
            raise ProtocolError(ErrorCode.BAD_FRAME, "worker_id must be 1-128 printable characters")
        if not isinstance(nonce, str) or len(nonce) != 2 * auth.NONCE_BYTES:
            raise ProtocolError(ErrorCode.BAD_FRAME, "HELLO needs a nonce")
        self.worker_id, self._worker_nonce = wid, nonce
        self._chief_nonce = auth.new_nonce()
        self.state = "auth"
        self.send(encode(MsgType.CHALLENGE, {"nonce": self._chief_nonce}))

    def _auth(self, meta: dict[str, Any]) -> None:
        token = self.listener.options.token
        if not auth.verify(auth.worker_proof(token, self._chief_nonce, self._worker_nonce),
                           meta.get("proof")):
            self.listener.auth_failed(self.peer_ip)
            log.warning("authentication failed for worker %r from %s", self.worker_id, self.peer_ip)
            self.fail(ErrorCode.AUTH_FAILED, "authentication failed: your token does not match "
                                             "the chief's (check --token, --token-file or "
                                             "FEDBERRY_TOKEN)")
            return
        spec = spec_from_json(meta.get("spec"), PREAUTH_LIMITS)
        self._announced = spec
        chief = self.server.chief
        self.state = "joined"
        self.send(encode(MsgType.WELCOME, {
            "proof": auth.chief_proof(token, self._chief_nonce, self._worker_nonce),
            "round": chief.round, "need_init": chief.global_arrays is None}))
        self._expect_model()
        self.server.attach(self, spec, bool(meta.get("want_model", True)))

    def _expect_model(self) -> None:
        spec = self.server.chief.spec or self._announced
        self.decoder.expected = spec
        self.decoder.limits = Limits(PREAUTH_LIMITS.max_meta_bytes, max(len(spec), 1),
                                     sum(t.nbytes for t in spec))

    # -- Peer interface ----------------------------------------------------------------------
    def send(self, frame: EncodedFrame) -> None:
        if self.transport is None or self.closed:
            return
        self.server.bytes_down += frame.nbytes
        self._queue(frame)

    def send_global(self, server: ChiefServer) -> None:
        self.send(server.global_frame())

    def send_error(self, code: ErrorCode, message: str, fatal: bool) -> None:
        self.send(error_frame(code, message, fatal))

    def request_init(self) -> None:
        pass  # WELCOME already said need_init

    def fail(self, code: ErrorCode, message: str) -> None:
        log.warning("closing %s: %s", self.describe(), message)
        self.send(error_frame(code, message, True))
        self.close()

    def close(self) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self._close_after_flush()  # the error frame goes out first; then connection_lost

    def abort(self) -> None:
        if self.transport is not None:
            self.transport.abort()

    def describe(self) -> str:
        return f"{self.worker_id or 'connection'} from {self.peer_ip}"


class TcpChief:
    """Accepts workers on ``host:port`` and serves them with ``server``."""

    def __init__(self, server: ChiefServer, host: str, port: int,
                 options: ListenOptions | None = None) -> None:
        self.server = server
        self.host, self.port = host, port
        self.options = options or ListenOptions()
        self.connections: set[_ChiefConnection] = set()
        self._failures: dict[str, tuple[int, float]] = {}
        self._aserver: asyncio.base_events.Server | None = None
        self._check_exposure()

    def _check_exposure(self) -> None:
        o = self.options
        if is_loopback(self.host):
            return
        if o.ssl_context is None and not o.insecure:
            raise ValueError(f"refusing to serve plain TCP on {self.host}: traffic would be "
                             "readable and forgeable on the network. Give --tls-cert/--tls-key "
                             "(see 'fedberry certs'), or pass --insecure on a network you trust.")
        if not o.token and not o.insecure and not _requires_client_cert(o.ssl_context):
            raise ValueError(f"refusing to serve on {self.host} without a token: anyone could "
                             "join. Give --token, --token-file or FEDBERRY_TOKEN (or require "
                             "client certificates with --client-ca), or pass --insecure.")
        if o.insecure:
            log.warning("!!! INSECURE: serving on %s %s. Anyone who can reach this port can %s. "
                        "Use this only on a network you trust.", self.host,
                        "without TLS" if o.ssl_context is None else "with TLS",
                        "read and forge traffic" if o.ssl_context is None else "join")

    async def start(self) -> tuple[str, int]:
        self.server.bind_loop()
        loop = asyncio.get_running_loop()
        self._aserver = await loop.create_server(
            lambda: _ChiefConnection(self), self.host, self.port, ssl=self.options.ssl_context,
            reuse_address=True, backlog=512)
        sock = self._aserver.sockets[0].getsockname()
        self.port = sock[1]
        self._sweeper = asyncio.ensure_future(self._sweep())
        return sock[0], sock[1]

    async def serve(self) -> None:
        """Serve until the chief has finished, then close everything."""
        if self._aserver is None:
            await self.start()
        try:
            await self.server.wait_finished()
        finally:
            await self.stop()

    async def stop(self) -> None:
        self._sweeper.cancel()
        if self._aserver is not None:
            self._aserver.close()
        for conn in list(self.connections):
            conn.close()
        await asyncio.sleep(0)
        if self._aserver is not None:
            try:
                await asyncio.wait_for(self._aserver.wait_closed(), 5)
            except asyncio.TimeoutError:
                pass

    # -- admission ---------------------------------------------------------------------------
    def admit(self, conn: _ChiefConnection) -> bool:
        count, until = self._failures.get(conn.peer_ip, (0, 0.0))
        now = time.monotonic()
        if now < until:
            conn.fail(ErrorCode.AUTH_FAILED, f"too many failed authentications from "
                                             f"{conn.peer_ip}; retry in {until - now:.0f} s")
            return False
        if len(self.connections) >= self.options.max_connections:
            conn.fail(ErrorCode.BUSY, "the chief has too many connections; retry later")
            return False
        self.connections.add(conn)
        return True

    def auth_failed(self, ip: str) -> None:
        count, _ = self._failures.get(ip, (0, 0.0))
        count += 1
        block = 0.0
        if count >= self.options.auth_failures_before_block:
            block = min(self.options.max_block,
                        2.0 ** (count - self.options.auth_failures_before_block))
        self._failures[ip] = (count, time.monotonic() + block)
        if len(self._failures) > 10_000:  # bounded memory under a spray of addresses
            self._failures.pop(next(iter(self._failures)))

    async def _sweep(self) -> None:
        o = self.options
        while True:
            await asyncio.sleep(0.5)
            now = time.monotonic()
            for conn in list(self.connections):
                if conn.state != "joined" and now - conn.opened > o.handshake_timeout:
                    conn.fail(ErrorCode.TIMEOUT, "handshake not completed in time")
                    conn.abort()
                elif now - conn.last_seen > o.idle_timeout:
                    conn.fail(ErrorCode.TIMEOUT, f"silent for {o.idle_timeout:.0f} s")
                    conn.abort()


def _requires_client_cert(ctx: ssl.SSLContext | None) -> bool:
    return ctx is not None and ctx.verify_mode == ssl.CERT_REQUIRED


# ============================================================================================
# Worker side
# ============================================================================================
class _Lost:
    def __init__(self, reason: str) -> None:
        self.reason = reason


class _WorkerProtocol(_FrameWriter, asyncio.BufferedProtocol):
    def __init__(self, session: TcpSession) -> None:
        self.session = session
        self.decoder = FrameDecoder(session.limits)
        self.queue: asyncio.Queue[Frame | _Lost] = asyncio.Queue()
        self.transport: asyncio.Transport | None = None
        self.last_seen = time.monotonic()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self._init_writer()

    def get_buffer(self, sizehint: int) -> memoryview:
        try:
            return self.decoder.get_buffer()
        except ProtocolError:
            return memoryview(bytearray(1 << 16))

    def buffer_updated(self, nbytes: int) -> None:
        self.last_seen = time.monotonic()
        self.session.bytes_received += nbytes
        try:
            frames = self.decoder.buffer_updated(nbytes)
        except ProtocolError as exc:
            self.queue.put_nowait(_Lost(f"the chief sent a bad frame: {exc.message}"))
            if self.transport:
                self.transport.abort()
            return
        for f in frames:
            if f.type == MsgType.PING:
                self.send(encode(MsgType.PONG, {}))
            elif f.type != MsgType.PONG:
                self.queue.put_nowait(f)

    def connection_lost(self, exc: Exception | None) -> None:
        self.queue.put_nowait(_Lost(f"connection lost ({exc or 'closed by the chief'})"))

    def send(self, frame: EncodedFrame) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.session.bytes_sent += frame.nbytes
            self._queue(frame)


class _Retryable(Exception):
    pass


class TcpSession:
    """A worker's connection to a TCP chief. Its methods are coroutines run on the worker's own
    event-loop thread (see ``worker.Worker``), so heartbeats go on while the user trains."""

    def __init__(self, host: str, port: int, *, token: str, worker_id: str,
                 ssl_context: ssl.SSLContext | None = None, server_hostname: str | None = None,
                 connect_timeout: float = 60.0, reconnect_timeout: float = 300.0,
                 heartbeat: float = 5.0, idle_timeout: float = 60.0,
                 limits: Limits | None = None) -> None:
        self.host, self.port = host, port
        self.token = token
        self.worker_id = worker_id
        self.ssl_context = ssl_context
        self.server_hostname = server_hostname
        self.connect_timeout = connect_timeout
        self.reconnect_timeout = reconnect_timeout
        self.heartbeat = heartbeat
        self.idle_timeout = idle_timeout
        self.limits = limits or Limits()
        self.bytes_sent = 0
        self.bytes_received = 0
        self.reconnects = 0
        self.warnings: list[str] = []
        self._proto: _WorkerProtocol | None = None
        self._spec: Spec = ()
        self._init_arrays: Sequence[np.ndarray] = ()
        self._hb_task: asyncio.Task[None] | None = None

    # -- public coroutines -------------------------------------------------------------------
    async def join(self, arrays: Sequence[np.ndarray]) -> tuple[int, list[np.ndarray], bool]:
        self._spec = spec_of(arrays)
        self._init_arrays = arrays
        return await self._with_retries(self._join_once, self.connect_timeout)

    async def sync(self, round_: int, arrays: Sequence[np.ndarray], num_samples: float,
                   metrics: dict[str, Any]) -> tuple[int, list[np.ndarray], bool]:
        # Encoded once: a resend after a reconnect sends the same bytes, and the chief counts
        # a repeated update for a round once.
        frame = encode(MsgType.UPDATE, {"round": round_, "num_samples": num_samples,
                                        "metrics": metrics}, arrays)
        self._init_arrays = ()

        async def once() -> tuple[int, list[np.ndarray], bool]:
            if self._proto is None:
                await self._connect(want_model=False)
            assert self._proto is not None
            self._proto.send(frame)
            return await self._await_global()

        return await self._with_retries(once, self.reconnect_timeout)

    async def close(self) -> None:
        if self._hb_task:
            self._hb_task.cancel()
        if self._proto is not None and self._proto.transport is not None:
            self._proto.send(encode(MsgType.BYE, {}))
            self._proto._close_after_flush()
            await asyncio.sleep(0)
        self._proto = None

    def drop_connection(self) -> None:
        """Close the socket abruptly (tests use this to simulate a network failure)."""
        if self._proto is not None and self._proto.transport is not None:
            self._proto.transport.abort()

    # -- internals ---------------------------------------------------------------------------
    async def _with_retries(self, fn: Any, budget: float) -> Any:
        deadline = time.monotonic() + budget
        attempt = 0
        while True:
            try:
                return await fn()
            except _Retryable as exc:
                self._proto = None
                if time.monotonic() >= deadline:
                    raise ChiefUnreachable(f"cannot reach the chief at {self.host}:{self.port}: "
                                           f"{exc} (gave up after {budget:.0f} s)") from None
                # Exponential backoff with full jitter, so that a chief coming back is not hit
                # by every worker at the same instant.
                delay = random.uniform(0, min(10.0, 0.2 * 2 ** attempt))
                delay = min(delay, max(0.0, deadline - time.monotonic()))
                log.info("worker %s: %s; retrying in %.1f s", self.worker_id, exc, delay)
                await asyncio.sleep(delay)
                attempt += 1
                self.reconnects += 1

    async def _join_once(self) -> tuple[int, list[np.ndarray], bool]:
        await self._connect(want_model=True)
        return await self._await_global()

    async def _connect(self, want_model: bool) -> None:
        loop = asyncio.get_running_loop()
        try:
            _, proto = await asyncio.wait_for(loop.create_connection(
                lambda: _WorkerProtocol(self), self.host, self.port, ssl=self.ssl_context,
                server_hostname=self.server_hostname if self.ssl_context else None), 30)
        except ssl.SSLError as exc:
            raise FederationError(_tls_message(exc), "tls") from None
        except (OSError, asyncio.TimeoutError) as exc:
            raise _Retryable(f"connect failed ({exc or 'timeout'})") from None
        self._proto = proto
        nonce = auth.new_nonce()
        proto.send(encode(MsgType.HELLO, {"worker_id": self.worker_id, "nonce": nonce}))
        challenge = await self._expect(MsgType.CHALLENGE)
        chief_nonce = str(challenge.meta.get("nonce", ""))
        proto.send(encode(MsgType.AUTH, {
            "proof": auth.worker_proof(self.token, chief_nonce, nonce),
            "spec": spec_to_json(self._spec), "want_model": want_model}))
        welcome = await self._expect(MsgType.WELCOME)
        if not auth.verify(auth.chief_proof(self.token, chief_nonce, nonce),
                           welcome.meta.get("proof")):
            proto.transport.abort()  # type: ignore[union-attr]
            raise AuthenticationError("the chief could not prove it knows the token: wrong "
                                      "token on one side, or not the chief you meant",
                                      "auth_failed")
        proto.decoder.expected = self._spec
        if welcome.meta.get("need_init"):
            proto.send(encode(MsgType.INIT, {}, self._init_arrays))
        if self._hb_task is None or self._hb_task.done():
            self._hb_task = asyncio.ensure_future(self._heartbeat())

    async def _expect(self, msg_type: MsgType) -> Frame:
        frame = await self._next_frame()
        if frame.type != msg_type:
            raise FederationError(f"protocol error: expected {msg_type.name}, got "
                                  f"{frame.type.name}", "protocol")
        return frame

    async def _next_frame(self) -> Frame:
        proto = self._proto
        if proto is None:
            raise _Retryable("not connected")
        item = await proto.queue.get()
        if isinstance(item, _Lost):
            self._proto = None
            raise _Retryable(item.reason)
        if item.type == MsgType.ERROR:
            code = str(item.meta.get("code", "error"))
            message = str(item.meta.get("message", ""))
            if item.meta.get("fatal", True):
                if code in ("timeout", "busy"):
                    raise _Retryable(f"chief said: {message}")
                raise from_code(code, f"the chief refused: {message}")
            self.warnings.append(message)
            log.warning("worker %s: chief says: %s", self.worker_id, message)
            return await self._next_frame()
        return item

    async def _await_global(self) -> tuple[int, list[np.ndarray], bool]:
        frame = await self._expect(MsgType.GLOBAL)
        return int(frame.meta["round"]), frame.tensors, bool(frame.meta.get("done"))

    async def _heartbeat(self) -> None:
        while True:
            await asyncio.sleep(self.heartbeat)
            proto = self._proto
            if proto is None or proto.transport is None or proto.transport.is_closing():
                continue
            if time.monotonic() - proto.last_seen > self.idle_timeout:
                log.warning("worker %s: chief silent for %.0f s, dropping the connection",
                            self.worker_id, self.idle_timeout)
                proto.transport.abort()
                continue
            proto.send(encode(MsgType.PING, {}))


# TODO(issue 5, from the certs author): asyncio sends no TLS alert when the chief refuses a
# handshake (CPython gh-98078), so a worker refused for a missing/unknown client certificate
# sees only a closed connection (TLS 1.3: handshake "succeeds", then EOF). On a TLS connection
# that closes before CHALLENGE, call describe_tls_error(EOFError()) and do not retry silently.
# On the chief side use describe_tls_error(exc, role="chief"). For a name mismatch, pass
# cert_names=await asyncio.to_thread(peer_certificate_names, host, port, ca, cert, key).
def _tls_message(exc: ssl.SSLError) -> str:
    try:
        from ..certs import describe_tls_error
    except ImportError:
        return f"TLS handshake failed: {exc}"
    return describe_tls_error(exc)
