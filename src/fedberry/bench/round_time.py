"""One round's wall time on loopback: fedberry's TCP chief against the floor of plain blocking
sockets moving the same bytes.

    python -m fedberry.bench.round_time                  # 1M and 10M params, 2 and 8 workers
    python -m fedberry.bench.round_time --params 1e6 --workers 2 --rounds 10
    python -m fedberry.bench.round_time --params 1e6 --workers 2 8 --flower --repeat 3

A round is: every worker sends its model, the chief has them all, every worker has the model back.
Workers do no compute, so the figure is pure communication + aggregation. Both sides run as
separate processes; the time is measured at the chief between consecutive round closes, after
warm-up rounds. The floor process only moves bytes (recv_into a preallocated buffer, sendall), so
the gap to it is what the protocol, asyncio, the NaN check and the weighted sum cost.

``--flower`` adds Flower 1.42's legacy gRPC path doing the same round (flower_round_time.py, in
the Flower Python: flower_python.py), its repetitions alternating with fedberry's (``--repeat``),
and both chiefs' peak resident memory (VmHWM, each chief in its own process).
"""

from __future__ import annotations

import argparse
import json
import os
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


def fedberry_chief(params: int, workers: int, rounds: int, warmup: int) -> None:
    """The chief in a process of its own, so that its peak memory is its own."""
    handle = serve("127.0.0.1:0", workers=workers, rounds=warmup + rounds,
                   initial=model(params), token="bench", finish_grace=5)
    print(json.dumps({"url": handle.url}), flush=True)
    try:
        if not handle.wait(600):
            raise RuntimeError("fedberry run timed out")
        walls = [r["wall_s"] for r in handle.metrics]
    finally:
        handle.stop()
    print(json.dumps({"round_s": (walls[-1] - walls[warmup - 1]) / rounds,
                      "peak_rss_mb": peak_rss_mb()}), flush=True)


def run_fedberry(params: int, workers: int, rounds: int, warmup: int) -> dict[str, float]:
    """{"round_s", "peak_rss_mb"} of the chief."""
    chief = subprocess.Popen([sys.executable, "-m", "fedberry.bench.round_time", "_fb_chief",
                              str(params), str(workers), str(rounds), str(warmup)],
                             stdout=subprocess.PIPE, text=True)
    assert chief.stdout is not None
    url = json.loads(chief.stdout.readline())["url"]
    procs = [subprocess.Popen([sys.executable, "-m", "fedberry.bench.round_time", "_fb_worker",
                               url, str(params), str(i)]) for i in range(workers)]
    return _result(chief, procs)


def _result(chief: subprocess.Popen, procs: list[subprocess.Popen]) -> dict[str, float]:
    try:
        out, _ = chief.communicate(timeout=600)
        for p in procs:
            p.wait(30)
    finally:
        for p in [*procs, chief]:
            if p.poll() is None:
                p.kill()
                p.wait()
    if chief.returncode != 0:
        raise RuntimeError(f"the chief exited with code {chief.returncode}")
    return json.loads(out.strip().splitlines()[-1])


# -- Flower 1.42, legacy gRPC (flower_round_time.py, in the Flower Python) -----------------------
def run_flower(python: str, params: int, workers: int, rounds: int,
               warmup: int) -> dict[str, float]:
    """{"round_s", "peak_rss_mb"} of Flower's server for the same round."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    src = str(Path(__file__).resolve().parents[2])  # this checkout's fedberry, in that Python
    env = {**os.environ, "PYTHONPATH": src}
    mod = "fedberry.bench.flower_round_time"
    quiet = {"stderr": subprocess.DEVNULL}  # Flower logs every round at INFO
    chief = subprocess.Popen([python, "-m", mod, "server", str(port), str(params), str(workers),
                              str(rounds), str(warmup)], stdout=subprocess.PIPE, text=True,
                             env=env, **quiet)
    procs = [subprocess.Popen([python, "-m", mod, "client", str(port), str(params), str(i)],
                              env=env, stdout=subprocess.DEVNULL, **quiet)
             for i in range(workers)]
    return _result(chief, procs)


def peak_rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


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
    if argv and argv[0] == "_fb_chief":
        fedberry_chief(*map(int, argv[1:5]))
        return 0
    if argv and argv[0] == "_floor_worker":
        floor_worker(int(argv[1]), int(argv[2]), int(argv[3]))
        return 0
    if argv and argv[0] == "_floor_chief":
        floor_chief(argv[1], *map(int, argv[2:6]))
        return 0
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_grid_options(p)
    p.add_argument("--repeat", type=int, default=1,
                   help="repetitions per cell, fedberry and Flower alternating; medians shown")
    p.add_argument("--flower", action="store_true",
                   help="add Flower 1.42's legacy gRPC columns (flower_python.find: "
                        "--flower-python, $FEDBERRY_FLOWER_PYTHON, ~/.cache/fedberry/venv-flower)")
    p.add_argument("--flower-python", default=None, metavar="PATH")
    args = p.parse_args(argv)
    flower = None
    if args.flower or args.flower_python:
        from fedberry.bench import flower_python

        flower, found = flower_python.find(args.flower_python)
        print(f"Flower: {found} ({flower})" if flower else f"Flower: skipped, {found}",
              flush=True)
    tmp = Path("/tmp")
    rows = []
    head = "| params | workers | MiB per round | fedberry TCP (s) | socket floor (s) | ratio |"
    if flower:
        head += " Flower gRPC (s) | Flower / fedberry | chief peak RSS (MB) | Flower server " \
                "peak RSS (MB) |"
    print(head)
    print("|" + "---:|" * (head.count("|") - 1))
    for params in map(int, args.params):
        for workers in args.workers:
            fbs, fls = [], []
            for _ in range(args.repeat):  # interleaved: the machine's load falls on both
                fbs.append(run_fedberry(params, workers, args.rounds, args.warmup))
                if flower:
                    fls.append(run_flower(flower, params, workers, args.rounds, args.warmup))
            fl = run_floor(params, workers, args.rounds, args.warmup, tmp)
            fb = float(np.median([r["round_s"] for r in fbs]))
            mib = 2 * workers * 4 * params / 2**20
            row = {"params": params, "workers": workers, "fedberry_s": fb, "floor_s": fl,
                   "fedberry_runs": fbs, "loadavg": os.getloadavg()}
            line = (f"| {params / 1e6:g}M | {workers} | {mib:.0f} | {fb:.3f} | {fl:.3f} | "
                    f"{fb / fl:.2f} |")
            if flower:
                fw = float(np.median([r["round_s"] for r in fls]))
                rss_fb = max(r["peak_rss_mb"] for r in fbs)
                rss_fl = max(r["peak_rss_mb"] for r in fls)
                row.update(flower_s=fw, flower_runs=fls)
                line += f" {fw:.3f} | {fw / fb:.1f}x | {rss_fb:.0f} | {rss_fl:.0f} |"
            rows.append(row)
            print(line, flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
