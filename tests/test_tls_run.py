"""TLS end to end, with real chief and worker processes.

* A run with mutual TLS completes, and a capture of every byte between the workers and the chief
  (a relay in the middle records them) holds none of the frames' plaintext: no magic, no JSON
  metadata, no tensor bytes of the global model every worker received. The same capture of a
  plain-TCP exchange does show them, so the check can fail.
* A worker is refused, with a sentence that says which problem it is, when it trusts another CA,
  dials a name the chief's certificate lacks, presents no client certificate or one from another
  CA, or meets an expired chief certificate.
* Plain TCP is served only on loopback unless --insecure, which is said loudly.
* Under mutual TLS a worker's id is its certificate's name: another id is refused, saying which
  names the certificate has, and a worker given no id takes the name by itself.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from robustness_harness import TOKEN, Cluster, Proxy

from fedberry import Worker, certs
from fedberry.chief import checkpoint as ckpt_io
from fedberry.errors import AuthenticationError
from fedberry.protocol.frames import MAGIC, MsgType, encode
from fedberry.serve import serve

pytest.importorskip("cryptography", reason="making certificates needs fedberry[tls]")


@dataclass(frozen=True)
class Pki:
    ca: Path
    chief: Path
    chief_key: Path
    clients: dict[str, tuple[Path, Path]]
    san_client: tuple[Path, Path]  # commonName "pi7", DNS name "pi7.lab.example"
    other_ca: Path
    foreign_client: tuple[Path, Path]
    expired_chief: tuple[Path, Path]


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    ours, theirs = tmp_path_factory.mktemp("pki"), tmp_path_factory.mktemp("other-pki")
    old = tmp_path_factory.mktemp("expired")
    ca, ca_key = certs.create_ca(ours)
    chief, chief_key = certs.create_chief_cert(ours, ca, ca_key, ["127.0.0.1"])
    clients = {n: certs.create_client_cert(ours, ca, ca_key, n) for n in ("w1", "w2", "w3")}
    # fedberry certs writes no SAN in client certificates; other tools may, and it counts.
    san_client = certs._save_pair(ours, "pi7", *certs._issue_leaf(
        ca, ca_key, "pi7", ["pi7.lab.example"], "client", 30, None, None))
    other_ca, other_key = certs.create_ca(theirs, "someone else's CA")
    foreign = certs.create_client_cert(theirs, other_ca, other_key, "w1")
    now = dt.datetime.now(dt.timezone.utc)
    expired = certs.create_chief_cert(old, ca, ca_key, ["127.0.0.1"],
                                      not_before=now - dt.timedelta(days=30),
                                      not_after=now - dt.timedelta(days=1))
    return Pki(ca, chief, chief_key, clients, san_client, other_ca, foreign, expired)


def tls_chief_args(pki: Pki, cert: Path | None = None, key: Path | None = None) -> list[str]:
    return ["--tls-cert", str(cert or pki.chief), "--tls-key", str(key or pki.chief_key),
            "--client-ca", str(pki.ca)]


def client_args(pki: Pki, name: str) -> list[str]:
    cert, key = pki.clients[name]
    return ["--ca", str(pki.ca), "--cert", str(cert), "--key", str(key)]


def plaintext_needles(arrays: list[np.ndarray]) -> dict[str, bytes]:
    """Byte strings any unencrypted GLOBAL frame of ``arrays`` contains."""
    frame = encode(MsgType.GLOBAL, {"round": 1, "done": False}, arrays).tobytes()
    needles = {"magic": MAGIC, "metadata": b'"tensors":[{"dtype":"<f4"'}
    for i, a in enumerate(arrays):
        raw = a.tobytes()
        needles[f"tensor {i}"] = raw[len(raw) // 2:len(raw) // 2 + 48]
    for name, needle in needles.items():
        assert needle in frame, name  # the needles are what a capture of plaintext would show
    return needles


def test_mutual_tls_run_completes_and_the_wire_shows_no_plaintext(pki: Pki,
                                                                  tmp_path: Path) -> None:
    rounds = 3
    with Cluster(tmp_path) as c, Proxy(c.port, record=True) as wire:
        chief = c.chief("--workers", "2", "--rounds", str(rounds), *tls_chief_args(pki))
        workers = [c.worker(i, 2, *client_args(pki, f"w{i}"), url=wire.url) for i in (1, 2)]
        assert chief.wait(90) == 0, c.logs()
        for w in workers:
            assert w.wait(30) == 0, c.logs()
        assert [m["round"] for m in c.metrics()] == list(range(1, rounds + 1))
        assert all(m["workers"] == 2 for m in c.metrics()), c.logs()
        final = ckpt_io.load(c.out / "checkpoint.npz").arrays  # sent to both workers, in TLS
    captured = bytes(wire.captured)
    assert len(captured) > 2 * rounds * sum(a.nbytes for a in final)  # the models did cross
    for name, needle in plaintext_needles(final).items():
        assert needle not in captured, f"{name} visible on the wire"
    assert TOKEN.encode() not in captured


def test_plain_tcp_capture_does_show_the_plaintext(tmp_path: Path) -> None:
    """The control for the test above: the same relay on a plain-TCP exchange sees it all."""
    model = [np.random.default_rng(0).standard_normal((50, 20)).astype(np.float32)]
    handle = serve("127.0.0.1:0", workers=1, rounds=1, initial=model, token=TOKEN)
    try:
        with Proxy(handle.address[1], record=True) as wire:
            with Worker(wire.url, token=TOKEN) as w:
                # Joined with another model, so that the chief's crosses the wire.
                w.sync([m + 1 for m in w.join([np.zeros_like(a) for a in model])], 10)
            assert handle.wait(10)
            captured = bytes(wire.captured)
        for name, needle in plaintext_needles(model).items():
            assert needle in captured, name
    finally:
        handle.stop()


# (worker options, what its error must say, what the chief's log must say or None)
REFUSALS = {
    "wrong CA": (lambda p: ["--ca", str(p.other_ca), *client_args(p, "w1")[2:]],
                 "the chief's certificate is not signed by the CA you gave (--ca)", None),
    "wrong host": (lambda p: [*client_args(p, "w1"), "--server-hostname", "chief.example.org"],
                   "the certificate is for 127.0.0.1, you dialed chief.example.org", None),
    "no client certificate": (lambda p: ["--ca", str(p.ca)],
                              "requires a client certificate (mutual TLS) and you presented "
                              "none", "requires a client certificate"),
    "client certificate of another CA": (
        lambda p: ["--ca", str(p.ca), "--cert", str(p.foreign_client[0]), "--key",
                   str(p.foreign_client[1])],
        "it did not accept yours: it must be signed by the chief's --client-ca",
        "a worker's client certificate is not signed by the CA you gave (--client-ca)"),
    # the harness runs worker 1 with --worker-id w1
    "worker id not its certificate's name": (
        lambda p: client_args(p, "w2"),
        "worker id 'w1' is not the name in your client certificate ('w2')",
        "worker id 'w1' is not the name in your client certificate ('w2')"),
}


def test_bad_certificates_are_refused_saying_which(pki: Pki, tmp_path: Path) -> None:
    with Cluster(tmp_path) as c, Cluster(tmp_path / "expired") as expired:
        chief = c.chief("--workers", "1", "--model", "none", *tls_chief_args(pki))
        expired.chief("--workers", "1", "--model", "none",
                      *tls_chief_args(pki, *pki.expired_chief))
        refused = {name: c.worker(1, 1, *opts(pki), name=f"refused-{i}")
                   for i, (name, (opts, _, _)) in enumerate(REFUSALS.items())}
        refused["expired chief certificate"] = c.worker(
            1, 1, *client_args(pki, "w3"), url=expired.url, name="refused-expired")
        for name, proc in refused.items():
            assert proc.wait(90) == 1, f"{name}:\n{proc.log()}"
            text = proc.log()
            assert "Traceback" not in text, text
            want = ("the chief's certificate has expired" if name == "expired chief certificate"
                    else REFUSALS[name][1])
            assert want in text, f"{name}: {text}"
        for name, (_, _, chief_says) in REFUSALS.items():
            if chief_says:
                assert chief_says in chief.log(), f"{name}: {chief.log()}"


def test_plain_tcp_only_on_loopback_or_insecure(capsys: pytest.CaptureFixture[str],
                                                pki: Pki) -> None:
    with pytest.raises(ValueError, match="refusing to serve plain TCP on 0.0.0.0"):
        serve("0.0.0.0:0", workers=1, token=TOKEN)
    with pytest.raises(ValueError, match="without a token"):
        serve("0.0.0.0:0", workers=1, tls_cert=str(pki.chief), tls_key=str(pki.chief_key))
    with pytest.raises(ValueError, match="--client-ca needs TLS"):
        serve("0.0.0.0:0", workers=1, token=TOKEN, client_ca=str(pki.ca))
    # client certificates are a way to authenticate workers: no token needed then
    serve("0.0.0.0:0", workers=1, tls_cert=str(pki.chief), tls_key=str(pki.chief_key),
          client_ca=str(pki.ca)).stop()
    serve("127.0.0.1:0", workers=1).stop()  # loopback: plain and quiet
    assert "INSECURE" not in capsys.readouterr().err
    serve("0.0.0.0:0", workers=1, insecure=True).stop()
    err = capsys.readouterr().err
    assert "!!! INSECURE" in err and "WITHOUT TLS" in err and "WITHOUT A TOKEN" in err


def test_client_certificates_alone_authenticate_workers(pki: Pki,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """mTLS as the second way in: no token on either side, the certificate is the credential."""
    monkeypatch.delenv("FEDBERRY_TOKEN", raising=False)
    model = [np.ones((8, 4), np.float32)]
    handle = serve("127.0.0.1:0", workers=1, rounds=1, initial=model, tls_cert=str(pki.chief),
                   tls_key=str(pki.chief_key), client_ca=str(pki.ca))
    try:
        cert, key = pki.clients["w1"]
        with Worker(handle.url, ca=str(pki.ca), cert=str(cert), key=str(key)) as w:
            got = w.sync([m * 3 for m in w.join(model)], 1)
            assert w.done and np.array_equal(got[0], model[0] * 3)
        assert handle.wait(10)
    finally:
        handle.stop()


def mtls_chief(pki: Pki, model: list[np.ndarray], workers: int = 1) -> object:
    return serve("127.0.0.1:0", workers=workers, rounds=1, initial=model, handshake_timeout=10,
                 tls_cert=str(pki.chief), tls_key=str(pki.chief_key), client_ca=str(pki.ca))


def mtls_worker(pki: Pki, handle: object, cert_key: tuple[Path, Path], **kw: object) -> Worker:
    # connect_timeout bounds the retries; the chief's handshake_timeout bounds each attempt.
    return Worker(handle.url, ca=str(pki.ca), cert=str(cert_key[0]), key=str(cert_key[1]),
                  connect_timeout=20, **kw)


def test_a_worker_id_that_is_not_its_certificates_name_is_refused(
        pki: Pki, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("FEDBERRY_TOKEN", raising=False)
    model = [np.ones((8, 4), np.float32)]
    handle = mtls_chief(pki, model)
    try:
        # w1's certificate claiming to be w2: without the binding it would take w2's place
        with mtls_worker(pki, handle, pki.clients["w1"], worker_id="w2") as w:
            with pytest.raises(AuthenticationError) as refused:
                w.join(model)
        text = str(refused.value)
        assert "worker id 'w2' is not the name in your client certificate ('w1')" in text
        assert "--worker-id w1" in text and "'fedberry certs --client w2'" in text
        assert w.session.reconnects == 0  # refused for good, not retried
        with mtls_worker(pki, handle, pki.san_client, worker_id="pi7.example") as w:
            with pytest.raises(AuthenticationError, match=r"\('pi7' or 'pi7.lab.example'\)"):
                w.join(model)
        assert not handle.server.peers
    finally:
        handle.stop()


def test_a_worker_without_an_id_takes_its_certificates_name(
        pki: Pki, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("FEDBERRY_TOKEN", raising=False)
    model = [np.ones((8, 4), np.float32)]
    handle = mtls_chief(pki, model, workers=2)
    try:
        with mtls_worker(pki, handle, pki.clients["w3"]) as w3, \
                mtls_worker(pki, handle, pki.san_client, worker_id="pi7.lab.example") as w7:
            assert w3.worker_id == "w3"
            for w in (w3, w7):
                assert np.array_equal(w.join(model)[0], model[0])
            assert sorted(handle.server.peers) == ["pi7.lab.example", "w3"]
    finally:
        handle.stop()


def test_the_binding_can_be_turned_off(pki: Pki, monkeypatch: pytest.MonkeyPatch) -> None:
    """ListenOptions.bind_worker_id=False: for certificates shared between workers."""
    monkeypatch.delenv("FEDBERRY_TOKEN", raising=False)
    model = [np.ones((8, 4), np.float32)]
    handle = mtls_chief(pki, model)
    handle.tcp.options.bind_worker_id = False  # read per connection, at its TLS handshake
    try:
        with mtls_worker(pki, handle, pki.clients["w1"], worker_id="anyone") as w:
            got = w.sync([m * 3 for m in w.join(model)], 1)
            assert w.done and np.array_equal(got[0], model[0] * 3)
        assert handle.wait(10)
    finally:
        handle.stop()
