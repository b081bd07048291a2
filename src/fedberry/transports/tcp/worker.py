"""A worker's TCP connection: one connection for the whole run, heartbeats, and reconnects with
exponential backoff and jitter, on the worker's own event-loop thread. The conversation (the
handshake, the chief's proof, field checks, limits) is ``protocol.WorkerConnection``'s: this
module moves its bytes, runs the timers and turns its events into the session's answers.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import functools
import importlib.metadata
import logging
import random
import ssl
import sys
import time
from collections.abc import Sequence
from typing import Any

import numpy as np

from fedberry import codecs
from fedberry.certs import describe_tls_error
from fedberry.errors import AuthenticationError, ChiefUnreachable, FederationError, from_code
from fedberry.protocol.connection import WorkerConnection, WorkerState
from fedberry.protocol.encodings import SECURE_UPDATE_CODEC
from fedberry.protocol.frames import (
    EncodedFrame,
    ErrorCode,
    Limits,
    ProtocolError,
    Spec,
    spec_mismatch,
    spec_of,
)
from fedberry.protocol.messages import (
    Auth,
    Bye,
    Challenge,
    Error,
    EvalResult,
    Global,
    Hello,
    Init,
    Masked,
    Message,
    Ping,
    Pong,
    SecAgg,
    Update,
    Welcome,
    to_frame,
)
from fedberry.protocol.spec import RETRIED_CODES
from fedberry.secagg.errors import SecAggError
from fedberry.transports.secure_sync import SecureSync
from fedberry.transports.tcp.stream import _FrameWriter


@functools.cache
def agent() -> str:
    """What this worker says it runs, in HELLO (the chief's status page shows it): the
    installed distribution's version (the package's ``__version__`` is above this layer)."""
    try:
        version = importlib.metadata.version("fedberry")
    except importlib.metadata.PackageNotFoundError:  # run from a source tree, not installed
        version = "unknown"
    return f"fedberry/{version} python/{sys.version.split()[0]}"


log = logging.getLogger("fedberry.tcp")

# While a worker waits for the round's model, it says so after this many seconds, then at
# doubling intervals (at most every 300 s).
WAITING_NOTE_EVERY = 10.0


# ============================================================================================
# Worker side
# ============================================================================================
class _Lost:
    def __init__(self, reason: str) -> None:
        self.reason = reason


class _Broken:
    """The chief broke the protocol (``framing``: the byte stream itself is lost)."""

    def __init__(self, exc: ProtocolError, framing: bool) -> None:
        self.exc, self.framing = exc, framing


class _WorkerProtocol(_FrameWriter, asyncio.BufferedProtocol):
    def __init__(self, session: TcpSession) -> None:
        self.session = session
        self.conn = WorkerConnection(session.token, session._spec, cap=session.limits)
        self.queue: asyncio.Queue[Message | _Lost | _Broken] = asyncio.Queue()
        self.transport: asyncio.Transport | None = None
        self.last_seen = time.monotonic()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self._init_writer()

    def get_buffer(self, sizehint: int) -> memoryview:
        try:
            return self.conn.get_buffer()
        except ProtocolError:
            return memoryview(bytearray(1 << 16))

    def buffer_updated(self, nbytes: int) -> None:
        self.last_seen = time.monotonic()
        self.session.bytes_received += nbytes
        try:
            events = self.conn.buffer_updated(nbytes)
        except ProtocolError as exc:
            self.queue.put_nowait(_Broken(exc, self.conn.decoder.broken))
            if self.transport:
                self.transport.abort()
            return
        for event in events:
            if isinstance(event, Ping):
                self.send(Pong())
            elif not isinstance(event, Pong):
                self.queue.put_nowait(event)

    def connection_lost(self, exc: Exception | None) -> None:
        self.queue.put_nowait(_Lost(f"connection lost ({exc or 'closed by the chief'})"))

    def send(self, msg: Message | EncodedFrame) -> None:
        if (self.transport is not None and not self.transport.is_closing()
                and self.conn.state is not WorkerState.CLOSED):
            frame = self.conn.send(msg)
            self.session.bytes_sent += frame.nbytes
            self._queue(frame)


class _Retryable(Exception):
    pass


class _ChiefSaid(_Retryable):
    """The chief refused for now (busy, timeout) in an ERROR frame: try again later. Not a
    silent close, so it never counts towards the TLS hints."""


class _Silent(_Retryable):
    """The chief accepted the connection but did not answer the handshake in time."""


class TcpSession:
    """A worker's connection to a TCP chief. Its methods are coroutines run on the worker's own
    event-loop thread (see ``worker.Worker``), so heartbeats go on while the user trains.

    Every attempt's waits (the TCP connect, CHALLENGE, WELCOME) end by the attempt's budget
    (``connect_timeout`` for ``join``, ``reconnect_timeout`` for a reconnect) and each handshake
    answer within ``handshake_timeout``: a listener that accepts and never speaks costs a retry,
    not a hung ``join``. Once WELCOME is in, the heartbeat's ``idle_timeout`` watches the chief:
    the model may wait for the round, as long as the chief answers pings."""

    def __init__(self, host: str, port: int, *, token: str, worker_id: str,
                 ssl_context: ssl.SSLContext | None = None, server_hostname: str | None = None,
                 connect_timeout: float = 60.0, reconnect_timeout: float = 300.0,
                 heartbeat: float = 5.0, idle_timeout: float = 60.0,
                 limits: Limits | None = None, codec: str = "none",
                 handshake_timeout: float = 30.0) -> None:
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
        # Above the chief's longest hold of an answer to AUTH (ListenOptions.auth_delay_max, 8 s),
        # so that a worker behind the address of someone guessing tokens still gets in.
        self.handshake_timeout = handshake_timeout
        self.waiting_note_every = WAITING_NOTE_EVERY
        self._deadline = float("inf")  # the end of the current attempt's budget (_with_retries)
        self.limits = limits or Limits()
        self.bytes_sent = 0
        self.bytes_received = 0
        self.reconnects = 0
        self.warnings: list[str] = []
        self._proto: _WorkerProtocol | None = None
        self._tls_closes = 0  # consecutive connections closed before CHALLENGE
        self._spec: Spec = ()
        self._names: tuple[str, ...] | None = None  # the tensors' names, for the chief's file
        self._init_arrays: Sequence[np.ndarray] = ()
        # The global model as the chief holds it, kept for delta codecs (q8) both ways.
        self._reference: list[np.ndarray] | None = None
        self._downlink = "none"  # how the chief sends the model (its WELCOME says)
        self.dp_clip: float | None = None
        self.secure = False  # the chief aggregates securely (its WELCOME says)
        self.require_secure = False  # refuse a chief that does not (Worker(require_secure_...))
        self._residual: list[np.ndarray] | None = None  # error feedback of a lossy codec
        # Secure steps are answered on one thread of their own (_secure_step), one at a time.
        self._secure_pool: concurrent.futures.ThreadPoolExecutor | None = None
        self._answering: tuple[_WorkerProtocol | None, SecAgg, SecureSync,
                               asyncio.Future[SecAgg | Masked | None]] | None = None
        self._hb_task: asyncio.Task[None] | None = None
        self._have: str | None = None
        self.round_config: dict[str, Any] = {}  # what came with the last GLOBAL
        self.evaluates = False  # answer evaluation requests (Worker(evaluate=...)); set first
        self.eval_requested: int | None = None  # the last GLOBAL asked for an evaluation

    # -- public coroutines -------------------------------------------------------------------
    async def join(self, arrays: Sequence[np.ndarray], names: Sequence[str] | None = None
                   ) -> tuple[int, list[np.ndarray], bool]:
        self._spec = spec_of(arrays)
        self._names = tuple(names) if names is not None else None
        self._init_arrays = arrays
        self._have = codecs.digest(arrays)
        return await self._with_retries(self._join_once, self.connect_timeout)

    async def sync(self, round_: int, arrays: Sequence[np.ndarray], num_samples: float,
                   metrics: dict[str, Any]) -> tuple[int, list[np.ndarray], bool]:
        # The chief would refuse an update of another model (a float64 array where the model
        # joined with float32): say so here, before anything is sent.
        why = spec_mismatch(self._spec, spec_of(arrays))
        if why:
            raise ValueError(f"refusing to send this update: {why} (the model this worker "
                             "joined with; convert the arrays, e.g. with .astype)")
        # Encoded once: a resend after a reconnect sends the same bytes, and the chief counts
        # a repeated update for a round once. Secure: only the report that this worker is at
        # its sync point; the update itself goes masked, in the steps that follow.
        secure = self.secure
        codec, wire = (SECURE_UPDATE_CODEC, ()) if secure else self._encode_update(arrays)
        try:
            frame = to_frame(Update(round_, num_samples, wire, metrics, codec))
        except ProtocolError as exc:  # what the chief would refuse: the caller's mistake
            raise ValueError(exc.message) from None
        if secure and self._reference is None:
            raise FederationError("this worker holds no global model to take its change from",
                                  "protocol")
        steps = (SecureSync(round_, arrays, self._reference or (), num_samples) if secure
                 else None)
        self._init_arrays = ()
        self._have = None

        async def once() -> tuple[int, list[np.ndarray], bool]:
            if self._proto is None:
                await self._connect(want_model=False)
            assert self._proto is not None
            if self.secure != secure:
                raise FederationError("the chief changed between plain and secure aggregation "
                                      "while this worker was reconnecting; restart the worker",
                                      "protocol")
            self._proto.send(frame)
            return await self._await_global(steps)

        note = asyncio.ensure_future(self._note_waiting(round_))
        try:
            return await self._with_retries(once, self.reconnect_timeout)
        finally:
            note.cancel()

    async def _note_waiting(self, round_: int) -> None:
        """While ``sync`` waits for round ``round_``'s model, say so every so often: the round
        closes when the chief has every worker's update (or its quorum, at its deadline)."""
        started, wait = time.monotonic(), self.waiting_note_every
        while True:
            await asyncio.sleep(wait)
            wait = min(wait * 2, max(self.waiting_note_every, 300.0))  # a long wait: fewer lines
            log.info("worker %s: waiting for the chief to close round %d (%.0f s so far): it "
                     "waits for the other workers' updates", self.worker_id, round_ + 1,
                     time.monotonic() - started)

    async def close(self) -> None:
        if self._hb_task:
            self._hb_task.cancel()
        if self._secure_pool is not None:
            # A step still being answered finishes on its thread; its answer is not sent.
            self._secure_pool.shutdown(wait=False, cancel_futures=True)
            self._secure_pool = None
        if self._proto is not None and self._proto.transport is not None:
            self._proto.send(Bye())
            self._proto._close_after_flush()
            await asyncio.sleep(0)
        self._proto = None

    def drop_connection(self) -> None:
        """Close the socket abruptly (tests use this to simulate a network failure)."""
        if self._proto is not None and self._proto.transport is not None:
            self._proto.transport.abort()

    def _encode_update(self, arrays: Sequence[np.ndarray]
                       ) -> tuple[str, Sequence[np.ndarray]]:
        """The codec an update goes as, and its tensors on the wire."""
        codec = self.codec
        if codec.needs_reference and self._reference is None:
            codec = codecs.CODECS["none"]  # nothing to take a difference from (yet)
        if codec.name == "none":
            return "none", arrays
        if codec.needs_reference and self._residual is None:
            self._residual = [np.zeros(a.shape, np.result_type(a.dtype, np.float32))
                              if a.dtype.kind == "f" else np.zeros(0) for a in arrays]
        try:
            wire = codec.encode(arrays, self._reference, self._residual)
        except OverflowError as exc:
            log.info("worker %s: update sent uncompressed: %s", self.worker_id, exc)
            return "none", arrays
        return codec.name, wire

    # -- internals ---------------------------------------------------------------------------
    async def _with_retries(self, fn: Any, budget: float) -> Any:
        deadline = self._deadline = time.monotonic() + budget
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
                log.info("worker %s: %s; reconnecting in %.1f s (attempt %d; giving up %.0f s "
                         "from the first)", self.worker_id, exc, delay, attempt + 2, budget)
                await asyncio.sleep(delay)
                attempt += 1
                self.reconnects += 1

    async def _join_once(self) -> tuple[int, list[np.ndarray], bool]:
        await self._connect(want_model=True)
        return await self._await_global()

    def _time_left(self, most: float) -> float:
        """How long the next wait may take: ``most``, cut to what is left of the budget (but
        not to nothing: the last attempt still gets a moment)."""
        return max(min(most, self._deadline - time.monotonic()), 0.5)

    async def _connect(self, want_model: bool) -> None:
        loop = asyncio.get_running_loop()
        tls = self.ssl_context is not None
        try:
            _, proto = await asyncio.wait_for(loop.create_connection(
                lambda: _WorkerProtocol(self), self.host, self.port, ssl=self.ssl_context,
                server_hostname=self.server_hostname if tls else None), self._time_left(30))
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
        try:
            hello = Hello(self.worker_id, agent=agent())
        except ProtocolError as exc:
            proto.transport.abort()  # type: ignore[union-attr]
            raise FederationError(f"this worker cannot join: {exc.message}",
                                  exc.code.value) from None
        proto.send(hello)
        try:
            await self._expect_soon(Challenge, "HELLO")
        except (_Silent, _ChiefSaid):
            raise  # silence, or a refusal in words, is not the silent close counted below
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
            else:
                # A TLS chief takes our HELLO for a broken TLS handshake and closes without a
                # word (it cannot answer in plain frames from inside ssl; asyncio sends no
                # alert, gh-98078); a plain chief that refuses says why in an ERROR frame. So
                # ask the port for a TLS handshake: if it answers, that is the reason, said at
                # once. Else silence three times in a row still says it may be TLS.
                self._tls_closes += 1
                if await self._speaks_tls():
                    raise FederationError(
                        f"the chief at {self.host}:{self.port} speaks TLS (it closed this plain "
                        "connection right after HELLO, and answers a TLS handshake): give this "
                        "worker --ca (Python: ca=), the chief's CA certificate: ca.pem from "
                        "'fedberry certs'", "tls") from None
                if self._tls_closes >= 3:
                    raise FederationError(
                        f"the chief at {self.host}:{self.port} closed the connection right after "
                        f"HELLO, {self._tls_closes} times: is it running with TLS? Give this "
                        "worker --ca (the chief's CA certificate, from 'fedberry certs')",
                        "tls") from None
            raise
        self._tls_closes = 0
        # With the digest of the model we hold, the chief need not send it (codec "unchanged").
        proto.send(Auth(self._spec, want_model, self._have if want_model else None,
                        evaluates=self.evaluates, names=self._names))
        welcome = await self._expect_soon(Welcome, "AUTH")  # its proof checked by the connection
        self._downlink = welcome.downlink
        self.dp_clip = welcome.dp_clip  # differential privacy's bound: Worker.sync clips to it
        if self.require_secure and not welcome.secure:
            proto.transport.abort()  # type: ignore[union-attr]
            raise FederationError(f"this worker sends its updates only under secure "
                                  f"aggregation (--require-secagg), and the chief at "
                                  f"{self.host}:{self.port} does not aggregate securely: start "
                                  "it with --secagg, or leave out --require-secagg", "secagg")
        if welcome.secure and not self.secure and self.codec.name != "none":
            log.info("worker %s: the chief aggregates securely: updates go masked in its ring, "
                     "not as %s", self.worker_id, self.codec.name)
        self.secure = welcome.secure
        if self.secure:
            try:
                import cryptography  # noqa: F401  (the secagg extra: keys, masks, shares)
            except ImportError:
                proto.transport.abort()  # type: ignore[union-attr]
                raise FederationError("the chief aggregates securely, and this worker needs "
                                      "the cryptography package for it: pip install "
                                      "'fedberry[secagg]'", "secagg") from None
        if welcome.need_init:
            if not self._init_arrays:  # we are past join(): the chief lost its model
                proto.transport.abort()  # type: ignore[union-attr]
                raise FederationError("the chief has no model any more: it restarted without "
                                      "its checkpoint (restart it with --resume)", "protocol")
            proto.send(Init(self._init_arrays))
        if self._hb_task is None or self._hb_task.done():
            self._hb_task = asyncio.ensure_future(self._heartbeat())

    async def _speaks_tls(self) -> bool:
        """Whether the chief's port completes a TLS handshake. Nothing is verified or sent over
        it: it only tells a worker without ``--ca`` why its plain connection was closed."""
        probe = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        probe.check_hostname = False
        probe.verify_mode = ssl.CERT_NONE
        try:
            transport, _ = await asyncio.wait_for(asyncio.get_running_loop().create_connection(
                asyncio.Protocol, self.host, self.port, ssl=probe,
                server_hostname=self.host), self._time_left(5))
        except (OSError, asyncio.TimeoutError):  # ssl.SSLError is an OSError
            return False
        transport.abort()
        return True

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
        return describe_tls_error(exc, cert_names=names)

    async def _expect_soon(self, kind: type[Any], answering: str) -> Any:
        """``_expect(kind)``, the chief's answer to our ``answering``, within the handshake's
        time; a silent chief is dropped and retried."""
        wait = self._time_left(self.handshake_timeout)
        try:
            return await asyncio.wait_for(self._expect(kind), wait)
        except asyncio.TimeoutError:
            proto, self._proto = self._proto, None
            if proto is not None and proto.transport is not None:
                proto.transport.abort()
            raise _Silent(f"the chief accepted the connection but did not answer {answering} "
                          f"within {wait:.1f} s") from None

    async def _expect(self, kind: type[Any]) -> Any:
        event = await self._next_event()
        if not isinstance(event, kind):  # the connection lets nothing else through: a bug
            raise FederationError(f"protocol error: expected {kind.TYPE.name}, got "
                                  f"{event.TYPE.name}", "protocol")
        return event

    async def _next_event(self) -> Message:
        proto = self._proto
        if proto is None:
            raise _Retryable("not connected")
        item = await proto.queue.get()
        if isinstance(item, _Lost):
            self._proto = None
            raise _Retryable(item.reason)
        if isinstance(item, _Broken):
            self._proto = None
            exc = item.exc
            if item.framing:  # garbled bytes: a broken link as much as a broken chief
                raise _Retryable(f"the chief sent a bad frame: {exc.message}")
            if exc.code == ErrorCode.AUTH_FAILED:
                raise AuthenticationError(exc.message, exc.code.value)
            raise from_code(exc.code.value, f"protocol error: {exc.message}")
        if isinstance(item, Error):
            if item.fatal:
                if item.code in RETRIED_CODES:
                    raise _ChiefSaid(f"chief said: {item.message}")
                if item.code == ErrorCode.SHUTDOWN.value:  # not a refusal: the run is over
                    raise from_code(item.code, f"{item.message} before this round closed (it "
                                    "was stopped, or ran its last round without this worker)")
                hint = _MISMATCH_HINT if item.code == ErrorCode.SPEC_MISMATCH.value else ""
                raise from_code(item.code, f"the chief refused: {item.message}{hint}")
            self.warnings.append(item.message)
            log.warning("worker %s: chief says: %s", self.worker_id, item.message)
            return await self._next_event()
        return item

    async def _await_global(self, steps: SecureSync | None = None
                            ) -> tuple[int, list[np.ndarray], bool]:
        """The round's model; meanwhile, in a secure round, ``steps`` answers the chief's."""
        event = await self._next_event()
        while isinstance(event, SecAgg):
            self._secure_step(steps, event)
            await self._secure_answered()
            event = await self._next_event()
        if not isinstance(event, Global):  # the connection lets nothing else through: a bug
            raise FederationError(f"protocol error: expected GLOBAL, got {event.TYPE.name}",
                                  "protocol")
        g = event
        reference: Sequence[np.ndarray] | None = None
        if g.codec == "unchanged":
            reference = self._init_arrays or None
        elif g.codec == "q8":
            # The change since the model of round g.base, which the connection checked is the
            # one it received last.
            reference = self._reference
        if g.codec in ("unchanged", "q8") and not reference:
            raise FederationError(f"protocol error: the chief sent a model as {g.codec!r} but "
                                  "this worker holds none", "protocol")
        try:
            arrays = codecs.get(g.codec).decode(list(g.tensors), self._spec, reference)
        except ProtocolError as exc:
            raise FederationError(f"the chief sent a bad model: {exc.message}",
                                  "protocol") from None
        if self.codec.needs_reference or self._downlink == "q8" or self.secure:
            self._reference = [np.array(a) for a in arrays]  # the caller may change its own
        self.round_config = dict(g.config)
        self.eval_requested = g.round if g.evaluate else None
        return g.round, arrays, g.done

    def _secure_step(self, steps: SecureSync | None, event: SecAgg) -> None:
        """Start answering one of the chief's secure steps, off the event loop.

        Masking a large update (its encoding, then one ChaCha20 stream per neighbour) takes
        seconds, and the Shamir shares of a large group many milliseconds: ``steps.answer``
        runs on this session's one secure-step thread, so that the loop meanwhile answers the
        chief's pings and reads its frames (numpy and the cipher let go of the GIL on large
        buffers). ``_await_global`` then waits in ``_secure_answered`` before it takes the
        next event, so ``steps`` is only ever used by one thread at a time, in step order.
        """
        self._answering = None
        if steps is None or steps.done:
            log.warning("worker %s: ignoring the chief's secure step '%s' of round %d: this "
                        "worker is not taking part in it", self.worker_id, event.step,
                        event.round + 1)
            return
        if self._secure_pool is None:
            self._secure_pool = concurrent.futures.ThreadPoolExecutor(
                1, thread_name_prefix=f"fb-secagg-{self.worker_id}"[:40])
        work = asyncio.get_running_loop().run_in_executor(self._secure_pool, steps.answer,
                                                          event)
        self._answering = (self._proto, event, steps, work)

    async def _secure_answered(self) -> None:
        """Send the answer ``_secure_step`` started; a refusal is said once and ends this
        worker's part in the round (the chief counts it a dropout; the model still comes).

        The wait is the work's own (no I/O, no lock: it ends); the step's deadline is the
        chief's, which closes the step without a late answer and refuses it when it comes.
        An answer is sent only on the connection its step came by, if that is still open."""
        pending, self._answering = self._answering, None
        if pending is None:
            return
        proto, event, steps, work = pending
        try:
            answer = await work
        except SecAggError as exc:
            log.warning("worker %s: refusing the chief's secure step '%s': %s", self.worker_id,
                        event.step, exc)
            self.warnings.append(str(exc))
            answer = steps.abstain(str(exc))
        if answer is not None and proto is not None and proto is self._proto:
            proto.send(answer)

    async def send_eval(self, result: EvalResult) -> None:
        """Answer the evaluation request of the GLOBAL received last, on the connection it
        came by (after a reconnect the chief asks afresh: nothing is sent)."""
        proto = self._proto
        if proto is not None and proto.conn.eval_asked == result.round:
            proto.send(result)

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
            proto.send(Ping())


# A chief started with a model of its own (the CLI's default: the demo's mlp, in torch layout)
# refuses every other: say what to change on the chief.
_MISMATCH_HINT = (". The chief was started with another model: start it with --model none "
                  "(serve(initial=None)) to take the first worker's model, or with the "
                  "--model and --framework these workers train")

_TLS_CLOSED_HINT = ("if the chief requires client certificates, it did not accept yours: it must "
                    "be signed by the chief's --client-ca and not expired (--cert/--key, made "
                    "with 'fedberry certs --client NAME'); otherwise the chief may be busy")


def _tls_message(exc: ssl.SSLError) -> str:
    return describe_tls_error(exc)
