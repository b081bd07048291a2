"""The fedberry wire format, sans-IO: bytes in, frames out; frames in, bytes out.

Nothing here touches a socket, a thread or an event loop, so the same code serves TCP (asyncio),
MPI and tests, and it can be fuzzed by feeding it bytes.

A frame is::

    header  20 bytes   magic b"FDBR", version u8, type u8, flags u16, meta_len u32, payload_len u64
    meta    meta_len   UTF-8 JSON object; "tensors": [{"dtype": "<f4", "shape": [200, 784]}, ...]
                       and, for a compressed model, "codec": "fp16" | "q8" | ... (encodings.py)
    payload            the tensors' raw little-endian bytes, back to back, in the order of "tensors"

All integers are little-endian. Message boundaries come from the header, never from timeouts.

What a misbehaving peer can cause: every length is checked against a limit *before* anything is
allocated, so a hostile header can make us allocate at most ``Limits.max_meta_bytes`` for the
metadata and, after the metadata has been validated (dtypes, shapes, counts, sizes adding up to
payload_len, and shapes matching the model when one is expected), exactly the tensors it describes.
Any violation raises :class:`ProtocolError`; the caller answers with an ERROR frame and closes.
What the metadata's fields mean, and their checks, are ``messages``'; which frame may come when
is ``connection``'s. Nothing received is ever unpickled or evaluated: metadata is JSON, tensors
are raw numbers.
"""

from __future__ import annotations

import json
import math
import struct
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from fedberry.protocol import encodings
from fedberry.protocol.limits import ALLOWED_DTYPES, MAX_DIMS, MAX_ELEMENTS, Limits
from fedberry.protocol.spec import (
    MAGIC,
    TENSOR_TYPES,
    VERSION,
    ErrorCode,
    MsgType,
    ProtocolError,
    Spec,
    TensorSpec,
    spec_from_json,
    spec_mismatch,
    spec_of,
    spec_to_json,
    tensor_spec,
    wire_dtype,
)

# The vocabulary is defined in spec.py and limits.py; it is named here too because frames are
# what most callers deal with.
__all__ = [
    "ALLOWED_DTYPES", "HEADER", "HEADER_SIZE", "MAGIC", "MAX_DIMS", "MAX_ELEMENTS",
    "TENSOR_TYPES", "VERSION", "EncodedFrame", "ErrorCode", "Frame", "FrameDecoder", "Limits",
    "MsgType", "ProtocolError", "Spec", "TensorSpec", "encode", "finite",
    "spec_from_json", "spec_mismatch", "spec_of", "spec_to_json", "wire_dtype",
]

HEADER = struct.Struct("<4sBBHIQ")
HEADER_SIZE = HEADER.size  # 20


@dataclass
class Frame:
    type: MsgType
    meta: dict[str, Any]
    tensors: list[np.ndarray] = field(default_factory=list)
    nbytes: int = 0  # bytes this frame took on the wire
    # With FrameDecoder.check_finite: the tensors were looked at for NaN/Inf as they arrived,
    # and ``non_finite`` says which one has them (None: none has).
    checked: bool = False
    non_finite: str | None = None


@dataclass
class EncodedFrame:
    """A frame as a list of buffers, for ``writelines``: the tensors are not copied."""

    parts: list[bytes | memoryview]
    nbytes: int
    # What was encoded, for a connection object to check against its state (and to remember
    # which round's model a GLOBAL carried) without parsing its own bytes back.
    type: MsgType | None = None
    meta: dict[str, Any] | None = None

    def tobytes(self) -> bytes:
        return b"".join(bytes(p) for p in self.parts)


def encode(msg_type: MsgType, meta: dict[str, Any] | None = None,
           tensors: Sequence[np.ndarray] = ()) -> EncodedFrame:
    """Build a frame. Tensors are sent as they are (made contiguous little-endian if needed)."""
    meta = dict(meta or {})
    arrays = []
    for a in tensors:
        a = np.asarray(a)
        dt = wire_dtype(a.dtype)
        # Not ascontiguousarray: it turns a 0-d array (torch's BatchNorm step counter) into 1-d,
        # and the receiver would then see a different model.
        arrays.append(np.require(a, dtype=dt, requirements="C"))
    if arrays:
        meta["tensors"] = [{"dtype": a.dtype.str, "shape": list(a.shape)} for a in arrays]
    elif msg_type in TENSOR_TYPES:
        meta["tensors"] = []
    meta_bytes = json.dumps(meta, separators=(",", ":"), allow_nan=False).encode()
    payload_len = sum(a.nbytes for a in arrays)
    header = HEADER.pack(MAGIC, VERSION, int(msg_type), 0, len(meta_bytes), payload_len)
    parts: list[bytes | memoryview] = [header + meta_bytes]
    parts.extend(memoryview(a).cast("B") for a in arrays if a.nbytes)
    return EncodedFrame(parts, HEADER_SIZE + len(meta_bytes) + payload_len, msg_type, meta)


# The widest allowed dtype (8 bytes) over the narrowest (1 byte): how much bigger than the model a
# frame of the right tensors in other dtypes can be.
MAX_DTYPE_RATIO = 8


class FrameDecoder:
    """Turns a byte stream into frames, reading tensor bytes straight into numpy arrays.

    Two ways to feed it:

    * zero-copy, for ``asyncio.BufferedProtocol``: ``get_buffer()`` gives the memory the next bytes
      belong in (the header, the metadata, or the current tensor's own buffer), and
      ``buffer_updated(n)`` says n bytes were written there;
    * ``receive_data(data)``, which copies ``data`` in through the same path (tests, fuzzing, MPI).

    Both return the frames completed so far and raise :class:`ProtocolError` on a bad frame,
    after which the decoder is unusable (the stream has lost its framing: close the connection).

    ``check_type`` (None: every type) is called with each frame's type the moment its header is
    parsed, before the metadata or the tensors are allocated or read: it raises
    :class:`ProtocolError` to refuse a type the owner's state does not allow, so such a frame
    costs its 20 header bytes and nothing more.

    ``expected`` (set by the owner once the model is known) is the spec every tensor-carrying
    frame must match; ``limits`` may be replaced at any time (it takes effect at the next header).
    ``allocate`` (None: ``np.empty``) gives the arrays a frame's tensors are read into, e.g. from
    a pool of buffers used before (``buffers.BufferPool``); it is called only once the frame's
    description has passed every check, with the specs it must match exactly. It may answer
    None, "not now" (``buffers.ReceiveBudget``): the decoder is then ``waiting``, its owner
    stops reading until memory is granted and calls ``retry()``, which asks again.
    """

    def __init__(self, limits: Limits | None = None) -> None:
        self.limits = limits or Limits()
        self.expected: Spec | None = None
        self.allocate: Callable[[Spec], list[np.ndarray] | None] | None = None
        self.check_type: Callable[[MsgType], None] | None = None
        # Look for NaN/Inf in each tensor the moment its last byte is in: it is still in the
        # CPU cache then (4x cheaper than a pass once the whole frame is in, on the bench VM).
        self.check_finite = False
        self._header = bytearray(HEADER_SIZE)
        self._start_header()
        self.broken = False

    # -- state -------------------------------------------------------------------------------
    def _start_header(self) -> None:
        self._stage = "header"
        self._buf = memoryview(self._header)
        self._pos = 0
        self._type: MsgType | None = None
        self._meta: dict[str, Any] = {}
        self._tensors: list[np.ndarray] = []
        self._specs: Spec = ()
        self._views: list[memoryview] = []
        self._tensor_index = 0
        self._frame_bytes = 0
        self._non_finite: str | None = None

    @property
    def waiting(self) -> bool:
        """A frame's tensors wait for memory (``allocate`` said not now): read nothing."""
        return self._stage == "wait"

    def retry(self) -> bool:
        """Ask ``allocate`` again for the waiting frame; True once its arrays are there."""
        if self._stage != "wait":
            return True
        self._allocate(self._specs)
        return self._stage != "wait"

    def get_buffer(self) -> memoryview:
        """Where the next received bytes go. Never empty while the decoder is usable."""
        if self.broken:
            raise ProtocolError(ErrorCode.BAD_FRAME, "the stream is broken")
        if self._stage == "wait":
            # The owner's bug: these bytes would have nowhere to go.
            raise RuntimeError("reading while a frame waits for memory: pause reading first")
        return self._buf[self._pos:]

    def buffer_updated(self, n: int) -> list[Frame]:
        """``n`` bytes were written to the start of the last ``get_buffer()``."""
        if self.broken:
            raise ProtocolError(ErrorCode.BAD_FRAME, "the stream is broken")
        self._pos += n
        frames: list[Frame] = []
        try:
            while self._pos == len(self._buf) and self._stage != "wait":
                frame = self._advance()
                if frame is not None:
                    frames.append(frame)
                    break  # the next frame starts with a fresh buffer
        except ProtocolError:
            self.broken = True
            raise
        return frames

    def receive_data(self, data: bytes | bytearray | memoryview) -> list[Frame]:
        frames: list[Frame] = []
        src = memoryview(data).cast("B")
        while len(src):
            buf = self.get_buffer()
            n = min(len(buf), len(src))
            buf[:n] = src[:n]
            src = src[n:]
            frames.extend(self.buffer_updated(n))
        return frames

    # -- transitions -------------------------------------------------------------------------
    def _advance(self) -> Frame | None:
        if self._stage == "header":
            self._parse_header()
        elif self._stage == "meta":
            self._parse_meta()
        else:
            i = self._tensor_index
            if self.check_finite and self._non_finite is None and not finite(self._tensors[i]):
                self._non_finite = f"tensor {i} contains NaN or Inf"
            self._tensor_index += 1
            self._next_tensor()
        if self._stage == "done":
            frame = Frame(self._type, self._meta, self._tensors, self._frame_bytes,  # type: ignore[arg-type]
                          self.check_finite, self._non_finite)
            self._start_header()
            return frame
        return None

    def _parse_header(self) -> None:
        magic, version, mtype, _flags, meta_len, payload_len = HEADER.unpack(self._header)
        if magic != MAGIC:
            raise ProtocolError(ErrorCode.BAD_FRAME, "not a fedberry frame (bad magic)")
        if version != VERSION:
            raise ProtocolError(ErrorCode.VERSION,
                                f"protocol version {version} is not supported (this side speaks "
                                f"{VERSION}); upgrade fedberry on the older side")
        try:
            self._type = MsgType(mtype)
        except ValueError:
            raise ProtocolError(ErrorCode.BAD_FRAME, f"unknown message type {mtype}") from None
        if self.check_type is not None:  # first: a frame refused by type costs nothing more
            self.check_type(self._type)
        if meta_len > self.limits.max_meta_bytes:
            raise ProtocolError(ErrorCode.LIMIT, f"metadata of {meta_len} bytes exceeds the limit "
                                                 f"of {self.limits.max_meta_bytes}")
        # A tensor frame of the wrong model (float64 where the model is float32) is also too
        # big; with the model known, its metadata (bounded above) is read first, so that the
        # refusal names the tensor and its dtype instead of a byte count. Nothing is allocated
        # for the payload before _parse_meta has checked the limit too. Past what another dtype
        # could explain (8x: float64 for a model of 1-byte tensors) it is refused here.
        if payload_len > self.limits.max_payload and (
                self.expected is None or self._type not in TENSOR_TYPES
                or payload_len > MAX_DTYPE_RATIO * self.limits.max_payload):
            self._payload_too_big(payload_len)
        if payload_len and self._type not in TENSOR_TYPES:
            raise ProtocolError(ErrorCode.BAD_FRAME, f"{self._type.name} frames carry no tensors")
        self._payload_len = payload_len
        self._frame_bytes = HEADER_SIZE + meta_len + payload_len
        self._stage = "meta"
        self._buf = memoryview(bytearray(meta_len))
        self._pos = 0
        if meta_len == 0:
            raise ProtocolError(ErrorCode.BAD_FRAME, "empty metadata")

    def _payload_too_big(self, payload_len: int) -> None:
        raise ProtocolError(ErrorCode.LIMIT, f"payload of {payload_len} bytes exceeds the "
                                             f"limit of {self.limits.max_payload}")

    def _parse_meta(self) -> None:
        try:
            meta = json.loads(bytes(self._buf).decode("utf-8"), parse_constant=_no_constant)
        except (UnicodeDecodeError, ValueError, RecursionError):
            raise ProtocolError(ErrorCode.BAD_FRAME, "metadata is not valid UTF-8 JSON") from None
        if not isinstance(meta, dict):
            raise ProtocolError(ErrorCode.BAD_FRAME, "metadata must be a JSON object")
        self._meta = meta
        specs: Spec = ()
        if self._type in TENSOR_TYPES:
            descr = meta.get("tensors")
            if not isinstance(descr, list):
                raise ProtocolError(ErrorCode.BAD_FRAME, "tensor frame without a tensor list")
            if len(descr) > self.limits.max_tensors:
                raise ProtocolError(ErrorCode.LIMIT, f"{len(descr)} tensors exceed the limit of "
                                                     f"{self.limits.max_tensors}")
            specs = tuple(tensor_spec(d.get("dtype"), d.get("shape")) if isinstance(d, dict)
                          else tensor_spec(None, None) for d in descr)
            total = sum(s.nbytes for s in specs)
            if total != self._payload_len:
                raise ProtocolError(ErrorCode.BAD_FRAME, f"tensors need {total} bytes, the header "
                                                         f"says {self._payload_len}")
            name = meta.get("codec", "none")
            if not isinstance(name, str) or name not in encodings.KNOWN_CODECS:
                raise ProtocolError(ErrorCode.BAD_FRAME, f"unknown codec {name!r}; this side "
                                                         f"knows {sorted(encodings.KNOWN_CODECS)}")
            if name not in encodings.FRAME_CODECS[self._type.name]:
                raise ProtocolError(ErrorCode.BAD_FRAME, f"{self._type.name} frames cannot use "
                                                         f"codec {name!r}")
            if self.expected is not None:
                why = spec_mismatch(encodings.wire_spec(name, self.expected), specs)
                if why:
                    raise ProtocolError(ErrorCode.SPEC_MISMATCH,
                                        why if name == "none" else f"{name}-encoded: {why}")
            if self._payload_len > self.limits.max_payload:
                self._payload_too_big(self._payload_len)
        elif "tensors" in meta:
            raise ProtocolError(ErrorCode.BAD_FRAME, f"{self._type.name} frames carry no tensors")
        # Only now, with everything checked, allocate the tensors the payload is read into.
        self._allocate(specs)

    def _allocate(self, specs: Spec) -> None:
        try:
            if self.allocate is not None and specs:
                tensors = self.allocate(specs)
            else:
                tensors = [np.empty(s.shape, dtype=np.dtype(s.dtype)) for s in specs]
        except (ValueError, MemoryError) as exc:
            raise ProtocolError(ErrorCode.LIMIT, f"cannot allocate the tensors: {exc}") from None
        if tensors is None:
            self._stage, self._specs = "wait", specs
            return
        self._tensors = tensors
        self._views = [memoryview(t).cast("B") if t.nbytes else memoryview(b"")
                       for t in self._tensors]
        self._tensor_index = 0
        self._stage = "tensors"
        self._next_tensor()

    def _next_tensor(self) -> None:
        while self._tensor_index < len(self._views) and len(self._views[self._tensor_index]) == 0:
            self._tensor_index += 1  # zero-size tensors take no bytes
        if self._tensor_index >= len(self._views):
            self._stage = "done"
            return
        self._buf = self._views[self._tensor_index]
        self._pos = 0


def finite(a: np.ndarray) -> bool:
    """No NaN and no Inf in ``a`` (True for integers and bools, which cannot hold them)."""
    if not a.size or a.dtype.kind not in "fc":
        return True
    if a.dtype.kind == "c":  # complex numbers have no order: element by element
        return bool(np.isfinite(a).all())
    # min and max propagate NaN, and one of them is +-Inf when an element is: two SIMD passes
    # cost under half of a sum (numpy's pairwise sum is not vectorised) and, unlike a sum,
    # cannot overflow on finite float16.
    return math.isfinite(a.min()) and math.isfinite(a.max())


def _no_constant(name: str) -> Any:
    # NaN and Infinity are not JSON; Python's json accepts them by default. A NaN round number or
    # sample count would slip past comparisons, so refuse them here, once, for every field.
    raise ValueError(f"{name} is not valid JSON")

