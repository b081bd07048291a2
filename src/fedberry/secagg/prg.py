"""Mask expansion: a 32-byte seed -> a vector of ring elements in Z_(2^k), at memory speed.

Bonawitz et al. 2017 §4 and Bell et al. 2020 §3 expand each pairwise and self-mask seed with a
pseudorandom generator PRG(seed) into a vector as long as the model. Here the PRG is the ChaCha20
stream cipher (RFC 8439, from ``cryptography``: OpenSSL's vectorised code) keyed by the seed with
an all-zero nonce: each seed is used for exactly one stream, and both ends of a pair must produce
the same stream. The keystream is made in large chunks straight into a reused buffer
(``update_into``), viewed as little-endian uint16/uint32 (so every machine derives the same ring
elements) and added to the target in place: no mask is ever held at full length.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np

from .errors import MessageError, require_cryptography

if TYPE_CHECKING:
    from cryptography.hazmat.primitives.ciphers import CipherContext

SEED_BYTES = 32
#: Keystream bytes made per cipher call; large enough to amortise the call, small enough that a
#: chunk of the target stays in cache while every seed's stream is added to it.
CHUNK_BYTES = 1 << 18
_RING_DTYPES = {np.dtype(np.uint16): np.dtype("<u2"), np.dtype(np.uint32): np.dtype("<u4")}


def _encryptor(seed: bytes) -> CipherContext:
    require_cryptography()
    from cryptography.hazmat.primitives.ciphers import Cipher, algorithms

    if len(seed) != SEED_BYTES:
        raise MessageError(f"a mask seed is {SEED_BYTES} bytes, not {len(seed)}")
    return Cipher(algorithms.ChaCha20(seed, bytes(16)), mode=None).encryptor()


def _check_target(target: np.ndarray) -> np.dtype:
    if target.dtype not in _RING_DTYPES:
        raise MessageError(f"a masked vector is uint16 or uint32, not {target.dtype}")
    if target.ndim != 1 or not target.flags.c_contiguous or not target.flags.writeable:
        raise MessageError("a masked vector is a writeable, contiguous 1-D array")
    return _RING_DTYPES[target.dtype]


def add_masks(target: np.ndarray, seeds: Sequence[tuple[bytes, int]]) -> None:
    """Add ``sign * PRG(seed)`` to ``target`` in place (mod 2^k), for every (seed, sign).

    ``sign`` is +1 or -1. Wrap-around is the ring's arithmetic: numpy's unsigned add and
    subtract are exactly addition mod 2^16 / 2^32.
    """
    wire = _check_target(target)
    if any(sign not in (1, -1) for _, sign in seeds):
        raise MessageError("a mask's sign is +1 or -1")
    streams = [(_encryptor(seed), sign) for seed, sign in seeds]
    if not streams or target.size == 0:
        return
    per_chunk = CHUNK_BYTES // wire.itemsize
    zeros = bytes(per_chunk * wire.itemsize)
    buf = bytearray(len(zeros))
    keystream = np.frombuffer(buf, dtype=wire)
    for start in range(0, target.size, per_chunk):
        part = target[start:start + per_chunk]
        nbytes = part.size * wire.itemsize
        # Every stream advances by the same chunk, so chunk order equals stream order.
        for enc, sign in streams:
            enc.update_into(memoryview(zeros)[:nbytes], buf)
            ks = keystream[:part.size]
            if sign > 0:
                np.add(part, ks, out=part, casting="unsafe")
            else:
                np.subtract(part, ks, out=part, casting="unsafe")


def expand(seed: bytes, length: int, dtype: np.dtype | type) -> np.ndarray:
    """PRG(seed) as a fresh vector of ``length`` ring elements (tests and benchmarks)."""
    out = np.zeros(length, dtype=dtype)
    add_masks(out, [(seed, 1)])
    return out
