"""The MPI transport's buffers: where each tensor lives in the Allreduce and Bcast buffers.

Every rank's Allreduce buffer holds every tensor multiplied by the rank's sample weight, back to
back, then a trailer of ``TRAILER`` numbers (weight, weighted loss, loss weight, update count,
"has left" flag, rank 0's "this round is the last" flag). The Bcast buffer (stateful strategies) is
uint8: a ``HEADER_BYTES`` header (int64 round, done), then each tensor in its own dtype at a
64-byte aligned offset, so that the arrays handed back (views into it) are aligned for numpy and
torch.

The sum's dtype (``Layout.sum_dtype``): float32 when every tensor is float32 or float16, else
float64. A float32 model cannot be averaged more precisely than float32 can hold, the sum of the
handful of terms a round has stays within a few float32 ulps of the exact mean (as the TCP chief's
per-tensor float32 sum does), and it halves the bytes going up against float64; measured, MPICH's
float64 Reduce of 1M values also took 3x the float32 one. Integer tensors (BatchNorm's counters,
times a sample weight) and float64 tensors need float64, which is exact for integers up to 2**53.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from fedberry.protocol.frames import Spec

# The trailer after the weighted tensors (in the sum's dtype: sample counts stay exact up to
# 2**24 in float32, 2**53 in float64).
T_WEIGHT, T_LOSS_SUM, T_LOSS_WEIGHT, T_UPDATES, T_LEFT, T_LAST = range(6)
TRAILER = 6
HEADER_BYTES = 64
ALIGN = 64


class Layout:
    """Where each tensor lives in the Allreduce buffer and in the uint8 Bcast buffer."""

    def __init__(self, spec: Spec) -> None:
        self.spec = spec
        self.dtypes = [np.dtype(t.dtype) for t in spec]
        small_floats = all(dt in (np.float32, np.float16) for dt in self.dtypes)
        self.sum_dtype = np.dtype(np.float32 if small_floats else np.float64)
        self.sizes = [math.prod(t.shape) for t in spec]
        self.elem_offsets = np.concatenate([[0], np.cumsum(self.sizes)]).astype(int).tolist()
        self.elements = self.elem_offsets[-1]
        self.byte_offsets = []
        pos = HEADER_BYTES
        for t in spec:
            self.byte_offsets.append(pos)
            pos += -(-t.nbytes // ALIGN) * ALIGN
        self.bcast_bytes = pos
        self.model_bytes = sum(t.nbytes for t in spec)

    def pack_weighted(self, buf: np.ndarray, arrays: Sequence[np.ndarray], w: float) -> None:
        for a, lo, hi in zip(arrays, self.elem_offsets, self.elem_offsets[1:]):
            # Multiply straight into the buffer: no other copy of the model.
            np.multiply(np.asarray(a).reshape(-1), w, out=buf[lo:hi], casting="unsafe")

    def sums(self, buf: np.ndarray) -> list[np.ndarray]:
        return [buf[lo:hi].reshape(t.shape)
                for t, lo, hi in zip(self.spec, self.elem_offsets, self.elem_offsets[1:])]

    def means(self, buf: np.ndarray, weight: float) -> list[np.ndarray]:
        """FedAvg's result from the weighted sum: sum / weight in the sum's dtype, cast to each
        tensor's dtype (integers rounded), into fresh arrays the caller may keep."""
        out = []
        for s, dt in zip(self.sums(buf), self.dtypes):
            if np.issubdtype(dt, np.integer) or dt == np.bool_:
                out.append(np.rint(s / weight).astype(dt))
            else:
                out.append(np.divide(s, weight, out=np.empty(s.shape, dt), casting="unsafe"))
        return out

    def empty_bcast(self) -> np.ndarray:
        """A fresh receive buffer, 64-byte aligned (numpy only promises 16)."""
        raw = np.empty(self.bcast_bytes + ALIGN, np.uint8)
        start = -raw.ctypes.data % ALIGN
        return raw[start:start + self.bcast_bytes]

    def pack_model(self, arrays: Sequence[np.ndarray], round_: int, done: bool) -> np.ndarray:
        out = self.empty_bcast()
        out[:16].view(np.int64)[:] = (round_, int(done))
        for a, dt, off in zip(arrays, self.dtypes, self.byte_offsets):
            src = np.ascontiguousarray(a, dtype=dt).reshape(-1).view(np.uint8)
            out[off:off + src.size] = src
        return out

    def unpack_model(self, buf: np.ndarray) -> tuple[int, bool, list[np.ndarray]]:
        round_, done = (int(x) for x in buf[:16].view(np.int64))
        arrays = [buf[off:off + t.nbytes].view(dt).reshape(t.shape)
                  for t, dt, off in zip(self.spec, self.dtypes, self.byte_offsets)]
        return round_, bool(done), arrays


def split(model: np.ndarray, layout: Layout, copy: bool = False) -> list[np.ndarray]:
    """The tensors of a packed (unaligned, back-to-back) model buffer."""
    out, pos = [], 0
    for t, dt in zip(layout.spec, layout.dtypes):
        raw = model[pos:pos + t.nbytes]
        a = raw.copy().view(dt) if copy or pos % dt.itemsize else raw.view(dt)
        out.append(a.reshape(t.shape))
        pos += t.nbytes
    return out
