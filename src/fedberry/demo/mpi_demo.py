"""``fedberry demo --transport mpi``: the Fashion-MNIST demo under ``mpiexec``.

Rank 0 runs ``fedberry chief --listen mpi://``, ranks 1..N ``fedberry worker --chief mpi://``: the
TCP demo's commands, so the same table, metrics and final model. A rank that dies is named
(``launch.failure``, ``launch.death_watch``).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from fedberry.chief.model_file import FILE_NAME
from fedberry.demo.torch_demo import TABLE_HEADER, TrainConfig, format_row
from fedberry.launch import DeathWatch, explain_failure, find_mpiexec, launcher_kind, stop_launch
from fedberry.launch.mpiexec import launcher_flags
from fedberry.transports.mpi import RANKS_FILE


def mpi_demo_command(mpiexec: str, workers: int, rounds: int, out: Path, cfg: Any,
                     python: str = sys.executable, kind: str = "hydra") -> list[str]:
    """``mpiexec`` in MPMD form: rank 0 runs ``fedberry chief --listen mpi://``, rank i runs
    ``fedberry worker --chief mpi:// --partition i/N``: the TCP demo's commands, with the same
    partition per worker. With hydra each rank's output goes to OUT/rank-R.log; other launchers
    write everything to OUT/mpiexec.log (Open MPI's lines tagged with [job,rank]: its per-rank
    files are named by a job id and their flags changed between 4.x and 5.x)."""
    chief = [python, "-m", "fedberry", "chief", "--listen", "mpi://", "--workers", str(workers),
             "--rounds", str(rounds), "--model", cfg.model, "--seed", str(cfg.seed),
             "--framework", cfg.framework, "--out", str(out)]
    if cfg.data_dir:
        chief += ["--data-dir", cfg.data_dir]
    cmd = [mpiexec, *launcher_flags(kind)]
    if kind == "hydra":
        cmd += ["-outfile-pattern", str(out / "rank-%r.log"),
                "-errfile-pattern", str(out / "rank-%r.log")]
    elif kind == "openmpi":
        cmd += ["--tag-output"]  # the spelling both 4.x and 5.x take
    cmd += ["-n", "1", *chief]
    for i in range(1, workers + 1):
        cmd += [":", "-n", "1", python, "-m", "fedberry", "worker", "--chief", "mpi://",
                "--partition", f"{i}/{workers}", *cfg.argv()]
    return cmd


def run_mpi_demo(workers: int = 4, rounds: int = 10, out: str = "runs/demo-mpi",
                 cfg: Any = None, timeout: float = 1800.0, quiet: bool = False) -> int:
    """``fedberry demo --transport mpi``: launch ``mpiexec -n N+1``, print the same table as the
    TCP demo from the metrics file as rounds close. Returns an exit code."""
    cfg = cfg or TrainConfig()
    out_dir = Path(out)
    out_dir.mkdir(parents=True, exist_ok=True)
    metrics_path = out_dir / "metrics.jsonl"
    for stale in (metrics_path, out_dir / RANKS_FILE, out_dir / FILE_NAME):
        stale.unlink(missing_ok=True)
    say = (lambda *a: None) if quiet else (lambda *a: print(*a, flush=True))
    mpiexec = find_mpiexec()
    kind = launcher_kind(mpiexec)
    cmd = mpi_demo_command(mpiexec, workers, rounds, out_dir, cfg, kind=kind)
    mpi_name = {"hydra": "MPICH", "openmpi": "Open MPI"}.get(kind, "MPI")
    say(f"fedberry demo: {workers} workers x {rounds} rounds, {cfg.model} on Fashion-MNIST "
        f"({cfg.partition_scheme}), MPI ({mpi_name}): mpiexec -n {workers + 1} (rank 0 the chief), "
        f"metrics in {metrics_path}")
    say(TABLE_HEADER)
    launcher_log = out_dir / "mpiexec.log"
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", "1")
    with open(launcher_log, "w") as logf:
        # Its own session, so that stop_launch finds every rank it started.
        proc = subprocess.Popen(cmd, stdout=logf, stderr=subprocess.STDOUT, env=env,
                                start_new_session=True)
        say(f"mpiexec started {workers + 1} ranks; each loads its framework and data before the "
            f"first round (their output: {out_dir})")
        shown = 0
        deadline = time.monotonic() + timeout
        ranks_file = out_dir / RANKS_FILE
        watch = DeathWatch()
        try:
            while True:
                code = proc.poll()
                if not watch.started and code is None and ranks_file.exists():
                    watch.start(json.loads(ranks_file.read_text()))
                shown = _show_new_rows(metrics_path, shown, say, format_row)
                if code is not None:
                    break
                if time.monotonic() > deadline:
                    say(f"timed out after {timeout:.0f} s; stopping mpiexec")
                    return 1
                time.sleep(0.2)
        finally:
            watch.stop()
            stop_launch(proc)
    records = _read_records(metrics_path)
    if code != 0:
        output = launcher_log.read_text(errors="replace")
        for f in sorted(out_dir.glob("rank-*.log")):
            output += "\n" + f.read_text(errors="replace")
        ranks = json.loads(ranks_file.read_text()) if ranks_file.exists() else None
        why = explain_failure(output, ranks, watch.first) or f"mpiexec exited with code {code}"
        logs = (f"{out_dir}/rank-R.log and {launcher_log}" if kind == "hydra" else
                f"{launcher_log}")
        say(f"the MPI run failed after {len(records)} rounds: {why}. See {logs}")
        return 1
    if records:
        last = records[-1]
        acc = last.get("test_accuracy")
        say(f"done: round {last['round']}, test accuracy "
            f"{acc if acc is None else format(acc, '.4f')}, "
            f"{sum(r['bytes_up'] + r['bytes_down'] for r in records) / 2**20:.1f} MiB moved by "
            f"the collectives, {last['wall_s']:.1f} s")
    if (out_dir / FILE_NAME).exists():  # rank 0 wrote it as the run finished
        say(f"model: {out_dir / FILE_NAME}")
    return 0


def _read_records(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    out = []
    for line in path.read_text().splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            break  # a line being written right now
    return out


def _show_new_rows(path: Path, shown: int, say: Callable[..., None],
                   fmt: Callable[[dict[str, Any]], str]) -> int:
    records = _read_records(path)
    for r in records[shown:]:
        say(fmt(r))
    return max(shown, len(records))
