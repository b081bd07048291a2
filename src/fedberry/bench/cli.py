"""``fedberry bench``: single node vs synchronous distributed SGD (ours and PyTorch DDP) vs
FedAvg, on an emulated slow shared link, measured on this machine."""

from __future__ import annotations

import argparse
import dataclasses
import shlex
import sys
import time
from pathlib import Path
from typing import Any

from fedberry.bench.config import MODES, BenchConfig, OptimConfig, quick
from fedberry.bench.run import run


def add_bench_parser(sub: argparse._SubParsersAction) -> None:
    d = BenchConfig()
    p = sub.add_parser("bench", help="single vs dsgd vs ddp vs FedAvg on an emulated slow link",
                       description=__doc__)
    p.add_argument("--quick", action="store_true",
                   help="a few minutes: 3 workers, 200 Mbit/s, target 0.80 (checks, not figures)")
    p.add_argument("--modes", default=",".join(d.modes),
                   help=f"comma-separated subset of {','.join(MODES)} ('' with --check-shaper: "
                        "only the check)")
    p.add_argument("--workers", type=int, default=None, help=f"default {d.workers}")
    p.add_argument("--target", type=float, default=None,
                   help=f"test accuracy to reach (default {d.target})")
    p.add_argument("--link", default=d.link, choices=["auto", "netns", "shaper"],
                   help="netns: network namespaces + tc (root); shaper: token bucket in our "
                        "transport; auto: netns when possible")
    p.add_argument("--rate-mbit", type=float, default=None,
                   help=f"shared link rate per direction (default {d.rate_mbit})")
    p.add_argument("--delay-ms", type=float, default=d.delay_ms,
                   help=f"one-way latency per direction (default {d.delay_ms:g}: a "
                        f"{2 * d.delay_ms:g} ms round trip)")
    p.add_argument("--jitter-ms", type=float, default=d.jitter_ms,
                   help="+- this much around the delay, never reordering (relay only)")
    p.add_argument("--latency", default=d.latency, choices=["relay", "netem"],
                   help="relay: a userspace TCP relay between workers and chief (any kernel; "
                        "not for ddp's ring); netem: the kernel's, on the namespace link")
    p.add_argument("--reset-per-s", type=float, default=d.reset_per_s,
                   help="relay: mean connection resets per second per connection (default 0)")
    p.add_argument("--duplex", default=d.duplex, choices=["full", "half"])
    p.add_argument("--ap-queue", default=d.ap_queue, choices=["fair", "fifo"],
                   help="netns: how the access point shares each direction among the workers: "
                        "fair, a queue per worker served in turn (as the in-process shaper "
                        "does); fifo, one drop-tail queue (default fair)")
    p.add_argument("--device-cpu", type=float, default=None, metavar="CORES",
                   help="emulated devices: each worker and the single node under a CPU quota "
                        "of CORES (cgroups, root); default 0.25 cut to fit the machine's cores "
                        "beside the chief; 0: no quota")
    p.add_argument("--check-shaper", action=argparse.BooleanOptionalAction, default=None,
                   help="also time dsgd steps through both emulations and compare them "
                        "(default: on when the link is network namespaces)")
    p.add_argument("--check-steps", type=int, default=None, metavar="K",
                   help=f"dsgd steps of the check, at least 3 (default {d.check_steps}; "
                        "--quick: 4)")
    p.add_argument("--run-to-cap", action="store_true",
                   help="keep training after the target, up to each mode's time cap")
    p.add_argument("--set", action="append", default=[], metavar="MODE.FIELD=VALUE",
                   help="override a mode's setting, e.g. dsgd.lr=0.01, dsgd.optim=sgd, "
                        "fedavg.local_epochs=4, ddp.time_cap_s=600 (repeatable)")
    p.add_argument("--flower-python", default=None, metavar="PATH",
                   help="the Python with flwr==1.42.0 for the flower mode (default: "
                        "$FEDBERRY_FLOWER_PYTHON, ~/.cache/fedberry/venv-flower, or this one "
                        "with the bench-flower extra; scripts/flower-venv.sh makes the venv); "
                        "without one the mode is skipped")
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--data-dir", default=None)
    p.add_argument("--out", default=d.out, help="results.json, plots and logs go here")
    p.add_argument("--no-plots", action="store_true")
    p.add_argument("--quiet", action="store_true", help="only the final table")
    p.set_defaults(func=run_bench)


def apply_overrides(cfg: BenchConfig, sets: list[str]) -> None:
    optim_fields = {f.name for f in dataclasses.fields(OptimConfig)}
    for item in sets:
        key, sep, value = item.partition("=")
        mode, _, name = key.partition(".")
        if not sep or mode not in cfg.per_mode or not name:
            raise ValueError(f"--set {item!r}: expected MODE.FIELD=VALUE, MODE in "
                             f"{','.join(cfg.per_mode)}")
        mc = cfg.per_mode[mode]
        if name == "optim":
            mc.optim.name = value
            continue
        target: Any = mc.optim if name in optim_fields else mc
        if not hasattr(target, name):
            known = sorted({f.name for f in dataclasses.fields(mc)} | optim_fields | {"optim"})
            raise ValueError(f"--set {item!r}: no setting {name!r}; the settings are "
                             f"{', '.join(known)}")
        current = getattr(target, name)
        setattr(target, name, type(current)(value))


def config_from_args(args: argparse.Namespace) -> BenchConfig:
    cfg = BenchConfig(link=args.link, delay_ms=args.delay_ms, duplex=args.duplex,
                      ap_queue=args.ap_queue,
                      jitter_ms=args.jitter_ms, latency=args.latency,
                      reset_per_s=args.reset_per_s,
                      device_cpu=args.device_cpu,
                      check_shaper=args.check_shaper, stop_at_target=not args.run_to_cap,
                      seed=args.seed, data_dir=args.data_dir, out=args.out,
                      flower_python=args.flower_python,
                      plots=not args.no_plots)
    if args.quick:
        cfg = quick(cfg)
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    bad = [m for m in modes if m not in MODES]
    if bad or not (modes or cfg.check_shaper):
        raise ValueError(f"--modes: unknown {bad}; choose from {','.join(MODES)}")
    cfg.modes = [m for m in MODES if m in modes]  # a fixed order: the table reads the same
    for name in ("workers", "target", "rate_mbit", "check_steps"):
        if getattr(args, name) is not None:
            setattr(cfg, name, getattr(args, name))
    if cfg.workers < 1:
        raise ValueError("--workers must be at least 1")
    if cfg.check_steps < 3:
        raise ValueError("--check-steps must be at least 3 (the first step, joining, is left "
                         "out of the timing)")
    if cfg.device_cpu is not None and not 0 <= cfg.device_cpu <= 64:
        raise ValueError("--device-cpu is a share of cores in [0, 64] (0: no quota)")
    if args.delay_ms < 0 or not 0 <= args.jitter_ms <= args.delay_ms or args.reset_per_s < 0:
        raise ValueError("--delay-ms and --reset-per-s are non-negative, --jitter-ms at most "
                         "--delay-ms")
    if not 0 < cfg.target <= 1:
        raise ValueError("--target is an accuracy in (0, 1]")
    apply_overrides(cfg, args.set)
    return cfg


def run_bench(args: argparse.Namespace) -> int:
    cfg = config_from_args(args)
    command = "fedberry " + " ".join(shlex.quote(a) for a in sys.argv[1:]) \
        if Path(sys.argv[0]).name in ("fedberry", "__main__.py") else None
    return run(cfg, quiet=args.quiet, command=command, started=time.time())
