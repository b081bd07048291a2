"""Accuracy against epsilon on the Fashion-MNIST demo, for a few noise levels and worker counts.

Runs the torch demo's model and data in this process (``serve(None)`` and worker threads, no
sockets: the numbers of a round are the same over TCP), once without DP and once per
(noise, workers) setting with DP-FedAvg, and writes docs/img/privacy_accuracy_epsilon.png and
a Markdown table (printed, and written beside the plot). Needs the torch, bench and dp extras.

    python scripts/privacy_sweep.py --rounds 5 --sync-every 20 --workers 5,20 --noise 0.3,0.7,1.5

docs/privacy.md holds the figures of one run, with the date and the machine it ran on.
"""

from __future__ import annotations

import argparse
import math
import threading
import time
from pathlib import Path

import fedberry
from fedberry.demo.common import TrainConfig
from fedberry.demo.torch_demo import initial_model, make_evaluator, run_torch_worker


def run(workers: int, rounds: int, cfg: TrainConfig, dp: fedberry.DPConfig | None,
        evaluate) -> dict:
    """One federation in this process; its last round's record."""
    handle = fedberry.serve(None, workers=workers, rounds=rounds, dp=dp,
                            initial=initial_model(cfg.model, cfg.seed), evaluate=evaluate)
    errors: list[BaseException] = []

    def work(i: int) -> None:
        try:
            run_torch_worker(handle, i, workers, cfg, worker_id=f"w{i}")
        except BaseException as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(1, workers + 1)]
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        if errors:
            raise errors[0]
        handle.wait(120)
        return handle.metrics[-1]
    finally:
        handle.stop()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--sync-every", type=int, default=20, help="local steps per round")
    ap.add_argument("--workers", default="5,20", help="comma-separated worker counts")
    ap.add_argument("--noise", default="0.3,0.7,1.5", help="comma-separated noise multipliers")
    ap.add_argument("--clip", type=float, default=1.0)
    ap.add_argument("--delta", type=float, default=1e-5)
    ap.add_argument("--out", default="docs/img/privacy_accuracy_epsilon.png")
    ap.add_argument("--replot", action="store_true",
                    help="plot the table beside --out again, without running anything")
    args = ap.parse_args()
    if args.replot:
        out = Path(args.out)
        plot(read_table(out.with_suffix(".md")), args, out)
        return 0
    cfg = TrainConfig(sync_every=args.sync_every)
    evaluate = make_evaluator(cfg.model)
    rows = []
    t0 = time.monotonic()
    for n in (int(x) for x in args.workers.split(",")):
        for z in [None] + [float(x) for x in args.noise.split(",")]:
            dp = None if z is None else fedberry.DPConfig(clip=args.clip, noise=z,
                                                          delta=args.delta, seed=0)
            t = time.monotonic()
            last = run(n, args.rounds, cfg, dp, evaluate)
            eps = last.get("epsilon") if dp is not None else None
            rows.append({"workers": n, "noise": z, "epsilon": eps,
                         "accuracy": last["test_accuracy"], "seconds": time.monotonic() - t})
            print(f"workers {n:>3} noise {z if z is not None else '-':>4} epsilon "
                  f"{eps if eps is not None else math.inf:8.3f} accuracy "
                  f"{last['test_accuracy']:.4f} ({time.monotonic() - t:.0f} s)", flush=True)
    text = table_text(rows, args.delta)
    print(text)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".md").write_text(text + "\n")
    plot(rows, args, out)
    print(f"wrote {out} and {out.with_suffix('.md')} in {time.monotonic() - t0:.0f} s")
    return 0


def table_text(rows: list[dict], delta: float) -> str:
    lines = [f"| workers | noise z | epsilon (delta {delta:g}) | test accuracy |",
             "|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['workers']} | {'no DP' if r['noise'] is None else r['noise']} | "
                     f"{'inf' if r['epsilon'] is None else format(r['epsilon'], '.2f')} | "
                     f"{r['accuracy']:.4f} |")
    return "\n".join(lines)


def read_table(path: Path) -> list[dict]:
    """The rows of a table ``table_text`` wrote (``--replot``: a new plot, no new run)."""
    rows = []
    for line in path.read_text().splitlines()[2:]:
        workers, noise, eps, acc = (c.strip() for c in line.strip("|").split("|"))
        rows.append({"workers": int(workers), "noise": None if noise == "no DP" else float(noise),
                     "epsilon": None if eps == "inf" else float(eps), "accuracy": float(acc)})
    return rows


def plot(rows: list[dict], args: argparse.Namespace, out: Path) -> None:
    import matplotlib  # the bench extra

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import NullFormatter, ScalarFormatter

    fig, ax = plt.subplots(figsize=(6, 4))
    for n in sorted({r["workers"] for r in rows}):
        pts = sorted((r["epsilon"], r["accuracy"]) for r in rows
                     if r["workers"] == n and r["epsilon"] is not None)
        line = ax.plot([p[0] for p in pts], [p[1] for p in pts], "o-", label=f"{n} workers")
        base = [r["accuracy"] for r in rows if r["workers"] == n and r["noise"] is None]
        if base:
            ax.axhline(base[0], ls="--", color=line[0].get_color(), lw=0.8,
                       label=f"{n} workers, no DP")
        for (eps, acc), r in zip(pts, sorted((r for r in rows if r["workers"] == n
                                              and r["epsilon"] is not None),
                                             key=lambda r: r["epsilon"])):
            ax.annotate(f"z={r['noise']:g}", (eps, acc), textcoords="offset points",
                        xytext=(4, -10), fontsize=7)
    ax.set_xscale("log")
    ax.xaxis.set_major_formatter(ScalarFormatter())
    ax.xaxis.set_minor_formatter(NullFormatter())
    ax.set_xlabel(f"epsilon after {args.rounds} rounds (delta {args.delta:g})")
    ax.set_ylabel("test accuracy")
    ax.set_title(f"DP-FedAvg on Fashion-MNIST (MLP, clip {args.clip:g}, {args.rounds} rounds)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=120)


if __name__ == "__main__":
    raise SystemExit(main())
