"""The vocabulary of the wire: frame types, error codes, the refusal exception, tensor specs.

Every other protocol module builds on these names; of fedberry's, this one imports only
``limits`` (the tensor-shape bounds), which imports only ``encodings``, which imports nothing:
the package has no import circle.
"""

from __future__ import annotations

import enum
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from fedberry.protocol.limits import ALLOWED_DTYPES, MAX_DIMS, MAX_ELEMENTS, MAX_TENSORS

MAGIC = b"FDBR"
VERSION = 1


class MsgType(enum.IntEnum):
    HELLO = 1  # worker -> chief: worker id, worker nonce
    CHALLENGE = 2  # chief -> worker: chief nonce
    AUTH = 3  # worker -> chief: HMAC proof, model spec, digest of the model held
    WELCOME = 4  # chief -> worker: chief's HMAC proof, round, whether the chief needs a model
    INIT = 5  # worker -> chief: initial weights, when the chief has none yet
    UPDATE = 6  # worker -> chief: round, num_samples, metrics, weights
    GLOBAL = 7  # chief -> worker: round, done, the global weights
    ERROR = 8  # either way: code, message, fatal
    BYE = 9  # worker -> chief: leaving on purpose
    PING = 10  # either way: heartbeat
    PONG = 11
    EVAL_RESULT = 12  # worker -> chief: its evaluation of a GLOBAL that asked for one
    # Secure aggregation (protocol.secure): the key-exchange steps either way, and a worker's
    # masked update (one ring vector) for the round.
    SECAGG = 13
    MASKED = 14


# Frames that carry tensors. Any other frame type with a non-empty payload is malformed.
TENSOR_TYPES = frozenset({MsgType.INIT, MsgType.UPDATE, MsgType.GLOBAL, MsgType.MASKED})


class ErrorCode(str, enum.Enum):
    BAD_FRAME = "bad_frame"  # malformed header, metadata, field or tensor description
    VERSION = "version"  # protocol versions differ
    LIMIT = "limit"  # a frame exceeds a limit (size, tensor count)
    AUTH_FAILED = "auth_failed"  # wrong token
    SPEC_MISMATCH = "spec_mismatch"  # tensors differ from the federation's model in shape/dtype
    NON_FINITE = "non_finite"  # NaN or Inf in an update
    STALE = "stale_update"  # update for a round that has closed; newest model follows
    PROTOCOL = "protocol"  # a frame that is not allowed in this state
    BUSY = "busy"  # connection cap reached
    TIMEOUT = "timeout"  # peer silent too long
    SHUTDOWN = "shutdown"  # chief is stopping
    INTERNAL = "internal"
    CHIEF_FAILED = "chief_failed"  # the chief cannot go on (its checkpoint cannot be written)
    SECAGG = "secagg"  # a secure-aggregation round failed or refused (too few survivors, ...)


# The fatal errors after which a worker dials again (a full chief, a connection the chief timed
# out); after any other the worker stops. One set for both sides: the worker decides by it, and
# the chief by it whether a finished run should wait for the worker to come back.
RETRIED_CODES = frozenset({ErrorCode.BUSY.value, ErrorCode.TIMEOUT.value})


class ProtocolError(Exception):
    """A peer sent something we refuse. ``code`` goes back to it in an ERROR frame, with
    ``message``, one sentence saying what was wrong."""

    def __init__(self, code: ErrorCode, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


@dataclass(frozen=True)
class TensorSpec:
    dtype: str  # numpy dtype.str, e.g. "<f4"
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        return np.dtype(self.dtype).itemsize * math.prod(self.shape)

    def describe(self) -> str:
        return f"{np.dtype(self.dtype).name}{list(self.shape)}"


Spec = tuple[TensorSpec, ...]


def wire_dtype(dtype: np.dtype) -> np.dtype:
    """The little-endian dtype an array travels as."""
    dt = np.dtype(dtype).newbyteorder("<") if np.dtype(dtype).byteorder == ">" else np.dtype(dtype)
    if dt.str not in ALLOWED_DTYPES:
        raise ValueError(f"dtype {np.dtype(dtype)} cannot be sent; "
                         f"allowed: {sorted(ALLOWED_DTYPES)}")
    return dt


def spec_of(arrays: Sequence[np.ndarray]) -> Spec:
    return tuple(TensorSpec(wire_dtype(a.dtype).str, tuple(a.shape)) for a in arrays)


def spec_to_json(spec: Spec) -> list[list[Any]]:
    return [[t.dtype, list(t.shape)] for t in spec]


def spec_from_json(obj: Any, limits: Any = None) -> Spec:
    """A model spec as AUTH carries it, checked. ``limits`` (a ``Limits``) bounds its length."""
    max_tensors = MAX_TENSORS if limits is None else limits.max_tensors
    if not isinstance(obj, list) or len(obj) > max_tensors:
        raise ProtocolError(ErrorCode.BAD_FRAME, "model spec must be a list of [dtype, shape]")
    out = []
    for item in obj:
        if not isinstance(item, list) or len(item) != 2:
            raise ProtocolError(ErrorCode.BAD_FRAME, "model spec entries must be [dtype, shape]")
        out.append(tensor_spec(item[0], item[1]))
    return tuple(out)


def tensor_spec(dtype: Any, shape: Any) -> TensorSpec:
    """One tensor description from a peer (JSON: anything), checked."""
    if not isinstance(dtype, str) or dtype not in ALLOWED_DTYPES:
        raise ProtocolError(ErrorCode.BAD_FRAME, f"dtype {dtype!r} is not allowed")
    if (not isinstance(shape, list) or len(shape) > MAX_DIMS
            or not all(type(d) is int and 0 <= d < MAX_ELEMENTS for d in shape)):
        raise ProtocolError(ErrorCode.BAD_FRAME, f"shape {shape!r} is not a list of sizes")
    # numpy refuses to build an array whose dimensions multiply past its index range even when
    # another dimension is 0 (so it holds no bytes): bound the product of the non-zero ones.
    if math.prod(d for d in shape if d) > MAX_ELEMENTS:
        raise ProtocolError(ErrorCode.LIMIT, f"shape {shape!r} has too many elements")
    return TensorSpec(dtype, tuple(shape))


def spec_mismatch(expected: Spec, got: Spec) -> str | None:
    """A sentence saying how ``got`` differs from ``expected``, or None when they match."""
    if len(expected) != len(got):
        return f"the model has {len(got)} tensors, the federation's has {len(expected)}"
    for i, (e, g) in enumerate(zip(expected, got)):
        if e != g:
            return f"tensor {i} is {g.describe()}, the federation's is {e.describe()}"
    return None
