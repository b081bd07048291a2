"""X25519 key pairs and the pairwise keys they agree.

Bonawitz et al. 2017, "Practical Secure Aggregation for Privacy-Preserving Machine Learning"
(CCS'17), §3 "Key agreement" and §4: every client holds two Diffie-Hellman key pairs per round,
one whose agreed keys seed the pairwise masks (c in the paper) and one whose agreed keys encrypt
the secret shares (s). The raw X25519 output (RFC 7748) is never used directly: it goes through
HKDF-SHA256 (RFC 5869) with an ``info`` that names the purpose, the round and the ordered pair,
so a key agreed for one purpose or round is useless for another.
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from dataclasses import dataclass

from .errors import MessageError, require_cryptography

KEY_BYTES = 32
_LABEL = b"fedberry-secagg/v1"


@dataclass(frozen=True, repr=False)
class KeyPair:
    """One X25519 key pair as raw bytes (32 each); ``repr`` never shows the private half."""

    private: bytes
    public: bytes

    def __repr__(self) -> str:
        return f"KeyPair(public={self.public.hex()[:16]}...)"


def generate_keypair(entropy: Callable[[int], bytes]) -> KeyPair:
    """A fresh X25519 key pair whose private key is 32 bytes drawn from ``entropy``."""
    private = entropy(KEY_BYTES)
    if len(private) != KEY_BYTES:
        raise MessageError(f"the entropy source gave {len(private)} bytes, not {KEY_BYTES}")
    return KeyPair(private, public_from_private(private))


def public_from_private(private: bytes) -> bytes:
    """The X25519 public key of a raw 32-byte private key (to check a reconstructed key)."""
    require_cryptography()
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

    key = X25519PrivateKey.from_private_bytes(private)
    return key.public_key().public_bytes(serialization.Encoding.Raw,
                                         serialization.PublicFormat.Raw)


# Any fixed private key: an X25519 exchange with it fails exactly for the low-order public keys
# (whose shared secret is all zeros whatever the private key), the keys a client cannot use.
_PROBE = bytes(range(1, KEY_BYTES + 1))


def usable_public(public: bytes) -> bool:
    """Whether ``public`` is an X25519 key a peer can agree a secret with (not a low-order
    point): the server refuses an advert of any other, so that one client's bad key cannot make
    its honest neighbours fail the round."""
    try:
        agree(_PROBE, public, purpose=b"probe", context=b"", pair=(1, 2))
    except MessageError:
        return False
    return True


def agree(private: bytes, peer_public: bytes, *, purpose: bytes, context: bytes,
          pair: tuple[int, int]) -> bytes:
    """The 32-byte key that ``private`` and the owner of ``peer_public`` both derive.

    ``purpose`` (b"mask" or b"share-encryption"), ``context`` (the round's digest) and the
    unordered ``pair`` of client ids go into HKDF's ``info``: both ends compute the same key,
    and no other purpose, round or pair can.
    """
    require_cryptography()
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric.x25519 import (
        X25519PrivateKey,
        X25519PublicKey,
    )
    from cryptography.hazmat.primitives.kdf.hkdf import HKDF

    if len(peer_public) != KEY_BYTES:
        raise MessageError(f"a public key is {KEY_BYTES} bytes, not {len(peer_public)}")
    try:
        shared = X25519PrivateKey.from_private_bytes(private).exchange(
            X25519PublicKey.from_public_bytes(peer_public))
    except ValueError as exc:  # a low-order point gives the all-zero secret; OpenSSL refuses
        raise MessageError(f"the public key of client {pair[1]} is a degenerate X25519 point "
                           "(it would agree the all-zero secret)") from exc
    low, high = sorted(pair)
    info = b"|".join((_LABEL, purpose, context, struct.pack("<II", low, high)))
    return HKDF(algorithm=hashes.SHA256(), length=KEY_BYTES, salt=None, info=info).derive(shared)
