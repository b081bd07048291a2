"""Shared-token authentication by challenge and HMAC: the token itself never crosses the wire.

Both sides contribute a fresh random nonce, so a recorded exchange cannot be replayed, and both
prove knowledge of the token, so a worker also knows it reached the real chief (without TLS this
does not hide the traffic; see docs/security.md).
"""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets
from pathlib import Path

NONCE_BYTES = 32
TOKEN_ENV = "FEDBERRY_TOKEN"


def new_nonce() -> str:
    return secrets.token_hex(NONCE_BYTES)


def new_token() -> str:
    return secrets.token_urlsafe(32)


def _mac(token: str, role: bytes, chief_nonce: str, worker_nonce: str) -> str:
    msg = b"fedberry-auth-v1|" + role + b"|" + chief_nonce.encode() + b"|" + worker_nonce.encode()
    return hmac.new(token.encode(), msg, hashlib.sha256).hexdigest()


def worker_proof(token: str, chief_nonce: str, worker_nonce: str) -> str:
    return _mac(token, b"worker", chief_nonce, worker_nonce)


def chief_proof(token: str, chief_nonce: str, worker_nonce: str) -> str:
    return _mac(token, b"chief", chief_nonce, worker_nonce)


def verify(expected: str, got: object) -> bool:
    # compare_digest raises on a str with non-ASCII characters: a peer's JSON may hold any.
    return isinstance(got, str) and got.isascii() and hmac.compare_digest(expected, got)


def resolve_token(token: str | None = None, token_file: str | os.PathLike | None = None,
                  env: str = TOKEN_ENV) -> str:
    """The token from the argument, else the file, else ``$env`` ($FEDBERRY_TOKEN), else ""
    (no token).

    An empty token still runs the handshake (so the protocol has one path), but gives no
    protection: the chief refuses to run without one except on loopback or with --insecure.
    """
    if token:
        return token
    if token_file:
        text = Path(token_file).read_text().strip()
        if not text:
            raise ValueError(f"token file {token_file} is empty")
        return text
    return os.environ.get(env, "")
