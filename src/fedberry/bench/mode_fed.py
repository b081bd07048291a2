"""dsgd and fedavg: workers through our chief, which evaluates every round's model."""

from __future__ import annotations

from dataclasses import asdict
from typing import Any

from fedberry.bench.config import ModeConfig
from fedberry.bench.context import BenchContext
from fedberry.bench.link import CHIEF_PORT, RELAY_PORT
from fedberry.bench.process_group import Event, ProcessGroup
from fedberry.bench.progress import Progress
from fedberry.bench.results import ModeResult, Point, finish
from fedberry.bench.tracking import IFACE_SOURCE, Baseline, Reports, Tracker, qdisc_delta


def run_fed(bench: BenchContext, mode: str, mc: ModeConfig, stop: bool, tag: str,
            max_k: int | None) -> ModeResult:
    return _FedRun(bench, mode, mc, stop, tag, max_k).run()


class _FedRun:
    def __init__(self, bench: BenchContext, mode: str, mc: ModeConfig, stop: bool, tag: str,
                 max_k: int | None) -> None:
        self.bench, self.mode, self.mc = bench, mode, mc
        n = bench.cfg.workers
        unit = "step" if mode == "dsgd" else "round"
        self.netns = bench.link.iface is not None
        self.res = ModeResult(mode, n, unit, asdict(mc), bytes_source=(
            IFACE_SOURCE if self.netns else "chief's sockets (payload)"))
        self.procs = ProcessGroup(bench.link, bench.logdir(tag), bench.quotas)
        self.names = [f"worker{i}" for i in range(1, n + 1)]
        self.track = Tracker(self.res, Progress(tag, unit, bench.quiet), target=bench.cfg.target,
                             stop=stop, max_k=max_k or mc.max_steps, time_cap_s=mc.time_cap_s,
                             bytes_of=self._bytes)
        self.rounds: dict[int, Event] = {}  # the chief's record of each round
        self.last_sync: dict[str, Event] = {}
        self.socket_cum = 0
        self.emitted = 0  # rounds turned into points
        self.t_go = 0.0
        self.base: Baseline  # once the workers are ready

    def run(self) -> ModeResult:
        bench, mc, procs, res, link = self.bench, self.mc, self.procs, self.res, self.bench.link
        try:
            procs.start("chief", "chief", "chief", bench.spec(
                self.mode, mc, host=link.chief_host, port=CHIEF_PORT if self.netns else 0,
                max_rounds=self.track.max_k, shaper_mbit=link.shaper_mbit,
                downlink=mc.downlink))
            port = procs.wait_for(["chief"], "listening")["chief"]["port"]
            cfg = bench.cfg
            if cfg.latency == "relay" and (cfg.delay_ms > 0 or cfg.reset_per_s > 0):
                # The workers dial the relay beside the chief; it holds every byte for the
                # delay. In the namespaces it hands on over the chief's own loopback, so the
                # shaped link is still the workers' side of it.
                port = self._start_relay(f"{link.chief_host}:{port}", latency=True)
            self._start_workers("fed", chief=f"tcp://{link.chief_host}:{port}", codec=mc.codec)
            ready = procs.wait_for(["chief", *self.names], "ready")
            self.base = Baseline(ready, self.names)
            q0 = link.qdisc_bytes()
            self.t_go = procs.go()
            self.track.follow(procs, self.t_go, self._on_event)
        finally:
            procs.stop()
        self.track.fill_bytes()
        res.qdisc_bytes = qdisc_delta(q0, link.qdisc_bytes())
        res.socket_bytes_run = self.socket_cum
        if self.netns and len(self.last_sync) == res.workers:
            res.iface_bytes_run = sum(self.base.crossed(w, self.last_sync[w])
                                      for w in self.names)
        finish(res, mc, bench.cfg.target)
        res.device_cpu = bench.device_cores
        self._compute_and_crc()
        return res

    def _start_relay(self, upstream: str, latency: bool, rate_mbit: float | None = None) -> int:
        """The relay beside the chief, in front of ``upstream``: the run's latency (if
        ``latency``) and, off the namespaces, the link's rate for those our shaper cannot
        reach (``rate_mbit``, the flower mode). Returns the port the workers dial."""
        cfg, link = self.bench.cfg, self.bench.link
        spec: dict[str, Any] = {
            "host": link.chief_host, "port": RELAY_PORT if self.netns else 0,
            "upstream": upstream, "delay_ms": cfg.delay_ms if latency else 0.0,
            "jitter_ms": cfg.jitter_ms if latency else 0.0,
            "reset_per_s": cfg.reset_per_s if latency else 0.0}
        if rate_mbit is not None:
            spec["rate_mbit"] = rate_mbit
        self.procs.start("relay", "chief", "relay", spec)
        port = self.procs.wait_for(["relay"], "listening")["relay"]["port"]
        if latency:
            self.res.notes.append(f"latency {cfg.delay_ms:g} +- {cfg.jitter_ms:g} ms one way "
                                  "(relay)")
        return int(port)

    def _start_workers(self, role: str, python: str | None = None,
                       module: str = "fedberry.bench.procs", **extra: Any) -> None:
        """One worker per host, an emulated device each: the mode's training settings, and
        ``extra`` (where the chief is, the codec)."""
        for i, name in enumerate(self.names):
            self.procs.start(name, i, role, self.bench.spec(
                self.mode, self.mc, index=i + 1, iface=self.bench.link.iface,
                local_epochs=self.mc.local_epochs, **extra), device=True, python=python,
                module=module)

    def _on_event(self, name: str, e: Event) -> bool:
        res = self.res
        if e["ev"] == "exit":
            if name == "relay" and e["code"] not in (0, None) and self.track.done_k is None:
                res.notes.append(f"the relay exited with code {e['code']}")
                res.stop_reason = res.stop_reason or "the relay exited"
                return True
            if name == "chief" or e["code"] != 0:
                if self.track.done_k is None:
                    res.stop_reason = res.stop_reason or f"{name} exited ({e['code']})"
                    if e["code"] not in (0, None):
                        res.notes.append(f"{name} exited with code {e['code']}")
                return name == "chief"
            return False
        if e["ev"] == "round":
            self.rounds[e["round"]] = e
        elif e["ev"] == "sync":
            self.track.report(e["round"], name, e)
            self.last_sync[name] = e
        # Points are made in round order, once the chief has evaluated a round.
        while self.emitted + 1 in self.rounds:
            r = self.rounds[self.emitted + 1]
            self.emitted += 1
            self.socket_cum += r["up"] + r["down"]
            if r["acc"] is not None:
                self.track.add(Point(r["t"] - self.t_go, r["round"], r["acc"], r["loss"], None,
                                     None, self.socket_cum))
        return False

    def _bytes(self, p: Point, at: Reports) -> None:
        n = self.res.workers
        if len(at) < n:
            if not self.netns:  # the chief's count stands for the total either way
                p.bytes, p.per_worker = p.socket_bytes, (p.socket_bytes or 0) / n
            return
        if self.netns:
            per = [self.base.crossed(w, e) for w, e in at.items()]
            p.bytes = sum(per)
        else:
            per = [e["sent"] + e["received"] for e in at.values()]
            p.bytes = p.socket_bytes
        p.per_worker = sum(per) / n

    def _compute_and_crc(self) -> None:
        res, at_result = self.res, self.track.result_reports()
        if at_result is None:
            return
        k, at = at_result
        n = res.workers
        res.compute_cpu_s = sum(e["cpu"] for e in at.values()) / n
        res.compute_wall_s = sum(e["compute"] for e in at.values()) / n
        speeds = [e["samples"] / e["compute"] for e in at.values()
                  if e.get("samples") and e.get("compute")]
        res.samples_per_s = sum(speeds) / len(speeds) if speeds else None
        share = res.compute_cpu_s / res.compute_wall_s if res.compute_wall_s else None
        if res.device_cpu and share is not None and share < 0.8 * res.device_cpu:
            # The quota is a ceiling: on a busy machine a device gets less, and the mode's
            # time is then not a device's.
            res.notes.append(f"the devices trained at {share:.2f} of a core on average, below "
                             f"their quota of {res.device_cpu:g}: the machine is busy")
        w1 = at.get("worker1", {}).get("crc")
        chief_crc = self.rounds.get(k, {}).get("crc")
        if w1 is not None and chief_crc is not None:
            res.crc_match = w1 == chief_crc
            if not res.crc_match:
                res.notes.append("worker 1's model differs from the evaluated one")
