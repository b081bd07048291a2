"""The refusals of secure aggregation: each a typed exception carrying one sentence.

Every check in this package raises one of these, so a caller (the chief runtime, a worker) can
tell a malformed message from a dangerous request from a round that cannot finish.
"""

from __future__ import annotations


class SecAggError(ValueError):
    """Base class: secure aggregation refused an input or could not finish a round."""


class CryptographyMissing(SecAggError, ImportError):
    """The optional ``cryptography`` package (``pip install 'fedberry[secagg]'``) is missing."""


class ConfigError(SecAggError):
    """The round's parameters (clients, threshold, neighbours, ring, length) are unusable."""


class MessageError(SecAggError):
    """A message is malformed, arrives in the wrong phase, or names the wrong party."""


class TamperedShare(SecAggError):
    """A share is wrong: its encryption failed its authentication tag (altered, misrouted or
    replayed), or the shares returned for unmasking rebuild no secret, or not the advertised
    key."""


class UnsafeRequest(SecAggError):
    """A client refuses an unmasking request that would reveal a peer's input."""


class TooFewSurvivors(SecAggError):
    """Too few clients are left to reconstruct a secret the sum needs; the round fails."""


def require_cryptography() -> None:
    """Raise :class:`CryptographyMissing` with a sentence when ``cryptography`` is absent.

    The primitives import ``cryptography`` inside their functions so that ``import fedberry``
    (and the numpy-only test runs) never needs the extra.
    """
    try:
        import cryptography  # noqa: F401
    except ImportError as exc:  # pragma: no cover - exercised only without the extra
        raise CryptographyMissing(
            "secure aggregation needs the 'cryptography' package: "
            "pip install 'fedberry[secagg]'") from exc
