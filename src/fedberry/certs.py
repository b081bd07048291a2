"""TLS material for fedberry: a private CA, the chief's certificate, worker certificates, and the
``ssl`` contexts the TCP transport uses.

The operator runs their own CA (``fedberry certs``): the chief and the workers trust that CA only,
never the system store, so a certificate bought from anyone else cannot impersonate a chief.

Making certificates needs the optional ``cryptography`` package (``pip install 'fedberry[tls]'``);
building ``ssl`` contexts and explaining TLS errors need only the standard library, so
``import fedberry.certs`` always works and a worker with ready-made files does not need the extra.
"""

from __future__ import annotations

import argparse
import datetime as dt
import ipaddress
import os
import re
import shlex
import socket
import ssl
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Literal

if TYPE_CHECKING:
    from cryptography import x509
    from cryptography.hazmat.primitives.asymmetric import ec

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


def _write_atomically(path: Path, data: bytes, mode: int) -> None:
    """Write ``data`` to ``path`` so that a reader sees the old file or the new one, never half.

    The temporary file is created with mode 0600 by mkstemp, so a private key is never readable
    by others, not even for the moment between creating and renaming it.
    """
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _write_key(path: Path, key: ec.EllipticCurvePrivateKey) -> None:
    from cryptography.hazmat.primitives import serialization

    pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    _write_atomically(path, pem, 0o600)


def _write_cert(path: Path, cert: x509.Certificate) -> None:
    from cryptography.hazmat.primitives import serialization

    _write_atomically(path, cert.public_bytes(serialization.Encoding.PEM), 0o644)


def _out_dir(out_dir: PathLike) -> Path:
    path = Path(out_dir)
    # 0700 when we create it: the directory will hold private keys.
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    return path


def _load_ca(
    ca_cert: PathLike, ca_key: PathLike
) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    cert = x509.load_pem_x509_certificate(Path(ca_cert).read_bytes())
    key = serialization.load_pem_private_key(Path(ca_key).read_bytes(), password=None)
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise ValueError(f"{ca_key}: expected an EC private key, got {type(key).__name__}")
    if cert.public_key() != key.public_key():
        raise ValueError(f"{ca_key} is not the private key of {ca_cert}")
    return cert, key


# ---------------------------------------------------------------------------------------------
# Names


def _parse_name(name: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | str:
    """An IP address, or a DNS name checked well enough to catch typos like a pasted URL."""
    try:
        return ipaddress.ip_address(name)
    except ValueError:
        pass
    host = name[:-1] if name.endswith(".") else name
    labels = host.split(".")
    if labels and labels[0] == "*":  # a wildcard is allowed as the whole leftmost label only
        labels = labels[1:]
    if not host or len(host) > 253 or not labels or not all(map(_DNS_LABEL.fullmatch, labels)):
        raise ValueError(
            f"{name!r} is neither an IP address nor a DNS name "
            "(give a bare host such as chief.example.org or 203.0.113.5, no scheme or port)"
        )
    return host.lower()


def _subject_alt_name(names: Sequence[str]) -> x509.SubjectAlternativeName:
    from cryptography import x509

    entries: list[x509.GeneralName] = []
    for name in names:
        parsed = _parse_name(name)
        # An IP must be an iPAddress entry: TLS clients never match an IP against a DNS entry.
        if isinstance(parsed, str):
            entries.append(x509.DNSName(parsed))
        else:
            entries.append(x509.IPAddress(parsed))
    return x509.SubjectAlternativeName(entries)


# ---------------------------------------------------------------------------------------------
# Certificates


def _new_key() -> ec.EllipticCurvePrivateKey:
    from cryptography.hazmat.primitives.asymmetric import ec

    # P-256: a handshake costs a few milliseconds on a Raspberry Pi, where RSA-3072 costs tens.
    return ec.generate_private_key(ec.SECP256R1())


def _validity(
    days: int, not_before: dt.datetime | None, not_after: dt.datetime | None
) -> tuple[dt.datetime, dt.datetime]:
    now = dt.datetime.now(dt.timezone.utc)
    start = not_before if not_before is not None else now - BACKDATE
    end = not_after if not_after is not None else now + dt.timedelta(days=days)
    if end <= start:
        raise ValueError(f"certificate would end ({end}) before it starts ({start})")
    return start, end


def _common_name(name: str) -> x509.Name:
    from cryptography import x509
    from cryptography.x509.oid import NameOID

    # X.509 caps a commonName at 64 characters; the SAN, not the CN, is what TLS checks anyway.
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name[:64])])


def _issue_leaf(
    ca_cert: PathLike,
    ca_key: PathLike,
    common_name: str,
    names: Sequence[str],
    usage: Literal["server", "client"],
    days: int,
    not_before: dt.datetime | None,
    not_after: dt.datetime | None,
) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes
    from cryptography.x509.oid import ExtendedKeyUsageOID

    # The SAN first: a bad name should fail with our message, not as an over-long commonName.
    san = _subject_alt_name(names) if names else None
    issuer_cert, issuer_key = _load_ca(ca_cert, ca_key)
    key = _new_key()
    start, end = _validity(days, not_before, not_after)
    eku = ExtendedKeyUsageOID.SERVER_AUTH if usage == "server" else ExtendedKeyUsageOID.CLIENT_AUTH
    # The extensions are what OpenSSL's strict mode (the default from Python 3.13) demands of a
    # leaf: an authority key identifier, a critical key usage, and for a server a SAN.
    ca_ski = issuer_cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    builder = (
        x509.CertificateBuilder()
        .subject_name(_common_name(common_name))
        .issuer_name(issuer_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(end)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(_key_usage(ca=False), critical=True)
        .add_extension(x509.ExtendedKeyUsage([eku]), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ca_ski), critical=False
        )
    )
    if san is not None:
        builder = builder.add_extension(san, critical=False)
    return builder.sign(issuer_key, hashes.SHA256()), key


def _key_usage(ca: bool) -> x509.KeyUsage:
    from cryptography import x509

    return x509.KeyUsage(
        digital_signature=not ca,  # ECDHE-ECDSA: the leaf key only ever signs the handshake
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=ca,
        crl_sign=ca,
        encipher_only=False,
        decipher_only=False,
    )


def _save_pair(
    out: Path, stem: str, cert: x509.Certificate, key: ec.EllipticCurvePrivateKey
) -> tuple[Path, Path]:
    cert_path, key_path = out / f"{stem}.pem", out / f"{stem}.key"
    # Key first: a cert on disk without its key would look usable and fail at load time.
    _write_key(key_path, key)
    _write_cert(cert_path, cert)
    return cert_path, key_path


def create_ca(
    out_dir: PathLike,
    common_name: str = "fedberry CA",
    days: int = 3650,
    *,
    not_before: dt.datetime | None = None,
    not_after: dt.datetime | None = None,
) -> tuple[Path, Path]:
    """Make a new CA in ``out_dir`` (``ca.pem``, ``ca.key``, overwriting them) and return the paths.

    ``not_before``/``not_after`` (timezone-aware) override the validity window; they exist so that
    tests can make expired or not-yet-valid certificates.
    """
    _require_cryptography()
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes

    out = _out_dir(out_dir)
    key = _new_key()
    name = _common_name(common_name)
    start, end = _validity(days, not_before, not_after)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(end)
        # path_length=0: this CA signs chief and worker certificates, never another CA.
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(_key_usage(ca=True), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    return _save_pair(out, Path(CA_CERT).stem, cert, key)


def create_chief_cert(
    out_dir: PathLike,
    ca_cert: PathLike,
    ca_key: PathLike,
    names: Sequence[str],
    days: int = 825,
    *,
    not_before: dt.datetime | None = None,
    not_after: dt.datetime | None = None,
) -> tuple[Path, Path]:
    """Make ``chief.pem``/``chief.key`` in ``out_dir``, signed by the CA, for TLS servers.

    ``names`` are every DNS name and IP address workers will dial (``tcp://<name>:port``): the
    public address behind port forwarding, not the one the chief binds. A worker that dials a
    name not in the list is refused with a hostname mismatch.
    """
    _require_cryptography()
    if isinstance(names, str):  # a bare string would become one name per character
        names = [names]
    if not names:
        raise ValueError("a chief certificate needs at least one DNS name or IP address")
    cert, key = _issue_leaf(ca_cert, ca_key, names[0], names, "server", days, not_before, not_after)
    return _save_pair(_out_dir(out_dir), Path(CHIEF_CERT).stem, cert, key)


def create_client_cert(
    out_dir: PathLike,
    ca_cert: PathLike,
    ca_key: PathLike,
    name: str,
    days: int = 825,
    *,
    not_before: dt.datetime | None = None,
    not_after: dt.datetime | None = None,
) -> tuple[Path, Path]:
    """Make ``<name>.pem``/``<name>.key`` in ``out_dir``: a worker's certificate for mutual TLS.

    ``name`` (the commonName) is the worker's id: a chief that requires client certificates admits
    the holder under that id only.
    """
    _require_cryptography()
    _check_client_name(name)
    # No SAN: TLS never matches a client's name; the chief reads the commonName itself.
    cert, key = _issue_leaf(ca_cert, ca_key, name, [], "client", days, not_before, not_after)
    return _save_pair(_out_dir(out_dir), name, cert, key)


def _check_client_name(name: str) -> None:
    if not _CLIENT_NAME.fullmatch(name):
        raise ValueError(
            f"client name {name!r}: use letters, digits, '.', '_' or '-' (it becomes a file name)"
        )
    if name in (Path(CA_CERT).stem, Path(CHIEF_CERT).stem):
        raise ValueError(f"client name {name!r} would overwrite the {name} certificate")


# ---------------------------------------------------------------------------------------------
# Whose certificate: a worker's id is bound to its certificate's name under mutual TLS


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
    ctx.load_cert_chain(cert, key)
    if client_ca is not None:
        ctx.verify_mode = ssl.CERT_REQUIRED
        ctx.load_verify_locations(cafile=client_ca)
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
    ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=ca)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.check_hostname = True
    ctx.verify_mode = ssl.CERT_REQUIRED
    if cert is not None:
        ctx.load_cert_chain(cert, key)
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

Role = Literal["worker", "chief"]

# OpenSSL's X509_V_ERR_* codes (include/openssl/x509_vfy.h); Python exposes only the numbers.
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
    fix = f"dial a name the certificate has, or remake it with --name {dialed}"
    if cert_names:
        return f"the certificate is for {', '.join(cert_names)}, you dialed {dialed}: {fix}"
    return f"the chief's certificate does not cover {dialed}, the name you dialed: {fix}"


# ---------------------------------------------------------------------------------------------
# fedberry certs


def _positive_int(text: str) -> int:
    value = int(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive number of days, got {text}")
    return value


def add_certs_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register ``fedberry certs`` on the CLI's subparsers; its handler is :func:`run_certs`."""
    parser = subparsers.add_parser(
        "certs",
        help="make a private CA and TLS certificates for the chief and workers",
        description="Make (or reuse) a CA in DIR, a certificate for the chief, and optional "
        "client certificates for workers (mutual TLS). Keep ca.key off the workers.",
    )
    parser.add_argument(
        "--out",
        required=True,
        type=Path,
        metavar="DIR",
        help="directory for the files; an existing ca.pem/ca.key there is reused",
    )
    parser.add_argument(
        "--name",
        required=True,
        action="append",
        dest="names",
        metavar="HOST",
        help="DNS name or IP address workers dial to reach the chief (repeat for "
        "each: the public address, not the one the chief binds)",
    )
    parser.add_argument(
        "--client",
        action="append",
        default=[],
        dest="clients",
        metavar="NAME",
        help="also make NAME.pem/NAME.key for the worker NAME (its id); the chief then "
        "requires client certificates (repeat for each worker)",
    )
    parser.add_argument(
        "--days",
        type=_positive_int,
        default=825,
        help="validity of the chief and worker certificates (default: 825)",
    )
    parser.set_defaults(func=run_certs)
    return parser


def run_certs(args: argparse.Namespace) -> int:
    """Carry out ``fedberry certs``; returns the process exit code."""
    try:
        _check_request(args.names, args.clients)
        ca, ca_key, ca_is_new = _ensure_ca(args.out)
        chief = create_chief_cert(args.out, ca, ca_key, args.names, args.days)
        clients = [
            create_client_cert(args.out, ca, ca_key, name, args.days) for name in args.clients
        ]
    except (ValueError, OSError, MissingTLSExtraError) as exc:
        print(f"fedberry certs: {exc}", file=sys.stderr)
        return 1
    print(_summary(ca, ca_key, ca_is_new, chief, clients, args.names))
    return 0


def _check_request(names: Sequence[str], clients: Sequence[str]) -> None:
    """Check every name before writing anything, so that a typo leaves no half-made directory."""
    for name in names:
        _parse_name(name)
    for client in clients:
        _check_client_name(client)
    if len(set(clients)) != len(clients):
        raise ValueError("the same --client name is given twice")


def _ensure_ca(out: Path) -> tuple[Path, Path, bool]:
    cert, key = out / CA_CERT, out / CA_KEY
    if cert.exists() and key.exists():
        # Not loaded here: create_chief_cert loads and checks the pair before it writes anything.
        return cert, key, False
    if cert.exists() or key.exists():
        present, missing = (cert, key) if cert.exists() else (key, cert)
        raise ValueError(
            f"{present} exists but {missing} does not: restore it, or remove {present} to make "
            "a new CA (every existing certificate then has to be remade)"
        )
    return (*create_ca(out), True)


def _dial_example(name: str) -> str:
    parsed = _parse_name(name)
    host = f"[{parsed}]" if isinstance(parsed, ipaddress.IPv6Address) else str(parsed)
    return f"tcp://{host}:PORT"


def _summary(
    ca: Path,
    ca_key: Path,
    ca_is_new: bool,
    chief: tuple[Path, Path],
    clients: Sequence[tuple[Path, Path]],
    names: Sequence[str],
) -> str:
    q = shlex.quote
    chief_flags = f"--tls-cert {q(str(chief[0]))} --tls-key {q(str(chief[1]))}"
    if clients:
        chief_flags += f" --client-ca {q(str(ca))}"
    lines = [
        f"CA     {ca} {ca_key} ({'new' if ca_is_new else 'reused'}; keep {ca_key.name} off the "
        "workers: it can sign certificates)",
        f"chief  {chief[0]} {chief[1]} (for {', '.join(names)})",
        *(f"client {cert} {key}" for cert, key in clients),
        "",
        "On the chief:",
        f"  fedberry chief ... {chief_flags}",
        f"On the workers (copy {ca.name}{', and each its own .pem/.key,' if clients else ''} "
        f"there; dial one of: {', '.join(names)}):",
    ]
    worker = f"  fedberry demo-worker --chief {_dial_example(names[0])} --ca {q(str(ca))}"
    if not clients:
        lines.append(worker)
    for cert, key in clients:
        lines.append(f"{worker} --cert {q(str(cert))} --key {q(str(key))}")
    return "\n".join(lines)
