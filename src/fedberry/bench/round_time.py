"""One round's wall time on loopback: fedberry's TCP chief against the floor of plain blocking
sockets moving the same bytes.

    python -m fedberry.bench.round_time                  # 1M and 10M params, 2 and 8 workers
    python -m fedberry.bench.round_time --params 1e6 --workers 2 --rounds 10

A round is: every worker sends its model, the chief has them all, every worker has the model back.
Workers do no compute, so the figure is pure communication + aggregation. Both sides run as
separate processes; the time is measured at the chief between consecutive round closes, after
warm-up rounds. The floor process only moves bytes (recv_into a preallocated buffer, sendall), so
the gap to it is what the protocol, asyncio, the NaN check and the weighted sum cost.
"""

from __future__ import annotations

import argparse
import json
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from fedberry.serve import serve
from fedberry.worker import Worker

TENSORS = 8  # a model is a handful of tensors, not one blob


def model(params: int, seed: int = 0) -> list[np.ndarray]:
    sizes = [params // TENSORS] * TENSORS
    sizes[-1] += params - sum(sizes)
    rng = np.random.default_rng(seed)
    return [rng.standard_normal(n).astype(np.float32) for n in sizes]


# -- fedberry ------------------------------------------------------------------------------------
def fedberry_worker(url: str, params: int, index: int) -> None:
    with Worker(url, worker_id=f"bench-{index}", token="bench") as w:
        arrays = w.join(model(params, index))
        while not w.done:
            arrays = w.sync(arrays, 1.0)


def run_fedberry(params: int, workers: int, rounds: int, warmup: int) -> float:
    handle = serve("127.0.0.1:0", workers=workers, rounds=warmup + rounds,
                   initial=model(params), token="bench", finish_grace=5)
    procs = [subprocess.Popen([sys.executable, "-m", "fedberry.bench.round_time", "_fb_worker",
                               handle.url, str(params), str(i)]) for i in range(workers)]
    try:
        if not handle.wait(600):
            raise RuntimeError("fedberry run timed out")
        walls = [r["wall_s"] for r in handle.metrics]
    finally:
        for p in procs:
            try:
                p.wait(30)
            except subprocess.TimeoutExpired:
                p.kill()
        handle.stop()
    return (walls[-1] - walls[warmup - 1]) / rounds


# -- the floor: plain blocking sockets -----------------------------------------------------------
def _recv_into(sock: socket.socket, buf: memoryview) -> None:
    while len(buf):
        n = sock.recv_into(buf)
        if n == 0:
            raise ConnectionError("peer closed")
        buf = buf[n:]


def floor_worker(port: int, params: int, rounds: int) -> None:
    buf = np.concatenate(model(params))
    view = memoryview(buf).cast("B")
    with socket.create_connection(("127.0.0.1", port)) as s:
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        for _ in range(rounds):
            s.sendall(view)
            _recv_into(s, view)


def floor_chief(port_file: str, params: int, workers: int, rounds: int, warmup: int) -> None:
    srv = socket.create_server(("127.0.0.1", 0))
    Path(port_file).write_text(str(srv.getsockname()[1]))
    conns = [srv.accept()[0] for _ in range(workers)]
    buf = memoryview(bytearray(4 * params))
    stamps = []
    for _ in range(warmup + rounds):
        for c in conns:  # one after another, like a single-threaded aggregator would
            _recv_into(c, buf)
        for c in conns:
            c.sendall(buf)
        stamps.append(time.perf_counter())
    print(json.dumps({"round_s": (stamps[-1] - stamps[warmup - 1]) / rounds}))


def run_floor(params: int, workers: int, rounds: int, warmup: int, tmp: Path) -> float:
    port_file = tmp / f"floor-port-{params}-{workers}"
    port_file.unlink(missing_ok=True)
    chief = subprocess.Popen([sys.executable, "-m", "fedberry.bench.round_time", "_floor_chief",
                              str(port_file), str(params), str(workers), str(rounds),
                              str(warmup)], stdout=subprocess.PIPE, text=True)
    for _ in range(200):
        if port_file.exists() and port_file.read_text():
            break
        time.sleep(0.05)
    port = port_file.read_text()
    procs = [subprocess.Popen([sys.executable, "-m", "fedberry.bench.round_time", "_floor_worker",
                               port, str(params), str(warmup + rounds)]) for _ in range(workers)]
    try:
        out, _ = chief.communicate(timeout=600)
    finally:
        for p in [*procs, chief]:
            if p.poll() is None:
                p.kill()
    return json.loads(out)["round_s"]


def add_grid_options(p: argparse.ArgumentParser) -> None:
    """The measurement grid shared by the round-time benchmarks (TCP here, MPI beside it)."""
    p.add_argument("--params", type=float, nargs="+", default=[1e6, 1e7])
    p.add_argument("--workers", type=int, nargs="+", default=[2, 8])
    p.add_argument("--rounds", type=int, default=10)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--json", help="write the results here too")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "_fb_worker":
        fedberry_worker(argv[1], int(argv[2]), int(argv[3]))
        return 0
    if argv and argv[0] == "_floor_worker":
        floor_worker(int(argv[1]), int(argv[2]), int(argv[3]))
        return 0
    if argv and argv[0] == "_floor_chief":
        floor_chief(argv[1], *map(int, argv[2:6]))
        return 0
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_grid_options(p)
    args = p.parse_args(argv)
    tmp = Path("/tmp")
    rows = []
    print("| params | workers | MiB per round | fedberry TCP (s) | socket floor (s) | ratio |")
    print("|---:|---:|---:|---:|---:|---:|")
    for params in map(int, args.params):
        for workers in args.workers:
            fb = run_fedberry(params, workers, args.rounds, args.warmup)
            fl = run_floor(params, workers, args.rounds, args.warmup, tmp)
            mib = 2 * workers * 4 * params / 2**20
            rows.append({"params": params, "workers": workers, "fedberry_s": fb, "floor_s": fl})
            print(f"| {params / 1e6:g}M | {workers} | {mib:.0f} | {fb:.3f} | {fl:.3f} | "
                  f"{fb / fl:.2f} |", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
