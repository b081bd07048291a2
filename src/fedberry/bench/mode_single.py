"""single: one process with all the data; it evaluates itself and stops at the target."""

from __future__ import annotations

import queue
import time
from dataclasses import asdict

from fedberry.bench.config import ModeConfig
from fedberry.bench.context import BenchContext
from fedberry.bench.process_group import ProcessGroup
from fedberry.bench.progress import Progress
from fedberry.bench.results import ModeResult, Point, finish


def run_single(bench: BenchContext, mc: ModeConfig, stop: bool) -> ModeResult:
    target = bench.cfg.target
    res = ModeResult("single", 1, "step", asdict(mc), bytes_source="none (one process)",
                     link_shaped=False)
    prog = Progress("single", "step", bench.quiet, every=2.0)
    procs = ProcessGroup(bench.link, bench.logdir("single"), bench.quotas)
    spec = bench.spec("single", mc, count=1, index=1, target=target, stop_at_target=stop,
                      time_cap_s=mc.time_cap_s, eval_every=mc.eval_every)
    try:
        procs.start("single", None, "single", spec, device=True)
        procs.wait_for(["single"], "ready")
        t_go = procs.go()
        cpu = speed = None
        cores = bench.device_cores
        # The process keeps its own time cap; this one is only for a process that hangs.
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
                t = e["elapsed"]
                if cores:
                    # The process evaluates itself with the clock paused, but under a quota the
                    # evaluation spends the device's CPU budget too, and the kernel may throttle
                    # the training steps after it or the evaluation itself: the training time is
                    # at least its CPU time at the device's share of a core.
                    t = max(t, e["cpu"] / cores)
                p = Point(t, e["steps"], e["acc"], e["loss"], 0, 0.0)
                res.points.append(p)
                prog.point(p, target)
                if p.acc >= target and cpu is None:
                    cpu = e["cpu"]
                    speed = e["samples"] / t if t > 0 else None
        res.run_s = time.monotonic() - t_go
    finally:
        procs.stop()
    res.compute_cpu_s = cpu
    res.samples_per_s = speed
    res.device_cpu = bench.device_cores
    finish(res, mc, target, "training time (evaluation excluded)" + (
        "; under the quota at least training CPU / quota" if bench.device_cores else ""))
    return res
