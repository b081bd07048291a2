"""Typed messages: everything that crosses the wire, with each field's checks, once.

A message is a frozen dataclass. ``to_frame(msg)`` encodes it; ``from_frame(frame)`` turns a
decoded frame into its message, checking every field the peer sent (JSON can say anything): a
wrong type, a number out of range, NaN or infinity, a string too long. A violation raises
:class:`ProtocolError` with one sentence; the connection answers with an ERROR and closes.

The same checks run when we build a message to send (``__post_init__``), so what we send is
what we would accept. Unknown metadata keys are ignored, so that a newer peer may add fields.

Tensor frames (INIT, UPDATE, GLOBAL) have been checked by the ``FrameDecoder`` already (dtypes,
shapes against the model, sizes, the codec's place); their messages carry the arrays as read.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np

from fedberry.protocol import auth, encodings
from fedberry.protocol.frames import EncodedFrame, Frame, encode
from fedberry.protocol.limits import (
    DIGEST_CHARS,
    MAX_ERROR_CODE,
    MAX_ERROR_MESSAGE,
    MAX_METRIC_NAME,
    MAX_METRICS,
    MAX_NUM_SAMPLES,
    MAX_TENSOR_NAME,
    MAX_TENSOR_NAMES_CHARS,
    MAX_WORKER_ID,
    PREAUTH_LIMITS,
)
from fedberry.protocol.spec import (
    ErrorCode,
    MsgType,
    ProtocolError,
    Spec,
    TensorSpec,
    spec_from_json,
    spec_to_json,
)

NONCE_CHARS = 2 * auth.NONCE_BYTES  # hex


def _bad(message: str) -> ProtocolError:
    return ProtocolError(ErrorCode.BAD_FRAME, message)


def _is_int(v: object) -> bool:
    return type(v) is int  # bool is an int subclass: True is not a round number


def _is_hex(v: object, chars: int) -> bool:
    return (isinstance(v, str) and len(v) == chars and v.isascii()
            and all(c in "0123456789abcdef" for c in v))


def _check_round(what: str, v: object) -> None:
    if not _is_int(v) or v < 0:  # type: ignore[operator]
        raise _bad(f"{what} needs a round that is an integer >= 0, not {v!r:.40}")


def check_tensor_names(names: object, count: int) -> tuple[str, ...]:
    """The names of a model's ``count`` tensors (an AUTH's ``names``), checked: a list of
    ``count`` distinct printable strings of 1-MAX_TENSOR_NAME characters, at most
    MAX_TENSOR_NAMES_CHARS together. They only ever name the tensors of the chief's model file.
    Raises ProtocolError with the sentence."""
    if not isinstance(names, (list, tuple)) or len(names) != count:
        raise _bad(f"names must be a list of the model's {count} tensor names")
    total = 0
    seen: set[str] = set()
    for n in names:
        if (not isinstance(n, str) or not 0 < len(n) <= MAX_TENSOR_NAME
                or not n.isprintable()):
            raise _bad(f"a tensor name must be 1-{MAX_TENSOR_NAME} printable characters, "
                       f"not {n!r:.60}")
        total += len(n)
        if total > MAX_TENSOR_NAMES_CHARS:
            raise _bad(f"the tensor names are more than {MAX_TENSOR_NAMES_CHARS} characters "
                       "together")
        if n in seen:
            raise _bad(f"the tensor name {n!r:.60} is given twice")
        seen.add(n)
    return tuple(names)


# -- handshake -------------------------------------------------------------------------------
@dataclass(frozen=True)
class Hello:
    """worker -> chief, first: who it is, and its half of the challenge."""

    TYPE: ClassVar[MsgType] = MsgType.HELLO
    worker_id: str
    nonce: str = field(default_factory=auth.new_nonce)

    def __post_init__(self) -> None:
        w = self.worker_id
        if (not isinstance(w, str) or not 0 < len(w) <= MAX_WORKER_ID
                or not w.isprintable()):
            raise _bad(f"worker_id must be 1-{MAX_WORKER_ID} printable characters")
        if not _is_hex(self.nonce, NONCE_CHARS):
            raise _bad(f"HELLO needs a nonce of {NONCE_CHARS} hex digits")

    def meta(self) -> dict[str, Any]:
        return {"worker_id": self.worker_id, "nonce": self.nonce}

    @classmethod
    def from_meta(cls, m: dict[str, Any], frame: Frame) -> Hello:
        return cls(m.get("worker_id"), m.get("nonce"))  # type: ignore[arg-type]


@dataclass(frozen=True)
class Challenge:
    """chief -> worker: the chief's half of the challenge."""

    TYPE: ClassVar[MsgType] = MsgType.CHALLENGE
    nonce: str = field(default_factory=auth.new_nonce)

    def __post_init__(self) -> None:
        if not _is_hex(self.nonce, NONCE_CHARS):
            raise _bad(f"CHALLENGE needs a nonce of {NONCE_CHARS} hex digits")

    def meta(self) -> dict[str, Any]:
        return {"nonce": self.nonce}

    @classmethod
    def from_meta(cls, m: dict[str, Any], frame: Frame) -> Challenge:
        return cls(m.get("nonce"))  # type: ignore[arg-type]


@dataclass(frozen=True)
class Auth:
    """worker -> chief: proof of the token, the model it trains, and (joining with
    ``want_model``) the digest of the model it holds, so that the chief need not send it.

    ``proof`` is filled in by ``WorkerConnection.send`` (it holds the token and both nonces).
    ``names``: optionally, the names of the model's tensors (``check_tensor_names``), which the
    chief uses to name the tensors of its model file and for nothing else.
    """

    TYPE: ClassVar[MsgType] = MsgType.AUTH
    spec: Spec
    want_model: bool = True
    have: str | None = None
    proof: str = ""
    names: tuple[str, ...] | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.proof, str) or len(self.proof) > 2 * DIGEST_CHARS:
            raise _bad("AUTH needs a proof (a string of hex digits)")
        if not isinstance(self.spec, tuple) or not all(isinstance(t, TensorSpec)
                                                       for t in self.spec):
            raise _bad("AUTH needs the model's spec")
        if type(self.want_model) is not bool:
            raise _bad(f"want_model must be true or false, not {self.want_model!r:.40}")
        if self.have is not None and not _is_hex(self.have, DIGEST_CHARS):
            raise _bad(f"have must be a SHA-256 digest ({DIGEST_CHARS} hex digits)")
        if self.names is not None:
            object.__setattr__(self, "names", check_tensor_names(self.names, len(self.spec)))

    def meta(self) -> dict[str, Any]:
        m: dict[str, Any] = {"proof": self.proof, "spec": spec_to_json(self.spec),
                             "want_model": self.want_model}
        if self.have is not None:
            m["have"] = self.have
        if self.names is not None:
            m["names"] = list(self.names)
        return m

    def with_proof(self, proof: str) -> Auth:
        """This AUTH with ``proof`` filled in (every other field kept)."""
        return dataclasses.replace(self, proof=proof)

    @classmethod
    def from_meta(cls, m: dict[str, Any], frame: Frame) -> Auth:
        proof = m.get("proof")
        if not isinstance(proof, str):
            raise _bad("AUTH needs a proof (a string of hex digits)")
        return cls(spec_from_json(m.get("spec"), PREAUTH_LIMITS), m.get("want_model", True),
                   m.get("have"), proof, names=m.get("names"))


@dataclass(frozen=True)
class Welcome:
    """chief -> worker: the chief's proof of the token, the round, whether the chief needs the
    worker's model (INIT), and how it broadcasts the global model.

    ``proof`` is filled in by ``ChiefConnection.send``.
    """

    TYPE: ClassVar[MsgType] = MsgType.WELCOME
    round: int
    need_init: bool = False
    downlink: str = "none"
    proof: str = ""

    def __post_init__(self) -> None:
        _check_round("WELCOME", self.round)
        if type(self.need_init) is not bool:
            raise _bad(f"need_init must be true or false, not {self.need_init!r:.40}")
        if self.downlink not in encodings.DOWNLINK_CODECS:
            raise _bad(f"downlink {self.downlink!r:.40} is not one of "
                       f"{', '.join(encodings.DOWNLINK_CODECS)}")
        if not isinstance(self.proof, str) or len(self.proof) > 2 * DIGEST_CHARS:
            raise _bad("WELCOME needs a proof (a string of hex digits)")

    def meta(self) -> dict[str, Any]:
        return {"proof": self.proof, "round": self.round, "need_init": self.need_init,
                "downlink": self.downlink}

    @classmethod
    def from_meta(cls, m: dict[str, Any], frame: Frame) -> Welcome:
        return cls(m.get("round"), m.get("need_init", False), m.get("downlink", "none"),  # type: ignore[arg-type]
                   m.get("proof"))  # type: ignore[arg-type]


# -- tensors ---------------------------------------------------------------------------------
@dataclass(frozen=True, eq=False)
class Init:
    """worker -> chief: the initial model, when WELCOME asked for it (``need_init``)."""

    TYPE: ClassVar[MsgType] = MsgType.INIT
    tensors: Sequence[np.ndarray]

    def meta(self) -> dict[str, Any]:
        return {}

    @classmethod
    def from_meta(cls, m: dict[str, Any], frame: Frame) -> Init:
        return cls(frame.tensors)


def clean_metrics(raw: object) -> dict[str, float]:
    """The metrics of an UPDATE: at most MAX_METRICS finite numbers under short names. Other
    entries are dropped rather than refused: metrics are the user's, informational, and an odd
    one must not cost the update."""
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise _bad(f"metrics must be an object of numbers, not {type(raw).__name__}")
    out: dict[str, float] = {}
    for k, v in list(raw.items())[:MAX_METRICS]:
        if type(v) in (int, float):
            try:
                f = float(v)
            except OverflowError:  # a 400-digit integer is valid JSON
                continue
            if math.isfinite(f):
                out[str(k)[:MAX_METRIC_NAME]] = f
    return out


@dataclass(frozen=True, eq=False)
class Update:
    """worker -> chief: its model (or its change, under q8) after training in ``round`` on
    ``num_samples`` samples.

    ``checked``/``non_finite``: the receiving decoder looked for NaN/Inf in the tensors as they
    arrived, and what it found (``FrameDecoder.check_finite``); the chief's admission decides.
    """

    TYPE: ClassVar[MsgType] = MsgType.UPDATE
    round: int
    num_samples: float
    tensors: Sequence[np.ndarray]
    metrics: dict[str, float] = field(default_factory=dict)
    codec: str = "none"
    checked: bool = False
    non_finite: str | None = None

    def __post_init__(self) -> None:
        _check_round("UPDATE", self.round)
        n = self.num_samples
        if type(n) not in (int, float):
            raise _bad(f"num_samples must be a number, not {type(n).__name__}")
        try:
            f = float(n)
        except OverflowError:  # a 400-digit integer is valid JSON
            f = math.inf
        if not (math.isfinite(f) and 0 < f <= MAX_NUM_SAMPLES):
            raise _bad(f"num_samples must be a positive number of at most 2**53, not {n!r:.40}")
        object.__setattr__(self, "num_samples", f)
        if not isinstance(self.metrics, dict):
            raise _bad("metrics must be an object of numbers")
        if self.codec not in encodings.UPLINK_CODECS:
            raise _bad(f"UPDATE frames cannot use codec {self.codec!r:.40}")

    def meta(self) -> dict[str, Any]:
        m: dict[str, Any] = {"round": self.round, "num_samples": self.num_samples,
                             "metrics": self.metrics}
        if self.codec != "none":
            m["codec"] = self.codec
        return m

    @classmethod
    def from_meta(cls, m: dict[str, Any], frame: Frame) -> Update:
        return cls(m.get("round"), m.get("num_samples"), frame.tensors,  # type: ignore[arg-type]
                   clean_metrics(m.get("metrics")), m.get("codec", "none"), frame.checked,
                   frame.non_finite)


@dataclass(frozen=True, eq=False)
class Global:
    """chief -> worker: the global model of ``round`` (``done``: the last one).

    ``codec``: "none", "fp16", "q8" (the change since the model of round ``base``, which the
    worker must hold) or "unchanged" (no tensors: the worker holds this model already).
    """

    TYPE: ClassVar[MsgType] = MsgType.GLOBAL
    round: int
    tensors: Sequence[np.ndarray] = ()
    done: bool = False
    codec: str = "none"
    base: int | None = None

    def __post_init__(self) -> None:
        _check_round("GLOBAL", self.round)
        if type(self.done) is not bool:
            raise _bad(f"done must be true or false, not {self.done!r:.40}")
        if self.codec not in encodings.FRAME_CODECS["GLOBAL"]:
            raise _bad(f"GLOBAL frames cannot use codec {self.codec!r:.40}")
        if self.codec == "q8":
            _check_round("a q8 GLOBAL's base", self.base)
            if self.base >= self.round:  # type: ignore[operator]
                raise _bad(f"a q8 GLOBAL of round {self.round} must be the change since an "
                           f"earlier round, not {self.base}")
        elif self.base is not None:
            raise _bad("only a q8 GLOBAL has a base round")

    def meta(self) -> dict[str, Any]:
        m: dict[str, Any] = {"round": self.round, "done": self.done}
        if self.codec != "none":
            m["codec"] = self.codec
        if self.base is not None:
            m["base"] = self.base
        return m

    @classmethod
    def from_meta(cls, m: dict[str, Any], frame: Frame) -> Global:
        return cls(m.get("round"), frame.tensors, m.get("done", False),  # type: ignore[arg-type]
                   m.get("codec", "none"), m.get("base"))


# -- control ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class Error:
    """Either way: why the sender refuses something. ``code`` is an ``ErrorCode`` value (kept as
    a string: a newer peer may know codes we do not); ``fatal``: the sender closes."""

    TYPE: ClassVar[MsgType] = MsgType.ERROR
    code: str
    message: str
    fatal: bool = True

    def __post_init__(self) -> None:
        object.__setattr__(self, "code", str(getattr(self.code, "value", self.code)))
        if not isinstance(self.code, str) or not 0 < len(self.code) <= MAX_ERROR_CODE:
            raise _bad(f"an ERROR's code must be 1-{MAX_ERROR_CODE} characters")
        if not isinstance(self.message, str):
            raise _bad("an ERROR's message must be a string")
        if type(self.fatal) is not bool:
            raise _bad("an ERROR's fatal must be true or false")
        if len(self.message) > MAX_ERROR_MESSAGE:
            object.__setattr__(self, "message", self.message[:MAX_ERROR_MESSAGE] + "...")

    def meta(self) -> dict[str, Any]:
        return {"code": self.code, "message": self.message, "fatal": self.fatal}

    @classmethod
    def from_meta(cls, m: dict[str, Any], frame: Frame) -> Error:
        code = m.get("code", "error")
        message = m.get("message", "")
        if not isinstance(code, str):  # never reached from ``str`` alone: refuse, with a word
            raise _bad("an ERROR's code must be a string")
        return cls(code, message, m.get("fatal", True))


@dataclass(frozen=True)
class Bye:
    """worker -> chief: leaving on purpose (it will not reconnect)."""

    TYPE: ClassVar[MsgType] = MsgType.BYE

    def meta(self) -> dict[str, Any]:
        return {}

    @classmethod
    def from_meta(cls, m: dict[str, Any], frame: Frame) -> Bye:
        return cls()


@dataclass(frozen=True)
class Ping:
    """Either way: are you there? Answered by PONG in any state."""

    TYPE: ClassVar[MsgType] = MsgType.PING

    def meta(self) -> dict[str, Any]:
        return {}

    @classmethod
    def from_meta(cls, m: dict[str, Any], frame: Frame) -> Ping:
        return cls()


@dataclass(frozen=True)
class Pong:
    TYPE: ClassVar[MsgType] = MsgType.PONG

    def meta(self) -> dict[str, Any]:
        return {}

    @classmethod
    def from_meta(cls, m: dict[str, Any], frame: Frame) -> Pong:
        return cls()


Message = (Hello | Challenge | Auth | Welcome | Init | Update | Global | Error | Bye | Ping
           | Pong)

_BY_TYPE: dict[MsgType, Callable[[dict[str, Any], Frame], Message]] = {
    cls.TYPE: cls.from_meta  # type: ignore[attr-defined]
    for cls in (Hello, Challenge, Auth, Welcome, Init, Update, Global, Error, Bye, Ping, Pong)}


def from_frame(frame: Frame) -> Message:
    """The message a decoded frame carries, every field checked (ProtocolError if one is bad)."""
    return _BY_TYPE[frame.type](frame.meta, frame)


def to_frame(msg: Message) -> EncodedFrame:
    """The frame of ``msg``, ready to write (tensors not copied)."""
    return encode(msg.TYPE, msg.meta(), getattr(msg, "tensors", ()))
