"""The chief's TCP listener: admission, TLS, the handshake (challenge + HMAC), timeouts and
heartbeats, then frames handed to ``server.ChiefServer``. Both sides use
``asyncio.BufferedProtocol`` so that the event loop reads tensor bytes straight into the numpy
arrays the decoder allocated.
"""

from __future__ import annotations

import asyncio
import logging
import math
import ssl
import sys
import time
from dataclasses import dataclass
from typing import Any

from fedberry.certs import cert_names
from fedberry.chief.buffers import ReceiveBudget
from fedberry.chief.runtime import ChiefServer
from fedberry.protocol import auth
from fedberry.protocol.frames import (
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
)
from fedberry.transports.pacing import Pacer, Pacing
from fedberry.transports.tcp.stream import (
    MAX_WORKER_ID,
    PREAUTH_LIMITS,
    _FrameWriter,
    is_loopback,
)

log = logging.getLogger("fedberry.tcp")


# ============================================================================================
# Chief side
# ============================================================================================
@dataclass
class ListenOptions:
    token: str = ""
    ssl_context: ssl.SSLContext | None = None
    # The chief's context asks for client certificates without failing the handshake when there
    # is none (CERT_OPTIONAL), so that it can say in an ERROR frame that one is required: a TLS
    # handshake refused by an asyncio server reaches the worker as a bare close (gh-98078).
    require_client_cert: bool = False
    # With require_client_cert, a worker's id must be a name in its certificate, so that a
    # certificate holder cannot take another worker's place (ids key updates and reconnects).
    # False: any id, as with a token, for certificates shared between workers.
    bind_worker_id: bool = True
    insecure: bool = False  # allow plain TCP / no token beyond loopback
    max_connections: int = 256
    # Handshakes in flight from one address. Workers behind one home router share an address,
    # but each handshakes in milliseconds; this keeps one address from holding the whole cap.
    max_pending_per_address: int = 16
    handshake_timeout: float = 15.0  # TCP accept to WELCOME, TLS included
    idle_timeout: float = 60.0  # workers ping every few seconds; silence this long = dead
    # Failed authentications from one address are free up to auth_failures_free; after that the
    # chief holds its answer to every AUTH from that address for auth_delay_base * 2**(excess-1)
    # seconds, at most auth_delay_max (below handshake_timeout, so an honest worker behind the
    # same address still gets in). An address's failures are forgotten after auth_memory quiet
    # seconds. Delaying rather than blocking: a block would lock out honest workers behind the
    # attacker's NAT, and with at most max_pending_per_address attempts in flight it caps the
    # guessing rate just the same.
    auth_failures_free: int = 3
    auth_delay_base: float = 0.25
    auth_delay_max: float = 8.0
    auth_memory: float = 600.0
    # Bytes of updates being received at once, all connections together; past it, workers wait
    # their turn with reading paused (TCP holds them back) and the chief's memory stays
    # O(model) whatever the number of workers. One update is always let in. The default lets
    # dozens of small-model workers upload in parallel, which a slow per-worker link needs.
    receive_memory: int = 64 << 20
    # Paces every connection's bytes through the caller's pacers (transports/pacing.py): the
    # benchmark without root emulates a slow shared link so (docs/slow-link.md). None: full speed.
    pacing: Pacing | None = None


# A connection we decided to close gets this long to take its last frame before it is aborted.
CLOSE_GRACE = 5.0
# Metrics an UPDATE may carry: a few numbers (loss, accuracy); the rest are dropped.
MAX_METRICS = 32


class _ChiefConnection(_FrameWriter, asyncio.BufferedProtocol):
    """One worker's connection. States: tls -> hello -> auth (-> auth-wait) -> joined."""

    def __init__(self, listener: TcpChief) -> None:
        self.listener = listener
        self.server = listener.server
        self.decoder = FrameDecoder(PREAUTH_LIMITS)
        self.transport: asyncio.Transport | None = None  # the TLS transport once TLS is up
        self._raw: asyncio.BaseTransport | None = None
        self.state = "hello"
        self.worker_id = ""
        self.peer_ip = "?"
        self.opened = self.last_seen = self.last_ping = time.monotonic()
        self.closing_since: float | None = None
        self._worker_nonce = ""
        self._cert_names: list[str] | None = None  # the names a worker id must be one of
        self._chief_nonce = ""
        self._announced: Spec = ()
        self._have: str | None = None
        self._holds: int | None = None  # the round of the last model sent on this connection
        self._bye = False  # the worker left on purpose (else it may come back)
        self._may_init = False
        self._drain: memoryview | None = None
        self._pauses: set[str] = set()  # why reading is paused: "pacer", "auth", "memory"
        self._reserved = 0  # bytes of the frame being received, counted in the budget
        self._waiting_for = 0  # bytes queued for in the budget (0: not queued)
        self._granted = False
        self._left = False  # detached from the server (it no longer counts as a member)
        self.closed = False
        pacing = listener.options.pacing
        self._uplink: Pacer | None = pacing.uplink if pacing is not None else None
        if pacing is not None:
            self._pacer, self._paced_chunk = pacing.downlink, pacing.chunk

    # -- asyncio protocol --------------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        if self._raw is not None:
            return  # start_tls does not call this again, but be sure
        self._raw = transport
        peer = transport.get_extra_info("peername")
        self.peer_ip = peer[0] if peer else "?"
        tls = self.listener.options.ssl_context is not None
        if not tls:
            self.transport = transport  # type: ignore[assignment]
            self._init_writer()
        # Admission comes before the TLS handshake, so that the connection cap also bounds
        # handshakes in progress and a refused peer costs no key exchange.
        if not self.listener.admit(self):
            return
        if tls:
            self.state = "tls"
            asyncio.ensure_future(self._start_tls(transport))

    async def _start_tls(self, raw: asyncio.BaseTransport) -> None:
        o = self.listener.options
        try:
            tls = await asyncio.get_running_loop().start_tls(
                raw, self, o.ssl_context, server_side=True,  # type: ignore[arg-type]
                ssl_handshake_timeout=o.handshake_timeout)
        except Exception as exc:  # OSError and ssl.SSLError mostly; any other still costs one
            log.warning("TLS handshake with %s failed: %s", self.peer_ip, _chief_tls_message(exc))
            raw.abort()
            self._gone()
            return
        if self.closed or self.closing_since is not None:
            tls.abort()
            return
        self.transport = tls  # type: ignore[assignment]
        self._init_writer()
        self.state = "hello"
        self.last_seen = time.monotonic()
        peercert = tls.get_extra_info("peercert")
        if o.require_client_cert and not peercert:
            self.fail(ErrorCode.AUTH_FAILED,
                      "this chief requires a client certificate (mutual TLS) and you presented "
                      "none: give the worker --cert and --key, made with 'fedberry certs "
                      "--client NAME' from the chief's CA")
        elif o.require_client_cert and o.bind_worker_id:
            self._cert_names = cert_names(peercert)

    def get_buffer(self, sizehint: int) -> memoryview:
        if self.closing_since is None:
            try:
                buf = self.decoder.get_buffer()
                return buf if self._uplink is None else buf[:self._paced_chunk]
            except ProtocolError:
                pass
        # Draining what a peer sends after we decided to close (see _flushed).
        if self._drain is None:
            self._drain = memoryview(bytearray(1 << 16))
        return self._drain

    def buffer_updated(self, nbytes: int) -> None:
        if self._uplink is not None and not (self.closed or self.closing_since is not None):
            # Paced (benchmarks): these bytes "arrive" once the uplink pacer says so. Reading
            # pauses meanwhile, so the receive window slows the sender too.
            wait = self._uplink.reserve(nbytes)
            if wait > 0 and self.transport is not None:
                self._pause("pacer")
                asyncio.get_running_loop().call_later(wait, self._arrived, nbytes)
                return
        self._received(nbytes)

    def _arrived(self, nbytes: int) -> None:
        self._received(nbytes)
        self._unpause("pacer")

    def _pause(self, why: str) -> None:
        if not self._pauses and self.transport is not None:
            self.transport.pause_reading()
        self._pauses.add(why)

    def _unpause(self, why: str) -> None:
        if why not in self._pauses:
            return
        self._pauses.discard(why)
        if (not self._pauses and self.transport is not None
                and not self.transport.is_closing()):
            self.transport.resume_reading()

    def _received(self, nbytes: int) -> None:
        if self.closed or self.closing_since is not None:
            return  # what a connection sends after we decided to close it does not matter
        self.last_seen = time.monotonic()
        self.server.bytes_up += nbytes
        try:
            frames = self.decoder.buffer_updated(nbytes)
        except ProtocolError as exc:
            self.fail(exc.code, exc.message)
            return
        for frame in frames:
            if self.closed or self.closing_since is not None:
                return
            try:
                self.handle(frame)
            except ProtocolError as exc:
                self.fail(exc.code, exc.message)
            except Exception as exc:  # a bug here must cost one connection, not the chief
                log.exception("error handling a frame from %s", self.describe())
                self.fail(ErrorCode.INTERNAL, f"internal error: {exc}")
        if frames:
            # The frame is in and handled (an update is folded into the sum and its buffers
            # are back in the pool): the next connection in line may have its memory.
            self._free_memory()
        if self.decoder.waiting:
            self._pause("memory")

    # -- receive memory (buffers.ReceiveBudget) ----------------------------------------------
    def _allocate(self, specs: Spec) -> list[Any] | None:
        """The decoder's ``allocate``: a frame's arrays once the budget lets it in, else None
        (the decoder waits, reading pauses, ``_memory_granted`` carries on)."""
        nbytes = sum(t.nbytes for t in specs)
        if not self._granted and nbytes:
            if not self.listener.budget.acquire(nbytes, self._memory_granted):
                self._waiting_for = nbytes
                return None
        self._granted = False
        self._reserved = nbytes
        return self.server.buffers.take(specs)

    def _memory_granted(self) -> None:
        nbytes, self._waiting_for = self._waiting_for, 0
        if self.closed or self.closing_since is not None:
            self.listener.budget.release(nbytes)  # granted to a connection that is gone
            return
        self._granted = True
        try:
            self.decoder.retry()
        except ProtocolError as exc:
            self.fail(exc.code, exc.message)  # which frees the bytes, reserved by _allocate
            return
        self._unpause("memory")

    def _free_memory(self) -> None:
        budget = self.listener.budget
        if self._reserved:
            nbytes, self._reserved = self._reserved, 0
            budget.release(nbytes)
        if self._waiting_for:
            self._waiting_for = 0
            budget.cancel(self._memory_granted)

    def connection_lost(self, exc: Exception | None) -> None:
        self._gone()

    def _gone(self) -> None:
        if self.closed:
            return
        self.closed = True
        self._free_memory()
        self.listener.connections.discard(self)
        self._leave()

    def _leave(self) -> None:
        # As soon as we decide to close, not when the socket is gone: a lingering close can
        # take CLOSE_GRACE, and a round must not wait for a worker that is already out.
        if self.state == "joined" and not self._left:
            self._left = True
            self.server.detach(self, lost=not self._bye)

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
            round_, n, metrics = _update_fields(frame.meta)
            self.server.on_update(self, round_, n, frame.tensors, metrics,
                                  frame.meta.get("codec", "none"), frame.checked,
                                  frame.non_finite)
        elif self.state == "joined" and t == MsgType.INIT and self._may_init:
            self._may_init = False  # once, and only when WELCOME asked for it
            self.server.on_init(self, frame.tensors)
            self._expect_model()
        elif self.state == "joined" and t == MsgType.BYE:
            self._bye = True
            self.close()
        else:
            raise ProtocolError(ErrorCode.PROTOCOL, f"{t.name} is not allowed now ({self.state})")

    def _hello(self, meta: dict[str, Any]) -> None:
        wid, nonce = meta.get("worker_id"), meta.get("nonce")
        if not isinstance(wid, str) or not 0 < len(wid) <= MAX_WORKER_ID or not wid.isprintable():
            raise ProtocolError(ErrorCode.BAD_FRAME, "worker_id must be 1-128 printable characters")
        if not isinstance(nonce, str) or len(nonce) != 2 * auth.NONCE_BYTES:
            raise ProtocolError(ErrorCode.BAD_FRAME, "HELLO needs a nonce")
        if self._cert_names is not None and wid not in self._cert_names:
            raise ProtocolError(ErrorCode.AUTH_FAILED, _id_not_in_cert(wid, self._cert_names))
        self.worker_id, self._worker_nonce = wid, nonce
        self._chief_nonce = auth.new_nonce()
        self.state = "auth"
        self.send(encode(MsgType.CHALLENGE, {"nonce": self._chief_nonce}))

    def _auth(self, meta: dict[str, Any]) -> None:
        delay = self.listener.auth_delay(self.peer_ip)
        if delay <= 0:
            self._auth_now(meta)
            return
        # This address has failed too often lately: answer later, reading nothing meanwhile.
        assert self.transport is not None
        self.state = "auth-wait"
        self._pause("auth")
        asyncio.get_running_loop().call_later(delay, self._auth_now, meta)

    def _auth_now(self, meta: dict[str, Any]) -> None:
        if self.closed or self.closing_since is not None:
            return
        if self.state == "auth-wait":
            self.state = "auth"
            self._unpause("auth")
        try:
            self._verify_and_join(meta)
        except ProtocolError as exc:
            self.fail(exc.code, exc.message)

    def _verify_and_join(self, meta: dict[str, Any]) -> None:
        token = self.listener.options.token
        if not auth.verify(auth.worker_proof(token, self._chief_nonce, self._worker_nonce),
                           meta.get("proof")):
            failures = self.listener.auth_failed(self.peer_ip)
            log.warning("authentication failed for worker %r from %s (%d lately)",
                        self.worker_id, self.peer_ip, failures)
            slowed = ""
            if failures >= self.listener.options.auth_failures_free:
                slowed = (f" ({failures} failed attempts from {self.peer_ip} lately: the chief "
                          f"now waits {self.listener.auth_delay(self.peer_ip):.2f} s before "
                          "answering each attempt from this address)")
            self.fail(ErrorCode.AUTH_FAILED, "authentication failed: your token does not match "
                                             "the chief's (check --token, --token-file or "
                                             f"FEDBERRY_TOKEN){slowed}")
            return
        spec = spec_from_json(meta.get("spec"), PREAUTH_LIMITS)
        self._announced = spec
        have = meta.get("have")  # the digest of the model the worker holds, if it offers one
        self._have = have if isinstance(have, str) and len(have) == 64 else None
        chief = self.server.chief
        self.state = "joined"
        self._may_init = chief.global_arrays is None
        self.send(encode(MsgType.WELCOME, {
            "proof": auth.chief_proof(token, self._chief_nonce, self._worker_nonce),
            "round": chief.round, "need_init": self._may_init,
            "downlink": self.server.broadcast.codec.name}))
        self._expect_model()
        self.server.attach(self, spec, meta.get("want_model", True) is not False)

    def _expect_model(self) -> None:
        spec = self.server.chief.spec or self._announced
        self.decoder.expected = spec
        self.decoder.allocate = self._allocate
        self.decoder.check_finite = True
        # Metadata: ~40 bytes per tensor description plus a few metrics. A q8 update carries
        # two tensors (values, scales) per float tensor, in fewer bytes than the model.
        self.decoder.limits = Limits(max(PREAUTH_LIMITS.max_meta_bytes, 128 * len(spec)),
                                     max(2 * len(spec), 1), sum(t.nbytes for t in spec))

    # -- Peer interface ----------------------------------------------------------------------
    def send(self, frame: EncodedFrame) -> None:
        if self.transport is None or self.closed or self.closing_since is not None:
            return
        self.server.bytes_down += frame.nbytes
        self._queue(frame)

    def send_global(self, server: ChiefServer) -> None:
        chief, holds = server.chief, self._holds
        self._holds = chief.round  # TCP keeps order: the worker decodes this one before the next
        have, self._have = self._have, None  # it describes the model the worker joined with
        if have is not None and have == server.broadcast.digest(chief):
            self.send(server.broadcast.unchanged(chief))
            return
        frame = server.broadcast.frame(chief, holds)
        # The global model goes out only in answer to a join or an update, so more than two
        # models still queued means the worker sends but does not read: it would make us hold
        # a model per round for it.
        pending = sum(len(p) for p in getattr(self, "_out", ()))
        if pending > 2 * sum(a.nbytes for a in chief.global_arrays or ()):
            self.fail(ErrorCode.TIMEOUT, "you are not reading what the chief sends")
            self.abort()  # it would not read the error either: no lingering close
            return
        self.send(frame)

    def send_error(self, code: ErrorCode, message: str, fatal: bool) -> None:
        self.send(error_frame(code, message, fatal))

    def request_init(self) -> None:
        pass  # WELCOME already said need_init

    def ping(self) -> None:
        self.last_ping = time.monotonic()
        self.send(encode(MsgType.PING, {}))

    def fail(self, code: ErrorCode, message: str) -> None:
        """Tell the peer why (when it can still be told) and close."""
        if self.closed or self.closing_since is not None:
            return
        log.warning("closing %s: %s", self.describe(), message)
        if self.transport is None:  # still in the TLS handshake: nothing can be said
            self.abort()
            return
        self.send(error_frame(code, message, True))
        self.close()

    def close(self) -> None:
        if self.closing_since is None:
            self.closing_since = time.monotonic()
            self._free_memory()  # what it was receiving will not be used
            self._leave()
        if self.transport is None:
            self.abort()
        elif not self.transport.is_closing():
            self._close_after_flush()  # the error frame goes out first; then connection_lost

    def _flushed(self, transport: asyncio.Transport) -> None:
        # A lingering close: send FIN but keep reading (and dropping) until the peer closes
        # too, or CLOSE_GRACE passes. Closing a socket with unread bytes in it makes the kernel
        # send a reset, which can destroy the ERROR frame before the peer has read it: a worker
        # refused in the middle of sending would learn nothing. TLS cannot half-close.
        if transport.can_write_eof():
            try:
                transport.write_eof()
            except OSError:  # the peer is already gone: nothing left to tell it
                transport.abort()
        else:
            transport.close()

    def abort(self) -> None:
        t = self.transport or self._raw
        if t is not None:
            t.abort()
        if self.transport is None:
            self._gone()  # start_tls may never report a transport aborted mid-handshake

    def describe(self) -> str:
        return f"{self.worker_id or 'connection'} from {self.peer_ip}"


def _update_fields(m: dict[str, Any]) -> tuple[int, float, dict[str, float]]:
    """round, num_samples and metrics of an UPDATE, checked: JSON can say anything."""
    round_, n = m.get("round"), m.get("num_samples")
    if type(round_) is not int or type(n) not in (int, float):
        raise ProtocolError(ErrorCode.BAD_FRAME, "UPDATE needs an integer round and a number "
                                                 "num_samples")
    try:
        num_samples = float(n)
    except OverflowError:  # a 400-digit integer is valid JSON
        raise ProtocolError(ErrorCode.BAD_FRAME, "num_samples is out of range") from None
    metrics: dict[str, float] = {}
    raw = m.get("metrics")
    if isinstance(raw, dict):
        for k, v in list(raw.items())[:MAX_METRICS]:
            if type(v) in (int, float):
                try:
                    f = float(v)
                except OverflowError:
                    continue
                if math.isfinite(f):
                    metrics[k[:64]] = f
    return round_, num_samples, metrics


def _id_not_in_cert(wid: str, names: list[str]) -> str:
    if not names:
        return (f"worker id {wid!r} refused: your client certificate has no common name or DNS "
                "name, and this chief requires the worker id to be one; make the certificate "
                "with 'fedberry certs --client NAME'")
    listed = " or ".join(repr(n) for n in names)
    return (f"worker id {wid!r} is not the name in your client certificate ({listed}): this "
            "chief requires a worker's id to be its certificate's name, so that no worker can "
            f"take another's place. Leave out --worker-id (the worker then uses its "
            f"certificate's name), pass --worker-id {names[0]}, or give this worker a "
            f"certificate made with 'fedberry certs --client {wid}'")


def _chief_tls_message(exc: BaseException) -> str:
    if isinstance(exc, (asyncio.TimeoutError, ConnectionAbortedError)) and "longer" in str(exc):
        return "the handshake did not complete in time"
    try:
        from fedberry.certs import describe_tls_error
    except ImportError:
        return str(exc)
    return describe_tls_error(exc, role="chief")


class TcpChief:
    """Accepts workers on ``host:port`` and serves them with ``server``."""

    def __init__(self, server: ChiefServer, host: str, port: int,
                 options: ListenOptions | None = None) -> None:
        self.server = server
        self.host, self.port = host, port
        self.options = options or ListenOptions()
        self.connections: set[_ChiefConnection] = set()
        self.budget = ReceiveBudget(self.options.receive_memory)
        # What the budget lets in at once is what the chief reads into: keep that much.
        server.buffers.max_bytes = max(server.buffers.max_bytes, self.options.receive_memory)
        # address -> (failed authentications, monotonic time of the last), oldest first
        self._failures: dict[str, tuple[int, float]] = {}
        self._aserver: asyncio.base_events.Server | None = None
        self._sweeper: asyncio.Future[None] | None = None
        self._check_exposure()

    def _check_exposure(self) -> None:
        o = self.options
        if o.insecure:
            # Printed as well as logged: the operator must see this even with logging off.
            msg = (f"!!! INSECURE: serving on {self.host} "
                   f"{'WITHOUT TLS' if o.ssl_context is None else 'with TLS'}"
                   f"{'' if o.token else ' and WITHOUT A TOKEN'}. Anyone who can reach this port "
                   f"can {'read and forge the traffic' if o.ssl_context is None else 'join'}"
                   f"{' and join' if not o.token and o.ssl_context is None else ''}. "
                   "Use --insecure only on a network you trust.")
            log.warning(msg)
            print(msg, file=sys.stderr, flush=True)
        if is_loopback(self.host):
            return
        if o.ssl_context is None and not o.insecure:
            raise ValueError(f"refusing to serve plain TCP on {self.host}: traffic would be "
                             "readable and forgeable on the network. Give --tls-cert/--tls-key "
                             "(see 'fedberry certs'), or pass --insecure on a network you trust.")
        if not o.token and not o.insecure and not o.require_client_cert:
            raise ValueError(f"refusing to serve on {self.host} without a token: anyone could "
                             "join. Give --token, --token-file or FEDBERRY_TOKEN (or require "
                             "client certificates with --client-ca), or pass --insecure.")

    async def start(self) -> tuple[str, int]:
        self.server.bind_loop()
        loop = asyncio.get_running_loop()
        # No ssl= here: each connection is admitted first, then upgraded with start_tls.
        self._aserver = await loop.create_server(
            lambda: _ChiefConnection(self), self.host, self.port,
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
        if self._sweeper is not None:
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
        o = self.options
        why = None
        if len(self.connections) >= o.max_connections:
            why = "the chief has too many connections; retry later"
        elif sum(1 for c in self.connections if c.peer_ip == conn.peer_ip
                 and c.state != "joined") >= o.max_pending_per_address:
            why = f"too many connections from {conn.peer_ip} are still handshaking; retry later"
        if why is None:
            self.connections.add(conn)
            return True
        if conn.transport is not None:
            conn.fail(ErrorCode.BUSY, why)  # plain TCP: the worker retries with backoff
        else:
            log.warning("refusing a connection from %s: %s", conn.peer_ip, why)
            conn.abort()  # TLS: no handshake for a refused peer; the worker retries
        return False

    def auth_delay(self, ip: str) -> float:
        """Seconds to hold the answer to an AUTH from ``ip``."""
        o = self.options
        count, last = self._failures.get(ip, (0, 0.0))
        if count < o.auth_failures_free or time.monotonic() - last > o.auth_memory:
            return 0.0
        return min(o.auth_delay_max, o.auth_delay_base * 2.0 ** (count - o.auth_failures_free))

    def auth_failed(self, ip: str) -> int:
        """Count a failed authentication from ``ip``; returns its recent failures."""
        now = time.monotonic()
        count, last = self._failures.pop(ip, (0, 0.0))  # re-inserted last: oldest stay first
        if now - last > self.options.auth_memory:
            count = 0
        self._failures[ip] = (count + 1, now)
        while len(self._failures) > 10_000:  # bounded memory under a spray of addresses
            self._failures.pop(next(iter(self._failures)))
        return count + 1

    async def _sweep(self) -> None:
        o = self.options
        # The chief's heartbeat: a joined worker that has been quiet for a while gets a PING, so
        # that a connection dead without a FIN (a Pi unplugged) is found from this side too.
        ping_every = max(1.0, o.idle_timeout / 4)
        while True:
            await asyncio.sleep(0.5)
            now = time.monotonic()
            for conn in list(self.connections):
                if conn.closing_since is not None:
                    if now - conn.closing_since > CLOSE_GRACE:
                        conn.abort()  # it does not take its last frame: stop waiting
                elif conn.state == "auth-wait":
                    pass  # held back on purpose, for at most auth_delay_max
                elif conn.state != "joined":
                    if now - conn.opened > o.handshake_timeout:
                        conn.fail(ErrorCode.TIMEOUT, "handshake not completed in time")
                elif conn._waiting_for:
                    # Waiting its turn to be read: its silence is ours. The pings below keep
                    # the worker from thinking us dead meanwhile.
                    conn.last_seen = now
                    if now - conn.last_ping > ping_every:
                        conn.ping()
                elif now - conn.last_seen > o.idle_timeout:
                    conn.fail(ErrorCode.TIMEOUT, f"silent for {o.idle_timeout:.0f} s")
                elif now - max(conn.last_seen, conn.last_ping) > ping_every:
                    conn.ping()
