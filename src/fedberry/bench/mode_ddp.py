"""ddp: PyTorch DistributedDataParallel (gloo) ranks, rank 0's models evaluated beside them."""

from __future__ import annotations

import os
import random
import shutil
import socket
import tempfile
from dataclasses import asdict
from pathlib import Path

from fedberry.bench.config import ModeConfig
from fedberry.bench.context import BenchContext
from fedberry.bench.ddp_eval import SnapshotEvaluator
from fedberry.bench.link import DDP_PORT
from fedberry.bench.process_group import Event, ProcessGroup
from fedberry.bench.progress import Progress
from fedberry.bench.results import ModeResult, Point, finish
from fedberry.bench.tracking import IFACE_SOURCE, Baseline, Reports, Tracker, qdisc_delta


def run_ddp(bench: BenchContext, mc: ModeConfig, stop: bool, tag: str,
            max_k: int | None) -> ModeResult:
    return _DdpRun(bench, mc, stop, tag, max_k).run()


def _free_port() -> int:
    # Below Linux's ephemeral range (32768-60999): a rank that dials the store before rank 0
    # listens could otherwise be given the store's own port as its source port, connect to
    # itself, and leave rank 0 with EADDRINUSE.
    for port in random.sample(range(20000, 32000), 200):
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError("no free port for the ddp rendezvous")


class _DdpRun:
    def __init__(self, bench: BenchContext, mc: ModeConfig, stop: bool, tag: str,
                 max_k: int | None) -> None:
        self.bench, self.mc = bench, mc
        n = bench.cfg.workers
        self.netns = bench.link.iface is not None
        self.res = ModeResult("ddp", n, "step", asdict(mc), link_shaped=self.netns,
                              bytes_source=(IFACE_SOURCE if self.netns
                                            else "host loopback counter (approximate)"))
        if bench.cfg.latency == "relay" and bench.cfg.delay_ms > 0:
            self.res.notes.append("no latency: gloo's ring does not pass the relay")
        if not self.netns:
            self.res.notes.append("unshaped: the in-process shaper lives in our transport, gloo "
                                  "does not go through it")
        self.procs = ProcessGroup(bench.link, bench.logdir(tag), bench.quotas)
        self.names = [f"rank{i}" for i in range(n)]
        self.track = Tracker(self.res, Progress(tag, "step", bench.quiet),
                             target=bench.cfg.target, stop=stop, max_k=max_k or mc.max_steps,
                             time_cap_s=mc.time_cap_s, bytes_of=self._bytes)
        self.evals: dict[int, tuple[float, float]] = {}  # step -> (acc, loss), not yet a point
        self.lo_at: dict[int, int] = {}  # loopback: the host's count at rank 0's step
        self.lo0 = 0
        self.emitted = 0  # the last step turned into a point
        self.exited = 0
        self.t_go = 0.0
        self.base: Baseline  # once the ranks are ready

    def run(self) -> ModeResult:
        bench, mc, procs, res, link = self.bench, self.mc, self.procs, self.res, self.bench.link
        shm = "/dev/shm" if os.path.isdir("/dev/shm") else None
        snapdir = Path(tempfile.mkdtemp(prefix="fedberry-ddp-", dir=shm))
        evaluator = SnapshotEvaluator(snapdir, bench.cfg.model, bench.cfg.data_dir, procs.events)
        try:
            port = DDP_PORT if self.netns else _free_port()
            for i, name in enumerate(self.names):
                procs.start(name, i, "ddp", bench.spec(
                    "ddp", mc, index=i + 1, iface=link.iface, master=link.worker_host(0),
                    port=port, snapshots=str(snapdir), max_steps=self.track.max_k),
                    device=True)
            ready = procs.wait_for(self.names, "ready")
            self.base = Baseline(ready, self.names)
            q0 = link.qdisc_bytes()
            self.lo0 = link.loopback_bytes()
            evaluator.start()
            self.t_go = procs.go()
            self.track.follow(procs, self.t_go, self._on_event)
        finally:
            evaluator.stop()
            procs.stop()
            shutil.rmtree(snapdir, ignore_errors=True)
        self.track.fill_bytes()
        res.qdisc_bytes = qdisc_delta(q0, link.qdisc_bytes())
        steps = self.track.reports
        last = {w: max((e for s in steps.values() for nm, e in s.items() if nm == w),
                       key=lambda e: e["step"], default=None) for w in self.names}
        if self.netns and all(last.values()):
            res.iface_bytes_run = sum(self.base.sent(w, last[w]) for w in self.names)  # type: ignore[arg-type]
        finish(res, mc, bench.cfg.target)
        res.device_cpu = bench.device_cores
        at_result = self.track.result_reports()
        if at_result is not None:
            res.compute_cpu_s = sum(e["cpu"] for e in at_result[1].values()) / res.workers
        return res

    def _on_event(self, name: str, e: Event) -> bool:
        res, track, n = self.res, self.track, self.res.workers
        steps = track.reports
        if e["ev"] == "exit":
            self.exited += 1
            if e["code"] not in (0, None):
                res.notes.append(f"{name} exited with code {e['code']}")
            if self.exited == n and track.done_k is None and self.emitted >= len(steps):
                res.stop_reason = res.stop_reason or "all ranks exited"
                return True
            return False
        if e["ev"] == "step":
            at = track.report(e["step"], name, e)
            if name == "rank0" and not self.netns:
                self.lo_at[e["step"]] = self.bench.link.loopback_bytes() - self.lo0
            if res.points and res.points[-1].k == e["step"]:
                self._bytes(res.points[-1], at)
        elif e["ev"] == "eval":
            self.evals[e["step"]] = (e["acc"], e["loss"])
        while self.emitted + 1 in self.evals and "rank0" in steps.get(self.emitted + 1, {}):
            self.emitted += 1
            acc, loss = self.evals.pop(self.emitted)
            p = Point(steps[self.emitted]["rank0"]["t"] - self.t_go, self.emitted, acc, loss,
                      None, None)
            if not self.netns:
                p.bytes = self.lo_at.get(self.emitted)
            track.add(p)
        if self.exited == n and self.emitted >= max(steps, default=0):
            res.stop_reason = res.stop_reason or "all ranks exited"
            return True
        return False

    def _bytes(self, p: Point, at: Reports) -> None:
        n = self.res.workers
        if not self.netns:
            p.per_worker = None if p.bytes is None else p.bytes / n
            return
        if len(at) < n:
            return
        p.bytes = sum(self.base.sent(w, e) for w, e in at.items())
        p.per_worker = sum(self.base.crossed(w, e) for w, e in at.items()) / n
