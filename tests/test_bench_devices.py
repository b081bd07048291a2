"""Emulated devices (bench/cpu_quota.py): the quota holds a busy process to its share of a
core, and a run leaves no cgroup behind, also when it fails."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from fedberry.bench.cpu_quota import DeviceQuotas, detect, fit_quota

found, why = detect()
needs_cgroups = pytest.mark.skipif(found is None, reason=f"no writable cpu cgroup: {why}")

BUSY = "import sys\nsys.stdin.readline()\nwhile True: pass\n"

# Bursts of 20 ms of CPU after idle spells of 0.3 s, as a dsgd worker computes its gradient
# between two waits on the link; prints each burst's CPU over its wall time.
BURSTS = """
import sys, time
sys.stdin.readline()
for _ in range(4):
    time.sleep(0.3)
    t0, c0 = time.perf_counter(), time.thread_time()
    while time.thread_time() - c0 < 0.02:
        pass
    print((time.thread_time() - c0) / (time.perf_counter() - t0), flush=True)
"""


def test_fit_quota_leaves_room_for_the_chief() -> None:
    assert fit_quota(6, cores=2) == 0.25  # 1.5 cores of devices + the chief
    assert fit_quota(12, cores=2) == 0.125  # cut: 12 x 0.125 = 1.5
    assert fit_quota(1, cores=2, want=4.0) == 1.5
    with pytest.raises(ValueError):
        fit_quota(0)
    with pytest.raises(ValueError):
        DeviceQuotas(0.0)


def _cpu_s(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / 100.0  # utime + stime, in clock ticks


@needs_cgroups
def test_quota_caps_a_busy_process_and_is_removed() -> None:
    assert found is not None
    proc = subprocess.Popen([sys.executable, "-c", BUSY], stdin=subprocess.PIPE, text=True)
    quotas = DeviceQuotas(0.2, name=f"fedberry-bench-test-cap-{os.getpid()}")
    try:
        with quotas:
            quotas.add("busy", proc.pid)
            assert str(proc.pid) in (quotas.members["busy"] / "cgroup.procs").read_text()
            assert proc.stdin is not None
            proc.stdin.write("\n")
            proc.stdin.flush()
            c0, t0 = _cpu_s(proc.pid), time.monotonic()
            time.sleep(1.5)
            used, wall = _cpu_s(proc.pid) - c0, time.monotonic() - t0
            # An upper bound only (a busy machine gives it less): 0.2 core, plus one period of
            # slack and the clock ticks' rounding.
            assert used <= 0.2 * wall + 0.12, (used, wall)
            assert quotas.throttled()["busy"] > 0
            parent = quotas.parent
            assert parent is not None and parent.is_dir()
        # Closed with the process still running inside: it went back to the root, the
        # cgroups are gone.
        assert not parent.exists()
        assert proc.poll() is None
    finally:
        proc.kill()
        proc.wait()


@needs_cgroups
def test_quota_slows_a_short_burst_too() -> None:
    """A device at 0.25 core computes a short burst at about 0.25 core, not at full speed: with
    CFS's default 100 ms period (25 ms of quota) a 20 ms burst ran at 0.7 of a core."""
    proc = subprocess.Popen([sys.executable, "-c", BURSTS], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True)
    try:
        with DeviceQuotas(0.25, name=f"fedberry-bench-test-burst-{os.getpid()}") as quotas:
            quotas.add("bursts", proc.pid)
            out, _ = proc.communicate("\n", timeout=30)
        shares = [float(x) for x in out.split()]
        assert len(shares) == 4
        # An upper bound only (a busy machine gives less): a quarter core plus one period.
        assert max(shares) < 0.45, shares
    finally:
        proc.kill()
        proc.wait()


@needs_cgroups
def test_cgroups_removed_when_the_run_fails() -> None:
    assert found is not None
    proc = subprocess.Popen([sys.executable, "-c", BUSY], stdin=subprocess.PIPE, text=True)
    try:
        name = f"fedberry-bench-test-fail-{os.getpid()}"
        with pytest.raises(RuntimeError), DeviceQuotas(0.5, name=name) as q:
            q.add("a", proc.pid)
            q.add("b", proc.pid)  # moves it: one process, one device
            raise RuntimeError("the mode failed")
        assert not (found.root / name).exists()
        # This process's only: another run of the suite (another Python) may hold its own.
        assert not [d for d in found.root.iterdir()
                    if d.name.startswith("fedberry-bench-test")
                    and d.name.endswith(f"-{os.getpid()}")]
    finally:
        proc.kill()
        proc.wait()
