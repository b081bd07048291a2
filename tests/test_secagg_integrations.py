"""The drop-ins under secure aggregation: three workers using the Keras callback, the Lightning
callback or the torch ``FederatedOptimizer`` train against a real ``fedberry.serve`` chief run
with ``secure_aggregation=`` over TCP on loopback, and every round's model is plain FedAvg of
what the three sent, within the fixed-point bound of docs/secure-aggregation.md.

Workers are threads in this process, as in tests/test_secagg_wire.py and
tests/test_torch_optimizer.py (an import of Keras or Lightning per process would cost more than
the training). Each worker is a ``fedberry.Worker`` subclass that records what it sent and what
came back, handed to the integration through its ``worker=`` argument, so the test checks the
integration's own sync points, not a reimplementation of them.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import pytest

os.environ.setdefault("KERAS_BACKEND", "torch")  # before anything imports keras
pytest.importorskip("cryptography", reason="the secagg extra")

import fedberry  # noqa: E402
from fedberry.secagg import SecAggOptions  # noqa: E402

N = 3  # the fewest workers a secure round accepts
SAMPLES = [10.0, 20.0, 30.0]  # each worker's num_samples: the average is weighted
ROUNDS = 2


class RecordingWorker(fedberry.Worker):
    """A ``fedberry.Worker`` that keeps the model it joined with and, per sync, what it sent,
    its weight and the model it got back (copies: the integrations train in place)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.joined_with: list[np.ndarray] = []
        self.sent: list[list[np.ndarray]] = []
        self.weights: list[float] = []
        self.got: list[list[np.ndarray]] = []

    def join(self, arrays: Sequence[np.ndarray], names: Sequence[str] | None = None
             ) -> list[np.ndarray]:
        out = super().join(arrays, names)
        self.joined_with = [np.array(a) for a in out]
        return out

    def sync(self, arrays: Sequence[np.ndarray], num_samples: float,
             metrics: dict[str, float] | None = None, **kwargs: Any) -> list[np.ndarray]:
        sent = [np.array(a) for a in arrays]
        was_done = self.done
        out = super().sync(arrays, num_samples, metrics, **kwargs)
        if not was_done:  # a sync after the end sends nothing
            self.sent.append(sent)
            self.weights.append(float(num_samples))
            self.got.append([np.array(a) for a in out])
        return out


def _in_threads(work: Callable[[int], None]) -> None:
    """``work(i)`` for each worker, each in its own thread; none may hang or fail."""
    errors: list[BaseException] = []

    def run(i: int) -> None:
        try:
            work(i)
        except BaseException as exc:  # surfaced in the test's thread, below
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(i,), daemon=True) for i in range(N)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not any(t.is_alive() for t in threads), "a worker hung"
    assert not errors, errors


def _serve(options: SecAggOptions, initial: list[np.ndarray] | None = None
           ) -> fedberry.ChiefHandle:
    return fedberry.serve("127.0.0.1:0", workers=N, rounds=ROUNDS, initial=initial,
                          secure_aggregation=options)


def _worker(chief: fedberry.ChiefHandle, i: int) -> RecordingWorker:
    # The URL, not the handle: a worker in the chief's process is refused under secure
    # aggregation (it would hand the chief its update in the clear).
    return RecordingWorker(chief.url, worker_id=f"w{i}")


def _federate(chief: fedberry.ChiefHandle, workers: list[RecordingWorker],
              options: SecAggOptions, train: Callable[[int], None]) -> float:
    """Train every worker in its thread to the chief's end, check the rounds against plain
    FedAvg (``_check_secure_fedavg``, whose worst error this returns), stop the chief."""
    try:
        _in_threads(train)
        assert chief.wait(30)
        return _check_secure_fedavg(chief, workers, options)
    finally:
        chief.stop()


def _check_secure_fedavg(chief: fedberry.ChiefHandle, workers: list[RecordingWorker],
                         options: SecAggOptions) -> float:
    """Every round: all workers got one model, plain sample-weighted FedAvg (float64, numpy)
    of what they sent, within the bound of docs/secure-aggregation.md; returns the largest
    error seen. The chief's last model is the last round's."""
    assert all(w.session.secure for w in workers), "the chief did not aggregate securely"
    assert [r["workers"] for r in chief.metrics] == [N] * ROUNDS, chief.metrics
    # Each weighted, encoded change is within s/2 of its value (s = C / L), so the weighted
    # sum of |S| changes is within |S| s / 2, and the mean (divided by the weights' sum W,
    # each w_i = n_i / max n) within |S| s / (2 W); plus the model's last float32 rounding.
    step = options.encoding(options.clip).step
    bound = N * step / (2 * sum(n / max(SAMPLES) for n in SAMPLES))
    worst = 0.0
    for w in workers:
        assert len(w.sent) == ROUNDS and w.weights == [SAMPLES[int(w.worker_id[1:])]] * ROUNDS
    for r in range(ROUNDS):
        trained_from = [w.joined_with if r == 0 else w.got[r - 1] for w in workers]
        for w, ref in zip(workers, trained_from):
            # The chief clips each change to C: within it, plain FedAvg is the right reference.
            change = np.concatenate([(s.astype(np.float64) - g).ravel()
                                     for s, g in zip(w.sent[r], ref)])
            assert 0 < np.linalg.norm(change) < options.clip, (w.worker_id, r)
        total = sum(w.weights[r] for w in workers)
        for t in range(len(workers[0].sent[r])):
            plain = sum(w.weights[r] * w.sent[r][t].astype(np.float64) for w in workers) / total
            got = workers[0].got[r][t]
            for w in workers[1:]:  # one sum, one broadcast
                np.testing.assert_array_equal(w.got[r][t], got)
            err = np.abs(got.astype(np.float64) - plain)
            ulp = 2 * np.spacing(np.abs(plain).astype(np.float32)).astype(np.float64)
            assert np.all(err <= bound + ulp), f"round {r + 1}, tensor {t}: {err.max()} > {bound}"
            worst = max(worst, float(err.max()))
    for a, b in zip(chief.chief.global_arrays, workers[0].got[-1]):
        np.testing.assert_array_equal(a, b)
    return worst


def test_keras_callback_workers_get_plain_fedavg_under_secure_aggregation() -> None:
    pytest.importorskip(os.environ["KERAS_BACKEND"],
                        reason=f"the Keras backend {os.environ['KERAS_BACKEND']} is not installed")
    keras = pytest.importorskip("keras", reason="Keras 3 is the 'keras' extra")
    from fedberry.keras import FederatedCallback

    def model() -> keras.Model:
        # BatchNormalization: its moving statistics (non-trainable floats) are in the sum too.
        m = keras.Sequential([keras.Input((4,)),
                              keras.layers.Dense(3, kernel_initializer=keras.initializers
                                                 .GlorotUniform(0)),
                              keras.layers.BatchNormalization()])
        m.compile(optimizer=keras.optimizers.SGD(learning_rate=0.05), loss="mse")
        return m

    models = [model() for _ in range(N)]  # built here: Keras names layers from a counter
    options = SecAggOptions()  # the defaults: the 32-bit ring, C = 10
    chief = _serve(options, [np.array(a, np.float32) for a in models[0].get_weights()])
    workers = [_worker(chief, i) for i in range(N)]
    callbacks = [FederatedCallback(worker=workers[i], sync_every=2, num_samples=SAMPLES[i])
                 for i in range(N)]

    def train(i: int) -> None:
        rng = np.random.default_rng(i)
        x = rng.standard_normal((16, 4)).astype(np.float32)
        y = rng.standard_normal((16, 3)).astype(np.float32)
        models[i].fit(x, y, batch_size=4, epochs=10, shuffle=False, verbose=0,
                      callbacks=[callbacks[i]])

    _federate(chief, workers, options, train)
    for cb, m in zip(callbacks, models):
        # fit stopped at the federation's end, holding its final model.
        assert cb.done and cb.syncs == ROUNDS and cb.steps == ROUNDS * 2
        for a, b in zip(m.get_weights(), chief.chief.global_arrays):
            np.testing.assert_array_equal(a, b)


def test_lightning_callback_workers_get_plain_fedavg_under_secure_aggregation() -> None:
    torch = pytest.importorskip("torch", reason="the torch extra")
    lightning = pytest.importorskip("lightning", reason="the lightning extra")
    from fedberry.integrations.torch import get_arrays
    from fedberry.lightning import FederatedCallback

    class Tiny(lightning.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.net = torch.nn.Sequential(torch.nn.Linear(6, 4), torch.nn.ReLU(),
                                           torch.nn.Linear(4, 2))

        def training_step(self, batch: Any, batch_idx: int) -> Any:
            x, y = batch
            return torch.nn.functional.cross_entropy(self.net(x), y)

        def configure_optimizers(self) -> Any:
            return torch.optim.SGD(self.parameters(), lr=0.1, momentum=0.9)

    torch.manual_seed(0)
    modules = [Tiny() for _ in range(N)]
    # The 16-bit ring with a clip near the changes' size: its step (C / 127) is coarse enough
    # that the quantization error shows, so the bound is what is tested, not float luck.
    options = SecAggOptions(bits=16, clip=2.0)
    chief = _serve(options, get_arrays(modules[0]))
    workers = [_worker(chief, i) for i in range(N)]
    callbacks = [FederatedCallback(worker=workers[i], sync_every=2, num_samples=SAMPLES[i])
                 for i in range(N)]
    trainers = [lightning.Trainer(accelerator="cpu", max_epochs=50, enable_progress_bar=False,
                                  logger=False, enable_checkpointing=False,
                                  enable_model_summary=False, callbacks=[callbacks[i]])
                for i in range(N)]

    def train(i: int) -> None:
        g = torch.Generator().manual_seed(100 + i)
        data = torch.utils.data.TensorDataset(torch.randn(32, 6, generator=g),
                                              torch.randint(0, 2, (32,), generator=g))
        trainers[i].fit(modules[i], torch.utils.data.DataLoader(data, batch_size=8))

    worst = _federate(chief, workers, options, train)
    assert worst > 1e-4, worst  # the coarse ring's error is really there
    for cb, trainer, m in zip(callbacks, trainers, modules):
        # The trainer stopped at the last round, and the module holds the federation's model.
        assert cb.done and cb.syncs == ROUNDS and trainer.global_step == ROUNDS * 2
        for a, b in zip(get_arrays(m), chief.chief.global_arrays):
            np.testing.assert_array_equal(a, b)


def test_torch_federated_optimizer_workers_get_plain_fedavg_under_secure_aggregation() -> None:
    torch = pytest.importorskip("torch", reason="the torch extra")
    from fedberry.integrations.torch import get_arrays
    from fedberry.torch import FederatedOptimizer

    torch.manual_seed(0)
    # A BatchNorm layer: its running statistics are in the sum too (and its step counter,
    # which get_arrays sends as float32 like every state_dict entry).
    models = [torch.nn.Sequential(torch.nn.Linear(6, 4), torch.nn.BatchNorm1d(4),
                                  torch.nn.ReLU(), torch.nn.Linear(4, 2)) for _ in range(N)]
    options = SecAggOptions()
    chief = _serve(options, get_arrays(models[0]))
    workers = [_worker(chief, i) for i in range(N)]
    opts = [FederatedOptimizer(torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9), m,
                               worker=w, sync_every=2, num_samples=n)
            for m, w, n in zip(models, workers, SAMPLES)]

    def train(i: int) -> None:
        g = torch.Generator().manual_seed(100 + i)
        with opts[i] as opt:
            opt.join()  # so that the first batch's forward pass counts at the federation's model
            while not opt.done:
                x = torch.randn(8, 6, generator=g)
                y = torch.randint(0, 2, (8,), generator=g)
                loss = torch.nn.functional.cross_entropy(models[i](x), y)
                opt.zero_grad()
                loss.backward()
                opt.record_loss(loss)
                opt.step()

    _federate(chief, workers, options, train)
    for opt, m in zip(opts, models):
        assert opt.steps == ROUNDS * 2
        for (name, tensor), b in zip(m.state_dict().items(), chief.chief.global_arrays):
            if tensor.is_floating_point():
                np.testing.assert_array_equal(tensor.numpy(), b)
            else:  # the step counter: the nearest integer to the securely summed mean
                assert name.endswith("num_batches_tracked") and int(tensor) == ROUNDS * 2


def test_an_integer_buffer_off_by_the_fixed_point_step_loads_rounded_not_truncated() -> None:
    """What a secure round gives for a BatchNorm step counter of 2: its mean decoded from the
    ring, one step off (float32 1.9999998). Truncated it would load as 1."""
    torch = pytest.importorskip("torch", reason="the torch extra")
    from fedberry.integrations.torch import get_arrays, set_arrays

    model = torch.nn.BatchNorm1d(4)
    arrays = get_arrays(model)
    names = list(model.state_dict())
    counter = names.index("num_batches_tracked")
    for value, loaded in ((np.nextafter(np.float32(2), np.float32(0)), 2),
                          (np.nextafter(np.float32(2), np.float32(3)), 2), (np.float32(2.6), 3)):
        arrays[counter] = np.array(value, np.float32)
        set_arrays(model, arrays)
        assert int(model.num_batches_tracked) == loaded, value
