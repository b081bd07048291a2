"""Authenticated encryption of secret shares between a pair of clients.

Bonawitz et al. 2017 §4 (round ShareKeys): each share travels through the server encrypted
under the key the two clients agreed (``keys.agree`` with purpose b"share-encryption"), so the
server routes shares it cannot read or alter. ChaCha20-Poly1305 (RFC 8439, from
``cryptography``) with a random 96-bit nonce; the associated data binds the round's digest, the
sender and the receiver, so a share replayed into another round, or forwarded to or claimed from
the wrong client, fails its tag.
"""

from __future__ import annotations

import struct
from collections.abc import Callable

from .errors import MessageError, TamperedShare, require_cryptography

NONCE_BYTES = 12
TAG_BYTES = 16
_LABEL = b"fedberry-secagg/v1|share"


def _associated(context: bytes, sender: int, receiver: int) -> bytes:
    return b"|".join((_LABEL, context, struct.pack("<II", sender, receiver)))


def seal(key: bytes, plaintext: bytes, *, context: bytes, sender: int, receiver: int,
         entropy: Callable[[int], bytes]) -> bytes:
    """nonce || ciphertext || tag of ``plaintext`` from ``sender`` to ``receiver``."""
    require_cryptography()
    from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305

    nonce = entropy(NONCE_BYTES)
    return nonce + ChaCha20Poly1305(key).encrypt(
        nonce, plaintext, _associated(context, sender, receiver))


def open_sealed(key: bytes, sealed: bytes, *, context: bytes, sender: int,
                receiver: int) -> bytes:
    """The plaintext of :func:`seal`'s output, or :class:`TamperedShare` with a sentence."""
    require_cryptography()
    from cryptography.exceptions import InvalidTag
    from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305

    if len(sealed) < NONCE_BYTES + TAG_BYTES:
        raise MessageError(f"the encrypted share from client {sender} to client {receiver} is "
                           f"{len(sealed)} bytes, shorter than a nonce and a tag")
    try:
        return ChaCha20Poly1305(key).decrypt(sealed[:NONCE_BYTES], sealed[NONCE_BYTES:],
                                             _associated(context, sender, receiver))
    except InvalidTag as exc:
        raise TamperedShare(f"the encrypted share from client {sender} to client {receiver} "
                            "fails its authentication tag: it was altered, misrouted or "
                            "replayed from another round") from exc
