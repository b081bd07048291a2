"""One benchmark run: open the link, run the modes one after the other, write the results."""

from __future__ import annotations

import contextlib
import json
import time
from pathlib import Path
from typing import Any

from fedberry.bench import flower_python, report
from fedberry.bench import link as link_mod
from fedberry.bench.config import BenchConfig
from fedberry.bench.cpu_quota import DeviceQuotas, fit_quota
from fedberry.bench.harness import Bench, ModeResult
from fedberry.bench.shaper import mbit_to_bytes_per_s, tcp_payload_fraction


def run(cfg: BenchConfig, *, quiet: bool = False, command: str | None = None,
        started: float | None = None) -> int:
    t_start = time.monotonic()
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    say = (lambda *a: None) if quiet else (lambda *a: print(*a, flush=True))
    kind, why = link_mod.choose(cfg.link)
    if cfg.check_shaper is None:
        cfg.check_shaper = kind == "netns"
    if cfg.check_shaper and kind != "netns":
        raise ValueError("--check-shaper compares the namespaces with the in-process shaper: "
                         f"it needs network namespaces ({why})")
    netem_ms = cfg.delay_ms if cfg.latency == "netem" else 0.0
    link = link_mod.BenchLink(kind, cfg.workers, cfg.rate_mbit, netem_ms, cfg.duplex,
                              queue=cfg.ap_queue)
    results: dict[str, ModeResult] = {}
    check: dict[str, Any] | None = None
    payload: dict[str, Any] = {
        "command": command, "started_unix": started, "machine": report.machine(),
        "config": cfg.to_json(), "modes": {}, "status": "running"}
    skipped: dict[str, str] = {}
    flower: tuple[str, str] | None = None
    if "flower" in cfg.modes:
        py, found = flower_python.find(cfg.flower_python)
        if py is None:
            skipped["flower"] = found
            cfg.modes = [m for m in cfg.modes if m != "flower"]
            say(f"flower: skipped, {found}")
        else:
            flower = (py, found)
            say(f"flower: Flower {found} in {py}")
    payload["skipped"] = skipped
    say(f"fedberry bench: {', '.join(cfg.modes)}; {cfg.workers} workers; target "
        f"{cfg.target}; {cfg.model} on Fashion-MNIST; out {out}")
    cores = fit_quota(cfg.workers) if cfg.device_cpu is None else cfg.device_cpu
    quotas = DeviceQuotas(cores) if cores > 0 else None
    if quotas is not None and not quotas.available:
        say(f"devices: no CPU quota ({quotas.why}): every process runs at this machine's "
            "full speed")
    elif quotas is not None:
        say(f"devices: each worker and the single node under a CPU quota of {cores:g} core "
            f"(cgroup v{quotas.cgroups.version}), the chief unlimited")  # type: ignore[union-attr]
    payload["devices"] = quotas.describe() if quotas is not None else {"applied": False,
                                                                        "cores": None}
    with link, (quotas or contextlib.nullcontext()):
        payload["link"] = link.describe()
        d = payload["link"]
        if cfg.latency == "relay":
            d["latency"] = {"by": "relay (bench/relay.py) between workers and chief",
                            "delay_ms": cfg.delay_ms, "jitter_ms": cfg.jitter_ms,
                            "reset_per_s": cfg.reset_per_s, "modes": "single has no link; "
                            "ddp's gloo ring does not pass the relay: no latency there"}
            lat = (f"{cfg.delay_ms:g} +- {cfg.jitter_ms:g} ms one way by the relay (not on "
                   "ddp's ring)" if cfg.delay_ms else "none")
        else:
            lat = (f"{cfg.delay_ms:g} ms by netem" if d["delay_applied"] else
                   "none (netem missing)" if kind == "netns" and cfg.delay_ms else "none")
        queue = ("" if kind != "netns" else ", a queue per worker" if d["queue"] == "fair"
                 else ", one drop-tail queue")
        say(f"link: {kind}, {cfg.rate_mbit:g} Mbit/s shared, {d['duplex']} duplex{queue}, "
            f"latency {lat} ({why})")
        bench = Bench(cfg, link, out, quiet, quotas)
        if flower is not None:
            bench.flower = flower
        for mode in cfg.modes:
            say(f"\n== {mode} (cap {cfg.per_mode[mode].time_cap_s:.0f} s)")
            t0 = time.monotonic()
            res = bench.run(mode)
            results[mode] = res
            say(f"  {mode}: {_summary(res)} [{time.monotonic() - t0:.0f} s with start-up]")
            payload["modes"][mode] = res.to_json()
            report.write_json(out / "results.json", payload)  # a killed run keeps its modes
        if cfg.check_shaper:
            check = check_shaper(cfg, bench, out, say)
    payload["ratios"] = report.ratios(results)
    payload["check_shaper"] = check
    payload["table"] = report.table(results, cfg.target)
    payload["table_markdown"] = report.table(results, cfg.target, markdown=True)
    payload["elapsed_s"] = round(time.monotonic() - t_start, 1)
    payload["status"] = "done"
    pngs = []
    if cfg.plots:
        pngs = report.plots(results, cfg.target, out, title=_title(cfg, payload["link"]))
        payload["plots"] = [str(p) for p in pngs]
    report.write_json(out / "results.json", payload)
    print("\n" + payload["table"], flush=True)
    if check is not None:
        print(_check_line(check), flush=True)
    print(f"\nresults: {out / 'results.json'}" + "".join(f"\nplot: {p}" for p in pngs)
          + f"\ntotal {payload['elapsed_s']:.0f} s", flush=True)
    if cfg.plots and not pngs:
        print("(no plots: install matplotlib, the extra fedberry[bench])", flush=True)
    return 0


def _summary(r: ModeResult) -> str:
    if r.time_to_target_s is None:
        return "no result: " + "; ".join(r.notes)
    when = (f"target at {r.time_to_target_s:.1f} s ({r.unit} {r.k_to_target})" if r.reached
            else f"target NOT reached by {r.time_to_target_s:.0f} s")
    mb = "" if r.bytes_to_target is None else f", {r.bytes_to_target / 1e6:.1f} MB"
    acc = f", final acc {r.final_acc:.4f}" if r.final_acc is not None else ""
    return when + mb + acc + (f" ({'; '.join(r.notes)})" if r.notes else "")


def _title(cfg: BenchConfig, d: dict[str, Any]) -> str:
    return (f"Fashion-MNIST MLP, {cfg.workers} workers, {cfg.rate_mbit:g} Mbit/s shared link "
            f"({d['kind']}), target {cfg.target}")


# -- the two emulations side by side -----------------------------------------------------------
def check_shaper(cfg: BenchConfig, bench: Bench, out: Path, say: Any) -> dict[str, Any]:
    """The same dsgd steps through the namespaces (kernel htb) and through our in-process token
    bucket on loopback: seconds per step must agree within 10%.

    dsgd is the test because its steps are almost all transfer (a model up from every worker, a
    model down to every worker). The first step is left out: it includes joining. The two are
    the same link only when the namespaces' access point serves the workers in turn, as the
    bucket does (``--ap-queue fair``, full duplex): with one drop-tail queue, TCP gives some
    workers the mean gradient early, they upload while the others still download, and a step
    takes less than its bytes serialized (the run says so: ``mean_spread_s``)."""
    k = max(3, cfg.check_steps)
    say(f"\n== check: {k} dsgd steps, namespaces vs in-process shaper")
    runs: dict[str, ModeResult] = {"netns": bench.run("dsgd", tag="check-netns", max_k=k,
                                                      stop_at_target=False)}
    with link_mod.BenchLink("shaper", cfg.workers, cfg.rate_mbit) as loop_link:
        other = Bench(cfg, loop_link, out, bench.quiet, bench.quotas)
        runs["shaper"] = other.run("dsgd", tag="check-shaper", max_k=k, stop_at_target=False)
    per_step: dict[str, float | None] = {}
    for name, r in runs.items():
        pts = [p for p in r.points if p.k >= 1]
        if len(pts) >= 2 and pts[-1].k > pts[0].k:
            per_step[name] = (pts[-1].t - pts[0].t) / (pts[-1].k - pts[0].k)
        else:
            per_step[name] = None
    ns, sh = per_step["netns"], per_step["shaper"]
    rel = None if not ns or not sh else sh / ns
    socket_ns = runs["netns"].socket_bytes_run
    socket_sh = runs["shaper"].socket_bytes_run
    d = bench.link.describe()
    unlike = [f"the namespaces are {d['duplex']} duplex" if d.get("duplex") != "full" else "",
              "the namespaces' access point has one drop-tail queue (--ap-queue fifo)"
              if d.get("queue") != "fair" else ""]
    res = {
        "steps": k, "s_per_step_netns": ns, "s_per_step_shaper": sh, "shaper_over_netns": rel,
        "agree_within_10pct": rel is not None and abs(rel - 1) <= 0.10,
        "netns_queue": d.get("queue"), "netns_duplex": d.get("duplex"),
        "unlike": "; ".join(u for u in unlike if u) or None,
        "socket_bytes_netns": socket_ns, "socket_bytes_shaper": socket_sh,
        "bytes_shaper_over_netns": (socket_sh / socket_ns) if socket_ns and socket_sh else None,
        "iface_bytes_netns": runs["netns"].iface_bytes_run,
        "qdisc_bytes_netns": runs["netns"].qdisc_bytes,
        "expected_s_per_step": _expected_step(cfg, runs["netns"]),
        "mean_spread_s_netns": mean_spread(out / "logs" / "check-netns" / "events.jsonl"),
        "mean_spread_s_shaper": mean_spread(out / "logs" / "check-shaper" / "events.jsonl"),
    }
    say(_check_line(res))
    return res


def mean_spread(events: Path) -> float | None:
    """Seconds between the first and the last worker having a dsgd step's mean gradient,
    averaged over the steps after the first (from the run's events.jsonl; None if none).

    Near zero when the link serves the workers in turn; large when some get it early, which is
    what lets their uploads overlap the others' downloads on a full-duplex link."""
    closed: dict[int, float] = {}
    got: dict[int, list[float]] = {}
    try:
        lines = events.read_text().splitlines()
    except OSError:
        return None
    for line in lines:
        e = json.loads(line)["event"]
        if e["ev"] == "round":
            closed[e["round"]] = e["t"]
        elif e["ev"] == "sync":
            got.setdefault(e["round"], []).append(e["t"])
    spreads = [max(ts) - min(ts) for r, ts in got.items() if r > 1 and r in closed and ts]
    return sum(spreads) / len(spreads) if spreads else None


def _expected_step(cfg: BenchConfig, r: ModeResult) -> float | None:
    """Transfer time alone of one dsgd step on the nominal link: N models up, then N down."""
    pts = r.points
    if len(pts) < 2 or r.socket_bytes_run is None:
        return None
    per_step = (pts[-1].socket_bytes - pts[0].socket_bytes) / (pts[-1].k - pts[0].k)  # type: ignore[operator]
    return per_step / (mbit_to_bytes_per_s(cfg.rate_mbit) * tcp_payload_fraction())


def _check_line(c: dict[str, Any]) -> str:
    if c.get("shaper_over_netns") is None:
        return "check-shaper: no result"
    verdict = "agree" if c["agree_within_10pct"] else "DISAGREE"
    exp = c.get("expected_s_per_step")
    sp_ns, sp_sh = c.get("mean_spread_s_netns"), c.get("mean_spread_s_shaper")
    return (f"check-shaper: {c['steps']} dsgd steps, {c['s_per_step_netns']:.2f} s/step "
            f"(namespaces) vs {c['s_per_step_shaper']:.2f} s/step (in-process shaper): "
            f"ratio {c['shaper_over_netns']:.3f}, {verdict} within 10%"
            + (f"; transfer alone {exp:.2f} s/step" if exp else "")
            + (f"; workers got the mean within {sp_ns:.2f} s / {sp_sh:.2f} s of each other"
               if sp_ns is not None and sp_sh is not None else "")
            + (f" (unlike links: {c['unlike']})" if c.get("unlike") else ""))
