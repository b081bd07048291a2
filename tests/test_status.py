"""The chief's status server without a browser: /metrics against metrics.jsonl, /api/status,
who may read it beyond loopback, and the bounds of what it keeps."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("prometheus_client", reason="the status server needs fedberry[status]")
from prometheus_client.parser import text_string_to_metric_families  # noqa: E402

import fedberry  # noqa: E402
from fedberry.chief import metrics as metrics_io  # noqa: E402
from fedberry.chief.events import Refused, RoundDone, WorkerJoined, WorkerLeft  # noqa: E402
from fedberry.errors import FederationError  # noqa: E402
from fedberry.serve import serve  # noqa: E402
from fedberry.status import StatusBoard  # noqa: E402
from fedberry.transports.tcp.worker import agent  # noqa: E402

TOKEN = "status-test-token"  # the workers' token
READER = "status-reader-token"  # the status page's read-only token


def _get(url: str, token: str | None = None) -> tuple[int, bytes]:
    req = urllib.request.Request(url)
    if token is not None:
        req.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def _samples(text: str) -> dict[str, float]:
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            labels = ",".join(f"{k}={v}" for k, v in sorted(s.labels.items()))
            out[s.name + (f"{{{labels}}}" if labels else "")] = s.value
    return out


def _train(url: str, worker_id: str, rounds: int, token: str) -> None:
    w = fedberry.Worker(chief=url, worker_id=worker_id, token=token)
    arrays = [np.zeros(1000, np.float32)]
    for r in range(rounds):
        arrays = w.sync([a + 1.0 for a in arrays], 10 + r, metrics={"loss": 1.0 / (r + 1)})
    w.close()


def test_metrics_agree_with_metrics_jsonl(tmp_path: Path) -> None:
    rounds = 4
    handle = serve("127.0.0.1:0", workers=2, rounds=rounds, status="127.0.0.1:0", token=TOKEN,
                   out_dir=str(tmp_path), evaluate=lambda a: {"accuracy": float(a[0][0]) / 10,
                                                              "loss": 2.0})
    with handle:
        base = handle.status.url
        # A worker with the wrong token is refused: counted by reason, and listed as an event.
        with pytest.raises(FederationError):
            fedberry.Worker(chief=handle.url, worker_id="intruder", token="wrong").sync(
                [np.zeros(1000, np.float32)], 1)
        threads = [threading.Thread(target=_train, args=(handle.url, f"w{i}", rounds, TOKEN))
                   for i in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert handle.wait(30)
        lines = metrics_io.read(tmp_path / "metrics.jsonl")
        assert len(lines) == rounds

        # Loopback: no token needed to read, even though the chief has one.
        status, body = _get(base + "metrics")
        assert status == 200
        m = _samples(body.decode())
        assert m["fedberry_rounds_total"] == len(lines)
        assert m["fedberry_bytes_up_total"] == sum(r["bytes_up"] for r in lines) > 0
        assert m["fedberry_bytes_down_total"] == sum(r["bytes_down"] for r in lines) > 0
        assert m["fedberry_round_duration_seconds_count"] == len(lines)
        assert m["fedberry_round_duration_seconds_sum"] == pytest.approx(lines[-1]["wall_s"])
        assert m["fedberry_test_accuracy"] == lines[-1]["test_accuracy"]
        assert m["fedberry_refusals_total{reason=auth_failed}"] == 1
        assert m["fedberry_connected_workers"] == 0  # both have left
        assert m["fedberry_chief_memory_bytes"] > 1 << 20

        status, body = _get(base + "api/status")
        s = json.loads(body)
        assert (s["round"], s["rounds"], s["finished"]) == (rounds, rounds, True)
        assert [h["round"] for h in s["history"]] == [r["round"] for r in lines]
        assert [h["test_accuracy"] for h in s["history"]] == [r["test_accuracy"] for r in lines]
        rows = {w["worker_id"]: w for w in s["workers"]}
        assert set(rows) == {"w0", "w1"}  # the intruder never joined
        for row in rows.values():
            assert (row["state"], row["rounds"], row["codec"]) == ("left", rounds, "none")
            assert row["metrics"] == {"loss": 1.0 / rounds}
            assert row["version"] == agent()  # as its HELLO said
            assert row["bytes_up"] > 4000 * rounds and row["bytes_down"] > 4000 * rounds
        refused = [e for e in s["events"] if e["kind"] == "refused"]
        assert len(refused) == 1 and refused[0]["worker_id"] == "intruder"
        assert "auth_failed" in refused[0]["text"]
        # ?since=K: only the rounds after K (what the page asks for once it has them).
        _, body = _get(base + f"api/status?since={rounds - 1}")
        assert [h["round"] for h in json.loads(body)["history"]] == [rounds]
    assert handle.status is not None


def test_beyond_loopback_without_a_status_token_is_refused(tmp_path: Path,
                                                           monkeypatch: pytest.MonkeyPatch
                                                           ) -> None:
    monkeypatch.delenv("FEDBERRY_STATUS_TOKEN", raising=False)
    out = tmp_path / "out"
    # The workers' token does not open the page: the page needs a read-only token of its own.
    for token in (None, TOKEN):
        with pytest.raises(ValueError, match="refusing to serve the status page on 0.0.0.0 "
                                             "without a status token: .* give --status-token"):
            serve("127.0.0.1:0", status="0.0.0.0:0", token=token, out_dir=str(out))
    with pytest.raises(ValueError, match="status token equal to the workers' token"):
        serve("127.0.0.1:0", status="0.0.0.0:0", token=TOKEN, status_token=TOKEN,
              out_dir=str(out))
    assert not out.exists()  # refused before anything was made
    with pytest.raises(ValueError, match="over plain HTTP: the bearer token would cross"):
        serve("127.0.0.1:0", status="0.0.0.0:0", token=TOKEN, status_token=READER,
              out_dir=str(out))


def test_beyond_loopback_the_status_token_is_needed_as_a_bearer_header(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    token_file = tmp_path / "reader"
    token_file.write_text(READER + "\n")
    with serve("127.0.0.1:0", status="0.0.0.0:0", token=TOKEN, status_token_file=str(token_file),
               insecure=True) as handle:
        port = handle.status.address[1]
        base = f"http://127.0.0.1:{port}/"
        for path in ("metrics", "api/status"):
            assert _get(base + path)[0] == 401
            assert _get(base + path, token="not-it")[0] == 401
            assert _get(base + path, token=TOKEN)[0] == 401  # the workers' token reads nothing
            assert _get(base + path, token=READER)[0] == 200
        status, page = _get(base)  # the page is a shell with no data: it asks with the token
        assert status == 200 and b"#token=" in page
        # ... and the reader's token joins nothing.
        with pytest.raises(FederationError):
            fedberry.Worker(chief=handle.url, worker_id="reader", token=READER).sync(
                [np.zeros(4, np.float32)], 1)
    monkeypatch.setenv("FEDBERRY_STATUS_TOKEN", READER)  # or from the environment
    with serve("127.0.0.1:0", status="0.0.0.0:0", token=TOKEN, insecure=True) as handle:
        url = f"http://127.0.0.1:{handle.status.address[1]}/api/status"
        assert _get(url, token=READER)[0] == 200 and _get(url, token=TOKEN)[0] == 401


def test_beyond_loopback_over_tls(tmp_path: Path) -> None:
    pytest.importorskip("cryptography", reason="making certificates needs fedberry[tls]")
    import ssl

    from fedberry import certs

    ca, ca_key = certs.create_ca(tmp_path)
    cert, key = certs.create_chief_cert(tmp_path, ca, ca_key, ["127.0.0.1"])
    with serve("127.0.0.1:0", status="0.0.0.0:0", token=TOKEN, status_token=READER,
               tls_cert=str(cert), tls_key=str(key)) as handle:
        assert handle.status.url.startswith("https://")
        url = f"https://127.0.0.1:{handle.status.address[1]}/api/status"
        ctx = ssl.create_default_context(cafile=str(ca))
        req = urllib.request.Request(url, headers={"Authorization": f"Bearer {READER}"})
        with urllib.request.urlopen(req, timeout=10, context=ctx) as r:
            assert json.loads(r.read())["round"] == 0
        with pytest.raises(urllib.error.HTTPError) as exc:
            urllib.request.urlopen(url, timeout=10, context=ctx)
        assert exc.value.code == 401


def test_the_command_refuses_a_status_address_beyond_loopback_without_a_status_token(
        tmp_path: Path) -> None:
    import os

    env = {k: v for k, v in os.environ.items() if k != "FEDBERRY_STATUS_TOKEN"}
    out = subprocess.run([sys.executable, "-m", "fedberry", "chief", "--listen", "127.0.0.1:0",
                          "--workers", "1", "--model", "none", "--out", str(tmp_path / "o"),
                          "--token", TOKEN, "--status", "0.0.0.0:0"], capture_output=True,
                         text=True, timeout=60, env=env)
    assert out.returncode == 2
    assert out.stderr.strip().splitlines()[-1].startswith(
        "fedberry chief: error: refusing to serve the status page on 0.0.0.0 without a status "
        "token")


def test_hellos_agent_is_optional_and_bounded() -> None:
    from fedberry.protocol.frames import ProtocolError
    from fedberry.protocol.limits import MAX_AGENT
    from fedberry.protocol.messages import Hello

    assert agent().startswith("fedberry/") and agent().endswith(sys.version.split()[0])
    assert "agent" not in Hello("w1").meta()  # a worker that does not say: the same HELLO
    assert Hello.from_meta({"worker_id": "w1", "nonce": "0" * 64}, None).agent == ""
    for bad in ("x" * (MAX_AGENT + 1), "line\nbreak", 7):
        with pytest.raises(ProtocolError, match="agent must be at most"):
            Hello("w1", agent=bad)


def test_the_board_keeps_bounded_tables() -> None:
    board = StatusBoard(rounds=None, max_workers=50, max_events=20, max_history=30)
    for i in range(500):
        board(WorkerJoined(f"w{i}", "10.0.0.1", 0))
        board(WorkerLeft(f"w{i}", lost=i % 2 == 0))
        board(Refused("busy", "the chief has too many connections", "", "10.0.0.2"))
    for r in range(1, 101):
        board(RoundDone({"round": r, "wall_s": float(r), "bytes_up": 1, "bytes_down": 1}))
    s = board.snapshot()
    assert len(s["workers"]) == 50 and len(s["events"]) == 20 and len(s["history"]) == 30
    assert {w["worker_id"] for w in s["workers"]} == {f"w{i}" for i in range(450, 500)}
    assert s["history"][-1]["round"] == 100 and s["history"][-1]["duration_s"] == 1.0
    assert s["refusals"] == {"busy": 500}
    # Connected workers are never dropped from the table to make room: they are counted.
    full = StatusBoard(max_workers=3)
    for i in range(5):
        full(WorkerJoined(f"w{i}", "10.0.0.1", 0))
    assert len(full.snapshot()["workers"]) == 3 and full.connected() == 5


def test_requests_at_once_are_capped_and_slots_come_back() -> None:
    import http.client
    import socket
    import time

    from fedberry.status.server import MAX_REQUESTS

    with serve("127.0.0.1:0", status="127.0.0.1:0") as handle:
        host, port = handle.status.address
        idle = [socket.create_connection((host, port)) for _ in range(MAX_REQUESTS)]
        try:
            time.sleep(0.5)  # accepted, each holding a slot while it says nothing
            with pytest.raises((urllib.error.URLError, ConnectionError,
                                http.client.RemoteDisconnected)):
                urllib.request.urlopen(handle.status.url + "api/status", timeout=5).read()
        finally:
            for s in idle:
                s.close()
        deadline = time.monotonic() + 5
        while True:  # the slots are back as soon as the handlers see the closes
            try:
                assert _get(handle.status.url + "api/status")[0] == 200
                break
            except (urllib.error.URLError, ConnectionError, http.client.RemoteDisconnected):
                assert time.monotonic() < deadline
                time.sleep(0.1)


def test_nonfinite_numbers_reach_the_page_as_null() -> None:
    from fedberry.chief.events import UpdateIn

    board = StatusBoard(rounds=3)
    board(WorkerJoined("w1", "10.0.0.1", 0))
    board(UpdateIn("w1", 0, 10, {"loss": float("inf")}, "none"))
    board(RoundDone({"round": 1, "wall_s": 1.0, "test_loss": float("nan")}, ("w1",)))
    text = json.dumps(board.snapshot(), allow_nan=False)  # strict JSON, as JSON.parse wants
    s = json.loads(text)
    assert s["history"][0]["test_loss"] is None and s["workers"][0]["metrics"] == {"loss": None}


def test_under_dp_the_board_shows_no_per_worker_metrics() -> None:
    """A worker's train loss is not covered by DP's guarantee: a --dp chief's board drops it."""
    from fedberry.chief.events import UpdateIn

    for private, want in ((False, {"loss": 0.5}), (True, {})):
        board = StatusBoard(rounds=3, private=private)
        board(WorkerJoined("w1", "10.0.0.1", 0))
        board(UpdateIn("w1", 0, 10, {"loss": 0.5}, "none"))
        assert board.snapshot()["workers"][0]["metrics"] == want
