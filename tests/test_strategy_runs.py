"""Strategies with their hyperparameters, end to end: a real ``fedberry chief --strategy
NAME:key=value`` process, real worker processes on TCP, and the models they were sent checked
against the paper's rule written out in numpy; the hyperparameters recorded in the checkpoint and
in run.json, and a resume with other hyperparameters refused. In process: a strategy object
given to ``serve()``, and a rule of the user's own implementing the interface."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from robustness_harness import Cluster
from test_mpi import AVERAGE, SAMPLES, _load, mpi_python, needs_mpiexec, run_mpi
from test_mpi import SHAPES as MPI_SHAPES

from fedberry import Worker
from fedberry.chief import checkpoint as ckpt_io
from fedberry.serve import serve
from fedberry.strategies import FedAdam, StrategyState

SHAPES = [(20, 7), (7,), (3,)]
ROUNDS = 3

WORKER = textwrap.dedent("""
    import sys
    import numpy as np
    from fedberry import Worker

    url, token_file, index, n, rounds, out = sys.argv[1:7]
    index, n, rounds = int(index), float(n), int(rounds)
    outlier = len(sys.argv) > 7
    shapes = {shapes!r}
    saved = {{}}
    with Worker(url, token_file=token_file, worker_id=f"w{{index}}") as w:
        g = w.join([np.full(s, 0.25, np.float32) for s in shapes])
        saved.update({{f"start_{{i}}": a for i, a in enumerate(g)}})
        for r in range(rounds):
            rng = np.random.default_rng([index, r])
            # "Training": a step of its own from the global model; the outlier sends garbage.
            scale = 100.0 if outlier else 0.1
            mine = [(a + scale * rng.standard_normal(a.shape)).astype(np.float32) for a in g]
            g = w.sync(mine, n)
            saved.update({{f"sent{{r}}_{{i}}": a for i, a in enumerate(mine)}})
            saved.update({{f"got{{r}}_{{i}}": a for i, a in enumerate(g)}})
        assert w.done
    np.savez(out, **saved)
""").format(shapes=SHAPES)


def _run(tmp_path: Path, strategy: str, samples: list[float], outliers: int = 0):
    """A chief process with ``--strategy strategy`` and one worker process per sample count
    (the last ``outliers`` of them send garbage); returns what each worker saved."""
    c = Cluster(tmp_path)
    with c:
        c.chief("--workers", str(len(samples)), "--rounds", str(ROUNDS), "--model", "none",
                "--strategy", strategy)
        workers = []
        for i, n in enumerate(samples):
            extra = ["outlier"] if i >= len(samples) - outliers else []
            workers.append(c.python(f"worker{i}", [
                "-c", WORKER, c.url, str(c.token_file), str(i), str(n), str(ROUNDS),
                str(tmp_path / f"w{i}.npz"), *extra]))
        for w in workers:
            assert w.wait(120) == 0, c.logs()
        assert c.procs[0].wait(60) == 0, c.logs()
    saved = []
    for i in range(len(samples)):
        with np.load(tmp_path / f"w{i}.npz") as z:
            saved.append({k: z[k] for k in z.files})
    return c, saved


def _check_rounds(saved, aggregate_and_step) -> None:
    """Every worker got the same model each round, and it is the reference's."""
    k = len(SHAPES)
    x = [saved[0][f"start_{i}"].astype(np.float64) for i in range(k)]
    for r in range(ROUNDS):
        sent = [[s[f"sent{r}_{i}"].astype(np.float64) for i in range(k)] for s in saved]
        x = [a.astype(np.float32).astype(np.float64)
             for a in aggregate_and_step(x, sent, r + 1)]
        for i in range(k):
            got = saved[0][f"got{r}_{i}"]
            for s in saved[1:]:
                np.testing.assert_array_equal(s[f"got{r}_{i}"], got)
            np.testing.assert_allclose(got, x[i], rtol=1e-5, atol=1e-5,
                                       err_msg=f"round {r + 1}, tensor {i}")


def test_tcp_chief_with_fedadam_hyperparameters_follows_reddi_et_al(tmp_path: Path) -> None:
    samples = [5.0, 120.0, 33.0]
    lr, b1, b2, tau = 0.05, 0.9, 0.99, 1e-4
    c, saved = _run(tmp_path, "fedadam:lr=0.05,tau=1e-4", samples)
    m = [np.zeros(s) for s in SHAPES]
    v = [np.full(s, tau ** 2) for s in SHAPES]

    def fedadam(x, sent, t):
        # Reddi et al. 2021, Algorithm 2 (no bias correction, v_{-1} = tau^2), on the
        # sample-weighted mean of the workers' models.
        out = []
        for i in range(len(x)):
            mean = sum(n * s[i] for n, s in zip(samples, sent)) / sum(samples)
            delta = mean - x[i]
            m[i] = b1 * m[i] + (1 - b1) * delta
            v[i] = b2 * v[i] + (1 - b2) * delta ** 2
            out.append(x[i] + lr * m[i] / (np.sqrt(v[i]) + tau))
        return out

    _check_rounds(saved, fedadam)
    want = {"lr": lr, "beta1": b1, "beta2": b2, "tau": tau, "bias_correction": False}
    ck = ckpt_io.load(c.out / "checkpoint.npz")
    assert ck.round == ROUNDS
    assert (ck.strategy.name, ck.strategy.params) == ("fedadam", want)
    info = json.loads((c.out / "run.json").read_text())
    assert info["strategy"] == "fedadam:lr=0.05,beta1=0.9,beta2=0.99,tau=0.0001," \
                               "bias_correction=false"
    assert info["strategy_params"] == want
    assert info["config"]["strategy"] == "fedadam"

    # Resuming with another learning rate is refused, with a sentence naming both.
    proc = subprocess.run(
        [sys.executable, "-m", "fedberry", "chief", "--listen", "127.0.0.1:0", "--workers", "3",
         "--rounds", "5", "--model", "none", "--out", str(c.out), "--token-file",
         str(c.token_file), "--resume", "--strategy", "fedadam:lr=0.01,tau=1e-4"],
        capture_output=True, text=True, timeout=120, env=c.env)
    assert proc.returncode == 2, proc.stderr
    assert ("was written by a run with --strategy fedadam:lr=0.05,beta1=0.9,beta2=0.99,"
            "tau=0.0001,bias_correction=false, not fedadam:lr=0.01,") in proc.stderr


def test_tcp_chief_with_trimmed_mean_drops_one_update_at_each_end(tmp_path: Path) -> None:
    samples = [1.0, 10.0, 100.0, 3.0, 1e6]  # weights do not count; the last sends garbage

    def trimmed(x, sent, t):
        # Yin et al. 2018: per coordinate, sort, drop 1 at each end, average the rest.
        out = []
        for i in range(len(x)):
            flat = np.stack([s[i].reshape(-1) for s in sent])
            col = [sorted(flat[:, j])[1:-1] for j in range(flat.shape[1])]
            out.append(np.array([sum(c) / len(c) for c in col]).reshape(x[i].shape))
        return out

    c, saved = _run(tmp_path, "trimmed_mean:trim=1", samples, outliers=1)
    _check_rounds(saved, trimmed)
    assert np.abs(saved[0][f"got{ROUNDS - 1}_0"] - 0.25).max() < 1.0  # the garbage was cut
    assert ckpt_io.load(c.out / "checkpoint.npz").strategy.params == {"trim": 1}


def test_cli_refuses_a_bad_strategy_with_the_allowed_keys() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "fedberry", "chief", "--workers", "1", "--strategy",
         "fedadam:eta=0.1"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    assert ("argument --strategy: strategy fedadam has no hyperparameter 'eta'; its keys are "
            "lr, beta1, beta2, tau, bias_correction") in proc.stderr


def _one_round(handle, update) -> list[np.ndarray]:
    w = Worker(handle, worker_id="local")
    try:
        w.join([np.zeros(4, np.float32)])
        return w.sync([np.asarray(update, np.float32)], 2)
    finally:
        w.close()


def test_serve_takes_a_strategy_object_and_refuses_a_resume_with_other_params(tmp_path):
    ck = tmp_path / "ck.npz"
    h = serve(None, workers=1, rounds=3, strategy=FedAdam(lr=0.05, tau=1e-4),
              initial=[np.zeros(4, np.float32)], checkpoint=ck, out_dir=tmp_path)
    try:
        got = _one_round(h, [1.0, -1.0, 0.5, 0.0])
    finally:
        h.stop()
    # One FedAdam step from 0 (v_{-1} = tau^2): lr * (1 - b1) d / (sqrt(b2 tau^2 + (1 - b2)
    # d^2) + tau).
    d = np.array([1.0, -1.0, 0.5, 0.0])
    want = 0.05 * 0.1 * d / (np.sqrt(0.99e-8 + 0.01 * d ** 2) + 1e-4)
    np.testing.assert_allclose(got[0], want, rtol=1e-5)
    assert ckpt_io.load(ck).strategy.params["lr"] == 0.05
    with pytest.raises(ValueError, match="--strategy fedadam:lr=0.05,.*, not fedadam:lr=0.01,"):
        serve(None, workers=1, strategy="fedadam:lr=0.01,tau=1e-4", checkpoint=ck, resume=True)
    h = serve(None, workers=1, rounds=3, strategy="fedadam:lr=0.05,tau=1e-4", checkpoint=ck,
              resume=True)
    try:
        assert h.chief.round == 1
        assert h.chief.strategy.state_dict().arrays["step"] == 1
    finally:
        h.stop()


class ClippedMean:
    """A rule of the user's own: the unweighted mean with every coordinate clipped to
    [-bound, bound]. No fedberry base class; it only implements the interface."""

    name = "clipped_mean"
    needs_all_updates = False

    def __init__(self, *, bound: float = 1.0) -> None:
        self.bound = bound
        self.updates = 0
        self._sum: list[np.ndarray] = []

    def begin_round(self, global_arrays):
        self.updates, self._sum = 0, [np.zeros(a.shape) for a in global_arrays]

    def add(self, update, weight):
        for s, a in zip(self._sum, update):
            s += np.clip(a, -self.bound, self.bound)
        self.updates += 1
        return list(update)  # nothing kept: every buffer goes back to the pool

    def result(self):
        return [(s / self.updates).astype(np.float32) for s in self._sum]

    def params(self):
        return {"bound": self.bound}

    def state_dict(self):
        return StrategyState(self.name, self.params(), {})

    def load_state_dict(self, state):
        if (state.name, state.params) != (self.name, self.params()):
            raise ValueError(f"not a {self.name} state")


def test_a_rule_of_ones_own_plugs_into_serve(tmp_path: Path) -> None:
    h = serve(None, workers=1, rounds=1, strategy=ClippedMean(bound=0.5),
              initial=[np.zeros(4, np.float32)], out_dir=tmp_path)
    try:
        got = _one_round(h, [1.0, -1.0, 0.25, 0.0])
    finally:
        h.stop()
    np.testing.assert_allclose(got[0], [0.5, -0.5, 0.25, 0.0])
    assert json.loads((tmp_path / "run.json").read_text())["strategy"] == "clipped_mean:bound=0.5"


@needs_mpiexec
def test_mpi_chief_takes_fedadam_hyperparameters_as_text(tmp_path: Path) -> None:
    """Under mpiexec, rank 0 parses the same text and runs the same rule (checked against the
    numpy reference above, in test_strategies) on the Allreduce's weighted mean."""
    rounds = 2
    text = "fedadam:lr=0.05,tau=1e-4,bias_correction=true"
    proc = run_mpi(mpi_python(3, AVERAGE, str(tmp_path), text, str(rounds)))
    assert proc.returncode == 0, proc.stdout
    init = _load(tmp_path / "initial.npz")
    ranks = {r: _load(tmp_path / f"rank{r}.npz") for r in (1, 2)}
    k = len(MPI_SHAPES)
    ref = FedAdam(lr=0.05, tau=1e-4, bias_correction=True)
    global_ = [init[f"arr_{i}"] for i in range(k)]
    for rnd in range(rounds):
        ref.begin_round(global_)
        for r in (1, 2):
            ref.add([ranks[r][f"sent{rnd}_{i}"].copy() for i in range(k)], SAMPLES[r])
        global_ = ref.result()
        for i, (_, dtype) in enumerate(MPI_SHAPES):
            tol = 2e-3 if dtype == "float16" else 1e-5
            np.testing.assert_allclose(ranks[1][f"got{rnd}_{i}"].astype(np.float64),
                                       global_[i].astype(np.float64), rtol=tol, atol=tol)
