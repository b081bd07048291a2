"""Wire rules of the tensor encodings: which encoding may appear on which frame, and the tensors
(dtypes and shapes) an encoding of a model travels as.

These are rules of the protocol, checked before anything is allocated; the numerics (how values
are rounded, quantized and restored) are ``fedberry.codecs``'. This module imports nothing of
fedberry's: it works on any ``TensorSpec``-like object through ``dataclasses.replace``.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import Any

import numpy as np

# Values per q8 scale: 1.6 % overhead (one float32 per 256 int8); smaller blocks would follow
# outliers more closely at a higher cost. Part of the wire: both sides must agree on it.
Q8_BLOCK = 256

UPLINK_CODECS = ("none", "fp16", "q8")  # what a worker may send an update as
DOWNLINK_CODECS = ("none", "fp16", "q8")  # how a chief may broadcast the global model
# Secure aggregation (docs/secure-aggregation.md): an UPDATE of codec "secagg" carries no
# tensors (the worker has reached its sync point: its sample count and metrics), and the
# worker's update follows as a MASKED frame of one ring vector, uint16 or uint32, holding the
# model's float values in order. A connection accepts them only in a secure federation, and
# then only them (``protocol.connection``).
SECURE_UPDATE_CODEC = "secagg"
RING_CODECS = ("ring16", "ring32")
# What each tensor frame may carry (by frame type name); anything else is refused before
# allocating. INIT is the model itself; "unchanged" is the chief's answer to a worker that
# proved it holds the global model already (no tensors at all).
FRAME_CODECS: dict[str, tuple[str, ...]] = {
    "INIT": ("none",), "UPDATE": (*UPLINK_CODECS, SECURE_UPDATE_CODEC),
    "GLOBAL": (*DOWNLINK_CODECS, "unchanged"), "MASKED": RING_CODECS}
KNOWN_CODECS = ("none", "fp16", "q8", "unchanged", SECURE_UPDATE_CODEC, *RING_CODECS)


def is_float(t: Any) -> bool:
    return bool(np.dtype(t.dtype).kind == "f")


def q8_blocks(t: Any) -> int:
    """Scales a q8-encoded float tensor carries."""
    return math.ceil(math.prod(t.shape) / Q8_BLOCK)


def float_values(spec: Sequence[Any]) -> int:
    """How many float values a model of ``spec`` holds: the length of its ring vector."""
    return sum(math.prod(t.shape) for t in spec if is_float(t))


def wire_spec(codec: str, spec: Sequence[Any]) -> tuple[Any, ...]:
    """The tensors a model of ``spec`` travels as under ``codec``.

    * ``none``: the model's own tensors;
    * ``fp16``: float tensors as float16, the rest as they are;
    * ``q8``: each float tensor as int8 values of its shape, then one float32 scale per block;
    * ``unchanged`` and ``secagg``: no tensors;
    * ``ring16``/``ring32``: one flat uint16/uint32 vector of the model's float values.
    """
    if codec == "none":
        return tuple(spec)
    if codec == "fp16":
        return tuple(dataclasses.replace(t, dtype="<f2") if is_float(t) else t for t in spec)
    if codec == "q8":
        out: list[Any] = []
        for t in spec:
            if is_float(t):
                out += [dataclasses.replace(t, dtype="|i1"),
                        dataclasses.replace(t, dtype="<f4", shape=(q8_blocks(t),))]
            else:
                out.append(t)
        return tuple(out)
    if codec in ("unchanged", SECURE_UPDATE_CODEC):
        return ()
    if codec in RING_CODECS:
        if not spec:
            return ()
        dtype = "<u2" if codec == "ring16" else "<u4"
        return (dataclasses.replace(spec[0], dtype=dtype, shape=(float_values(spec),)),)
    raise ValueError(f"unknown codec {codec!r}")
