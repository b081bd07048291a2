"""Making TLS material: a private CA, the chief's certificate, worker certificates.

Needs the optional ``cryptography`` package (``pip install 'fedberry[tls]'``), imported when a
function here runs, so that importing fedberry never needs it.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from fedberry.certs.files import (
    _CLIENT_NAME,
    _DNS_LABEL,
    BACKDATE,
    CA_CERT,
    CHIEF_CERT,
    PathLike,
    _require_cryptography,
)

if TYPE_CHECKING:
    from cryptography import x509
    from cryptography.hazmat.primitives.asymmetric import ec




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
