"""flower: fedavg's training through Flower 1.42's legacy gRPC path, over the same link.

The processes are flower_procs.py, run by the Flower Python (flower_python.py); everything else
is fedavg's (mode_fed.py): the same placement (server in the chief's place, clients on the
workers' hosts), the same latency relay in front of the server, the same CPU quota on the
clients, the same points (the server evaluates every round's model on the test set) and the
same byte counts (the workers' interfaces on the namespace link). Flower sends float32 both
ways and downloads the initial model in round 1: that is its protocol, counted as it is.

On the in-process shaper (no namespaces) our shaper cannot reach Flower's gRPC sockets; the
relay then carries the link's rate as well, and the bytes are the relay's payload counts of the
whole run (Flower's clients cannot count theirs), so the per-round bytes are not known there.
"""

from __future__ import annotations

import queue
import socket
import time
from typing import Any

from fedberry.bench.config import ModeConfig
from fedberry.bench.context import BenchContext
from fedberry.bench.link import CHIEF_PORT
from fedberry.bench.mode_fed import _FedRun
from fedberry.bench.process_group import ProcessGroup
from fedberry.bench.results import ModeResult, Point, finish
from fedberry.bench.tracking import Baseline, Reports, qdisc_delta

MODULE = "fedberry.bench.flower_procs"
RELAY_STOP_S = 10.0


def run_flower(bench: BenchContext, mc: ModeConfig, stop: bool, tag: str, python: str,
               version: str, max_k: int | None = None) -> ModeResult:
    return _FlowerRun(bench, "flower", mc, stop, tag, max_k, python, version).run()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _stop_relay(procs: ProcessGroup) -> dict[str, Any] | None:
    """Stops the relay first and takes its payload counts (it prints them on SIGTERM)."""
    relay = procs.procs["relay"]
    if relay.poll() is None:
        relay.terminate()
    deadline = time.monotonic() + RELAY_STOP_S
    while time.monotonic() < deadline:
        try:
            name, e = procs.events.get(timeout=0.5)
        except queue.Empty:
            continue
        if name == "relay" and e["ev"] == "done":
            return e
        if name == "relay" and e["ev"] == "exit":
            return None
    return None


class _FlowerRun(_FedRun):
    def __init__(self, bench: BenchContext, mode: str, mc: ModeConfig, stop: bool, tag: str,
                 max_k: int | None, python: str, version: str) -> None:
        super().__init__(bench, mode, mc, stop, tag, max_k)
        self.python = python
        self.res.notes.append(f"Flower {version}, legacy gRPC (start_server/start_client), "
                              f"FedAvg, server-side evaluate_fn; {python}")
        if not self.netns:
            self.res.bytes_source = "relay's sockets (payload), whole run only"

    def run(self) -> ModeResult:
        bench, mc, procs, res, link = self.bench, self.mc, self.procs, self.res, self.bench.link
        cfg = bench.cfg
        relay_stats = None
        q0 = None
        try:
            port = CHIEF_PORT if self.netns else _free_port()
            procs.start("chief", "chief", "flower_server", bench.spec(
                "flower", mc, host=link.chief_host, port=port, max_rounds=self.track.max_k),
                python=self.python, module=MODULE)
            procs.wait_for(["chief"], "listening")
            rate = None if self.netns else cfg.rate_mbit
            latency = cfg.latency == "relay" and (cfg.delay_ms > 0 or cfg.reset_per_s > 0)
            if latency or rate is not None:
                port = self._start_relay(f"{link.chief_host}:{port}", latency, rate)
            self._start_workers("flower_client", python=self.python, module=MODULE,
                                server=f"{link.chief_host}:{port}")
            ready = procs.wait_for(["chief", *self.names], "ready")
            self.base = Baseline(ready, self.names)
            q0 = link.qdisc_bytes()
            self.t_go = procs.go()
            self.track.follow(procs, self.t_go, self._on_event)
        finally:
            relay_stats = _stop_relay(procs) if "relay" in procs.procs else None
            procs.stop()
        self.track.fill_bytes()
        res.qdisc_bytes = qdisc_delta(q0, link.qdisc_bytes())
        for p in res.points:
            p.socket_bytes = None  # no payload count per round: Flower's sockets are its own
        if self.netns and len(self.last_sync) == res.workers:
            res.iface_bytes_run = sum(self.base.crossed(w, self.last_sync[w])
                                      for w in self.names)
        if relay_stats is not None:
            res.socket_bytes_run = relay_stats.get("up", 0) + relay_stats.get("down", 0)
        finish(res, mc, cfg.target)
        if not self.netns and res.socket_bytes_run:
            # Whole-run payload, which includes what came after the target: an upper bound.
            res.bytes_to_target = res.socket_bytes_run
            res.per_worker_to_target = res.socket_bytes_run / res.workers
            res.notes.append("bytes: the relay's payload count of the whole run (an upper "
                             "bound of the bytes to target)")
        res.device_cpu = bench.device_cores
        self._compute_and_crc()
        return res

    def _bytes(self, p: Point, at: Reports) -> None:
        if self.netns and len(at) == self.res.workers:
            per = [self.base.crossed(w, e) for w, e in at.items()]
            p.bytes = sum(per)
            p.per_worker = p.bytes / self.res.workers
