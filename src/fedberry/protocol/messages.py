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
    MAX_AGENT,
    MAX_CONFIG_KEYS,
    MAX_CONFIG_STRING,
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
from fedberry.secagg import wire as secagg_wire
from fedberry.secagg.errors import SecAggError

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
    # The worker's software ("fedberry/0.1.0 python/3.11.7"), for the operator's eyes only
    # (the status page): optional, so that a worker that does not say is served the same.
    agent: str = ""

    def __post_init__(self) -> None:
        w = self.worker_id
        if (not isinstance(w, str) or not 0 < len(w) <= MAX_WORKER_ID
                or not w.isprintable()):
            raise _bad(f"worker_id must be 1-{MAX_WORKER_ID} printable characters")
        if not _is_hex(self.nonce, NONCE_CHARS):
            raise _bad(f"HELLO needs a nonce of {NONCE_CHARS} hex digits")
        a = self.agent
        if not isinstance(a, str) or len(a) > MAX_AGENT or not a.isprintable():
            raise _bad(f"HELLO's agent must be at most {MAX_AGENT} printable characters")

    def meta(self) -> dict[str, Any]:
        meta = {"worker_id": self.worker_id, "nonce": self.nonce}
        return {**meta, "agent": self.agent} if self.agent else meta

    @classmethod
    def from_meta(cls, m: dict[str, Any], frame: Frame) -> Hello:
        return cls(m.get("worker_id"), m.get("nonce"), m.get("agent", ""))  # type: ignore[arg-type]


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
    # The worker answers a GLOBAL that asks for an evaluation (EVAL_RESULT); one that says
    # false (or an older worker, which says nothing) is never waited for.
    evaluates: bool = False
    names: tuple[str, ...] | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.proof, str) or len(self.proof) > 2 * DIGEST_CHARS:
            raise _bad("AUTH needs a proof (a string of hex digits)")
        if type(self.evaluates) is not bool:
            raise _bad(f"evaluates must be true or false, not {self.evaluates!r:.40}")
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
        if self.evaluates:
            m["evaluates"] = True
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
                   m.get("have"), proof, m.get("evaluates", False), names=m.get("names"))


@dataclass(frozen=True)
class Welcome:
    """chief -> worker: the chief's proof of the token, the round, whether the chief needs the
    worker's model (INIT), and how it broadcasts the global model.

    ``proof`` is filled in by ``ChiefConnection.send``. ``dp_clip`` (optional): differential
    privacy's clipping bound C, to which the worker clips each update's change from the global
    model before sending it (docs/privacy.md); absent (None) when the worker need not clip.
    ``secure``: the federation aggregates securely (docs/secure-aggregation.md): the worker's
    updates go as an UPDATE of codec "secagg" and the SECAGG/MASKED steps that follow.
    """

    TYPE: ClassVar[MsgType] = MsgType.WELCOME
    round: int
    need_init: bool = False
    downlink: str = "none"
    proof: str = ""
    dp_clip: float | None = None
    secure: bool = False

    def __post_init__(self) -> None:
        _check_round("WELCOME", self.round)
        if type(self.secure) is not bool:
            raise _bad(f"secure must be true or false, not {self.secure!r:.40}")
        if type(self.need_init) is not bool:
            raise _bad(f"need_init must be true or false, not {self.need_init!r:.40}")
        if self.downlink not in encodings.DOWNLINK_CODECS:
            raise _bad(f"downlink {self.downlink!r:.40} is not one of "
                       f"{', '.join(encodings.DOWNLINK_CODECS)}")
        if not isinstance(self.proof, str) or len(self.proof) > 2 * DIGEST_CHARS:
            raise _bad("WELCOME needs a proof (a string of hex digits)")
        c = self.dp_clip
        if c is not None and not (isinstance(c, (int, float)) and not isinstance(c, bool)
                                  and math.isfinite(c) and c > 0):
            raise _bad(f"dp_clip must be a positive number, not {c!r:.40}")

    def meta(self) -> dict[str, Any]:
        m = {"proof": self.proof, "round": self.round, "need_init": self.need_init,
             "downlink": self.downlink}
        if self.dp_clip is not None:  # absent otherwise: a chief without DP sends what it did
            m["dp_clip"] = self.dp_clip
        if self.secure:
            m["secure"] = True
        return m

    @classmethod
    def from_meta(cls, m: dict[str, Any], frame: Frame) -> Welcome:
        return cls(m.get("round"), m.get("need_init", False), m.get("downlink", "none"),  # type: ignore[arg-type]
                   m.get("proof"), m.get("dp_clip"), m.get("secure", False))  # type: ignore[arg-type]


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
        if self.codec not in encodings.FRAME_CODECS["UPDATE"]:
            raise _bad(f"UPDATE frames cannot use codec {self.codec!r:.40}")
        if self.codec == encodings.SECURE_UPDATE_CODEC and len(self.tensors):
            raise _bad("a secure report (codec 'secagg') carries no tensors")

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


def check_round_config(raw: object) -> dict[str, str | int | float | bool]:
    """A GLOBAL's round configuration, checked (the one place of the rule, for what a chief
    sends and what a worker accepts): at most MAX_CONFIG_KEYS entries under names of at most
    MAX_METRIC_NAME characters, each value a scalar (a string of at most MAX_CONFIG_STRING
    characters, an integer, a finite float, a boolean). Raises ProtocolError otherwise."""
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise _bad(f"a round's config must be an object of scalars, not {type(raw).__name__}")
    if len(raw) > MAX_CONFIG_KEYS:
        raise _bad(f"a round's config has {len(raw)} keys, more than {MAX_CONFIG_KEYS}")
    out: dict[str, str | int | float | bool] = {}
    for k, v in raw.items():
        if not isinstance(k, str) or not 0 < len(k) <= MAX_METRIC_NAME or not k.isprintable():
            raise _bad(f"a round's config key must be 1-{MAX_METRIC_NAME} printable "
                       f"characters, not {k!r:.40}")
        if type(v) is str:
            if len(v) > MAX_CONFIG_STRING:
                raise _bad(f"round config {k!r}: a string of at most {MAX_CONFIG_STRING} "
                           "characters")
        elif type(v) is float:
            if not math.isfinite(v):
                raise _bad(f"round config {k!r} must be a finite number, not {v!r}")
        elif type(v) is int:
            if abs(v) > 2 ** 53:
                raise _bad(f"round config {k!r}: an integer of at most 2**53 in size")
        elif type(v) is not bool:
            raise _bad(f"round config {k!r} must be a string, an integer, a float or a "
                       f"boolean, not {type(v).__name__}")
        out[k] = v
    return out


@dataclass(frozen=True, eq=False)
class Global:
    """chief -> worker: the global model of ``round`` (``done``: the last one).

    ``codec``: "none", "fp16", "q8" (the change since the model of round ``base``, which the
    worker must hold) or "unchanged" (no tensors: the worker holds this model already).
    ``config``: the round's configuration (``check_round_config``), the same for every worker.
    ``evaluate``: the chief asks the workers that evaluate for an EVAL_RESULT of this model.
    """

    TYPE: ClassVar[MsgType] = MsgType.GLOBAL
    round: int
    tensors: Sequence[np.ndarray] = ()
    done: bool = False
    codec: str = "none"
    base: int | None = None
    config: dict[str, Any] = field(default_factory=dict)
    evaluate: bool = False

    def __post_init__(self) -> None:
        _check_round("GLOBAL", self.round)
        object.__setattr__(self, "config", check_round_config(self.config))
        if type(self.evaluate) is not bool:
            raise _bad(f"evaluate must be true or false, not {self.evaluate!r:.40}")
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
        m.update(round_extras(self.config, self.evaluate))
        return m

    @classmethod
    def from_meta(cls, m: dict[str, Any], frame: Frame) -> Global:
        return cls(m.get("round"), frame.tensors, m.get("done", False),  # type: ignore[arg-type]
                   m.get("codec", "none"), m.get("base"), m.get("config"),
                   m.get("evaluate", False))


def round_extras(config: dict[str, Any], evaluate: bool) -> dict[str, Any]:
    """The part of a GLOBAL's metadata beyond the model (for a chief that encodes GLOBAL frames
    once per round itself: ``chief.broadcast``): ``config`` is checked here, as it is in
    ``Global``; absent entries say nothing, so that older workers read the frame as before."""
    m: dict[str, Any] = {}
    config = check_round_config(config)
    if config:
        m["config"] = config
    if evaluate:
        m["evaluate"] = True
    return m


def check_eval_metrics(raw: object) -> dict[str, float]:
    """An EVAL_RESULT's metrics: an object of at most MAX_METRICS finite numbers under names of
    at most MAX_METRIC_NAME characters. Unlike an UPDATE's, nothing is dropped quietly: the
    chief averages these, and a worker's ``Worker`` cleans them before sending."""
    if not isinstance(raw, dict):
        raise _bad(f"an evaluation's metrics must be an object of numbers, not "
                   f"{type(raw).__name__}")
    if len(raw) > MAX_METRICS:
        raise _bad(f"an evaluation has {len(raw)} metrics, more than {MAX_METRICS}")
    out: dict[str, float] = {}
    for k, v in raw.items():
        if not isinstance(k, str) or not 0 < len(k) <= MAX_METRIC_NAME or not k.isprintable():
            raise _bad(f"an evaluation's metric name must be 1-{MAX_METRIC_NAME} printable "
                       f"characters, not {k!r:.40}")
        if type(v) not in (int, float):
            raise _bad(f"evaluation metric {k!r} must be a number, not {type(v).__name__}")
        try:
            f = float(v)
        except OverflowError:
            f = math.inf
        if not math.isfinite(f):
            raise _bad(f"evaluation metric {k!r} must be finite, not {v!r:.40}")
        out[k] = f
    return out


@dataclass(frozen=True)
class EvalResult:
    """worker -> chief: its evaluation of the GLOBAL of ``round`` on ``num_examples`` of its
    own held-out examples (answering a GLOBAL with ``evaluate``)."""

    TYPE: ClassVar[MsgType] = MsgType.EVAL_RESULT
    round: int
    num_examples: float
    metrics: dict[str, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        _check_round("EVAL_RESULT", self.round)
        n = self.num_examples
        if type(n) not in (int, float):
            raise _bad(f"num_examples must be a number, not {type(n).__name__}")
        try:
            f = float(n)
        except OverflowError:
            f = math.inf
        if not (math.isfinite(f) and 0 < f <= MAX_NUM_SAMPLES):
            raise _bad(f"num_examples must be a positive number of at most 2**53, not {n!r:.40}")
        object.__setattr__(self, "num_examples", f)
        object.__setattr__(self, "metrics", check_eval_metrics(self.metrics))

    def meta(self) -> dict[str, Any]:
        return {"round": self.round, "num_examples": self.num_examples, "metrics": self.metrics}

    @classmethod
    def from_meta(cls, m: dict[str, Any], frame: Frame) -> EvalResult:
        return cls(m.get("round"), m.get("num_examples"), m.get("metrics"))  # type: ignore[arg-type]


# -- secure aggregation ----------------------------------------------------------------------
@dataclass(frozen=True, eq=False)
class SecAgg:
    """Either way, in a secure federation: one step of round ``round``'s secure aggregation.
    ``step`` names it (``secagg.wire``: begin, peers, forward, unmask from the chief; advert,
    shares, reveal from a worker) and ``payload`` is its typed message, every field checked as
    the frame is decoded."""

    TYPE: ClassVar[MsgType] = MsgType.SECAGG
    round: int
    payload: Any

    def __post_init__(self) -> None:
        _check_round("SECAGG", self.round)
        try:
            secagg_wire.step_of(self.payload)
        except TypeError as exc:
            raise _bad(str(exc)) from None

    @property
    def step(self) -> str:
        return secagg_wire.step_of(self.payload)

    def meta(self) -> dict[str, Any]:
        return {"round": self.round, "step": self.step, "body": secagg_wire.to_json(self.payload)}

    @classmethod
    def from_meta(cls, m: dict[str, Any], frame: Frame) -> SecAgg:
        step = m.get("step")
        if not isinstance(step, str):
            raise _bad("SECAGG needs a step")
        try:
            payload = secagg_wire.from_json(step, m.get("body"))
        except SecAggError as exc:
            raise _bad(f"SECAGG {step:.20}: {exc}") from None
        return cls(m.get("round"), payload)  # type: ignore[arg-type]


@dataclass(frozen=True, eq=False)
class Masked:
    """worker -> chief, in a secure round: its masked update, one ring vector (``ring16`` or
    ``ring32``) of the model's float values, which the chief adds into the round's sum."""

    TYPE: ClassVar[MsgType] = MsgType.MASKED
    round: int
    tensors: Sequence[np.ndarray]
    codec: str = "ring32"

    def __post_init__(self) -> None:
        _check_round("MASKED", self.round)
        if self.codec not in encodings.RING_CODECS:
            raise _bad(f"MASKED frames cannot use codec {self.codec!r:.40}")

    def meta(self) -> dict[str, Any]:
        return {"round": self.round, "codec": self.codec}

    @classmethod
    def from_meta(cls, m: dict[str, Any], frame: Frame) -> Masked:
        return cls(m.get("round"), frame.tensors, m.get("codec", "none"))  # type: ignore[arg-type]


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
           | Pong | EvalResult | SecAgg | Masked)

_BY_TYPE: dict[MsgType, Callable[[dict[str, Any], Frame], Message]] = {
    cls.TYPE: cls.from_meta  # type: ignore[attr-defined]
    for cls in (Hello, Challenge, Auth, Welcome, Init, Update, Global, Error, Bye, Ping, Pong,
                EvalResult, SecAgg, Masked)}


def from_frame(frame: Frame) -> Message:
    """The message a decoded frame carries, every field checked (ProtocolError if one is bad)."""
    return _BY_TYPE[frame.type](frame.meta, frame)


def to_frame(msg: Message) -> EncodedFrame:
    """The frame of ``msg``, ready to write (tensors not copied)."""
    return encode(msg.TYPE, msg.meta(), getattr(msg, "tensors", ()))
