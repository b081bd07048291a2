"""Shamir t-of-n secret sharing of 32-byte secrets over the prime field GF(2^521 - 1).

Shamir 1979, "How to Share a Secret"; used by Bonawitz et al. 2017 §4 (and Bell et al. 2020 on
each client's neighbourhood) to share a client's self-mask seed and its mask private key, so that
any ``threshold`` of the holders can rebuild it after the client drops out and fewer learn nothing.

Why this field: p = 2^521 - 1 is a Mersenne prime (known prime, no primality argument needed),
and a 32-byte secret (256 bits) fits in ONE element, so a secret is one polynomial, not chunks
(p = 2^127 - 1 would not even hold a 16-byte chunk, which needs 128 bits). Python integers do the
arithmetic; each client shares two secrets with about log n holders, and the server's Lagrange
coefficients are computed once per holder set, so big-integer cost is negligible beside the
masks. A share is the holder's x-coordinate (its client id, never 0) and y = f(x) as
:data:`SHARE_BYTES` big-endian bytes.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping

from .errors import MessageError, TamperedShare, TooFewSurvivors

PRIME = (1 << 521) - 1
SHARE_BYTES = 66  # ceil(521 / 8)
SECRET_BYTES = 32


def _random_element(entropy: Callable[[int], bytes]) -> int:
    # 80 bytes = 640 bits reduced mod a 521-bit prime: statistical distance from uniform < 2^-119.
    return int.from_bytes(entropy(80), "big") % PRIME


def split(secret: bytes, holders: Iterable[int], threshold: int,
          entropy: Callable[[int], bytes]) -> dict[int, bytes]:
    """Share ``secret`` (32 bytes) among ``holders`` (distinct positive ids): holder -> share."""
    xs = sorted(set(holders))
    if len(secret) != SECRET_BYTES:
        raise MessageError(f"a shared secret is {SECRET_BYTES} bytes, not {len(secret)}")
    if not xs or xs[0] <= 0:
        raise MessageError("share holders are positive client ids")
    if not 1 <= threshold <= len(xs):
        raise MessageError(f"a threshold of {threshold} cannot be met by {len(xs)} holders")
    coefficients = [int.from_bytes(secret, "big")]
    coefficients += [_random_element(entropy) for _ in range(threshold - 1)]
    shares = {}
    for x in xs:
        y = 0
        for c in reversed(coefficients):  # Horner
            y = (y * x + c) % PRIME
        shares[x] = y.to_bytes(SHARE_BYTES, "big")
    return shares


def lagrange_at_zero(xs: Iterable[int]) -> dict[int, int]:
    """The coefficients l_j with f(0) = sum_j l_j f(x_j) for any polynomial of degree < len(xs)."""
    points = sorted(set(xs))
    weights = {}
    for j in points:
        num, den = 1, 1
        for m in points:
            if m != j:
                num = num * m % PRIME
                den = den * (m - j) % PRIME
        weights[j] = num * pow(den, -1, PRIME) % PRIME
    return weights


def combine(shares: Mapping[int, bytes], threshold: int, *, what: str = "a secret",
            weights: Mapping[int, int] | None = None) -> bytes:
    """Rebuild the 32-byte secret from at least ``threshold`` shares (holder id -> share).

    Uses the ``threshold`` lowest holder ids; ``weights`` may pass their precomputed
    :func:`lagrange_at_zero` coefficients. ``what`` names the secret in the refusal sentence.
    """
    if len(shares) < threshold:
        raise TooFewSurvivors(f"cannot reconstruct {what}: {len(shares)} share(s) arrived, "
                              f"the threshold is {threshold}")
    xs = sorted(shares)[:threshold]
    if weights is None or set(weights) != set(xs):
        weights = lagrange_at_zero(xs)
    total = 0
    for x in xs:
        share = shares[x]
        if len(share) != SHARE_BYTES:
            raise MessageError(f"a share is {SHARE_BYTES} bytes, not {len(share)}")
        y = int.from_bytes(share, "big")
        if y >= PRIME:
            raise MessageError("a share is not an element of the field")
        total = (total + weights[x] * y) % PRIME
    if total >> (8 * SECRET_BYTES):
        raise TamperedShare(f"the shares of {what} are inconsistent (they do not rebuild a "
                           f"{SECRET_BYTES}-byte secret)")
    return total.to_bytes(SECRET_BYTES, "big")
