"""The chief's TCP listener: admission, TLS, timeouts, heartbeats, the auth delay and receive
memory, around one ``protocol.ChiefConnection`` per worker, whose events go to
``chief.runtime.ChiefServer``. The conversation itself (handshake, field checks, limits) is the
connection object's: this module moves bytes and runs timers. ``asyncio.BufferedProtocol`` lets
the event loop read tensor bytes straight into the numpy arrays the connection allocated.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import ssl
import sys
import time
from collections import Counter, deque
from dataclasses import dataclass, field
from typing import Any

from fedberry.certs import cert_names, describe_tls_error
from fedberry.chief.buffers import ReceiveBudget
from fedberry.chief.events import Refused, Traffic
from fedberry.chief.runtime import ChiefServer
from fedberry.protocol.connection import ChiefConnection, ChiefState
from fedberry.protocol.frames import EncodedFrame, ErrorCode, Limits, ProtocolError, Spec
from fedberry.protocol.limits import (
    AUTH_FAILURES_GLOBAL,
    AUTH_FAILURES_GLOBAL_WINDOW,
    MAX_AUTH_WAITING_PER_ADDRESS,
    MIN_UPDATE_RATE,
    REFUSAL_LOG_INTERVAL,
    SEND_QUEUE_SLACK,
    TAKEOVER_PROBE,
    UPDATE_DEADLINE,
    UPDATE_RATE_GRACE,
)
from fedberry.protocol.messages import (
    Auth,
    Bye,
    Challenge,
    Error,
    EvalResult,
    Hello,
    Init,
    Masked,
    Message,
    Ping,
    Pong,
    SecAgg,
    Update,
    Welcome,
)
from fedberry.protocol.spec import RETRIED_CODES
from fedberry.transports.pacing import Pacer, Pacing
from fedberry.transports.tcp.accept import (
    BASE_DESCRIPTORS,
    Acceptor,
    ensure_descriptors,
    listen_socket,
)
from fedberry.transports.tcp.announce import listening_line
from fedberry.transports.tcp.stream import _FrameWriter, is_loopback

log = logging.getLogger("fedberry.tcp")

# Bytes a worker may send before the chief's side of TLS is set up: its HELLO (the worker waits
# for CHALLENGE before anything else), with room to spare; more is a peer not following the
# protocol.
EARLY_BYTES = 64 << 10


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
    # Refused connections still sending their one ERROR frame. With max_connections this is
    # every socket the chief holds: past it, it stops accepting until some close (tcp.accept).
    max_refusing: int = 64
    # Handshakes in flight from one address. Workers behind one home router share an address,
    # but each handshakes in milliseconds; this keeps one address from holding the whole cap.
    # Connections whose answer to AUTH is held back (the auth delay) do not count: a storm of
    # wrong tokens must not keep an honest worker at the same address from handshaking.
    max_pending_per_address: int = 16
    # ... but they have their own cap per address, so that one address cannot hold every
    # connection slot in the delay (limits.MAX_AUTH_WAITING_PER_ADDRESS).
    max_auth_waiting_per_address: int = MAX_AUTH_WAITING_PER_ADDRESS
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
    # All addresses together: past auth_failures_global failures in auth_global_window
    # seconds, every answer to an AUTH waits auth_delay_max (limits.AUTH_FAILURES_GLOBAL).
    auth_failures_global: int = AUTH_FAILURES_GLOBAL
    auth_global_window: float = AUTH_FAILURES_GLOBAL_WINDOW
    # Seconds an update (any frame of tensors) may take to arrive once it holds receive
    # memory; past it, its memory is released, the worker is closed with a sentence and the
    # round goes on without it. None: limits.UPDATE_DEADLINE. A worker trickling its update
    # must not hold the budget forever: the rate floor below stops it much sooner.
    update_deadline: float | None = None
    # Bytes/s below which an update in flight is dropped, once UPDATE_RATE_GRACE seconds have
    # passed (limits.MIN_UPDATE_RATE); 0: no floor.
    min_update_rate: float = MIN_UPDATE_RATE
    update_rate_grace: float = UPDATE_RATE_GRACE
    # Bytes queued for one peer past two global models (limits.SEND_QUEUE_SLACK): a peer over
    # it sends but does not read, and is dropped.
    send_queue_slack: int = SEND_QUEUE_SLACK
    # Lines about refused connections: at most one per reason per this many seconds.
    refusal_log_interval: float = REFUSAL_LOG_INTERVAL
    # A new connection claiming the id of a joined one waits while the holder is pinged for
    # this long: a holder that answers keeps its id (the newcomer is refused with a sentence),
    # one that does not is taken for dead and replaced (limits.TAKEOVER_PROBE).
    takeover_probe: float = TAKEOVER_PROBE
    # Bytes of updates being received at once, all connections together; past it, workers wait
    # their turn with reading paused (TCP holds them back) and the chief's memory stays
    # O(model) whatever the number of workers. One update is always let in. The default lets
    # dozens of small-model workers upload in parallel, which a slow per-worker link needs.
    receive_memory: int = 64 << 20
    # SO_RCVBUF of every accepted connection, bytes; None: the kernel's autotuning. While a
    # worker waits its turn (receive_memory) its update still fills the chief's socket buffer:
    # with a thousand workers of a large model, autotuned buffers held 1.2 GB of waiting
    # updates in the chief's kernel and passed tcp_mem's pressure mark, and the kernel dropped
    # segments (bench/swarm.py, docs/benchmarks.md). A bound caps that at workers x this.
    receive_buffer: int | None = None
    # Paces every connection's bytes through the caller's pacers (transports/pacing.py): the
    # benchmark without root emulates a slow shared link so (docs/slow-link.md). None: full speed.
    pacing: Pacing | None = None
    # This chief's ceiling on a frame from a worker (``ChiefConnection(cap=)``): a joined
    # worker's frames are limited to its model's size, and never past this. None: the
    # protocol's (limits.MAX_PAYLOAD, 4 GiB).
    limits: Limits | None = None


# A connection we decided to close gets this long to take its last frame before it is aborted.
CLOSE_GRACE = 5.0


class _ChiefConnection(_FrameWriter, asyncio.BufferedProtocol):
    """One worker's connection. States (``state``): tls -> the connection object's (hello,
    challenge, auth, welcome; auth-wait while the answer to AUTH is held back) -> joined."""

    def __init__(self, listener: TcpChief) -> None:
        self.listener = listener
        self.server = listener.server
        self.conn = ChiefConnection(listener.options.token, allocate=self._allocate,
                                    cap=listener.options.limits)
        self.transport: asyncio.Transport | None = None  # the TLS transport once TLS is up
        self._raw: asyncio.BaseTransport | None = None
        self._tls = False  # the TLS handshake is in progress
        self._auth_wait = False  # the answer to AUTH is held back (auth_delay)
        self._joined = False
        self._probing = False  # its worker id is held: waiting to hear whether the holder lives
        self.worker_id = ""
        self.agent = ""
        self.peer_ip = "?"
        self.address = "?"  # ip:port, for the chief's log lines
        # Why the connection is being closed, for the "lost" line (fail, connection_lost).
        self._why: str | None = None
        self.opened = self.last_seen = self.last_ping = time.monotonic()
        self.closing_since: float | None = None
        self._bye = False  # the worker left on purpose (else it may come back)
        self._told_to_stop = False  # refused with an error after which a worker does not dial
        self._drain: memoryview | None = None
        self._early = bytearray()  # received while TLS was still being set up (Python 3.10)
        self._early_view: memoryview | None = None
        self._pauses: set[str] = set()  # why reading is paused: "pacer", "auth", "memory"
        self._reserved = 0  # bytes of the frame being received, counted in the budget
        self._receiving_since: float | None = None  # when those bytes were let in
        self._receiving_bytes = 0  # of that frame, received since then
        self._refused = False  # refused at admission: closed at once, not lingering
        self._waiting_for = 0  # bytes queued for in the budget (0: not queued)
        self._granted = False
        self._left = False  # detached from the server (it no longer counts as a member)
        self._traffic = [0, 0]  # bytes up, down not yet reported in a Traffic event
        self.closed = False
        pacing = listener.options.pacing
        self._uplink: Pacer | None = pacing.uplink if pacing is not None else None
        if pacing is not None:
            self._pacer, self._paced_chunk = pacing.downlink, pacing.chunk

    @property
    def state(self) -> str:
        if self._tls:
            return "tls"
        if self._auth_wait:
            return "auth-wait"
        if self._probing:
            return "probe"
        if self._joined:
            return "joined"
        return self.conn.state.value

    # -- asyncio protocol --------------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        if self._raw is not None:
            return  # start_tls does not call this again, but be sure
        self._raw = transport
        peer = transport.get_extra_info("peername")
        self.peer_ip = peer[0] if peer else "?"
        if peer:
            self.address = f"[{peer[0]}]:{peer[1]}" if ":" in peer[0] else f"{peer[0]}:{peer[1]}"
        rcvbuf = self.listener.options.receive_buffer
        sock = transport.get_extra_info("socket")
        if rcvbuf is not None and sock is not None:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        tls = self.listener.options.ssl_context is not None
        if not tls:
            self.transport = transport  # type: ignore[assignment]
            self._init_writer()
        # Admission comes before the TLS handshake, so that the connection cap also bounds
        # handshakes in progress and a refused peer costs no key exchange.
        if not self.listener.admit(self):
            return
        if tls:
            self._tls = True
            asyncio.ensure_future(self._start_tls(transport))

    async def _start_tls(self, raw: asyncio.BaseTransport) -> None:
        o = self.listener.options
        try:
            tls = await asyncio.get_running_loop().start_tls(
                raw, self, o.ssl_context, server_side=True,  # type: ignore[arg-type]
                ssl_handshake_timeout=o.handshake_timeout)
        except Exception as exc:  # OSError and ssl.SSLError mostly; any other still costs one
            # Rate-limited per reason: a flood of connections that never finish TLS is one
            # line a second, while each distinct reason (a worker's wrong CA) is still logged.
            why = _chief_tls_message(exc)
            self.listener.refusals.note(f"tls: {why}",
                                        f"TLS handshake with {self.peer_ip} failed: {why}")
            self.server.events.emit(Refused("tls", why, "", self.peer_ip))
            raw.abort()
            self._gone()
            return
        if tls is None or self.closed or self.closing_since is not None:
            # None: the connection was aborted during the handshake (the sweep's deadline, a
            # limit, stop()): start_tls then returns no transport instead of raising.
            if tls is not None:
                tls.abort()
            raw.abort()
            self._gone()
            return
        self.transport = tls  # type: ignore[assignment]
        self._init_writer()
        self._tls = False
        self.last_seen = time.monotonic()
        peercert = tls.get_extra_info("peercert")
        if o.require_client_cert and not peercert:
            self.fail(ErrorCode.AUTH_FAILED,
                      "this chief requires a client certificate (mutual TLS) and you presented "
                      "none: give the worker --cert and --key, made with 'fedberry certs "
                      "--client NAME' from the chief's CA")
        elif o.require_client_cert and o.bind_worker_id:
            self.conn.cert_names = cert_names(peercert)
        self._handle_early()

    def get_buffer(self, sizehint: int) -> memoryview:
        if self._tls and self.closing_since is None:
            # Python 3.10's SSL layer hands on application data before ``start_tls`` returns:
            # hold it until the connection knows its transport and its certificate's names
            # (else HELLO would be answered into nothing and checked without the binding).
            return self._early_buffer()
        if self.closing_since is None:
            try:
                buf = self.conn.get_buffer()
                return buf if self._uplink is None else buf[:self._paced_chunk]
            except ProtocolError:
                pass
        # Draining what a peer sends after we decided to close (see _flushed).
        if self._drain is None:
            self._drain = memoryview(bytearray(1 << 16))
        return self._drain

    def buffer_updated(self, nbytes: int) -> None:
        if self._tls and self.closing_since is None:
            self._early += self._early_view[:nbytes]
            if len(self._early) > EARLY_BYTES:
                self.fail(ErrorCode.LIMIT, "too many bytes before the TLS handshake finished")
            return
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
        self._traffic[0] += nbytes
        if self._receiving_since is not None:
            self._receiving_bytes += nbytes
        try:
            events = self.conn.buffer_updated(nbytes)
        except ProtocolError as exc:
            self.fail(exc.code, exc.message)
            return
        self._handle_events(events)

    def _early_buffer(self) -> memoryview:
        if self._early_view is None:
            self._early_view = memoryview(bytearray(EARLY_BYTES))
        return self._early_view

    def _handle_early(self) -> None:
        """What arrived while TLS was being set up, through the connection now that it knows
        its transport and the client certificate's names."""
        data, self._early, self._early_view = bytes(self._early), bytearray(), None
        if not data or self.closed or self.closing_since is not None:
            return
        self.server.bytes_up += len(data)
        try:
            events = self.conn.receive_data(data)
        except ProtocolError as exc:
            self.fail(exc.code, exc.message)
            return
        self._handle_events(events)

    def _handle_events(self, events: list[Message]) -> None:
        for event in events:
            if self.closed or self.closing_since is not None:
                return
            try:
                self.handle(event)
            except ProtocolError as exc:
                self.fail(exc.code, exc.message)
            except Exception as exc:  # a bug here must cost one connection, not the chief
                log.exception("error handling a frame from %s", self.describe())
                self.fail(ErrorCode.INTERNAL, f"internal error: {exc}")
        if events:
            # The frame is in and handled (an update is folded into the sum and its buffers
            # are back in the pool): the next connection in line may have its memory.
            self._free_memory()
        if self.conn.waiting:
            self._pause("memory")

    # -- receive memory (buffers.ReceiveBudget) ----------------------------------------------
    def _allocate(self, specs: Spec) -> list[Any] | None:
        """The connection's ``allocate``: a frame's arrays once the budget lets it in, else None
        (the decoder waits, reading pauses, ``_memory_granted`` carries on)."""
        nbytes = sum(t.nbytes for t in specs)
        if not self._granted and nbytes:
            if not self.listener.budget.acquire(nbytes, self._memory_granted):
                self._waiting_for = nbytes
                return None
        self._granted = False
        self._reserved = nbytes
        if nbytes:
            self._receiving_since = time.monotonic()  # the update deadline runs from here
            self._receiving_bytes = 0
        return self.server.buffers.take(specs)

    def _memory_granted(self) -> None:
        nbytes, self._waiting_for = self._waiting_for, 0
        if self.closed or self.closing_since is not None:
            self.listener.budget.release(nbytes)  # granted to a connection that is gone
            return
        self._granted = True
        try:
            self.conn.retry()
        except ProtocolError as exc:
            self.fail(exc.code, exc.message)  # which frees the bytes, reserved by _allocate
            return
        self._unpause("memory")

    def _free_memory(self) -> None:
        budget = self.listener.budget
        self._receiving_since = None
        if self._reserved:
            nbytes, self._reserved = self._reserved, 0
            budget.release(nbytes)
        if self._waiting_for:
            self._waiting_for = 0
            budget.cancel(self._memory_granted)

    def connection_lost(self, exc: Exception | None) -> None:
        if self._why is None:
            self._why = (f"its connection broke ({exc})" if exc else
                         "it closed the connection without saying goodbye")
        self._gone()

    def _gone(self) -> None:
        if self.closed:
            return
        self.closed = True
        self._free_memory()
        self.listener.connections.discard(self)
        self.listener.released()
        self._leave()

    def _leave(self) -> None:
        # As soon as we decide to close, not when the socket is gone: a lingering close can
        # take CLOSE_GRACE, and a round must not wait for a worker that is already out.
        if self._joined and not self._left:
            self._left = True
            self.report_traffic()
            self.server.detach(self, lost=not self._bye, why=self._why,
                               returning=not self._told_to_stop)

    def report_traffic(self) -> None:
        """Tell the observers (chief.events) the bytes moved for this worker since last time:
        at each update, each model sent, when it leaves, and from the sweep (heartbeats)."""
        if self._traffic != [0, 0]:
            self.server.events.emit(Traffic(self.worker_id, *self._traffic))
            self._traffic = [0, 0]

    # -- events ------------------------------------------------------------------------------
    def handle(self, event: Message) -> None:
        if isinstance(event, Ping):
            self.send(Pong())
        elif isinstance(event, Hello):
            self.worker_id = event.worker_id
            self.agent = event.agent  # for the status page (chief.events.WorkerJoined)
            self.send(Challenge())
        elif isinstance(event, Auth):
            self._auth()
        elif isinstance(event, Update):
            self.report_traffic()
            self.server.on_update(self, event.round, event.num_samples, list(event.tensors),
                                  event.metrics, event.codec, event.checked, event.non_finite)
        elif isinstance(event, SecAgg):
            self.server.on_secagg(self, event)
        elif isinstance(event, Masked):
            self.report_traffic()
            self.server.on_masked(self, event.round, event.tensors[0])
        elif isinstance(event, Init):
            self.server.on_init(self, list(event.tensors))
            self._expect_model()
        elif isinstance(event, EvalResult):
            self.server.on_eval(self, event.round, event.num_examples, event.metrics)
        elif isinstance(event, Bye):
            self._bye = True
            self.close()
        # Pong: last_seen is all it is for.

    def _auth(self) -> None:
        delay = self.listener.auth_delay(self.peer_ip)
        if delay <= 0:
            self._auth_now()
            return
        # This address has failed too often lately: answer later, reading nothing meanwhile.
        assert self.transport is not None
        self._auth_wait = True
        self._pause("auth")
        asyncio.get_running_loop().call_later(delay, self._auth_now)

    def _auth_now(self) -> None:
        if self.closed or self.closing_since is not None:
            return
        if self._auth_wait:
            self._auth_wait = False
            self._unpause("auth")
        chief = self.server.chief
        try:
            # The connection checks the worker's proof as it answers.
            self.send(Welcome(chief.round, chief.global_arrays is None,
                              self.server.broadcast.codec.name,
                              dp_clip=getattr(chief.strategy, "worker_clip", None),
                              secure=chief.secure is not None))
        except ProtocolError as exc:
            if exc.code == ErrorCode.AUTH_FAILED:
                self._auth_failed(exc.message)
            else:
                self.fail(exc.code, exc.message)
            return
        if self.conn.state is not ChiefState.JOINED:
            return  # nothing was sent (the transport is gone): no proof checked, no join
        holder = self.listener.holder_of(self)
        if holder is not None:
            self._probe(holder)
            return
        self._join()

    def _join(self) -> None:
        self._joined = True
        self._expect_model()
        self.server.attach(self, self.conn.announced, self.conn.want_model,
                           self.conn.evaluates, names=self.conn.names)

    # -- a worker id held by another connection ----------------------------------------------
    # Without client certificates the id is the worker's word, and a second connection with it
    # replaces the first (how a worker whose link broke comes back). So that a token holder
    # cannot take a live worker's place, the newcomer (authenticated: its WELCOME is out) waits,
    # reading nothing, while the holder is pinged: if the holder is heard from, it keeps its id
    # and the newcomer is refused; if not, it is a dead link and the newcomer replaces it.
    def _probe(self, holder: _ChiefConnection) -> None:
        self._probing = True
        self._pause("probe")
        sent = time.monotonic()
        holder.ping()
        asyncio.get_running_loop().call_later(self.listener.options.takeover_probe,
                                              self._probed, holder, sent)

    def _probed(self, holder: _ChiefConnection, sent: float) -> None:
        self._probing = False
        if self.closed or self.closing_since is not None:
            return
        if holder.alive_since(sent):
            # BUSY, which a worker retries with backoff: an honest worker whose old link is not
            # yet known dead (it waits for receive memory) gets in once it is, instead of
            # exiting on a fatal authentication error.
            self.fail(ErrorCode.BUSY,
                      f"worker id {self.worker_id!r} is in use by a live connection from "
                      f"{holder.peer_ip}: give each worker its own --worker-id (or use client "
                      "certificates, --client-ca, which bind ids to names)")
            return
        # The runtime says "back" when it attaches this one; this is the how.
        log.debug("worker %r is back from %s; its old connection from %s did not answer a ping "
                  "in %g s and is replaced", self.worker_id, self.peer_ip, holder.peer_ip,
                  self.listener.options.takeover_probe)
        self._join()  # attach() closes the holder
        self._unpause("probe")

    def alive_since(self, t: float) -> bool:
        """Whether this connection was heard from at or after ``t``, or cannot be heard because
        the chief is not reading it (it waits for receive memory): then it counts as alive."""
        if self.closed or self.closing_since is not None:
            return False
        # A model still going out to it: our PING waits behind it, so no answer is no sign.
        sending = self.queued_bytes or (self.transport is not None
                                        and self.transport.get_write_buffer_size())
        return (self.last_seen >= t or bool(self._waiting_for) or "memory" in self._pauses
                or bool(sending))

    def _auth_failed(self, sentence: str) -> None:
        failures = self.listener.auth_failed(self.peer_ip)
        slowed = ""
        if failures >= self.listener.options.auth_failures_free:
            slowed = (f" ({failures} failed attempts from {self.peer_ip} lately: the chief "
                      f"now waits {self.listener.auth_delay(self.peer_ip):.2f} s before "
                      "answering each attempt from this address)")
        # Through the rate limit, per address: a storm of wrong tokens is one line a second,
        # not a flood, and does not hide another address's failure.
        self.listener.refusals.note(
            f"auth-failed {self.peer_ip}", f"authentication failed for worker "
            f"{self.worker_id!r} from {self.peer_ip} ({failures} lately): {sentence}")
        self.fail(ErrorCode.AUTH_FAILED, sentence + slowed, log_as="")

    def _expect_model(self) -> None:
        self.conn.expect_model(self.server.chief.spec or self.conn.announced)

    # -- Peer interface ----------------------------------------------------------------------
    def send(self, msg: Message | EncodedFrame) -> None:
        if self.transport is None or self.closed or self.closing_since is not None:
            return
        frame = self.conn.send(msg)
        queued = self.queued_bytes
        limit = self.send_queue_limit()
        if queued and queued + frame.nbytes > limit:
            # Whatever the frame type: a peer that sends (PINGs, stale updates) and never reads
            # would make us hold every answer. It would not read an ERROR either: no lingering.
            self.listener.refusals.note(
                "send-queue", f"closing {self.describe()}: it does not read what the chief "
                f"sends ({queued + frame.nbytes} bytes would be queued for it, the limit is "
                f"{limit})")
            self._why = "it does not read what the chief sends"
            self.closing_since = time.monotonic()
            self._free_memory()
            self._leave()
            self.abort()
            return
        self.server.bytes_down += frame.nbytes
        self._traffic[1] += frame.nbytes
        self._queue(frame)

    def send_queue_limit(self) -> int:
        """The most bytes queued for this peer: two global models and the slack
        (``ListenOptions.send_queue_slack``)."""
        model = sum(a.nbytes for a in self.server.chief.global_arrays or ())
        return 2 * model + self.listener.options.send_queue_slack

    def send_global(self, server: ChiefServer) -> None:
        chief = server.chief
        if self.conn.holds(lambda: server.broadcast.digest(chief)):
            self.send(server.broadcast.unchanged(chief))
            return
        # TCP keeps order: the worker decodes the model sent last before this one. The global
        # model goes out only in answer to a join or an update, so more than two models still
        # queued means the worker sends but does not read: send() drops it.
        self.send(server.broadcast.frame(chief, self.conn.sent_round))
        self.report_traffic()

    def send_error(self, code: ErrorCode, message: str, fatal: bool) -> None:
        self.send(Error(code, message, fatal))

    def request_init(self) -> None:
        pass  # WELCOME already said need_init

    def send_secagg(self, message: SecAgg) -> None:
        self.send(message)

    def ping(self) -> None:
        self.last_ping = time.monotonic()
        self.send(Ping())

    def fail(self, code: ErrorCode, message: str, log_as: str | None = None) -> None:
        """Tell the peer why (when it can still be told) and close. ``log_as``: a reason that
        many connections may share (a flood): logged through the listener's rate limit ("":
        not logged, the caller has); None: by code and address, through the rate limit too. A
        joined worker's is logged as it leaves (the runtime's "lost" line)."""
        if self.closed or self.closing_since is not None:
            return
        line = f"closing {self.describe()}: {message}"
        self._told_to_stop = code.value not in RETRIED_CODES
        if not self._joined:  # a joined worker that fails is a worker lost, not a refusal
            self.server.events.emit(Refused(code.value, message, self.worker_id, self.peer_ip))
        if self._joined and not self._left:
            self._why = message  # the runtime's "lost" line says it, once
        elif log_as is None:
            # Not (yet) a worker: anyone can send bytes that end here, so rate-limited too, per
            # address and sentence (a flood of garbage is a line a second; another mistake, or
            # another address's, still shows; RefusalLog bounds how many reasons it keeps).
            self.listener.refusals.note(f"{code.value} {self.peer_ip} {message}", line)
        elif log_as:  # "": the caller has said it already
            self.listener.refusals.note(log_as, line)
        if self.transport is None:  # still in the TLS handshake: nothing can be said
            self.abort()
            return
        self.send(Error(code, message, True))
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

    def refuse(self, code: ErrorCode, message: str, log_as: str) -> None:
        """Refuse at admission: the sentence, then the connection closed at once. A refused
        peer holds no file descriptor past its ERROR frame, however long it stays silent."""
        self._refused = True
        self.fail(code, message, log_as=log_as)

    def _flushed(self, transport: asyncio.Transport) -> None:
        if self._refused:
            # Nothing of it was read and nothing will be: close now (the connection is not in
            # the listener's set, so no lingering close would ever be swept).
            transport.close()
            return
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


def _chief_tls_message(exc: BaseException) -> str:
    if isinstance(exc, (asyncio.TimeoutError, ConnectionAbortedError)) and "longer" in str(exc):
        return "the handshake did not complete in time"
    return describe_tls_error(exc, role="chief")


class TcpChief:
    """Accepts workers on ``host:port`` and serves them with ``server``."""

    def __init__(self, server: ChiefServer, host: str, port: int,
                 options: ListenOptions | None = None, sock: socket.socket | None = None) -> None:
        self.server = server
        self._sock = sock  # already bound (by serve(), before any output file is made), or None
        self.host, self.port = host, port
        self.options = options or ListenOptions()
        self.connections: set[_ChiefConnection] = set()
        self.budget = ReceiveBudget(self.options.receive_memory)
        # What the budget lets in at once is what the chief reads into: keep that much.
        server.buffers.max_bytes = max(server.buffers.max_bytes, self.options.receive_memory)
        # address -> (failed authentications, monotonic time of the last), oldest first
        self._failures: dict[str, tuple[int, float]] = {}
        # When the latest failed authentications were, all addresses together (the global
        # budget: auth_failures_global within auth_global_window).
        self._recent_failures: deque[float] = deque(
            maxlen=max(1, self.options.auth_failures_global))
        self.refusals = RefusalLog(self.options.refusal_log_interval)
        self._acceptor: Acceptor | None = None
        self._attaching: set[asyncio.Task[object]] = set()
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
        # No TLS at accept: each connection is admitted first, then upgraded with start_tls.
        sock = self._sock if self._sock is not None else listen_socket(self.host, self.port)
        o = self.options
        # Admitted connections, plus the refused ones still sending their ERROR frame.
        limit = o.max_connections + o.max_refusing
        ensure_descriptors(limit + BASE_DESCRIPTORS)
        self._acceptor = Acceptor(sock, self._attach, limit)
        self._acceptor.start()
        name = sock.getsockname()
        self.port = name[1]
        log.info("%s", listening_line(name[0], name[1], tls=o.ssl_context is not None,
                                      token=bool(o.token), client_certs=o.require_client_cert))
        self._sweeper = asyncio.ensure_future(self._sweep())
        return name[0], name[1]

    @property
    def listening_socket(self) -> socket.socket | None:
        """The socket workers connect to (None before :meth:`start`)."""
        return None if self._acceptor is None else self._acceptor.sock

    def _attach(self, sock: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        conn = _ChiefConnection(self)
        task = loop.create_task(loop.connect_accepted_socket(lambda: conn, sock))
        self._attaching.add(task)
        task.add_done_callback(lambda t: self._attached(t, sock, conn))

    def _attached(self, task: asyncio.Task[object], sock: socket.socket,
                  conn: _ChiefConnection) -> None:
        self._attaching.discard(task)
        if task.cancelled() or task.exception() is not None:
            sock.close()  # no transport was made: the connection never started
            conn._gone()

    def released(self) -> None:
        """An accepted socket has closed (called once per connection)."""
        if self._acceptor is not None:
            self._acceptor.release()

    async def serve(self) -> None:
        """Serve until the chief has finished, then close everything."""
        if self._acceptor is None:
            await self.start()
        try:
            await self.server.wait_finished()
        finally:
            await self.stop()

    async def stop(self) -> None:
        if self._sweeper is not None:
            self._sweeper.cancel()
        if self._acceptor is not None:
            self._acceptor.close()
        for task in list(self._attaching):
            task.cancel()
        for conn in list(self.connections):
            conn.close()
        await asyncio.sleep(0)

    # -- admission ---------------------------------------------------------------------------
    def admit(self, conn: _ChiefConnection) -> bool:
        o = self.options
        why = kind = None
        if len(self.connections) >= o.max_connections:
            why, kind = "the chief has too many connections; retry later", "busy"
        else:
            states = Counter(c.state for c in self.connections if c.peer_ip == conn.peer_ip)
            waiting = states.pop("auth-wait", 0)
            states.pop("joined", None)
            if sum(states.values()) >= o.max_pending_per_address:
                why = (f"too many connections from {conn.peer_ip} are still handshaking; "
                       "retry later")
                kind = "busy-address"
            elif waiting >= o.max_auth_waiting_per_address:
                why = (f"too many connections from {conn.peer_ip} are waiting out the delay "
                       "after failed authentications; retry later")
                kind = "busy-auth-wait"
        if why is None or kind is None:
            self.connections.add(conn)
            return True
        if conn.transport is not None:
            conn.refuse(ErrorCode.BUSY, why, kind)  # plain TCP: the worker retries with backoff
        else:
            self.refusals.note(kind, f"refusing a connection from {conn.peer_ip}: {why}")
            self.server.events.emit(Refused(ErrorCode.BUSY.value, why, "", conn.peer_ip))
            conn.abort()  # TLS: no handshake for a refused peer; the worker retries
        return False

    def auth_delay(self, ip: str) -> float:
        """Seconds to hold the answer to an AUTH from ``ip``."""
        o = self.options
        now = time.monotonic()
        recent = self._recent_failures
        if (o.auth_failures_global > 0 and len(recent) >= o.auth_failures_global
                and now - recent[0] <= o.auth_global_window):
            return o.auth_delay_max  # the global budget is spent: guessing from anywhere
        count, last = self._failures.get(ip, (0, 0.0))
        if count < o.auth_failures_free or now - last > o.auth_memory:
            return 0.0
        return min(o.auth_delay_max, o.auth_delay_base * 2.0 ** (count - o.auth_failures_free))

    def auth_failed(self, ip: str) -> int:
        """Count a failed authentication from ``ip``; returns its recent failures."""
        now = time.monotonic()
        self._recent_failures.append(now)
        count, last = self._failures.pop(ip, (0, 0.0))  # re-inserted last: oldest stay first
        if now - last > self.options.auth_memory:
            count = 0
        self._failures[ip] = (count + 1, now)
        while len(self._failures) > 10_000:  # bounded memory under a spray of addresses
            self._failures.pop(next(iter(self._failures)))
        return count + 1

    def holder_of(self, conn: _ChiefConnection) -> _ChiefConnection | None:
        """Another joined connection with ``conn``'s worker id, still open."""
        return next((c for c in self.connections if c is not conn and c._joined
                     and not c._left and c.closing_since is None
                     and c.worker_id == conn.worker_id), None)

    def update_deadline(self) -> float:
        """Seconds a frame of tensors may take to arrive (``ListenOptions.update_deadline``),
        at most; ``UPDATE_DEADLINE`` unless set. Slow but honest links are not cut by a round
        timeout: what stops a trickler sooner is the rate floor (``too_slow``)."""
        if self.options.update_deadline is not None:
            return self.options.update_deadline
        return UPDATE_DEADLINE

    def too_slow(self, conn: _ChiefConnection, now: float) -> str | None:
        """Why the update ``conn`` is sending is dropped, or None: past the update deadline, or,
        after ``update_rate_grace`` seconds, arriving slower than ``min_update_rate`` bytes/s
        (a worker that trickles its update holds receive memory that honest updates need)."""
        if conn._receiving_since is None:
            return None
        elapsed = now - conn._receiving_since
        deadline = self.update_deadline()
        if elapsed > deadline:
            return (f"your update did not arrive within {deadline:g} s of the chief starting "
                    "to read it (the update deadline): the chief dropped it and the round "
                    "goes on without you")
        rate = self.options.min_update_rate
        if (rate and elapsed > self.options.update_rate_grace
                and conn._receiving_bytes < rate * elapsed):
            return (f"your update arrived at {conn._receiving_bytes / elapsed:.0f} bytes/s, "
                    f"below the chief's floor of {rate:.0f} bytes/s (--min-update-rate): the "
                    "chief dropped it and the round goes on without you")
        return None

    async def _sweep(self) -> None:
        o = self.options
        # The chief's heartbeat: a joined worker that has been quiet for a while gets a PING, so
        # that a connection dead without a FIN (a Pi unplugged) is found from this side too.
        ping_every = max(1.0, o.idle_timeout / 4)
        while True:
            await asyncio.sleep(0.5)
            now = time.monotonic()
            for conn in list(self.connections):
                if conn._joined and not conn._left:
                    conn.report_traffic()  # pings and pongs too: observers see it alive
                if conn.closing_since is not None:
                    if now - conn.closing_since > CLOSE_GRACE:
                        conn.abort()  # it does not take its last frame: stop waiting
                elif conn.state == "auth-wait":
                    pass  # held back on purpose, for at most auth_delay_max
                elif conn.state != "joined":
                    if now - conn.opened > o.handshake_timeout:
                        conn.fail(ErrorCode.TIMEOUT, "handshake not completed in time",
                                  log_as="handshake-timeout")
                elif conn._receiving_since is not None and self.too_slow(conn, now):
                    conn.fail(ErrorCode.TIMEOUT, self.too_slow(conn, now) or "")
                elif conn._receiving_since is not None:
                    # Receiving an update: its bytes keep last_seen fresh, but the worker hears
                    # nothing (its own PINGs queue behind the update), so ping it anyway, else
                    # its idle watchdog takes a long upload for a dead chief.
                    if now - conn.last_ping > ping_every:
                        conn.ping()
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


@dataclass
class RefusalLog:
    """Log lines about connections refused or dropped in bulk, rate-limited per reason: the
    first line of a reason at once, then at most one per ``interval`` seconds, saying how many
    more there were meanwhile. ``counts`` has every one, for tests and stats."""

    interval: float = REFUSAL_LOG_INTERVAL
    counts: Counter[str] = field(default_factory=Counter)
    _last: dict[str, float] = field(default_factory=dict)
    _unlogged: Counter[str] = field(default_factory=Counter)

    MAX_REASONS = 256  # reasons kept apart; past that (reasons with free text) one for all

    def note(self, reason: str, line: str) -> None:
        if reason not in self.counts and len(self.counts) >= self.MAX_REASONS:
            reason = "other"
        self.counts[reason] += 1
        now = time.monotonic()
        last = self._last.get(reason)
        if last is not None and now - last < self.interval:
            self._unlogged[reason] += 1
            return
        more = self._unlogged.pop(reason, 0)
        self._last[reason] = now
        log.warning("%s%s", line, f" (and {more} more like it since the last such line)"
                    if more else "")
