"""Secure aggregation (SecAgg+, Bell et al. 2020; Bonawitz et al. 2017 on the complete graph).

The server learns the sum of the clients' clipped, fixed-point-encoded updates and nothing else,
even when clients drop out. Sans-IO: :class:`SecAggClient` and :class:`SecAggServer` turn typed
messages into typed messages; a transport moves them. Needs the ``cryptography`` package
(``pip install 'fedberry[secagg]'``), imported only when a key, mask or share is made.
See docs/secure-aggregation.md.
"""

from .client import SecAggClient
from .encoding import FixedPoint, clip_l2
from .errors import (
    ConfigError,
    CryptographyMissing,
    MessageError,
    SecAggError,
    TamperedShare,
    TooFewSurvivors,
    UnsafeRequest,
)
from .messages import (
    AggregateResult,
    EncryptedShare,
    ForwardedShares,
    KeyAdvert,
    MaskedInput,
    RoundConfig,
    ShareBundle,
    UnmaskReply,
    UnmaskRequest,
)
from .options import SecAggOptions
from .server import SecAggServer

__all__ = [
    "AggregateResult", "ConfigError", "CryptographyMissing", "EncryptedShare", "FixedPoint",
    "ForwardedShares", "KeyAdvert", "MaskedInput", "MessageError", "RoundConfig",
    "SecAggClient", "SecAggError", "SecAggOptions", "SecAggServer", "ShareBundle", "TamperedShare",
    "TooFewSurvivors", "UnmaskReply", "UnmaskRequest", "UnsafeRequest", "clip_l2",
]
