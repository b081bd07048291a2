"""The conversation, sans-IO: one connection object per side, in the manner of h11.

``ChiefConnection`` is the chief's end of one worker's connection, ``WorkerConnection`` the
worker's. Each takes the bytes that arrived and returns typed events (``messages``), and takes
messages to send and returns the frame to write. Neither touches a socket, a clock or a thread:
the transport moves the bytes, runs the timers and tells the chief runtime what happened.

The handshake (the protocol version is in every frame's header)::

    worker                                   chief
    HELLO(worker_id, worker nonce)  ->
                                    <-  CHALLENGE(chief nonce)
    AUTH(proof, spec, want_model, have) ->
                                    <-  WELCOME(proof, round, need_init, downlink)
    INIT(model), if need_init       ->
    ... UPDATE ->  <- GLOBAL ...  (PING/PONG either way, at any time; BYE; ERROR)
    EVAL_RESULT, after a GLOBAL that asked for an evaluation (only from a worker whose AUTH
    said ``evaluates``; at most one per GLOBAL of that kind)

In a secure federation (WELCOME says ``secure``) a worker's update is instead::

    UPDATE(codec "secagg": round, num_samples, metrics; no tensors) ->
                                    <-  SECAGG begin
    SECAGG advert                   ->
                                    <-  SECAGG peers
    SECAGG shares                   ->
                                    <-  SECAGG forward
    MASKED(one ring vector)         ->
                                    <-  SECAGG unmask
    SECAGG reveal                   ->
                                    <-  GLOBAL

and nothing else: a secure connection refuses a plain UPDATE, a plain one the secure steps.
Which step comes when is the secure round's rule (``chief.secure_round``, the worker's
``transports.secure_sync``): the connection checks each step's direction and fields.

Both proofs are HMACs of both nonces under the shared token (``auth``); the chief checks the
worker's when it answers AUTH (``send(Welcome(...))`` raises AUTH_FAILED on a wrong one), the
worker checks the chief's as WELCOME arrives. A GLOBAL of codec "unchanged" (no tensors) is the
chief's answer to a worker whose AUTH offered the digest of the model it holds, when it matches.

What a misbehaving peer causes: a frame that is malformed, over a limit, of the wrong model, or
not allowed in the connection's state (refused as its header is parsed, before its metadata
or tensors are allocated: ``FrameDecoder.check_type``) raises :class:`ProtocolError` from
``receive_data`` / ``buffer_updated``; the connection is then CLOSED and every later call
raises too. The transport
sends ``error_for(exc)`` (if it still can) and closes. Until WELCOME, frames carry no tensors and
little metadata (``limits.PREAUTH_LIMITS``); after it, exactly the model's frames
(``limits.model_limits``).

Misuse by our own side (sending a message the state does not allow) raises
:class:`LocalProtocolError`, a bug rather than a peer's fault.
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Sequence

import numpy as np

from fedberry.protocol import auth, encodings
from fedberry.protocol.frames import EncodedFrame, Frame, FrameDecoder
from fedberry.protocol.limits import PREAUTH_LIMITS, Limits, model_limits
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
    from_frame,
    to_frame,
)
from fedberry.protocol.spec import ErrorCode, MsgType, ProtocolError, Spec
from fedberry.secagg import wire as secagg_wire

Allocate = Callable[[Spec], "list[np.ndarray] | None"]


class LocalProtocolError(RuntimeError):
    """Our own side tried to send something the connection's state does not allow."""


class ChiefState(enum.Enum):
    HELLO = "hello"  # waiting for HELLO
    CHALLENGE = "challenge"  # HELLO is in: ours to send CHALLENGE
    AUTH = "auth"  # waiting for AUTH
    WELCOME = "welcome"  # AUTH is in: ours to answer (WELCOME, or an ERROR)
    JOINED = "joined"
    CLOSED = "closed"  # BYE received, a fatal ERROR sent, or the peer broke the protocol


class WorkerState(enum.Enum):
    START = "start"  # ours to send HELLO
    CHALLENGE = "challenge"  # waiting for CHALLENGE
    AUTH = "auth"  # CHALLENGE is in: ours to send AUTH
    WELCOME = "welcome"  # waiting for WELCOME
    JOINED = "joined"
    CLOSED = "closed"  # BYE sent, a fatal ERROR either way, or the peer broke the protocol


def error_for(exc: ProtocolError) -> Error:
    """The ERROR that tells the peer why we refuse what it sent."""
    return Error(exc.code.value, exc.message, True)


class _Connection:
    """What both sides share: the decoder, the receive loop, the sending of encoded frames."""

    state: enum.Enum
    _closed: enum.Enum
    # The frame types ``send`` takes already encoded: the ones encoded once and sent as they
    # are (the round's GLOBAL for many connections; an UPDATE resent after a reconnect). Every
    # other type carries a proof or changes the state on what it says: it goes as a message,
    # through the checks that fill in and verify it.
    _pre_encoded: frozenset[MsgType] = frozenset()

    def __init__(self) -> None:
        self.decoder = FrameDecoder(PREAUTH_LIMITS)
        self.decoder.check_type = self._check_type
        self._unread = bytearray()  # what receive_data was given while a frame waits for memory

    # -- receiving ---------------------------------------------------------------------------
    @property
    def waiting(self) -> bool:
        """A frame's tensors wait for memory (``allocate`` said not now): read nothing, call
        ``retry()`` once memory is granted."""
        return self.decoder.waiting

    def retry(self) -> bool:
        """Ask ``allocate`` again for the waiting frame; True once its arrays are there (then
        ``receive_data()`` reads on any bytes it kept)."""
        self._check_open()
        try:
            return self.decoder.retry()
        except ProtocolError:
            self.state = self._closed
            raise

    def get_buffer(self) -> memoryview:
        """Where the next received bytes go (``asyncio.BufferedProtocol.get_buffer``): the
        header, the metadata, or the very numpy array a tensor is read into."""
        self._check_open()
        if self._unread:  # they come first: feed them with receive_data
            raise LocalProtocolError("bytes given to receive_data are still unread: call "
                                     "receive_data again before get_buffer")
        return self.decoder.get_buffer()

    def buffer_updated(self, nbytes: int) -> list[Message]:
        """``nbytes`` were written to the start of the last ``get_buffer()``: the events they
        complete (at most one: the next frame starts with a fresh buffer)."""
        self._check_open()
        try:
            return [self._receive(f) for f in self.decoder.buffer_updated(nbytes)]
        except ProtocolError:
            self.state = self._closed
            raise

    def receive_data(self, data: bytes | bytearray | memoryview = b"") -> list[Message]:
        """Bytes in, events out (copies ``data`` through the zero-copy path), for callers
        without backpressure (tests, fuzzing). When a frame waits for memory, returns the
        events decoded so far and keeps the bytes not yet read, in order, with any given
        meanwhile; once ``retry()`` is True, ``receive_data()`` (no new bytes needed) reads on.
        A transport with backpressure uses ``get_buffer``/``buffer_updated``: no copy."""
        self._check_open()
        if self._unread:
            self._unread += data
            src = memoryview(bytes(self._unread))
            self._unread.clear()
        else:
            src = memoryview(data).cast("B")
        events: list[Message] = []
        while len(src):
            if self.waiting:
                self._unread += src  # read once the frame has its memory
                break
            buf = self.get_buffer()
            n = min(len(buf), len(src))
            buf[:n] = src[:n]
            src = src[n:]
            # One frame at a time: its event may change the limits of the next header.
            events += self.buffer_updated(n)
        return events

    def _check_open(self) -> None:
        if self.state is self._closed:
            raise ProtocolError(ErrorCode.PROTOCOL, "the connection is closed")

    def _check_type(self, t: MsgType) -> None:
        """The decoder's ``check_type``: refuse a frame by its type, before reading the rest."""
        if not self._allowed(t):
            raise self._refuse(t)

    def _refuse(self, t: MsgType) -> ProtocolError:
        return ProtocolError(ErrorCode.PROTOCOL,
                             f"{t.name} is not allowed now ({self.state.value})")

    def _allowed(self, t: MsgType) -> bool:
        """Whether a frame of type ``t`` may arrive in the current state (the one place of
        that rule: ``_receive`` sees only frames that passed it)."""
        raise NotImplementedError

    def _receive(self, frame: Frame) -> Message:
        raise NotImplementedError

    # -- sending -----------------------------------------------------------------------------
    def send(self, msg: Message | EncodedFrame) -> EncodedFrame:
        """The frame to write for ``msg``: a message, or a frame encoded once for many
        connections (the round's GLOBAL). Raises LocalProtocolError if the state forbids it."""
        if isinstance(msg, EncodedFrame):
            if msg.type is None:
                raise LocalProtocolError("send() needs a frame made by encode()")
            if msg.type not in self._pre_encoded:
                raise LocalProtocolError(f"send {msg.type.name} as a message, not an encoded "
                                         "frame: its fields are checked (and proofs filled in) "
                                         "as it is sent")
            self._sending(msg.type, msg.meta or {})
            return msg
        msg = self._filled(msg)
        self._sending(msg.TYPE, msg.meta())
        return to_frame(msg)

    def _filled(self, msg: Message) -> Message:
        return msg

    def _sending(self, t: MsgType, meta: dict) -> None:
        raise NotImplementedError

    def _not_now(self, t: MsgType) -> LocalProtocolError:
        return LocalProtocolError(f"cannot send {t.name} now ({self.state.value})")


class ChiefConnection(_Connection):
    """The chief's end of one worker's connection.

    ``token``: the shared token ("" for none). ``cert_names``: with client certificates bound to
    worker ids, the names the worker's HELLO may claim (None: any id). ``allocate``: where an
    update's tensors are read into (see ``FrameDecoder.allocate``; it may say "not now").
    ``cap``: this chief's ceiling on frame sizes.

    Events: Hello, Auth (answer with ``send(Welcome(...))`` or an ERROR), Init (once, only after
    a WELCOME with need_init), Update, Bye, Ping (answer with Pong), Pong.
    """

    _closed = ChiefState.CLOSED
    _pre_encoded = frozenset({MsgType.GLOBAL})  # the broadcast encodes each round's model once

    def __init__(self, token: str = "", *, cert_names: Sequence[str] | None = None,
                 allocate: Allocate | None = None, cap: Limits | None = None) -> None:
        super().__init__()
        self.state: ChiefState = ChiefState.HELLO
        self.token = token
        self.cert_names = None if cert_names is None else list(cert_names)
        self.allocate = allocate
        self.cap = cap or Limits()
        self.worker_id = ""
        self.announced: Spec = ()  # the model spec of the worker's AUTH
        self.names: tuple[str, ...] | None = None  # its tensors' names, if the AUTH gave them
        self.want_model = True
        self.sent_round: int | None = None  # the round of the last GLOBAL sent
        self.evaluates = False  # the worker's AUTH said it answers evaluation requests
        # Rounds whose GLOBAL asked this worker for an evaluation and have no answer yet: an
        # EVAL_RESULT for any other round is refused (bounded: a worker answers as it syncs).
        self._eval_asked: set[int] = set()
        self._have: str | None = None  # the digest of the model the worker joined with
        self.secure = False  # our WELCOME said the federation aggregates securely
        self._may_init = False
        self._worker_nonce = ""
        self._chief_nonce = ""
        self._proof = ""

    def _allowed(self, t: MsgType) -> bool:
        s = self.state
        if t in (MsgType.PING, MsgType.PONG):
            return True
        if t == MsgType.HELLO:
            return s is ChiefState.HELLO
        if t == MsgType.AUTH:
            return s is ChiefState.AUTH
        if t in (MsgType.UPDATE, MsgType.BYE):
            return s is ChiefState.JOINED
        if t in (MsgType.SECAGG, MsgType.MASKED):
            return s is ChiefState.JOINED and self.secure
        if t == MsgType.INIT:  # once, and only when WELCOME asked for it
            return s is ChiefState.JOINED and self._may_init
        if t == MsgType.EVAL_RESULT:  # only in answer to a GLOBAL that asked (checked below)
            return s is ChiefState.JOINED and self.evaluates
        return False

    def _receive(self, frame: Frame) -> Message:
        t = frame.type  # allowed now: checked as its header came in
        if t in (MsgType.PING, MsgType.PONG, MsgType.MASKED):
            return from_frame(frame)
        if t == MsgType.UPDATE:
            msg = from_frame(frame)
            assert isinstance(msg, Update)
            if (msg.codec == encodings.SECURE_UPDATE_CODEC) != self.secure:
                raise ProtocolError(ErrorCode.PROTOCOL, _SECURE_ONLY if self.secure
                                    else _NOT_SECURE)
            return msg
        if t == MsgType.SECAGG:
            msg = from_frame(frame)
            assert isinstance(msg, SecAgg)
            if msg.step not in secagg_wire.FROM_WORKER:
                raise ProtocolError(ErrorCode.PROTOCOL, f"a worker cannot send the secure "
                                                        f"step {msg.step!r}")
            return msg
        if t == MsgType.HELLO:
            msg = from_frame(frame)
            assert isinstance(msg, Hello)
            if self.cert_names is not None and msg.worker_id not in self.cert_names:
                raise ProtocolError(ErrorCode.AUTH_FAILED,
                                    _id_not_in_cert(msg.worker_id, self.cert_names))
            self.worker_id, self._worker_nonce = msg.worker_id, msg.nonce
            self.state = ChiefState.CHALLENGE
            return msg
        if t == MsgType.AUTH:
            msg = from_frame(frame)
            assert isinstance(msg, Auth)
            self._proof, self.announced, self.names = msg.proof, msg.spec, msg.names
            self.want_model, self._have = msg.want_model, msg.have if msg.want_model else None
            self.evaluates = msg.evaluates
            self.state = ChiefState.WELCOME
            return msg
        if t == MsgType.INIT:
            self._may_init = False
            return from_frame(frame)
        if t == MsgType.EVAL_RESULT:
            msg = from_frame(frame)
            assert isinstance(msg, EvalResult)
            if msg.round not in self._eval_asked:
                raise ProtocolError(ErrorCode.PROTOCOL, f"an evaluation of round {msg.round}, "
                                                        "which the chief did not ask for")
            self._eval_asked.discard(msg.round)
            return msg
        if t == MsgType.BYE:
            self.state = ChiefState.CLOSED
            return from_frame(frame)
        raise self._refuse(t)  # not reached: _allowed lets no other type through

    # -- what the runtime needs to know ------------------------------------------------------
    def expect_model(self, spec: Spec) -> None:
        """From now on, tensor frames must carry ``spec`` (the federation's model, or the one
        the worker announced while the federation has none)."""
        self.decoder.expected = spec
        self.decoder.allocate = self.allocate
        # Look for NaN/Inf as each tensor arrives (cheap while it is in the cache).
        self.decoder.check_finite = True
        codecs = (*encodings.FRAME_CODECS["UPDATE"], *encodings.FRAME_CODECS["INIT"],
                  *(encodings.RING_CODECS if self.secure else ()))
        self.decoder.limits = model_limits(spec, codecs, self.cap)

    def holds(self, digest: Callable[[], str | None]) -> bool:
        """Whether the worker proved (in AUTH) that it holds the model whose digest ``digest()``
        gives (called only if the worker offered one: hashing a model costs): then the answer
        to its join is ``Global(codec="unchanged")``. Asked once: the digest describes the model
        the worker joined with, not the ones after."""
        have, self._have = self._have, None
        return have is not None and have == digest()

    # -- sending -----------------------------------------------------------------------------
    def _filled(self, msg: Message) -> Message:
        if isinstance(msg, Challenge):
            return msg
        if isinstance(msg, Welcome) and self.state is ChiefState.WELCOME:
            if not auth.verify(auth.worker_proof(self.token, self._chief_nonce,
                                                 self._worker_nonce), self._proof):
                self.state = ChiefState.CLOSED
                raise ProtocolError(ErrorCode.AUTH_FAILED, AUTH_FAILED_SENTENCE)
            return Welcome(msg.round, msg.need_init, msg.downlink,
                           auth.chief_proof(self.token, self._chief_nonce, self._worker_nonce),
                           msg.dp_clip, msg.secure)
        return msg

    def _sending(self, t: MsgType, meta: dict) -> None:
        s = self.state
        if t == MsgType.ERROR:  # in any state: it is how we say why we close
            if meta.get("fatal", True):
                self.state = ChiefState.CLOSED
        elif s is ChiefState.CLOSED:
            raise self._not_now(t)
        elif t in (MsgType.PING, MsgType.PONG):
            pass
        elif t == MsgType.CHALLENGE and s is ChiefState.CHALLENGE:
            self._chief_nonce = meta["nonce"]
            self.state = ChiefState.AUTH
        elif t == MsgType.WELCOME and s is ChiefState.WELCOME:
            self._may_init = bool(meta["need_init"])
            self.secure = bool(meta.get("secure", False))
            self.state = ChiefState.JOINED
            self.expect_model(self.announced)
        elif t == MsgType.GLOBAL and s is ChiefState.JOINED:
            self.sent_round = meta.get("round")
            if meta.get("evaluate") and self.evaluates and isinstance(self.sent_round, int):
                # Kept small: a worker that never answers has at most a few rounds pending.
                if len(self._eval_asked) >= 8:
                    self._eval_asked.discard(min(self._eval_asked))
                self._eval_asked.add(self.sent_round)
        elif t == MsgType.SECAGG and s is ChiefState.JOINED and self.secure:
            if meta.get("step") not in secagg_wire.FROM_CHIEF:
                raise LocalProtocolError(f"the chief cannot send the secure step "
                                         f"{meta.get('step')!r}")
        else:
            raise self._not_now(t)


class WorkerConnection(_Connection):
    """The worker's end of its connection to the chief.

    ``token``: the shared token. ``spec``: the model this worker trains (its AUTH announces it;
    the chief's frames must carry it). ``cap``: this worker's ceiling on frame sizes.

    Events: Challenge (answer with ``send(Auth(...))``), Welcome (its proof already checked;
    then send Init if it says need_init), Global, Error, Ping (answer with Pong), Pong.
    """

    _closed = WorkerState.CLOSED
    _pre_encoded = frozenset({MsgType.UPDATE})  # encoded once: a resend sends the same bytes

    def __init__(self, token: str, spec: Spec, *, cap: Limits | None = None) -> None:
        super().__init__()
        self.state: WorkerState = WorkerState.START
        self.token = token
        self.spec = spec
        self.cap = cap or Limits()
        self.need_init = False  # WELCOME asked for our model, and we have not sent it yet
        self.received_round: int | None = None  # the round of the last GLOBAL received
        self.eval_asked: int | None = None  # the round of a GLOBAL that asked for EVAL_RESULT
        self._offered = False  # our AUTH offered a digest: "unchanged" may come, once
        self.secure = False  # the chief's WELCOME said the federation aggregates securely
        self._worker_nonce = ""
        self._chief_nonce = ""

    def _allowed(self, t: MsgType) -> bool:
        s = self.state
        if t in (MsgType.PING, MsgType.PONG, MsgType.ERROR):
            return True
        if t == MsgType.CHALLENGE:
            return s is WorkerState.CHALLENGE
        if t == MsgType.WELCOME:
            return s is WorkerState.WELCOME
        if t == MsgType.GLOBAL:
            return s is WorkerState.JOINED
        if t == MsgType.SECAGG:
            return s is WorkerState.JOINED and self.secure
        return False

    def _receive(self, frame: Frame) -> Message:
        t = frame.type  # allowed now: checked as its header came in
        if t in (MsgType.PING, MsgType.PONG):
            return from_frame(frame)
        if t == MsgType.ERROR:
            msg = from_frame(frame)
            assert isinstance(msg, Error)
            if msg.fatal:
                self.state = WorkerState.CLOSED
            return msg
        if t == MsgType.CHALLENGE:
            msg = from_frame(frame)
            assert isinstance(msg, Challenge)
            self._chief_nonce = msg.nonce
            self.state = WorkerState.AUTH
            return msg
        if t == MsgType.WELCOME:
            msg = from_frame(frame)
            assert isinstance(msg, Welcome)
            if not auth.verify(auth.chief_proof(self.token, self._chief_nonce,
                                                self._worker_nonce), msg.proof):
                raise ProtocolError(ErrorCode.AUTH_FAILED,
                                    "the chief could not prove it knows the token: wrong "
                                    "token on one side, or not the chief you meant")
            self.need_init = msg.need_init
            self.secure = msg.secure
            self.state = WorkerState.JOINED
            # The model may follow WELCOME in the same read: from now on, frames of our model.
            self.decoder.expected = self.spec
            self.decoder.limits = model_limits(self.spec, encodings.FRAME_CODECS["GLOBAL"],
                                               self.cap)
            return msg
        if t == MsgType.GLOBAL:
            msg = from_frame(frame)
            assert isinstance(msg, Global)
            if msg.codec == "unchanged" and not self._offered:
                raise ProtocolError(ErrorCode.PROTOCOL, "the chief sent the model as "
                                                        "'unchanged', but this worker did not "
                                                        "offer the model it holds")
            if msg.codec == "q8" and msg.base != self.received_round:
                raise ProtocolError(ErrorCode.PROTOCOL,
                                    f"the chief sent the change since round {msg.base}, this "
                                    f"connection holds round {self.received_round}")
            self._offered = False
            self.received_round = msg.round
            self.eval_asked = msg.round if msg.evaluate else None
            return msg
        if t == MsgType.SECAGG:
            msg = from_frame(frame)
            assert isinstance(msg, SecAgg)
            if msg.step not in secagg_wire.FROM_CHIEF:
                raise ProtocolError(ErrorCode.PROTOCOL, f"the chief cannot send the secure "
                                                        f"step {msg.step!r}")
            return msg
        raise self._refuse(t)  # not reached: _allowed lets no other type through

    def _filled(self, msg: Message) -> Message:
        if isinstance(msg, Auth) and self.state is WorkerState.AUTH:
            if msg.spec != self.spec:  # the chief's frames are checked against self.spec
                raise LocalProtocolError("AUTH must announce the model this connection expects")
            return msg.with_proof(auth.worker_proof(self.token, self._chief_nonce,
                                                    self._worker_nonce))
        return msg

    def _sending(self, t: MsgType, meta: dict) -> None:
        s = self.state
        if t == MsgType.ERROR:  # in any state: it is how we say why we close
            if meta.get("fatal", True):
                self.state = WorkerState.CLOSED
        elif s is WorkerState.CLOSED:
            raise self._not_now(t)
        elif t in (MsgType.PING, MsgType.PONG):
            pass
        elif t == MsgType.HELLO and s is WorkerState.START:
            self._worker_nonce = meta["nonce"]
            self.state = WorkerState.CHALLENGE
        elif t == MsgType.AUTH and s is WorkerState.AUTH:
            self._offered = "have" in meta
            self.state = WorkerState.WELCOME
        elif t == MsgType.INIT and s is WorkerState.JOINED and self.need_init:
            self.need_init = False
        elif t == MsgType.UPDATE and s is WorkerState.JOINED:
            if (meta.get("codec") == encodings.SECURE_UPDATE_CODEC) != self.secure:
                raise LocalProtocolError(_SECURE_ONLY if self.secure else _NOT_SECURE)
        elif (t == MsgType.SECAGG and s is WorkerState.JOINED and self.secure
              and meta.get("step") in secagg_wire.FROM_WORKER):
            pass
        elif t == MsgType.MASKED and s is WorkerState.JOINED and self.secure:
            pass
        elif (t == MsgType.EVAL_RESULT and s is WorkerState.JOINED
              and meta.get("round") == self.eval_asked and self.eval_asked is not None):
            self.eval_asked = None  # one answer per request
        elif t == MsgType.BYE:
            self.state = WorkerState.CLOSED
        else:
            raise self._not_now(t)


_SECURE_ONLY = ("this federation aggregates securely: an update goes as an UPDATE of codec "
                "'secagg' and the secure steps that follow, never in the clear")
_NOT_SECURE = ("this federation does not aggregate securely: send the update itself, not the "
               "secure steps")

AUTH_FAILED_SENTENCE = ("authentication failed: your token does not match the chief's (check "
                        "--token, --token-file or FEDBERRY_TOKEN)")


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


__all__ = ["AUTH_FAILED_SENTENCE", "Auth", "Bye", "ChiefConnection", "ChiefState", "Challenge",
           "Error", "EvalResult", "Global", "Hello", "Init", "LocalProtocolError", "Masked", "Ping",
           "Pong", "SecAgg", "Update", "Welcome", "WorkerConnection", "WorkerState", "error_for"]
