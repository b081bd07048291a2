"""The ``ssl`` contexts the TCP transport uses, and the names a certificate proves.

Standard library only: a worker with ready-made files does not need the ``tls`` extra.
"""

from __future__ import annotations

import os
import socket
import ssl
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, TypeVar

from fedberry.certs.files import PathLike

if TYPE_CHECKING:
    pass

T = TypeVar("T")




def cert_names(decoded: dict) -> list[str]:
    """The names a certificate is for, as ``getpeercert()`` decodes it: the commonName, then
    the subjectAltName DNS entries. A worker's id must be one of them under mutual TLS."""
    cns = [v for rdn in decoded.get("subject", ()) for k, v in rdn if k == "commonName"]
    dns = [v for kind, v in decoded.get("subjectAltName", ()) if kind == "DNS"]
    return list(dict.fromkeys(cns + dns))


def client_cert_name(cert: PathLike) -> str | None:
    """The name in a worker's certificate file (what the chief will take as its id), or None
    when it cannot be read. Works without the ``cryptography`` extra, through CPython's own
    decoder, which is private: a missing one only costs the default id."""
    try:
        from cryptography import x509
        from cryptography.x509.oid import NameOID
    except ImportError:
        try:
            decode = ssl._ssl._test_decode_cert  # type: ignore[attr-defined]
            names = cert_names(decode(os.fspath(cert)))
        except (AttributeError, OSError, ssl.SSLError, ValueError):
            return None
        return names[0] if names else None
    try:
        parsed = x509.load_pem_x509_certificate(Path(cert).read_bytes())
    except (OSError, ValueError):
        return None
    cns = [a.value for a in parsed.subject.get_attributes_for_oid(NameOID.COMMON_NAME)]
    try:
        san = parsed.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        dns = san.get_values_for_type(x509.DNSName)
    except x509.ExtensionNotFound:
        dns = []
    names = [n for n in cns + dns if isinstance(n, str)]
    return names[0] if names else None


# ---------------------------------------------------------------------------------------------
# ssl contexts (standard library only)


def _load(what: str, paths: list[PathLike | None], load: Callable[[], T]) -> T:
    """Run ``load`` (an ssl context's loader); its errors name the files: ssl's name none."""
    named = " / ".join(os.fspath(p) for p in paths if p is not None)
    try:
        return load()
    except ssl.SSLError as exc:
        why = exc.reason or "not PEM, or a key that is not the certificate's"
        raise ValueError(f"{named}: cannot load {what} ({why}): give the PEM files 'fedberry "
                         "certs' made") from exc
    except OSError as exc:
        if exc.filename is not None:
            raise
        why = (exc.strerror or str(exc)).lower()
        raise type(exc)(exc.errno, f"{named}: {why}") from exc


def server_context(
    cert: PathLike, key: PathLike, client_ca: PathLike | None = None
) -> ssl.SSLContext:
    """The chief's context. With ``client_ca``, every worker must present a certificate it signed.

    Under TLS 1.3 a worker without an acceptable certificate finishes its handshake and only
    learns it was refused on its first read, and from a chief on asyncio it gets no alert, only
    the close (CPython gh-98078); see :func:`describe_tls_error`.
    """
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    _load("the chief's certificate and key", [cert, key], lambda: ctx.load_cert_chain(cert, key))
    if client_ca is not None:
        ctx.verify_mode = ssl.CERT_REQUIRED
        _load("the CA certificate", [client_ca],
              lambda: ctx.load_verify_locations(cafile=client_ca))
    return ctx


def client_context(
    ca: PathLike, cert: PathLike | None = None, key: PathLike | None = None
) -> ssl.SSLContext:
    """A worker's context: trusts ``ca`` only (not the system store) and checks the hostname.

    ``cert``/``key`` are the worker's own certificate, for a chief that requires client
    certificates.
    """
    if key is not None and cert is None:
        raise ValueError("a client key was given without its certificate")
    # cafile given: create_default_context loads that CA and skips the system store.
    ctx = _load("the CA certificate", [ca],
                lambda: ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=ca))
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.check_hostname = True
    ctx.verify_mode = ssl.CERT_REQUIRED
    if cert is not None:
        _load("this worker's certificate and key", [cert, key],
              lambda: ctx.load_cert_chain(cert, key))
    return ctx


def peer_certificate_names(
    host: str,
    port: int,
    ca: PathLike,
    cert: PathLike | None = None,
    key: PathLike | None = None,
    timeout: float = 5.0,
) -> list[str]:
    """The names in the chief's certificate, for explaining a hostname mismatch.

    After a mismatch Python's ssl says only which name was dialed; this second, short connection
    fetches what the certificate does cover. The chain is still checked against ``ca`` (only the
    hostname check is off), so the names come from a certificate our CA vouched for. It blocks:
    call it from a thread under asyncio. Raises OSError/ssl.SSLError when it cannot connect.
    """
    ctx = client_context(ca, cert, key)
    ctx.check_hostname = False
    with socket.create_connection((host, port), timeout=timeout) as raw:
        with ctx.wrap_socket(raw, server_hostname=host) as tls:
            peer = tls.getpeercert()
    return [value for _kind, value in peer.get("subjectAltName", ())]


# ---------------------------------------------------------------------------------------------
# Explaining TLS failures


# OpenSSL's X509_V_ERR_* codes (include/openssl/x509_vfy.h); Python exposes only the numbers.
