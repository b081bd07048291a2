"""What secure aggregation costs per round, fedberry against Flower 1.42, on this machine.

    python -m fedberry.bench.secagg_round_time                   # 8 and 100 clients, 100k and 1M
    python -m fedberry.bench.secagg_round_time --clients 8 --params 1e5 --rounds 3
    python -m fedberry.bench.secagg_round_time --columns fedberry,flower-grpc,flower,floor \\
        --clients 2 8 --params 1e6 1e7                           # issue 16: Flower's runtime

No training: every client's update is a fixed random float32 vector of P parameters (8 tensors,
round_time.model, seeded by the client), the server averages. Per round: wall time (at the
server, between the ends of consecutive rounds after the warm-up rounds), the bytes each client
sends and receives (mean over the clients), and the server's peak resident memory (VmHWM).
The columns, run one after another for each cell (so the machine's load falls on all):

- ``fedberry``, ``fedberry-secagg``: ``fedberry.serve`` (its own process) and plain
  ``fedberry.Worker`` clients over TCP on loopback, token auth, no TLS, multiplexed as threads
  in ``--procs`` processes (100 workers fit that way); secure is ``serve(secure_aggregation=
  SecAggOptions())``, whose neighbours and threshold default to k = 2 ceil(log2 n) (at most
  n - 1) and t = floor((k+1)/2) + 1. Bytes: each Worker's own socket counters
  (``bytes_sent``/``bytes_received``), read after every ``sync``.
- ``flower``, ``flower-secagg``: Flower's deployment runtime (flower-superlink, one
  flower-supernode per client, ``flwr run`` of the App in flower_secagg_app.py: plain
  ``DefaultWorkflow`` FedAvg, or ``DefaultWorkflow(fit_workflow=SecAggPlusWorkflow(...))`` with
  ``secaggplus_mod`` on the clients). SecAgg+ is given fedberry's graph: Flower's
  ``num_shares`` counts the client's own share (its neighbours are the offsets -s..s around it
  on a shuffled ring, s = num_shares // 2, itself included), so ``num_shares = k + 1``, and
  ``reconstruction_threshold`` is the number of those shares that rebuild a secret, as
  fedberry's t is (a strict majority of the client and its k neighbours): ``= t``. Bytes: a
  counting relay in this process, one listening port per SuperNode, in front of the SuperLink's
  Fleet API (HTTP); it counts what crosses the SuperNode-SuperLink link (HTTP headers
  included), not the loopback traffic between a SuperNode and the ClientApp it starts. Server
  memory: the SuperLink and the ServerApp (``flwr-serverapp``) processes' peaks, summed.
- ``flower-grpc``: Flower's legacy gRPC path (round_time.run_flower), time and memory only.
- ``floor``: round_time's socket floor, time only.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

from fedberry.bench import flower_python, round_time
from fedberry.secagg import SecAggOptions
from fedberry.secagg.graph import default_neighbors, default_threshold
from fedberry.serve import serve
from fedberry.worker import Worker

TOKEN = "secagg-bench-" + "t" * 20
COLUMNS = ("fedberry", "fedberry-secagg", "flower-grpc", "flower", "flower-secagg", "floor")
DEFAULT_COLUMNS = ("fedberry", "fedberry-secagg", "flower", "flower-secagg")
RUN_TIMEOUT_S = 1800.0  # one column of one cell, at most
START_TIMEOUT_S = 120.0
FLOWER_CLIENT_MB = 400  # a SuperNode, its SuperExec and the ClientApp it starts (measured: 390)


def secagg_graph(n: int) -> dict[str, int]:
    """fedberry's SecAgg+ parameters for n clients and Flower's that give the same graph."""
    k = default_neighbors(n)
    t = default_threshold(k)
    return {"neighbors": k, "threshold": t, "flower_num_shares": k + 1,
            "flower_reconstruction_threshold": t}


def _peak_rss_mb(pid: int | str = "self") -> float:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return float("nan")


def _loadavg() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


# -- fedberry ----------------------------------------------------------------------------------
def fedberry_chief(spec: dict[str, Any]) -> None:
    """The chief in its own process: prints its URL, then its rounds and peak memory."""
    n, total = spec["clients"], spec["warmup"] + spec["rounds"]
    handle = serve("127.0.0.1:0", workers=n, rounds=total,
                   initial=round_time.model(spec["params"]), token=TOKEN, finish_grace=5,
                   max_connections=n + 16,
                   secure_aggregation=SecAggOptions() if spec["secure"] else None)
    print(json.dumps({"url": handle.url}), flush=True)
    try:
        if not handle.wait(RUN_TIMEOUT_S):
            raise RuntimeError("the fedberry run timed out")
        records = list(handle.metrics)
    finally:
        handle.stop()
    walls = [r["wall_s"] for r in records]
    w = spec["warmup"]
    print(json.dumps({"round_s": (walls[-1] - walls[w - 1]) / spec["rounds"],
                      "chief_up": [r["bytes_up"] for r in records[w:]],
                      "chief_down": [r["bytes_down"] for r in records[w:]],
                      "peak_rss_mb": _peak_rss_mb()}), flush=True)


def fedberry_workers(spec: dict[str, Any]) -> None:
    """``len(indices)`` Workers as threads of this process; prints each one's bytes per round."""
    out: dict[int, Any] = {}

    def one(i: int) -> None:
        arrays = round_time.model(spec["params"], i + 1)
        counts = []
        try:
            with Worker(spec["url"], worker_id=f"bench-{i}", token=TOKEN) as w:
                w.join(arrays)
                counts.append((w.bytes_sent, w.bytes_received))
                while not w.done:
                    w.sync(arrays, 1.0)  # the same update every round: no training
                    counts.append((w.bytes_sent, w.bytes_received))
            out[i] = counts
        except Exception as exc:  # the driver reports it
            out[i] = f"{type(exc).__name__}: {exc}"

    threads = [threading.Thread(target=one, args=(i,)) for i in spec["indices"]]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    print(json.dumps({"workers": out}), flush=True)


def run_fedberry(params: int, n: int, rounds: int, warmup: int, secure: bool,
                 procs: int) -> dict[str, Any]:
    """One fedberry run: {"round_s", "up", "down" (per client per round), "peak_rss_mb"}
    or {"error": ...}."""
    spec = {"params": params, "clients": n, "rounds": rounds, "warmup": warmup,
            "secure": secure}
    me = [sys.executable, "-m", "fedberry.bench.secagg_round_time"]
    chief = subprocess.Popen([*me, "--role", "fb_chief", json.dumps(spec)],
                             stdout=subprocess.PIPE, text=True)
    assert chief.stdout is not None
    first = json.loads(chief.stdout.readline() or '{"error": "the chief died"}')
    if "error" in first:
        chief.wait(30)
        return first
    hosts = []
    procs = max(1, min(procs, n))
    for k in range(procs):
        wspec = {"url": first["url"], "params": params, "indices": list(range(k, n, procs))}
        hosts.append(subprocess.Popen([*me, "--role", "fb_workers", json.dumps(wspec)],
                                      stdout=subprocess.PIPE, text=True))
    try:
        out, _ = chief.communicate(timeout=RUN_TIMEOUT_S)
        per_worker: dict[str, Any] = {}
        for h in hosts:
            hout, _ = h.communicate(timeout=60)
            per_worker.update(json.loads(hout.strip().splitlines()[-1])["workers"])
    finally:
        for p in [*hosts, chief]:
            if p.poll() is None:
                p.kill()
                p.wait()
    res = json.loads(out.strip().splitlines()[-1])
    errors = {k: v for k, v in per_worker.items() if isinstance(v, str)}
    if errors:
        return {"error": f"{len(errors)} workers failed, e.g. {next(iter(errors.values()))}"}
    # counts[j] is after round j (counts[0] after join): the measured rounds are warmup+1..
    ups = [(c[-1][0] - c[warmup][0]) / rounds for c in per_worker.values()]
    downs = [(c[-1][1] - c[warmup][1]) / rounds for c in per_worker.values()]
    res.update(up=float(np.mean(ups)), down=float(np.mean(downs)),
               chief_up_per_client=float(np.mean(res.pop("chief_up"))) / n,
               chief_down_per_client=float(np.mean(res.pop("chief_down"))) / n)
    return res


# -- the counting relay (Flower's bytes) -------------------------------------------------------
class CountingRelay:
    """One listening port per client, each relayed to ``upstream``; counts the bytes of every
    connection made to client i's port as client i's (``up``: toward upstream)."""

    CHUNK = 1 << 20

    def __init__(self, upstream: tuple[str, int], clients: int) -> None:
        self.upstream = upstream
        self.up = [0] * clients
        self.down = [0] * clients
        self._lock = threading.Lock()
        self._closing = False
        self.listeners = [socket.create_server(("127.0.0.1", 0)) for _ in range(clients)]
        self.ports = [s.getsockname()[1] for s in self.listeners]
        for i, s in enumerate(self.listeners):
            threading.Thread(target=self._accept, args=(i, s), daemon=True).start()

    def snapshot(self) -> tuple[list[int], list[int]]:
        with self._lock:
            return list(self.up), list(self.down)

    def close(self) -> None:
        self._closing = True
        for s in self.listeners:  # open connections end with their peers
            s.close()

    def _accept(self, i: int, srv: socket.socket) -> None:
        while not self._closing:
            try:
                down, _ = srv.accept()
                up = socket.create_connection(self.upstream, timeout=10)
            except OSError:
                if self._closing:
                    return
                continue
            up.settimeout(None)
            ends = [2]  # pumps still running; the last one closes both sockets
            for src, dst, ups in ((down, up, True), (up, down, False)):
                threading.Thread(target=self._pump, args=(i, src, dst, ups, ends),
                                 daemon=True).start()

    def _pump(self, i: int, src: socket.socket, dst: socket.socket, up: bool,
              ends: list[int]) -> None:
        buf = bytearray(self.CHUNK)
        view = memoryview(buf)
        counter = self.up if up else self.down
        try:
            while n := src.recv_into(buf):
                dst.sendall(view[:n])
                with self._lock:
                    counter[i] += n
            dst.shutdown(socket.SHUT_WR)  # a half-close passes on; the other way goes on
        except OSError:
            for s in (src, dst):  # a reset ends both ways
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
        finally:
            with self._lock:
                ends[0] -= 1
                last = ends[0] == 0
            if last:
                src.close()
                dst.close()


# -- Flower's deployment runtime ---------------------------------------------------------------
APP_TOML = """\
[build-system]
requires = ["hatchling"]
build-backend = "hatchling.build"

[project]
name = "fedberry-round-bench"
version = "1.0.0"
description = "fedberry's benchmark of a round without training (flower_secagg_app.py)"
license = "Apache-2.0"
dependencies = []

[tool.flwr.app]
publisher = "fedberry"

[tool.flwr.app.components]
serverapp = "fedberry.bench.flower_secagg_app:server_app"
clientapp = "fedberry.bench.flower_secagg_app:client_app"

[tool.flwr.app.config]
params = 1000
clients = 2
rounds = 2
secure = false
num-shares = 3
threshold = 2
report-port = 0
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _wait_port(port: int, deadline_s: float, proc: subprocess.Popen[Any], log: Path) -> None:
    end = time.monotonic() + deadline_s
    while time.monotonic() < end:
        if proc.poll() is not None:
            raise RuntimeError(f"the SuperLink exited ({proc.returncode}): "
                               f"{log.read_text()[-800:]}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1.0):
                return
        except OSError:
            time.sleep(0.2)
    raise RuntimeError(f"the SuperLink did not listen on {port} in {deadline_s:.0f} s")


def _descendants(roots: list[int]) -> list[int]:
    """Every process below ``roots`` (Flower detaches its SuperExecs into sessions of their
    own, so a process group does not hold them; the parent links do)."""
    children: dict[int, list[int]] = {}
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            ppid = int(Path(f"/proc/{d}/stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(ppid, []).append(int(d))
    out, stack = [], list(roots)
    while stack:
        for c in children.get(stack.pop(), []):
            out.append(c)
            stack.append(c)
    return out


def _stop_tree(procs: list[subprocess.Popen[Any]]) -> None:
    """SIGTERM to the processes we started and everything they started, by pid; SIGKILL what
    is left after 10 s."""
    pids = [p.pid for p in procs if p.poll() is None]
    pids += _descendants([p.pid for p in procs])
    for pid in pids:
        try:
            os.kill(pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
    end = time.monotonic() + 10
    for p in procs:
        try:
            p.wait(max(0.1, end - time.monotonic()))
        except subprocess.TimeoutExpired:
            pass
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    for p in procs:
        if p.poll() is None:
            p.wait(10)


def flower_memory_check(n: int) -> str | None:
    """Why ``n`` SuperNodes cannot run here, or None: each client is three Python processes."""
    need = n * FLOWER_CLIENT_MB
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            avail = int(line.split()[1]) // 1024
            if need > 0.8 * avail:
                return (f"{n} SuperNodes need about {need / 1024:.0f} GB (a SuperNode, its "
                        f"SuperExec and one ClientApp per message: {FLOWER_CLIENT_MB} MB, "
                        f"measured) and this machine has {avail / 1024:.1f} GB available")
    return None


def _clientapp_starts(tmp: Path) -> dict[str, int]:
    """How many ClientApp processes the SuperNodes started, and how many of those were refused
    by their SuperNode (a task token that failed authentication, seen under load): from logs."""
    starts = refused = 0
    for log in tmp.glob("supernode-*.log"):
        text = log.read_text(errors="replace")
        starts += text.count("Start `flwr-clientapp` process")
        refused += text.count("pull-task-input][ApiError:1008]")
    return {"clientapp_starts": starts, "clientapp_refused": refused}


def run_flower_deployment(python: str, params: int, n: int, rounds: int, warmup: int,
                          secure: bool, keep_logs: Path | None = None,
                          timeout_s: float = RUN_TIMEOUT_S) -> dict[str, Any]:
    """One run of the App through SuperLink + n SuperNodes: {"round_s", "up", "down",
    "peak_rss_mb", ...} or {"error": ...}."""
    why = flower_memory_check(n)
    if secure and n < 3:
        why = "Flower's SecAgg+ needs 3 clients or more (num_shares > 2)"
    if why:
        return {"error": why}
    venv_bin = str(Path(python).parent)
    tmp = Path(tempfile.mkdtemp(prefix="fedberry-flower-"))
    home, app = tmp / "flwr-home", tmp / "app"
    home.mkdir()
    app.mkdir()
    (app / "pyproject.toml").write_text(APP_TOML)
    (app / "README.md").write_text("The code is fedberry.bench.flower_secagg_app.\n")
    port = _free_port()
    (home / "config.toml").write_text(f'[superlink]\ndefault = "bench"\n\n[superlink.bench]\n'
                                      f'address = "127.0.0.1:{port}"\ninsecure = true\n')
    src = str(Path(__file__).resolve().parents[2])
    env = {**os.environ, "PATH": f"{venv_bin}:{os.environ.get('PATH', '')}",
           "FLWR_HOME": str(home), "PYTHONPATH": src}
    started: list[subprocess.Popen[Any]] = []
    relay = None
    report = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    report.bind(("127.0.0.1", 0))
    try:
        log = tmp / "superlink.log"
        with open(log, "wb") as f:
            link = subprocess.Popen([f"{venv_bin}/flower-superlink", "--insecure", "--port",
                                     str(port), "--disable-runtime-dependency-installation"],
                                    env=env, stdout=f, stderr=subprocess.STDOUT, cwd=tmp)
        started.append(link)
        _wait_port(port, START_TIMEOUT_S, link, log)
        relay = CountingRelay(("127.0.0.1", port), n)
        for i in range(n):
            with open(tmp / f"supernode-{i}.log", "wb") as f:
                started.append(subprocess.Popen(
                    [f"{venv_bin}/flower-supernode", "--insecure", "--superlink",
                     f"127.0.0.1:{relay.ports[i]}", "--port", str(_free_port()),
                     "--node-config", f"partition-id={i}"],
                    env=env, stdout=f, stderr=subprocess.STDOUT, cwd=tmp))
        g = secagg_graph(n)
        cfg = (f"params={params} clients={n} rounds={warmup + rounds} "
               f"secure={'true' if secure else 'false'} num-shares={g['flower_num_shares']} "
               f"threshold={g['flower_reconstruction_threshold']} "
               f"report-port={report.getsockname()[1]}")
        t_submit = time.time()
        sub = subprocess.run([f"{venv_bin}/flwr", "run", str(app), "bench", "--run-config",
                              cfg], env=env, capture_output=True, text=True, cwd=tmp,
                             timeout=START_TIMEOUT_S)
        if sub.returncode != 0:
            return {"error": f"flwr run failed: {(sub.stdout + sub.stderr)[-600:]}"}
        stamps: list[float] = []
        snaps: list[tuple[list[int], list[int]]] = []
        app_rss = float("nan")
        end = time.monotonic() + timeout_s
        while True:
            left = end - time.monotonic()
            if left <= 0:
                return {"error": f"the Flower run did not finish in {timeout_s:.0f} s "
                                 f"({len(stamps)} rounds)", **_clientapp_starts(tmp)}
            report.settimeout(min(left, 5.0))
            try:
                e = json.loads(report.recv(65536))
            except TimeoutError:
                if link.poll() is not None:
                    return {"error": "the SuperLink died"}
                continue
            if e["ev"] == "round":
                snaps.append(relay.snapshot())
                stamps.append(e["t"])
            elif e["ev"] == "error":
                return {"error": f"Flower's ServerApp failed: {e['error']}"}
            elif e["ev"] == "done":
                app_rss = e["peak_rss_mb"]
                break
        link_rss = _peak_rss_mb(link.pid)
        if len(stamps) != warmup + rounds:
            return {"error": f"{len(stamps)} of {warmup + rounds} rounds reported"}
        (u0, d0), (u1, d1) = snaps[warmup - 1], snaps[-1]
        return {"round_s": (stamps[-1] - stamps[warmup - 1]) / rounds,
                "first_round_s": stamps[0] - t_submit,
                "up": float(np.mean([b - a for a, b in zip(u0, u1)])) / rounds,
                "down": float(np.mean([b - a for a, b in zip(d0, d1)])) / rounds,
                "peak_rss_mb": link_rss + app_rss, "superlink_rss_mb": link_rss,
                "serverapp_rss_mb": app_rss, "round_stamps": stamps, **_clientapp_starts(tmp)}
    finally:
        _stop_tree(started)
        if relay is not None:
            relay.close()
        report.close()
        if keep_logs is not None:
            shutil.copytree(tmp, keep_logs / tmp.name, dirs_exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)


# -- the table ---------------------------------------------------------------------------------
def run_cell(column: str, params: int, n: int, args: argparse.Namespace,
             flower: str | None) -> dict[str, Any]:
    t0 = time.monotonic()
    load = _loadavg()
    if column.startswith("fedberry"):
        res = run_fedberry(params, n, args.rounds, args.warmup, column.endswith("secagg"),
                           args.procs)
    elif column == "floor":
        res = {"round_s": round_time.run_floor(params, n, args.rounds, args.warmup,
                                               Path(tempfile.gettempdir()))}
    elif flower is None:
        res = {"error": "no Flower Python"}
    elif column == "flower-grpc":
        res = round_time.run_flower(flower, params, n, args.rounds, args.warmup)
    else:
        res = run_flower_deployment(flower, params, n, args.rounds, args.warmup,
                                    column.endswith("secagg"), args.keep_logs, args.timeout)
    res.update(column=column, params=params, clients=n, loadavg_before=load,
               loadavg_after=_loadavg(), elapsed_s=round(time.monotonic() - t0, 1))
    return res


def _fmt(r: dict[str, Any]) -> str:
    if "error" in r:
        return f"{r['column']}: {r['error']}"
    s = f"{r['column']}: {r['round_s']:.3f} s/round"
    if "up" in r:
        s += f", per client up {r['up'] / 1e6:.2f} MB down {r['down'] / 1e6:.2f} MB"
    if "peak_rss_mb" in r:
        s += f", server peak RSS {r['peak_rss_mb']:.0f} MB"
    if "clientapp_starts" in r:
        s += f", {r['clientapp_starts']} ClientApp starts ({r['clientapp_refused']} refused)"
    return s + f" (load {r['loadavg_before'][0]:.2f} -> {r['loadavg_after'][0]:.2f})"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m fedberry.bench.secagg_round_time",
                                description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--params", type=float, nargs="+", default=[1e5, 1e6])
    p.add_argument("--clients", type=int, nargs="+", default=[8, 100])
    p.add_argument("--rounds", type=int, default=3, help="measured rounds per run")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--columns", default=",".join(DEFAULT_COLUMNS),
                   help=f"comma-separated, of {','.join(COLUMNS)}")
    p.add_argument("--procs", type=int, default=4, help="processes fedberry's workers share")
    p.add_argument("--flower-python", default=None, metavar="PATH")
    p.add_argument("--timeout", type=float, default=RUN_TIMEOUT_S,
                   help="seconds one Flower run may take")
    p.add_argument("--keep-logs", type=Path, default=None, metavar="DIR",
                   help="copy each Flower run's logs here")
    p.add_argument("--json", default=None, help="also write the results here")
    p.add_argument("--role", default=None, help=argparse.SUPPRESS)
    p.add_argument("spec", nargs="?", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    # SIGTERM unwinds (the finally blocks stop the Flower processes this run started).
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    if args.role == "fb_chief":
        fedberry_chief(json.loads(args.spec))
        return 0
    if args.role == "fb_workers":
        fedberry_workers(json.loads(args.spec))
        return 0
    columns = [c.strip() for c in args.columns.split(",") if c.strip()]
    bad = [c for c in columns if c not in COLUMNS]
    if bad or args.rounds < 1 or args.warmup < 1:
        p.error(f"unknown columns {bad}" if bad else "--rounds >= 1 and --warmup >= 1")
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    flower = None
    if any(c.startswith("flower") for c in columns):
        flower, found = flower_python.find(args.flower_python)
        print(f"Flower: {found} ({flower})" if flower else f"Flower: skipped, {found}",
              flush=True)
    now = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())
    print(f"{os.cpu_count()} cores, load {_loadavg()}, {now}", flush=True)
    rows = []
    for params in map(int, args.params):
        for n in args.clients:
            g = secagg_graph(n)
            print(f"\n{params:,} params x {n} clients (SecAgg+ k={g['neighbors']}, "
                  f"t={g['threshold']}; Flower num_shares={g['flower_num_shares']}, "
                  f"reconstruction_threshold={g['flower_reconstruction_threshold']})",
                  flush=True)
            for column in columns:
                r = run_cell(column, params, n, args, flower)
                rows.append(r)
                print("  " + _fmt(r), flush=True)
                if args.json:
                    Path(args.json).write_text(json.dumps(rows, indent=1))
    print("\n" + table(rows))
    return 0


def table(rows: list[dict[str, Any]]) -> str:
    """The markdown table of ``rows``: one line per cell and column."""
    out = ["| params | clients | column | s / round | MB up / client / round | "
           "MB down / client / round | server peak RSS (MB) | load avg |",
           "|---:|---:|---|---:|---:|---:|---:|---|"]
    for r in rows:
        load = f"{r['loadavg_before'][0]:.1f}-{r['loadavg_after'][0]:.1f}"
        if "error" in r:
            out.append(f"| {r['params']:,} | {r['clients']} | {r['column']} | "
                       f"{r['error']} | | | | {load} |")
            continue
        up = f"{r['up'] / 1e6:.2f}" if "up" in r else "-"
        down = f"{r['down'] / 1e6:.2f}" if "down" in r else "-"
        rss = f"{r['peak_rss_mb']:.0f}" if "peak_rss_mb" in r else "-"
        out.append(f"| {r['params']:,} | {r['clients']} | {r['column']} | {r['round_s']:.3f} | "
                   f"{up} | {down} | {rss} | {load} |")
    return "\n".join(out)


if __name__ == "__main__":
    sys.exit(main())
