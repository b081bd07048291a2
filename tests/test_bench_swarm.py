"""The swarm benchmark (bench/swarm.py) in miniature: many protocol-level workers in two
processes against one chief, full rounds, and the chief's figures reported. Shape, not speed."""

from __future__ import annotations

import time

import pytest

from fedberry.bench.swarm import model, raise_nofile, run, source_address


def test_model_and_addresses() -> None:
    arrays = model(10, 3)
    assert [a.size for a in arrays] == [4, 3, 3] and all(a.dtype == "float32" for a in arrays)
    assert source_address(0) == "127.1.0.1" and source_address(250) == "127.1.1.1"
    soft, hard = raise_nofile()
    assert soft == hard


@pytest.mark.heavy
def test_swarm_runs_full_rounds() -> None:
    res = run(workers=24, params=5000, rounds=3, procs=2, tensors=2, timeout_s=120, quiet=True)
    assert res["errors"] == {}
    assert res["joined"] == 24
    assert res["full_rounds"] == res["rounds_closed"] == 3
    assert len(res["round_s"]) == 2 and all(t > 0 for t in res["round_s"])
    assert res["socket_floor_s"] > 0 and res["round_over_floor"] > 0
    # One connection per worker at the chief, and no more: nothing leaks between rounds.
    assert all(res["chief_fds_start"] + 24 <= f <= res["chief_fds_start"] + 24 + 8
               for f in res["chief_fds"])
    assert res["chief_cpu_ms_per_update"] > 0


@pytest.mark.parametrize("how", ["listen_options", "serve"])
def test_chief_receive_buffer_bounds_each_connection(how: str) -> None:
    """ListenOptions.receive_buffer (found by the swarm: waiting updates filled the chief's
    autotuned socket buffers) sets SO_RCVBUF on every accepted connection; serve()'s
    receive_buffer (and --receive-buffer) takes a size with a unit."""
    import socket
    import threading

    import numpy as np

    from fedberry.serve import serve
    from fedberry.transports.tcp import ListenOptions
    from fedberry.worker import Worker

    init = [np.zeros(1000, np.float32)]
    opts: dict = ({"listen_options": ListenOptions(receive_buffer=16384)}
                  if how == "listen_options" else {"receive_buffer": "16KiB"})
    handle = serve("127.0.0.1:0", workers=1, rounds=1, initial=init, token="t" * 32,
                   finish_grace=0.5, **opts)
    sizes: list[int] = []
    joined = threading.Event()

    def work() -> None:
        with Worker(handle.url, token="t" * 32, worker_id="w") as w:
            a = w.join(init)
            joined.set()
            time.sleep(0.2)
            w.sync([a[0] + 1], 1.0)

    t = threading.Thread(target=work)
    t.start()
    try:
        assert joined.wait(30)
        for c in list(handle.tcp.connections):
            sock = c.transport.get_extra_info("socket")
            sizes.append(sock.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF))
    finally:
        t.join(30)
        handle.stop()
    # Linux reports twice what was set (its bookkeeping overhead); unset, it starts at
    # tcp_rmem[1] (128 KiB here) and grows.
    assert sizes and all(16384 <= s <= 2 * 16384 for s in sizes), sizes
