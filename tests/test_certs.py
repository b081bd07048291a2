"""fedberry.certs: certificates made here, checked by real TLS handshakes over loopback.

Each failure case runs the handshake for real and feeds the exception Python raised, on each side,
to describe_tls_error: the messages are tested against what ssl actually says, not against
exceptions built by hand.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as dt
import ipaddress
import socket
import ssl
import stat
import subprocess
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from fedberry import certs

x509 = pytest.importorskip("cryptography.x509", reason="making certificates needs fedberry[tls]")

TIMEOUT = 5.0
GREETING = b"ok"
NOW = dt.datetime.now(dt.timezone.utc)
TLS_VERSIONS = [ssl.TLSVersion.TLSv1_2, ssl.TLSVersion.TLSv1_3]


@dataclass(frozen=True)
class Pki:
    ca: Path
    ca_key: Path
    chief: Path
    chief_key: Path
    client: Path
    client_key: Path
    other_ca: Path
    other_client: Path
    other_client_key: Path


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    ours, theirs = tmp_path_factory.mktemp("ours"), tmp_path_factory.mktemp("theirs")
    ca, ca_key = certs.create_ca(ours)
    chief, chief_key = certs.create_chief_cert(ours, ca, ca_key, ["127.0.0.1", "localhost"])
    client, client_key = certs.create_client_cert(ours, ca, ca_key, "worker1")
    other_ca, other_ca_key = certs.create_ca(theirs, "someone else's CA")
    other_client, other_client_key = certs.create_client_cert(
        theirs, other_ca, other_ca_key, "worker1"
    )
    return Pki(
        ca, ca_key, chief, chief_key, client, client_key, other_ca, other_client, other_client_key
    )


# ---------------------------------------------------------------------------------------------
# A loopback TLS server on a thread, and a client that dials it


@dataclass
class Served:
    port: int
    handshake_errors: list[OSError] = field(default_factory=list)
    peer_certs: list[dict] = field(default_factory=list)  # as getpeercert() decodes them


def _serve_one(listener: socket.socket, ctx: ssl.SSLContext, served: Served) -> None:
    conn, _ = listener.accept()
    conn.settimeout(TIMEOUT)
    with conn:
        try:
            tls = ctx.wrap_socket(conn, server_side=True)
        except OSError as exc:  # ssl.SSLError is an OSError
            served.handshake_errors.append(exc)
            return
        served.peer_certs.append(tls.getpeercert())
        with tls:
            try:
                tls.sendall(GREETING)
                while tls.recv(1024):
                    pass
            except OSError:
                pass  # how the client hangs up afterwards is not what these tests check


@contextlib.contextmanager
def tls_server(ctx: ssl.SSLContext, connections: int = 1) -> Iterator[Served]:
    listener = socket.create_server(("127.0.0.1", 0))
    listener.settimeout(TIMEOUT)
    served = Served(listener.getsockname()[1])

    def serve() -> None:
        with listener:
            for _ in range(connections):
                try:
                    _serve_one(listener, ctx, served)
                except TimeoutError:
                    return

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield served
    finally:
        thread.join(3 * TIMEOUT)
        assert not thread.is_alive(), "server thread did not finish"


def dial(
    port: int, ctx: ssl.SSLContext, host: str = "127.0.0.1", write_first: bool = False
) -> bytes:
    """Handshake, then read the greeting: a TLS 1.3 refusal of the client shows up on that read."""
    with socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT) as raw:
        with ctx.wrap_socket(raw, server_hostname=host) as tls:
            if write_first:
                tls.sendall(b"hello" * 1000)
            return tls.recv(len(GREETING))


def capped(ctx: ssl.SSLContext, version: ssl.TLSVersion) -> ssl.SSLContext:
    ctx.maximum_version = version
    return ctx


def failed_dial(
    server: ssl.SSLContext, client: ssl.SSLContext, host: str = "127.0.0.1"
) -> tuple[OSError, OSError]:
    """Dial, expect a refusal on both sides, and return (client's exception, server's)."""
    with tls_server(server) as served:
        with pytest.raises(OSError) as caught:
            dial(served.port, client, host)
    assert len(served.handshake_errors) == 1
    return caught.value, served.handshake_errors[0]


# ---------------------------------------------------------------------------------------------
# Handshakes that work


@pytest.mark.parametrize("version", TLS_VERSIONS, ids=lambda v: v.name)
@pytest.mark.parametrize("host", ["127.0.0.1", "localhost"])
def test_good_handshake(pki: Pki, version: ssl.TLSVersion, host: str) -> None:
    client = capped(certs.client_context(pki.ca), version)
    with tls_server(certs.server_context(pki.chief, pki.chief_key)) as served:
        assert dial(served.port, client, host) == GREETING
    assert served.handshake_errors == []


@pytest.mark.parametrize("version", TLS_VERSIONS, ids=lambda v: v.name)
def test_mutual_tls_handshake(pki: Pki, version: ssl.TLSVersion) -> None:
    server = certs.server_context(pki.chief, pki.chief_key, client_ca=pki.ca)
    client = capped(certs.client_context(pki.ca, pki.client, pki.client_key), version)
    with tls_server(server) as served:
        assert dial(served.port, client) == GREETING
    assert served.handshake_errors == []


def test_certificates_pass_openssl_strict_checks(pki: Pki) -> None:
    # Python 3.13 turns VERIFY_X509_STRICT on by default; certificates made today must pass it.
    server = certs.server_context(pki.chief, pki.chief_key, client_ca=pki.ca)
    server.verify_flags |= ssl.VERIFY_X509_STRICT
    client = certs.client_context(pki.ca, pki.client, pki.client_key)
    client.verify_flags |= ssl.VERIFY_X509_STRICT
    with tls_server(server) as served:
        assert dial(served.port, client) == GREETING


def test_contexts_refuse_old_tls(pki: Pki) -> None:
    assert certs.server_context(pki.chief, pki.chief_key).minimum_version >= ssl.TLSVersion.TLSv1_2
    client = certs.client_context(pki.ca)
    assert client.minimum_version >= ssl.TLSVersion.TLSv1_2
    assert client.check_hostname and client.verify_mode == ssl.CERT_REQUIRED


# ---------------------------------------------------------------------------------------------
# The chief's certificate refused by the worker


def test_wrong_ca(pki: Pki) -> None:
    client_exc, server_exc = failed_dial(
        certs.server_context(pki.chief, pki.chief_key), certs.client_context(pki.other_ca)
    )
    assert isinstance(client_exc, ssl.SSLCertVerificationError)
    assert client_exc.verify_code == 20
    assert "not signed by the CA you gave (--ca)" in certs.describe_tls_error(client_exc)
    assert "refused the chief's certificate" in certs.describe_tls_error(server_exc, role="chief")


def test_expired_chief_cert(pki: Pki, tmp_path: Path) -> None:
    chief, key = certs.create_chief_cert(
        tmp_path,
        pki.ca,
        pki.ca_key,
        ["127.0.0.1"],
        not_before=NOW - dt.timedelta(days=30),
        not_after=NOW - dt.timedelta(days=1),
    )
    client_exc, server_exc = failed_dial(
        certs.server_context(chief, key), certs.client_context(pki.ca)
    )
    assert isinstance(client_exc, ssl.SSLCertVerificationError)
    assert client_exc.verify_code == 10
    assert "chief's certificate has expired" in certs.describe_tls_error(client_exc)
    assert "expired" in certs.describe_tls_error(server_exc, role="chief")


def test_not_yet_valid_chief_cert_blames_the_clock(pki: Pki, tmp_path: Path) -> None:
    chief, key = certs.create_chief_cert(
        tmp_path, pki.ca, pki.ca_key, ["127.0.0.1"], not_before=NOW + dt.timedelta(days=1)
    )
    client_exc, _ = failed_dial(certs.server_context(chief, key), certs.client_context(pki.ca))
    assert getattr(client_exc, "verify_code", None) == 9
    assert "clock" in certs.describe_tls_error(client_exc)


@pytest.mark.parametrize("dialed, code", [("127.0.0.1", 64), ("localhost", 62)])
def test_wrong_host(pki: Pki, tmp_path: Path, dialed: str, code: int) -> None:
    chief, key = certs.create_chief_cert(tmp_path, pki.ca, pki.ca_key, ["other.example"])
    server = certs.server_context(chief, key)
    with tls_server(server, connections=2) as served:
        with pytest.raises(ssl.SSLCertVerificationError) as caught:
            dial(served.port, certs.client_context(pki.ca), dialed)
        names = certs.peer_certificate_names("127.0.0.1", served.port, pki.ca)
    assert caught.value.verify_code == code
    assert names == ["other.example"]
    described = certs.describe_tls_error(caught.value, cert_names=names)
    assert f"the certificate is for other.example, you dialed {dialed}" in described
    # Without the probe the message still names what was dialed.
    assert f"does not cover {dialed}" in certs.describe_tls_error(caught.value)
    assert "name it dialed" in certs.describe_tls_error(served.handshake_errors[0], role="chief")


def test_client_cert_used_as_chief_cert(pki: Pki) -> None:
    client_exc, _ = failed_dial(
        certs.server_context(pki.client, pki.client_key), certs.client_context(pki.ca), "worker1"
    )
    assert getattr(client_exc, "verify_code", None) == 26
    assert "not a server certificate" in certs.describe_tls_error(client_exc)


def test_tls_worker_against_plain_chief(pki: Pki) -> None:
    listener = socket.create_server(("127.0.0.1", 0))
    listener.settimeout(TIMEOUT)

    def plain_chief() -> None:
        with listener, listener.accept()[0] as conn:
            conn.sendall(b"FBRY" + bytes(60))  # a plain-TCP chief that speaks first

    thread = threading.Thread(target=plain_chief, daemon=True)
    thread.start()
    with pytest.raises(ssl.SSLError) as caught:
        dial(listener.getsockname()[1], certs.client_context(pki.ca))
    thread.join(TIMEOUT)
    assert not thread.is_alive()
    assert "not speaking TLS" in certs.describe_tls_error(caught.value)


# ---------------------------------------------------------------------------------------------
# The worker's certificate refused by the chief (mutual TLS)


@pytest.mark.parametrize("version", TLS_VERSIONS, ids=lambda v: v.name)
def test_client_cert_required_but_missing(pki: Pki, version: ssl.TLSVersion) -> None:
    server = certs.server_context(pki.chief, pki.chief_key, client_ca=pki.ca)
    client = capped(certs.client_context(pki.ca), version)
    client_exc, server_exc = failed_dial(server, client)
    # TLS 1.2 refuses inside the handshake with a bare "handshake failure"; TLS 1.3 completes
    # the client's handshake and sends "certificate required", which the first read raises.
    expected = {
        ssl.TLSVersion.TLSv1_2: "SSLV3_ALERT_HANDSHAKE_FAILURE",
        ssl.TLSVersion.TLSv1_3: "TLSV13_ALERT_CERTIFICATE_REQUIRED",
    }[version]
    assert isinstance(client_exc, ssl.SSLError) and client_exc.reason == expected
    assert "requires a client certificate" in certs.describe_tls_error(client_exc)
    assert server_exc.reason == "PEER_DID_NOT_RETURN_A_CERTIFICATE"
    described = certs.describe_tls_error(server_exc, role="chief")
    assert "without a client certificate" in described


def test_client_cert_missing_when_worker_writes_first(pki: Pki) -> None:
    # A worker writes its hello right after the handshake; under TLS 1.3 the chief's refusal
    # can then be lost to the connection reset, leaving only EOF. Either way the message must
    # point at the client certificate.
    server = certs.server_context(pki.chief, pki.chief_key, client_ca=pki.ca)
    client = capped(certs.client_context(pki.ca), ssl.TLSVersion.TLSv1_3)
    with tls_server(server) as served:
        with pytest.raises(OSError) as caught:
            dial(served.port, client, write_first=True)
    assert "--cert and --key" in certs.describe_tls_error(caught.value)


@pytest.mark.parametrize("version", TLS_VERSIONS, ids=lambda v: v.name)
def test_client_cert_missing_against_an_asyncio_chief(pki: Pki, version: ssl.TLSVersion) -> None:
    # The real chief runs on asyncio, which sends no TLS alert when it refuses a handshake
    # (CPython gh-98078): the worker sees an EOF error, or under TLS 1.3 just an empty read.
    server = certs.server_context(pki.chief, pki.chief_key, client_ca=pki.ca)
    client = capped(certs.client_context(pki.ca), version)

    async def attempt() -> tuple[OSError | None, bytes | None]:
        chief = await asyncio.start_server(lambda r, w: None, "127.0.0.1", 0, ssl=server)
        try:
            port = chief.sockets[0].getsockname()[1]
            return await asyncio.wait_for(asyncio.to_thread(refused, port), 2 * TIMEOUT)
        finally:
            chief.close()
            await chief.wait_closed()

    def refused(port: int) -> tuple[OSError | None, bytes | None]:
        try:
            return None, dial(port, client)
        except OSError as exc:
            return exc, None

    exc, got = asyncio.run(attempt())
    assert exc is not None or got == b"", "the chief accepted a worker without a certificate"
    described = certs.describe_tls_error(exc if exc is not None else EOFError("closed"))
    assert "--cert and --key" in described


@pytest.mark.parametrize("version", TLS_VERSIONS, ids=lambda v: v.name)
def test_client_cert_from_another_ca(pki: Pki, version: ssl.TLSVersion) -> None:
    server = certs.server_context(pki.chief, pki.chief_key, client_ca=pki.ca)
    client = capped(certs.client_context(pki.ca, pki.other_client, pki.other_client_key), version)
    client_exc, server_exc = failed_dial(server, client)
    assert isinstance(client_exc, ssl.SSLError) and client_exc.reason == "TLSV1_ALERT_UNKNOWN_CA"
    assert "chief rejected your client certificate" in certs.describe_tls_error(client_exc)
    assert isinstance(server_exc, ssl.SSLCertVerificationError)
    assert server_exc.verify_code == 20
    described = certs.describe_tls_error(server_exc, role="chief")
    assert "not signed by the CA you gave (--client-ca)" in described


def test_chief_cert_used_as_client_cert(pki: Pki) -> None:
    server = certs.server_context(pki.chief, pki.chief_key, client_ca=pki.ca)
    client = capped(certs.client_context(pki.ca, pki.chief, pki.chief_key), ssl.TLSVersion.TLSv1_2)
    client_exc, server_exc = failed_dial(server, client)
    assert "is not a client certificate" in certs.describe_tls_error(client_exc)
    assert "not a client certificate" in certs.describe_tls_error(server_exc, role="chief")


# ---------------------------------------------------------------------------------------------
# Files and names


def test_key_files_are_private_and_written_whole(pki: Pki) -> None:
    for key in (pki.ca_key, pki.chief_key, pki.client_key):
        assert stat.S_IMODE(key.stat().st_mode) == 0o600, key
    for cert in (pki.ca, pki.chief, pki.client):
        assert stat.S_IMODE(cert.stat().st_mode) == 0o644, cert
    assert not list(pki.ca.parent.glob(".*.tmp")), "temporary files were left behind"


def test_chief_cert_names_and_usage(pki: Pki, tmp_path: Path) -> None:
    path, _ = certs.create_chief_cert(
        tmp_path, pki.ca, pki.ca_key, ["chief.example.org", "203.0.113.5", "2001:db8::1"]
    )
    cert = x509.load_pem_x509_certificate(path.read_bytes())
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["chief.example.org"]
    assert san.get_values_for_type(x509.IPAddress) == [
        ipaddress.ip_address("203.0.113.5"),
        ipaddress.ip_address("2001:db8::1"),
    ]
    eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(eku) == [x509.oid.ExtendedKeyUsageOID.SERVER_AUTH]


@pytest.mark.parametrize("bad", ["tcp://chief.example.org", "chief:7777", "", "-x.example"])
def test_bad_chief_names_are_refused(pki: Pki, tmp_path: Path, bad: str) -> None:
    with pytest.raises(ValueError, match="neither an IP address nor a DNS name"):
        certs.create_chief_cert(tmp_path, pki.ca, pki.ca_key, [bad])


@pytest.mark.parametrize("bad", ["chief", "ca", "../evil", "a/b"])
def test_client_names_that_would_clobber_or_escape(pki: Pki, tmp_path: Path, bad: str) -> None:
    with pytest.raises(ValueError, match="client name"):
        certs.create_client_cert(tmp_path, pki.ca, pki.ca_key, bad)


def test_client_key_without_cert(pki: Pki) -> None:
    with pytest.raises(ValueError, match="without its certificate"):
        certs.client_context(pki.ca, key=pki.client_key)


def test_import_and_contexts_work_without_cryptography(pki: Pki) -> None:
    code = (
        "import sys; sys.modules['cryptography'] = None\n"
        "from fedberry import certs\n"
        f"certs.server_context({str(pki.chief)!r}, {str(pki.chief_key)!r})\n"
        f"certs.client_context({str(pki.ca)!r})\n"
        "try:\n"
        "    certs.create_ca('unused')\n"
        "except certs.MissingTLSExtraError as exc:\n"
        "    print(exc)\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=30, check=True
    )
    assert "pip install 'fedberry[tls]'" in done.stdout


# ---------------------------------------------------------------------------------------------
# Names in certificates: under mutual TLS a worker's id is its certificate's name


def test_client_cert_name_is_the_common_name(pki: Pki, tmp_path: Path) -> None:
    assert certs.client_cert_name(pki.client) == "worker1"
    assert certs.client_cert_name(tmp_path / "missing.pem") is None
    (tmp_path / "junk.pem").write_text("not a certificate")
    assert certs.client_cert_name(tmp_path / "junk.pem") is None


def test_client_cert_name_without_cryptography(pki: Pki, tmp_path: Path) -> None:
    (tmp_path / "junk.pem").write_text("not a certificate")
    code = (
        "import sys; sys.modules['cryptography'] = None\n"
        "from fedberry import certs\n"
        f"print(certs.client_cert_name({str(pki.client)!r}))\n"
        f"print(certs.client_cert_name({str(tmp_path / 'junk.pem')!r}))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=30, check=True
    )
    assert done.stdout.split() == ["worker1", "None"]


def test_cert_names_from_a_real_handshake(pki: Pki, tmp_path: Path) -> None:
    """What the chief's ssl says about a worker's certificate: the commonName, then DNS names
    (IP addresses are not names a worker can take)."""
    leaf, key = certs._issue_leaf(
        pki.ca, pki.ca_key, "pi7", ["pi7.lab.example", "10.0.0.7", "pi7"], "client", 30, None,
        None
    )
    cert_path, key_path = certs._save_pair(tmp_path, "pi7", leaf, key)
    server = certs.server_context(pki.chief, pki.chief_key, client_ca=pki.ca)
    with tls_server(server) as served:
        assert dial(served.port, certs.client_context(pki.ca, cert_path, key_path)) == GREETING
    assert certs.cert_names(served.peer_certs[0]) == ["pi7", "pi7.lab.example"]
    assert certs.client_cert_name(cert_path) == "pi7"
    assert certs.cert_names({}) == []


# ---------------------------------------------------------------------------------------------
# fedberry certs


def run_cli(*argv: str) -> int:
    parser = argparse.ArgumentParser(prog="fedberry")
    certs.add_certs_parser(parser.add_subparsers(dest="command"))
    return certs.run_certs(parser.parse_args(["certs", *argv]))


def test_cli_makes_everything_and_prints_flags(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "tls"
    argv = ["--out", str(out), "--name", "chief.example.org", "--name", "203.0.113.5"]
    assert run_cli(*argv, "--client", "worker1", "--client", "worker2", "--days", "30") == 0
    printed = capsys.readouterr().out
    for name in ("ca", "chief", "worker1", "worker2"):
        assert (out / f"{name}.pem").exists()
        assert stat.S_IMODE((out / f"{name}.key").stat().st_mode) == 0o600
    assert f"--tls-cert {out / 'chief.pem'} --tls-key {out / 'chief.key'}" in printed
    assert f"--client-ca {out / 'ca.pem'}" in printed
    assert f"--ca {out / 'ca.pem'} --cert {out / 'worker2.pem'} --key {out / 'worker2.key'}" in (
        printed
    )
    chief = x509.load_pem_x509_certificate((out / "chief.pem").read_bytes())
    assert chief.not_valid_after_utc - chief.not_valid_before_utc <= dt.timedelta(days=31)

    # Run again: the CA is kept, so certificates already handed out stay valid.
    ca_before = (out / "ca.pem").read_bytes()
    assert run_cli(*argv) == 0
    assert (out / "ca.pem").read_bytes() == ca_before
    printed = capsys.readouterr().out
    assert "reused" in printed and "--client-ca" not in printed


def test_cli_refuses_a_bad_name_before_writing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "tls"
    assert run_cli("--out", str(out), "--name", "ok.example", "--name", "https://bad") == 1
    assert "https://bad" in capsys.readouterr().err
    assert not out.exists()


def test_cli_refuses_half_a_ca(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    certs.create_ca(tmp_path)
    (tmp_path / "ca.key").unlink()
    assert run_cli("--out", str(tmp_path), "--name", "localhost") == 1
    assert "ca.key does not" in capsys.readouterr().err
