"""Emulated small devices: each benchmark process under its own CPU quota, by cgroup.

``fedberry bench --device-cpu 0.25`` gives every worker (and the single-node baseline) a quarter
of one core: a child cgroup per process with ``cpu.cfs_quota_us / cpu.cfs_period_us = 0.25``
(cgroup v1, ``/sys/fs/cgroup/cpu``) or ``cpu.max = "2500 10000"`` (cgroup v2). The kernel's
CFS bandwidth control then lets the process run at most 2.5 ms in every 10 ms, whatever else is
idle, which is what a slower core looks like from the outside: the same work takes four times
the wall time.

The period is 10 ms, not CFS's default 100 ms, because a quota only slows work longer than
itself: with 25 ms in every 100 ms, a burst of 18 ms of CPU after an idle spell (a dsgd step's
gradient, between two waits on the link) ran at 0.71 of a core, and dsgd's devices measured
twice the speed of fedavg's; with 2.5 ms in 10 ms the same burst runs at 0.27 (measured on this
machine, docs/benchmarks.md). The kernel wants a quota of at least 1 ms, so small shares get a
longer period (``period_us``).

What it does not capture is in docs/benchmarks.md (memory bandwidth, caches, SIMD width: a
Raspberry Pi's Cortex-A72 is not a throttled Xeon).

Every cgroup is made under one parent per run (``fedberry-bench-<pid>``), and removed when the
run ends, also on failure (``DeviceQuotas`` is a context manager; ``close`` moves any process
still inside back to the root group before ``rmdir``). A run that was SIGKILLed leaves its parent
behind; the next run removes it (``cleanup_stale``), as netns.py does with namespaces.
"""

from __future__ import annotations

import contextlib
import os
import re
import time
from dataclasses import dataclass
from pathlib import Path

__all__ = ["CpuCgroups", "DeviceQuotas", "cleanup_stale", "detect", "fit_quota"]

PERIOD_US = 10_000  # 10 ms: short, so that short bursts of work are slowed too (see above)
MIN_QUOTA_US = 1_000  # the kernel refuses quotas below 1 ms


def period_us(cores: float) -> int:
    """The CFS period for a quota of ``cores``: ``PERIOD_US``, longer if the quota would fall
    below the kernel's 1 ms (0.05 core: 20 ms)."""
    return max(PERIOD_US, -(-MIN_QUOTA_US * 1000 // int(cores * 1000)))
_NAME_RE = re.compile(r"^fedberry-bench-(\d+)$")


@dataclass(frozen=True)
class CpuCgroups:
    """Where CPU quotas can be written on this machine: ``version`` 1 or 2, and the root."""

    version: int
    root: Path


def detect(v1_root: Path = Path("/sys/fs/cgroup/cpu"),
           v2_root: Path = Path("/sys/fs/cgroup")) -> tuple[CpuCgroups | None, str]:
    """(the writable cpu hierarchy, "") or (None, why not)."""
    if (v1_root / "cpu.cfs_quota_us").exists():
        if os.access(v1_root, os.W_OK):
            return CpuCgroups(1, v1_root), ""
        return None, f"{v1_root} is not writable (needs root)"
    controllers = v2_root / "cgroup.controllers"
    if controllers.exists():
        if "cpu" not in controllers.read_text().split():
            return None, "cgroup v2 without the cpu controller"
        if not os.access(v2_root, os.W_OK):
            return None, f"{v2_root} is not writable (needs root)"
        return CpuCgroups(2, v2_root), ""
    return None, "no cgroup cpu controller mounted (neither v1 cpu nor v2)"


def fit_quota(workers: int, cores: int | None = None, want: float = 0.25,
              chief_cores: float = 0.5) -> float:
    """The per-device quota: ``want`` cores, cut so that ``workers`` of them plus the chief
    (``chief_cores``) fit in this machine's cores: on 2 cores, 6 x 0.25 = 1.5 + 0.5 for the chief
    and the harness."""
    cores = cores or os.cpu_count() or 1
    if workers < 1:
        raise ValueError("workers must be at least 1")
    room = max(cores - chief_cores, 0.05 * workers)
    return round(min(want, room / workers), 3)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _procs(d: Path) -> list[int]:
    try:
        return [int(p) for p in (d / "cgroup.procs").read_text().split()]
    except (OSError, ValueError):
        return []


def _remove(d: Path, root: Path) -> None:
    """Empty cgroup ``d`` into ``root`` and remove it (children first)."""
    for child in sorted((p for p in d.iterdir() if p.is_dir()), reverse=True):
        _remove(child, root)
    for _ in range(50):  # a process that is exiting may linger a moment in cgroup.procs
        pids = _procs(d)
        for pid in pids:
            with contextlib.suppress(OSError):
                (root / "cgroup.procs").write_text(str(pid))
        try:
            d.rmdir()
            return
        except FileNotFoundError:
            return
        except OSError:
            time.sleep(0.02)
    d.rmdir()  # one last time, raising what stops it


def cleanup_stale(root: Path | None = None) -> list[str]:
    """Remove the cgroups of earlier runs whose process is gone; returns their names."""
    if root is None:
        found, _ = detect()
        if found is None:
            return []
        root = found.root
    removed = []
    for d in root.iterdir():
        m = _NAME_RE.match(d.name)
        if m and d.is_dir() and not _pid_alive(int(m.group(1))):
            _remove(d, root)
            removed.append(d.name)
    return removed


class DeviceQuotas:
    """One run's CPU quotas: ``add(name, pid)`` puts a process in its own cgroup at ``cores``.

    Without a writable cpu cgroup (``available`` False, ``why`` says why) ``add`` does nothing:
    the run goes on at full speed and says so once.
    """

    def __init__(self, cores: float, *, cgroups: CpuCgroups | None = None,
                 name: str | None = None) -> None:
        if not 0 < cores <= 64:
            raise ValueError(f"--device-cpu {cores}: a share of cores in (0, 64]")
        self.cores = cores
        if cgroups is None:
            cgroups, self.why = detect()
        else:
            self.why = ""
        self.cgroups = cgroups
        self.parent: Path | None = None
        self.name = name or f"fedberry-bench-{os.getpid()}"
        self.members: dict[str, Path] = {}

    @property
    def available(self) -> bool:
        return self.cgroups is not None

    def open(self) -> DeviceQuotas:
        if self.cgroups is None:
            return self
        root = self.cgroups.root
        cleanup_stale(root)
        self.parent = root / self.name
        self.parent.mkdir(exist_ok=True)
        if self.cgroups.version == 2:
            # Children of the parent may only use the cpu controller if the parent hands it on.
            (self.parent / "cgroup.subtree_control").write_text("+cpu")
        return self

    def add(self, name: str, pid: int) -> None:
        """Put process ``pid`` (and the threads and children it makes from now on) under
        the quota, in a cgroup of its own so that devices do not share one budget."""
        if self.parent is None:
            return
        assert self.cgroups is not None
        d = self.parent / re.sub(r"[^A-Za-z0-9_.-]", "_", name)
        d.mkdir(exist_ok=True)
        self.members[name] = d
        period = period_us(self.cores)
        quota = max(MIN_QUOTA_US, round(self.cores * period))
        if self.cgroups.version == 1:
            # v1 checks the quota against the period: lower the quota first, then the period.
            (d / "cpu.cfs_quota_us").write_text(str(quota))
            (d / "cpu.cfs_period_us").write_text(str(period))
        else:
            (d / "cpu.max").write_text(f"{quota} {period}")
        (d / "cgroup.procs").write_text(str(pid))

    def throttled(self) -> dict[str, float]:
        """Seconds each member has been held back by its quota so far (``cpu.stat``)."""
        out = {}
        for name, d in self.members.items():
            try:
                stat = dict(line.split() for line in (d / "cpu.stat").read_text().splitlines())
            except (OSError, ValueError):
                continue
            if "throttled_time" in stat:  # v1: nanoseconds
                out[name] = int(stat["throttled_time"]) / 1e9
            elif "throttled_usec" in stat:
                out[name] = int(stat["throttled_usec"]) / 1e6
        return out

    def close(self) -> None:
        """Remove every cgroup of this run; processes still inside go back to the root."""
        if self.parent is None or self.cgroups is None:
            return
        parent, self.parent = self.parent, None
        self.members.clear()
        if parent.exists():
            _remove(parent, self.cgroups.root)

    def describe(self) -> dict[str, object]:
        return {"cores": self.cores, "applied": self.available,
                "cgroup": None if self.cgroups is None else f"v{self.cgroups.version}",
                "why_not": self.why or None, "period_us": period_us(self.cores)}

    def __enter__(self) -> DeviceQuotas:
        return self.open()

    def __exit__(self, *exc: object) -> None:
        self.close()
