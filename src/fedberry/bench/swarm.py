"""Many workers on one chief: ``python -m fedberry.bench.swarm --workers 1000 --params 100000``.

One chief (``fedberry.serve``, in a process of its own, on loopback, token auth, no training)
and ``--workers`` light workers multiplexed over ``--procs`` processes. Each worker is a real TCP
connection speaking the real protocol: the sans-IO ``WorkerConnection`` (protocol/connection.py)
over an asyncio ``BufferedProtocol``, with its own source address (127.1.x.y: every device has
its own address, so the chief's per-address handshake limits apply as they would in the field),
answering the chief's pings and pinging it. Every worker sends a float32 update of ``--params``
values every round and receives the global model; the workers of one process share one update
array and one receive buffer (``FrameDecoder.allocate``), so that what grows with the count is
the connections and the chief, not the load generator's copies.

It reports, per round and at the chief: round time (from the chief closing one round to closing
the next), the chief's resident memory, open file descriptors and CPU seconds (so CPU per
update); and the floor: the same bytes per round (every update up, every model down) through one
plain loopback socket (``sendall`` / ``recv_into``, no protocol), measured in the same run, and a
memcpy of the same bytes. The soft file-descriptor limit is raised to the hard one.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import resource
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

from fedberry import codecs
from fedberry.protocol.connection import WorkerConnection, WorkerState
from fedberry.protocol.messages import (
    Auth,
    Bye,
    Challenge,
    Error,
    Global,
    Hello,
    Ping,
    Pong,
    Update,
    Welcome,
)
from fedberry.protocol.spec import spec_of

TOKEN = "swarm-" + "s" * 26
WRITE_CHUNK = 256 * 1024  # what one connection hands the kernel at a time
HANDSHAKES_IN_FLIGHT = 32  # per process: the chief's listen backlog is not a queue to flood
PING_EVERY_S = 10.0
SOCKET_BUFFER = 256 * 1024  # SO_SNDBUF / SO_RCVBUF of each worker's socket
STEP_TIMEOUT_S = 600.0  # one handshake, or one round, may take this long at most


def emit(**event: Any) -> None:
    print(json.dumps(event), flush=True)


def model(params: int, tensors: int) -> list[np.ndarray]:
    """``params`` float32 values in ``tensors`` arrays, deterministic (the chief's initial model
    and every worker's, so that the initial download is skipped by digest)."""
    sizes = [params // tensors + (1 if i < params % tensors else 0) for i in range(tensors)]
    rng = np.random.default_rng(0)
    return [rng.standard_normal(n).astype(np.float32) for n in sizes]


def raise_nofile() -> tuple[int, int]:
    """The soft open-files limit up to the hard one; returns (soft, hard) now."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)


def source_address(i: int) -> str:
    return f"127.1.{i // 250}.{i % 250 + 1}"


# -- the chief ---------------------------------------------------------------------------------
def _rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def tcp_memory_mb() -> float | None:
    """The machine's TCP buffer memory now (``/proc/net/sockstat``, pages), in MB."""
    try:
        for line in Path("/proc/net/sockstat").read_text().splitlines():
            if line.startswith("TCP:"):
                f = line.split()
                return int(f[f.index("mem") + 1]) * os.sysconf("SC_PAGE_SIZE") / 1e6
    except (OSError, ValueError):
        pass
    return None


def run_chief(spec: dict[str, Any]) -> None:
    from fedberry.serve import serve
    from fedberry.transports.tcp import ListenOptions

    raise_nofile()
    n = spec["workers"]

    def on_round(rec: dict[str, Any]) -> None:
        ru = resource.getrusage(resource.RUSAGE_SELF)
        emit(ev="round", round=rec["round"], workers=rec["workers"], t=time.monotonic(),
             rss_mb=round(_rss_mb(), 1), fds=len(os.listdir("/proc/self/fd")),
             cpu_s=ru.ru_utime + ru.ru_stime, up=rec["bytes_up"], down=rec["bytes_down"],
             tcp_mem_mb=tcp_memory_mb())

    handle = serve("127.0.0.1:0", workers=n, rounds=spec["rounds"],
                   initial=model(spec["params"], spec["tensors"]), on_round=on_round,
                   token=TOKEN, max_connections=n + 64, idle_timeout=120.0,
                   handshake_timeout=60.0, finish_grace=5.0,
                   listen_options=ListenOptions(max_pending_per_address=16,
                                                receive_buffer=spec["receive_buffer"]))
    emit(ev="listening", port=handle.address[1], rss_mb=round(_rss_mb(), 1),
         fds=len(os.listdir("/proc/self/fd")))
    deadline = time.monotonic() + spec["timeout_s"]
    try:
        while not handle.wait(1.0):
            if time.monotonic() > deadline:
                emit(ev="timeout")
                break
    finally:
        emit(ev="done", up=handle.server.bytes_up, down=handle.server.bytes_down)
        handle.stop()


# -- the workers -------------------------------------------------------------------------------
class _Proto(asyncio.BufferedProtocol):
    """One worker's connection: bytes in through the sans-IO connection, events to a queue."""

    def __init__(self, conn: WorkerConnection) -> None:
        self.conn = conn
        self.events: asyncio.Queue[Any] = asyncio.Queue()
        self.transport: asyncio.Transport | None = None
        self.writable = asyncio.Event()
        self.writable.set()
        # One frame at a time on the wire: a PONG or PING written while an UPDATE waits for the
        # transport's buffer to drain would land inside it.
        self._sending = asyncio.Lock()
        self._soon: set[asyncio.Future[None]] = set()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def get_buffer(self, sizehint: int) -> memoryview:
        if self.conn.state is WorkerState.CLOSED:  # aborted: what still comes is dropped
            return memoryview(bytearray(65536))
        return self.conn.get_buffer()

    def buffer_updated(self, nbytes: int) -> None:
        try:
            events = self.conn.buffer_updated(nbytes)
        except Exception as exc:  # a protocol error: the worker fails, the swarm counts it
            self.events.put_nowait(exc)
            assert self.transport is not None
            self.transport.abort()
            return
        for e in events:
            if isinstance(e, Ping):
                self.send_soon(Pong())
            elif not isinstance(e, Pong):
                self.events.put_nowait(e)

    def connection_lost(self, exc: Exception | None) -> None:
        self.events.put_nowait(ConnectionError(f"connection lost: {exc or 'closed'}"))
        self.writable.set()

    def pause_writing(self) -> None:
        self.writable.clear()

    def resume_writing(self) -> None:
        self.writable.set()

    def send_soon(self, msg: Any) -> None:
        """``send`` from a callback: queued behind the frame being written, if any."""
        fut = asyncio.ensure_future(self.send(msg))
        self._soon.add(fut)
        fut.add_done_callback(self._soon.discard)

    async def send(self, msg: Any) -> None:
        """Write a frame in chunks, waiting whenever the transport's buffer is full: 1000
        connections each buffering a whole model would be the load generator's memory."""
        async with self._sending:
            frame = self.conn.send(msg)  # in wire order: the connection tracks its state
            assert self.transport is not None
            for part in frame.parts:
                view = memoryview(part).cast("B")
                for s in range(0, len(view), WRITE_CHUNK):
                    await self.writable.wait()
                    if self.transport.is_closing():
                        raise ConnectionError("connection closed while sending")
                    self.transport.write(view[s:s + WRITE_CHUNK])

    async def next(self, kind: type) -> Any:
        e = await asyncio.wait_for(self.events.get(), STEP_TIMEOUT_S)
        if isinstance(e, BaseException):
            raise e
        if isinstance(e, Error):
            raise RuntimeError(f"the chief said: {e.message}")
        if not isinstance(e, kind):
            raise RuntimeError(f"expected {kind.__name__}, got {type(e).__name__}")
        return e


async def _worker(i: int, port: int, arrays: list[np.ndarray], recv: list[np.ndarray],
                  gate: asyncio.Semaphore, joined: list[int], stats: dict[str, int]) -> None:
    loop = asyncio.get_running_loop()
    spec = spec_of(arrays)
    conn = WorkerConnection(TOKEN, spec)
    async with gate:
        sock = socket.socket()
        # Each worker's kernel buffers bounded, as on a device of its own: on one machine,
        # 1000 connections with buffers autotuned to 4 MB took the kernel's TCP memory past
        # tcp_mem's pressure mark, and it dropped segments on loopback (RTO backoff, rounds of
        # minutes). The chief's side of the connections is left as the kernel tunes it.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SOCKET_BUFFER)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, SOCKET_BUFFER)
        sock.bind((source_address(i), 0))
        sock.setblocking(False)
        try:
            await asyncio.wait_for(loop.sock_connect(sock, ("127.0.0.1", port)),
                                   STEP_TIMEOUT_S)
            _, proto = await loop.create_connection(lambda: _Proto(conn), sock=sock)
        except BaseException:
            sock.close()
            raise
        await proto.send(Hello(f"swarm-{i}"))
        await proto.next(Challenge)
        await proto.send(Auth(spec, True, codecs.digest(arrays)))
        await proto.next(Welcome)
        # From here the chief's frames are our model's: read them into the process's buffer.
        conn.decoder.allocate = lambda specs: recv
    joined[0] += 1

    async def heartbeat() -> None:
        while True:
            await asyncio.sleep(PING_EVERY_S)
            await proto.send(Ping())

    hb = asyncio.ensure_future(heartbeat())
    try:
        g: Global = await proto.next(Global)
        while not g.done:
            await proto.send(Update(g.round, 1.0, arrays))
            g = await proto.next(Global)
            stats["rounds"] += 1
        await proto.send(Bye())
    finally:
        hb.cancel()
        if proto.transport is not None:
            proto.transport.close()


def run_workers(spec: dict[str, Any]) -> None:
    raise_nofile()
    arrays = model(spec["params"], spec["tensors"])
    recv = [np.empty_like(a) for a in arrays]

    async def main() -> None:
        gate = asyncio.Semaphore(HANDSHAKES_IN_FLIGHT)
        joined, stats = [0], {"rounds": 0}
        tasks = [asyncio.ensure_future(_worker(i, spec["port"], arrays, recv, gate, joined,
                                               stats)) for i in spec["indices"]]
        errors: dict[str, int] = {}
        for t in asyncio.as_completed(tasks):
            try:
                await t
            except Exception as exc:
                key = f"{type(exc).__name__}: {exc}"[:200]
                errors[key] = errors.get(key, 0) + 1
        ru = resource.getrusage(resource.RUSAGE_SELF)
        emit(ev="workers_done", joined=joined[0], rounds=stats["rounds"], errors=errors,
             cpu_s=ru.ru_utime + ru.ru_stime)

    asyncio.run(main())


def _tcp_mem_pressure_mb() -> float | None:
    try:
        pages = int(Path("/proc/sys/net/ipv4/tcp_mem").read_text().split()[1])
    except (OSError, ValueError, IndexError):
        return None
    return pages * os.sysconf("SC_PAGE_SIZE") / 1e6


# -- the floor ---------------------------------------------------------------------------------
def socket_floor(nbytes: int) -> float:
    """Seconds to move ``nbytes`` through one loopback TCP connection, ``sendall`` to
    ``recv_into`` a preallocated buffer, from another process (best of 3)."""
    srv = socket.create_server(("127.0.0.1", 0))
    port = srv.getsockname()[1]
    best = float("inf")
    for _ in range(3):
        sender = subprocess.Popen([sys.executable, "-c", (
            "import socket,sys\n"
            f"s=socket.create_connection(('127.0.0.1',{port}))\n"
            f"b=bytes(1<<20); n={nbytes}\n"
            "while n>0:\n s.sendall(b[:min(n,len(b))]); n-=len(b)\n"
            "s.close()\n")])
        c, _ = srv.accept()
        buf = bytearray(1 << 20)
        got, t0 = 0, None
        while True:
            k = c.recv_into(buf)
            if not k:
                break
            if t0 is None:
                t0 = time.perf_counter()
            got += k
        best = min(best, time.perf_counter() - (t0 or time.perf_counter()))
        c.close()
        sender.wait(60)
    srv.close()
    return best


def memcpy_floor(nbytes: int, block: int) -> float:
    """Seconds to copy ``nbytes`` in blocks of ``block`` bytes (one model), best of 3."""
    src = np.ones(block, np.uint8)
    dst = np.empty_like(src)
    best = float("inf")
    reps = max(1, nbytes // block)
    for _ in range(3):
        t0 = time.perf_counter()
        for _ in range(reps):
            np.copyto(dst, src)
        best = min(best, time.perf_counter() - t0)
    return best


# -- the driver --------------------------------------------------------------------------------
def _reader(proc: subprocess.Popen[str], name: str, out: list[tuple[str, dict[str, Any]]],
            cv: threading.Condition) -> None:
    assert proc.stdout is not None
    for line in proc.stdout:
        if line.startswith("{"):
            with cv:
                out.append((name, json.loads(line)))
                cv.notify_all()
    with cv:
        out.append((name, {"ev": "exit", "code": proc.wait()}))
        cv.notify_all()


def run(workers: int, params: int, rounds: int, procs: int, tensors: int,
        timeout_s: float, quiet: bool = False,
        receive_buffer: int | None = None) -> dict[str, Any]:
    soft, hard = raise_nofile()
    need = workers * 2 + 256  # both ends of every connection live on this machine
    if soft < need // max(1, min(procs, 2)):
        raise SystemExit(f"open-files limit {soft} (hard {hard}) is too low for {workers} "
                         f"workers: raise it (ulimit -n)")
    me = [sys.executable, "-m", "fedberry.bench.swarm"]
    events: list[tuple[str, dict[str, Any]]] = []
    cv = threading.Condition()
    children: list[subprocess.Popen[str]] = []

    def start(name: str, role: str, spec: dict[str, Any]) -> None:
        p = subprocess.Popen([*me, "--role", role, json.dumps(spec)], stdout=subprocess.PIPE,
                             text=True)
        children.append(p)
        threading.Thread(target=_reader, args=(p, name, events, cv), daemon=True).start()

    seen = [0]  # events handled so far

    def next_event(timeout: float) -> tuple[str, dict[str, Any]]:
        deadline = time.monotonic() + timeout
        with cv:
            while len(events) <= seen[0]:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError("the swarm did not finish in time")
                cv.wait(min(left, 1.0))
            seen[0] += 1
            return events[seen[0] - 1]

    say = (lambda *a: None) if quiet else (lambda *a: print(*a, file=sys.stderr, flush=True))
    t_start = time.monotonic()
    try:
        start("chief", "chief", {"workers": workers, "params": params, "rounds": rounds,
                                 "tensors": tensors, "timeout_s": timeout_s,
                                 "receive_buffer": receive_buffer})
        _, lis = next_event(120)
        if lis["ev"] != "listening":
            raise RuntimeError(f"the chief did not start: {lis}")
        say(f"chief listening on {lis['port']}, rss {lis['rss_mb']} MB; starting {workers} "
            f"workers in {procs} processes")
        for k in range(procs):
            start(f"workers{k}", "workers", {"port": lis["port"], "params": params,
                                             "tensors": tensors,
                                             "indices": list(range(k, workers, procs))})
        left = set(range(procs))
        chief_alive = True
        while left or chief_alive:
            name, e = next_event(timeout_s)
            if name == "chief" and e["ev"] == "round":
                say(f"round {e['round']}: {e['workers']} workers, chief rss {e['rss_mb']} MB, "
                    f"{e['fds']} fds, TCP buffers {e['tcp_mem_mb']:.0f} MB (machine)")
            elif name == "chief" and e["ev"] == "exit":
                chief_alive = False
            elif e["ev"] == "exit":
                left.discard(int(name[len("workers"):]))
    finally:
        for p in children:
            if p.poll() is None:
                p.terminate()
        for p in children:
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
    elapsed = time.monotonic() - t_start
    rounds_ev = [e for n, e in events if n == "chief" and e["ev"] == "round"]
    wdone = [e for n, e in events if n.startswith("workers") and e["ev"] == "workers_done"]
    model_bytes = 4 * params
    per_round = 2 * workers * model_bytes
    say(f"measuring the floor: {per_round / 1e6:.0f} MB through one loopback socket")
    floor_s = socket_floor(per_round)
    copy_s = memcpy_floor(per_round, model_bytes)
    times = [b["t"] - a["t"] for a, b in zip(rounds_ev, rounds_ev[1:])]
    cpus = [b["cpu_s"] - a["cpu_s"] for a, b in zip(rounds_ev, rounds_ev[1:])]
    errors: dict[str, int] = {}
    for w in wdone:
        for k, v in w["errors"].items():
            errors[k] = errors.get(k, 0) + v
    out = {
        "workers": workers, "params": params, "tensors": tensors, "rounds": rounds,
        "procs": procs, "rounds_closed": len(rounds_ev), "receive_buffer": receive_buffer,
        "full_rounds": sum(1 for e in rounds_ev if e["workers"] == workers),
        "joined": sum(w["joined"] for w in wdone), "errors": errors,
        "mb_per_round": per_round / 1e6,
        "round_s": times, "round_s_median": float(np.median(times)) if times else None,
        "socket_floor_s": floor_s, "memcpy_s": copy_s,
        "round_over_floor": (float(np.median(times)) / floor_s) if times else None,
        "chief_rss_mb": [e["rss_mb"] for e in rounds_ev], "chief_rss_mb_start": lis["rss_mb"],
        "chief_fds": [e["fds"] for e in rounds_ev], "chief_fds_start": lis["fds"],
        "tcp_mem_mb": [e["tcp_mem_mb"] for e in rounds_ev],
        "tcp_mem_pressure_mb": _tcp_mem_pressure_mb(),
        "chief_cpu_ms_per_update": (1e3 * float(np.median(cpus)) / workers) if cpus else None,
        "chief_busy_fraction": (float(np.median(cpus)) / float(np.median(times))
                                if times else None),
        "worker_procs_cpu_s": sum(w["cpu_s"] for w in wdone),
        "nofile_limit": soft, "elapsed_s": elapsed, "cores": os.cpu_count(),
        "loadavg": os.getloadavg(),
    }
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m fedberry.bench.swarm", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workers", type=int, default=1000)
    p.add_argument("--params", type=int, default=100_000)
    p.add_argument("--rounds", type=int, default=10)
    p.add_argument("--procs", type=int, default=4, help="processes the workers share")
    p.add_argument("--tensors", type=int, default=4)
    p.add_argument("--timeout", type=float, default=900.0, help="the whole run, at most")
    p.add_argument("--receive-buffer", type=int, default=None, metavar="BYTES",
                   help="the chief's SO_RCVBUF per connection (ListenOptions.receive_buffer; "
                        "default: the kernel's autotuning)")
    p.add_argument("--json", default=None, help="also write the figures here")
    p.add_argument("--role", default=None, help=argparse.SUPPRESS)
    p.add_argument("spec", nargs="?", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.role == "chief":
        run_chief(json.loads(args.spec))
        return 0
    if args.role == "workers":
        run_workers(json.loads(args.spec))
        return 0
    if args.workers < 1 or args.params < args.tensors or args.rounds < 2 or args.procs < 1:
        p.error("--workers >= 1, --params >= --tensors, --rounds >= 2, --procs >= 1")
    res = run(args.workers, args.params, args.rounds, args.procs, args.tensors, args.timeout,
              receive_buffer=args.receive_buffer)
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=1))
    med = res["round_s_median"]
    print(f"{res['workers']} workers x {res['params']:,} params, {res['procs']} processes: "
          f"{res['full_rounds']}/{res['rounds_closed']} full rounds, joined {res['joined']}, "
          f"errors {sum(res['errors'].values())}")
    if med is not None:
        print(f"round {med:.3f} s median (after round 1) for {res['mb_per_round']:.0f} MB; "
              f"socket floor {res['socket_floor_s']:.3f} s ({res['round_over_floor']:.1f}x), "
              f"memcpy {res['memcpy_s']:.3f} s")
        print(f"chief: rss {res['chief_rss_mb_start']} MB at start, per round "
              f"{res['chief_rss_mb']}; fds {res['chief_fds_start']} -> {res['chief_fds']}; "
              f"cpu {res['chief_cpu_ms_per_update']:.2f} ms per update (busy "
              f"{100 * res['chief_busy_fraction']:.0f}% of a round); the worker processes "
              f"used {res['worker_procs_cpu_s']:.0f} CPU-s in {res['elapsed_s']:.0f} s")
    for k, v in res["errors"].items():
        print(f"  {v} x {k}")
    return 0 if res["full_rounds"] == res["rounds"] and not res["errors"] else 1


if __name__ == "__main__":
    sys.exit(main())
