"""The MPI transport with real ``mpiexec`` and real processes.

Every launch runs in its own process group with a timeout, and the whole group is killed on the
way out, so a hung collective fails the test instead of hanging the suite.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
from helpers import fedberry_env

from fedberry.chief.metrics import read
from fedberry.demo.mpi_demo import mpi_demo_command
from fedberry.launch import (
    DeathWatch,
    explain_failure,
    find_mpiexec,
    launcher_flags,
    launcher_kind,
    mpiexec_argv,
    stop_launch,
)
from fedberry.protocol.frames import spec_of
from fedberry.strategies import FedAvgM
from fedberry.transports.mpi import MPI_MISMATCH
from fedberry.transports.mpi_buffers import HEADER_BYTES, TRAILER, Layout

pytest.importorskip("mpi4py")
try:
    MPIEXEC = find_mpiexec()
except FileNotFoundError:  # pragma: no cover - the mpi extra brings it
    MPIEXEC = ""
needs_mpiexec = pytest.mark.skipif(not MPIEXEC, reason="mpiexec not installed")
KIND = launcher_kind(MPIEXEC) if MPIEXEC else ""

# Mixed dtypes and shapes, including a scalar-like tensor and an integer counter.
SHAPES = [((64, 33), "float32"), ((33,), "float32"), ((3, 4, 5), "float64"), ((1,), "int64"),
          ((7,), "float16")]
SAMPLES = {1: 5.0, 2: 120.0}  # rank -> num_samples


def run_mpi(argv: list[str], timeout: float = 60.0, **kw) -> subprocess.CompletedProcess:
    """Run an mpiexec command line; on timeout stop mpiexec and every rank, then fail."""
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env=fedberry_env(), start_new_session=True, **kw)
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        stop_launch(proc, grace=5)
        out, _ = proc.communicate()
        pytest.fail(f"{argv[:6]}... did not finish in {timeout} s:\n{out}")
    finally:
        stop_launch(proc, grace=5)
    return subprocess.CompletedProcess(argv, proc.returncode, out, "")


def mpi_python(n: int, script: str, *args: str) -> list[str]:
    # With Open MPI's mpiexec: --oversubscribe (3 ranks on 2 cores), --allow-run-as-root in CI.
    return [*mpiexec_argv(n, MPIEXEC), sys.executable, "-c", script, *args]


# ---------------------------------------------------------------------------------------------
# The average against numpy, rank 0 a pure aggregator (the CLI's `chief --listen mpi://` path)
# ---------------------------------------------------------------------------------------------
AVERAGE = textwrap.dedent("""
    import sys
    import numpy as np
    from mpi4py import MPI
    from fedberry import Worker
    from fedberry.transports.mpi import run_mpi_chief

    out, strategy, rounds = sys.argv[1], sys.argv[2], int(sys.argv[3])
    shapes, samples = {shapes!r}, {samples!r}
    rank = MPI.COMM_WORLD.rank
    if rank == 0:
        rng = np.random.default_rng(99)
        initial = [(10 * rng.standard_normal(s)).astype(d) for s, d in shapes]
        np.savez(f"{{out}}/initial.npz", *initial)
        run_mpi_chief(rounds=rounds, strategy=strategy, initial=initial, out_dir=out,
                      workers=2, evaluate=lambda a: {{"accuracy": float(a[0].sum()),
                                                      "loss": 0.5}})
    else:
        w = Worker("mpi://")
        model = w.join([np.zeros(s, d) for s, d in shapes])
        rng = np.random.default_rng(rank)
        saved = {{}}
        for r in range(rounds):
            mine = [(m + 10 * rng.standard_normal(m.shape)).astype(m.dtype) for m in model]
            model = w.sync(mine, samples[rank], {{"loss": float(rank)}})
            saved.update({{f"sent{{r}}_{{i}}": a for i, a in enumerate(mine)}})
            saved.update({{f"got{{r}}_{{i}}": a for i, a in enumerate(model)}})
        w.close()
        np.savez(f"{{out}}/rank{{rank}}.npz", done=np.array(w.done), sent_bytes=w.bytes_sent,
                 received_bytes=w.bytes_received, **saved)
""").format(shapes=SHAPES, samples=SAMPLES)


def _load(path: Path) -> dict[str, np.ndarray]:
    with np.load(path) as z:
        return {k: z[k] for k in z.files}


@needs_mpiexec
def test_mpiexec_n3_average_matches_numpy_weighted_mean(tmp_path):
    rounds = 2
    proc = run_mpi(mpi_python(3, AVERAGE, str(tmp_path), "fedavg", str(rounds)))
    assert proc.returncode == 0, proc.stdout
    init = _load(tmp_path / "initial.npz")
    ranks = {r: _load(tmp_path / f"rank{r}.npz") for r in (1, 2)}
    for r in (1, 2):
        assert bool(ranks[r]["done"])
        # Round 0's update was built on rank 0's initial model (Bcast at join).
        noise = (10 * np.random.default_rng(r).standard_normal(SHAPES[0][0])).astype(np.float32)
        np.testing.assert_allclose(ranks[r]["sent0_0"], init["arr_0"] + noise, atol=1e-5)
    total = sum(SAMPLES.values())
    for rnd in range(rounds):
        for i, (_, dtype) in enumerate(SHAPES):
            ref = sum(SAMPLES[r] * ranks[r][f"sent{rnd}_{i}"].astype(np.float64)
                      for r in (1, 2)) / total
            if np.issubdtype(np.dtype(dtype), np.integer):
                ref = np.rint(ref)
            got1, got2 = ranks[1][f"got{rnd}_{i}"], ranks[2][f"got{rnd}_{i}"]
            assert got1.dtype == np.dtype(dtype)
            # Bcast: every rank holds the same bits.
            np.testing.assert_array_equal(got1, got2)
            tol = 2e-3 if dtype == "float16" else 1e-6
            np.testing.assert_allclose(got1.astype(np.float64), ref, rtol=tol, atol=tol)

    records = read(tmp_path / "metrics.jsonl")
    assert [r["round"] for r in records] == [1, 2]
    layout = Layout(spec_of([np.zeros(s, d) for s, d in SHAPES]))
    assert layout.sum_dtype == np.float64  # integer and float64 tensors: summed in float64
    reduce_bytes = 8 * (layout.elements + TRAILER)
    for rec in records:
        assert list(rec) == ["round", "workers", "test_accuracy", "test_loss", "num_samples",
                             "train_loss", "bytes_up", "bytes_down", "wall_s"]
        assert rec["workers"] == 2 and rec["num_samples"] == total
        assert rec["train_loss"] == pytest.approx((5 * 1 + 120 * 2) / total)
        assert rec["test_loss"] == 0.5
    # Star model: every round, each of the 2 workers sends its float64 buffer up and gets the
    # sum back (FedAvg: no broadcast); round 1 also carries the join (the initial model down).
    assert records[1]["bytes_up"] == 2 * reduce_bytes
    assert records[1]["bytes_down"] == 2 * reduce_bytes
    assert records[0]["bytes_down"] >= 2 * (reduce_bytes + layout.model_bytes)
    assert records[0]["test_accuracy"] == pytest.approx(
        float(ranks[1]["got0_0"].astype(np.float32).sum()), rel=1e-5)
    for r in (1, 2):
        assert ranks[r]["sent_bytes"] >= rounds * reduce_bytes
        assert ranks[r]["received_bytes"] >= rounds * reduce_bytes + layout.model_bytes
    table = json.loads((tmp_path / "mpi_ranks.json").read_text())
    assert [t["rank"] for t in table] == [0, 1, 2] and not table[0]["trains"]


@needs_mpiexec
def test_mpi_fedavgm_gives_the_strategy_objects_numbers(tmp_path):
    """A stateful strategy runs on rank 0 only: the numbers are FedAvgM's, update by update."""
    rounds = 2
    proc = run_mpi(mpi_python(3, AVERAGE, str(tmp_path), "fedavgm", str(rounds)))
    assert proc.returncode == 0, proc.stdout
    init = _load(tmp_path / "initial.npz")
    ranks = {r: _load(tmp_path / f"rank{r}.npz") for r in (1, 2)}
    k = len(SHAPES)
    ref = FedAvgM()
    global_ = [init[f"arr_{i}"] for i in range(k)]
    for rnd in range(rounds):
        ref.begin_round(global_)
        for r in (1, 2):
            ref.add([ranks[r][f"sent{rnd}_{i}"].copy() for i in range(k)], SAMPLES[r])
        global_ = ref.result()
        for i, (_, dtype) in enumerate(SHAPES):
            tol = 2e-3 if dtype == "float16" else 1e-5
            np.testing.assert_allclose(ranks[1][f"got{rnd}_{i}"].astype(np.float64),
                                       global_[i].astype(np.float64), rtol=tol, atol=tol)


# ---------------------------------------------------------------------------------------------
# Rank 0 trains too: the same script on every rank, options in the address
# ---------------------------------------------------------------------------------------------
EVERY_RANK = textwrap.dedent("""
    import sys
    import numpy as np
    from mpi4py import MPI
    from fedberry import Worker

    out = sys.argv[1]
    rank = MPI.COMM_WORLD.rank
    with Worker(f"mpi://?rounds=3&out={out}") as w:
        model = w.join([np.full(4, rank, np.float32)])
        assert model[0].tolist() == [0, 0, 0, 0], model   # everyone starts from rank 0's
        steps = 0
        while not w.done:
            model = w.sync([model[0] + rank + 1], rank + 1)
            steps += 1
        np.save(f"{out}/final{rank}.npy", model[0])
        assert steps == 3 and w.round == 3
""")


@needs_mpiexec
def test_rank0_trains_too_with_options_in_the_address(tmp_path):
    proc = run_mpi(mpi_python(3, EVERY_RANK, str(tmp_path)))
    assert proc.returncode == 0, proc.stdout
    # Each round adds the weighted mean of (rank + 1) with weights rank + 1: 14 / 6.
    expected = np.float32(0)
    for _ in range(3):
        expected = np.float32((1 * (expected + 1) + 2 * (expected + 2) + 3 * (expected + 3)) / 6)
    finals = [np.load(tmp_path / f"final{r}.npy") for r in range(3)]
    for f in finals:
        np.testing.assert_allclose(f, expected, rtol=1e-6)
        np.testing.assert_array_equal(f, finals[0])
    records = read(tmp_path / "metrics.jsonl")
    assert [(r["round"], r["workers"], r["num_samples"]) for r in records] == \
        [(1, 3, 6.0), (2, 3, 6.0), (3, 3, 6.0)]
    # A float32 model is summed in float32: 2 ranks x (4 values + 5 trailer) x 4 bytes up.
    assert records[2]["bytes_up"] == 2 * 4 * (4 + TRAILER)


# ---------------------------------------------------------------------------------------------
# Failures: a clear message naming the rank, never a hang
# ---------------------------------------------------------------------------------------------
MISMATCH = textwrap.dedent("""
    import numpy as np
    from mpi4py import MPI
    from fedberry import Worker
    from fedberry.errors import ModelMismatchError

    rank = MPI.COMM_WORLD.rank
    shape = (10, 3) if rank == 2 else (10, 2)
    w = Worker("mpi://?rounds=1")
    try:
        w.join([np.zeros(4, np.float32), np.zeros(shape, np.float32)])
    except ModelMismatchError as exc:
        print(f"rank {rank} caught: {exc}", flush=True)
        raise
""")


@needs_mpiexec
def test_model_mismatch_names_the_tensor_and_the_rank(tmp_path):
    proc = run_mpi(mpi_python(3, MISMATCH))
    assert proc.returncode != 0
    assert ("rank 2 caught: this rank's (rank 2) model does not match the federation's "
            "(rank 0's): tensor 1 is float32[10, 3], the federation's is float32[10, 2]"
            in proc.stdout), proc.stdout
    assert "rank 0 caught: the models of ranks [2] do not match" in proc.stdout


DIES = textwrap.dedent("""
    import sys, time
    import numpy as np
    from mpi4py import MPI
    from fedberry import Worker

    how = sys.argv[1]
    rank = MPI.COMM_WORLD.rank
    w = Worker("mpi://?rounds=5" + ("&timeout=2" if how == "stall" else ""))
    model = w.join([np.zeros(8, np.float32)])
    model = w.sync(model, 1)
    if rank == 2:
        if how == "raise":
            raise RuntimeError("out of memory, say")
        if how == "exit":
            sys.exit(0)           # leaves without close() while the others wait
        if how == "stall":
            time.sleep(30)        # alive but stuck: only a timeout can tell
    while not w.done:
        model = w.sync(model, 1)
""")


@needs_mpiexec
@pytest.mark.parametrize("how, why", [
    ("raise", "failed: RuntimeError: out of memory, say"),
    ("exit", "exited before the federation finished"),
    ("stall", "did not complete within 2 s"),
])
def test_a_failing_rank_stops_the_job_with_its_name(how, why):
    proc = run_mpi(mpi_python(3, DIES, how), timeout=40)
    assert proc.returncode != 0
    assert "fedberry mpi: rank" in proc.stdout and why in proc.stdout, proc.stdout
    if how != "stall":  # a stall is seen by the ranks waiting for the stuck one
        assert "fedberry mpi: rank 2 (a worker, pid" in proc.stdout, proc.stdout


# ---------------------------------------------------------------------------------------------
# Pure functions: buffer layout, launcher-output parsing
# ---------------------------------------------------------------------------------------------
def test_sum_dtype_is_float32_only_for_small_float_models():
    f32, f16 = np.zeros(3, np.float32), np.zeros(2, np.float16)
    assert Layout(spec_of([f32, f16])).sum_dtype == np.float32
    assert Layout(spec_of([f32, np.zeros(1, np.int64)])).sum_dtype == np.float64
    assert Layout(spec_of([f32, np.zeros(1, np.float64)])).sum_dtype == np.float64


def test_layout_packs_and_unpacks_aligned_views():
    rng = np.random.default_rng(0)
    arrays = [rng.standard_normal((5, 3)).astype(np.float32), np.arange(3, dtype=np.int64),
              rng.standard_normal(1).astype(np.float16), np.array([True, False])]
    layout = Layout(spec_of(arrays))
    buf = layout.pack_model(arrays, 7, True)
    assert buf.size == layout.bcast_bytes and layout.byte_offsets[0] == HEADER_BYTES
    round_, done, out = layout.unpack_model(buf)
    assert (round_, done) == (7, True)
    for a, b in zip(arrays, out):
        assert b.dtype == a.dtype and b.ctypes.data % 64 == 0
        np.testing.assert_array_equal(a, b)
    sums = np.zeros(layout.elements + TRAILER)
    layout.pack_weighted(sums, arrays, 2.0)
    for a, s in zip(arrays, layout.sums(sums)):
        np.testing.assert_array_equal(s, 2.0 * a.astype(np.float64))


HYDRA_KILLED = """
===================================================================================
=   BAD TERMINATION OF ONE OF YOUR APPLICATION PROCESSES
=   PID 11310 RUNNING AT node7
=   EXIT CODE: 9
=   CLEANING UP REMAINING PROCESSES
=   YOU CAN IGNORE THE BELOW CLEANUP MESSAGES
===================================================================================
YOUR APPLICATION TERMINATED WITH THE EXIT STRING: Killed (signal 9)
"""


def test_explain_failure_names_the_rank_behind_a_pid():
    ranks = [{"rank": r, "pid": 11300 + 5 * r, "host": "node7"} for r in range(3)]
    assert explain_failure(HYDRA_KILLED, ranks) == (
        "rank 2 (a worker, pid 11310 on node7) died (Killed (signal 9)); mpiexec stopped the "
        "other ranks")
    assert "pid 11310 on node7 (it died before the ranks were recorded)" in explain_failure(
        HYDRA_KILLED, None)
    ompi = ("mpiexec noticed that process rank 3 with PID 0 on node n2 exited on signal 9 "
            "(Killed).")
    assert explain_failure(ompi, None) == (
        "rank 3 (on n2) died (Killed (signal 9)); mpiexec stopped the other ranks")
    ours = ("fedberry mpi: rank 1 (a worker, pid 5 on h) failed: ValueError: x; aborting the "
            "MPI job so that")
    assert explain_failure(ours + HYDRA_KILLED, ranks) == \
        "rank 1 (a worker, pid 5 on h) failed: ValueError: x"
    assert explain_failure("nothing useful", ranks) == ""
    # What the launcher saw die first beats hydra's report (which may name a rank it killed).
    first = {"rank": 1, "pid": 11305, "host": "node7"}
    assert explain_failure(HYDRA_KILLED, ranks, first) == (
        "rank 1 (a worker, pid 11305 on node7) died; mpiexec stopped the other ranks")


# Open MPI 5.0.11's (prterun's) reports, as printed: wrapped at any space, the rank by number.
OMPI_KILLED = """
--------------------------------------------------------------------------
prterun noticed that process rank 2 with PID 11310 on node node7 exited on
signal 9 (Killed).
--------------------------------------------------------------------------
"""
OMPI_EXIT = """
--------------------------------------------------------------------------
prterun detected that one or more processes exited with non-zero status,
thus causing the job to be terminated. The first process to do so was:

   Process name: [prterun-node7-840@1,1]
   Exit code:    3
--------------------------------------------------------------------------
"""
OMPI_ABORT = """
--------------------------------------------------------------------------
MPI_ABORT was invoked on rank 2 in communicator MPI_COMM_WORLD
  Proc: [[42538,1],2]
  Errorcode: 1
--------------------------------------------------------------------------
--------------------------------------------------------------------------
prterun has exited due to process rank 2 with PID 0 on node node7 calling
"abort". This may have caused other processes in the application to be
terminated by signals sent by prterun (as reported here).
"""


def test_explain_failure_reads_open_mpi_reports():
    ranks = [{"rank": r, "pid": 11300 + 5 * r, "host": "node7"} for r in range(3)]
    assert explain_failure(OMPI_KILLED, ranks) == (
        "rank 2 (a worker, pid 11310 on node7) died (Killed (signal 9)); mpiexec stopped the "
        "other ranks")
    assert explain_failure(OMPI_KILLED, None).startswith(
        "rank 2 (pid 11310 on node7) died (Killed (signal 9))")
    # Open MPI 4 writes the process name as [[jobid,1],rank].
    assert explain_failure(OMPI_EXIT, ranks).startswith(
        "rank 1 (a worker, pid 11305 on node7) died (exit code 3)")
    assert explain_failure(OMPI_EXIT.replace("prterun-node7-840@1,1", "[4242,1],0"), ranks
                           ).startswith("rank 0 (the chief, pid 11300 on node7) died (exit code")
    assert explain_failure(OMPI_ABORT, ranks).startswith(
        "rank 2 (a worker, pid 11310 on node7) died (it called MPI_Abort)")
    # The launcher's cause is added when it names the rank the watch saw die first.
    first = {"rank": 2, "pid": 11310, "host": "node7"}
    assert explain_failure(OMPI_KILLED, ranks, first) == (
        "rank 2 (a worker, pid 11310 on node7) died (Killed (signal 9)); mpiexec stopped the "
        "other ranks")
    # Open MPI's tagged output (the demo's --tag-output) still shows our own abort message.
    ours = ("[1,1]<stderr>: fedberry mpi: rank 1 (a worker, pid 5 on h) failed: ValueError: x; "
            "aborting the MPI job so that the other ranks do not wait for it forever\n")
    assert explain_failure(ours + OMPI_ABORT, ranks) == \
        "rank 1 (a worker, pid 5 on h) failed: ValueError: x"


def _sleepers(n: int) -> list[subprocess.Popen]:
    return [subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
            for _ in range(n)]


def _watch_sees(ranks: list[dict], procs: list[subprocess.Popen], die_before: int | None,
                *die_after: int) -> dict | None:
    watch = DeathWatch()
    try:
        if die_before is not None:
            procs[die_before].kill()
            procs[die_before].wait(10)
        watch.start(ranks)
        for i in die_after:
            procs[i].kill()
            procs[i].wait(10)
        if watch._thread is not None:
            watch._thread.join(10)
        return watch.first
    finally:
        watch.stop()
        for p in procs:
            p.kill()
            p.wait(10)


@pytest.mark.skipif(not hasattr(os, "pidfd_open"), reason="pidfds are Linux's")
def test_death_watch_names_the_first_rank_to_exit_and_never_a_later_one():
    import socket

    host = socket.gethostname()
    procs = _sleepers(3)
    ranks = [{"rank": i, "pid": p.pid, "host": host} for i, p in enumerate(procs)]
    assert _watch_sees(ranks, procs, None, 2) == ranks[2]
    # A rank already dead when the watch began: the next to exit is not the first, and the
    # watch says nothing rather than blame it.
    procs = _sleepers(3)
    ranks = [{"rank": i, "pid": p.pid, "host": host} for i, p in enumerate(procs)]
    assert _watch_sees(ranks, procs, 1, 2) is None
    # A rank on another host: its pid is some other process here, never watched.
    procs = _sleepers(2)
    ranks = [{"rank": 0, "pid": procs[0].pid, "host": "elsewhere"},
             {"rank": 1, "pid": procs[1].pid, "host": host}]
    assert _watch_sees(ranks, procs, None, 0, 1) == ranks[1]


def test_launcher_flags_and_the_demo_command_fit_the_mpi():
    from fedberry.demo.torch_demo import TrainConfig

    assert launcher_flags("hydra") == [] and launcher_flags("other") == []
    ompi = launcher_flags("openmpi")
    assert "--oversubscribe" in ompi
    assert ("--allow-run-as-root" in ompi) == (os.geteuid() == 0)
    out, cfg = Path("/o"), TrainConfig()
    hydra_cmd = mpi_demo_command("mpiexec", 2, 3, out, cfg, kind="hydra")
    ompi_cmd = mpi_demo_command("mpiexec", 2, 3, out, cfg, kind="openmpi")
    assert "-outfile-pattern" in hydra_cmd and "--oversubscribe" not in hydra_cmd
    assert "-outfile-pattern" not in ompi_cmd and "--tag-output" in ompi_cmd
    assert ompi_cmd[1:1 + len(ompi)] == ompi
    # Global options before the first program; then one "-n 1 prog" per rank, ":"-separated.
    assert ompi_cmd.count(":") == 2 and ompi_cmd.index("-n") > len(ompi)


@needs_mpiexec
def test_the_mpiexec_here_is_known_and_launches_with_its_flags():
    kind = launcher_kind(MPIEXEC)
    assert kind in ("hydra", "openmpi")
    argv = mpiexec_argv(3, MPIEXEC)
    assert argv[0] == MPIEXEC and argv[-2:] == ["-n", "3"]
    assert argv[1:-2] == launcher_flags(kind)


ALONE = textwrap.dedent("""
    import numpy as np
    from fedberry import Worker
    Worker("mpi://?rounds=1").join([np.zeros(2, np.float32)])
""")


@needs_mpiexec
def test_an_mpiexec_of_another_mpi_is_named_not_run_as_n_federations():
    """MPICH's mpiexec starting an Open MPI mpi4py (or the reverse) makes every process rank 0
    of a job of 1. Simulated without the other MPI: one process, and the variable the other
    launcher sets saying it started 3."""
    other = ("PMI_SIZE" if launcher_kind(MPIEXEC) == "openmpi" else "OMPI_COMM_WORLD_SIZE")
    proc = subprocess.run([sys.executable, "-W", "ignore", "-c", ALONE], capture_output=True,
                          text=True, timeout=60, env=fedberry_env(**{other: "3"}))
    assert proc.returncode != 0
    assert "mpiexec started 3 processes, but this one is alone in a job of 1" in proc.stderr, \
        proc.stderr
    assert MPI_MISMATCH in proc.stderr
    line = next(x for x in proc.stderr.splitlines() if MPI_MISMATCH in x)
    assert MPI_MISMATCH in explain_failure(line, None)


SLEEPERS = textwrap.dedent("""
    import os, signal, sys, time
    from mpi4py import MPI
    signal.signal(signal.SIGTERM, signal.SIG_IGN)  # only SIGKILL can stop it
    rank = MPI.COMM_WORLD.rank
    with open(f"{sys.argv[1]}/pid{rank}.tmp", "w") as f:
        f.write(str(os.getpid()))
    os.replace(f"{sys.argv[1]}/pid{rank}.tmp", f"{sys.argv[1]}/pid{rank}")
    time.sleep(120)
""")


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"  # a zombie has exited; its reaper may be slow


@needs_mpiexec
@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="needs /proc")
def test_stop_launch_leaves_no_rank_running(tmp_path):
    """Open MPI gives every rank a process group of its own: killing mpiexec's group is not
    enough. Ranks that ignore SIGTERM must be gone too."""
    proc = subprocess.Popen(mpi_python(3, SLEEPERS, str(tmp_path)), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, env=fedberry_env(),
                            start_new_session=True)
    pids: list[int] = []
    try:
        deadline = time.monotonic() + 60
        while len(list(tmp_path.glob("pid?"))) < 3:
            assert proc.poll() is None, "mpiexec exited early"
            assert time.monotonic() < deadline, "the ranks did not start in 60 s"
            time.sleep(0.1)
        pids = [int((tmp_path / f"pid{r}").read_text()) for r in range(3)]
        assert all(_alive(p) for p in pids)
    finally:
        stop_launch(proc, grace=3)
    deadline = time.monotonic() + 10
    while any(_alive(p) for p in pids) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not [p for p in pids if _alive(p)]


@needs_mpiexec
@pytest.mark.skipif(KIND != "openmpi", reason="Open MPI's own report of a killed rank; this "
                    "mpiexec is not Open MPI's (hydra's report is read in the demo test)")
def test_open_mpi_report_of_a_killed_rank_is_read(tmp_path):
    """The canned Open MPI text above, checked against the real thing."""
    proc = subprocess.Popen(mpi_python(3, SLEEPERS, str(tmp_path)), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, env=fedberry_env(),
                            start_new_session=True)
    try:
        deadline = time.monotonic() + 60
        while len(list(tmp_path.glob("pid?"))) < 3:
            assert proc.poll() is None, proc.communicate()[0]
            assert time.monotonic() < deadline, "the ranks did not start in 60 s"
            time.sleep(0.1)
        pids = [int((tmp_path / f"pid{r}").read_text()) for r in range(3)]
        os.kill(pids[2], signal.SIGKILL)
        out, _ = proc.communicate(timeout=30)
    finally:
        stop_launch(proc, grace=3)
    assert proc.returncode != 0
    ranks = [{"rank": r, "pid": pid, "host": "h"} for r, pid in enumerate(pids)]
    assert explain_failure(out, ranks) == (
        f"rank 2 (a worker, pid {pids[2]} on h) died (Killed (signal 9)); mpiexec stopped the "
        "other ranks"), out


def test_mpiexec_is_found():
    if not MPIEXEC:
        pytest.skip("no mpiexec")
    assert Path(MPIEXEC).name == "mpiexec" and shutil.which(MPIEXEC)


# ---------------------------------------------------------------------------------------------
# The chief runtime under MPI: resume (bit-exact, refused for another strategy), on_round policy
# ---------------------------------------------------------------------------------------------
RESUME_WORKER = textwrap.dedent("""
    import sys, time
    import numpy as np
    from mpi4py import MPI
    from fedberry import Worker

    pause = float(sys.argv[1])
    rank = MPI.COMM_WORLD.rank
    with Worker("mpi://") as w:
        model = w.join([np.zeros((16, 8), np.float32), np.zeros(8, np.float32),
                        np.zeros(2, np.int64)])
        while not w.done:
            # The update depends on (rank, round, model) only: a resumed run replays it exactly.
            rng = np.random.default_rng([rank, w.round])
            mine = [(m + 3 * rng.standard_normal(m.shape)).astype(m.dtype) for m in model]
            model = w.sync(mine, 3 + rank, {"loss": float(w.round + rank)})
            time.sleep(pause)
""")
RESUME_ROUNDS = 6


def chief_and_workers(out: Path, pause: float, *chief_args: str) -> list[str]:
    """An MPMD launch like the demo's: rank 0 `fedberry chief --listen mpi://`, 2 workers."""
    chief = [sys.executable, "-m", "fedberry", "chief", "--listen", "mpi://", "--workers", "2",
             "--rounds", str(RESUME_ROUNDS), "--model", "none", "--out", str(out), *chief_args]
    worker = [sys.executable, "-c", RESUME_WORKER, str(pause)]
    return [*mpiexec_argv(1, MPIEXEC), *chief, ":", "-n", "2", *worker]


def _checkpoint(path: Path):  # type: ignore[no-untyped-def]
    from fedberry.chief import checkpoint

    return checkpoint.load(path)


@needs_mpiexec
@pytest.mark.parametrize("strategy, other", [("fedavgm", "fedadam"), ("fedavg", "fedavgm")])
def test_mpi_chief_killed_and_resumed_continues_bit_exact(tmp_path, strategy, other):
    """As tests/test_robustness_resume.py does for TCP: the chief (rank 0) is SIGKILLed midway,
    mpiexec stops the job, and `--resume` continues to the same final model, bit for bit, as an
    uninterrupted run (FedAvg: every rank's own mean; FedAvgM: rank 0's Bcast, and its velocity
    comes back from the checkpoint). Another strategy's
    resume is refused with the sentence TCP gives (the same chief.resume check)."""
    whole, cut = tmp_path / "whole", tmp_path / "cut"
    proc = run_mpi(chief_and_workers(whole, 0.0, "--strategy", strategy))
    assert proc.returncode == 0, proc.stdout
    reference = _checkpoint(whole / "checkpoint.npz")
    assert reference.round == RESUME_ROUNDS

    launch = subprocess.Popen(chief_and_workers(cut, 0.6, "--strategy", strategy),
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                              env=fedberry_env(), start_new_session=True)
    try:
        deadline = time.monotonic() + 60
        ck = cut / "checkpoint.npz"
        while not (ck.exists() and _checkpoint(ck).round >= 2):
            assert launch.poll() is None, launch.communicate()[0]
            assert time.monotonic() < deadline, "no checkpoint of round 2 in 60 s"
            time.sleep(0.05)
        chief_pid = json.loads((cut / "mpi_ranks.json").read_text())[0]["pid"]
        os.kill(chief_pid, signal.SIGKILL)
        out, _ = launch.communicate(timeout=30)
    finally:
        stop_launch(launch, grace=5)
    assert launch.returncode != 0, out
    at_kill = _checkpoint(cut / "checkpoint.npz").round
    assert 2 <= at_kill < RESUME_ROUNDS, "the run was not cut midway"
    before = read(cut / "metrics.jsonl")

    refused = run_mpi(chief_and_workers(cut, 0.0, "--strategy", other, "--resume"))
    assert refused.returncode != 0
    # TCP's sentence, naming both rules with their hyperparameters
    # ("... --strategy fedavgm:lr=1.0,momentum=0.9, not fedadam:lr=0.01,...").
    assert (f"--resume: {cut / 'checkpoint.npz'} was written by a run with --strategy "
            f"{strategy}" in refused.stdout), refused.stdout
    assert f", not {other}:" in refused.stdout, refused.stdout
    assert _checkpoint(cut / "checkpoint.npz").round == at_kill  # untouched

    proc = run_mpi(chief_and_workers(cut, 0.0, "--strategy", strategy, "--resume"))
    assert proc.returncode == 0, proc.stdout
    final = _checkpoint(cut / "checkpoint.npz")
    assert final.round == RESUME_ROUNDS and final.config["resume"] is True
    for a, b in zip(final.arrays, reference.arrays, strict=True):
        assert a.dtype == b.dtype and a.tobytes() == b.tobytes()
    got, want = final.strategy.arrays, reference.strategy.arrays
    assert final.strategy.params == reference.strategy.params
    assert got.keys() == want.keys()
    for k, v in want.items():
        assert got[k].tobytes() == v.tobytes(), k
    after = read(cut / "metrics.jsonl")[len(before):]
    assert [r["round"] for r in after] == list(range(at_kill + 1, RESUME_ROUNDS + 1))
    assert [r["workers"] for r in after] == [2] * len(after)


ON_ROUND = textwrap.dedent("""
    import sys
    import numpy as np
    from mpi4py import MPI
    from fedberry import Worker
    from fedberry.transports.mpi import run_mpi_chief

    seen = []

    def on_round(record):
        seen.append(record["round"])
        raise RuntimeError(f"display broke at round {record['round']}")

    if MPI.COMM_WORLD.rank == 0:
        records = run_mpi_chief(rounds=3, out_dir=sys.argv[1], on_round=on_round)
        print("rounds", [r["round"] for r in records], "seen", seen, flush=True)
    else:
        with Worker("mpi://") as w:
            model = w.join([np.zeros(3, np.float32)])
            while not w.done:
                model = w.sync([model[0] + 1], 1)
""")


@needs_mpiexec
def test_a_raising_on_round_is_logged_and_the_run_goes_on_as_over_tcp(tmp_path):
    """The runtime's policy (tests/test_serve.py checks the same over TCP): every round is
    still written and called back, the error is logged, the run finishes."""
    proc = run_mpi(mpi_python(3, ON_ROUND, str(tmp_path)))
    assert proc.returncode == 0, proc.stdout
    assert "rounds [1, 2, 3] seen [1, 2, 3]" in proc.stdout, proc.stdout
    assert "round 1: the on_round callback failed; the run goes on" in proc.stdout
    assert "RuntimeError: display broke at round 3" in proc.stdout
    assert [r["round"] for r in read(tmp_path / "metrics.jsonl")] == [1, 2, 3]


def test_strategies_that_need_every_update_are_refused_with_a_sentence():
    from fedberry.transports.mpi import MpiChiefOptions
    from fedberry.transports.mpi_chief import RankZeroChief

    with pytest.raises(ValueError, match="the median strategy needs every update, but MPI "
                                         "rounds sum them in one collective; use it over TCP"):
        RankZeroChief(MpiChiefOptions(strategy="median"), session=None)


@needs_mpiexec
def test_mpi_chief_takes_the_cli_admission_policy(tmp_path):
    """`fedberry chief --listen mpi:// --max-samples` reaches rank 0's chief: the workers claim
    4 and 5 samples, the combined update stands for 2 workers at most 2 each, so it is refused
    and the job stops with the policy's sentence instead of averaging past the bound."""
    proc = run_mpi(chief_and_workers(tmp_path, 0.0, "--max-samples", "2"))
    assert proc.returncode != 0, proc.stdout
    assert "max-samples" in proc.stdout or "max_samples" in proc.stdout, proc.stdout


def test_an_unknown_key_in_an_mpi_address_is_refused_with_the_known_ones():
    from fedberry.transports.mpi_chief import MpiChiefOptions, query

    with pytest.raises(ValueError, match=r"unknown option round in 'mpi://\?round=3': an mpi:// "
                                         r"address takes checkpoint, .*rounds, save_every, "
                                         r"strategy, timeout"):
        MpiChiefOptions.from_address("mpi://?round=3")
    assert query("mpi://?rounds=3&timeout=5") == {"rounds": "3", "timeout": "5"}
    assert MpiChiefOptions.from_address("mpi://?save_every=3&out=o").save_every == 3


@needs_mpiexec
def test_the_status_server_watches_an_mpi_chief(tmp_path):
    """`fedberry chief --listen mpi:// --status`: rank 0's runtime is the one a TCP chief runs,
    so the status server serves it the same way; /metrics counts the rounds metrics.jsonl has
    while the job runs, and /api/status shows the training ranks as one worker, "mpi"."""
    pytest.importorskip("prometheus_client")
    import urllib.request

    from fedberry.serve import listen_socket

    probe = listen_socket("127.0.0.1", 0)
    port = probe.getsockname()[1]
    probe.close()
    url = f"http://127.0.0.1:{port}/"
    launch = subprocess.Popen(chief_and_workers(tmp_path, 0.5, "--status", f"127.0.0.1:{port}"),
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                              env=fedberry_env(), start_new_session=True)
    seen: dict = {}
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and launch.poll() is None:
            try:
                with urllib.request.urlopen(url + "api/status", timeout=2) as r:
                    s = json.loads(r.read())
                with urllib.request.urlopen(url + "metrics", timeout=2) as r:
                    metrics = r.read().decode()
            except OSError:
                time.sleep(0.1)
                continue
            if 2 <= s["round"] < RESUME_ROUNDS:
                seen = {"status": s, "metrics": metrics}
                break
            time.sleep(0.1)
        out, _ = launch.communicate(timeout=60)
    finally:
        stop_launch(launch, grace=5)
    assert launch.returncode == 0, out
    assert seen, f"the status server never showed a round in progress:\n{out}"
    s = seen["status"]
    assert s["rounds"] == RESUME_ROUNDS
    assert [w["worker_id"] for w in s["workers"]] == ["mpi"]
    assert [h["round"] for h in s["history"]] == list(range(1, s["round"] + 1))
    rounds_total = next(float(x.split()[-1]) for x in seen["metrics"].splitlines()
                        if x.startswith("fedberry_rounds_total"))
    assert rounds_total >= s["round"] >= 2
    assert len(read(tmp_path / "metrics.jsonl")) == RESUME_ROUNDS
    assert f"status page at http://127.0.0.1:{port}/" in out
