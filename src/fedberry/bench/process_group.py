"""The processes of one mode, seen from the harness: started, told ``go``, heard, stopped.

Their side is procs.py; each prints one JSON event a line on stdout.
"""

from __future__ import annotations

import contextlib
import json
import os
import queue
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

from fedberry.bench.cpu_quota import DeviceQuotas
from fedberry.bench.link import BenchLink

READY_TIMEOUT = 180.0  # seven processes importing torch on two cores take a while

Event = dict[str, Any]


class ProcessGroup:
    """The processes of one mode; their JSON events arrive on one queue as (name, event)."""

    def __init__(self, link: BenchLink, logdir: Path,
                 quotas: DeviceQuotas | None = None) -> None:
        self.link = link
        self.quotas = quotas
        self.logdir = logdir
        self.events: queue.Queue[tuple[str, Event]] = queue.Queue()
        self.procs: dict[str, subprocess.Popen] = {}
        self._logs: list[Any] = []
        self._lock = threading.Lock()
        # The first event of each kind from each process that a wait_for took off the queue:
        # a later wait_for for it (the chief's ready, heard while waiting for the relay) still
        # finds it.
        self._first: dict[tuple[str, str], Event] = {}
        self._devices: list[str] = []  # put under the CPU quota at go()
        (logdir / "events.jsonl").write_text("")

    def start(self, name: str, host: int | str | None, role: str, spec: dict[str, Any],
              device: bool = False, python: str | None = None,
              module: str = "fedberry.bench.procs") -> None:
        """Start ``role`` on ``host`` (a worker index, "chief", or None: here). ``device``:
        an emulated device, under the run's CPU quota (if any) from ``go`` on: all of its
        training runs under it, its imports and data loading (nobody's time) at full speed.
        ``python`` and ``module``: another interpreter (the flower mode's) and its entry point;
        it imports this checkout's fedberry (PYTHONPATH), whatever it has installed."""
        argv = [python or sys.executable, "-m", module, role, json.dumps(spec)]
        log = open(self.logdir / f"{name}.log", "w")  # noqa: SIM115 - closed in stop()
        self._logs.append(log)
        kw: dict[str, Any] = {"stdin": subprocess.PIPE, "stdout": subprocess.PIPE,
                              "stderr": log, "text": True, "bufsize": 1}
        if python is not None:
            src = str(Path(__file__).resolve().parents[2])
            kw["env"] = {**os.environ, "PYTHONPATH": os.pathsep.join(
                [src, *filter(None, [os.environ.get("PYTHONPATH")])])}
        proc = (subprocess.Popen(argv, **kw) if host is None
                else self.link.spawn(host, argv, **kw))
        self.procs[name] = proc
        if device:
            self._devices.append(name)
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

    def wait_for(self, names: list[str], ev: str,
                 timeout: float = READY_TIMEOUT) -> dict[str, Event]:
        """Each named process's first ``ev`` event; raises if one exits or time runs out first."""
        got = {n: self._first[(n, ev)] for n in names if (n, ev) in self._first}
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
            self._first.setdefault((name, e["ev"]), e)
            if e["ev"] == "exit":
                raise RuntimeError(f"{name} exited with code {e['code']} before {ev}; see "
                                   f"{self.logdir / (name + '.log')}")
            if e["ev"] == ev and name in names:
                got.setdefault(name, e)
        return got

    def go(self) -> float:
        """Starts every process's clock; returns the harness's own start time."""
        if self.quotas is not None:
            for name in self._devices:
                self.quotas.add(f"{self.logdir.name}-{name}", self.procs[name].pid)
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
