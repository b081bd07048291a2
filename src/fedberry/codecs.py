"""Tensor encodings on the wire: how a model travels, and what it costs.

A frame that carries a model names its codec in the metadata (``"codec": "q8"``; absent means
``none``). The receiver checks the tensors against the codec's *wire spec* of the model it expects
before allocating anything (``protocol.FrameDecoder``; the wire rules, which codec may appear on
which frame and the tensors it implies, are ``protocol.encodings``'), then decodes them into the
model's own dtypes. This module holds the numerics only. Codecs are pure functions of numpy
arrays: no I/O, no state of their own (the sender's error-feedback residual is an argument), so
they are tested and fuzzed like the protocol.

* ``none``: the model's own bytes.
* ``fp16``: float tensors as IEEE half floats, half the bytes of float32, about 3 significant
  digits. A frame falls back to ``none`` when a value does not fit (|x| > 65504).
* ``q8``: the *change* since a model both sides hold, in blocks of ``Q8_BLOCK`` values
  quantized linearly to int8 with one float32 scale per block: 1.016 bytes per value instead of 4.
  The sender keeps what rounding lost (error feedback, Seide et al. 2014; Karimireddy et al.,
  "Error Feedback Fixes SignSGD", ICML 2019) and adds it to what it sends next, so the error does
  not build up over rounds. An update is the change since the global model it was trained from;
  a global model, the change since the previous round's (broadcast.py).
* ``unchanged``: no tensors at all. The chief sends it to a worker that proved (by a SHA-256 of its
  weights) that it already holds the global model: workers that build their model from the same
  seed do not download it again.

Integer and bool tensors (step counters) always travel as they are.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Sequence

import numpy as np

from fedberry.protocol.encodings import (
    DOWNLINK_CODECS,
    FRAME_CODECS,
    Q8_BLOCK,
    UPLINK_CODECS,
    wire_spec,
)
from fedberry.protocol.encodings import is_float as _is_float
from fedberry.protocol.spec import ErrorCode, ProtocolError, Spec

__all__ = ["CODECS", "DOWNLINK_CODECS", "FP16_MAX", "FRAME_CODECS", "Q8_BLOCK", "UPLINK_CODECS",
           "Codec", "Fp16", "Q8", "Unchanged", "check_name", "digest", "get"]

FP16_MAX = 65504.0


class Codec:
    """The identity: tensors as the model holds them."""

    name = "none"
    needs_reference = False  # decoding needs the global model the sender started from

    def wire_spec(self, spec: Spec) -> Spec:
        """The tensors this codec sends a model of ``spec`` as (a wire rule: encodings)."""
        return wire_spec(self.name, spec)

    def encode(self, arrays: Sequence[np.ndarray], reference: Sequence[np.ndarray] | None = None,
               residual: list[np.ndarray] | None = None) -> list[np.ndarray]:
        return list(arrays)

    def decode(self, wire: list[np.ndarray], spec: Spec,
               reference: Sequence[np.ndarray] | None = None) -> list[np.ndarray]:
        return wire

    def check(self, wire: list[np.ndarray], spec: Spec) -> None:
        """Refuse numbers no sender could have meant, without decoding (and so without the
        reference, which a late update no longer has)."""


class Fp16(Codec):
    name = "fp16"

    def encode(self, arrays: Sequence[np.ndarray], reference: Sequence[np.ndarray] | None = None,
               residual: list[np.ndarray] | None = None) -> list[np.ndarray]:
        out = []
        for a in arrays:
            if a.dtype.kind == "f" and a.dtype != np.float16:
                with np.errstate(over="ignore"):  # found and reported just below
                    h = a.astype(np.float16)
                if h.size and not np.isfinite(h.sum(dtype=np.float32)):
                    raise OverflowError("a value does not fit in float16 (|x| > 65504)")
                out.append(h)
            else:
                out.append(a)
        return out

    def decode(self, wire: list[np.ndarray], spec: Spec,
               reference: Sequence[np.ndarray] | None = None) -> list[np.ndarray]:
        return [w.astype(t.dtype) if _is_float(t) and w.dtype != np.dtype(t.dtype) else w
                for w, t in zip(wire, spec)]

    def project(self, arrays: Sequence[np.ndarray]) -> bool:
        """Round ``arrays`` in place to what a receiver decodes, so that the sender keeps exactly
        the model the receivers hold. False (and nothing changed) when a value does not fit."""
        try:
            halves = self.encode(arrays)
        except OverflowError:
            return False
        for a, h in zip(arrays, halves):
            if h is not a:
                np.copyto(a, h, casting="unsafe")
        return True


class Q8(Codec):
    name = "q8"
    needs_reference = True

    def encode(self, arrays: Sequence[np.ndarray], reference: Sequence[np.ndarray] | None = None,
               residual: list[np.ndarray] | None = None) -> list[np.ndarray]:
        if reference is None:
            raise ValueError("q8 encodes the change since the global model: give the reference")
        out: list[np.ndarray] = []
        for i, (a, ref) in enumerate(zip(arrays, reference, strict=True)):
            if a.dtype.kind != "f":
                out.append(a)
                continue
            work = np.result_type(a.dtype, np.float32)
            delta = np.subtract(a, ref, dtype=work).reshape(-1)
            if residual is not None:
                delta += residual[i].reshape(-1)
            q, scales = _quantize(delta)
            if residual is not None:
                # What this update lost to rounding goes out with the next one.
                np.subtract(delta, _dequantize(q, scales, work), out=residual[i].reshape(-1))
            out += [q.reshape(a.shape), scales]
        return out

    def decode(self, wire: list[np.ndarray], spec: Spec,
               reference: Sequence[np.ndarray] | None = None) -> list[np.ndarray]:
        if reference is None:
            raise ProtocolError(ErrorCode.PROTOCOL, "a q8 update needs the global model it "
                                                   "started from, and there is none")
        self.check(wire, spec)
        out: list[np.ndarray] = []
        k = 0
        for t, ref in zip(spec, reference, strict=True):
            if not _is_float(t):
                out.append(wire[k])
                k += 1
                continue
            q, scales = wire[k], wire[k + 1]
            k += 2
            work = np.result_type(np.dtype(t.dtype), np.float32)
            flat = _dequantize(q.reshape(-1), scales, work)
            flat += ref.reshape(-1)
            out.append(flat.reshape(t.shape).astype(t.dtype, copy=False))
        return out


    def check(self, wire: list[np.ndarray], spec: Spec) -> None:
        k = 0
        for t in spec:
            if _is_float(t):
                scales = wire[k + 1]
                if scales.size and not (np.isfinite(scales.sum()) and scales.min() >= 0):
                    raise ProtocolError(ErrorCode.NON_FINITE,
                                        "q8 scales must be finite and >= 0")
            k += 2 if _is_float(t) else 1


class Unchanged(Codec):
    name = "unchanged"
    needs_reference = True

    def decode(self, wire: list[np.ndarray], spec: Spec,
               reference: Sequence[np.ndarray] | None = None) -> list[np.ndarray]:
        if reference is None:
            raise ProtocolError(ErrorCode.PROTOCOL, "'unchanged' but there is no model to keep")
        return [np.array(r) for r in reference]


def _quantize(d: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Flat floats -> (int8 values, one scale per block); value = q * scale."""
    n = d.size
    nb = math.ceil(n / Q8_BLOCK)
    if nb * Q8_BLOCK != n:
        padded = np.zeros(nb * Q8_BLOCK, d.dtype)
        padded[:n] = d
    else:
        padded = d
    blocks = padded.reshape(nb, Q8_BLOCK)
    amax = np.abs(blocks).max(axis=1) if nb else np.zeros(0, d.dtype)
    scales = (amax / 127).astype(np.float32)
    inv = np.divide(127, amax, out=np.zeros_like(amax), where=amax > 0)
    q = np.rint(blocks * inv[:, None]).reshape(-1)[:n]
    return np.clip(q, -127, 127).astype(np.int8), scales


def _dequantize(q: np.ndarray, scales: np.ndarray, dtype: np.dtype) -> np.ndarray:
    out = q.astype(dtype)  # a fresh array: the caller may keep it (it becomes a running sum)
    full = q.size // Q8_BLOCK
    out[:full * Q8_BLOCK].reshape(full, Q8_BLOCK)[...] *= scales[:full, None]
    if q.size % Q8_BLOCK:
        out[full * Q8_BLOCK:] *= scales[full]
    return out


CODECS: dict[str, Codec] = {c.name: c for c in (Codec(), Fp16(), Q8(), Unchanged())}


def get(name: object) -> Codec:
    """The codec called ``name`` (a frame's metadata: anything), or a BAD_FRAME error."""
    codec = CODECS.get(name) if isinstance(name, str) else None
    if codec is None:
        raise ProtocolError(ErrorCode.BAD_FRAME, f"unknown codec {name!r}; this side knows "
                                                 f"{sorted(CODECS)}")
    return codec


def check_name(name: str, allowed: Sequence[str], what: str) -> str:
    """For user-facing options: a ValueError naming the choices."""
    if name not in allowed:
        raise ValueError(f"{what} codec {name!r} is not one of {', '.join(allowed)}")
    return name


def digest(arrays: Sequence[np.ndarray]) -> str:
    """SHA-256 of a model's dtypes, shapes and bytes: equal digests, equal models."""
    h = hashlib.sha256()
    for a in arrays:
        a = np.asarray(a)
        h.update(f"{a.dtype.str}{a.shape};".encode())
        h.update(memoryview(np.require(a.reshape(-1), requirements="C")).cast("B"))
    return h.hexdigest()
