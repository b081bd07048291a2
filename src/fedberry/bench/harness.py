"""Runs each mode as real processes over the emulated link and turns their events into figures.

A mode's clock starts when every one of its processes has loaded its data and said it is ready
(``go``), and stops at the first model that reaches the target (or at the mode's time cap, which
is then reported as a lower bound). Bytes are counted where they cross the link:

* on network namespaces, at each worker's interface (``/sys/class/net/eth0``, headers and ACKs
  included). Total = every byte once, at its sender: for dsgd/fedavg what the workers sent plus
  what they received (the chief sent it); for ddp what the workers sent (the access point relays
  each of those bytes to another worker). Per worker = what crossed that worker's own link, both
  directions. Our chief's own socket counts (payload only) and the shaping queues' counters are
  recorded beside them as cross-checks.
* on the in-process shaper (loopback), our chief's socket counts; for ddp the host's loopback
  counter, which is approximate and unshaped, and flagged so.
"""

from __future__ import annotations

import contextlib
import json
import os
import queue
import random
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from .config import BenchConfig, ModeConfig
from .link import CHIEF_PORT, DDP_PORT, BenchLink

READY_TIMEOUT = 180.0  # seven processes importing torch on two cores take a while
REPORT_GRACE = 15.0  # after the target round closed, wait this long for every worker's report


@dataclass
class Point:
    """One evaluated model of a mode's run."""

    t: float  # seconds since go
    k: int  # step, round or (single) optimizer step that produced it
    acc: float
    loss: float | None
    bytes: int | None  # total on the wire so far (see the module docstring)
    per_worker: float | None
    socket_bytes: int | None = None  # our chief's count, payload only


@dataclass
class ModeResult:
    mode: str
    workers: int
    unit: str  # "step" | "round"
    config: dict[str, Any]
    reached: bool = False
    time_to_target_s: float | None = None
    lower_bound: bool = False  # time/bytes/k to target are lower bounds (target not reached)
    k_to_target: int | None = None
    bytes_to_target: int | None = None
    per_worker_to_target: float | None = None
    socket_bytes_to_target: int | None = None
    final_acc: float | None = None
    best_acc: float | None = None
    run_s: float = 0.0
    stop_reason: str = ""
    bytes_source: str = ""
    link_shaped: bool = True
    compute_cpu_s: float | None = None  # mean worker CPU seconds spent training, to target
    compute_wall_s: float | None = None  # the same in wall time on the shared cores
    qdisc_bytes: dict[str, int] | None = None  # whole run, from the shaping queues
    iface_bytes_run: int | None = None  # whole run, total by interface counters
    socket_bytes_run: int | None = None
    crc_match: bool | None = None  # dsgd/fedavg: worker 1's model == the one evaluated
    # 1-minute load average when the mode started and ended: other jobs on the machine show
    # up here (ours alone are about workers + 1 at most).
    loadavg: tuple[float, float] | None = None
    notes: list[str] = field(default_factory=list)
    points: list[Point] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


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


class Procs:
    """The processes of one mode; their JSON events arrive on one queue as (name, event)."""

    def __init__(self, link: BenchLink, logdir: Path) -> None:
        self.link = link
        self.logdir = logdir
        self.events: queue.Queue[tuple[str, dict[str, Any]]] = queue.Queue()
        self.procs: dict[str, subprocess.Popen] = {}
        self._logs: list[Any] = []
        self._lock = threading.Lock()
        (logdir / "events.jsonl").write_text("")

    def start(self, name: str, host: int | str | None, role: str, spec: dict[str, Any]) -> None:
        argv = [sys.executable, "-m", "fedberry.bench.procs", role, json.dumps(spec)]
        log = open(self.logdir / f"{name}.log", "w")  # noqa: SIM115 - closed in stop()
        self._logs.append(log)
        kw: dict[str, Any] = {"stdin": subprocess.PIPE, "stdout": subprocess.PIPE,
                              "stderr": log, "text": True, "bufsize": 1}
        proc = (subprocess.Popen(argv, **kw) if host is None
                else self.link.spawn(host, argv, **kw))
        self.procs[name] = proc
        threading.Thread(target=self._read, args=(name, proc), daemon=True).start()

    def _read(self, name: str, proc: subprocess.Popen) -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            if line.startswith("{"):
                with contextlib.suppress(json.JSONDecodeError):
                    self.events.put((name, json.loads(line)))
                    self._record(name, line)
        self.events.put((name, {"ev": "exit", "code": proc.wait()}))

    def _record(self, name: str, line: str) -> None:
        # Every event of every process, raw, for whoever wants to look behind the table.
        with self._lock, open(self.logdir / "events.jsonl", "a") as f:
            f.write(f'{{"proc": "{name}", "event": {line.strip()}}}\n')

    def wait_for(self, names: list[str], ev: str, timeout: float) -> dict[str, dict[str, Any]]:
        got: dict[str, dict[str, Any]] = {}
        deadline = time.monotonic() + timeout
        while set(names) - set(got):
            left = deadline - time.monotonic()
            if left <= 0:
                raise RuntimeError(f"{sorted(set(names) - set(got))} not {ev} after "
                                   f"{timeout:.0f} s; see {self.logdir}")
            try:
                name, e = self.events.get(timeout=min(left, 1.0))
            except queue.Empty:
                continue
            if e["ev"] == "exit":
                raise RuntimeError(f"{name} exited with code {e['code']} before {ev}; see "
                                   f"{self.logdir / (name + '.log')}")
            if e["ev"] == ev:
                got[name] = e
        return got

    def go(self) -> float:
        t = time.monotonic()
        for p in self.procs.values():
            assert p.stdin is not None
            p.stdin.write("go\n")
            p.stdin.flush()
        return t

    def stop(self) -> None:
        for p in self.procs.values():
            if p.poll() is None:
                p.terminate()
        for p in self.procs.values():
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        for f in self._logs:
            f.close()


class Progress:
    """One line per evaluated model, at most every few seconds unless it matters."""

    def __init__(self, mode: str, unit: str, quiet: bool, every: float = 5.0) -> None:
        self.mode, self.unit, self.quiet, self.every = mode, unit, quiet, every
        self._last = -1e9

    def point(self, p: Point, target: float) -> None:
        if self.quiet:
            return
        now = time.monotonic()
        if p.acc >= target or p.k <= 2 or now - self._last >= self.every:
            self._last = now
            # Worker reports of a round may trail the chief's record: show its count then.
            n = p.bytes if p.bytes is not None else p.socket_bytes
            mb = f"{n / 1e6:9.1f} MB" if n is not None else "        - MB"
            mark = "  <- target" if p.acc >= target else ""
            print(f"  {self.mode:<7} {self.unit} {p.k:>5}  t={p.t:7.1f} s  acc={p.acc:.4f}  "
                  f"{mb}{mark}", flush=True)

    def say(self, text: str) -> None:
        if not self.quiet:
            print(f"  {self.mode:<7} {text}", flush=True)


# ============================================================================================
class Bench:
    def __init__(self, cfg: BenchConfig, link: BenchLink, out: Path, quiet: bool = False) -> None:
        self.cfg = cfg
        self.link = link
        self.out = out
        self.quiet = quiet

    def _spec(self, mode: str, mc: ModeConfig, **extra: Any) -> dict[str, Any]:
        return {"mode": mode, "model": self.cfg.model, "seed": self.cfg.seed,
                "data_dir": self.cfg.data_dir, "batch_size": mc.batch_size,
                "optim": asdict(mc.optim), "count": self.cfg.workers, **extra}

    def _logdir(self, name: str) -> Path:
        d = self.out / "logs" / name
        d.mkdir(parents=True, exist_ok=True)
        return d

    def run(self, mode: str, *, tag: str | None = None, max_k: int | None = None,
            stop_at_target: bool | None = None) -> ModeResult:
        mc = self.cfg.per_mode[mode]
        stop = self.cfg.stop_at_target if stop_at_target is None else stop_at_target
        load0 = os.getloadavg()[0]
        if mode == "single":
            res = self._single(mc, stop)
        elif mode == "ddp":
            res = self._ddp(mc, stop, tag or mode, max_k)
        else:
            res = self._fed(mode, mc, stop, tag or mode, max_k)
        res.loadavg = (load0, os.getloadavg()[0])
        return res

    # -- single ------------------------------------------------------------------------------
    def _single(self, mc: ModeConfig, stop: bool) -> ModeResult:
        res = ModeResult("single", 1, "step", asdict(mc), bytes_source="none (one process)",
                         link_shaped=False)
        prog = Progress("single", "step", self.quiet, every=2.0)
        procs = Procs(self.link, self._logdir("single"))
        spec = self._spec("single", mc, count=1, index=1, target=self.cfg.target,
                          stop_at_target=stop, time_cap_s=mc.time_cap_s,
                          eval_every=mc.eval_every)
        try:
            procs.start("single", None, "single", spec)
            procs.wait_for(["single"], "ready", READY_TIMEOUT)
            t_go = procs.go()
            cpu = None
            while True:
                try:
                    _, e = procs.events.get(timeout=1.0)
                except queue.Empty:
                    if time.monotonic() - t_go > mc.time_cap_s * 3 + 60:
                        res.stop_reason = "harness timeout"
                        break
                    continue
                if e["ev"] == "exit":
                    if e["code"] != 0:
                        res.notes.append(f"exited with code {e['code']}")
                    break
                if e["ev"] == "eval":
                    p = Point(e["elapsed"], e["steps"], e["acc"], e["loss"], 0, 0.0)
                    res.points.append(p)
                    prog.point(p, self.cfg.target)
                    if p.acc >= self.cfg.target and res.time_to_target_s is None:
                        cpu = e["cpu"]
            res.run_s = time.monotonic() - t_go
        finally:
            procs.stop()
        res.compute_cpu_s = cpu
        self._finish(res, mc, "training time (evaluation excluded)")
        return res

    # -- dsgd and fedavg through our chief ---------------------------------------------------
    def _fed(self, mode: str, mc: ModeConfig, stop: bool, tag: str,
             max_k: int | None) -> ModeResult:
        n = self.cfg.workers
        unit = "step" if mode == "dsgd" else "round"
        res = ModeResult(mode, n, unit, asdict(mc))
        prog = Progress(tag, unit, self.quiet)
        procs = Procs(self.link, self._logdir(tag))
        netns = self.link.iface is not None
        res.bytes_source = ("worker interfaces (eth0, headers included)" if netns
                            else "chief's sockets (payload)")
        max_rounds = max_k or mc.max_steps
        names = [f"worker{i}" for i in range(1, n + 1)]
        try:
            procs.start("chief", "chief", "chief", self._spec(
                mode, mc, host=self.link.chief_host, port=CHIEF_PORT if netns else 0,
                max_rounds=max_rounds, shaper_mbit=self.link.shaper_mbit,
                downlink=mc.downlink))
            port = procs.wait_for(["chief"], "listening", READY_TIMEOUT)["chief"]["port"]
            url = f"tcp://{self.link.chief_host}:{port}"
            for i, name in enumerate(names):
                procs.start(name, i, "fed", self._spec(
                    mode, mc, chief=url, index=i + 1, iface=self.link.iface,
                    local_epochs=mc.local_epochs, codec=mc.codec))
            ready = procs.wait_for(["chief", *names], "ready", READY_TIMEOUT)
            base = {w: ready[w]["tx"] + ready[w]["rx"] for w in names}
            base_tx = {w: ready[w]["tx"] for w in names}
            q0 = self.link.qdisc_bytes()
            t_go = procs.go()
            rounds: dict[int, dict[str, Any]] = {}
            syncs: dict[int, dict[str, dict[str, Any]]] = {}
            last_sync: dict[str, dict[str, Any]] = {}
            done_k: int | None = None  # the round at which we stop
            done_at = 0.0
            socket_cum = 0
            emitted = 0  # rounds turned into points
            while True:
                now = time.monotonic()
                if done_k is not None and (len(syncs.get(done_k, {})) == n
                                           or now - done_at > REPORT_GRACE):
                    break
                if done_k is None and now - t_go > mc.time_cap_s:
                    res.stop_reason = f"time cap ({mc.time_cap_s:.0f} s)"
                    break
                try:
                    name, e = procs.events.get(timeout=0.5)
                except queue.Empty:
                    continue
                if e["ev"] == "exit":
                    if name == "chief" or e["code"] != 0:
                        if done_k is None:
                            res.stop_reason = res.stop_reason or f"{name} exited ({e['code']})"
                            if e["code"] not in (0, None):
                                res.notes.append(f"{name} exited with code {e['code']}")
                        if name == "chief":
                            break
                    continue
                if e["ev"] == "round":
                    rounds[e["round"]] = e
                elif e["ev"] == "sync":
                    syncs.setdefault(e["round"], {})[name] = e
                    last_sync[name] = e
                # Points are made in round order, once the chief has evaluated a round.
                while emitted + 1 in rounds:
                    r = rounds[emitted + 1]
                    emitted += 1
                    socket_cum += r["up"] + r["down"]
                    if r["acc"] is None:
                        continue
                    p = Point(r["t"] - t_go, r["round"], r["acc"], r["loss"], None, None,
                              socket_cum)
                    res.points.append(p)
                    if done_k is None and (
                            (stop and p.acc >= self.cfg.target) or r["round"] >= max_rounds):
                        done_k, done_at = r["round"], time.monotonic()
                        res.stop_reason = ("target reached" if p.acc >= self.cfg.target
                                           else f"{max_rounds} {unit}s")
                    self._fed_bytes(p, syncs.get(p.k, {}), base, base_tx, n, netns)
                    prog.point(p, self.cfg.target)
            res.run_s = time.monotonic() - t_go
        finally:
            procs.stop()
        # Fill in bytes for points whose worker reports came after the chief's round record.
        for p in res.points:
            if p.bytes is None:
                self._fed_bytes(p, syncs.get(p.k, {}), base, base_tx, n, netns)
        q1 = self.link.qdisc_bytes()
        if q0 is not None and q1 is not None:
            res.qdisc_bytes = {k: q1[k] - q0[k] for k in q1}
        res.socket_bytes_run = socket_cum
        if netns and len(last_sync) == n:
            res.iface_bytes_run = sum(last_sync[w]["tx"] + last_sync[w]["rx"] - base[w]
                                      for w in names)
        self._finish(res, mc, "")
        k = res.k_to_target if res.reached else (res.points[-1].k if res.points else None)
        if k is not None and len(syncs.get(k, {})) == n:
            at = syncs[k]
            res.compute_cpu_s = sum(e["cpu"] for e in at.values()) / n
            res.compute_wall_s = sum(e["compute"] for e in at.values()) / n
            w1 = at.get("worker1", {}).get("crc")
            chief_crc = rounds.get(k, {}).get("crc")
            if w1 is not None and chief_crc is not None:
                res.crc_match = w1 == chief_crc
                if not res.crc_match:
                    res.notes.append("worker 1's model differs from the evaluated one")
        return res

    @staticmethod
    def _fed_bytes(p: Point, at: dict[str, dict[str, Any]], base: dict[str, int],
                   base_tx: dict[str, int], n: int, netns: bool) -> None:
        if len(at) < n:
            if not netns:  # the chief's count stands for the total either way
                p.bytes, p.per_worker = p.socket_bytes, (p.socket_bytes or 0) / n
            return
        if netns:
            per = [e["tx"] + e["rx"] - base[w] for w, e in at.items()]
            p.bytes = sum(per)
        else:
            per = [e["sent"] + e["received"] for e in at.values()]
            p.bytes = p.socket_bytes
        p.per_worker = sum(per) / n

    # -- ddp ---------------------------------------------------------------------------------
    def _ddp(self, mc: ModeConfig, stop: bool, tag: str, max_k: int | None) -> ModeResult:
        n = self.cfg.workers
        netns = self.link.iface is not None
        res = ModeResult("ddp", n, "step", asdict(mc), link_shaped=netns,
                         bytes_source=("worker interfaces (eth0, headers included)" if netns
                                       else "host loopback counter (approximate)"))
        if not netns:
            res.notes.append("unshaped: the in-process shaper lives in our transport, gloo "
                             "does not go through it")
        prog = Progress(tag, "step", self.quiet)
        procs = Procs(self.link, self._logdir(tag))
        shm = "/dev/shm" if os.path.isdir("/dev/shm") else None
        snapdir = Path(tempfile.mkdtemp(prefix="fedberry-ddp-", dir=shm))
        names = [f"rank{i}" for i in range(n)]
        max_steps = max_k or mc.max_steps
        evaluator = _SnapshotEvaluator(snapdir, self.cfg.model, self.cfg.data_dir, procs.events)
        try:
            port = DDP_PORT if netns else _free_port()
            for i, name in enumerate(names):
                procs.start(name, i, "ddp", self._spec(
                    "ddp", mc, index=i + 1, iface=self.link.iface, master=self.link.worker_host(0),
                    port=port, snapshots=str(snapdir), max_steps=max_steps))
            ready = procs.wait_for(names, "ready", READY_TIMEOUT)
            base = {w: ready[w]["tx"] + ready[w]["rx"] for w in names}
            base_tx = {w: ready[w]["tx"] for w in names}
            q0 = self.link.qdisc_bytes()
            lo0 = self.link.loopback_bytes()
            evaluator.start()
            t_go = procs.go()
            steps: dict[int, dict[str, dict[str, Any]]] = {}
            lo_at: dict[int, int] = {}
            evals: dict[int, tuple[float, float]] = {}
            emitted = 0
            done_k: int | None = None
            done_at = 0.0
            exited = 0
            while True:
                now = time.monotonic()
                if done_k is not None and (len(steps.get(done_k, {})) == n
                                           or now - done_at > REPORT_GRACE):
                    break
                if done_k is None and now - t_go > mc.time_cap_s:
                    res.stop_reason = f"time cap ({mc.time_cap_s:.0f} s)"
                    break
                try:
                    name, e = procs.events.get(timeout=0.5)
                except queue.Empty:
                    continue
                if e["ev"] == "exit":
                    exited += 1
                    if e["code"] not in (0, None):
                        res.notes.append(f"{name} exited with code {e['code']}")
                    if exited == n and done_k is None and emitted >= len(steps):
                        res.stop_reason = res.stop_reason or "all ranks exited"
                        break
                    continue
                if e["ev"] == "step":
                    steps.setdefault(e["step"], {})[name] = e
                    if name == "rank0" and not netns:
                        lo_at[e["step"]] = self.link.loopback_bytes() - lo0
                    if res.points and res.points[-1].k == e["step"]:
                        self._ddp_bytes(res.points[-1], steps[e["step"]], base, base_tx, n,
                                        netns)
                elif e["ev"] == "eval":
                    evals[e["step"]] = (e["acc"], e["loss"])
                while emitted + 1 in evals and "rank0" in steps.get(emitted + 1, {}):
                    emitted += 1
                    acc, loss = evals.pop(emitted)
                    p = Point(steps[emitted]["rank0"]["t"] - t_go, emitted, acc, loss, None,
                              None)
                    if not netns:
                        p.bytes = lo_at.get(emitted)
                    res.points.append(p)
                    self._ddp_bytes(p, steps.get(emitted, {}), base, base_tx, n, netns)
                    prog.point(p, self.cfg.target)
                    if done_k is None and ((stop and acc >= self.cfg.target)
                                           or emitted >= max_steps):
                        done_k, done_at = emitted, time.monotonic()
                        res.stop_reason = ("target reached" if acc >= self.cfg.target
                                           else f"{max_steps} steps")
                if exited == n and emitted >= max(steps, default=0):
                    res.stop_reason = res.stop_reason or "all ranks exited"
                    break
            res.run_s = time.monotonic() - t_go
        finally:
            evaluator.stop()
            procs.stop()
            shutil.rmtree(snapdir, ignore_errors=True)
        for p in res.points:
            if p.per_worker is None:
                self._ddp_bytes(p, steps.get(p.k, {}), base, base_tx, n, netns)
        q1 = self.link.qdisc_bytes()
        if q0 is not None and q1 is not None:
            res.qdisc_bytes = {k: q1[k] - q0[k] for k in q1}
        last = {w: max((e for s in steps.values() for nm, e in s.items() if nm == w),
                       key=lambda e: e["step"], default=None) for w in names}
        if netns and all(last.values()):
            res.iface_bytes_run = sum(last[w]["tx"] - base_tx[w] for w in names)  # type: ignore[index]
        self._finish(res, mc, "")
        k = res.k_to_target if res.reached else (res.points[-1].k if res.points else None)
        if k is not None and len(steps.get(k, {})) == n:
            res.compute_cpu_s = sum(e["cpu"] for e in steps[k].values()) / n
        return res

    @staticmethod
    def _ddp_bytes(p: Point, at: dict[str, dict[str, Any]], base: dict[str, int],
                   base_tx: dict[str, int], n: int, netns: bool) -> None:
        if not netns:
            p.per_worker = None if p.bytes is None else p.bytes / n
            return
        if len(at) < n:
            return
        p.bytes = sum(e["tx"] - base_tx[w] for w, e in at.items())
        p.per_worker = sum(e["tx"] + e["rx"] - base[w] for w, e in at.items()) / n

    # -- shared ------------------------------------------------------------------------------
    def _finish(self, res: ModeResult, mc: ModeConfig, time_note: str) -> None:
        target = self.cfg.target
        if time_note:
            res.notes.append(f"time = {time_note}")
        if not res.points:
            res.notes.append("no model was evaluated")
            res.lower_bound = True
            res.time_to_target_s = max(res.run_s, mc.time_cap_s)
            return
        res.final_acc = res.points[-1].acc
        res.best_acc = max(p.acc for p in res.points)
        hit = next((p for p in res.points if p.acc >= target), None)
        if hit is not None:
            res.reached = True
            at = hit
            res.time_to_target_s = hit.t
        else:
            # Not reached: the cap (or the time it ran, if it stopped earlier) is a lower bound,
            # and so are the bytes and steps spent until then.
            at = res.points[-1]
            res.lower_bound = True
            stopped_by_cap = res.stop_reason.startswith("time cap")
            res.time_to_target_s = max(mc.time_cap_s if stopped_by_cap else at.t, at.t)
        res.k_to_target = at.k
        res.bytes_to_target = at.bytes
        res.per_worker_to_target = at.per_worker
        res.socket_bytes_to_target = at.socket_bytes
        if not res.stop_reason:
            res.stop_reason = "target reached" if res.reached else "ended"


class _SnapshotEvaluator:
    """Evaluates ddp rank 0's per-step weights on the test set, in step order, beside training
    (as our chief evaluates beside dsgd), and posts ``eval`` events to the harness's queue."""

    def __init__(self, snapdir: Path, model: str, data_dir: str | None,
                 events: queue.Queue[tuple[str, dict[str, Any]]]) -> None:
        self.snapdir, self.model, self.data_dir, self.events = snapdir, model, data_dir, events
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True, name="ddp-eval")

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(10)

    def _run(self) -> None:
        import numpy as np
        import torch

        from ..data.fashion_mnist import load_fashion_mnist
        from ..models import build_model, evaluate, model_input

        torch.set_num_threads(1)
        data = load_fashion_mnist(self.data_dir)
        x, y = model_input(self.model, data.x_test), data.y_test
        net = build_model(self.model)
        params = list(net.parameters())
        step = 1
        while not self._stop.is_set():
            path = self.snapdir / f"step-{step:06d}.npy"
            if not path.exists():
                time.sleep(0.05)
                continue
            flat = np.load(path)
            path.unlink()
            with torch.no_grad():
                offset = 0
                for p in params:
                    p.copy_(torch.from_numpy(flat[offset:offset + p.numel()]).view_as(p))
                    offset += p.numel()
            acc, loss = evaluate(net, x, y)
            self.events.put(("evaluator", {"ev": "eval", "step": step, "acc": acc, "loss": loss}))
            step += 1
