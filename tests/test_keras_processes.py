"""Keras workers in their own processes, over TCP and MPI, on each installed Keras backend.

Each worker trains a linear model with plain SGD through ``model.fit`` and records what it sent
and received at every sync. The test then checks, in numpy:

* join: every worker starts from the chief's initial model;
* the average: every round's global model is the sample-weighted mean of what the workers sent,
  and all workers received the same one;
* the training loop really continues from the average: what a worker sends at round r+1 is
  exactly SGD on its next batches starting from round r's global model. Under JAX this is what
  breaks if the callback writes weights the training loop does not read back;
* the training loss the chief logs per round.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from helpers import fedberry_env, processes, python

from fedberry.serve import serve

TOKEN = "keras-process-test-token"
SAMPLES = [2.0, 5.0]  # num_samples of each worker (two workers: each costs a Keras import)
BATCH, BATCHES, SYNC_EVERY, LR = 4, 5, 2, 0.1
ROUNDS = 3  # syncs after batches 2 and 4, then the last batch at train end

WORKER = textwrap.dedent("""
    import sys
    import numpy as np
    import keras
    from fedberry import Worker
    from fedberry.keras import FederatedCallback

    url, index, n, out, token = sys.argv[1], int(sys.argv[2]), float(sys.argv[3]), sys.argv[4], \\
        sys.argv[5] or None
    log = {{}}

    class Recording(Worker):
        def join(self, arrays, **kwargs):
            got = super().join(arrays, **kwargs)
            log.update({{f"join_{{j}}": a for j, a in enumerate(got)}})
            return got

        def sync(self, arrays, num_samples, metrics=None, **kwargs):
            got = super().sync(arrays, num_samples, metrics, **kwargs)
            k = sum(1 for key in log if key.startswith("n_"))
            log[f"n_{{k}}"] = np.array(num_samples)
            log.update({{f"sent_{{k}}_{{j}}": a for j, a in enumerate(arrays)}})
            log.update({{f"got_{{k}}_{{j}}": a for j, a in enumerate(got)}})
            return got

    rng = np.random.default_rng(100 + index)
    x = rng.standard_normal(({batch} * {batches}, 4)).astype(np.float32)
    y = rng.standard_normal(({batch} * {batches}, 3)).astype(np.float32)
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(3)])
    model.compile(optimizer=keras.optimizers.SGD(learning_rate={lr}), loss="mse")
    worker = Recording(url, token=token, worker_id=f"keras-{{index}}", connect_timeout=20)
    cb = FederatedCallback(url, sync_every={sync_every}, num_samples=n, worker=worker)
    model.fit(x, y, batch_size={batch}, epochs=1, shuffle=False, verbose=0, callbacks=[cb])
    np.savez(out, x=x, y=y, done=np.array(cb.done), backend=keras.backend.backend(), **log)
""").format(batch=BATCH, batches=BATCHES, lr=LR, sync_every=SYNC_EVERY)

MPI_CHIEF = textwrap.dedent("""
    import sys
    from mpi4py import MPI
    import numpy as np
    initial = [np.load(sys.argv[1])[k] for k in ("w", "b")]
    if MPI.COMM_WORLD.rank == 0:
        from fedberry.transports.mpi import run_mpi_chief
        run_mpi_chief(rounds={rounds}, initial=initial, out_dir=sys.argv[2], timeout=60)
    else:
        rank = MPI.COMM_WORLD.rank
        # The same timeout on every rank: a nonblocking collective (how the timeout is
        # implemented) never matches a blocking one.
        sys.argv = ["worker", "mpi://?timeout=60", str(rank - 1), sys.argv[2 + rank],
                    f"{{sys.argv[2]}}/w{{rank - 1}}.npz", ""]
        exec(compile(open({worker_path!r}).read(), {worker_path!r}, "exec"))
""")


def sgd_steps(w: np.ndarray, b: np.ndarray, x: np.ndarray, y: np.ndarray,
              batches: range) -> tuple[np.ndarray, np.ndarray, list[float]]:
    """Keras's SGD on mean squared error (mean over outputs, then over the batch), in float64.

    Returns the new weights and the loss of each batch before its step, as Keras logs it.
    """
    w, b = w.astype(np.float64), b.astype(np.float64)
    losses = []
    for i in batches:
        xb, yb = x[i * BATCH:(i + 1) * BATCH], y[i * BATCH:(i + 1) * BATCH]
        err = xb @ w + b - yb
        losses.append(float(np.mean(err ** 2)))
        scale = 2.0 / err.size
        w, b = w - LR * scale * xb.T @ err, b - LR * scale * err.sum(axis=0)
    return w, b, losses


@pytest.fixture(params=["torch", "jax", "tensorflow"])
def backend(request: pytest.FixtureRequest) -> str:
    # torch is the CI backend; the others run when installed.
    pytest.importorskip(request.param, reason=f"Keras backend {request.param} not installed")
    needs_keras()
    return request.param


def needs_keras() -> None:
    # Not imported here: this process needs no backend, and importing keras would pick one.
    if importlib.util.find_spec("keras") is None:
        pytest.skip("Keras 3 is the 'keras' extra")


def initial_model() -> list[np.ndarray]:
    rng = np.random.default_rng(42)
    return [rng.standard_normal((4, 3)).astype(np.float32),
            rng.standard_normal(3).astype(np.float32)]


def check_run(out: Path, initial: list[np.ndarray], train_losses: list[float],
              backend: str, final: list[np.ndarray] | None = None) -> None:
    runs = []
    for i in range(len(SAMPLES)):
        with np.load(out / f"w{i}.npz") as z:
            runs.append({k: z[k] for k in z.files})
    for run in runs:
        assert str(run["backend"]) == backend
        assert bool(run["done"])
        for j, a in enumerate(initial):
            np.testing.assert_array_equal(run[f"join_{j}"], a)  # joined with the chief's model

    glob = [a.astype(np.float64) for a in initial]
    windows = [range(0, 2), range(2, 4), range(4, 5)]
    for r, window in enumerate(windows):
        expected_losses = []
        for run, n in zip(runs, SAMPLES):
            assert float(run[f"n_{r}"]) == n
            w, b, losses = sgd_steps(glob[0], glob[1], run["x"], run["y"], window)
            # Trained from the previous global model, not from its own stale weights.
            np.testing.assert_allclose(run[f"sent_{r}_0"], w, rtol=1e-5, atol=1e-5)
            np.testing.assert_allclose(run[f"sent_{r}_1"], b, rtol=1e-5, atol=1e-5)
            expected_losses.append(np.mean(losses))
        ref = [sum(n * run[f"sent_{r}_{j}"].astype(np.float64) for run, n in zip(runs, SAMPLES))
               / sum(SAMPLES) for j in range(2)]
        for run in runs:
            for j in range(2):
                np.testing.assert_allclose(run[f"got_{r}_{j}"], ref[j], rtol=1e-6, atol=1e-7)
                np.testing.assert_array_equal(run[f"got_{r}_{j}"], runs[0][f"got_{r}_{j}"])
        np.testing.assert_allclose(train_losses[r], np.average(expected_losses, weights=SAMPLES),
                                   rtol=1e-4)
        glob = [run_a.astype(np.float64) for run_a in (runs[0][f"got_{r}_0"],
                                                       runs[0][f"got_{r}_1"])]
    if final is not None:
        for a, g in zip(final, glob):
            np.testing.assert_array_equal(a, g.astype(np.float32))


def test_keras_workers_over_tcp_average_like_numpy(tmp_path, backend):
    initial = initial_model()
    env = fedberry_env(KERAS_BACKEND=backend)
    handle = serve("127.0.0.1:0", workers=len(SAMPLES), rounds=ROUNDS, initial=initial,
                   token=TOKEN)
    try:
        with processes() as procs:
            for i, n in enumerate(SAMPLES):
                procs.append(subprocess.Popen(
                    python("-c", WORKER, handle.url, str(i), str(n), str(tmp_path / f"w{i}.npz"),
                           TOKEN),
                    env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
            for p in procs:
                out, _ = p.communicate(timeout=90)
                assert p.returncode == 0, out
        assert handle.wait(10)
        final = handle.chief.global_arrays
        losses = [r["train_loss"] for r in handle.metrics]
    finally:
        handle.stop()
    assert len(losses) == ROUNDS
    check_run(tmp_path, initial, losses, backend, final)


def test_keras_workers_over_mpi_average_like_numpy(tmp_path):
    pytest.importorskip("mpi4py", reason="the 'mpi' extra")
    pytest.importorskip("torch", reason="the torch Keras backend")
    needs_keras()
    from fedberry.launch import find_mpiexec

    try:
        mpiexec = find_mpiexec()
    except FileNotFoundError:
        pytest.skip("mpiexec not installed")
    initial = initial_model()
    np.savez(tmp_path / "initial.npz", w=initial[0], b=initial[1])
    worker_path = tmp_path / "worker.py"
    worker_path.write_text(WORKER)
    script = MPI_CHIEF.format(rounds=ROUNDS, worker_path=str(worker_path))
    argv = [mpiexec, "-n", str(len(SAMPLES) + 1), sys.executable, "-c", script,
            str(tmp_path / "initial.npz"), str(tmp_path), *map(str, SAMPLES)]
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env=fedberry_env(KERAS_BACKEND="torch"), start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, 9)
            proc.wait()
    assert proc.returncode == 0, out
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in records] == list(range(1, ROUNDS + 1))
    check_run(tmp_path, initial, [r["train_loss"] for r in records], "torch")
