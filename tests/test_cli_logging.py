"""What the chief and the workers say while they run, and the CLI's front door (issue 12, items
5 and 6), over real sockets and, where the CLI itself is the subject, real processes.

* The chief logs listening, each worker joining, lost (with why) and back, and while a round
  waits, who it waits for; the worker logs joined, each round, waiting and reconnecting.
* ``-v``/``-q``/``--log-file`` work after the subcommand; ``--help`` shows the defaults and
  says what no ``--rounds`` means.
* Every file option's error names the file.
* TLS mistakes name the fix on the worker's side (``--ca``, ``--server-hostname``); a model
  mismatch names ``--model none``; ``import fedberry.keras`` without a backend names
  ``KERAS_BACKEND``; sizes take one rule in the CLI and in ``serve()``.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import signal
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
from helpers import fedberry_env
from robustness_harness import TOKEN, free_port, wait_until

from fedberry import Worker
from fedberry.chief.buffers import parse_size
from fedberry.cli import build_parser, verbosity
from fedberry.errors import FederationError, ModelMismatchError
from fedberry.serve import serve

MODEL = [np.zeros((2, 3), np.float32), np.zeros(4, np.float32)]


def fedberry(*args: str, timeout: float = 60, **env: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "fedberry", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=fedberry_env(**env))


def error_line(proc: subprocess.Popen, command: str) -> str:
    """The one error line of a command that refused to start (no traceback)."""
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 2, (out, err)
    assert "Traceback" not in err, err
    lines = [line for line in err.splitlines() if line.startswith(f"fedberry {command}: error:")]
    assert len(lines) == 1, err
    return lines[0]


def test_the_chief_and_the_workers_say_what_is_happening(
        caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="fedberry")
    text = lambda: "\n".join(r.getMessage() for r in caplog.records)  # noqa: E731
    with serve("127.0.0.1:0", workers=2, initial=MODEL, token=TOKEN) as handle:
        handle.server.progress_every = 0.2  # the line comes at the next tick, within a second
        port = handle.address[1]
        w0 = Worker(handle.url, token=TOKEN, worker_id="w0")
        w1 = Worker(handle.url, token=TOKEN, worker_id="w1")
        try:
            w0.join(MODEL)
            w1.join(MODEL)
            w0.session.waiting_note_every = 0.2
            done = threading.Event()
            threading.Thread(target=lambda: (w0.sync(MODEL, 1), done.set()), daemon=True).start()
            wait_until(lambda: "round 1: 1 of 2 updates in, waiting for w1 (no deadline"
                       in text(), 10, "the chief's progress line", logs=text)
            wait_until(lambda: "worker w0: waiting for the chief to close round 1" in text(),
                       10, "the worker's waiting line", logs=text)
            w1.session.drop_connection()  # a link that breaks: w1 is lost, the round closes
            assert done.wait(10), text()
            w1.sync(MODEL, 1)  # w1 reconnects with the same id
            wait_until(lambda: "worker w1 is back from 127.0.0.1:" in text(), 10, "back",
                       logs=text)
        finally:
            w0.close()
            w1.close()
        wait_until(lambda: "worker w0 left" in text(), 10, "w0 leaving", logs=text)
    log = text()
    assert f"listening on 127.0.0.1:{port} (plain TCP, a token): workers on this machine " \
           f"dial tcp://127.0.0.1:{port}" in log
    assert "worker w0 joined from 127.0.0.1:" in log and "(1 of 2 workers)" in log
    assert "round 1 starts: 2 workers are in" in log
    assert "worker w1 lost: it closed the connection without saying goodbye; 1 worker still " \
           "in" in log or "worker w1 lost: its connection broke" in log, log
    assert f"worker w0 joined tcp://127.0.0.1:{port} at round 1 (model: 2 tensors, 40 B)" in log
    assert "worker w0: round 1 done in " in log
    assert "worker w1: round 1 done in " in log  # its stale update was answered with round 1
    # not one line per update: the progress line is bounded by its interval
    assert log.count("round 1: 1 of 2 updates in") <= 60, log


def test_a_reconnecting_worker_says_so(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="fedberry")
    port = free_port()
    with Worker(f"tcp://127.0.0.1:{port}", token=TOKEN, worker_id="early",
                connect_timeout=1.5) as w:
        with pytest.raises(FederationError, match="gave up after 2 s"):
            w.join(MODEL)
    assert "worker early: connect failed" in caplog.text
    assert "reconnecting in " in caplog.text and "(attempt 2; giving up 2 s from the first)" \
        in caplog.text


def test_log_options_parse_before_and_after_the_subcommand() -> None:
    args = build_parser().parse_args(["-v", "chief", "--workers", "1", "-q", "-q",
                                      "--log-file", "x.log"])
    assert verbosity(args) == -1 and args.log_file == "x.log"
    args = build_parser().parse_args(["worker", "--chief", "tcp://h:1", "-vv"])
    assert verbosity(args) == 2
    args = build_parser().parse_args(["--log-file", "y.log", "demo"])
    assert verbosity(args) == 0 and args.log_file0 == "y.log"
    args = build_parser().parse_args(["bench", "--quiet", "-q"])  # bench's own --quiet stays
    assert args.quiet


@pytest.mark.heavy
def test_log_options_work_after_the_subcommand(tmp_path: Path) -> None:
    # Real chiefs: the INFO lines by default, in --log-file too; none with -q.
    logged, port, quiet_port = tmp_path / "chief.log", free_port(), free_port()
    chief = fedberry("chief", "--listen", f"127.0.0.1:{port}", "--workers", "1", "--rounds",
                     "1", "--model", "none", "--out", str(tmp_path / "a"),
                     "--log-file", str(logged), "--token", TOKEN)
    quiet = fedberry("chief", "--listen", f"127.0.0.1:{quiet_port}", "--workers", "1",
                     "--rounds", "1", "--model", "none", "--out", str(tmp_path / "b"), "-q",
                     "--token", TOKEN)
    try:
        for p in (port, quiet_port):
            with Worker(f"tcp://127.0.0.1:{p}", token=TOKEN, worker_id="w",
                        connect_timeout=30) as w:
                w.sync(w.join(MODEL), 1)
        out, err = chief.communicate(timeout=30)
        _, quiet_err = quiet.communicate(timeout=30)
    finally:
        for p in (chief, quiet):
            if p.poll() is None:
                p.kill()
                p.communicate()
    assert chief.returncode == 0 and quiet.returncode == 0, (err, quiet_err)
    for text in (err, logged.read_text()):
        assert f"fedberry.tcp: listening on 127.0.0.1:{port}" in text, text
        assert "fedberry.chief: worker w joined from 127.0.0.1:" in text, text
    assert "listening on" not in quiet_err and "joined" not in quiet_err, quiet_err


def test_help_shows_defaults_and_what_no_rounds_means(capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit):
        build_parser().parse_args(["chief", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "(default: 0.0.0.0:7777)" in text and "(default: fedavg)" in text
    assert "(default: 64MiB)" in text and "(default: 256)" in text
    assert "the chief runs until stopped: Ctrl-C or SIGTERM ends the run" in text
    assert "-v, --verbose" in text and "-q, --quiet" in text and "--log-file PATH" in text
    assert "(default: None)" not in text


FILE_OPTIONS = [
    ("worker", "--ca"), ("worker", "--cert"), ("worker", "--token-file"),
    ("chief", "--tls-cert"), ("chief", "--client-ca"), ("chief", "--token-file"),
    ("chief", "--checkpoint"), ("chief", "--log-file"), ("certs", "--log-file"),
]


@pytest.mark.heavy
def test_each_file_option_names_its_file(tmp_path: Path) -> None:
    base = {"worker": ["--chief", "tcp://127.0.0.1:1"],
            "chief": ["--listen", "127.0.0.1:0", "--workers", "1", "--model", "none",
                      "--out", str(tmp_path / "run")],
            "certs": ["--out", str(tmp_path / "certs"), "--name", "localhost"]}
    extra = {"--checkpoint": ["--resume"], "--client-ca": ["--tls-cert", __file__,
                                                           "--tls-key", __file__]}
    runs = []
    for command, option in FILE_OPTIONS:  # all at once: each is a Python start-up
        missing = str(tmp_path / "ca.pm")
        if option == "--log-file":
            missing = str(tmp_path / "no-such-dir" / "chief.log")
        proc = fedberry(command, *base[command], *extra.get(option, []), option, missing)
        runs.append((command, option, missing, proc))
    for command, option, missing, proc in runs:
        line = error_line(proc, command)
        assert missing in line, (option, line)
        if option != "--checkpoint":
            assert line.startswith(f"fedberry {command}: error: {option} {missing}: no such "
                                   "file"), line
    # The data directory: the loader's sentence names it (the CLI passes it on as it is).
    from fedberry.data.fashion_mnist import load_fashion_mnist

    with pytest.raises(Exception, match=f"Fashion-MNIST not found in {tmp_path / 'none'}"):
        load_fashion_mnist(tmp_path / "none")


def test_a_pem_file_that_is_not_one_is_named(tmp_path: Path) -> None:
    bad = tmp_path / "ca.pem"
    bad.write_text("not a certificate\n")
    with pytest.raises(ValueError, match=f"{bad}: cannot load the CA certificate"):
        Worker("tcp://127.0.0.1:1", ca=str(bad))


def test_a_plain_worker_at_a_tls_chief_is_told_to_pass_ca_not_left_to_time_out(
        tmp_path: Path) -> None:
    pytest.importorskip("cryptography", reason="making certificates needs fedberry[tls]")
    from fedberry import certs

    ca, ca_key = certs.create_ca(tmp_path)
    cert, key = certs.create_chief_cert(tmp_path, ca, ca_key, ["127.0.0.1"])
    with serve("127.0.0.1:0", workers=1, initial=MODEL, tls_cert=str(cert),
               tls_key=str(key)) as handle:
        with Worker(handle.url, worker_id="plain", connect_timeout=60) as w:
            with pytest.raises(FederationError) as info:
                w.join(MODEL)
    # The sentence, not the connect budget running out ("gave up after 60 s").
    assert "speaks TLS" in str(info.value), info.value
    assert "give this worker --ca (Python: ca=)" in str(info.value), info.value
    assert "gave up" not in str(info.value)
    assert w.session.reconnects == 0  # at the first connection, not after retries


def test_a_hostname_mismatch_names_server_hostname(tmp_path: Path) -> None:
    pytest.importorskip("cryptography", reason="making certificates needs fedberry[tls]")
    from fedberry import certs

    ca, ca_key = certs.create_ca(tmp_path)
    cert, key = certs.create_chief_cert(tmp_path, ca, ca_key, ["127.0.0.1"])
    with serve("127.0.0.1:0", workers=1, rounds=1, initial=MODEL, tls_cert=str(cert),
               tls_key=str(key)) as handle:
        port = handle.address[1]
        with Worker(f"tcp://localhost:{port}", ca=str(ca), worker_id="w") as w:
            with pytest.raises(FederationError) as info:
                w.join(MODEL)
        assert "the certificate is for 127.0.0.1, you dialed localhost" in str(info.value)
        assert "pass --server-hostname 127.0.0.1" in str(info.value), info.value
        # ... and the fix it names works.
        with Worker(f"tcp://localhost:{port}", ca=str(ca), worker_id="w",
                    server_hostname="127.0.0.1") as w:
            w.sync(w.join(MODEL), 1)
            assert w.done


def test_a_model_mismatch_names_model_none() -> None:
    with serve("127.0.0.1:0", workers=1, initial=MODEL, token=TOKEN) as handle:
        with Worker(handle.url, token=TOKEN, worker_id="mine") as w:
            with pytest.raises(ModelMismatchError) as info:
                w.join(MODEL[:1])
    text = str(info.value)
    assert "your model does not match the federation's" in text
    assert "start it with --model none" in text and "--framework" in text, text


def test_import_keras_without_a_backend_says_to_set_one(tmp_path: Path) -> None:
    if importlib.util.find_spec("keras") is None:
        pytest.skip("needs the keras extra")
    if importlib.util.find_spec("tensorflow") is not None:
        pytest.skip("tensorflow is installed: Keras's default backend works here")
    home = tmp_path / "keras-home"
    home.mkdir()
    (home / "keras.json").write_text(json.dumps({"backend": "tensorflow"}))
    env = {k: v for k, v in fedberry_env().items() if k != "KERAS_BACKEND"}
    env["KERAS_HOME"] = str(home)
    proc = subprocess.run([sys.executable, "-c", "import fedberry.keras"], capture_output=True,
                          text=True, env=env, timeout=120)
    assert proc.returncode != 0
    last = proc.stderr.strip().splitlines()[-1]
    assert last == ("ImportError: Keras is set to its tensorflow backend, which is not "
                    "installed: set KERAS_BACKEND=torch or KERAS_BACKEND=jax (whichever is "
                    "installed) before Python starts, or before the first 'import keras'"), \
        proc.stderr


def test_sizes_take_one_rule_in_the_cli_and_in_serve() -> None:
    assert parse_size("64MiB") == 64 << 20 and parse_size("1GiB") == 1 << 30
    assert parse_size("1.5GB") == 1_500_000_000 and parse_size(4096) == 4096
    for bad in ("64 Mo", "", "0"):
        with pytest.raises(ValueError):
            parse_size(bad)
    with serve("127.0.0.1:0", workers=1, initial=MODEL, token=TOKEN,
               receive_memory="3MiB") as handle:
        assert handle.tcp.budget.max_bytes == 3 << 20
    args = build_parser().parse_args(["chief", "--workers", "1", "--receive-memory", "1GiB"])
    assert args.receive_memory == "1GiB"
    with pytest.raises(SystemExit):
        build_parser().parse_args(["chief", "--workers", "1", "--receive-memory", "lots"])


def test_certs_suggests_a_worker_command_that_exists(tmp_path: Path,
                                                     capsys: pytest.CaptureFixture) -> None:
    pytest.importorskip("cryptography", reason="making certificates needs fedberry[tls]")
    from fedberry.certs.cli import run_certs

    args = build_parser().parse_args(["certs", "--out", str(tmp_path), "--name", "10.0.0.5"])
    assert run_certs(args) == 0
    suggested = [line.split()[1] for line in capsys.readouterr().out.splitlines()
                 if line.strip().startswith("fedberry ")]
    assert suggested == ["chief", "worker"], suggested
    commands = build_parser()._subparsers._group_actions[0].choices  # type: ignore[union-attr]
    assert all(c in commands for c in suggested)


@pytest.mark.heavy
def test_sigterm_stops_a_chief_without_rounds_and_tells_its_workers(tmp_path: Path) -> None:
    port = free_port()
    chief = fedberry("chief", "--listen", f"127.0.0.1:{port}", "--workers", "1", "--model",
                     "none", "--out", str(tmp_path / "run"), "--token", TOKEN)
    try:
        with Worker(f"tcp://127.0.0.1:{port}", token=TOKEN, worker_id="w",
                    connect_timeout=30) as w:
            weights = w.sync(w.join(MODEL), 1)
            assert not w.done  # no --rounds: it would go on
            chief.send_signal(signal.SIGTERM)
            _, err = chief.communicate(timeout=30)
            with pytest.raises(FederationError, match="the chief has finished"):
                w.sync(weights, 1)  # told the run is over, not left retrying
    finally:
        if chief.poll() is None:
            chief.kill()
            chief.communicate()
    assert chief.returncode == 130, err
    assert "fedberry chief: stopped" in err and "Traceback" not in err, err


def test_bench_set_lists_the_settings_it_takes() -> None:
    from fedberry.bench.cli import apply_overrides
    from fedberry.bench.config import BenchConfig

    with pytest.raises(ValueError, match="no setting 'lrr'; the settings are .*\\blr\\b"):
        apply_overrides(BenchConfig(), ["fedavg.lrr=0.1"])


def test_a_flood_of_refused_connections_is_a_few_lines(caplog: pytest.LogCaptureFixture) -> None:
    from robustness_harness import RawClient

    caplog.set_level(logging.INFO, logger="fedberry")
    with serve("127.0.0.1:0", workers=1, initial=MODEL, token=TOKEN) as handle:
        for _ in range(40):
            with RawClient(handle.address[1]) as raw:
                raw.send(b"GET / HTTP/1.1\r\nHost: chief\r\n\r\n")
                assert raw.answer() is not None  # each is told why ...
    lines = [r.getMessage() for r in caplog.records if "magic" in r.getMessage()]
    assert 1 <= len(lines) <= 3, lines  # ... and the log says it once a second
