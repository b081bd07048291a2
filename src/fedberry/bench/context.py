"""What a mode needs of the benchmark it runs in: the configuration, the link, where to write.

``harness.Bench`` is this plus ``run``, which picks the mode; the modes (mode_*.py) take this, so
that they do not import the harness that imports them.
"""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path
from typing import Any

from fedberry.bench.config import BenchConfig, ModeConfig
from fedberry.bench.cpu_quota import DeviceQuotas
from fedberry.bench.link import BenchLink


class BenchContext:
    """One benchmark on one link: its configuration, the link, the output directory."""

    def __init__(self, cfg: BenchConfig, link: BenchLink, out: Path, quiet: bool = False,
                 quotas: DeviceQuotas | None = None) -> None:
        self.cfg = cfg
        self.link = link
        self.quotas = quotas  # emulated devices: the workers' and single's CPU quota
        self.out = out
        self.quiet = quiet

    @property
    def device_cores(self) -> float | None:
        """The CPU quota each device runs under, or None (full speed)."""
        q = self.quotas
        return q.cores if q is not None and q.available else None

    def spec(self, mode: str, mc: ModeConfig, **extra: Any) -> dict[str, Any]:
        """What a mode's process is told on its command line (procs.py)."""
        return {"mode": mode, "model": self.cfg.model, "seed": self.cfg.seed,
                "data_dir": self.cfg.data_dir, "batch_size": mc.batch_size,
                "optim": asdict(mc.optim), "count": self.cfg.workers, **extra}

    def logdir(self, name: str) -> Path:
        """``OUT/logs/NAME``, created."""
        d = self.out / "logs" / name
        d.mkdir(parents=True, exist_ok=True)
        return d
