"""The benchmark's outputs: the table, the ratios, results.json and the plots."""

from __future__ import annotations

import argparse
import json
import os
import platform
from pathlib import Path
from typing import Any

from fedberry.bench.harness import ModeResult, Point


def machine() -> dict[str, Any]:
    cpu = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    info: dict[str, Any] = {"cpu": cpu or platform.processor(), "cores": os.cpu_count(),
                            "kernel": platform.release(), "python": platform.python_version()}
    try:
        import torch  # the torch extra, only to record its version

        info["torch"] = torch.__version__
    except ImportError:
        pass
    try:
        mem = Path("/proc/meminfo").read_text().split()[1]
        info["memory_gb"] = round(int(mem) / 2**20, 1)
    except (OSError, IndexError, ValueError):
        pass
    return info


# -- ratios with honest bounds ----------------------------------------------------------------
def ratio(num: float | None, num_lower: bool, den: float | None,
          den_lower: bool) -> tuple[float | None, str]:
    """num/den and what it is: "=" exact, ">=" a lower bound, "<=" an upper bound, "?" unknown.

    A quantity that is only a lower bound (a mode that missed the target) makes the ratio a lower
    bound when it is on top and an upper bound when it is below; two bounds say nothing."""
    if num is None or den is None or den <= 0 or num <= 0:
        return None, "?"
    value = num / den
    if num_lower and den_lower:
        return value, "?"
    if num_lower:
        return value, ">="
    if den_lower:
        return value, "<="
    return value, "="


def ratios(results: dict[str, ModeResult]) -> dict[str, dict[str, Any]]:
    """For each mode: how many times faster than dsgd and than single, how many times fewer
    bytes than dsgd (to the target)."""
    out: dict[str, dict[str, Any]] = {}
    for name, r in results.items():
        row: dict[str, Any] = {}
        for ref in ("dsgd", "single"):
            b = results.get(ref)
            if b is None or ref == name:
                continue
            v, k = ratio(b.time_to_target_s, b.lower_bound, r.time_to_target_s, r.lower_bound)
            row[f"speedup_vs_{ref}"] = {"value": v, "kind": k}
        d = results.get("dsgd")
        if d is not None and name not in ("dsgd", "single"):
            v, k = ratio(d.bytes_to_target, d.lower_bound, r.bytes_to_target, r.lower_bound)
            row["fewer_bytes_vs_dsgd"] = {"value": v, "kind": k}
        out[name] = row
    return out


def _fmt_ratio(cell: dict[str, Any] | None, suffix: str = "x") -> str:
    if not cell or cell["value"] is None:
        return "-"
    kind = {"=": "", ">=": ">=", "<=": "<=", "?": "?"}[cell["kind"]]
    v = cell["value"]
    text = f"{v:.0f}" if v >= 100 else f"{v:.1f}" if v >= 1 else f"{v:.2g}"
    return f"{kind}{text}{suffix}"


def _mb(n: float | None, lower: bool = False) -> str:
    if n is None:
        return "-"
    return f"{'>=' if lower else ''}{n / 1e6:.1f}"


# -- the table ---------------------------------------------------------------------------------
COLUMNS = ["mode", "workers", "wire (up/down)", "time to target [s]", "steps / rounds",
           "final acc", "MB to target", "MB per worker", "faster than dsgd",
           "fewer bytes than dsgd", "faster than single", "samples/s per device"]


def _wire(mode: str, config: dict[str, Any]) -> str:
    """How the mode's tensors travel: float32, or fedberry's codecs (codecs.py)."""
    if mode == "single":
        return "-"
    if mode == "ddp":
        return "f32/f32"
    up, down = (config.get(k, "none") for k in ("codec", "downlink"))
    return f"{'f32' if up == 'none' else up}/{'f32' if down == 'none' else down}"


def rows(results: dict[str, ModeResult], target: float) -> list[list[str]]:
    rat = ratios(results)
    out = []
    for name, r in results.items():
        lb = r.lower_bound
        t = "-" if r.time_to_target_s is None else f"{r.time_to_target_s:.1f}"
        if lb:
            t = f">={t} (not reached)"
        k = "-" if r.k_to_target is None else (
            f"{'>=' if lb else ''}{r.k_to_target} {r.unit}{'' if r.k_to_target == 1 else 's'}")
        acc = "-" if r.final_acc is None else f"{r.final_acc:.4f}"
        mb = "0" if name == "single" else _mb(r.bytes_to_target, lb)
        per = "0" if name == "single" else _mb(r.per_worker_to_target, lb)
        if not r.link_shaped and name != "single":
            mb += " (unshaped)"
        out.append([name, str(r.workers), _wire(name, r.config), t, k, acc, mb, per,
                    _fmt_ratio(rat[name].get("speedup_vs_dsgd")),
                    _fmt_ratio(rat[name].get("fewer_bytes_vs_dsgd")),
                    _fmt_ratio(rat[name].get("speedup_vs_single")),
                    "-" if r.samples_per_s is None else f"{r.samples_per_s:,.0f}"
                    + ("" if r.device_cpu is None else f" @{r.device_cpu:g} core")])
    return out


def table(results: dict[str, ModeResult], target: float, markdown: bool = False) -> str:
    body = rows(results, target)
    if markdown:
        lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
        lines += ["| " + " | ".join(r) + " |" for r in body]
        return "\n".join(lines)
    widths = [max([len(c), *(len(r[i]) for r in body)]) for i, c in enumerate(COLUMNS)]
    fmt = "  ".join(f"{{:<{w}}}" if i == 0 else f"{{:>{w}}}" for i, w in enumerate(widths))
    return "\n".join([fmt.format(*COLUMNS), fmt.format(*("-" * w for w in widths)),
                      *(fmt.format(*r) for r in body)])


# -- results.json ------------------------------------------------------------------------------
def write_json(path: Path, payload: dict[str, Any]) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(payload, indent=1, default=str))
    tmp.replace(path)


# -- plots -------------------------------------------------------------------------------------
STYLE = {"single": ("tab:gray", "s"), "dsgd": ("tab:red", "o"), "ddp": ("tab:orange", "^"),
         "fedavg": ("tab:blue", "D"), "flower": ("tab:purple", "v")}


def plots(results: dict[str, ModeResult], target: float, out: Path,
          title: str = "") -> list[Path]:
    """accuracy_vs_time.png and accuracy_vs_bytes.png; [] without matplotlib (the extra
    ``fedberry[bench]``)."""
    try:
        import matplotlib  # the bench extra (see the docstring)

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        import matplotlib.ticker
    except ImportError:
        return []
    written = []
    for key, xlabel, fname in (("t", "wall time since start [s] (log)", "accuracy_vs_time.png"),
                               ("bytes", "bytes on the link [MB] (log)",
                                "accuracy_vs_bytes.png")):
        fig, ax = plt.subplots(figsize=(7.5, 4.6), dpi=110)
        for name, r in results.items():
            pts = [p for p in r.points if getattr(p, key) is not None
                   and (key == "t" or (p.bytes or 0) > 0)]
            if not pts:
                continue
            scale = 1e6 if key == "bytes" else 1.0
            xs = [max(getattr(p, key) / scale, 1e-3) for p in pts]
            color, marker = STYLE.get(name, ("black", "."))
            label = name + ("" if r.reached else " (target not reached)")
            ax.plot(xs, [p.acc for p in pts], color=color, marker=marker,
                    markersize=3 if len(pts) > 20 else 5, linewidth=1.2, label=label)
            if r.reached:
                hit = next(p for p in pts if p.acc >= target) if any(
                    p.acc >= target for p in pts) else None
                if hit is not None:
                    ax.plot([max(getattr(hit, key) / scale, 1e-3)], [hit.acc], marker="*",
                            color=color, markersize=14, markeredgecolor="black")
        ax.axhline(target, color="black", linestyle="--", linewidth=0.8,
                   label=f"target {target:.2f}")
        ax.set_xscale("log")
        # Plain numbers at 1-2-5: matplotlib's default minor-tick labels on a log axis collide.
        ax.xaxis.set_major_locator(matplotlib.ticker.LogLocator(10, subs=(1.0, 2.0, 5.0)))
        ax.xaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:g}"))
        ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        ax.set_xlabel(xlabel)
        ax.set_ylabel("test accuracy (Fashion-MNIST, 10k)")
        lows = [p.acc for r in results.values() for p in r.points]
        ax.set_ylim(max(0.0, min(lows, default=0.5) - 0.02) if lows else 0.5,
                    min(1.0, max(lows, default=0.9) + 0.02))
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(loc="lower right", fontsize=8)
        if title:
            ax.set_title(title, fontsize=9)
        fig.tight_layout()
        path = out / fname
        fig.savefig(path)
        plt.close(fig)
        written.append(path)
    return written


def load(path: str | Path) -> tuple[dict[str, ModeResult], dict[str, Any]]:
    """The modes of a results.json as ModeResults, and the whole payload."""
    payload = json.loads(Path(path).read_text())
    results = {}
    for name, d in payload["modes"].items():
        d = dict(d)
        points = [Point(**p) for p in d.pop("points")]
        results[name] = ModeResult(**d, points=points)
    return results, payload


def main(argv: list[str] | None = None) -> int:
    """``python -m fedberry.bench.report RESULTS_JSON [--markdown] [--plots DIR]``: the table
    again (for docs), or the plots redrawn, from a finished run."""
    p = argparse.ArgumentParser(prog="python -m fedberry.bench.report")
    p.add_argument("results")
    p.add_argument("--markdown", action="store_true")
    p.add_argument("--plots", metavar="DIR", help="write the two PNGs into DIR")
    args = p.parse_args(argv)
    results, payload = load(args.results)
    target = payload["config"]["target"]
    print(table(results, target, markdown=args.markdown))
    if args.plots:
        out = Path(args.plots)
        out.mkdir(parents=True, exist_ok=True)
        cfg = payload["config"]
        link = payload.get("link", {})
        title = (f"Fashion-MNIST MLP, {cfg['workers']} workers, {cfg['rate_mbit']:g} Mbit/s "
                 f"shared link ({link.get('kind', '?')}), target {target}")
        for path in plots(results, target, out, title=title):
            print(path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
