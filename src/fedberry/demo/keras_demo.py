"""The Fashion-MNIST demo through Keras 3: the worker, the chief's initial model and evaluator.

The federation's model is a Keras model end to end (Dense kernels are (in, out), unlike torch's
(out, in) Linear weights), so a Keras demo needs a Keras chief: ``fedberry demo --framework
keras`` and ``fedberry chief --framework keras`` build one here. The backend is Keras's choice
(``KERAS_BACKEND``, then ``~/.keras/keras.json`` when that backend is installed, then the first
installed of torch, JAX and TensorFlow: see ``ensure_backend``).

keras (the optional ``keras`` extra) and ``integrations.keras``, which imports it at load, are
imported inside the functions, after ``ensure_backend``: Keras fixes its backend on first import.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import math
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from fedberry.data.fashion_mnist import load_fashion_mnist
from fedberry.demo.common import TrainConfig, local_data

log = logging.getLogger("fedberry.demo")

BACKENDS = ("torch", "jax", "tensorflow")
_INPUT_SHAPES = {"mlp": (784,), "cnn": (28, 28, 1)}  # channels_last, Keras's default


def ensure_backend() -> str:
    """Pick the Keras backend before keras is imported, and keep its math on one thread.

    ``KERAS_BACKEND`` always wins. Otherwise keras.json's backend if it is installed: Keras
    writes that file on its first import with TensorFlow in it, which fedberry does not install,
    so an uninstalled backend there is more likely that default than a choice. Then the first
    installed of torch, JAX, TensorFlow. The choice goes into the environment so that worker
    processes started from here inherit it.
    """
    backend = os.environ.get("KERAS_BACKEND")
    if not backend:
        configured = _configured_backend()
        backend = next((b for b in (configured, *BACKENDS)
                        if b in BACKENDS and importlib.util.find_spec(b)), "torch")
        os.environ["KERAS_BACKEND"] = backend
    # One thread per process: the demo runs several workers on one machine, where more threads
    # per process only contend for the same cores. These must be set before the import.
    if backend == "jax" and "intra_op_parallelism_threads" not in os.environ.get("XLA_FLAGS", ""):
        os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_cpu_multi_thread_eigen"
                                   "=false intra_op_parallelism_threads=1").strip()
    if backend == "tensorflow":
        os.environ.setdefault("TF_NUM_INTRAOP_THREADS", "1")
        os.environ.setdefault("TF_NUM_INTEROP_THREADS", "1")
        os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    if backend == "torch":
        import torch  # the torch extra, present since it is the backend

        torch.set_num_threads(1)
    return backend


def _configured_backend() -> str | None:
    home = os.environ.get("KERAS_HOME") or str(Path.home() / ".keras")
    try:
        return json.loads((Path(home) / "keras.json").read_text()).get("backend")
    except (OSError, ValueError, AttributeError):
        return None


def build_keras_model(name: str, seed: int = 0) -> Any:
    """The FedAvg paper's models in Keras, initial weights depending only on ``seed``.

    ``mlp`` is 784-200-200-10 with ReLU (the torch ``models.mlp``), ``cnn`` the paper's CNN.
    Initializers carry their own seeds, so building a model leaves the global RNGs alone.
    Keras's default initializers (Glorot uniform kernels, zero biases), not torch's.
    """
    ensure_backend()
    import keras  # after ensure_backend: see the module docstring
    from keras import layers

    if name not in _INPUT_SHAPES:
        raise ValueError(f"unknown model {name!r}; choose one of {sorted(_INPUT_SHAPES)}")
    seeds = iter(range(seed * 1000, seed * 1000 + 1000))

    def dense(units: int, activation: str | None = None) -> Any:
        return layers.Dense(units, activation=activation,
                            kernel_initializer=keras.initializers.GlorotUniform(next(seeds)))

    def conv(filters: int) -> Any:
        return layers.Conv2D(filters, 5, padding="same", activation="relu",
                             kernel_initializer=keras.initializers.GlorotUniform(next(seeds)))

    if name == "mlp":
        body = [dense(200, "relu"), dense(200, "relu"), dense(10)]
    else:
        body = [conv(32), layers.MaxPooling2D(2), conv(64), layers.MaxPooling2D(2),
                layers.Flatten(), dense(512, "relu"), dense(10)]
    return keras.Sequential([keras.Input(_INPUT_SHAPES[name]), *body], name=f"fedavg_{name}")


def keras_model_input(name: str, x_flat: np.ndarray) -> np.ndarray:
    """Flat 784-pixel rows shaped for the Keras model ``name`` (a view, no copy)."""
    if name not in _INPUT_SHAPES:
        raise ValueError(f"unknown model {name!r}; choose one of {sorted(_INPUT_SHAPES)}")
    return np.asarray(x_flat, dtype=np.float32).reshape(-1, *_INPUT_SHAPES[name])


def initial_arrays(name: str, seed: int = 0) -> list[np.ndarray]:
    """The chief's initial model for a Keras federation."""
    ensure_backend()
    from fedberry.integrations.keras import get_arrays  # imports keras: after ensure_backend

    return get_arrays(build_keras_model(name, seed))


def make_keras_evaluator(name: str, data_dir: str | None = None) -> Any:
    """``evaluate(arrays) -> {"accuracy", "loss"}`` of a Keras global model on the test set."""
    ensure_backend()
    from fedberry.integrations.keras import set_arrays  # imports keras: after ensure_backend

    data = load_fashion_mnist(data_dir)
    x, y = keras_model_input(name, data.x_test), np.asarray(data.y_test, dtype=np.int64)
    model = build_keras_model(name)

    def evaluate_arrays(arrays: list[np.ndarray]) -> dict[str, float]:
        set_arrays(model, arrays)
        # predict_on_batch: no gradient tape, and 2000 rows at a time bound the memory.
        logits = np.concatenate([np.asarray(model.predict_on_batch(x[s:s + 2000]),
                                            dtype=np.float64)
                                 for s in range(0, len(x), 2000)])
        shifted = logits - logits.max(axis=1, keepdims=True)
        log_p = shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))
        loss = float(-log_p[np.arange(len(y)), y].mean())
        return {"accuracy": float((logits.argmax(axis=1) == y).mean()), "loss": loss}

    return evaluate_arrays


def _batches(x: np.ndarray, y: np.ndarray, batch_size: int,
             rng: np.random.Generator) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    # A fresh permutation per pass over the local data, from the worker's own seeded generator:
    # the same seed gives the same batches, whatever Keras's shuffling would do per backend.
    while True:
        perm = rng.permutation(len(x))
        for start in range(0, len(x), batch_size):
            b = perm[start:start + batch_size]
            yield x[b], y[b]


def run_keras_worker(chief: Any, index: int, count: int, cfg: TrainConfig,
                     **worker_options: Any) -> dict[str, Any]:
    """Train on partition ``index``/``count`` with ``model.fit`` until the chief says done."""
    ensure_backend()
    import keras  # after ensure_backend: see the module docstring

    from fedberry.integrations.keras import FederatedCallback

    log.info("worker %d/%d: Keras on %s, loading its part of Fashion-MNIST (%s)", index, count,
             os.environ.get("KERAS_BACKEND"), cfg.partition_scheme)
    x_np, y_np = local_data(cfg, index, count)
    x, y = keras_model_input(cfg.model, x_np), np.asarray(y_np, dtype=np.int64)
    model = build_keras_model(cfg.model, seed=cfg.seed)
    model.compile(optimizer=keras.optimizers.SGD(learning_rate=cfg.lr),
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    steps_per_epoch = math.ceil(len(x) / cfg.batch_size)
    if not worker_options.get("cert"):  # with one, the id is the certificate's name
        worker_options.setdefault("worker_id", f"keras-worker-{index}of{count}-{os.getpid()}")
    worker_options.setdefault("codec", cfg.codec)
    callback = FederatedCallback(chief, sync_every=cfg.sync_every or steps_per_epoch,
                                 num_samples=len(x), **worker_options)
    rng = np.random.default_rng([cfg.seed, index])
    # "Epochs" without end: the callback stops fit when the chief has run all its rounds. The
    # generator shuffles; shuffle=False only tells Keras not to warn that it cannot.
    with callback:
        model.fit(_batches(x, y, cfg.batch_size, rng), steps_per_epoch=steps_per_epoch,
                  epochs=10**9, shuffle=False, verbose=0, callbacks=[callback])
    worker = callback.worker
    return {"steps": callback.steps, "round": worker.round if worker else 0,
            "bytes_sent": worker.bytes_sent if worker else 0,
            "bytes_received": worker.bytes_received if worker else 0,
            "backend": keras.backend.backend()}
