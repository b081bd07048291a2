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
# What each tensor frame may carry (by frame type name); anything else is refused before
# allocating. INIT is the model itself; "unchanged" is the chief's answer to a worker that
# proved it holds the global model already (no tensors at all).
FRAME_CODECS: dict[str, tuple[str, ...]] = {
    "INIT": ("none",), "UPDATE": UPLINK_CODECS, "GLOBAL": (*DOWNLINK_CODECS, "unchanged")}
KNOWN_CODECS = ("none", "fp16", "q8", "unchanged")


def is_float(t: Any) -> bool:
    return bool(np.dtype(t.dtype).kind == "f")


def q8_blocks(t: Any) -> int:
    """Scales a q8-encoded float tensor carries."""
    return math.ceil(math.prod(t.shape) / Q8_BLOCK)


def wire_spec(codec: str, spec: Sequence[Any]) -> tuple[Any, ...]:
    """The tensors a model of ``spec`` travels as under ``codec``.

    * ``none``: the model's own tensors;
    * ``fp16``: float tensors as float16, the rest as they are;
    * ``q8``: each float tensor as int8 values of its shape, then one float32 scale per block;
    * ``unchanged``: no tensors.
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
    if codec == "unchanged":
        return ()
    raise ValueError(f"unknown codec {codec!r}")
