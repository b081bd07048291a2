"""A worker's TCP connection: one connection for the whole run, the handshake, heartbeats, and
reconnects with exponential backoff and jitter, on the worker's own event-loop thread.
"""

from __future__ import annotations

import asyncio
import logging
import random
import ssl
import time
from collections.abc import Sequence
from typing import Any

import numpy as np

from fedberry import codecs
from fedberry.errors import AuthenticationError, ChiefUnreachable, FederationError, from_code
from fedberry.protocol import auth
from fedberry.protocol.frames import (
    EncodedFrame,
    Frame,
    FrameDecoder,
    Limits,
    MsgType,
    ProtocolError,
    Spec,
    encode,
    spec_of,
    spec_to_json,
)
from fedberry.transports.tcp.stream import _FrameWriter

log = logging.getLogger("fedberry.tcp")


# ============================================================================================
# Worker side
# ============================================================================================
class _Lost:
    def __init__(self, reason: str) -> None:
        self.reason = reason


class _WorkerProtocol(_FrameWriter, asyncio.BufferedProtocol):
    def __init__(self, session: TcpSession) -> None:
        self.session = session
        # Until the chief has said WELCOME, only small frames: a wrong address must not make us
        # allocate a model's worth of memory.
        self.decoder = FrameDecoder(Limits(max_meta_bytes=1 << 20, max_tensors=0, max_payload=0))
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
            if f.type == MsgType.WELCOME:
                # The model may follow WELCOME in the same read, before the session has looked
                # at it: allow it now (the session still checks the chief's proof and aborts on
                # a bad one; a forged WELCOME gains exactly one buffer of our own model's size).
                self.decoder.expected = self.session._spec
                self.decoder.limits = self.session.model_limits()
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
                 limits: Limits | None = None, codec: str = "none") -> None:
        self.host, self.port = host, port
        self.codec = codecs.get(codecs.check_name(codec, codecs.UPLINK_CODECS, "update"))
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
        self._tls_closes = 0  # consecutive TLS connections closed before CHALLENGE
        self._spec: Spec = ()
        self._init_arrays: Sequence[np.ndarray] = ()
        # The global model as the chief holds it, kept for delta codecs (q8) both ways.
        self._reference: list[np.ndarray] | None = None
        self._reference_round: int | None = None
        self._downlink = "none"  # how the chief sends the model (its WELCOME says)
        self._residual: list[np.ndarray] | None = None  # error feedback of a lossy codec
        self._hb_task: asyncio.Task[None] | None = None
        self._have: str | None = None

    # -- public coroutines -------------------------------------------------------------------
    async def join(self, arrays: Sequence[np.ndarray]) -> tuple[int, list[np.ndarray], bool]:
        self._spec = spec_of(arrays)
        self._init_arrays = arrays
        self._have = codecs.digest(arrays)
        return await self._with_retries(self._join_once, self.connect_timeout)

    async def sync(self, round_: int, arrays: Sequence[np.ndarray], num_samples: float,
                   metrics: dict[str, Any]) -> tuple[int, list[np.ndarray], bool]:
        # Encoded once: a resend after a reconnect sends the same bytes, and the chief counts
        # a repeated update for a round once.
        meta: dict[str, Any] = {"round": round_, "num_samples": num_samples, "metrics": metrics}
        frame = encode(MsgType.UPDATE, *self._encode_update(meta, arrays))
        self._init_arrays = ()
        self._have = None

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

    def _encode_update(self, meta: dict[str, Any], arrays: Sequence[np.ndarray]
                       ) -> tuple[dict[str, Any], Sequence[np.ndarray]]:
        codec = self.codec
        if codec.needs_reference and self._reference is None:
            codec = codecs.CODECS["none"]  # nothing to take a difference from (yet)
        if codec.name == "none":
            return meta, arrays
        if codec.needs_reference and self._residual is None:
            self._residual = [np.zeros(a.shape, np.result_type(a.dtype, np.float32))
                              if a.dtype.kind == "f" else np.zeros(0) for a in arrays]
        try:
            wire = codec.encode(arrays, self._reference, self._residual)
        except OverflowError as exc:
            log.info("worker %s: update sent uncompressed: %s", self.worker_id, exc)
            return meta, arrays
        return {**meta, "codec": codec.name}, wire

    def model_limits(self) -> Limits:
        """What the chief may send once it has welcomed us: frames of our model, no larger."""
        # A q8 model carries two tensors (values, scales) per float tensor, in fewer bytes.
        return Limits(max(self.limits.max_meta_bytes, 128 * len(self._spec)),
                      max(2 * len(self._spec), 1),
                      min(self.limits.max_payload, sum(t.nbytes for t in self._spec)))

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
        tls = self.ssl_context is not None
        try:
            _, proto = await asyncio.wait_for(loop.create_connection(
                lambda: _WorkerProtocol(self), self.host, self.port, ssl=self.ssl_context,
                server_hostname=self.server_hostname if tls else None), 30)
        except ssl.SSLCertVerificationError as exc:
            raise FederationError(await self._explain_verify(exc), "tls") from None
        except ssl.SSLError as exc:
            raise FederationError(_tls_message(exc), "tls") from None
        except (ConnectionResetError, ConnectionAbortedError, BrokenPipeError) as exc:
            # Reached the port, then lost the connection: under TLS the chief refuses a peer
            # it cannot admit (busy) and a client certificate it does not trust (TLS 1.2) this
            # way, without a word (gh-98078). Retry, but say what it may be if we give up.
            raise _Retryable(f"connection closed during the handshake ({exc or 'reset'})"
                             + (f"; {_TLS_CLOSED_HINT}" if tls else "")) from None
        except (OSError, asyncio.TimeoutError) as exc:
            raise _Retryable(f"connect failed ({exc or 'timeout'})") from None
        self._proto = proto
        nonce = auth.new_nonce()
        proto.send(encode(MsgType.HELLO, {"worker_id": self.worker_id, "nonce": nonce}))
        try:
            challenge = await self._expect(MsgType.CHALLENGE)
        except _Retryable:
            if tls:
                # TLS 1.3: the handshake completed on our side, then the chief closed without
                # a word. Its client-certificate check does that; a crash between handshake and
                # CHALLENGE would have to happen three times in a row.
                self._tls_closes += 1
                if self._tls_closes >= 3:
                    raise FederationError(f"the chief closed the TLS connection right after the "
                                          f"handshake, {self._tls_closes} times: "
                                          f"{_TLS_CLOSED_HINT}", "tls") from None
            raise
        self._tls_closes = 0
        chief_nonce = str(challenge.meta.get("nonce", ""))
        hello: dict[str, Any] = {"proof": auth.worker_proof(self.token, chief_nonce, nonce),
                                 "spec": spec_to_json(self._spec), "want_model": want_model}
        if want_model and self._have:
            hello["have"] = self._have  # the chief need not send what we hold already
        proto.send(encode(MsgType.AUTH, hello))
        welcome = await self._expect(MsgType.WELCOME)
        self._downlink = str(welcome.meta.get("downlink", "none"))
        if not auth.verify(auth.chief_proof(self.token, chief_nonce, nonce),
                           welcome.meta.get("proof")):
            proto.transport.abort()  # type: ignore[union-attr]
            raise AuthenticationError("the chief could not prove it knows the token: wrong "
                                      "token on one side, or not the chief you meant",
                                      "auth_failed")
        if welcome.meta.get("need_init"):
            if not self._init_arrays:  # we are past join(): the chief lost its model
                proto.transport.abort()  # type: ignore[union-attr]
                raise FederationError("the chief has no model any more: it restarted without "
                                      "its checkpoint (restart it with --resume)", "protocol")
            proto.send(encode(MsgType.INIT, {}, self._init_arrays))
        if self._hb_task is None or self._hb_task.done():
            self._hb_task = asyncio.ensure_future(self._heartbeat())

    async def _explain_verify(self, exc: ssl.SSLCertVerificationError) -> str:
        """The sentence for a refused chief certificate; for a name mismatch, with the names
        the certificate does have (fetched over a second connection that skips only the name
        check: the chain is still verified against our CA)."""
        names = None
        if exc.verify_code in (62, 64) and self.ssl_context is not None:  # host / IP mismatch
            ctx = self.ssl_context
            ctx.check_hostname = False
            try:
                transport, _ = await asyncio.wait_for(asyncio.get_running_loop().create_connection(
                    asyncio.Protocol, self.host, self.port, ssl=ctx,
                    server_hostname=self.server_hostname), 10)
                cert = transport.get_extra_info("peercert") or {}
                transport.abort()
                names = [v for _kind, v in cert.get("subjectAltName", ())]
            except (OSError, asyncio.TimeoutError):
                names = None  # the plain message will do
            finally:
                ctx.check_hostname = True
        try:
            from fedberry.certs import describe_tls_error
        except ImportError:
            return f"the chief's certificate was refused: {exc.verify_message}"
        return describe_tls_error(exc, cert_names=names)

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
        round_ = frame.meta.get("round")
        if type(round_) is not int or round_ < 0:
            raise FederationError(f"protocol error: GLOBAL with round {round_!r}", "protocol")
        name = frame.meta.get("codec", "none")
        reference: Sequence[np.ndarray] | None = None
        if name == "unchanged":
            reference = self._init_arrays or None
        elif name == "q8":
            # The change since the model of round "base", which must be the one we hold.
            if frame.meta.get("base") != self._reference_round or self._reference is None:
                raise FederationError(f"protocol error: the chief sent the change since round "
                                      f"{frame.meta.get('base')!r}, this worker holds round "
                                      f"{self._reference_round}", "protocol")
            reference = self._reference
        if name in ("unchanged", "q8") and not reference:
            raise FederationError(f"protocol error: the chief sent a model as {name!r} but this "
                                  "worker holds none", "protocol")
        try:
            arrays = codecs.get(name).decode(frame.tensors, self._spec, reference)
        except ProtocolError as exc:
            raise FederationError(f"the chief sent a bad model: {exc.message}",
                                  "protocol") from None
        if self.codec.needs_reference or self._downlink == "q8":
            self._reference = [np.array(a) for a in arrays]  # the caller may change its own
            self._reference_round = round_
        return round_, arrays, frame.meta.get("done") is True

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


_TLS_CLOSED_HINT = ("if the chief requires client certificates, it did not accept yours: it must "
                    "be signed by the chief's --client-ca and not expired (--cert/--key, made "
                    "with 'fedberry certs --client NAME'); otherwise the chief may be busy")


def _tls_message(exc: ssl.SSLError) -> str:
    try:
        from fedberry.certs import describe_tls_error
    except ImportError:
        return f"TLS handshake failed: {exc}"
    return describe_tls_error(exc)
