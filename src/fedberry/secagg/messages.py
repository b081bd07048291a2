"""The round's public parameters and the typed messages of the four SecAgg+ rounds.

Bonawitz et al. 2017 Fig. 4 / Bell et al. 2020 Fig. 3, with their round names:

====  ======================  ==================================  ===========================
 #    round                   client -> server                    server -> client
====  ======================  ==================================  ===========================
 0    AdvertiseKeys           :class:`KeyAdvert`                  the neighbours' adverts
 1    ShareKeys               :class:`ShareBundle`                :class:`ForwardedShares`
 2    MaskedInputCollection   :class:`MaskedInput`                :class:`UnmaskRequest`
 3    Unmasking               :class:`UnmaskReply`                (the server has the sum)
====  ======================  ==================================  ===========================

Messages check their own field types and sizes when built (so a decoder that builds one has
checked it); who may send what, and when, is checked once by the client or server object.
``payload_bytes`` is what a message carries (keys, ciphertexts, vectors, 4-byte ids), framing
excluded: the benchmark's bytes per client.
"""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np

from .errors import ConfigError, MessageError
from .graph import default_neighbors, default_threshold, neighbour_graph
from .keys import KEY_BYTES
from .shamir import SHARE_BYTES

ID_BYTES = 4
_RING = {16: np.dtype(np.uint16), 32: np.dtype(np.uint32)}
_MAX_ID = (1 << 32) - 1


@dataclass(frozen=True)
class RoundConfig:
    """What every party of one round agrees on before it starts (the server announces it).

    ``clients``: the ids selected for the round (positive, distinct; they are the Shamir
    x-coordinates). ``seed``: 32 public random bytes that fix the neighbour graph.
    ``neighbors`` (k) defaults to :func:`~fedberry.secagg.graph.default_neighbors`,
    ``threshold`` (t) to :func:`~fedberry.secagg.graph.default_threshold` of k.
    """

    round_number: int
    seed: bytes
    clients: tuple[int, ...]
    length: int
    bits: int = 16
    neighbors: int | None = None
    threshold: int | None = None
    # What else every party must agree on (the encoding's range, the weights' scale, the noise):
    # bound into the digest, so that a server that tells clients different things breaks their
    # masks and sealed shares instead of learning from the difference.
    context: bytes = b""
    graph: Mapping[int, frozenset[int]] = field(init=False, repr=False, compare=False)
    digest: bytes = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        clients = tuple(sorted(set(self.clients)))
        if len(clients) != len(self.clients):
            raise ConfigError("a round's client ids are distinct")
        if len(clients) < 3:
            raise ConfigError(f"secure aggregation needs at least 3 clients, not {len(clients)} "
                              "(with 2, each learns the other's input from the sum)")
        if not all(isinstance(c, int) and 0 < c <= _MAX_ID for c in clients):
            raise ConfigError("client ids are integers from 1 to 2^32 - 1 (0 is the Shamir "
                              "secret's own point)")
        if not isinstance(self.seed, bytes) or len(self.seed) != 32:
            raise ConfigError("the round seed is 32 bytes")
        if self.bits not in _RING:
            raise ConfigError(f"the ring is Z_(2^16) or Z_(2^32), not Z_(2^{self.bits})")
        if not isinstance(self.length, int) or self.length < 1:
            raise ConfigError(f"the vector length is a positive integer, not {self.length!r}")
        if not isinstance(self.round_number, int) or not 0 <= self.round_number <= _MAX_ID:
            raise ConfigError("the round number is an integer from 0 to 2^32 - 1")
        n = len(clients)
        k = default_neighbors(n) if self.neighbors is None else min(self.neighbors, n - 1)
        graph = neighbour_graph(clients, k, self.seed)
        t = default_threshold(k) if self.threshold is None else self.threshold
        if not 2 <= t <= k + 1:
            raise ConfigError(f"the threshold is from 2 to {k + 1} (a client and its {k} "
                              f"neighbours hold its shares), not {t}")
        object.__setattr__(self, "clients", clients)
        object.__setattr__(self, "neighbors", k)
        object.__setattr__(self, "threshold", t)
        object.__setattr__(self, "graph", graph)
        packed = struct.pack(f"<IIIII{n}I", self.round_number, self.length, self.bits, k, t,
                             *clients)
        if not isinstance(self.context, bytes):
            raise ConfigError("a round's context is bytes")
        object.__setattr__(self, "digest", hashlib.sha256(
            b"fedberry-secagg/v1|round|" + self.seed + packed
            + (b"|context|" + self.context if self.context else b"")).digest())

    @property
    def dtype(self) -> np.dtype:
        """The ring's dtype: uint16 or uint32."""
        return _RING[self.bits]


def _check_id(value: object, what: str) -> None:
    if not isinstance(value, int) or not 0 < value <= _MAX_ID:
        raise MessageError(f"{what} is a client id (1 to 2^32 - 1), not {value!r}")


def _check_key(value: object, what: str) -> None:
    if not isinstance(value, bytes) or len(value) != KEY_BYTES:
        raise MessageError(f"{what} is {KEY_BYTES} bytes")


@dataclass(frozen=True)
class KeyAdvert:
    """Round 0: a client's two public keys (masks, share encryption)."""

    sender: int
    mask_public: bytes
    encryption_public: bytes

    def __post_init__(self) -> None:
        _check_id(self.sender, "an advert's sender")
        _check_key(self.mask_public, "a mask public key")
        _check_key(self.encryption_public, "an encryption public key")

    @property
    def payload_bytes(self) -> int:
        """Bytes carried: the sender's id and two public keys."""
        return ID_BYTES + 2 * KEY_BYTES


@dataclass(frozen=True)
class EncryptedShare:
    """One sealed pair of shares (self-mask seed, mask private key) from sender to receiver."""

    sender: int
    receiver: int
    sealed: bytes

    def __post_init__(self) -> None:
        _check_id(self.sender, "a share's sender")
        _check_id(self.receiver, "a share's receiver")
        if not isinstance(self.sealed, bytes):
            raise MessageError("an encrypted share is bytes")

    @property
    def payload_bytes(self) -> int:
        """Bytes carried: two ids and the sealed shares."""
        return 2 * ID_BYTES + len(self.sealed)


@dataclass(frozen=True)
class ShareBundle:
    """Round 1, client -> server: the sender's shares, one per neighbour."""

    sender: int
    shares: tuple[EncryptedShare, ...]

    def __post_init__(self) -> None:
        _check_id(self.sender, "a bundle's sender")

    @property
    def payload_bytes(self) -> int:
        """Bytes carried: the sender's id and every encrypted share."""
        return ID_BYTES + sum(s.payload_bytes for s in self.shares)


@dataclass(frozen=True)
class ForwardedShares:
    """Round 1, server -> client: the shares its neighbours sealed for it."""

    receiver: int
    shares: tuple[EncryptedShare, ...]

    def __post_init__(self) -> None:
        _check_id(self.receiver, "forwarded shares' receiver")

    @property
    def payload_bytes(self) -> int:
        """Bytes carried: every encrypted share."""
        return sum(s.payload_bytes for s in self.shares)


@dataclass(frozen=True, eq=False)
class MaskedInput:
    """Round 2: y = x + PRG(b) + sum of signed pairwise masks, mod 2^k."""

    sender: int
    vector: np.ndarray

    def __post_init__(self) -> None:
        _check_id(self.sender, "a masked input's sender")
        if not isinstance(self.vector, np.ndarray) or self.vector.ndim != 1:
            raise MessageError("a masked input is a flat numpy vector")

    @property
    def payload_bytes(self) -> int:
        """Bytes carried: the sender's id and the ring vector."""
        return ID_BYTES + self.vector.nbytes


@dataclass(frozen=True)
class UnmaskRequest:
    """Round 2 -> 3, server -> every survivor: who sent a masked input, who did not."""

    survivors: frozenset[int]
    dropouts: frozenset[int]

    def __post_init__(self) -> None:
        for c in (*self.survivors, *self.dropouts):
            _check_id(c, "an unmasking request's client")

    @property
    def payload_bytes(self) -> int:
        """Bytes carried: one id per named client."""
        return ID_BYTES * (len(self.survivors) + len(self.dropouts))


@dataclass(frozen=True)
class UnmaskReply:
    """Round 3: a survivor's shares of survivors' self-mask seeds and dropouts' mask keys."""

    sender: int
    seed_shares: Mapping[int, bytes]
    key_shares: Mapping[int, bytes]

    def __post_init__(self) -> None:
        _check_id(self.sender, "an unmasking reply's sender")
        for peer, share in (*self.seed_shares.items(), *self.key_shares.items()):
            _check_id(peer, "a share's owner")
            if not isinstance(share, bytes) or len(share) != SHARE_BYTES:
                raise MessageError(f"a share is {SHARE_BYTES} bytes")

    @property
    def payload_bytes(self) -> int:
        """Bytes carried: the sender's id and (owner id, share) per share."""
        count = len(self.seed_shares) + len(self.key_shares)
        return ID_BYTES + count * (ID_BYTES + SHARE_BYTES)


@dataclass(frozen=True, eq=False)
class AggregateResult:
    """What the server learns: the survivors and the exact ring sum of their inputs."""

    survivors: tuple[int, ...]
    ring_sum: np.ndarray
