"""The PyTorch drop-in: a real torch optimizer (schedulers, GradScaler, state_dict) that averages
with the federation; worker processes over real TCP, and the in-process chief that also trains."""

import socket
import subprocess
import textwrap
import threading
import warnings

import numpy as np
import pytest
from helpers import fedberry_env, processes, python

torch = pytest.importorskip("torch", reason="the torch extra")

from fedberry import Worker, serve  # noqa: E402
from fedberry.demo.models import get_arrays  # noqa: E402
from fedberry.torch import FederatedOptimizer  # noqa: E402


def _model(seed):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(6, 4), torch.nn.ReLU(), torch.nn.Linear(4, 2))


def _snapshot_before_sync(opt, model, snapshots):
    """Record what this worker is about to send: a step post-hook runs after the wrapped
    optimizer's step and before the averaging that follows it."""
    def hook(optimizer, args, kwargs):
        if (opt.steps + 1) % opt.sync_every == 0:
            snapshots.append(get_arrays(model))
    opt.register_step_post_hook(hook)


def _train(opt, model, steps, seed, snapshots):
    _snapshot_before_sync(opt, model, snapshots)
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        x = torch.randn(8, 6, generator=g)
        y = torch.randint(0, 2, (8,), generator=g)
        loss = torch.nn.functional.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.record_loss(loss)
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
        opt.join()
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
                               chief=handle.url, token="t").join()
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


WORKER = textwrap.dedent("""
    import sys
    import numpy as np
    import torch
    from fedberry.integrations.torch import get_arrays
    from fedberry.torch import FederatedOptimizer

    url, index, n, out = sys.argv[1], int(sys.argv[2]), float(sys.argv[3]), sys.argv[4]
    torch.manual_seed(index)  # a different local start: join must replace it
    model = torch.nn.Sequential(torch.nn.Linear(6, 4), torch.nn.ReLU(), torch.nn.Linear(4, 2))
    sgd = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    opt = FederatedOptimizer(sgd, model, chief=url, sync_every={sync_every}, num_samples=n,
                             worker_id=f"torchopt-{{index}}")
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)
    scaler = torch.amp.GradScaler("cpu")
    sent, got, lrs = [], [], []

    def before_sync(optimizer, args, kwargs):
        if (opt.steps + 1) % opt.sync_every == 0:
            sent.append(get_arrays(model))

    def after_step():
        if opt.steps % opt.sync_every == 0:
            got.append(get_arrays(model))

    opt.register_step_post_hook(before_sync)
    g = torch.Generator().manual_seed(100 + index)
    with opt:
        opt.join()
        start = get_arrays(model)
        while not opt.done:
            x = torch.randn(8, 6, generator=g)
            y = torch.randint(0, 2, (8,), generator=g)
            opt.zero_grad(set_to_none=True)
            loss = torch.nn.functional.cross_entropy(model(x), y)
            scaler.scale(loss).backward()
            scaler.unscale_(opt)
            torch.nn.utils.clip_grad_norm_(model.parameters(), 5.0)
            opt.record_loss(loss)
            before = opt.steps
            scaler.step(opt)
            scaler.update()
            assert opt.steps == before + 1, "GradScaler skipped a step"
            after_step()
            sched.step()
            lrs.append(opt.param_groups[0]["lr"])
        # Steps after the last round are local; close() puts the final model back.
        for _ in range(2):
            opt.zero_grad()
            torch.nn.functional.cross_entropy(model(x), y).backward()
            opt.step()
    final = get_arrays(model)
    flags = [isinstance(opt, torch.optim.Optimizer), isinstance(opt, torch.optim.SGD),
             opt.param_groups is sgd.param_groups, opt.state is sgd.state,
             all(len(sgd.state[p]["momentum_buffer"].shape) > 0 for p in model.parameters())]
    np.savez(out, start=np.concatenate([a.ravel() for a in start]),
             sent=np.stack([np.concatenate([a.ravel() for a in s]) for s in sent]),
             got=np.stack([np.concatenate([a.ravel() for a in r]) for r in got]),
             final=np.concatenate([a.ravel() for a in final]), lrs=np.array(lrs),
             inner_lr=np.array(sgd.param_groups[0]["lr"]), flags=np.array(flags),
             steps=np.array(opt.steps))
""")


def test_two_tcp_worker_processes_with_momentum_steplr_and_gradscaler(tmp_path):
    rounds, sync_every, samples = 3, 4, [10, 30]
    initial = get_arrays(_model(42))
    env = fedberry_env(FEDBERRY_TOKEN="torchopt-token")
    handle = serve("127.0.0.1:0", workers=2, rounds=rounds, initial=initial,
                   token="torchopt-token")
    try:
        with processes() as procs:
            for i, n in enumerate(samples):
                procs.append(subprocess.Popen(
                    python("-c", WORKER.format(sync_every=sync_every), handle.url, str(i), str(n),
                           str(tmp_path / f"w{i}.npz")), env=env))
            for p in procs:
                assert p.wait(120) == 0
        assert handle.wait(10)
        chief_model = np.concatenate([a.ravel() for a in handle.chief.global_arrays])
    finally:
        handle.stop()

    runs = [dict(np.load(tmp_path / f"w{i}.npz")) for i in range(2)]
    flat_initial = np.concatenate([a.ravel() for a in initial])
    steps = rounds * sync_every
    for run in runs:
        assert run["flags"].all()  # isinstance of Optimizer and SGD; state shared, momentum kept
        np.testing.assert_array_equal(run["start"], flat_initial)  # joined the chief's model
        assert run["sent"].shape[0] == rounds and run["got"].shape[0] == rounds
        # StepLR(step_size=2, gamma=0.5), stepped once per optimizer step, on both names.
        expect = [0.1 * 0.5 ** ((k + 1) // 2) for k in range(steps)]
        np.testing.assert_allclose(run["lrs"], expect, rtol=1e-12)
        assert float(run["inner_lr"]) == pytest.approx(expect[-1])
        assert int(run["steps"]) == steps + 2
        np.testing.assert_array_equal(run["final"], chief_model)  # close() restored it
    for r in range(rounds):
        ref = sum(n * run["sent"][r].astype(np.float64)
                  for n, run in zip(samples, runs)) / sum(samples)
        for run in runs:  # each round's global model is numpy's sample-weighted mean
            np.testing.assert_allclose(run["got"][r], ref, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(runs[0]["got"][-1], chief_model)


def test_the_constructor_opens_no_connection():
    with socket.create_server(("127.0.0.1", 0)) as listener:
        listener.settimeout(0.5)
        port = listener.getsockname()[1]
        m = _model(0)
        opt = FederatedOptimizer(torch.optim.SGD(m.parameters(), lr=0.1), m,
                                 chief=f"tcp://127.0.0.1:{port}", token="t")
        sched = torch.optim.lr_scheduler.StepLR(opt, 10)  # a real optimizer, still offline
        torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=1.0, total_steps=10)
        m(torch.randn(2, 6)).sum().backward()
        opt.zero_grad(set_to_none=False)
        assert all(p.grad is not None and not p.grad.any() for p in m.parameters())
        opt.zero_grad()
        assert all(p.grad is None for p in m.parameters())
        with pytest.raises(TimeoutError):
            listener.accept()
        assert not opt.joined and not opt.done and sched.get_last_lr()[0] > 0
        opt.close()  # leaving without ever joining is fine and dials nobody
        with pytest.raises(TimeoutError):
            listener.accept()


def test_bad_construction_is_a_sentence():
    m = _model(0)
    sgd = torch.optim.SGD(m.parameters(), lr=0.1)
    with pytest.raises(TypeError, match="needs chief="):
        FederatedOptimizer(sgd, m)
    with pytest.raises(TypeError, match="wraps a torch.optim.Optimizer"):
        FederatedOptimizer(m, m, chief="tcp://127.0.0.1:1")
    with pytest.raises(ValueError, match="sync_every"):
        FederatedOptimizer(sgd, m, chief="tcp://127.0.0.1:1", sync_every=0)
    opt = FederatedOptimizer(sgd, m, chief="tcp://127.0.0.1:1")
    with pytest.raises(TypeError, match="already a FederatedOptimizer"):
        FederatedOptimizer(opt, m, chief="tcp://127.0.0.1:1")
    assert "federation" in (FederatedOptimizer.__doc__ or "")
    assert type(opt).__doc__ == FederatedOptimizer.__doc__  # help(opt) explains itself


def test_state_dict_round_trips_and_closure_loss_is_recorded(tmp_path):
    handle = serve("127.0.0.1:0", workers=1, rounds=2, token="t")
    try:
        m = _model(3)
        sgd = torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9)
        early = torch.optim.lr_scheduler.StepLR(sgd, 1, gamma=0.5)  # made before wrapping
        opt = FederatedOptimizer(sgd, m, chief=handle, sync_every=2)
        x, y = torch.randn(8, 6), torch.randint(0, 2, (8,))

        def closure():
            opt.zero_grad()
            loss = torch.nn.functional.cross_entropy(m(x), y)
            loss.backward()
            return loss

        losses = []
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # e.g. "optimizer.step() has been overridden"
            for _ in range(3):
                losses.append(opt.step(closure).item())
                early.step()
        assert opt.worker.round == 1  # the step through the early scheduler's patch synced
        saved = opt.state_dict()
        assert saved["param_groups"][0]["lr"] == pytest.approx(0.1 * 0.5 ** 3)
        torch.save(saved, tmp_path / "opt.pt")

        other = FederatedOptimizer(torch.optim.SGD(m.parameters(), lr=1.0, momentum=0.9), m,
                                   chief="tcp://127.0.0.1:1")
        other.load_state_dict(torch.load(tmp_path / "opt.pt"))
        assert other.param_groups[0]["lr"] == pytest.approx(0.1 * 0.5 ** 3)
        assert other.optimizer.param_groups is other.param_groups  # still one set of groups
        for p in m.parameters():
            torch.testing.assert_close(other.state[p]["momentum_buffer"],
                                       opt.state[p]["momentum_buffer"])
            assert other.optimizer.state[p] is other.state[p]
        # load_state_dict re-patches step functions: hooks must still run once per step.
        calls = []
        opt.load_state_dict(saved)
        opt.register_step_post_hook(lambda *a: calls.append(1))
        losses.append(opt.step(closure).item())
        assert calls == [1] and opt.done
        opt.close()
        assert handle.wait(10)
        # The chief's train_loss column: the mean of the closures' losses in each round.
        logged = [r["train_loss"] for r in handle.metrics]
        np.testing.assert_allclose(logged, [np.mean(losses[:2]), np.mean(losses[2:])],
                                   rtol=1e-6)
    finally:
        handle.stop()
