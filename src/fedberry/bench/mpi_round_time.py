"""One round's wall time over MPI: fedberry's MPI transport against raw mpi4py collectives.

    python -m fedberry.bench.mpi_round_time                 # 1M and 10M params, 2 and 8 workers
    python -m fedberry.bench.mpi_round_time --params 1e6 --workers 2 --rounds 10 --tcp

The same round as ``fedberry.bench.round_time`` (the TCP benchmark): every worker sends its model
(float32, 8 tensors), the chief has the average, every worker has it back; workers do no compute.
``mpiexec -n W+1``: rank 0 is ``run_mpi_chief`` (weight 0), ranks 1..W are ``Worker("mpi://")``.
The time is taken at rank 0 between consecutive round closes after warm-up rounds, as the TCP
benchmark does at its chief.

The floor is the collective fedberry uses, bare: an in-place float32 ``Allreduce`` of one
preallocated buffer per rank and the division, in mpi4py with nothing around it. The gap to it is
what the Worker API costs (the NaN checks, packing the weighted tensors, fresh result arrays, the
metrics). A float32 ``Reduce`` to rank 0 + ``Bcast`` of the same buffer, bare too, shows what the
chief-centred alternative would cost. ``--tcp`` adds the TCP benchmark's columns (fedberry TCP,
the socket floor) from ``fedberry.bench.round_time``, measured in the same run.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from fedberry.bench.round_time import add_grid_options

TENSORS = 8  # as in the TCP benchmark: a model is a handful of tensors, not one blob


def model(params: int, seed: int = 0) -> list[np.ndarray]:
    sizes = [params // TENSORS] * TENSORS
    sizes[-1] += params - sum(sizes)
    rng = np.random.default_rng(seed)
    return [rng.standard_normal(n).astype(np.float32) for n in sizes]


# -- ranks -------------------------------------------------------------------------------------
def fedberry_rank(params: int, rounds: int, warmup: int, out: str) -> None:
    from mpi4py import MPI

    from fedberry import Worker
    from fedberry.transports.mpi import run_mpi_chief

    if MPI.COMM_WORLD.rank == 0:
        records = run_mpi_chief(rounds=warmup + rounds, initial=model(params))
        walls = [r["wall_s"] for r in records]
        Path(out).write_text(json.dumps({"round_s": (walls[-1] - walls[warmup - 1]) / rounds,
                                         "bytes_up": records[-1]["bytes_up"],
                                         "bytes_down": records[-1]["bytes_down"]}))
    else:
        with Worker("mpi://") as w:
            arrays = w.join(model(params, MPI.COMM_WORLD.rank))
            while not w.done:
                arrays = w.sync(arrays, 1.0)


def floor_rank(params: int, rounds: int, warmup: int, out: str) -> None:
    from mpi4py import MPI

    comm = MPI.COMM_WORLD
    flat32 = np.concatenate(model(params, comm.rank))
    summed = np.empty(params + 5, np.float32)

    def reduce_bcast() -> None:
        summed[:params] = flat32  # the weighted copy every rank makes anyway
        if comm.rank == 0:
            comm.Reduce(MPI.IN_PLACE, summed, op=MPI.SUM, root=0)
            np.divide(summed[:params], comm.size, out=flat32)
        else:
            comm.Reduce(summed, None, op=MPI.SUM, root=0)
        comm.Bcast(flat32, root=0)

    def allreduce() -> None:
        comm.Allreduce(MPI.IN_PLACE, summed, op=MPI.SUM)
        np.divide(summed[:params], comm.size, out=flat32)

    result = {}
    for name, fn in (("reduce_bcast_s", reduce_bcast), ("allreduce_s", allreduce)):
        comm.Barrier()
        stamps = []
        for _ in range(warmup + rounds):
            fn()
            stamps.append(time.perf_counter())
        result[name] = (stamps[-1] - stamps[warmup - 1]) / rounds
    if comm.rank == 0:
        Path(out).write_text(json.dumps(result))


# -- the launcher ------------------------------------------------------------------------------
def launch(kind: str, params: int, workers: int, rounds: int, warmup: int,
           timeout: float = 900.0) -> dict[str, float]:
    from fedberry.launch import mpiexec_argv, stop_launch

    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "result.json"
        # mpiexec_argv: the flags MPICH's or Open MPI's mpiexec needs (root, oversubscribing).
        cmd = [*mpiexec_argv(workers + 1), sys.executable, "-m",
               "fedberry.bench.mpi_round_time", kind, str(params), str(rounds), str(warmup),
               str(out)]
        env = dict(os.environ, OMP_NUM_THREADS="1")
        proc = subprocess.Popen(cmd, env=env, start_new_session=True)
        try:
            code = proc.wait(timeout)
        finally:
            stop_launch(proc)  # on a timeout: mpiexec and every rank, whatever the MPI
        if code != 0:
            raise RuntimeError(f"{' '.join(cmd)} exited with {code}")
        return json.loads(out.read_text())


def _median(xs: list[float]) -> float:
    return float(np.median(xs))


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] in ("_fedberry", "_floor"):
        fn = fedberry_rank if argv[0] == "_fedberry" else floor_rank
        fn(int(argv[1]), int(argv[2]), int(argv[3]), argv[4])
        return 0
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_grid_options(p)
    p.add_argument("--repeat", type=int, default=1,
                   help="run every measurement this many times and report the median (a shared "
                        "or small machine is noisy)")
    p.add_argument("--tcp", action="store_true",
                   help="also run fedberry.bench.round_time's TCP and socket-floor figures")
    args = p.parse_args(argv)
    head = "| params | workers | MiB per round (star) | fedberry MPI (s) | "
    head += "MPI floor: Allreduce (s) | bare Reduce+Bcast (s) |"
    if args.tcp:
        head += " fedberry TCP (s) | socket floor (s) |"
    print(head)
    print("|---:" * (head.count("|") - 1) + "|")
    rows = []
    for params in map(int, args.params):
        for workers in args.workers:
            runs = [(launch("_fedberry", params, workers, args.rounds, args.warmup),
                     launch("_floor", params, workers, args.rounds, args.warmup))
                    for _ in range(args.repeat)]
            fb = {k: _median([r[0][k] for r in runs]) for k in runs[0][0]}
            fl = {k: _median([r[1][k] for r in runs]) for k in runs[0][1]}
            row = {"params": params, "workers": workers, "mpi_s": fb["round_s"],
                   "allreduce_floor_s": fl["allreduce_s"], "reduce_bcast_s": fl["reduce_bcast_s"],
                   "mib": (fb["bytes_up"] + fb["bytes_down"]) / 2**20}
            line = (f"| {params / 1e6:g}M | {workers} | {row['mib']:.0f} | {fb['round_s']:.3f} "
                    f"| {fl['allreduce_s']:.3f} | {fl['reduce_bcast_s']:.3f} |")
            if args.tcp:
                from fedberry.bench import round_time

                tmp = Path(tempfile.gettempdir())
                row["tcp_s"] = _median([round_time.run_fedberry(params, workers, args.rounds,
                                                                args.warmup)
                                        for _ in range(args.repeat)])
                row["floor_s"] = _median([round_time.run_floor(params, workers, args.rounds,
                                                               args.warmup, tmp)
                                          for _ in range(args.repeat)])
                line += f" {row['tcp_s']:.3f} | {row['floor_s']:.3f} |"
            rows.append(row)
            print(line, flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
