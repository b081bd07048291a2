"""fedberry.keras.FederatedCallback in one process: when it joins, syncs and leaves, what it sends,
and the errors a mismatched model gets. Real processes are in test_keras_processes.py.

Runs on whatever Keras backend KERAS_BACKEND names (torch when unset).
"""

from __future__ import annotations

import os

import numpy as np
import pytest

os.environ.setdefault("KERAS_BACKEND", "torch")
pytest.importorskip(os.environ["KERAS_BACKEND"],
                    reason=f"the Keras backend {os.environ['KERAS_BACKEND']} is not installed")
keras = pytest.importorskip("keras", reason="Keras 3 is the 'keras' extra")

from fedberry.errors import ModelMismatchError  # noqa: E402
from fedberry.integrations.keras import explain_mismatch, weight_names  # noqa: E402
from fedberry.keras import FederatedCallback  # noqa: E402
from fedberry.serve import serve  # noqa: E402

TOKEN = "keras-callback-test-token"


def linear(lr: float = 0.1, batchnorm: bool = False, hidden: int | None = None) -> keras.Model:
    """4 inputs, 3 outputs; optionally a hidden layer of ``hidden`` units before the output."""
    layers = [keras.Input((4,))]
    if hidden:
        layers.append(keras.layers.Dense(hidden))
    layers.append(keras.layers.Dense(3, kernel_initializer=keras.initializers.GlorotUniform(0)))
    if batchnorm:
        layers.append(keras.layers.BatchNormalization())
    model = keras.Sequential(layers)
    model.compile(optimizer=keras.optimizers.SGD(learning_rate=lr), loss="mse")
    return model


def data(n: int = 28, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return (rng.standard_normal((n, 4)).astype(np.float32),
            rng.standard_normal((n, 3)).astype(np.float32))


def constant_arrays(model: keras.Model, seed: int = 7) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    # Positive values: a valid BatchNorm moving variance among them.
    return [rng.uniform(0.5, 1.5, size=tuple(v.shape)).astype(np.float32) for v in model.weights]


class Snapshots(keras.callbacks.Callback):
    """Placed after FederatedCallback: sees the model as FederatedCallback left it."""

    def __init__(self) -> None:
        super().__init__()
        self.at_begin: list[np.ndarray] = []

    def on_train_begin(self, logs=None) -> None:
        self.at_begin = self.model.get_weights()


def test_join_loads_the_chiefs_model_including_non_trainable_weights():
    model = linear(batchnorm=True)
    assert len(model.weights) == 6  # kernel, bias, gamma, beta, moving mean, moving variance
    initial = constant_arrays(model)
    x, y = data()
    with serve(None, workers=1, rounds=1, initial=initial) as chief:
        snap = Snapshots()
        model.fit(x, y, batch_size=4, epochs=1, verbose=0,
                  callbacks=[FederatedCallback(chief, sync_every=100), snap])
        assert chief.wait(10)
    for got, want in zip(snap.at_begin, initial):
        np.testing.assert_array_equal(got, want)


def test_syncs_every_k_batches_across_epochs_and_at_train_end_then_leaves():
    # lr=0: the weights never move, so every batch loss is known in advance and the loss the
    # chief logs per round can be checked against numpy.
    model = linear(lr=0.0)
    initial = constant_arrays(model)
    x, y = data(28)  # 7 batches of 4 per epoch
    with serve(None, workers=1, initial=initial) as chief:  # rounds=None: until we leave
        cb = FederatedCallback(chief, sync_every=3)
        model.fit(x, y, batch_size=4, epochs=2, shuffle=False, verbose=0, callbacks=[cb])
        assert chief.wait(10), "the chief should finish once its only worker has left"
        records = chief.metrics
    # 14 batches: syncs after 3, 6, 9, 12 (crossing the epoch boundary at 7), then the 2 left.
    assert cb.steps == 14 and cb.syncs == 5
    assert [r["num_samples"] for r in records] == [3, 3, 3, 3, 2]
    w, b = initial
    batch_loss = [float(np.mean((x[i:i + 4] @ w + b - y[i:i + 4]) ** 2))
                  for i in range(0, 28, 4)] * 2
    windows = [batch_loss[0:3], batch_loss[3:6], batch_loss[6:9], batch_loss[9:12],
               batch_loss[12:14]]
    np.testing.assert_allclose([r["train_loss"] for r in records],
                               [np.mean(win) for win in windows], rtol=1e-4)


@pytest.mark.skipif(os.environ["KERAS_BACKEND"] == "torch",
                    reason="the torch backend has no steps_per_execution")
def test_steps_per_execution_counts_every_batch():
    model = linear(lr=0.0)
    model.compile(optimizer=keras.optimizers.SGD(0.0), loss="mse", steps_per_execution=2)
    x, y = data(28)  # 7 batches: executions of 2, 2, 2, 1
    with serve(None, workers=1, initial=constant_arrays(model)) as chief:
        cb = FederatedCallback(chief, sync_every=3)
        model.fit(x, y, batch_size=4, epochs=2, shuffle=False, verbose=0, callbacks=[cb])
        assert chief.wait(10)
        # A sync can only fall between executions: after 4 batches, then the epoch's last 3.
        assert [r["num_samples"] for r in chief.metrics] == [4, 3, 4, 3]
    assert cb.steps == 14


def test_num_samples_weights_every_sync():
    model = linear(lr=0.0)
    x, y = data(8)
    with serve(None, workers=1, initial=constant_arrays(model)) as chief:
        model.fit(x, y, batch_size=4, epochs=1, verbose=0,
                  callbacks=[FederatedCallback(chief, sync_every=1, num_samples=600)])
        assert chief.wait(10)
        assert [r["num_samples"] for r in chief.metrics] == [600, 600]


def test_the_end_of_the_federation_stops_fit_with_the_final_model():
    model = linear()
    x, y = data()
    with serve(None, workers=1, rounds=2, initial=constant_arrays(model)) as chief:
        cb = FederatedCallback(chief, sync_every=2)
        history = model.fit(x, y, batch_size=4, epochs=50, verbose=0, callbacks=[cb])
        assert chief.wait(10)
        final = chief.chief.global_arrays
    assert cb.done and cb.steps == 4 and len(history.history["loss"]) == 1
    for got, want in zip(model.get_weights(), final):
        np.testing.assert_array_equal(got, want)


def test_stop_when_done_false_trains_on_locally():
    model = linear()
    x, y = data()
    with serve(None, workers=1, rounds=1, initial=constant_arrays(model)) as chief:
        cb = FederatedCallback(chief, sync_every=2, stop_when_done=False)
        model.fit(x, y, batch_size=4, epochs=2, verbose=0, callbacks=[cb])
        assert chief.wait(10)
        final = chief.chief.global_arrays
    assert cb.done and cb.steps == 14 and cb.syncs == 1
    assert not np.array_equal(model.get_weights()[0], final[0])


def test_leave_at_end_false_stays_a_member_across_fit_calls():
    model = linear(lr=0.0)
    x, y = data(16)  # 4 batches per fit
    with serve(None, workers=1, initial=constant_arrays(model)) as chief:
        with FederatedCallback(chief, sync_every=3, leave_at_end=False) as cb:
            for _ in range(3):
                model.fit(x, y, batch_size=4, epochs=1, verbose=0, callbacks=[cb])
            # No sync at train end: 12 batches, one sync every 3, whatever the fit calls.
            assert cb.syncs == 4 and not chief.wait(0.2)
        assert chief.wait(10)
        assert len(chief.metrics) == 4


def test_a_different_layer_shape_is_refused_at_join_naming_the_variable():
    chief_model = linear(hidden=8)
    with serve("127.0.0.1:0", workers=2, rounds=1, initial=constant_arrays(chief_model),
               token=TOKEN) as chief:
        mine = linear(hidden=5)
        before = mine.get_weights()
        x, y = data()
        cb = FederatedCallback(chief.url, sync_every=2, token=TOKEN, connect_timeout=10)
        with pytest.raises(ModelMismatchError) as err:
            mine.fit(x, y, batch_size=4, epochs=1, verbose=0, callbacks=[cb])
    message = str(err.value)
    assert "does not match" in message and "[4, 5]" in message and "[4, 8]" in message
    assert f"Keras variable {weight_names(mine)[0]!r}" in message
    assert "dense" in weight_names(mine)[0] and "kernel" in weight_names(mine)[0]
    for got, want in zip(mine.get_weights(), before):  # refused before any training
        np.testing.assert_array_equal(got, want)


def test_a_different_layer_count_is_refused_listing_the_variables():
    chief_model = linear()
    with serve("127.0.0.1:0", workers=2, rounds=1, initial=constant_arrays(chief_model),
               token=TOKEN) as chief:
        mine = linear(hidden=2)
        x, y = data()
        with pytest.raises(ModelMismatchError, match="4 tensors.*federation's has 2") as err:
            mine.fit(x, y, batch_size=4, epochs=1, verbose=0,
                     callbacks=[FederatedCallback(chief.url, token=TOKEN, connect_timeout=10)])
    assert all(name in str(err.value) for name in weight_names(mine))


def test_a_pytorch_layout_federation_is_explained():
    model = linear()
    # What a torch chief holds for the same layer: Linear.weight is (out, in).
    torch_layout = [np.zeros((3, 4), np.float32), np.zeros(3, np.float32)]
    with serve(None, workers=1, rounds=1, initial=torch_layout) as chief:
        x, y = data()
        with pytest.raises(ModelMismatchError, match="transposed.*--framework keras"):
            model.fit(x, y, batch_size=4, epochs=1, verbose=0,
                      callbacks=[FederatedCallback(chief)])


def test_explain_mismatch_keeps_a_message_it_cannot_map():
    model = linear()
    exc = explain_mismatch(ModelMismatchError("something else", "spec_mismatch"), model)
    assert str(exc) == "something else" and exc.code == "spec_mismatch"


def test_arguments_are_checked():
    with pytest.raises(ValueError, match="sync_every"):
        FederatedCallback(sync_every=0)
    with pytest.raises(ValueError, match="num_samples"):
        FederatedCallback(num_samples=0)
