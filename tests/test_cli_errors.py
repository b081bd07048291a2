"""A sentence for every refusal (issue 11, item 4), through real processes and real sockets.

* An update of the wrong dtype: the chief refuses it naming the tensor and both dtypes, not a
  byte count; a real ``Worker`` refuses to send it, saying the same, before anything is sent.
* ``fedberry chief --out`` where nothing can be written: one sentence, exit 2, no traceback.
* ``fedberry chief --listen`` on a port that is taken: one sentence, exit 2, no traceback, and
  no metrics file left behind.
* A worker without ``--ca`` at a chief's TLS port: one sentence saying to pass ``--ca``.
"""

from __future__ import annotations

import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from helpers import fedberry_env
from robustness_harness import TOKEN, RawClient, free_port

from fedberry import Worker
from fedberry.protocol.frames import MsgType, encode, spec_of, spec_to_json
from fedberry.serve import serve

MODEL = [np.zeros((2, 3), np.float32), np.zeros(4, np.float32)]


def fedberry(*args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "fedberry", *args], capture_output=True,
                          text=True, timeout=timeout, env=fedberry_env())


def one_sentence(proc: subprocess.CompletedProcess, command: str) -> str:
    """The one error line of a command that refused to start, checked to be nothing more."""
    assert "Traceback" not in proc.stderr, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith(f"fedberry {command}: error: ")]
    assert len(errors) == 1, proc.stderr
    return errors[0]


def test_an_update_of_the_wrong_dtype_is_refused_naming_the_tensor(tmp_path: Path) -> None:
    with serve("127.0.0.1:0", workers=2, rounds=1, initial=MODEL, token=TOKEN) as handle:
        assert handle.address is not None
        port = handle.address[1]
        # The chief, through TCP: the frame is too big as well, but the sentence says why.
        with RawClient(port) as raw:
            welcome = raw.handshake(TOKEN, spec_to_json(spec_of(MODEL)))
            assert welcome.type == MsgType.WELCOME, welcome
            wrong = [MODEL[0], MODEL[1].astype(np.float64)]
            raw.send(encode(MsgType.UPDATE, {"round": 0, "num_samples": 1}, wrong).tobytes())
            err = raw.answer()
            assert err is not None and err.type == MsgType.ERROR, err
            assert err.meta["message"] == ("tensor 1 is float64[4], the federation's is "
                                           "float32[4]"), err.meta
        # A real worker says so itself and sends nothing.
        with Worker(handle.url, token=TOKEN, worker_id="w1") as w:
            w.join(MODEL)
            sent = w.bytes_sent
            with pytest.raises(ValueError) as info:
                w.sync([MODEL[0].astype(np.float64), MODEL[1]], 1)
            assert str(info.value).startswith(
                "refusing to send this update: tensor 0 is float64[2, 3], the federation's is "
                "float32[2, 3]"), info.value
            assert w.bytes_sent == sent


@pytest.mark.parametrize("where", ["proc", "file"])
def test_an_unwritable_out_is_one_sentence(tmp_path: Path, where: str) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    out = "/proc/fedberry-out" if where == "proc" else str(blocker / "out")
    proc = fedberry("chief", "--listen", "127.0.0.1:0", "--workers", "1", "--model", "none",
                    "--out", out)
    assert proc.returncode == 2, proc.stderr
    line = one_sentence(proc, "chief")
    assert f"cannot write to --out {out}" in line, line


def test_a_port_in_use_is_one_sentence_and_leaves_no_metrics(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        out = tmp_path / "run"
        proc = fedberry("chief", "--listen", f"127.0.0.1:{port}", "--workers", "1",
                        "--model", "none", "--out", str(out))
    assert proc.returncode == 2, proc.stderr
    line = one_sentence(proc, "chief")
    assert line.endswith(f"cannot listen on 127.0.0.1:{port}: address already in use "
                         "(another chief?)"), line
    assert not out.exists()


def test_other_start_up_refusals_are_one_sentence(tmp_path: Path) -> None:
    missing = str(tmp_path / "missing.pem")
    proc = fedberry("chief", "--listen", "127.0.0.1:0", "--workers", "1", "--model", "none",
                    "--out", str(tmp_path / "run"), "--tls-cert", missing, "--tls-key", missing)
    assert proc.returncode == 2, proc.stderr
    assert one_sentence(proc, "chief").endswith(f"--tls-cert {missing}: no such file")
    assert not (tmp_path / "run").exists()
    proc = fedberry("chief", "--listen", "nosuch.invalid:7000", "--workers", "1", "--model",
                    "none", "--out", str(tmp_path / "run"))
    assert proc.returncode == 2, proc.stderr
    assert "cannot listen on nosuch.invalid:7000: " in one_sentence(proc, "chief")
    assert not (tmp_path / "run").exists()


def test_a_plain_worker_at_a_tls_chief_is_told_to_pass_ca(tmp_path: Path) -> None:
    pytest.importorskip("cryptography", reason="making certificates needs fedberry[tls]")
    from fedberry import certs
    from fedberry.errors import FederationError

    ca, ca_key = certs.create_ca(tmp_path)
    cert, key = certs.create_chief_cert(tmp_path, ca, ca_key, ["127.0.0.1"])
    port = free_port()
    chief = subprocess.Popen(
        [sys.executable, "-m", "fedberry", "chief", "--listen", f"127.0.0.1:{port}",
         "--workers", "1", "--model", "none", "--out", str(tmp_path / "run"),
         "--tls-cert", str(cert), "--tls-key", str(key)],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=fedberry_env())
    try:
        with Worker(f"tcp://127.0.0.1:{port}", worker_id="plain", connect_timeout=30) as w:
            with pytest.raises(FederationError) as info:
                w.join(MODEL)
        # Said at the first attempt: the port answers a TLS handshake.
        assert str(info.value).startswith(
            f"the chief at 127.0.0.1:{port} speaks TLS (it closed this plain connection right "
            "after HELLO"), info.value
        assert "give this worker --ca" in str(info.value)
    finally:
        chief.terminate()
        _, err = chief.communicate(timeout=30)
    assert "a peer spoke plain TCP to the chief's TLS port" in err, err
    assert "Traceback" not in err, err


def test_secagg_refusals_are_one_sentence(tmp_path: Path) -> None:
    """--secagg: an unknown key is refused as the command line is read, 2 workers and MPI
    when the chief starts; each in one sentence, with no files left behind."""
    pytest.importorskip("cryptography", reason="the secagg extra")
    out = str(tmp_path / "run")
    proc = fedberry("chief", "--listen", "127.0.0.1:0", "--secagg", "treshold=3", "--out", out)
    assert proc.returncode == 2, proc.stderr
    assert "unknown secagg option 'treshold'" in proc.stderr and "Traceback" not in proc.stderr
    proc = fedberry("chief", "--listen", "127.0.0.1:0", "--workers", "2", "--model", "none",
                    "--secagg", "", "--out", out)
    assert proc.returncode == 2, proc.stderr
    assert "needs at least 3 workers" in one_sentence(proc, "chief")
    proc = fedberry("chief", "--listen", "mpi://", "--workers", "3", "--model", "none",
                    "--secagg", "", "--out", out)
    assert proc.returncode == 2, proc.stderr
    assert "not offered under MPI" in one_sentence(proc, "chief")
    assert not (tmp_path / "run").exists()
