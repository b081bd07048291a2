"""One sentence for each way a TLS handshake fails: what went wrong and what to do."""

from __future__ import annotations

import re
import ssl
from collections.abc import Sequence
from typing import TYPE_CHECKING, Literal

if TYPE_CHECKING:
    pass





Role = Literal["worker", "chief"]  # which side is explaining its handshake

_ISSUER_UNKNOWN = (
    2,  # unable to get issuer certificate
    18,  # self-signed certificate (a leaf that is its own CA)
    19,  # self-signed certificate in chain (the peer sent a CA we do not trust)
    20,  # unable to get local issuer certificate: the usual one
    21,  # unable to verify the first certificate
)
_NOT_YET_VALID, _EXPIRED, _BAD_PURPOSE = 9, 10, 26
_HOSTNAME_MISMATCH, _IP_MISMATCH = 62, 64

_PI_CLOCK = "a Raspberry Pi without network time boots at the time it last shut down"
_CLOCK = f"or a clock is wrong ({_PI_CLOCK})"

# What our own verification of the peer's certificate found, by who we are.
_VERIFY: dict[Role, dict[int, str]] = {
    "worker": {
        **dict.fromkeys(
            _ISSUER_UNKNOWN,
            "the chief's certificate is not signed by the CA you gave (--ca): use the ca.pem "
            "from the directory where chief.pem was made",
        ),
        _EXPIRED: "the chief's certificate has expired (or its CA has): make new ones with "
        f"'fedberry certs', {_CLOCK}",
        _NOT_YET_VALID: "the chief's certificate is not valid yet: this machine's clock is "
        f"probably behind ({_PI_CLOCK}); set the clock",
        _BAD_PURPOSE: "the chief's certificate is not a server certificate: give the chief "
        "chief.pem (--tls-cert), not a worker's certificate",
    },
    "chief": {
        **dict.fromkeys(
            _ISSUER_UNKNOWN,
            "a worker's client certificate is not signed by the CA you gave (--client-ca)",
        ),
        _EXPIRED: f"a worker's client certificate has expired, {_CLOCK}",
        _NOT_YET_VALID: f"a worker's client certificate is not valid yet, {_CLOCK}",
        _BAD_PURPOSE: "a worker presented a certificate that is not a client certificate: give "
        "it the <name>.pem made with 'fedberry certs --client <name>', not chief.pem",
    },
}

_NO_CLIENT_CERT = "pass --cert and --key made with 'fedberry certs --client <name>'"
_NOT_TLS = "the chief is not speaking TLS on this port (is it running with --insecure?)"
_NO_COMMON_VERSION = "the two sides share no TLS version (fedberry needs TLS 1.2 or newer)"

# Alerts the peer sent us, and local protocol errors, by ssl.SSLError.reason and by who we are.
_REASON: dict[Role, dict[str, str]] = {
    "worker": {
        "TLSV13_ALERT_CERTIFICATE_REQUIRED": "the chief requires a client certificate and you "
        f"gave none: {_NO_CLIENT_CERT}",
        # TLS 1.2 has no "certificate required" alert: a chief that wants a client certificate
        # and gets none says only "handshake failure".
        "SSLV3_ALERT_HANDSHAKE_FAILURE": "the chief refused the handshake; most likely it "
        f"requires a client certificate and you gave none: {_NO_CLIENT_CERT}",
        "TLSV1_ALERT_UNKNOWN_CA": "the chief rejected your client certificate: it is not "
        "signed by the CA the chief trusts (its --client-ca)",
        "SSLV3_ALERT_CERTIFICATE_EXPIRED": "the chief rejected your client certificate: it "
        f"has expired, {_CLOCK}",
        "SSLV3_ALERT_UNSUPPORTED_CERTIFICATE": "the chief rejected your client certificate: it "
        "is not a client certificate (use <name>.pem from 'fedberry certs --client <name>')",
        "SSLV3_ALERT_BAD_CERTIFICATE": "the chief rejected your client certificate",
        "SSLV3_ALERT_CERTIFICATE_UNKNOWN": "the chief rejected your client certificate",
        "WRONG_VERSION_NUMBER": _NOT_TLS,
        "TLSV1_ALERT_PROTOCOL_VERSION": _NO_COMMON_VERSION,
        "UNSUPPORTED_PROTOCOL": _NO_COMMON_VERSION,
    },
    "chief": {
        "PEER_DID_NOT_RETURN_A_CERTIFICATE": "a worker connected without a client certificate, "
        "which this chief requires (--client-ca): give the worker --cert and --key",
        "TLSV1_ALERT_UNKNOWN_CA": "a worker refused the chief's certificate: it is not signed "
        "by the CA the worker was given (its --ca)",
        "SSLV3_ALERT_CERTIFICATE_EXPIRED": "a worker refused the chief's certificate as "
        f"expired, {_CLOCK}",
        # Python's hostname check reports itself to the server as "bad certificate".
        "SSLV3_ALERT_BAD_CERTIFICATE": "a worker refused the chief's certificate, most likely "
        "because the name it dialed is not in it: remake it with a --name for every address "
        "workers dial",
        "SSLV3_ALERT_UNSUPPORTED_CERTIFICATE": "a worker refused the chief's certificate: it is "
        "not a server certificate (use chief.pem)",
        "WRONG_VERSION_NUMBER": "a peer spoke plain TCP to the chief's TLS port (a worker "
        "without --ca?)",
        "HTTP_REQUEST": "a peer spoke HTTP to the chief's TLS port",
        "TLSV1_ALERT_PROTOCOL_VERSION": _NO_COMMON_VERSION,
        "UNSUPPORTED_PROTOCOL": _NO_COMMON_VERSION,
    },
}

# A refused client certificate often reaches the worker as a bare close, not as an alert: a chief
# on asyncio sends no alert at all (CPython gh-98078), and under TLS 1.3 the worker has finished
# its handshake and may lose a blocking chief's alert to the reset its own first write causes.
# So a close this early must name that possibility.
_CLOSED: dict[Role, str] = {
    "worker": "the chief closed the connection during or just after the TLS handshake without "
    "saying why; if it requires client certificates, this is how it refuses a missing or "
    f"unknown one: {_NO_CLIENT_CERT}, signed by the chief's --client-ca",
    "chief": "the worker closed the connection during the TLS handshake",
}


def describe_tls_error(
    exc: BaseException,
    *,
    role: Role = "worker",
    cert_names: Sequence[str] | None = None,
) -> str:
    """One sentence saying which TLS problem ``exc`` is and what to do about it.

    ``exc`` is what the handshake, or the first read after it, raised; when that read just finds
    the connection closed, pass an ``EOFError`` (``asyncio.IncompleteReadError`` is one): for a
    worker that is how a chief on asyncio refuses a client certificate. ``role`` is who caught it:
    the same alert means different things on each side (a worker that gets "unknown CA" had its
    client certificate refused; a chief that gets it had its own certificate refused).
    ``cert_names`` are the names in the chief's certificate (see :func:`peer_certificate_names`);
    with them a hostname mismatch says what the certificate is for, not just what was dialed.
    """
    if isinstance(exc, ssl.SSLCertVerificationError):
        return _describe_verify(exc, role, cert_names)
    if isinstance(exc, ssl.SSLZeroReturnError | ssl.SSLEOFError | ConnectionError | EOFError):
        return _CLOSED[role]
    if isinstance(exc, ssl.SSLError):
        reason = exc.reason or ""
        if reason == "UNEXPECTED_EOF_WHILE_READING":
            return _CLOSED[role]
        if reason in _REASON[role]:
            return _REASON[role][reason]
        return f"TLS handshake failed: {exc.reason or exc}"
    return f"TLS connection failed: {exc}"


def _describe_verify(
    exc: ssl.SSLCertVerificationError, role: Role, cert_names: Sequence[str] | None
) -> str:
    code = exc.verify_code
    if code in (_HOSTNAME_MISMATCH, _IP_MISMATCH):
        return _describe_mismatch(exc.verify_message or "", cert_names)
    if code in _VERIFY[role]:
        return _VERIFY[role][code]
    whose = "the chief's certificate" if role == "worker" else "a worker's client certificate"
    return f"{whose} was refused: {exc.verify_message} (OpenSSL verify code {code})"


def _describe_mismatch(verify_message: str, cert_names: Sequence[str] | None) -> str:
    # OpenSSL's text ends "... certificate is not valid for '<dialed>'."; it is the only place
    # the dialed name appears in the exception.
    found = re.search(r"'([^']*)'", verify_message)
    dialed = found.group(1) if found else "that name"
    example = cert_names[0] if cert_names else "NAME"
    fix = (f"dial a name the certificate has; or, dialing {dialed} on purpose (a forwarded "
           f"port, an address it does not list), pass --server-hostname {example} (Python: "
           f"server_hostname=) to check it against one of its names; or remake it with "
           f"'fedberry certs --name {dialed}'")
    if cert_names:
        return f"the certificate is for {', '.join(cert_names)}, you dialed {dialed}: {fix}"
    return f"the chief's certificate does not cover {dialed}, the name you dialed: {fix}"


# ---------------------------------------------------------------------------------------------
# fedberry certs
