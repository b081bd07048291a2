"""secagg_round_time's shape and sanity: the SecAgg+ parameters given to Flower, the counting
relay's per-client bytes, and fedberry's columns measured by real processes on loopback.
Speed is the benchmark's business, never checked here."""

from __future__ import annotations

import os
import socket
import subprocess
import threading
from pathlib import Path

import pytest

from fedberry.bench import secagg_round_time as srt

pytestmark = pytest.mark.heavy


def test_flower_gets_fedberrys_graph() -> None:
    # k = 2 ceil(log2 n) capped at n - 1, t = floor((k+1)/2) + 1; Flower counts the client's
    # own share in num_shares.
    assert srt.secagg_graph(8) == {"neighbors": 6, "threshold": 4, "flower_num_shares": 7,
                                   "flower_reconstruction_threshold": 4}
    assert srt.secagg_graph(100) == {"neighbors": 14, "threshold": 8, "flower_num_shares": 15,
                                     "flower_reconstruction_threshold": 8}


def test_relay_counts_each_clients_bytes_both_ways() -> None:
    upstream = socket.create_server(("127.0.0.1", 0))

    def echo() -> None:
        for _ in range(2):
            c, _ = upstream.accept()
            with c:
                while data := c.recv(65536):
                    c.sendall(data[: len(data) // 2])  # half comes back

    threading.Thread(target=echo, daemon=True).start()
    relay = srt.CountingRelay(upstream.getsockname(), 2)
    got = [0, 0]
    try:
        for i, size in ((0, 300_000), (1, 40_000)):
            with socket.create_connection(("127.0.0.1", relay.ports[i])) as s:
                s.sendall(b"x" * size)
                s.shutdown(socket.SHUT_WR)
                while data := s.recv(65536):
                    got[i] += len(data)
        up, down = relay.snapshot()
        assert up == [300_000, 40_000]
        assert down == got and 0 < got[1] < got[0] <= 150_000
    finally:
        relay.close()
        upstream.close()


def test_fedberry_columns_shape() -> None:
    params, n = 20_000, 3
    plain = srt.run_fedberry(params, n, rounds=2, warmup=1, secure=False, procs=2)
    assert "error" not in plain, plain
    assert plain["round_s"] > 0 and plain["peak_rss_mb"] > 0
    # Every client sends its float32 update and gets the model back, plus framing.
    for key in ("up", "down", "chief_up_per_client", "chief_down_per_client"):
        assert 4 * params <= plain[key] < 1.2 * 4 * params + 4096, (key, plain)
    secure = srt.run_fedberry(params, n, rounds=2, warmup=1, secure=True, procs=2)
    assert "error" not in secure, secure
    assert secure["round_s"] > 0 and secure["peak_rss_mb"] > 0
    # A masked vector of 16 or 32 bits a parameter up, the float32 model down, and the key
    # exchange's few kB.
    assert 2 * params <= secure["up"] < 1.2 * 4 * params + 16384, secure
    assert 4 * params <= secure["down"] < 1.2 * 4 * params + 16384, secure


def test_flower_app_loads_and_takes_the_mapping() -> None:
    """The Flower App imports in the Flower Python, and SecAggPlusWorkflow accepts the
    num_shares and reconstruction_threshold the benchmark gives it for 8 and 100 clients."""
    from fedberry.bench import flower_python

    python, why = flower_python.find()
    if python is None:
        pytest.skip(why)
    g8, g100 = srt.secagg_graph(8), srt.secagg_graph(100)
    code = ("from fedberry.bench.flower_secagg_app import server_app, client_app\n"
            "from flwr.server.workflow import SecAggPlusWorkflow\n"
            f"SecAggPlusWorkflow({g8['flower_num_shares']}, "
            f"{g8['flower_reconstruction_threshold']})\n"
            f"SecAggPlusWorkflow({g100['flower_num_shares']}, "
            f"{g100['flower_reconstruction_threshold']})\n"
            "print('ok')\n")
    src = str(Path(srt.__file__).resolve().parents[2])
    out = subprocess.run([python, "-c", code], capture_output=True, text=True, timeout=120,
                         env={**os.environ, "PYTHONPATH": src})
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-2000:]
