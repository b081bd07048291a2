"""The TLS file names and the check that the ``cryptography`` extra is there."""

from __future__ import annotations

import datetime as dt
import os
import re
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    pass

PathLike = str | os.PathLike[str]


CA_CERT, CA_KEY = "ca.pem", "ca.key"
CHIEF_CERT, CHIEF_KEY = "chief.pem", "chief.key"

# Raspberry Pis have no real-time clock: until NTP syncs they boot with the time they last shut
# down, which can be hours or days behind. Back-dating not_before keeps a freshly made certificate
# from being "not yet valid" on such a Pi; it costs nothing, since the CA is private.
BACKDATE = dt.timedelta(days=1)

# A client name becomes a file name (worker1.pem); keep it to characters that are safe in paths.
_CLIENT_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
_DNS_LABEL = re.compile(r"(?!-)[A-Za-z0-9-]{1,63}(?<!-)")


class MissingTLSExtraError(ImportError):
    """Raised when a function that makes certificates runs without the ``cryptography`` package."""


def _require_cryptography() -> None:
    try:
        import cryptography  # noqa: F401
    except ImportError as exc:
        raise MissingTLSExtraError(
            "making TLS certificates needs the 'cryptography' package: pip install 'fedberry[tls]'"
        ) from exc


# ---------------------------------------------------------------------------------------------
# Files
