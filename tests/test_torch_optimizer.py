"""The PyTorch drop-in and the in-process chief: a chief that also trains, next to TCP workers."""

import threading

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="the torch extra")

from fedberry import Worker, serve  # noqa: E402
from fedberry.demo.models import get_arrays  # noqa: E402
from fedberry.torch import FederatedOptimizer  # noqa: E402


def _model(seed):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(6, 4), torch.nn.ReLU(), torch.nn.Linear(4, 2))


def _train(opt, model, steps, seed, snapshots):
    g = torch.Generator().manual_seed(seed)
    for step in range(steps):
        x = torch.randn(8, 6, generator=g)
        y = torch.randint(0, 2, (8,), generator=g)
        loss = torch.nn.functional.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        if (step + 1) % opt.sync_every == 0:
            # What this worker is about to send: the weights after this step, before averaging.
            opt.optimizer.step()
            snapshots.append(get_arrays(model))
            opt.steps += 1
            opt.synchronize()
        else:
            opt.step()


def test_every_kth_step_averages_and_the_chief_trains_too():
    handle = serve("127.0.0.1:0", workers=3, rounds=2, token="t")
    models = {i: _model(i) for i in range(3)}
    samples = {0: 10, 1: 30, 2: 60}
    snaps = {i: [] for i in range(3)}
    errors = []

    def run(i):
        try:
            chief = handle if i == 0 else handle.url  # worker 0 lives in the chief's process
            m = models[i]
            with FederatedOptimizer(torch.optim.SGD(m.parameters(), lr=0.1), m, chief=chief,
                                    sync_every=3, num_samples=samples[i], token="t") as opt:
                _train(opt, m, 6, i, snaps[i])
                assert opt.done and opt.steps == 6
        except Exception as exc:  # surfaced below
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    try:
        assert not errors, errors
        assert handle.wait(10)
        final = handle.chief.global_arrays
    finally:
        handle.stop()
    # Round 2's average of what the three sent, weighted by num_samples, is every model now.
    total = sum(samples.values())
    for t, arr in enumerate(final):
        ref = sum(samples[i] * snaps[i][1][t].astype(np.float64) for i in range(3)) / total
        np.testing.assert_allclose(arr, ref, rtol=1e-5, atol=1e-6)
        for i in range(3):
            np.testing.assert_array_equal(get_arrays(models[i])[t], arr)


def test_all_workers_start_from_the_chiefs_model():
    initial = get_arrays(_model(42))
    handle = serve("127.0.0.1:0", workers=1, rounds=1, initial=initial, token="t")
    try:
        m = _model(7)
        opt = FederatedOptimizer(torch.optim.SGD(m.parameters(), lr=0.1), m, chief=handle.url,
                                 sync_every=5, token="t")
        for a, b in zip(get_arrays(m), initial):
            np.testing.assert_array_equal(a, b)
        assert opt.param_groups[0]["lr"] == 0.1  # the wrapped optimizer shows through
        opt.close()
    finally:
        handle.stop()


def test_a_model_of_another_shape_is_refused_at_join():
    handle = serve("127.0.0.1:0", workers=1, initial=get_arrays(_model(0)), token="t")
    try:
        other = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.ReLU(), torch.nn.Linear(5, 2))
        with pytest.raises(ValueError, match="tensor 0 is float32\\[5, 6\\]"):
            FederatedOptimizer(torch.optim.SGD(other.parameters(), lr=0.1), other,
                               chief=handle.url, token="t")
    finally:
        handle.stop()


def test_plain_worker_refuses_non_finite_weights_before_sending():
    handle = serve("127.0.0.1:0", workers=1, token="t")
    try:
        with Worker(handle.url, token="t") as w:
            w.join([np.zeros(3, np.float32)])
            with pytest.raises(ValueError, match="non-finite"):
                w.sync([np.array([0, np.nan, 1], np.float32)], 1)
    finally:
        handle.stop()
