"""``fedberry demo --transport mpi``: the same table, metrics and final model as the TCP demo, and
a clear message naming the rank when one is killed."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time

import numpy as np
import pytest
from helpers import fedberry_env, python

from fedberry.chief import checkpoint, model_file
from fedberry.chief.metrics import read

pytest.importorskip("mpi4py")
pytest.importorskip("torch")

from fedberry.launch import find_mpiexec, stop_launch  # noqa: E402
from fedberry.transports.mpi import RANKS_FILE  # noqa: E402

try:
    find_mpiexec()
except FileNotFoundError:  # pragma: no cover - the mpi extra brings it
    pytest.skip("mpiexec not installed", allow_module_level=True)

# Small and quick, but several batches and two rounds so that training and averaging both act.
WORKERS, ROUNDS, SYNC_EVERY = 2, 2, 20


def start_demo(out, *extra: str) -> subprocess.Popen:
    return subprocess.Popen(
        python("-m", "fedberry", "demo", "--transport", "mpi", "--workers", str(WORKERS),
               "--out", str(out), "--sync-every", str(SYNC_EVERY), "--timeout", "120", *extra),
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=fedberry_env(),
        start_new_session=True)


def finish(proc: subprocess.Popen, timeout: float) -> str:
    try:
        out, _ = proc.communicate(timeout=timeout)
        return out
    except subprocess.TimeoutExpired:
        # The demo, its mpiexec (a session of its own) and every rank (Open MPI: a process
        # group each).
        stop_launch(proc, grace=5)
        out, _ = proc.communicate()
        pytest.fail(f"the MPI demo did not finish in {timeout} s:\n{out}")
    finally:
        stop_launch(proc, grace=5)


def test_mpi_demo_matches_the_tcp_demo(tmp_path, monkeypatch):
    import importlib

    from fedberry.demo.torch_demo import TrainConfig, run_demo

    # The MPI demo in the background while the TCP demo runs here: same seed, partition,
    # batches and sync schedule (the demo worker trains on one torch thread, seeded batches).
    handles = []

    def capture(*args, **kwargs):
        handles.append(real_serve(*args, **kwargs))
        return handles[-1]

    serve_mod = importlib.import_module("fedberry.demo.torch_demo")  # run_demo's serve()
    real_serve = serve_mod.serve
    monkeypatch.setattr(serve_mod, "serve", capture)
    mpi = start_demo(tmp_path / "mpi", "--rounds", str(ROUNDS))
    try:
        code = run_demo(WORKERS, ROUNDS, str(tmp_path / "tcp"),
                        TrainConfig(sync_every=SYNC_EVERY), timeout=120, quiet=True)
    finally:
        out = finish(mpi, 120)
    assert code == 0
    assert mpi.returncode == 0, out
    tcp_model = handles[0].chief.global_arrays
    mpi_model = checkpoint.load(tmp_path / "mpi" / "checkpoint.npz").arrays

    assert len(tcp_model) == len(mpi_model)
    print("max |mpi - tcp| per tensor:",
          [float(np.abs(m - t).max()) for t, m in zip(tcp_model, mpi_model)])
    for t, m in zip(tcp_model, mpi_model):
        assert t.dtype == m.dtype and t.shape == m.shape
        # Sums in another order (float64 Reduce vs the TCP chief's running sum), two rounds of
        # SGD on top: measured within 3e-8 (a few float32 ulps), far below any training effect.
        np.testing.assert_allclose(m, t, rtol=1e-5, atol=1e-6)

    tcp_rec = read(tmp_path / "tcp" / "metrics.jsonl")
    mpi_rec = read(tmp_path / "mpi" / "metrics.jsonl")
    assert [list(r) for r in mpi_rec] == [list(r) for r in tcp_rec]
    for a, b in zip(tcp_rec, mpi_rec):
        assert (a["round"], a["workers"], a["num_samples"]) == \
            (b["round"], b["workers"], b["num_samples"])
        assert b["test_accuracy"] == pytest.approx(a["test_accuracy"], abs=2e-3)
        assert b["train_loss"] == pytest.approx(a["train_loss"], rel=1e-4)
    # The same table as the TCP demo, printed as rounds close.
    assert "round workers test_acc" in out and f"done: round {ROUNDS}" in out, out
    # Rank 0 wrote the final model, named by the torch workers' state_dict keys (they reach it
    # through the ranks' join), as the TCP chief did.
    mpi_file = model_file.load(tmp_path / "mpi" / model_file.FILE_NAME)
    tcp_file = model_file.load(tmp_path / "tcp" / model_file.FILE_NAME)
    assert list(mpi_file) == list(tcp_file) == ["1.weight", "1.bias", "3.weight", "3.bias",
                                                "5.weight", "5.bias"]
    for a, m in zip(mpi_file.values(), mpi_model):
        np.testing.assert_array_equal(a, m)
    assert out.strip().splitlines()[-1] == f"model: {tmp_path / 'mpi' / model_file.FILE_NAME}"


def pidfds(pid: int) -> int:
    """How many pidfds process ``pid`` holds open."""
    n = 0
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            n += os.readlink(f"/proc/{pid}/fd/{fd}") == "anon_inode:[pidfd]"
        except OSError:  # closed meanwhile
            continue
    return n


def test_mpi_demo_names_a_killed_rank(tmp_path):
    out_dir = tmp_path / "killed"
    proc = start_demo(out_dir, "--rounds", "1000")
    try:
        deadline = time.monotonic() + 90
        metrics = out_dir / "metrics.jsonl"
        # Kill worker rank 2 once the run is under way (a round has closed).
        while not (metrics.exists() and metrics.read_text().strip()):
            assert proc.poll() is None, proc.communicate()[0]
            assert time.monotonic() < deadline, "no round closed in 90 s"
            time.sleep(0.2)
        ranks = json.loads((out_dir / RANKS_FILE).read_text())
        # The demo sees which rank dies first through a pidfd per rank: kill only once it
        # holds them all, or it would start late and rightly say nothing.
        while pidfds(proc.pid) < len(ranks):
            assert proc.poll() is None, proc.communicate()[0]
            assert time.monotonic() < deadline, "the demo never watched the ranks"
            time.sleep(0.05)
        victim = next(r for r in ranks if r["rank"] == 2)
        os.kill(victim["pid"], signal.SIGKILL)
        out = finish(proc, 60)
    finally:
        stop_launch(proc, grace=5)
    assert proc.returncode == 1, out
    assert (f"rank 2 (a worker, pid {victim['pid']} on {victim['host']}) died"
            in out), out
    assert "mpiexec stopped the other ranks" in out, out
