"""DP-FedAvg under real mpiexec: ``fedberry chief --listen mpi:// --dp ...`` as rank 0, two
training ranks that learn C at join, clip to it and weigh the same; --target-epsilon's stop,
the table's epsilon column and the run's privacy line."""

from __future__ import annotations

import math
import subprocess
import sys

import numpy as np
import pytest
from helpers import fedberry_env

from fedberry.chief.metrics import read

pytest.importorskip("mpi4py")
pytest.importorskip("dp_accounting")

from fedberry.launch import find_mpiexec, mpiexec_argv, stop_launch  # noqa: E402
from fedberry.privacy.accountant import epsilon  # noqa: E402

try:
    MPIEXEC = find_mpiexec()
except FileNotFoundError:  # pragma: no cover - the mpi extra brings it
    MPIEXEC = ""

D = 200  # model size: rank 1 moves the first half, rank 2 the second
RANKS = """
import sys
import numpy as np
from mpi4py import MPI
rank = MPI.COMM_WORLD.Get_rank()
out, target, D = sys.argv[1], sys.argv[2], int(sys.argv[3])
if rank == 0:
    from fedberry.cli import main
    sys.exit(main(["chief", "--listen", "mpi://", "--model", "none", "--workers", "2",
                   "--rounds", "10", "--out", out, "--dp", "clip=0.5,noise=2.0,seed=7",
                   "--target-epsilon", target]))
import fedberry
w = fedberry.Worker("mpi://")
m = w.join([np.zeros(D, np.float32)])
got = [m[0]]
while not w.done:
    d = np.zeros(D, np.float32)
    d[(rank - 1) * (D // 2):rank * (D // 2)] = 100.0  # far beyond C: clipped to 0.5 by this rank
    m = w.sync([m[0] + d], 5.0 if rank == 1 else 120.0)  # the sample counts must not count
    got.append(m[0])
np.save(f"{out}/rank{rank}.npy", np.stack(got))
open(f"{out}/clip{rank}.txt", "w").write(repr(w.clip))
"""


@pytest.mark.heavy
@pytest.mark.skipif(not MPIEXEC, reason="mpiexec not installed")
def test_dp_under_mpiexec_clips_on_the_ranks_weighs_them_alike_and_stops_within_budget(
        tmp_path):
    z, c, delta = 2.0, 0.5, 1e-5
    target = (epsilon(z, 3, delta) + epsilon(z, 4, delta)) / 2
    argv = [*mpiexec_argv(3, MPIEXEC), sys.executable, "-c", RANKS, str(tmp_path), repr(target),
            str(D)]
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env=fedberry_env(), start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=120)
    finally:
        stop_launch(proc, grace=5)
    assert proc.returncode == 0, out
    assert "the run stops after round 3, the last within budget" in out
    assert f"privacy: epsilon {epsilon(z, 3, delta):.4g} at delta 1e-05 after 3 rounds" in out
    assert "epsilon" in next(line for line in out.splitlines() if line.lstrip().startswith("round"))
    for r in (1, 2):  # both ranks learned C at join
        assert (tmp_path / f"clip{r}.txt").read_text() == "0.5"

    records = read(tmp_path / "metrics.jsonl")
    assert [r["round"] for r in records] == [1, 2, 3]
    for r in records:
        assert r["epsilon"] == pytest.approx(epsilon(z, r["round"], delta))
        assert r["dp_noise_std"] == pytest.approx(z * c / 2)
    models = np.load(tmp_path / "rank1.npy")
    np.testing.assert_array_equal(models, np.load(tmp_path / "rank2.npy"))  # rank 0's Bcast
    # Each round: the uniform mean of two clipped changes (0.5 spread over each rank's half:
    # 0.5 / sqrt(100) per coordinate, halved by the mean), plus the noise. Sample weights
    # (5 vs 120) would make the halves differ by 24x.
    expected = 0.5 * c / math.sqrt(D // 2)
    noise = (np.diff(models, axis=0) - expected).ravel().astype(np.float64)
    std = z * c / 2
    se = std / math.sqrt(2 * noise.size)  # 600 draws: the sample std's standard error
    assert abs(noise.std(ddof=1) - std) < 5 * se
    assert abs(noise.mean()) < 5 * std / math.sqrt(noise.size)
